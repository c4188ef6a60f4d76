"""Training-loop overhead: the production loop's images/s against its compiled train step alone.

  python benchmarks/bench_loop.py                          # configs/unet.py on jaxseg_shapes, 3 rounds
  python benchmarks/bench_loop.py --rounds=5 --loop_steps=700 --json=/tmp/loop.json
  python benchmarks/bench_loop.py --config=configs/fcn.py --config.batch_size=32

Any field of the training config can be overridden with --config.FIELD=VALUE, as with run.py. In one process,
on the devices run.py would use (a CPU-only host's cores split into devices the same way), each round measures:

* step before: jaxseg's pmapped train step for the config on one fixed device-resident batch, `--fixed_steps`
  steps synchronised only at the two ends (compiled once, before the first round);
* loop: `python run.py` with the same --config arguments, in its own process and a fresh temporary workdir, for
  `--loop_steps` steps with everything production does on the way (tf.data pipeline and prefetch to device, metrics fetched every
  log_every_steps, progress line, TensorBoard and metrics.jsonl, asynchronous checkpoints every
  checkpoint_every_steps), evaluation only after the last step. Its images/s is the logged `images_per_sec`
  of every log interval but the first (which holds start-up and compilation), combined as total images over
  total time; the loop leaves the synchronous part of each checkpoint save out, as its log lines do;
* step after: the fixed-batch step again.

overhead = 1 - loop / mean(step before, step after): the share of the step's time the loop adds. Measuring the
step on both sides of each loop cancels slow drifts of the machine's speed (a shared VM's speed moves by 5-10%
over minutes); the median over the rounds is the figure reported.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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

SCHEMA = 'jaxseg-bench-loop/1'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'unet.py'),
                                'Training config (a get_config() file); default configs/unet.py.')
flags.DEFINE_integer('rounds', 3, 'Rounds of (step, loop, step).')
flags.DEFINE_integer('loop_steps', 400, 'Training steps of the production loop per round.')
flags.DEFINE_integer('fixed_steps', 60, 'Fixed-batch train steps timed before and after each loop.')
flags.DEFINE_integer('warmup_steps', 2, 'Untimed fixed-batch steps before the first round (the first compiles).')
flags.DEFINE_string('json', None, 'Write the results to this JSON file.')


def config_args(argv: list[str]) -> list[str]:
  """The --config / --config.FIELD arguments this benchmark was given, to hand on to run.py unchanged."""
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
    out.insert(0, f'--config={FLAGS["config"].config_filename}')
  return out


def loop_rate(config, steps: int, argv: list[str]) -> dict:
  """`python run.py` (the production command) for `steps` steps in a temporary workdir, in its own process.

  Its own process, as in production: no other program shares its devices. images/s after its first log
  interval, from its metrics.jsonl.
  """
  if steps < 2 * config.log_every_steps:
    raise ValueError(f'--loop_steps={steps} must cover at least two log intervals of '
                     f'config.log_every_steps={config.log_every_steps}')
  workdir = tempfile.mkdtemp(prefix='jaxseg_bench_loop_')
  try:
    # Evaluation once, after the last step (left out of images/s anyway).
    cmd = [sys.executable, os.path.join(ROOT, 'run.py'), *config_args(argv), f'--workdir={workdir}',
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
  train_points = [r for r in records if r['split'] == 'train']
  intervals = []  # (steps, seconds) of each log interval after the first.
  for prev, cur in zip(train_points, train_points[1:]):
    n = cur['step'] - prev['step']
    intervals.append((n, n * config.batch_size / cur['images_per_sec']))
  images = sum(n for n, _ in intervals) * config.batch_size
  seconds = sum(s for _, s in intervals)
  return {'steps': steps, 'timed_steps': sum(n for n, _ in intervals), 'timed_seconds': seconds,
          'images_per_s': images / seconds, 'interval_images_per_s': [r['images_per_sec'] for r in train_points[1:]],
          'wall_s': wall, 'checkpoints_kept': checkpoints}


def run_benchmark(config, argv: list[str]) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg import compilation_cache, config_utils  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top  # cpu_count (no jax at import)
  import fixed_step  # pylint: disable=g-import-not-at-top  # After the device flags are set.

  config_utils.validate(config)
  config_utils.check_batch(config, jax.device_count(), jax.process_count())
  compilation_cache.enable(config)
  pipeline.hide_accelerators_from_tf()
  spec, builder = datasets.open_dataset(config.dataset)
  ds = pipeline.train_dataset(builder, spec, config.input, global_batch=config.batch_size,
                              local_devices=jax.local_device_count(), seed=config.seed, start_step=0,
                              process_index=0, process_count=1, cache=False, shuffle_buffer=16)
  fixed = fixed_step.FixedStep(config, spec, builder, next(pipeline.as_numpy(ds)))
  fixed.images_per_s(max(FLAGS.warmup_steps, 1))
  rounds = []
  for i in range(FLAGS.rounds):
    before = fixed.images_per_s(FLAGS.fixed_steps)
    loop = loop_rate(config, FLAGS.loop_steps, argv)
    after = fixed.images_per_s(FLAGS.fixed_steps)
    step_rate = (before + after) / 2
    rounds.append({'step_before_images_per_s': before, 'loop': loop, 'step_after_images_per_s': after,
                   'overhead': 1 - loop['images_per_s'] / step_rate})
    print(f'round {i + 1}/{FLAGS.rounds}: step {before:.1f} | loop {loop["images_per_s"]:.1f} | step {after:.1f} '
          f'img/s -> overhead {100 * rounds[-1]["overhead"]:.1f}%', flush=True)
  device = jax.devices()[0]
  return {
      'schema': SCHEMA,
      'dataset': {'name': spec.name, 'num_classes': spec.num_classes,
                  'train_examples': builder.info.splits[spec.train_split].num_examples},
      'config': {'file': FLAGS['config'].config_filename, 'batch_size': config.batch_size,
                 'crop_size': list(config.input.crop_size), 'model': config.model.to_dict(),
                 'log_every_steps': config.log_every_steps,
                 'checkpoint_every_steps': config.checkpoint_every_steps,
                 'prefetch_to_device': config.input.prefetch_to_device},
      'device': {'platform': device.platform, 'kind': device.device_kind,
                 'local_device_count': jax.local_device_count()},
      'host': {'cpu_count': bench_train.cpu_count(),
               'machine': platform.machine(), 'python': platform.python_version(), 'jax_version': jax.__version__},
      'settings': {'rounds': FLAGS.rounds, 'loop_steps': FLAGS.loop_steps, 'fixed_steps': FLAGS.fixed_steps},
      'rounds': rounds,
      'overhead_median': statistics.median(r['overhead'] for r in rounds),
  }


def format_report(r: dict) -> str:
  c = r['config']
  lines = [f'{r["dataset"]["name"]}, batch {c["batch_size"]}, crop {tuple(c["crop_size"])}, log every '
           f'{c["log_every_steps"]} / checkpoint every {c["checkpoint_every_steps"]} steps; '
           f'{r["device"]["local_device_count"]} x {r["device"]["kind"]}, {r["host"]["cpu_count"]} CPUs',
           f'{"round":>5s} {"step img/s":>11s} {"loop img/s":>11s} {"step img/s":>11s} {"overhead":>9s}']
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
  if FLAGS.rounds < 1 or FLAGS.fixed_steps < 1:
    raise app.UsageError('--rounds and --fixed_steps must be at least 1')
  config = FLAGS.config
  from jaxseg import distributed  # pylint: disable=g-import-not-at-top
  from jaxseg.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  try:
    distributed.split_cpu_into_devices(config)  # As run.py: a CPU-only host's cores as devices.
    report = run_benchmark(config, sys.argv[1:])
  except (ConfigError, DataError, ValueError, RuntimeError) as e:
    print(f'bench_loop: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(format_report(report), flush=True)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    print(f'Wrote {FLAGS.json}', flush=True)


if __name__ == '__main__':
  app.run(main)
