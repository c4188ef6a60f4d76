"""Train-step benchmark: jaxseg's production train step against the same network and step in PyTorch.

  python benchmarks/bench_train.py                                # configs/unet.py and configs/fcn.py as they are
  python benchmarks/bench_train.py --configs configs/unet.py --set model.base_width=64 --set model.depth=4 \\
      --set dataset.name=folder --set dataset.num_classes=2 --image-size 256 --batch-size 16 --dtypes bfloat16
  python benchmarks/bench_train.py --smoke --json /tmp/smoke.json   # tiny models, 2 steps: a harness check, no timing

One row per config file and dtype: the config's model, optimiser, moving average and global batch (--set
FIELD=VALUE changes any field, --image-size and --batch-size the crop and the batch; a crop of 'auto' is 64x64),
random weights, no dataset (its preset gives the classes: dataset.name=folder takes any dataset.num_classes): a
fixed device-resident uint8 batch, labels with ~5% ignored pixels. jaxseg runs on
every local device (a CPU-only host's cores split into devices as run.py splits them); PyTorch on one GPU with the
per-device batch, or on the CPU with the whole batch and a thread per core.

* jaxseg: `train.make_train_step` on the state `state.build(...).init_state()` lays out (`jaxseg_step`).
* PyTorch: the peer network of tests/torch_reference.py (the parameter counts must be equal) and its `Trainer`, the
  same step; eager and torch.compile'd (cold Inductor cache), channels_last, bf16 autocast for bfloat16 rows.

Per framework: images/s and ms/step (median of --repeats blocks of --steps steps synchronised only at the two ends,
after --warmup steps timed one by one), compile s (jaxseg: lower + XLA compile of the step; PyTorch: warm-up time
beyond steady steps), TFLOP/s achieved with the row's train GFLOP/image (XLA's cost analysis of the compiled step:
per device, x devices / batch; 2 per multiply-add, padding taps not counted, elementwise ops 1 per element),
memory: on CPU the process's resident set sampled with bench_memory.rss_bytes after every warm-up step and timed
block (its peak, and its growth over the RSS before the model was built), on GPU the framework's device peak.
ratio = jaxseg / PyTorch images/s per device (per host on CPU), > 1: jaxseg faster. Each framework of each row runs
in a fresh process (bench_memory's worker way), so its memory is its own and JAX's GPU preallocation cannot starve
PyTorch. benchmarks/NOTES.md has results.
"""

import argparse
import ast
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):  # configs, jaxseg and tests; bench_memory.
  if _path not in sys.path:
    sys.path.insert(0, _path)

import bench_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

SCHEMA = 'jaxseg-bench-train/2'
IGNORE_LABEL = 255
MIB = 2 ** 20
# --smoke: each model shrunk to seconds (32x32 crops, batch 2, 2 steps), with cheaper XLA:CPU code generation
# (-O1, as tests/helpers.py; -O0 miscompiles the step with jax 0.10.2).
SMOKE_FIELDS = {'unet': {'model.base_width': 4, 'model.depth': 2},
                'fcn': {'model.width_multiplier': 1 / 16, 'model.fc_width': 16, 'model.fc6_kernel': 3}}
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=1'
FRAMEWORKS = ('jaxseg', 'torch_eager', 'torch_compile')


def row_config(path: str, sets: list[str], dtype: str, image_size, batch_size, smoke: bool):
  """The config file's get_config() with the --set fields and the row's crop, batch and precision.

  Class weighting 'none' and no weights file: nothing is read from disk (neither changes the step's cost).
  """
  spec = importlib.util.spec_from_file_location('bench_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  fields = dict(SMOKE_FIELDS.get(config.model.name, {}) if smoke else {})
  for item in sets:
    key, _, text = item.partition('=')
    try:
      fields[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      fields[key] = text
  for key, value in fields.items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  crop = config.input.crop_size
  size = image_size or (32 if smoke else 64 if crop == 'auto' else None)
  if size:
    config.input.crop_size = (size, size)
  config.input.eval_size = config.input.crop_size
  config.batch_size = config.eval_batch_size = batch_size or (2 if smoke else config.batch_size)
  config.half_precision = dtype == 'bfloat16'
  config.loss.class_weighting = 'none'
  if 'encoder_weights' in config.model:
    config.model.encoder_weights = None
  return config


def make_batch(batch: int, size: tuple, num_classes: int):
  """Random uint8 images [B, H, W, 3] and labels [B, H, W], ~5% of them IGNORE_LABEL."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (batch, *size), dtype=np.uint8)
  labels[rng.random((batch, *size)) < 0.05] = IGNORE_LABEL
  return images, labels


def measure(step, sync, warmup: int, steps: int, repeats: int, batch: int) -> dict:
  """The timing loop of both frameworks: `warmup` steps timed one by one, then `repeats` blocks of `steps` steps
  synchronised only at the two ends; the RSS sampled (bench_memory.rss_bytes) after each warm-up step and block."""
  warm, blocks, rss = [], [], []
  for _ in range(warmup):
    t0 = time.perf_counter()
    step()
    sync()
    warm.append(time.perf_counter() - t0)
    rss.append(bench_memory.rss_bytes())
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    blocks.append(time.perf_counter() - t0)
    rss.append(bench_memory.rss_bytes())
  median = statistics.median(blocks)
  return {'status': 'ok', 'images_per_s': steps * batch / median, 'step_ms': 1e3 * median / steps,
          'block_s': blocks, 'warmup_step_s': warm, 'peak_rss_mib': max(rss) / MIB}


# ---------------------------------------------------------------------------
# The one function that calls jaxseg's internals (its API is being reworked: adapt it here, nowhere else).
# ---------------------------------------------------------------------------


def jaxseg_step(config):
  """(the jitted train step, the initial state, put: numpy batch -> global device batch, num_classes), built as
  train_and_evaluate builds them: the CPU cores split into devices as run.py does (before any JAX computation),
  the config checked, the state laid out on the mesh of every device, no class weights."""
  from jaxseg import distributed, sharding, train  # pylint: disable=g-import-not-at-top
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  distributed.split_cpu_into_devices(config.cpu_devices, (config.batch_size, config.eval_batch_size))
  settings = settings_lib.from_config(config)
  settings_lib.check_batch(settings, jax.device_count())
  spec = datasets.resolve_spec(settings.dataset)
  mesh = sharding.make_mesh()
  setup = state_lib.build(settings, spec.num_classes, mesh)
  step = train.make_train_step(settings, spec, setup, None)
  return step, setup.init_state(), lambda batch: sharding.global_batch(batch, mesh), spec.num_classes


def run_jaxseg(config, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxseg.train  # noqa: F401  # pylint: disable=unused-import  # The libraries, before the memory baseline.
  jax.config.update('jax_enable_compilation_cache', False)  # A cold compile, every time.
  rss_before = bench_memory.rss_bytes()
  train_step, state, put, num_classes = jaxseg_step(config)
  n_dev, device = jax.device_count(), jax.devices()[0]
  size, batch = tuple(config.input.crop_size), config.batch_size
  global_batch = jax.block_until_ready(put(dict(zip(('image', 'label'), make_batch(batch, size, num_classes)))))
  t0 = time.perf_counter()
  compiled = train_step.lower(state, global_batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list of one dict in older jax.
  # XLA's buffer assignment of the step, per device: what it needs whatever the allocator or the platform does
  # (arguments = state + batch, donated outputs aliasing them; temporaries = activations and gradients).
  mem = compiled.memory_analysis()
  xla_step_mib = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                           - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / MIB
  box = {'state': state}

  def step():
    box['state'], box['metrics'] = compiled(box['state'], global_batch)

  result = measure(step, lambda: jax.block_until_ready(box['state']), args.warmup, args.steps, args.repeats, batch)
  on_cpu = device.platform == 'cpu'
  if on_cpu:
    result['rss_growth_mib'] = result['peak_rss_mib'] - rss_before / MIB
  else:
    result['device_peak_mib'] = (device.memory_stats() or {}).get('peak_bytes_in_use', float('nan')) / MIB
  return dict(result, compile_s=compile_s, param_count=sum(x.size for x in jax.tree.leaves(box['state'].params)),
              final_loss=float(box['metrics']['loss']), devices=n_dev, platform=device.platform,
              device_kind=device.device_kind, num_classes=num_classes, image_size=list(size), batch_size=batch,
              images_per_s_per_device=result['images_per_s'] / (1 if on_cpu else n_dev),
              train_flops_per_image=float(cost['flops']) * n_dev / batch, xla_step_mib=xla_step_mib,
              xla_temp_mib=None if mem is None else mem.temp_size_in_bytes / MIB,
              model=config.model.to_dict())


def run_torch(config, args, compiled: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  if args.platform == 'gpu' and torch.cuda.is_available():
    device = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
  elif args.platform == 'cpu':
    device = torch.device('cpu')
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
  else:
    return {'status': 'n/a', 'reason': f'no PyTorch device for JAX platform {args.platform}'}
  rss_before = bench_memory.rss_bytes()
  try:
    net = torch_reference.jaxseg_peer(config.model.to_dict(), args.num_classes)
  except ValueError as e:
    return {'status': 'n/a', 'reason': str(e)}
  torch.manual_seed(0)
  trainer = torch_reference.Trainer(net, device, config.optimizer.to_dict(), bf16=config.half_precision,
                                    ema_decay=config.get('ema_decay', 0.0), compile=compiled)
  images, labels = trainer.prepare_batch(*make_batch(args.batch_size, tuple(config.input.crop_size), args.num_classes))
  box = {}

  def step():
    box['loss'] = trainer.step(images, labels)

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  try:
    result = measure(step, sync, args.warmup, args.steps, args.repeats, args.batch_size)
  except Exception as e:  # pylint: disable=broad-except  # torch.compile's failures are reported, not fatal.
    if not compiled:
      raise
    return {'status': 'n/a', 'reason': f'torch.compile failed: {type(e).__name__}: {str(e).strip()[:300]}'}
  steady = result['step_ms'] / 1e3
  if device.type == 'cpu':
    result['rss_growth_mib'] = result['peak_rss_mib'] - rss_before / MIB
  else:
    result['device_peak_mib'] = torch.cuda.max_memory_allocated() / MIB
  return dict(result, compile_s=sum(max(0.0, t - steady) for t in result['warmup_step_s']),
              param_count=sum(p.numel() for p in net.parameters()), final_loss=float(box['loss']), devices=1,
              images_per_s_per_device=result['images_per_s'], threads=torch.get_num_threads())


# ---------------------------------------------------------------------------
# The rows: each framework in a fresh process, this script again with --side.
# ---------------------------------------------------------------------------


def run_side(side: str, args, path: str, dtype: str, **fields) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--side', side, '--configs', path, '--dtypes', dtype,
         '--steps', str(args.steps), '--warmup', str(args.warmup), '--repeats', str(args.repeats),
         *[f'--set={s}' for s in args.set], *(['--smoke'] if args.smoke else [])]
  for key, value in fields.items():
    if value is not None:
      cmd += [f'--{key.replace("_", "-")}', str(value)]
  env = dict(os.environ)
  if args.smoke:
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {SMOKE_XLA_FLAGS}'.strip()
  cache = tempfile.mkdtemp(prefix='bench_inductor_') if side == 'torch_compile' else None
  if cache:
    env['TORCHINDUCTOR_CACHE_DIR'] = cache  # A cold torch.compile, as jaxseg's compile is cold.
  try:
    return bench_memory.worker_result(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True), 'ROW')
  except RuntimeError as e:
    return {'status': 'error', 'reason': str(e)[-1500:]}
  finally:
    if cache:
      shutil.rmtree(cache, ignore_errors=True)


def fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
  head = (f'{"config":<18} {"dtype":<8} {"image":>7} {"batch":>5}  {"framework":<13} {"img/s":>9} {"ms/step":>9} '
          f'{"compile s":>9} {"TFLOP/s":>8} {"peak MiB":>9} {"growth":>7} {"XLA MiB":>8} {"params":>11}  '
          f'{"jaxseg/this":>11}')
  lines = [head, '-' * len(head)]
  for row in rows:
    lead = f'{os.path.basename(row["config"]):<18} {row["dtype"]:<8} {"x".join(map(str, row["image_size"] or ["?"])):>7} ' \
           f'{fmt(row["batch_size"], "d"):>5}'
    for name in FRAMEWORKS:
      entry = row.get(name)
      if entry is None:
        continue
      if entry['status'] != 'ok':
        said = entry.get('reason', '').strip().splitlines() or ['']
        reason = next((l for l in reversed(said) if 'Error' in l), said[-1])  # The exception's line.
        lines.append(f'{lead}  {name:<13} {entry["status"]}: {reason}'[:300])
      else:
        ratio = row.get(f'ratio_jaxseg_over_{name}')
        tflops = row['train_gflops_per_image'] * entry['images_per_s'] / 1e3 if row['train_gflops_per_image'] else None
        peak = entry.get('peak_rss_mib', entry.get('device_peak_mib'))
        lines.append(f'{lead}  {name:<13} {entry["images_per_s"]:9.2f} {entry["step_ms"]:9.1f} '
                     f'{entry["compile_s"]:9.1f} {fmt(tflops, "8.3f"):>8} {fmt(peak, "9.0f"):>9} '
                     f'{fmt(entry.get("rss_growth_mib"), "7.0f"):>7} {fmt(entry.get("xla_step_mib"), "8.0f"):>8} '
                     f'{entry["param_count"]:11,d}  '
                     f'{fmt(ratio, "10.2f") + ("x" if ratio else ""):>11}')
      lead = ' ' * len(lead)
  return '\n'.join(lines)


def make_row(args, path: str, dtype: str, use_torch: bool, use_compile: bool) -> dict:
  jax_entry = run_side('jaxseg', args, path, dtype, image_size=args.image_size, batch_size=args.batch_size)
  row = {'config': path, 'dtype': dtype, 'param_count': jax_entry.get('param_count')}
  for key in ('model', 'num_classes', 'image_size', 'batch_size', 'devices', 'platform', 'device_kind'):
    row[key] = jax_entry.pop(key, None)
  flops = jax_entry.pop('train_flops_per_image', None)
  row['train_gflops_per_image'] = flops / 1e9 if flops else None
  row['jaxseg'] = jax_entry
  if not use_torch or jax_entry['status'] != 'ok':
    return row
  cpu = row['platform'] == 'cpu'
  for name in ('torch_eager', 'torch_compile') if use_compile else ('torch_eager',):
    entry = row[name] = run_side(name, args, path, dtype, image_size=row['image_size'][0],
                                 batch_size=row['batch_size'] // (1 if cpu else row['devices']),
                                 num_classes=row['num_classes'], platform=row['platform'])
    if entry['status'] == 'ok':
      if entry['param_count'] != row['param_count']:
        raise AssertionError(f'{path}: jaxseg has {row["param_count"]:,} parameters, its PyTorch peer '
                             f'{entry["param_count"]:,}: not the same network')
      row[f'ratio_jaxseg_over_{name}'] = jax_entry['images_per_s_per_device'] / entry['images_per_s_per_device']
  return row


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument('--configs', default='configs/unet.py,configs/fcn.py', help='comma list of config files')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='a config field for every row, e.g. model.depth=4 (repeatable)')
  p.add_argument('--dtypes', default='float32,bfloat16', help='comma list of float32, bfloat16')
  p.add_argument('--image-size', type=int, help="square crop (default: the config's; 64 for 'auto'; 32 --smoke)")
  p.add_argument('--batch-size', type=int, help="global batch (default: the config's; 2 --smoke)")
  p.add_argument('--steps', type=int, help='timed steps per block (default 10; 2 --smoke)')
  p.add_argument('--warmup', type=int, help='untimed steps first, each timed alone (default 2; 1 --smoke)')
  p.add_argument('--repeats', type=int, default=1, help='timed blocks; the median is reported')
  p.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True, help='PyTorch rows (if installed)')
  p.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, help='also torch.compile (default: '
                 'yes; no --smoke)')
  p.add_argument('--json', help='write the report here')
  p.add_argument('--smoke', action='store_true', help='tiny models, 2 steps: checks the harness; not a timing')
  p.add_argument('--side', choices=FRAMEWORKS, help=argparse.SUPPRESS)  # One framework of one row (a worker).
  p.add_argument('--num-classes', type=int, help=argparse.SUPPRESS)
  p.add_argument('--platform', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps = args.steps or (2 if args.smoke else 10)
  args.warmup = args.warmup or (1 if args.smoke else 2)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.side:
    config = row_config(args.configs, args.set, args.dtypes, args.image_size, args.batch_size, args.smoke)
    result = run_jaxseg(config, args) if args.side == 'jaxseg' else run_torch(config, args, args.side == 'torch_compile')
    print('ROW ' + json.dumps(result), flush=True)
    return
  version = lambda name: importlib.metadata.version(name) if importlib.util.find_spec(name) else None
  torch_version = version('torch')
  use_torch = args.torch and torch_version is not None
  use_compile = use_torch and (not args.smoke if args.torch_compile is None else args.torch_compile)
  report = {'schema': SCHEMA, 'command': ' '.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'host': {'hostname': platform.node(), 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
                     'python': platform.python_version()},
            'versions': {name: version(name) for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch')},
            'torch_skipped': None if use_torch else ('--no-torch' if not args.torch else 'torch is not installed'),
            'settings': {'steps': args.steps, 'warmup': args.warmup, 'repeats': args.repeats, 'smoke': args.smoke,
                         'set': args.set, 'torch_compile': use_compile},
            'rows': []}
  print(f'jaxseg train-step benchmark: steps {args.steps}, warm-up {args.warmup}, repeats {args.repeats}'
        f'{", SMOKE (not a timing)" if args.smoke else ""}; PyTorch {torch_version if use_torch else "skipped"}',
        flush=True)
  for path in args.configs.split(','):
    for dtype in args.dtypes.split(','):
      print(f'  {path} {dtype} ...', flush=True)
      report['rows'].append(make_row(args, path, dtype, use_torch, use_compile))
  rows = report['rows']
  print(f'\n{rows[0]["devices"]} x {rows[0]["device_kind"]} ({rows[0]["platform"]}) for jaxseg\n' if rows[0].get('devices')
        else '')
  print(format_table(rows))
  print('\nGFLOP/image: XLA\'s cost analysis of the compiled train step; peak MiB: resident set (CPU) or device '
        'peak (GPU); growth: RSS over the RSS before the model was built.')
  if not use_torch:
    print(f'PyTorch skipped: {report["torch_skipped"]}.')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    print(f'Wrote {args.json}')
  if any(row.get(name, {}).get('status') == 'error' for row in rows for name in FRAMEWORKS):
    sys.exit(1)


if __name__ == '__main__':
  main()
