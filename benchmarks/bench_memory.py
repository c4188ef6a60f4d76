"""Memory of training: over a long run (--mode=train), or of the input pipeline alone per process (--mode=input).

  python benchmarks/bench_memory.py [--steps=3000] [--sample_every=50] [--warmup=1000]
                                    [--data_dir=DIR] [--workdir=DIR]
  python benchmarks/bench_memory.py --mode=input [--images=400] [--image_size=512] [--input_steps=60]
                                    [--global_batch=32] [--workdir=DIR] [--json=FILE]

--mode=train (the default; about 3 minutes on a busy 2-core CPU):

Trains a tiny UNet on jaxseg_shapes through the real loop (train_and_evaluate,
with its logging, evaluations and checkpoints), reads the process's resident
set size (RSS) at every log step, and reports RSS at the start and the end
and the least-squares slope in MiB per 1000 steps over the samples after
warm-up, and over the second half of those alone: growth that goes on into
the second half is a leak, growth that stops was warm-up.

Warm-up is what grows legitimately and then stops: compiled programs, the
evaluation split's cache (filled by the first evaluation), allocator pools. An evaluation allocates tens of MiB in a burst and the
allocator keeps some, so the first few evaluations show as steps in the
curve (over 1000 steps they can look like 20 MiB per 1000 steps; over 3000
the second half is flat); a leak of a few KiB per step shows as a steady
slope of several MiB per 1000 steps that the second half keeps.

The last line printed is `MEMORY {json}` with every figure and the samples.

--mode=input: what one host's training input pipeline reads and holds, for 1
process and for 2. It writes a folder dataset of `--images` noisy
`--image_size`^2 RGB PNGs (incompressible, ~0.75 MiB each at 512: a few
hundred MB in all) and its masks into the workdir (reused when there), prepares
it, then runs `pipeline.train_dataset` for `--input_steps` steps of
`--global_batch`, first as process 0 of 1, then as processes 0 and 1 of 2 (two
subprocesses at once, like two hosts). Nothing else runs in those processes
(no model, no JAX computation). Each reports its resident set size (RSS) after
setting up the pipeline, its largest sampled RSS while iterating, and the
records and bytes it read from the data source (counted at the source; they
include the few batches read ahead). A table is printed, and the JSON written
to --json (default WORKDIR/input_memory.json).
"""

import argparse
import json
import os
import resource
import subprocess
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


def worker_result(proc: subprocess.Popen, tag: str) -> dict:
  """What a worker process (this script or bench_train.py run again in a mode of its own) measured: it is waited
  for, and its last stdout line `TAG {json}` read; RuntimeError with its output's end if it failed."""
  out, _ = proc.communicate()
  lines = [l for l in out.splitlines() if l.startswith(tag + ' ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{tag} worker failed (exit {proc.returncode}):\n{out[-2000:]}')
  return json.loads(lines[-1].split(' ', 1)[1])


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
  parser.add_argument('--mode', choices=('train', 'input', 'input_worker'), default='train',
                      help="'input_worker' is one process of --mode=input (started by it).")
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--sample_every', type=int, default=50, help='RSS sample (and log step) every N steps.')
  parser.add_argument('--warmup', type=int, default=1000, help='Steps left out of the slope.')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--eval_every', type=int, default=250)
  parser.add_argument('--checkpoint_every', type=int, default=100)
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR'),
                      help='tfds data dir (prepared there when missing); default ~/tensorflow_datasets.')
  parser.add_argument('--workdir', default=None, help='Default: a fresh temporary directory.')
  # --mode=input (and its workers).
  parser.add_argument('--images', type=int, default=400, help='Training images of the generated folder dataset.')
  parser.add_argument('--image_size', type=int, default=512, help='Their height and width.')
  parser.add_argument('--input_steps', type=int, default=60, help='Steps each process iterates.')
  parser.add_argument('--global_batch', type=int, default=32)
  parser.add_argument('--crop', type=int, default=256, help='Training crop (square).')
  parser.add_argument('--json', default=None, help='Default: WORKDIR/input_memory.json.')
  parser.add_argument('--folder', help=argparse.SUPPRESS)  # Worker: the prepared folder dataset.
  parser.add_argument('--process_index', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--process_count', type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.mode == 'input':
    return input_memory(args)
  if args.mode == 'input_worker':
    return input_worker(args)
  return train_memory(args)


def train_memory(args) -> dict:
  """--mode=train: RSS over a long run of the real training loop."""
  start_rss = rss_bytes()
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxseg import reporting, train  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  reporting.setup_console_logging()
  data_dir = args.data_dir or os.path.expanduser('~/tensorflow_datasets')
  datasets.open_dataset(ml_collections.ConfigDict({'name': 'jaxseg_shapes', 'data_dir': data_dir}))  # Prepared once.
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


# ---- --mode=input ----

INPUT_CLASSES = 4


def write_noisy_folder(root: str, images: int, size: int) -> None:
  """A folder dataset of noisy RGB PNGs (uniform noise: PNG cannot compress it) and blocky masks, once per root."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(root, 'done')
  if os.path.exists(done):
    return
  cells = np.arange(size) * 8 // size  # An 8x8 grid of class blocks.
  for split, count in (('train', images), ('val', max(2, images // 50))):
    for sub in ('images', 'masks'):
      os.makedirs(os.path.join(root, split, sub), exist_ok=True)
    for i in range(count):
      rng = np.random.default_rng([len(split), i])
      Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(
          os.path.join(root, split, 'images', f'{i:05d}.png'))
      classes = rng.integers(0, INPUT_CLASSES, size=(8, 8), dtype=np.uint8)
      Image.fromarray(classes[cells][:, cells]).save(os.path.join(root, split, 'masks', f'{i:05d}.png'))
  open(done, 'w', encoding='ascii').close()


def input_worker(args) -> dict:
  """One process of --mode=input: iterates this process's training batches, prints `INPUT_WORKER {json}`."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets, folder, pipeline  # pylint: disable=g-import-not-at-top
  pipeline.hide_accelerators_from_tf()
  config = default.get_config()
  config.dataset.name = 'folder'
  config.dataset.num_classes = INPUT_CLASSES
  config.input.crop_size = (args.crop, args.crop)
  spec = datasets.resolve_spec(config.dataset)
  builder = folder.prepare_folder_dataset(args.folder, num_classes=INPUT_CLASSES, data_dir=args.data_dir)

  read = {'records': 0, 'bytes': 0}
  as_data_source = builder.as_data_source

  class CountingSource:
    """The data source, counting what is read from it."""

    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      record = self.source[index]
      read['records'] += 1
      read['bytes'] += len(record)
      return record

  builder.as_data_source = lambda *a, **kw: CountingSource(as_data_source(*a, **kw))
  ds = pipeline.train_dataset(builder, spec, config.input, global_batch=args.global_batch, seed=0, start_step=0,
                              process_index=args.process_index, process_count=args.process_count)
  batches = pipeline.as_numpy(ds)
  setup_rss = rss_bytes()
  max_rss = setup_rss
  t0 = time.perf_counter()
  for _ in range(args.input_steps):
    next(batches)
    max_rss = max(max_rss, rss_bytes())
  result = {
      'process_index': args.process_index, 'process_count': args.process_count, 'steps': args.input_steps,
      'examples_taken': args.input_steps * args.global_batch // args.process_count,
      'records_read': read['records'], 'mib_read': round(read['bytes'] / MIB, 1),
      'rss_setup_mib': round(setup_rss / MIB, 1), 'rss_max_mib': round(max_rss / MIB, 1),
      'rss_growth_mib': round((max_rss - setup_rss) / MIB, 1),
      'ru_maxrss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB, 1),
      'seconds': round(time.perf_counter() - t0, 1),
  }
  print('INPUT_WORKER ' + json.dumps(result), flush=True)
  return result


def input_memory(args) -> dict:
  """--mode=input: the input pipeline's reads and RSS per process, 1 process against 2."""
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_memory_input_')
  path = os.path.join(workdir, f'noisy_{args.images}x{args.image_size}')
  data_dir = os.path.join(workdir, 'tfds')
  t0 = time.perf_counter()
  write_noisy_folder(path, args.images, args.image_size)
  from jaxseg.data import folder  # pylint: disable=g-import-not-at-top
  builder = folder.prepare_folder_dataset(path, num_classes=INPUT_CLASSES, data_dir=data_dir)
  split_mib = sum(os.path.getsize(f) for f in builder.info.splits['train'].filepaths) / MIB
  print(f'Dataset: {args.images} train images of {args.image_size}x{args.image_size} ({split_mib:.0f} MiB of '
        f'records), ready in {time.perf_counter() - t0:.0f} s', flush=True)

  workers = []
  for process_count in (1, 2):
    command = [sys.executable, os.path.abspath(__file__), '--mode=input_worker', f'--folder={path}',
               f'--data_dir={data_dir}', f'--input_steps={args.input_steps}', f'--global_batch={args.global_batch}',
               f'--crop={args.crop}', f'--process_count={process_count}']
    procs = [subprocess.Popen(command + [f'--process_index={p}'], stdout=subprocess.PIPE, text=True)
             for p in range(process_count)]
    workers += [worker_result(proc, 'INPUT_WORKER') for proc in procs]

  columns = ('process_count', 'process_index', 'examples_taken', 'records_read', 'mib_read', 'rss_setup_mib',
             'rss_max_mib', 'rss_growth_mib', 'ru_maxrss_mib', 'seconds')
  print(' '.join(f'{c:>14}' for c in columns))
  for w in workers:
    print(' '.join(f'{w[c]:>14}' for c in columns))
  result = {'images': args.images, 'image_size': args.image_size, 'train_split_mib': round(split_mib, 1),
            'steps': args.input_steps, 'global_batch': args.global_batch, 'crop': args.crop, 'workers': workers}
  out_path = args.json or os.path.join(workdir, 'input_memory.json')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  print(f'Wrote {out_path}', flush=True)
  return result


if __name__ == '__main__':
  main()
