"""Input and loop benchmark: the input pipeline, the train step alone, the step fed by the pipeline, and the
production training loop's overhead over the step.

  python benchmarks/bench_input.py                              # configs/unet.py on jaxseg_shapes, 3 loop rounds
  python benchmarks/bench_input.py --rounds=3 --loop_steps=400 --json=benchmarks/results/input_cpu.json
  python benchmarks/bench_input.py --rounds=0                   # pipeline and step only (seconds, no run.py)
  python benchmarks/bench_input.py --config=configs/fcn.py --config.batch_size=32
  python benchmarks/bench_input.py --dataset=folder --path=DIR --num_classes=4 \\
      --config.input.crop_size='(96,96)' --config.input.photometric=True   # DIR: tools/make_photo_folder.py DIR

Any field of the training config can be overridden with --config.FIELD=VALUE, as with run.py; --dataset,
--path, --num_classes and --data_dir are shorthands for config.dataset.name/path/num_classes/data_dir. Measured
in one process (one JAX process: process 0 of 1), on the devices run.py would use (a CPU-only host's cores split
into devices the same way), in this order:

* pipeline: `pipeline.train_dataset(...)` for the config, iterated as numpy exactly as training reads it (the
  global batch), nothing else running: the time from building the dataset to its first batch, then
  `--warmup_batches` untimed batches, then `--batches` batches timed.
* train step: jaxseg's `train.make_train_step(...)` (one jit program over the mesh of every device) for the same
  config, on the state `state.build(...).init_state()` lays out as train_and_evaluate does, on one fixed
  device-resident global batch taken from the pipeline (so input is excluded). `--warmup_steps` untimed steps,
  each timed on its own (the first compiles; XLA compilations in later calls are counted as `recompiles`),
  then `--steps` steps synchronised only at the two ends.
* fed (unless --fed_steps=0): the same step fed by a fresh pipeline through `sharding.prefetch` (with
  config.input.prefetch_to_device batches ahead), as train_and_evaluate feeds it, without its logging,
  evaluation and checkpoints: `--warmup_steps` untimed steps, then `--fed_steps` timed. A fresh pipeline, so
  no batch made while the step was timed on its fixed batch is counted.
* loop (unless --rounds=0): `--rounds` rounds, each of: the fixed-batch step (`--steps` steps, as above), then
  `python run.py` with the same config arguments, in its own process and a fresh temporary workdir, for
  `--loop_steps` steps with everything production does on the way (pipeline and prefetch to the devices,
  metrics fetched every log_every_steps, progress line, TensorBoard and metrics.jsonl, asynchronous checkpoints
  every checkpoint_every_steps), evaluation only after the last step; then the fixed-batch step again. The
  loop's images/s is the logged `images_per_sec` of every log interval but the first (which holds start-up and
  compilation), combined as total images over total time; like its log lines it leaves out the synchronous
  part of each checkpoint save. overhead = 1 - loop / mean(step before, step after): the share of the step's
  time the loop adds. Timing the step on both sides of each loop cancels slow drifts of the machine's speed (a
  shared VM's speed moves by 5-10% over minutes); the median over the rounds is the figure reported. run.py
  runs in a child process, as in production: no other program shares its devices (the benchmark's own
  process waits, holding its compiled step).

ratio_pipeline_over_step = pipeline images/s / train-step images/s: above 1 the input keeps up with the step
when each has the machine to itself. ratio_fed_over_step = fed / train step: what feeding the step from the
pipeline costs (on a CPU the pipeline's threads share the cores with the step).
"""

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # jaxseg, configs.
  sys.path.insert(0, ROOT)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

SCHEMA = 'jaxseg-bench-input/2'

FLAGS = flags.FLAGS
# config.dataset fields the shorthand flags set, in this order.
SHORTHANDS = (('dataset', 'name'), ('path', 'path'), ('num_classes', 'num_classes'), ('data_dir', 'data_dir'))


def define_flags() -> None:
  """The command-line flags (defined when run as a script, so that importing this module defines none)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'unet.py'),
                                  'Training config (a get_config() file); default configs/unet.py.')
  flags.DEFINE_string('dataset', None, 'config.dataset.name to read, e.g. jaxseg_shapes or folder '
                      "(default: the config's).")
  flags.DEFINE_string('path', None, 'config.dataset.path: the folder for --dataset=folder.')
  flags.DEFINE_integer('num_classes', None, 'config.dataset.num_classes (needed for --dataset=folder).')
  flags.DEFINE_string('data_dir', None, 'config.dataset.data_dir: the tfds data dir (default: $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).')
  flags.DEFINE_integer('batches', 50, 'Pipeline batches timed.')
  flags.DEFINE_integer('warmup_batches', 5, 'Pipeline batches read after the first one, before timing.')
  flags.DEFINE_integer('steps', 60, 'Fixed-batch train steps timed (alone, and before and after each loop).')
  flags.DEFINE_integer('warmup_steps', 2, 'Untimed train steps before timing (the first compiles).')
  flags.DEFINE_integer('fed_steps', 20, 'Train steps timed when fed by the pipeline (0: skip that phase).')
  flags.DEFINE_integer('rounds', 3, 'Rounds of (fixed step, run.py loop, fixed step) (0: skip the loop).')
  flags.DEFINE_integer('loop_steps', 400, 'Training steps of the run.py loop per round.')
  flags.DEFINE_string('json', None, 'Write the results to this JSON file.')


# ---------------------------------------------------------------------------
# The arithmetic (tests/test_bench_input.py checks the report's figures by hand).
# ---------------------------------------------------------------------------


def rate(images: int, seconds: float) -> float:
  return images / seconds if seconds > 0 else float('inf')


def overhead(step_before: float, loop: float, step_after: float) -> float:
  """1 - loop / mean(step before, step after), all in images/s: the share of the step's time the loop adds."""
  return 1 - loop / ((step_before + step_after) / 2)


def derived(pipeline_rate: float, step_rate: float, fed_rate, overheads: list[float]) -> dict:
  """The report's summary figures from the measured rates (images/s) and the rounds' overheads."""
  return {'ratio_pipeline_over_step': pipeline_rate / step_rate,
          'ratio_fed_over_step': None if fed_rate is None else fed_rate / step_rate,
          'overhead_median': statistics.median(overheads) if overheads else None}


def loop_rate_from_metrics(records: list[dict], batch_size: int) -> dict:
  """The loop's images/s from run.py's metrics.jsonl records: every log interval but the first.

  Each train record's `images_per_sec` covers the steps since the previous train record; interval seconds =
  its steps x batch_size / images_per_sec, and the rate is total images / total seconds.
  """
  points = [r for r in records if r['split'] == 'train']
  intervals = []  # (steps, seconds) of each log interval after the first.
  for prev, cur in zip(points, points[1:]):
    n = cur['step'] - prev['step']
    intervals.append((n, n * batch_size / cur['images_per_sec']))
  if not intervals:
    raise ValueError(f'the loop logged {len(points)} train point(s): at least 2 are needed')
  steps = sum(n for n, _ in intervals)
  seconds = sum(s for _, s in intervals)
  return {'timed_steps': steps, 'timed_seconds': seconds, 'images_per_s': rate(steps * batch_size, seconds),
          'interval_images_per_s': [r['images_per_sec'] for r in points[1:]]}


def config_args(argv: list[str], config_file: str, shorthands: dict) -> list[str]:
  """The arguments that give run.py this benchmark's config: its --config / --config.FIELD arguments unchanged,
  `--config=config_file` when none names the file, and the shorthand flags as --config.dataset.FIELD (last, so
  they win, as they do here).

  Args:
    argv: this benchmark's command-line arguments (without the program name).
    config_file: the config file this benchmark read (for when argv does not name one: the default).
    shorthands: {flag name: value} of the shorthand flags given (None: not given).
  """
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg != '--config' and not arg.startswith(('--config=', '--config.')):
      continue
    out.append(arg)
    if '=' not in arg and i < len(argv) and not argv[i].startswith('--'):
      out.append(argv[i])  # The '--config.x VALUE' form ('--config.flag' alone is a boolean).
      i += 1
  if not any(a == '--config' or a.startswith('--config=') for a in out):
    out.insert(0, f'--config={config_file}')
  for flag, field in SHORTHANDS:
    if shorthands.get(flag) is not None:
      out.append(f'--config.dataset.{field}={shorthands[flag]}')
  return out


def _loadavg():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def apply_shorthands(config, shorthands: dict):
  """The config with the shorthand flags applied to config.dataset."""
  with config.unlocked():
    for flag, field in SHORTHANDS:
      if shorthands.get(flag) is not None:
        config.dataset[field] = shorthands[flag]
  return config


# ---------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------


class CompileEvents:
  """XLA compilations (jax.monitoring) between `take()` calls: a train step that recompiles shows here."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.events = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      self.events.append((str(kwargs.get('fun_name', '?')), float(duration)))

  def take(self) -> dict:
    events, self.events = self.events, []
    return {'xla_compiles': len(events), 'compile_s': sum(d for _, d in events)}


# ---------------------------------------------------------------------------
# The one function that calls jaxseg's internals (its API is being reworked: adapt it here, nowhere else).
# ---------------------------------------------------------------------------


def jaxseg_parts(config) -> types.SimpleNamespace:
  """What the measurements use, for `config` (shorthands applied), built as run.py and train_and_evaluate build it.

  The CPU-only host's cores split into devices (before any JAX computation; the flag goes into os.environ, so
  run.py's child processes get the same devices), the config checked, the dataset opened, the 'auto' crop and
  class weighting chosen from the data, the state laid out on the mesh of every device.

  Returns a namespace: config (resolved), spec, builder; batches(): a fresh training pipeline's numpy global
  batches; train_step(state, device batch) -> (state, metrics), jitted, and state, its initial state;
  put(numpy batch) -> device batch; prefetch(numpy batches) -> device batches, as training feeds the step;
  state_bytes(state): one device's bytes of it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg import distributed, recipe, sharding, train  # pylint: disable=g-import-not-at-top
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  distributed.split_cpu_into_devices(config.get('cpu_devices', 0), (config.batch_size, config.eval_batch_size))
  settings = settings_lib.from_config(config)
  pipeline.hide_accelerators_from_tf()
  settings_lib.check_batch(settings, jax.device_count())
  spec, builder = datasets.open_dataset(settings.dataset, in_channels=settings.model.in_channels)
  settings = recipe.resolve(settings, spec, builder)
  config = config.copy_and_resolve_references()  # The report's config: the recipe's choices in place of 'auto'.
  with config.ignore_type():
    config.input.crop_size, config.input.eval_size = settings.input.crop_size, settings.input.eval_size
    config.loss.class_weighting = settings.loss.class_weighting
  mesh = sharding.make_mesh()
  setup = state_lib.build(settings, spec.num_classes, mesh)

  def batches():
    return pipeline.as_numpy(pipeline.train_dataset(builder, spec, settings.input, global_batch=settings.batch_size,
                                                    seed=settings.seed, start_step=0, process_index=0,
                                                    process_count=1))

  return types.SimpleNamespace(
      config=config, spec=spec, builder=builder, batches=batches, state=setup.init_state(),
      train_step=train.make_train_step(settings, spec, setup, recipe.class_weights(settings, spec, builder)),
      put=lambda batch: sharding.global_batch(batch, mesh),
      prefetch=lambda it: sharding.prefetch(it, mesh, settings.input.prefetch_to_device),
      state_bytes=sharding.tree_bytes_per_device)


class FixedStep:
  """jaxseg's production train step (`jaxseg_parts`) on one fixed device-resident global batch: input excluded.

  Attributes:
    state, metrics: the train state and the last step's metrics (global device arrays).
  """

  def __init__(self, parts, host_batch: dict):
    """host_batch: one numpy batch as the training pipeline yields it; placed on the mesh as training does."""
    import jax  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self._train_step = parts.train_step
    self.state = jax.block_until_ready(parts.state)
    self.metrics = None
    self._batch = jax.block_until_ready(parts.put(host_batch))
    self.batch_size = parts.config.batch_size

  def step(self, batch=None) -> None:
    """Dispatches one step on `batch` (a global device batch; default the fixed one) without waiting for it."""
    self.state, self.metrics = self._train_step(self.state, self._batch if batch is None else batch)

  def wait(self) -> None:
    self._jax.block_until_ready((self.state, self.metrics))

  def seconds(self, steps: int, feed=None) -> float:
    """Runs `steps` steps (on batches from `feed`, else the fixed batch), synchronised at the two ends only."""
    self.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step(None if feed is None else next(feed))
    self.wait()
    return time.perf_counter() - t0

  def images_per_s(self, steps: int, feed=None) -> float:
    return rate(steps * self.batch_size, self.seconds(steps, feed))


def measure_pipeline(it, batch_size: int, warmup_batches: int, batches: int, t_start: float) -> dict:
  """Times the first batch (from `t_start`, when the dataset was built), then `batches` after the warm-up ones."""
  next(it)
  first_batch_s = time.perf_counter() - t_start
  for _ in range(warmup_batches):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  return {'time_to_first_batch_s': first_batch_s, 'warmup_batches': warmup_batches, 'batches': batches,
          'seconds': seconds, 'images_per_s': rate(batches * batch_size, seconds),
          'ms_per_batch': 1000 * seconds / max(batches, 1)}


def run_loop(config, steps: int, args: list[str]) -> dict:
  """`python run.py ARGS` (the production command) for `steps` steps in a temporary workdir, in its own process.

  Returns its images/s after its first log interval (from its metrics.jsonl), its wall time and the checkpoints
  it kept.
  """
  workdir = tempfile.mkdtemp(prefix='jaxseg_bench_loop_')
  try:
    # Evaluation once, after the last step (left out of images/s anyway).
    cmd = [sys.executable, os.path.join(ROOT, 'run.py'), *args, f'--workdir={workdir}',
           f'--config.num_train_steps={steps}', f'--config.eval_every_steps={steps}']
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      raise RuntimeError(f'run.py failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      records = [json.loads(line) for line in f]
    checkpoints = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints')) if name.isdigit())
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return dict(loop_rate_from_metrics(records, config.batch_size), steps=steps, wall_s=wall,
              checkpoints_kept=checkpoints)


def run_benchmark(config, settings: dict, loop_args: list[str]) -> dict:
  """Runs the measurements for `config` and returns the report (see the module docstring).

  Args:
    config: the training config (shorthands applied).
    settings: batches, warmup_batches, steps, warmup_steps, fed_steps, rounds, loop_steps, config_file.
    loop_args: the config arguments for run.py (`config_args`).
  """
  s = settings
  if s['rounds'] and s['loop_steps'] < 2 * config.log_every_steps:
    raise ValueError(f'--loop_steps={s["loop_steps"]} must cover at least two log intervals of '
                     f'config.log_every_steps={config.log_every_steps}')
  load_start = _loadavg()
  parts = jaxseg_parts(config)
  import jax  # pylint: disable=g-import-not-at-top  # After jaxseg_parts has split the CPU into devices.
  config, spec, builder = parts.config, parts.spec, parts.builder
  batch_size = config.batch_size

  # ---- Pipeline alone. ----
  t_start = time.perf_counter()
  it = parts.batches()
  pipe = measure_pipeline(it, batch_size, s['warmup_batches'], s['batches'], t_start)
  print(f'pipeline: {pipe["images_per_s"]:.1f} img/s (first batch after {pipe["time_to_first_batch_s"]:.2f}s)',
        flush=True)

  # ---- Train step alone, on one device-resident batch from the pipeline. ----
  compiles = CompileEvents()
  fixed = FixedStep(parts, next(it))
  del it  # Its threads would otherwise keep filling its buffers.
  gc.collect()
  compiles.take()
  warmup_s, warmup_compiles = [], []  # Each warm-up step on its own: a recompilation after the first shows.
  for _ in range(max(s['warmup_steps'], 1)):
    t0 = time.perf_counter()
    fixed.step()
    fixed.wait()
    warmup_s.append(time.perf_counter() - t0)
    warmup_compiles.append(compiles.take())
  step_s = fixed.seconds(s['steps'])
  timed_compiles = compiles.take()
  step = {'steps': s['steps'], 'warmup_steps': len(warmup_s), 'warmup_step_s': warmup_s,
          'seconds': step_s, 'images_per_s': rate(s['steps'] * batch_size, step_s),
          'ms_per_step': 1000 * step_s / max(s['steps'], 1),
          'final_loss': float(fixed.metrics['loss']),
          'compile_s': warmup_compiles[0]['compile_s'],
          # XLA compilations in the calls after the first (0 unless the step recompiles, e.g. for a change of
          # the state's sharding between the first call and the next).
          'recompiles': sum(c['xla_compiles'] for c in warmup_compiles[1:]) + timed_compiles['xla_compiles'],
          'state_bytes_per_device': parts.state_bytes(fixed.state)}
  print(f'train step: {step["images_per_s"]:.1f} img/s ({step["ms_per_step"]:.1f} ms/step)', flush=True)

  # ---- The train step fed by a fresh pipeline, as train_and_evaluate feeds it. ----
  fed = None
  if s['fed_steps'] > 0:
    feed = parts.prefetch(parts.batches())
    fixed.seconds(max(s['warmup_steps'], 1), feed)
    compiles.take()
    fed_s = fixed.seconds(s['fed_steps'], feed)
    fed = {'steps': s['fed_steps'], 'seconds': fed_s, 'images_per_s': rate(s['fed_steps'] * batch_size, fed_s),
           'recompiles': compiles.take()['xla_compiles']}
    del feed
    gc.collect()
    print(f'fed: {fed["images_per_s"]:.1f} img/s', flush=True)

  # ---- The production loop (run.py) between two fixed-step blocks, per round. ----
  rounds = []
  for i in range(s['rounds']):
    before = fixed.images_per_s(s['steps'])
    loop = run_loop(config, s['loop_steps'], loop_args)
    after = fixed.images_per_s(s['steps'])
    rounds.append({'step_before_images_per_s': before, 'loop': loop, 'step_after_images_per_s': after,
                   'overhead': overhead(before, loop['images_per_s'], after)})
    print(f'round {i + 1}/{s["rounds"]}: step {before:.1f} | loop {loop["images_per_s"]:.1f} | step {after:.1f} '
          f'img/s -> overhead {100 * rounds[-1]["overhead"]:.1f}%', flush=True)

  device = jax.devices()[0]
  return {
      'schema': SCHEMA,
      'dataset': {'name': spec.name, 'path': config.dataset.get('path'), 'num_classes': spec.num_classes,
                  'train_examples': builder.info.splits[spec.train_split].num_examples, 'data_dir': builder.data_dir},
      'config': {'file': s['config_file'], 'batch_size': batch_size,
                 'crop_size': list(config.input.crop_size), 'scale_range': list(config.input.scale_range),
                 'hflip': bool(config.input.hflip), 'photometric': bool(config.input.photometric),
                 'prefetch_to_device': config.input.prefetch_to_device,
                 'sharding': config.get('sharding', 'replicated'),
                 'log_every_steps': config.log_every_steps, 'checkpoint_every_steps': config.checkpoint_every_steps,
                 'model': config.model.to_dict(), 'half_precision': bool(config.half_precision)},
      'device': {'platform': device.platform, 'kind': device.device_kind, 'device_count': jax.device_count(),
                 'local_device_count': jax.local_device_count()},
      'host': {'cpu_count': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
               'loadavg_start': load_start, 'loadavg_end': _loadavg(), 'machine': platform.machine(),
               'python': platform.python_version(), 'jax_version': jax.__version__},
      'settings': {k: v for k, v in s.items() if k != 'config_file'},
      'loop_args': loop_args,
      'pipeline': pipe,
      'train_step': step,
      'fed': fed,
      'rounds': rounds,
      **derived(pipe['images_per_s'], step['images_per_s'], fed['images_per_s'] if fed else None,
                [r['overhead'] for r in rounds]),
  }


def format_report(r: dict) -> str:
  """The report as small tables."""
  p, s, fed = r['pipeline'], r['train_step'], r.get('fed')
  rows = [('pipeline', p['images_per_s'], f'{p["batches"]} batches, {p["ms_per_batch"]:.1f} ms/batch; first batch '
                                          f'after {p["time_to_first_batch_s"]:.2f}s'),
          ('train step (fixed batch)', s['images_per_s'], f'{s["steps"]} steps, {s["ms_per_step"]:.1f} ms/step')]
  if fed:
    rows.append(('train step fed by pipeline', fed['images_per_s'],
                 f'{fed["steps"]} steps, {r["config"]["prefetch_to_device"]} batches prefetched'))
  warm = ', '.join(f'{t:.2f}s' for t in s['warmup_step_s'])
  recompiles = s['recompiles'] + (fed or {}).get('recompiles', 0)
  c, d = r['config'], r['dataset']
  lines = [f'{d["name"]} ({d["train_examples"]} train examples), batch {c["batch_size"]}, crop '
           f'{tuple(c["crop_size"])}, scale {tuple(c["scale_range"])}, photometric {c["photometric"]}, state '
           f'{c["sharding"]}; {r["device"]["device_count"]} x {r["device"]["kind"]}, {r["host"]["cpu_count"]} CPUs, '
           f'load average {r["host"]["loadavg_start"]} -> {r["host"]["loadavg_end"]}',
           f'{"":28s} {"images/s":>10s}']
  lines += [f'{name:28s} {value:10.1f}  {note}' for name, value, note in rows]
  lines.append(f'ratio pipeline / train step: {r["ratio_pipeline_over_step"]:.2f}x; > 1: the input keeps up')
  if fed:
    lines.append(f'ratio fed / train step: {r["ratio_fed_over_step"]:.3f}x')
  lines.append(f'train step warm-up: {warm} per step (compile {s["compile_s"]:.1f}s); XLA compilations after the '
               f'first call: {recompiles}')
  if r['rounds']:
    lines.append(f'production loop (run.py, {r["settings"]["loop_steps"]} steps per round; log every '
                 f'{c["log_every_steps"]} / checkpoint every {c["checkpoint_every_steps"]} steps):')
    lines.append(f'{"round":>5s} {"step img/s":>11s} {"loop img/s":>11s} {"step img/s":>11s} {"overhead":>9s}')
    for i, x in enumerate(r['rounds']):
      lines.append(f'{i + 1:5d} {x["step_before_images_per_s"]:11.1f} {x["loop"]["images_per_s"]:11.1f} '
                   f'{x["step_after_images_per_s"]:11.1f} {100 * x["overhead"]:8.1f}%')
    lines.append(f'training-loop overhead (median of {len(r["rounds"])} rounds): {100 * r["overhead_median"]:.1f}% '
                 f'of the step time')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  if FLAGS.steps < 1 or FLAGS.rounds < 0 or FLAGS.batches < 1:
    raise app.UsageError('--steps and --batches must be at least 1, --rounds at least 0')
  shorthands = {flag: FLAGS[flag].value for flag, _ in SHORTHANDS}
  config = apply_shorthands(FLAGS.config, shorthands)
  config_file = FLAGS['config'].config_filename
  settings = {'batches': FLAGS.batches, 'warmup_batches': FLAGS.warmup_batches, 'steps': FLAGS.steps,
              'warmup_steps': FLAGS.warmup_steps, 'fed_steps': FLAGS.fed_steps, 'rounds': FLAGS.rounds,
              'loop_steps': FLAGS.loop_steps, 'config_file': config_file}
  try:
    report = run_benchmark(config, settings, config_args(sys.argv[1:], config_file, shorthands))
  except (ValueError, RuntimeError) as e:  # jaxseg's ConfigError and DataError are ValueErrors.
    print(f'bench_input: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(format_report(report), flush=True)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {FLAGS.json}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
