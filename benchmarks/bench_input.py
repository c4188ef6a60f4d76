"""Input-pipeline benchmark: images/s the tf.data pipeline delivers vs. images/s the train step consumes.

  python benchmarks/bench_input.py                                   # jaxseg_shapes, configs/unet.py
  python benchmarks/bench_input.py --dataset=folder --path=DIR --num_classes=4 \
      --config.input.crop_size='(96,96)' --config.input.photometric=True
  python benchmarks/bench_input.py --batches=5 --steps=2 --json=/tmp/input.json --config.model.base_width=4

Any field of the training config can be overridden with --config.FIELD=VALUE, as with run.py. Measured, in
one process, on whatever JAX devices are present:

* pipeline: `jaxseg.data.pipeline.train_dataset(...)` for the config, iterated as numpy exactly as training
  reads it (global batch, device-shaped), nothing else running. Two phases:
  - first epoch: from building the iterator to the last batch of the first epoch (ceil(examples / batch)
    batches): start-up, reading the prepared tfds files and, with config.dataset.cache, filling the cache;
  - steady: after `--warmup_batches` more, `--batches` batches, read from the cache when it is on.
* train step: jaxseg's pmapped `train.make_train_step(...)` for the same config, on one fixed device-resident
  batch taken from the pipeline (so input is excluded), the state replicated as train_and_evaluate does;
  `--warmup_steps` untimed steps, each timed on its own (the first compiles; XLA compilations in later calls
  are counted as `recompiles`), then `--steps` steps synchronised only at the two ends.
* fed (unless --fed_steps=0): the train step fed by the pipeline through `jax_utils.prefetch_to_device`,
  as train_and_evaluate does: what training actually runs at on this machine.

ratio = pipeline steady images/s / train-step images/s: above 1 the input keeps up with the step when
each has the machine to itself. On a CPU the two share the cores, so `fed` is lower than both.
"""

import json
import math
import os
import platform
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # The repo (jaxseg) and this folder (fixed_step).
  if path not in sys.path:
    sys.path.insert(0, path)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

SCHEMA = 'jaxseg-bench-input/1'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'unet.py'),
                                'Training config (a get_config() file); default configs/unet.py.')
flags.DEFINE_string('dataset', None, 'config.dataset.name to read, e.g. jaxseg_shapes or folder '
                    "(default: the config's).")
flags.DEFINE_string('path', None, 'config.dataset.path: the folder for --dataset=folder.')
flags.DEFINE_integer('num_classes', None, 'config.dataset.num_classes (needed for --dataset=folder).')
flags.DEFINE_string('data_dir', None, 'config.dataset.data_dir: the tfds data dir (default: $TFDS_DATA_DIR or '
                    '~/tensorflow_datasets).')
flags.DEFINE_integer('batches', 50, 'Steady-state pipeline batches timed.')
flags.DEFINE_integer('warmup_batches', 5, 'Pipeline batches read after the first epoch, before timing.')
flags.DEFINE_integer('steps', 10, 'Train steps timed on the fixed device batch.')
flags.DEFINE_integer('warmup_steps', 2, 'Untimed train steps before timing (the first compiles).')
flags.DEFINE_integer('fed_steps', 20, 'Train steps timed when fed by the pipeline (0: skip that phase).')
flags.DEFINE_string('json', None, 'Write the results to this JSON file.')


def _rate(images: int, seconds: float) -> float:
  return images / seconds if seconds > 0 else float('inf')


def _loadavg():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def apply_flags(config):
  """The config with --dataset/--path/--num_classes/--data_dir applied (they are shorthands for config fields)."""
  with config.unlocked():
    if FLAGS.dataset:
      config.dataset.name = FLAGS.dataset
    if FLAGS.path:
      config.dataset.path = FLAGS.path
    if FLAGS.num_classes is not None:
      config.dataset.num_classes = FLAGS.num_classes
    if FLAGS.data_dir:
      config.dataset.data_dir = FLAGS.data_dir
  return config


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


def measure_pipeline(it, batch_size: int, first_epoch_batches: int, warmup_batches: int, batches: int,
                     t_start: float) -> dict:
  """Times the first epoch (from `t_start`, when the dataset was built) and then steady-state batches."""
  first = None
  for i in range(first_epoch_batches):
    next(it)
    if i == 0:
      first = time.perf_counter() - t_start
  first_epoch_s = time.perf_counter() - t_start
  for _ in range(warmup_batches):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  steady_s = time.perf_counter() - t0
  return {
      'first_epoch': {'batches': first_epoch_batches, 'seconds': first_epoch_s,
                      'time_to_first_batch_s': first,
                      'images_per_s': _rate(first_epoch_batches * batch_size, first_epoch_s)},
      'steady': {'batches': batches, 'seconds': steady_s, 'images_per_s': _rate(batches * batch_size, steady_s),
                 'ms_per_batch': 1000 * steady_s / max(batches, 1)},
  }


def run_benchmark(config) -> dict:
  """Runs the three measurements for `config` and returns the report (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from jaxseg import config_utils  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top  # cpu_count (no jax at import)
  import fixed_step  # pylint: disable=g-import-not-at-top  # After the device flags are set.

  config_utils.validate(config)
  pipeline.hide_accelerators_from_tf()
  n_local = jax.local_device_count()
  config_utils.check_batch(config, jax.device_count(), jax.process_count())
  load_start = _loadavg()
  spec, builder = datasets.open_dataset(config.dataset)
  num_examples = builder.info.splits[spec.train_split].num_examples
  batch_size = config.batch_size
  first_epoch_batches = math.ceil(num_examples / batch_size)

  # ---- Pipeline alone. ----
  t_start = time.perf_counter()
  train_ds = pipeline.train_dataset(
      builder, spec, config.input, global_batch=batch_size, local_devices=n_local, seed=config.seed,
      start_step=0, process_index=0, process_count=1, cache=config.dataset.cache,
      shuffle_buffer=config.dataset.shuffle_buffer)
  it = pipeline.as_numpy(train_ds)
  pipe = measure_pipeline(it, batch_size, first_epoch_batches, FLAGS.warmup_batches, FLAGS.batches, t_start)
  print(f'pipeline: first epoch {pipe["first_epoch"]["images_per_s"]:.1f} img/s '
        f'({first_epoch_batches} batches, {pipe["first_epoch"]["seconds"]:.2f}s), '
        f'steady {pipe["steady"]["images_per_s"]:.1f} img/s', flush=True)

  # ---- Train step alone, on one device-resident batch from the pipeline. ----
  compiles = CompileEvents()
  fixed = fixed_step.FixedStep(config, spec, builder, next(it))
  compiles.take()
  warmup_s, warmup_compiles = [], []  # Each warm-up step on its own: a recompilation after the first shows.
  for _ in range(max(FLAGS.warmup_steps, 1)):
    t0 = time.perf_counter()
    fixed.step()
    fixed.wait()
    warmup_s.append(time.perf_counter() - t0)
    warmup_compiles.append(compiles.take())
  step_rate = fixed.images_per_s(FLAGS.steps)
  step_s = FLAGS.steps * batch_size / step_rate
  timed_compiles = compiles.take()
  step = {'steps': FLAGS.steps, 'warmup_steps': len(warmup_s), 'warmup_step_s': warmup_s,
          'seconds': step_s, 'images_per_s': step_rate,
          'ms_per_step': 1000 * step_s / max(FLAGS.steps, 1),
          'final_loss': float(jax.device_get(fixed.metrics['loss'][0])),
          'compile_s': warmup_compiles[0]['compile_s'],
          # XLA compilations in the calls after the first (0 unless the step recompiles, e.g. for a
          # change of the state's sharding between the first call and the next).
          'recompiles': sum(c['xla_compiles'] for c in warmup_compiles[1:]) + timed_compiles['xla_compiles']}
  print(f'train step: {step["images_per_s"]:.1f} img/s ({step["ms_per_step"]:.1f} ms/step)', flush=True)

  # ---- The train step fed by the pipeline, as train_and_evaluate runs it. ----
  fed = None
  if FLAGS.fed_steps > 0:
    feed = jax_utils.prefetch_to_device(it, config.input.prefetch_to_device)
    fixed.images_per_s(max(FLAGS.warmup_steps, 1), feed)
    fed_rate = fixed.images_per_s(FLAGS.fed_steps, feed)
    fed = {'steps': FLAGS.fed_steps, 'seconds': FLAGS.fed_steps * batch_size / fed_rate, 'images_per_s': fed_rate,
           'recompiles': compiles.take()['xla_compiles']}
    print(f'fed: {fed["images_per_s"]:.1f} img/s', flush=True)

  device = jax.devices()[0]
  return {
      'schema': SCHEMA,
      'dataset': {'name': spec.name, 'path': config.dataset.get('path'), 'num_classes': spec.num_classes,
                  'train_examples': num_examples, 'data_dir': builder.data_dir},
      'config': {'file': FLAGS['config'].config_filename, 'batch_size': batch_size,
                 'crop_size': list(config.input.crop_size), 'scale_range': list(config.input.scale_range),
                 'hflip': bool(config.input.hflip), 'photometric': bool(config.input.photometric),
                 'cache': bool(config.dataset.cache), 'prefetch_to_device': config.input.prefetch_to_device,
                 'model': config.model.to_dict(), 'half_precision': bool(config.half_precision)},
      'device': {'platform': device.platform, 'kind': device.device_kind, 'local_device_count': n_local},
      'host': {'cpu_count': bench_train.cpu_count(),
               'loadavg_start': load_start, 'loadavg_end': _loadavg(), 'machine': platform.machine(),
               'python': platform.python_version(), 'jax_version': jax.__version__},
      'pipeline': pipe,
      'train_step': step,
      'fed': fed,
      'ratio_pipeline_over_step': pipe['steady']['images_per_s'] / step['images_per_s'],
      'ratio_first_epoch_over_step': pipe['first_epoch']['images_per_s'] / step['images_per_s'],
  }


def format_report(r: dict) -> str:
  """The report as a small table."""
  p, s = r['pipeline'], r['train_step']
  rows = [('pipeline, first epoch', p['first_epoch']['images_per_s'],
           f'{p["first_epoch"]["batches"]} batches in {p["first_epoch"]["seconds"]:.2f}s '
           f'(first batch after {p["first_epoch"]["time_to_first_batch_s"]:.2f}s)'),
          ('pipeline, steady', p['steady']['images_per_s'],
           f'{p["steady"]["batches"]} batches, {p["steady"]["ms_per_batch"]:.1f} ms/batch'),
          ('train step (fixed batch)', s['images_per_s'], f'{s["steps"]} steps, {s["ms_per_step"]:.1f} ms/step')]
  if r.get('fed'):
    rows.append(('train step fed by pipeline', r['fed']['images_per_s'], f'{r["fed"]["steps"]} steps'))
  warm = ', '.join(f'{t:.2f}s' for t in s['warmup_step_s'])
  recompiles = s['recompiles'] + (r.get('fed') or {}).get('recompiles', 0)
  c = r['config']
  lines = [f'{r["dataset"]["name"]} ({r["dataset"]["train_examples"]} train examples), batch {c["batch_size"]}, '
           f'crop {tuple(c["crop_size"])}, scale {tuple(c["scale_range"])}, photometric {c["photometric"]}, '
           f'cache {c["cache"]}; {r["device"]["local_device_count"]} x {r["device"]["kind"]}, '
           f'{r["host"]["cpu_count"]} CPUs, load average {r["host"]["loadavg_start"]} -> {r["host"]["loadavg_end"]}',
           f'{"":28s} {"images/s":>10s}']
  lines += [f'{name:28s} {rate:10.1f}  {note}' for name, rate, note in rows]
  lines.append(f'ratio pipeline (steady) / train step: {r["ratio_pipeline_over_step"]:.2f}x '
               f'(first epoch: {r["ratio_first_epoch_over_step"]:.2f}x); > 1: the input keeps up')
  lines.append(f'train step warm-up: {warm} per step (compile {s["compile_s"]:.1f}s); XLA compilations after the '
               f'first call: {recompiles}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = apply_flags(FLAGS.config)
  from jaxseg import distributed  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  try:
    distributed.split_cpu_into_devices(config)  # As run.py: a CPU-only host's cores as devices.
    report = run_benchmark(config)
  except (ConfigError, DataError) as e:
    print(f'bench_input: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(format_report(report), flush=True)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {FLAGS.json}', flush=True)


if __name__ == '__main__':
  app.run(main)
