"""Memory over a long training run: resident memory every k steps and its growth after warm-up.

  python benchmarks/bench_memory.py [--steps=3000] [--sample_every=50] [--warmup=1000]
                                    [--data_dir=DIR] [--workdir=DIR]

(About 3 minutes on a busy 2-core CPU.)

Trains a tiny UNet on jaxseg_shapes through the real loop (train_and_evaluate,
with its logging, evaluations and checkpoints), reads the process's resident
set size (RSS) at every log step, and reports RSS at the start and the end
and the least-squares slope in MiB per 1000 steps over the samples after
warm-up, and over the second half of those alone: growth that goes on into
the second half is a leak, growth that stops was warm-up.

Warm-up is what grows legitimately and then stops: compiled programs, the
first epoch filling tf.data's cache (2000 examples / batch 8 = 250 steps),
allocator pools. An evaluation allocates tens of MiB in a burst and the
allocator keeps some, so the first few evaluations show as steps in the
curve (over 1000 steps they can look like 20 MiB per 1000 steps; over 3000
the second half is flat); a leak of a few KiB per step shows as a steady
slope of several MiB per 1000 steps that the second half keeps.

The last line printed is `MEMORY {json}` with every figure and the samples.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

MIB = 1024 * 1024


def rss_bytes() -> int:
  """This process's resident set size."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss
  except ImportError:
    with open('/proc/self/statm', encoding='ascii') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def slope_per_1000_steps(samples: list[tuple[int, float]]) -> float:
  """Least-squares slope of (step, MiB) samples, in MiB per 1000 steps."""
  n = len(samples)
  if n < 2:
    return float('nan')
  mean_s = sum(s for s, _ in samples) / n
  mean_m = sum(m for _, m in samples) / n
  var = sum((s - mean_s) ** 2 for s, _ in samples)
  cov = sum((s - mean_s) * (m - mean_m) for s, m in samples)
  return 1000.0 * cov / var if var else float('nan')


def tiny_config(data_dir: str, args):
  """configs/unet.py shrunk to a model that runs hundreds of steps a minute on a CPU."""
  from configs import unet  # pylint: disable=g-import-not-at-top
  config = unet.get_config()
  config.dataset.data_dir = data_dir
  config.model.base_width = 4
  config.model.depth = 2
  config.input.crop_size = (32, 32)
  config.batch_size = args.batch_size
  config.eval_batch_size = 40
  config.num_train_steps = args.steps
  config.log_every_steps = args.sample_every
  config.eval_every_steps = args.eval_every
  config.checkpoint_every_steps = args.checkpoint_every
  config.optimizer.warmup_steps = 10
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--sample_every', type=int, default=50, help='RSS sample (and log step) every N steps.')
  parser.add_argument('--warmup', type=int, default=1000, help='Steps left out of the slope.')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--eval_every', type=int, default=250)
  parser.add_argument('--checkpoint_every', type=int, default=100)
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR'),
                      help='tfds data dir (prepared there when missing); default ~/tensorflow_datasets.')
  parser.add_argument('--workdir', default=None, help='Default: a fresh temporary directory.')
  args = parser.parse_args(argv)

  start_rss = rss_bytes()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxseg import reporting, train  # pylint: disable=g-import-not-at-top
  from jaxseg.data import shapes  # pylint: disable=g-import-not-at-top,unused-import
  reporting.setup_console_logging()
  data_dir = args.data_dir or os.path.expanduser('~/tensorflow_datasets')
  tfds.builder('jaxseg_shapes', data_dir=data_dir).download_and_prepare()
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_memory_')
  after_imports_rss = rss_bytes()

  # Sample at every log step, from inside the real loop (Progress.update runs there).
  samples = []
  update = reporting.Progress.update

  def sampling_update(self, step, loss, learning_rate):
    samples.append((int(step), rss_bytes() / MIB))
    return update(self, step, loss, learning_rate)

  reporting.Progress.update = sampling_update
  t0 = time.perf_counter()
  try:
    train.train_and_evaluate(tiny_config(data_dir, args), workdir)
  finally:
    reporting.Progress.update = update
  seconds = time.perf_counter() - t0

  steady = [(s, m) for s, m in samples if s > args.warmup]
  result = {
      'steps': args.steps, 'sample_every': args.sample_every, 'warmup': args.warmup, 'seconds': round(seconds, 1),
      'rss_start_mib': round(start_rss / MIB, 1), 'rss_after_imports_mib': round(after_imports_rss / MIB, 1),
      'rss_first_sample_mib': round(samples[0][1], 1) if samples else None,
      'rss_after_warmup_mib': round(steady[0][1], 1) if steady else None,
      'rss_end_mib': round(samples[-1][1], 1) if samples else None,
      'rss_max_mib': round(max(m for _, m in samples), 1) if samples else None,
      'slope_mib_per_1000_steps': round(slope_per_1000_steps(steady), 2),
      'slope_second_half_mib_per_1000_steps': round(slope_per_1000_steps(steady[len(steady) // 2:]), 2),
      'steady_samples': len(steady), 'workdir': workdir,
      'samples': [(s, round(m, 1)) for s, m in samples],
  }
  print(f'RSS: {result["rss_start_mib"]} MiB at start, {result["rss_after_warmup_mib"]} MiB after warm-up '
        f'(step {steady[0][0] if steady else "-"}), {result["rss_end_mib"]} MiB at step {args.steps}; growth after '
        f'warm-up {result["slope_mib_per_1000_steps"]} MiB per 1000 steps ({len(steady)} samples; second half '
        f'{result["slope_second_half_mib_per_1000_steps"]}), {seconds:.0f} s')
  print('MEMORY ' + json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  main()
