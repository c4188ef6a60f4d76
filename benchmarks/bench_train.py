"""Train-step benchmark: jaxseg's production train step against the same networks in PyTorch.

  python benchmarks/bench_train.py                       # defaults for the device found
  python benchmarks/bench_train.py --models unet64 --dtypes bfloat16 --image-size 256 --batch-size 16
  python benchmarks/bench_train.py --smoke --json /tmp/smoke.json   # tiny, seconds, for CI (not a timing)

For every row (model x dtype) it measures, on whatever JAX devices are present:

* jaxseg: the real train step (`train.make_train_step`: jit over the mesh of
  every device) on the state `state.build` lays out as training does
  (`--sharding replicated` or `fsdp`), built from configs/default.py with the
  row's model, crop and batch (a stub DatasetSpec, so no dataset is opened).
  A fixed device-resident uint8 global batch is fed, so
  input loading is excluded. `--warmup` untimed steps (the first compiles),
  then `--steps` steps timed with `block_until_ready` only at the two ends;
  `--repeats` such blocks, the median reported.
* PyTorch (optional: skipped with a note when torch is not installed): the
  same network (benchmarks/torch_models.py; parameter counts asserted equal
  before anything is timed) and step (uint8 -> normalise on device, float32
  cross-entropy with ignore_index=255, SGD momentum 0.9, weight decay 1e-4
  on kernels), eager and `torch.compile`d, in its fast standard settings:
  channels_last, torch.set_num_threads(cores) on CPU; cudnn.benchmark and
  bf16 autocast (bfloat16 rows) on GPU, autocast to bf16 on CPU too.

Reported per framework: images/s, ms/step, compile time (jaxseg: from
jax.monitoring compile events; PyTorch: warm-up time beyond steady steps,
torch.compile with a cold Inductor cache), peak memory, FLOPs and MFU where
the device's peak is known;
per row the jaxseg/PyTorch throughput ratio (> 1: jaxseg faster). See
benchmarks/NOTES.md for the conventions and results.

Each (row, framework) runs in a fresh subprocess by default (`--isolate`):
a clean peak-memory reading, and JAX's GPU memory preallocation cannot starve
PyTorch. `--smoke` runs in-process.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform as platform_lib
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

SCHEMA = 'jaxseg-bench-train/1'
IGNORE_LABEL = 255

# Benchmarked networks. kind 'unet': jaxseg UNet(norm='batch', upsample='transpose');
# kind 'fcn': jaxseg FCN. The *-tiny ones are for --smoke only.
MODELS: dict[str, dict[str, Any]] = {
    # configs/unet.py's network (the default UNet, jaxseg_shapes' 4 classes).
    'unet-default': dict(kind='unet', num_classes=4, base_width=16, depth=3),
    'unet32': dict(kind='unet', num_classes=2, base_width=32, depth=4),
    'unet64': dict(kind='unet', num_classes=2, base_width=64, depth=4),
    'fcn8s': dict(kind='fcn', num_classes=21, variant='fcn8s', width_multiplier=1.0, fc_width=4096,
                  fc6_kernel=7, dropout_rate=0.5),
    # Pretrained-encoder models (jaxseg only: no PyTorch peer in torch_models.py; run with --no-torch).
    'unet-resnet34': dict(kind='unet_encoder', num_classes=21, encoder='resnet34'),
    'deeplabv3plus-r50': dict(kind='deeplabv3plus', num_classes=21, encoder='resnet50', output_stride=16),
    'unet-tiny': dict(kind='unet', num_classes=3, base_width=4, depth=2),
    'fcn8s-tiny': dict(kind='fcn', num_classes=3, variant='fcn8s', width_multiplier=1 / 16, fc_width=16,
                       fc6_kernel=3, dropout_rate=0.5),
}
DEFAULT_MODELS = ('unet-default', 'unet32', 'unet64', 'fcn8s')
SMOKE_MODELS = ('unet-tiny', 'fcn8s-tiny')
# (image size, global batch) per model: small on CPU, realistic on accelerators.
CPU_SHAPES = {'unet-default': (64, 16), 'unet32': (128, 4), 'unet64': (128, 4), 'fcn8s': (128, 2),
              'unet-resnet34': (256, 2), 'deeplabv3plus-r50': (256, 2)}
ACCEL_SHAPES = {'unet-default': (64, 256), 'unet32': (256, 32), 'unet64': (256, 16), 'fcn8s': (256, 16),
                'unet-resnet34': (256, 16), 'deeplabv3plus-r50': (256, 16)}
TORCH_KINDS = ('unet', 'fcn')  # Model kinds with a PyTorch peer (benchmarks/torch_models.py).
SMOKE_SHAPE = (32, 2)
# LLVM at -O1 (tests/helpers.TEST_XLA_FLAGS): -O0 miscompiles jaxseg's train step with jax 0.10.2 (a NaN loss).
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=1'

# Dense peak FLOP/s per device, matched by substring of jax's device_kind (lower-case), first match wins.
# float32 rows use the TF32 tensor-core peak on Ampere and later (XLA's default precision and cuDNN's
# default convolutions both use TF32 there), and the bf16 peak on TPUs (float32 matmuls run as bf16
# passes at default precision). V100 has no bf16 units: no MFU for its bfloat16 rows.
PEAK_FLOPS = (
    ('h200', {'bfloat16': 989.4e12, 'float32': 494.7e12, 'name': 'H200 (SXM)'}),
    ('h100 pcie', {'bfloat16': 756.0e12, 'float32': 378.0e12, 'name': 'H100 PCIe'}),
    ('h100 nvl', {'bfloat16': 835.0e12, 'float32': 417.5e12, 'name': 'H100 NVL'}),
    ('h100', {'bfloat16': 989.4e12, 'float32': 494.7e12, 'name': 'H100 SXM'}),
    ('a100', {'bfloat16': 312.0e12, 'float32': 156.0e12, 'name': 'A100'}),
    ('v100', {'bfloat16': None, 'float32': 15.7e12, 'name': 'V100 SXM2 (fp32, no tensor cores)'}),
    ('v5 lite', {'bfloat16': 197.0e12, 'float32': 197.0e12, 'name': 'TPU v5e'}),
    ('v5e', {'bfloat16': 197.0e12, 'float32': 197.0e12, 'name': 'TPU v5e'}),
    ('v5p', {'bfloat16': 459.0e12, 'float32': 459.0e12, 'name': 'TPU v5p'}),
    ('tpu v5', {'bfloat16': 459.0e12, 'float32': 459.0e12, 'name': 'TPU v5p'}),
    ('tpu v4', {'bfloat16': 275.0e12, 'float32': 275.0e12, 'name': 'TPU v4'}),
)

CONVENTIONS = {
    'throughput': ('images/s = steps x global batch / wall time of `steps` consecutive steps after the warm-up, '
                   'synchronised (block_until_ready / cuda.synchronize) only at the two ends, on a fixed '
                   'device-resident uint8 batch; median over `repeats` such blocks'),
    'compile': ('jaxseg: trace + lower + XLA compile seconds of the train step over the warm-up calls, from '
                'jax.monitoring events (train_step_xla_compiles counts the compilations: more than 1 means the step '
                'recompiled after its first call); PyTorch: warm-up time beyond steady-state steps (eager: '
                'allocator and kernel warm-up; torch.compile: graph capture and code generation). jaxseg\'s '
                'warm-up excess is recorded too (warmup_excess_s), measured the PyTorch way'),
    'flops': ('model FLOPs per image: 2 x multiply-adds of the convolutions and matrix products in the forward '
              "pass at the row's image size, counted on jaxseg's jaxpr (transposed convolutions counted "
              'without the zeros of the dilated input); train FLOPs = 3 x forward. XLA\'s own cost analysis of '
              "the forward and PyTorch's FlopCounterMode are recorded as cross-checks."),
    'mfu': ('train FLOPs per image x images/s / (dense peak FLOP/s per device x devices used); float32 rows '
            'against the TF32 peak on A100/H100/H200, the bf16 peak on TPUs; none on CPU'),
    'memory': ('GPU/TPU: jax memory_stats()["peak_bytes_in_use"] of device 0 over the whole row process '
               '(state, activations, autotuning scratch), torch.cuda.max_memory_allocated() over the row; '
               'CPU (method cpu_state_plus_rss_growth): bytes of the persistent train state per device '
               '(parameters, momentum, BatchNorm statistics) + the input batch + the growth of the process peak '
               'RSS over the RSS just before the timed steps (peak reset through /proc/self/clear_refs, so '
               'compiler and warm-up memory are excluded): what the steps allocate on top of the state'),
    'ratio': ('jaxseg images/s divided by the PyTorch variant\'s images/s (> 1: jaxseg faster); per device on '
              'GPU/TPU (PyTorch runs one device with the per-device batch), per host on CPU, where jaxseg\'s '
              'devices are the host\'s cores split as run.py splits them and PyTorch runs the whole batch with '
              'one thread per core'),
}


# ---------------------------------------------------------------------------
# Small helpers (no jax/torch imports).
# ---------------------------------------------------------------------------


def cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _status_kb(field: str) -> Optional[int]:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int:
  kb = _status_kb('VmRSS')
  if kb is not None:
    return kb * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_memory() -> None:
  gc.collect()
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return _status_kb('VmHWM') is not None
  except OSError:
    return False


def peak_rss_bytes(hwm_reset: bool) -> int:
  kb = _status_kb('VmHWM') if hwm_reset else None
  if kb is not None:
    return kb * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def version_of(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def torch_available() -> bool:
  return importlib.util.find_spec('torch') is not None


def peak_flops(device_kind: str, dtype: str) -> tuple[Optional[float], Optional[str]]:
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return peaks.get(dtype), peaks['name']
  return None, None


def make_batch(batch: int, size: int, num_classes: int, seed: int = 0):
  """Random uint8 images [B, S, S, 3] and uint8 labels [B, S, S] with ~5% ignore_label pixels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (batch, size, size), dtype=np.uint8)
  labels[rng.random((batch, size, size)) < 0.05] = IGNORE_LABEL
  return images, labels


def model_kwargs(model: str) -> tuple[str, int, dict]:
  m = dict(MODELS[model])
  return m.pop('kind'), m.pop('num_classes'), m


def steady_block_stats(block_seconds: list[float], steps: int, batch: int) -> dict:
  median = statistics.median(block_seconds)
  return {'images_per_s': steps * batch / median, 'step_ms': 1e3 * median / steps,
          'block_seconds': [round(s, 4) for s in block_seconds]}


# ---------------------------------------------------------------------------
# jaxseg side.
# ---------------------------------------------------------------------------


def jaxseg_config(model: str, dtype: str, image_size: int, batch: int):
  """configs/default.py with this row's model, crop, batch and precision."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxseg import config_utils  # pylint: disable=g-import-not-at-top
  kind, num_classes, kw = model_kwargs(model)
  config = default.get_config()
  if kind == 'unet':
    config.model.name = 'unet'
    config.model.base_width = kw['base_width']
    config.model.depth = kw['depth']
    config.model.norm = 'batch'
    config.model.upsample = 'transpose'
  elif kind == 'unet_encoder':
    config.model.name = 'unet'
    config.model.encoder = kw['encoder']  # Random weights: a weights file changes values, not the speed.
  elif kind == 'deeplabv3plus':
    config.model = ml_collections.ConfigDict(dict(name='deeplabv3plus', **kw))
  else:
    config.model = ml_collections.ConfigDict(dict(name='fcn', **kw))
  config.dataset.num_classes = num_classes
  config.dataset.ignore_label = IGNORE_LABEL
  config.input.crop_size = (image_size, image_size)
  config.batch_size = batch
  config.eval_batch_size = batch
  config.half_precision = dtype == 'bfloat16'
  config_utils.validate(config)
  return config


def stub_spec(num_classes: int):
  """A DatasetSpec that the step builder reads (num_classes, ignore_label); nothing opens a dataset."""
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.DatasetSpec(
      name='bench', num_classes=num_classes, class_names=tuple(f'class_{i}' for i in range(num_classes)),
      ignore_label=IGNORE_LABEL, image_key='image', label_key='label', label_offset=0, ignore_values=(),
      train_split='train', eval_split='validation')


def count_matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of conv_general_dilated and dot_general in a jaxpr (recursing into sub-jaxprs)."""
  import jax.extend.core as jex  # pylint: disable=g-import-not-at-top
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval
      out = eqn.outvars[0].aval
      dn = eqn.params['dimension_numbers']
      rhs_spec = dn.rhs_spec  # (out features, in features, spatial...)
      window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
      in_per_group = rhs.shape[rhs_spec[1]]
      dilation = math.prod(eqn.params.get('lhs_dilation') or (1,))
      total += 2.0 * math.prod(out.shape) * window * in_per_group / dilation
    elif name == 'dot_general':
      lhs = eqn.invars[0].aval
      out = eqn.outvars[0].aval
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    for sub in jex.jaxprs_in_params(eqn.params):
      total += count_matmul_flops(sub)
  return total


def jaxseg_param_count(model: str) -> int:
  """Parameters of the jaxseg model (abstract init: nothing is computed or compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  _, num_classes, _ = model_kwargs(model)
  net = state_lib.build_model(jaxseg_config(model, 'float32', 64, 1), num_classes)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))


def jaxseg_flops(model: str, image_size: int) -> dict:
  """Forward FLOPs per image (jaxpr count and XLA's cost analysis) and the counted forward+backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import losses  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  config = jaxseg_config(model, 'float32', image_size, 1)
  _, num_classes, _ = model_kwargs(model)
  net = state_lib.build_model(config, num_classes)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False))
  forward = lambda v, img: net.apply(v, img, train=False)
  fwd = count_matmul_flops(jax.make_jaxpr(forward)(variables, x).jaxpr)
  result = {'forward_flops_per_image': fwd, 'train_flops_per_image': 3.0 * fwd,
            'param_count_jaxseg': sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))}
  try:
    cost = jax.jit(forward).lower(variables, x).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result['xla_forward_flops_per_image'] = float(cost['flops']) if cost and 'flops' in cost else None
  except Exception as e:  # pylint: disable=broad-except
    result['xla_forward_flops_per_image'] = None
    result['xla_cost_analysis_error'] = f'{type(e).__name__}: {e}'[:300]

  def loss(params, stats, img, labels):
    v = {'params': params, **({'batch_stats': stats} if stats else {})}
    logits, _ = net.apply(v, img, train=True, mutable=['batch_stats'] if stats else [],
                          rngs={'dropout': jax.random.key(0)})
    return losses.cross_entropy_sums(logits, labels, ignore_label=IGNORE_LABEL)[0]

  labels = jax.ShapeDtypeStruct((1, image_size, image_size), jnp.int32)
  grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(variables['params'], variables.get('batch_stats', {}), x, labels)
  result['counted_train_flops_per_image'] = count_matmul_flops(grad_jaxpr.jaxpr)
  return result


class CompileEvents:
  """Collects JAX's trace / lower / XLA-compile durations (jax.monitoring) between `take()` calls."""

  EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
            '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
            '/jax/core/compile/backend_compile_duration': 'compile'}

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.events = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event in self.EVENTS:
      self.events.append((self.EVENTS[event], str(kwargs.get('fun_name', '?')), float(duration)))

  def take(self) -> dict:
    events, self.events = self.events, []
    big = [e for e in events if e[0] == 'compile' and e[2] > 0.05]  # Not the tiny helper jits.
    return {'seconds': sum(e[2] for e in events),
            'xla_compiles': len([e for e in events if e[0] == 'compile']),
            'slow_xla_compiles': [{'fun': f, 'seconds': round(d, 3)} for _, f, d in big]}


def tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype')))


def run_jaxseg_row(row: dict) -> dict:
  """Times jaxseg's production train step for one row."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg import sharding  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import train  # pylint: disable=g-import-not-at-top

  model, dtype, size, batch = row['model'], row['dtype'], row['image_size'], row['batch_size']
  n_dev = jax.device_count()
  if batch % n_dev:
    raise ValueError(f'--batch-size {batch} is not divisible by the {n_dev} devices')
  _, num_classes, _ = model_kwargs(model)
  config = jaxseg_config(model, dtype, size, batch)
  config.sharding = row.get('sharding', 'replicated')
  spec = stub_spec(num_classes)
  platform = jax.devices()[0].platform
  compiles = CompileEvents()

  t0 = time.perf_counter()
  setup = state_lib.build(config, num_classes, sharding.make_mesh())
  state = jax.block_until_ready(setup.init_state())
  init_s = time.perf_counter() - t0
  init_compiles = compiles.take()
  param_count = sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
  # Per device: its shards of params, momentum, BatchNorm statistics, counters (all of them when replicated).
  state_bytes = sharding.tree_bytes_per_device(state)
  train_step = train.make_train_step(config, spec, setup, None)
  images, labels = make_batch(batch, size, num_classes)
  device_batch = jax.block_until_ready(sharding.global_batch({'image': images, 'label': labels}, setup.mesh))
  batch_bytes = (images.nbytes + labels.nbytes) // n_dev
  compiles.take()

  # Warm-up: each step timed on its own, so a recompilation after the first step shows.
  warmup_s = []
  for _ in range(max(1, row['warmup'])):
    t0 = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    jax.block_until_ready((state, metrics))
    warmup_s.append(time.perf_counter() - t0)
  step_compiles = compiles.take()

  trim_memory()
  rss_before = rss_bytes()
  hwm_reset = platform == 'cpu' and reset_peak_rss()
  blocks = []
  for _ in range(row['repeats']):
    t0 = time.perf_counter()
    for _ in range(row['steps']):
      state, metrics = train_step(state, device_batch)
    jax.block_until_ready((state, metrics))
    blocks.append(time.perf_counter() - t0)
  timed_compiles = compiles.take()

  result = steady_block_stats(blocks, row['steps'], batch)
  # CPU devices are slices of one host's cores (run.py splits the cores into devices): the host is the unit.
  on_cpu = jax.devices()[0].platform == 'cpu'
  result['images_per_s_per_device'] = result['images_per_s'] / (1 if on_cpu else n_dev)
  result['compile_s'] = step_compiles['seconds']  # Trace + lower + XLA compile of the step, all warm-up calls.
  result['train_step_xla_compiles'] = step_compiles['xla_compiles']
  result['train_step_compile_detail'] = step_compiles['slow_xla_compiles']
  result['warmup_step_s'] = [round(t, 4) for t in warmup_s]
  result['warmup_excess_s'] = sum(max(0.0, t - result['step_ms'] / 1e3) for t in warmup_s)
  result['first_step_s'] = warmup_s[0]
  result['init_s'] = init_s
  result['init_compile_s'] = init_compiles['seconds']
  result['xla_compiles_in_timed_steps'] = timed_compiles['xla_compiles']
  result['devices_used'] = n_dev
  result['param_count'] = param_count
  result['state_bytes_per_device'] = state_bytes
  if platform == 'cpu':
    transient = peak_rss_bytes(hwm_reset) - rss_before
    result['transient_peak_bytes'] = transient
    result['peak_memory_bytes'] = state_bytes + batch_bytes + transient
    result['memory_method'] = 'cpu_state_plus_rss_growth' if hwm_reset else 'cpu_state_plus_ru_maxrss_growth'
  else:
    stats = jax.local_devices()[0].memory_stats() or {}
    result['peak_memory_bytes'] = stats.get('peak_bytes_in_use')
    result['memory_method'] = 'jax_peak_bytes_in_use' if stats else 'unavailable'
  result['sharding'] = config.sharding
  result['final_loss'] = float(metrics['loss'])
  result['skipped_updates'] = int(state.skipped_updates)
  del state, metrics, device_batch
  trim_memory()
  return result


# ---------------------------------------------------------------------------
# PyTorch side.
# ---------------------------------------------------------------------------


def run_torch_row(row: dict) -> dict:
  """Times the PyTorch peer's train step for one row; row['variant'] is 'eager' or 'compile'."""
  if model_kwargs(row['model'])[0] not in TORCH_KINDS:
    return {'status': 'n/a', 'reason': f'no PyTorch peer for {row["model"]} in torch_models.py'}
  cache_dir = None
  if row['variant'] == 'compile' and 'torch' not in sys.modules:
    # A cold compile, as jaxseg's (no persistent compilation cache): Inductor would otherwise reuse the
    # kernels an earlier run left in its on-disk cache.
    cache_dir = tempfile.mkdtemp(prefix='bench_inductor_')
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache_dir
  try:
    return _run_torch_row(row, cold_cache=cache_dir is not None)
  finally:
    if cache_dir:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(cache_dir, ignore_errors=True)


def _run_torch_row(row: dict, cold_cache: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top

  model, dtype, size = row['model'], row['dtype'], row['image_size']
  batch = row['torch_batch_size']
  kind, num_classes, kw = model_kwargs(model)
  if row['jax_platform'] == 'gpu':
    if not torch.cuda.is_available():
      return {'status': 'n/a', 'reason': 'JAX runs on GPU but this torch build has no CUDA'}
    device = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
  elif row['jax_platform'] == 'cpu':
    device = torch.device('cpu')
    torch.set_num_threads(cpu_count())
  else:
    return {'status': 'n/a', 'reason': f'no PyTorch peer on {row["jax_platform"]}'}

  torch.manual_seed(0)
  trim_memory()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  net = torch_models.build_model(kind, num_classes, **kw)
  param_count = torch_models.param_count(net)
  trainer = torch_models.Trainer(net, device, bf16=dtype == 'bfloat16', channels_last=row['channels_last'],
                                 compile=row['variant'] == 'compile')
  images, labels = trainer.prepare_batch(*make_batch(batch, size, num_classes))

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  sync()
  warmup_s = []
  for i in range(max(1, row['warmup'])):
    t0 = time.perf_counter()
    try:
      loss = trainer.step(images, labels)
      sync()
    except Exception as e:  # pylint: disable=broad-except  # torch.compile failures: report, do not stop.
      if row['variant'] != 'compile' or i:
        raise
      first_line = (str(e).strip().splitlines() or [''])[0]
      return {'status': 'n/a', 'reason': f'torch.compile failed: {type(e).__name__}: {first_line}'[:400]}
    warmup_s.append(time.perf_counter() - t0)
  state_bytes = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
  state_bytes += sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values() for v in st.values()
                     if torch.is_tensor(v))
  batch_bytes = images.numel() * images.element_size() + labels.numel() * labels.element_size()

  trim_memory()
  rss_before = rss_bytes()
  hwm_reset = device.type == 'cpu' and reset_peak_rss()
  blocks = []
  for _ in range(row['repeats']):
    t0 = time.perf_counter()
    for _ in range(row['steps']):
      loss = trainer.step(images, labels)
    sync()
    blocks.append(time.perf_counter() - t0)

  result = {'status': 'ok'}
  result.update(steady_block_stats(blocks, row['steps'], batch))
  steady = result['step_ms'] / 1e3
  result['images_per_s_per_device'] = result['images_per_s']
  result['compile_s'] = sum(max(0.0, t - steady) for t in warmup_s)  # Warm-up time beyond steady steps.
  result['warmup_step_s'] = [round(t, 4) for t in warmup_s]
  result['first_step_s'] = warmup_s[0]
  result['devices_used'] = 1
  result['param_count'] = param_count
  result['state_bytes_per_device'] = state_bytes
  if device.type == 'cpu':
    transient = peak_rss_bytes(hwm_reset) - rss_before
    result['transient_peak_bytes'] = transient
    result['peak_memory_bytes'] = state_bytes + batch_bytes + transient
    result['memory_method'] = 'cpu_state_plus_rss_growth' if hwm_reset else 'cpu_state_plus_ru_maxrss_growth'
    result['threads'] = torch.get_num_threads()
  else:
    result['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated())
    result['memory_method'] = 'torch_max_memory_allocated'
  result['final_loss'] = float(loss)
  result['settings'] = {'channels_last': row['channels_last'], 'bf16_autocast': dtype == 'bfloat16',
                        'cudnn_benchmark': device.type == 'cuda', 'compile': row['variant'] == 'compile',
                        'compile_cache': ('cold (fresh TORCHINDUCTOR_CACHE_DIR)' if cold_cache else
                                          'process default') if row['variant'] == 'compile' else None}
  del trainer, net, images, labels
  trim_memory()
  return result


def torch_probe(models: list[str], image_sizes: dict[str, int]) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  out = {'torch_version': torch.__version__, 'cuda_available': torch.cuda.is_available(), 'models': {}}
  for model in models:
    kind, num_classes, kw = model_kwargs(model)
    if kind not in TORCH_KINDS:
      out['models'][model] = {'param_count_torch': None, 'torch_forward_flops_per_image': None}
      continue
    entry = {'param_count_torch': torch_models.meta_param_count(kind, num_classes, **kw)}
    try:
      entry['torch_forward_flops_per_image'] = torch_models.forward_flops_per_image(
          torch_models.build_model(kind, num_classes, **kw), (image_sizes[model],) * 2)
    except Exception as e:  # pylint: disable=broad-except
      entry['torch_forward_flops_per_image'] = None
      entry['torch_flop_counter_error'] = f'{type(e).__name__}: {e}'[:300]
    out['models'][model] = entry
  return out


# ---------------------------------------------------------------------------
# Probe: devices, versions, parameter counts, FLOPs.
# ---------------------------------------------------------------------------


def probe(payload: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  out = {
      'jax_version': jax.__version__, 'jaxlib_version': version_of('jaxlib'), 'flax_version': version_of('flax'),
      'optax_version': version_of('optax'),
      'device': {'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
                 'local_device_count': len(devices), 'device_count': jax.device_count()},
      'models': {},
  }
  sizes = payload['image_sizes']
  for model in payload['models']:
    out['models'][model] = jaxseg_flops(model, sizes[model])
  if payload['torch']:
    tp = torch_probe(payload['models'], sizes)
    out['torch_version'] = tp['torch_version']
    out['torch_cuda_available'] = tp['cuda_available']
    for model, entry in tp['models'].items():
      out['models'][model].update(entry)
  return out


WORKERS = {'probe': probe, 'jaxseg': run_jaxseg_row, 'torch': run_torch_row}


def call_worker(kind: str, payload: dict, isolate: bool, timeout: Optional[float]) -> dict:
  """Runs WORKERS[kind](payload) in this process, or in a fresh subprocess when isolating."""
  if not isolate:
    try:
      return WORKERS[kind](payload)
    except Exception as e:  # pylint: disable=broad-except
      if kind == 'probe':
        raise
      return {'status': 'error', 'reason': f'{type(e).__name__}: {e}'[:600], 'traceback': traceback.format_exc()}
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, os.path.abspath(__file__), '--_worker', kind, '--_payload', json.dumps(payload),
           '--_out', out_path]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
      return {'status': 'error', 'reason': f'timed out after {timeout} s'}
    if proc.returncode != 0 or not os.path.exists(out_path):
      tail = (proc.stderr or proc.stdout or '').strip().splitlines()[-15:]
      if kind == 'probe':
        raise RuntimeError(f'probe failed ({proc.returncode}):\n' + '\n'.join(tail))
      return {'status': 'error', 'reason': f'worker exited {proc.returncode}: ' + (tail[-1] if tail else ''),
              'stderr_tail': '\n'.join(tail)}
    with open(out_path) as f:
      return json.load(f)


def worker_main(kind: str, payload: str, out_path: str) -> None:
  result = WORKERS[kind](json.loads(payload))
  with open(out_path, 'w') as f:
    json.dump(result, f)


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = '-') -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return missing
  return format(value, spec)


def add_derived(entry: dict, train_flops: Optional[float], peak: Optional[float]) -> None:
  if entry.get('images_per_s') is None:
    return
  if train_flops:
    entry['achieved_tflops'] = train_flops * entry['images_per_s'] / 1e12
    if peak:
      entry['mfu'] = train_flops * entry['images_per_s'] / (peak * entry['devices_used'])
      entry['peak_flops_per_device'] = peak


def format_table(report: dict) -> str:
  header = (f'{"model":<11} {"dtype":<8} {"img":>4} {"batch":>5}  {"framework":<14} {"img/s":>8} {"ms/step":>9} '
            f'{"compile s":>9} {"peak MiB":>9} {"TFLOP/s":>8} {"MFU":>6}  {"jaxseg/this":>11}')
  lines = [header, '-' * len(header)]
  for row in report['rows']:
    first = True
    for key, label in (('jaxseg', 'jaxseg'), ('torch_eager', 'torch eager'), ('torch_compile', 'torch compile')):
      entry = row.get(key)
      if entry is None:
        continue
      lead = (f'{row["model"]:<11} {row["dtype"]:<8} {row["image_size"]:>4} {row["batch_size"]:>5}' if first
              else ' ' * 31)
      first = False
      if entry.get('status') in ('n/a', 'error'):
        lines.append(f'{lead}  {label:<14} {entry["status"]}: {entry.get("reason", "")}'[:200])
        continue
      mem = entry.get('peak_memory_bytes')
      ratio = row.get(f'ratio_jaxseg_over_{key}')
      mfu = entry.get('mfu')
      lines.append(
          f'{lead}  {label:<14} {_fmt(entry.get("images_per_s"), "8.2f"):>8} {_fmt(entry.get("step_ms"), "9.1f"):>9} '
          f'{_fmt(entry.get("compile_s"), "9.1f"):>9} {_fmt(mem / 2**20 if mem is not None else None, "9.0f"):>9} '
          f'{_fmt(entry.get("achieved_tflops"), "8.3f"):>8} {_fmt(100 * mfu if mfu is not None else None, "5.1f") + ("%" if mfu is not None else ""):>6}'
          f'  {_fmt(ratio, "10.2f") + ("x" if ratio is not None else ""):>11}')
  return '\n'.join(lines)


def describe_flops(report: dict) -> str:
  lines = ['Forward GFLOP/image (jaxpr count | XLA cost analysis | torch FlopCounter); train = 3 x forward; params:']
  for model, info in report['models'].items():
    g = lambda v: _fmt(v / 1e9 if v is not None else None, '.3f')
    lines.append(f'  {model:<11} @{info["image_size"]}: {g(info.get("forward_flops_per_image"))} | '
                 f'{g(info.get("xla_forward_flops_per_image"))} | {g(info.get("torch_forward_flops_per_image"))}'
                 f'   (counted fwd+bwd {g(info.get("counted_train_flops_per_image"))});  params jaxseg '
                 f'{info.get("param_count_jaxseg"):,} torch {_fmt(info.get("param_count_torch"), ",")}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default=None, help=f'comma list of {sorted(MODELS)} (default: {",".join(DEFAULT_MODELS)})')
  p.add_argument('--dtypes', default='float32,bfloat16', help='comma list of float32, bfloat16')
  p.add_argument('--image-size', type=int, default=None, help='square image side for every row (default: per model '
                 f'and device: CPU {CPU_SHAPES}, accelerators {ACCEL_SHAPES})')
  p.add_argument('--batch-size', type=int, default=None, help='global batch for every row (jaxseg splits it over '
                 'the local devices; PyTorch runs one device with batch / devices)')
  p.add_argument('--steps', type=int, default=None, help='timed steps per block (default: 20; 10 on CPU; 2 --smoke)')
  p.add_argument('--warmup', type=int, default=None, help='untimed steps first, the compiling one included '
                 '(default: 3; 2 on CPU; 1 --smoke)')
  p.add_argument('--repeats', type=int, default=1, help='timed blocks; the median is reported')
  p.add_argument('--sharding', choices=('replicated', 'fsdp'), default='replicated',
                 help="jaxseg's train state layout (config.sharding)")
  p.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True, help='PyTorch rows (if installed)')
  p.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=None,
                 help='also a torch.compile variant (default: yes; no with --smoke)')
  p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                 help='PyTorch channels_last memory format')
  p.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=None,
                 help='one fresh subprocess per (row, framework) (default: yes; no with --smoke)')
  p.add_argument('--row-timeout', type=float, default=1800.0, help='seconds per isolated row before giving up')
  p.add_argument('--json', default=None, help='write the report here')
  p.add_argument('--smoke', action='store_true', help=f'tiny models ({", ".join(SMOKE_MODELS)}) at 32x32, 2 steps: '
                 'checks the harness runs; not a timing')
  p.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
  p.add_argument('--_payload', default=None, help=argparse.SUPPRESS)
  p.add_argument('--_out', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    worker_main(args._worker, args._payload, args._out)  # pylint: disable=protected-access
    return {}

  models = [m.strip() for m in (args.models or ','.join(SMOKE_MODELS if args.smoke else DEFAULT_MODELS)).split(',')
            if m.strip()]
  for m in models:
    if m not in MODELS:
      raise SystemExit(f'unknown model {m!r}; choose from {sorted(MODELS)}')
  dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  for d in dtypes:
    if d not in ('float32', 'bfloat16'):
      raise SystemExit(f'unknown dtype {d!r}; choose float32 or bfloat16')
  isolate = (not args.smoke) if args.isolate is None else args.isolate
  use_compile = (not args.smoke) if args.torch_compile is None else args.torch_compile
  have_torch = torch_available()
  run_torch = args.torch and have_torch
  if run_torch and not isolate:
    # In one process JAX's default GPU preallocation (75%) would starve PyTorch.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.smoke and 'jax' not in sys.modules:
    # Not a timing: cheaper XLA:CPU code generation keeps CI fast (compiling dominates a smoke run).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + SMOKE_XLA_FLAGS).strip()

  if not args.smoke and 'jax' not in sys.modules:
    # jaxseg as run.py runs it: on a CPU-only host the cores form that many JAX devices (one thread each).
    from jaxseg import distributed  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    batches = [args.batch_size or CPU_SHAPES.get(m, SMOKE_SHAPE)[1] for m in models]
    gcd = math.gcd(*batches)
    distributed.split_cpu_into_devices(ml_collections.ConfigDict({'batch_size': gcd, 'eval_batch_size': gcd}))

  # Probe first (devices decide the default shapes): a throwaway probe with sizes placeholder when isolating
  # would cost a second process start, so the probe gets every candidate size up front.
  def shapes_for(platform: str, n_dev: int) -> dict[str, tuple[int, int]]:
    out = {}
    for m in models:
      if args.smoke or m not in CPU_SHAPES:
        size, batch = SMOKE_SHAPE[0], max(SMOKE_SHAPE[1], n_dev)
      elif platform == 'cpu':
        size, batch = CPU_SHAPES[m]
      else:
        size, batch = ACCEL_SHAPES[m]
        batch *= n_dev  # The accelerator defaults are per device.
      out[m] = (args.image_size or size, args.batch_size or batch)
    return out

  started = time.time()
  device_info = call_worker('probe', {'models': [], 'image_sizes': {}, 'torch': False}, isolate, args.row_timeout)
  platform = device_info['device']['platform']
  n_dev = device_info['device']['local_device_count']
  shapes = shapes_for(platform, n_dev)
  info = call_worker('probe', {'models': models, 'image_sizes': {m: s for m, (s, _) in shapes.items()},
                               'torch': run_torch}, isolate, args.row_timeout)
  on_cpu = platform == 'cpu'
  steps = args.steps or (2 if args.smoke else 10 if on_cpu else 20)
  warmup = args.warmup or (1 if args.smoke else 2 if on_cpu else 3)
  for m in models:
    if shapes[m][1] % n_dev:
      raise SystemExit(f'{m}: batch {shapes[m][1]} is not divisible by the {n_dev} local devices')

  # Parameter counts must agree before anything is timed.
  if run_torch:
    for m in models:
      pj, pt = info['models'][m]['param_count_jaxseg'], info['models'][m]['param_count_torch']
      if pj != pt:
        raise AssertionError(f'{m}: jaxseg has {pj:,} parameters, the PyTorch peer {pt:,}: not the same network')

  device_kind = info['device']['device_kind']
  report = {
      'schema': SCHEMA,
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(__file__), ROOT)] + list(argv if argv is not None
                                                                                             else sys.argv[1:])),
      'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': {'hostname': socket.gethostname(), 'cpu_count': cpu_count(), 'python': platform_lib.python_version(),
               'machine': platform_lib.machine(), 'processor': _cpu_model()},
      'jax_version': info['jax_version'], 'jaxlib_version': info['jaxlib_version'],
      'flax_version': info['flax_version'], 'optax_version': info['optax_version'],
      'torch_version': info.get('torch_version'),
      'torch_skipped': None if run_torch else ('--no-torch' if not args.torch else 'torch is not installed'),
      'device': dict(info['device'], peak_flops={d: peak_flops(device_kind, d)[0] for d in ('float32', 'bfloat16')},
                     peak_flops_source=peak_flops(device_kind, 'float32')[1]),
      'settings': {'steps': steps, 'warmup': warmup, 'repeats': args.repeats, 'smoke': args.smoke,
                   'sharding': args.sharding,
                   'isolate': isolate, 'torch_compile': run_torch and use_compile,
                   'torch_channels_last': args.channels_last},
      'conventions': CONVENTIONS,
      'models': {m: dict(info['models'][m], image_size=shapes[m][0]) for m in models},
      'rows': [],
  }
  print(f'jaxseg train-step benchmark on {n_dev} x {device_kind} ({platform}); jax {info["jax_version"]}, '
        f'torch {info.get("torch_version") or "-"}; steps {steps}, warm-up {warmup}, repeats {args.repeats}'
        f'{", SMOKE (not a timing)" if args.smoke else ""}', flush=True)
  if not run_torch:
    print(f'PyTorch skipped: {report["torch_skipped"]}.', flush=True)

  notes = []
  for m in models:
    size, batch = shapes[m]
    minfo = info['models'][m]
    for dtype in dtypes:
      base = {'model': m, 'dtype': dtype, 'image_size': size, 'batch_size': batch, 'steps': steps, 'warmup': warmup,
              'repeats': args.repeats, 'sharding': args.sharding}
      row = dict(base, num_classes=MODELS[m]['num_classes'], forward_gflops_per_image=minfo['forward_flops_per_image'] / 1e9,
                 train_gflops_per_image=minfo['train_flops_per_image'] / 1e9,
                 param_count={'jaxseg': minfo['param_count_jaxseg'], 'torch': minfo.get('param_count_torch'),
                              'equal': (minfo['param_count_jaxseg'] == minfo.get('param_count_torch')
                                        if run_torch else None)})
      peak = peak_flops(device_kind, dtype)[0]
      print(f'  {m} {dtype} {size}x{size} batch {batch}: jaxseg ...', end='', flush=True)
      row['jaxseg'] = call_worker('jaxseg', base, isolate, args.row_timeout)
      row['jaxseg'].setdefault('status', 'ok')
      add_derived(row['jaxseg'], minfo['train_flops_per_image'], peak)
      print(f' {_fmt(row["jaxseg"].get("images_per_s"), ".2f", row["jaxseg"]["status"])} img/s', end='', flush=True)
      jr = row['jaxseg']
      if jr.get('train_step_xla_compiles', 1) > 1:
        notes.append(f'{m} {dtype}: jaxseg\'s train step was compiled {jr["train_step_xla_compiles"]} times in '
                     f'the warm-up (it recompiles after its first call: warm-up step seconds {jr["warmup_step_s"]})')
      if jr.get('xla_compiles_in_timed_steps'):
        notes.append(f'{m} {dtype}: {jr["xla_compiles_in_timed_steps"]} XLA compilation(s) inside the timed jaxseg '
                     f'steps: raise --warmup; this row\'s throughput is too low')
      if run_torch:
        for variant in ('eager', 'compile') if use_compile else ('eager',):
          payload = dict(base, variant=variant, jax_platform=platform, channels_last=args.channels_last,
                         torch_batch_size=batch if on_cpu else batch // n_dev)
          print(f'; torch {variant} ...', end='', flush=True)
          entry = call_worker('torch', payload, isolate, args.row_timeout)
          entry.setdefault('status', 'ok')
          add_derived(entry, minfo['train_flops_per_image'], peak)
          row[f'torch_{variant}'] = entry
          print(f' {_fmt(entry.get("images_per_s"), ".2f", entry["status"])}', end='', flush=True)
          jx, tx = row['jaxseg'].get('images_per_s_per_device'), entry.get('images_per_s_per_device')
          if entry['status'] == 'ok' and tx and row['jaxseg']['status'] == 'ok':
            if entry['param_count'] != row['jaxseg']['param_count']:
              raise AssertionError(f'{m}: parameter counts differ in the timed runs: jaxseg '
                                   f'{row["jaxseg"]["param_count"]:,}, torch {entry["param_count"]:,}')
            row[f'ratio_jaxseg_over_torch_{variant}'] = jx / tx
        ok = [row[k]['images_per_s_per_device'] for k in ('torch_eager', 'torch_compile')
              if k in row and row[k].get('status') == 'ok']
        if ok and row['jaxseg']['status'] == 'ok':
          row['ratio_jaxseg_over_torch_best'] = row['jaxseg']['images_per_s_per_device'] / max(ok)
      print(flush=True)
      report['rows'].append(row)

  report['wall_s'] = time.time() - started
  report['notes'] = notes
  print()
  print(format_table(report))
  print()
  print(describe_flops(report))
  for note in notes:
    print(f'Note: {note}')
  print(f'\nMemory: {CONVENTIONS["memory"]}.')
  if not run_torch:
    print(f'PyTorch skipped: {report["torch_skipped"]}.')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'Wrote {args.json}')
  return report


def _cpu_model() -> Optional[str]:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform_lib.processor() or None


if __name__ == '__main__':
  main()
