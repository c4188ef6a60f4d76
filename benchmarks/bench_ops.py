"""A/B micro-benchmark: the formulations jaxseg chose for speed against the plain Flax ones.

  python benchmarks/bench_ops.py                                  # defaults: default UNet and UNet-32 shapes
  python benchmarks/bench_ops.py --upconv-shapes 4x16x16x256:128 --pool-shapes 4x128x128x32 \\
      --model unet32 --image-size 128 --batch-size 4 --dtype bfloat16
  python benchmarks/bench_ops.py --smoke --json /tmp/ops.json     # tiny, for CI (not a timing)

Four comparisons, on the JAX default device (the train step: on all local devices, as training runs):

1. upconv: `nn.ConvTranspose(F, (2, 2), strides=(2, 2))` against `layers.UpConv2x2(F)` (a 1x1 matrix
   product to 4F channels + depth-to-space) on decoder-level activations (`--upconv-shapes`, NxHxWxC:F).
   Both get the same parameters (UpConv2x2 has ConvTranspose's layout, flip included) and must agree:
   the max abs output difference and the max relative gradient difference are reported, computed at
   'highest' matmul precision so that TF32 on GPUs does not blur a real mismatch.
2. maxpool: `nn.max_pool(x, (2, 2), strides=(2, 2))` against `layers.max_pool_2x2` (reshape + max, whose
   gradient is an elementwise select instead of XLA's select-and-scatter) at encoder shapes
   (`--pool-shapes`, NxHxWxC), with the same equivalence check.
3. conv3x3: the 3x3 'SAME' convolution as shipped (flax's nn.Conv) against rewrites of it that were tried and
   not adopted (benchmarks/NOTES.md): output channels zero-padded to 17 and sliced back (XLA:CPU hands a
   convolution to YNNPACK only when it has more than 16 input or output channels), the three horizontal
   taps moved into channels (3C channels, a 3x1 convolution), a 3x1 convolution to 3F channels followed by
   a shifted sum, and im2col (9C-channel patches times the [9C, F] kernel). `--conv-shapes`, NxHxWxC:F; at
   the default UNet's per-device shapes (8 images).
4. step: the real pmapped train step (`train.make_train_step`, replicated state, stub dataset spec, as
   benchmarks/bench_train.py builds it) of a UNet (`--model`): (a) as shipped; (b) with the UNet's
   UpConv2x2 and max_pool_2x2 swapped for nn.ConvTranspose and nn.max_pool (same parameter tree, same
   initial state); (c) the shipped step without buffer donation of the state. images/s and the ratio to (a).

Each op is timed as jitted forward + backward: value_and_grad of sum(output ** 2) with respect to the
input (and the parameters, for up-sampling). After `--warmup` untimed calls (the first compiles), a
timed block is `--iters` consecutive calls (train step: `--steps`) with block_until_ready at the end;
`--repeats` blocks, the variants' blocks interleaved (A B A B ...) so that a change in machine load
hits both alike; the median block is reported, per call. Speed-up = the alternative's time / jaxseg's
time (> 1: jaxseg's choice is faster). See benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import bench_train as bt  # pylint: disable=g-import-not-at-top,wrong-import-position  (no jax at import)

SCHEMA = 'jaxseg-bench-ops/1'

# Decoder levels (input NxHxWxC -> F features): configs/unet.py's UNet (base 16, depth 3) at 64x64, batch
# 16, and UNet-32 (base 32, depth 4) at bench_train's CPU shape, 128x128, batch 4.
DEFAULT_UPCONV = '16x8x8x128:64,16x16x16x64:32,16x32x32x32:16,4x16x16x256:128,4x64x64x64:32'
# Encoder pooling inputs of the same two networks.
DEFAULT_POOL = '16x64x64x16,16x32x32x32,16x16x16x64,4x128x128x32,4x32x32x128'
# 3x3 convolutions of configs/unet.py's UNet at one device's share of the batch on a 2-core host: the
# 16-channel 64x64 level (first layer, encoder, decoder after the skip concatenation) and one 32-channel one.
DEFAULT_CONV = '8x64x64x3:16,8x64x64x16:16,8x64x64x32:16,8x32x32x32:32'
DEFAULT_MODEL = 'unet-default'
SMOKE = dict(upconv='2x4x4x8:4', pool='2x8x8x4', conv='2x8x8x4:4', model='unet-tiny', image_size=32, batch_size=2, warmup=1,
             repeats=2, iters=1, steps=1)
STEP_VARIANTS = (('shipped', '(a) shipped'), ('flax_layers', '(b) nn.ConvTranspose+max_pool'),
                 ('no_donation', '(c) no donation'))


# ---------------------------------------------------------------------------
# Shapes and timing.
# ---------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
  dims = tuple(int(d) for d in text.lower().split('x'))
  if len(dims) != 4 or min(dims) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r}: expected NxHxWxC with positive sizes')
  if dims[1] % 2 or dims[2] % 2:
    raise argparse.ArgumentTypeError(f'{text!r}: H and W must be even for 2x2 pooling')
  return dims


def parse_layer_shapes(text: str) -> list[tuple[tuple[int, ...], int]]:
  """'NxHxWxC:F,...' -> [((N, H, W, C), F), ...]."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(','))):
    shape, _, features = item.partition(':')
    if not features:
      raise argparse.ArgumentTypeError(f'{item!r}: expected NxHxWxC:F')
    dims = tuple(int(d) for d in shape.lower().split('x'))
    if len(dims) != 4 or min(dims) <= 0 or int(features) <= 0:
      raise argparse.ArgumentTypeError(f'{item!r}: expected NxHxWxC:F with positive sizes')
    out.append((dims, int(features)))
  return out


def parse_pool_shapes(text: str) -> list[tuple[int, ...]]:
  return [parse_shape(s.strip()) for s in text.split(',') if s.strip()]


def time_interleaved(calls: dict[str, Callable[[], Any]], *, warmup: int, iters: int, repeats: int,
                     events: Optional[bt.CompileEvents] = None) -> dict[str, dict]:
  """Seconds per call of each variant: warm-up, then `repeats` blocks of `iters` calls, interleaved.

  Only the last output of a block is waited for: the calls queue back to back as in a training loop.
  Returns per variant the median seconds per call, the blocks, the warm-up's compile seconds and the
  number of XLA compilations inside the timed blocks (anything but 0 means the warm-up was too short).
  """
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for name, call in calls.items():
    if events:
      events.take()
    for _ in range(max(1, warmup)):
      jax.block_until_ready(call())
    out[name] = {'compile_s': events.take()['seconds'] if events else None, 'blocks': []}
  if events:
    events.take()
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      for _ in range(iters):
        result = call()
      jax.block_until_ready(result)
      out[name]['blocks'].append((time.perf_counter() - t0) / iters)
  timed = events.take()['xla_compiles'] if events else None
  for entry in out.values():
    entry['seconds'] = statistics.median(entry['blocks'])
    entry['ms'] = 1e3 * entry['seconds']
    entry['blocks'] = [round(s, 6) for s in entry['blocks']]
    entry['xla_compiles_in_timed'] = timed  # All variants' timed blocks together.
  return out


def max_rel_diff(a, b) -> float:
  """max |a - b| over max |a| across the leaves of two pytrees (scale-free: gradients are sums)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  diffs, scale = [], []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    diffs.append(np.abs(x - y).max())
    scale.append(np.abs(x).max())
  return float(max(diffs) / max(max(scale), 1e-30))


# ---------------------------------------------------------------------------
# 1 to 3: single ops, forward + backward.
# ---------------------------------------------------------------------------


def op_comparison(name: str, case: str, variants: dict[str, Callable], args: tuple, *, baseline: str,
                  settings: dict, events, shipped: Optional[str] = None) -> dict:
  """Times value_and_grad(sum(f(*args) ** 2)) over all args for each variant; checks they agree.

  `variants` maps a label to f; `baseline` is the plain Flax label, `shipped` jaxseg's choice (default: the
  one other label). Every variant gets its speed-up (its time / the shipped one's: > 1, jaxseg's choice is
  faster) and its max output / relative gradient difference to the baseline; the comparison's own
  `speedup` is the smallest of them (the shipped variant against its best alternative) and its
  differences the largest.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fwd_bwd(f):
    loss = lambda a: jnp.sum(jnp.square(f(*a).astype(jnp.float32)))
    return jax.value_and_grad(loss)

  shipped = shipped or next(v for v in variants if v != baseline)
  # Equivalence first, at full float32 matmul/conv precision (its own jit cache entries).
  with jax.default_matmul_precision('highest'):
    results = {label: (jax.jit(f)(*args).astype(jnp.float32), jax.jit(fwd_bwd(f))(args)[1])
               for label, f in variants.items()}
  out_ref, g_ref = results[baseline]
  diffs = {label: (float(jnp.abs(out_ref - out).max()), max_rel_diff(g_ref, g)) for label, (out, g) in results.items()}

  steps = {label: jax.jit(fwd_bwd(f)) for label, f in variants.items()}
  timing = time_interleaved({label: (lambda s=s: s(args)) for label, s in steps.items()},
                            warmup=settings['warmup'], iters=settings['iters'], repeats=settings['repeats'],
                            events=events)
  for label, entry in timing.items():
    entry['speedup'] = entry['seconds'] / timing[shipped]['seconds']
    entry['out_max_abs_diff'], entry['grad_max_rel_diff'] = diffs[label]
  others = [label for label in variants if label != shipped]
  return {'comparison': name, 'case': case, 'baseline': baseline, 'jaxseg': shipped, 'variants': timing,
          'speedup': min(timing[label]['speedup'] for label in others),
          'out_max_abs_diff': max(d[0] for d in diffs.values()),
          'grad_max_rel_diff': max(d[1] for d in diffs.values())}


def upconv_comparisons(shapes, dtype, settings, events) -> list[dict]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg.models import layers  # pylint: disable=g-import-not-at-top
  results = []
  for shape, features in shapes:
    plain = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=dtype)
    fast = layers.UpConv2x2(features, dtype=dtype)
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape).astype(dtype)
    # One parameter set for both: UpConv2x2 takes ConvTranspose's kernel [2, 2, C, F] and bias as they are.
    params = jax.jit(plain.init)(kp, x)['params']
    variants = {'flax ConvTranspose': lambda p, a, m=plain: m.apply({'params': p}, a),
                'jaxseg UpConv2x2': lambda p, a, m=fast: m.apply({'params': p}, a)}
    case = f'{"x".join(map(str, shape))}->{features}'
    print(f'  upconv {case} ...', flush=True)
    results.append(op_comparison('upconv', case, variants, (params, x), baseline='flax ConvTranspose',
                                 settings=settings, events=events))
  return results


def pool_comparisons(shapes, dtype, settings, events) -> list[dict]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg.models import layers  # pylint: disable=g-import-not-at-top
  results = []
  for shape in shapes:
    # Continuous random values: no ties inside a window, so both gradients pick the same element.
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    variants = {'flax max_pool': lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)),
                'jaxseg max_pool_2x2': layers.max_pool_2x2}
    case = 'x'.join(map(str, shape))
    print(f'  maxpool {case} ...', flush=True)
    results.append(op_comparison('maxpool', case, variants, (x,), baseline='flax max_pool',
                                 settings=settings, events=events))
  return results


def conv_rewrites() -> dict[str, Callable]:
  """Rewrites of a 3x3 'SAME' convolution f(x [N, H, W, C], kernel [3, 3, C, F]) (HWIO, no bias), same function."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def conv(x, kernel, padding='SAME'):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def padded_to_17(x, kernel):
    f = kernel.shape[-1]
    extra = max(0, 17 - f)
    return conv(x, jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, extra))))[..., :f]

  def taps_in_channels(x, kernel):
    w, c = x.shape[2], x.shape[3]
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    x3 = jnp.concatenate([xp[:, :, dx:dx + w] for dx in range(3)], axis=-1)  # channel (dx, c)
    return conv(x3, kernel.reshape(3, 1, 3 * c, kernel.shape[-1]), ((1, 1), (0, 0)))

  def shifted_sum(x, kernel):
    w, (_, _, c, f) = x.shape[2], kernel.shape
    y3 = conv(x, kernel.transpose(0, 2, 1, 3).reshape(3, 1, c, 3 * f), ((1, 1), (0, 0)))  # channel (dx, f)
    y3 = jnp.pad(y3, ((0, 0), (0, 0), (1, 1), (0, 0)))
    return sum(y3[:, :, dx:dx + w, dx * f:(dx + 1) * f] for dx in range(3))

  def im2col(x, kernel):
    h, w, c = x.shape[1:]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=-1)
    return jnp.einsum('nhwk,kf->nhwf', patches, kernel.reshape(9 * c, kernel.shape[-1]))

  return {'out channels padded to 17': padded_to_17, 'taps in channels, 3x1 conv': taps_in_channels,
          '3x1 conv to 3F, shifted sum': shifted_sum, 'im2col + matmul': im2col}


def conv_comparisons(shapes, dtype, settings, events) -> list[dict]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  results = []
  for shape, features in shapes:
    shipped = nn.Conv(features, (3, 3), padding='SAME', use_bias=False, dtype=dtype)
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape).astype(dtype)
    kernel = jax.jit(shipped.init)(kp, x)['params']['kernel']
    variants = {'flax nn.Conv (shipped)': lambda k, a, m=shipped: m.apply({'params': {'kernel': k}}, a)}
    variants.update({label: (lambda k, a, f=f: f(a, k)) for label, f in conv_rewrites().items()})
    case = f'{"x".join(map(str, shape))}->{features}'
    print(f'  conv3x3 {case} ...', flush=True)
    results.append(op_comparison('conv3x3', case, variants, (kernel, x), baseline='flax nn.Conv (shipped)',
                                 shipped='flax nn.Conv (shipped)', settings=settings, events=events))
  return results


# ---------------------------------------------------------------------------
# 4: the whole train step.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def flax_layers_in_unet():
  """Makes jaxseg.models.unet see nn.ConvTranspose and nn.max_pool under jaxseg's layer names.

  The UNet reaches its layers as `layers.UpConv2x2` / `layers.max_pool_2x2` through the module global
  `layers`: that global is swapped for a copy with the two names replaced, so nothing else (FCN, the
  layers module itself) changes. Same parameter names and shapes as UpConv2x2.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jaxseg.models import unet  # pylint: disable=g-import-not-at-top
  original = unet.layers
  patched = types.SimpleNamespace(**vars(original))
  patched.UpConv2x2 = lambda features, dtype=None, name=None: nn.ConvTranspose(
      features, (2, 2), strides=(2, 2), dtype=dtype, name=name)
  patched.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  unet.layers = patched
  try:
    yield
  finally:
    unet.layers = original


def flax_layers_unet(shipped):
  """A UNet (same fields as `shipped`) whose every trace runs under flax_layers_in_unet.

  Patching inside __call__ rather than around the benchmark ties the swap to this model: whenever jit
  traces it (warm-up or any later retrace) it gets the plain layers, and the shipped model never does,
  so the variants can be timed interleaved in one process.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxseg.models import unet  # pylint: disable=g-import-not-at-top

  class FlaxLayersUNet(unet.UNet):

    def __call__(self, x, *, train: bool = False):
      with flax_layers_in_unet():
        return super().__call__(x, train=train)

  fields = {f.name: getattr(shipped, f.name) for f in dataclasses.fields(unet.UNet)
            if f.init and f.name not in ('parent', 'name')}
  return FlaxLayersUNet(**fields)


def without_donation(p_train, config, spec, lr_fn):
  """The pmapped step of `make_train_step`, the same function and arguments, minus donate_argnums.

  jax.pmap keeps the function it wraps as `__wrapped__`: the very functools.partial of train_step that
  make_train_step built, so nothing is restated. Older JAX without it: the same partial, rebuilt.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import train  # pylint: disable=g-import-not-at-top
  step_fn = getattr(p_train, '__wrapped__', None)
  if not (isinstance(step_fn, functools.partial) and step_fn.func is train.train_step):
    step_fn = functools.partial(train.train_step, ignore_label=spec.ignore_label, class_weights=None,
                                dice_weight=float(config.loss.dice_weight), dtype=state_lib.compute_dtype(config),
                                learning_rate_fn=lr_fn)
  return jax.pmap(step_fn, axis_name=state_lib.AXIS, donate_argnums=())


def forward_primitives(net, size: int, primitive: str) -> int:
  """How many `primitive` equations the model's forward pass has (traced abstractly, sub-jaxprs included)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.extend.core as jex  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape), train=False))

  def count(jaxpr) -> int:
    return sum((e.primitive.name == primitive) + sum(count(j) for j in jex.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)

  return count(jax.make_jaxpr(lambda v, a: net.apply(v, a, train=False))(variables, x).jaxpr)


class StepRunner:
  """Calls a pmapped train step on its own state, as the training loop does (state in, state out)."""

  def __init__(self, p_train, state, batch, rng):
    self.p_train, self.state, self.batch, self.rng = p_train, state, batch, rng
    self.losses = []

  def __call__(self):
    self.state, metrics = self.p_train(self.state, self.batch, self.rng)
    if not self.losses:  # The first step's loss: the same initial state, so all variants must agree.
      self.losses.append(float(metrics['loss'][0]))
    return self.state, metrics


def step_comparison(model: str, dtype: str, size: int, batch: int, settings: dict, events) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import optim  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg import train  # pylint: disable=g-import-not-at-top

  kind, num_classes, _ = bt.model_kwargs(model)
  if kind != 'unet':
    raise SystemExit(f'--model {model}: the step comparison swaps UNet layers; choose a UNet '
                     f'({sorted(m for m in bt.MODELS if bt.MODELS[m]["kind"] == "unet")})')
  n_dev = jax.local_device_count()
  if batch % n_dev:
    raise SystemExit(f'--batch-size {batch} is not divisible by the {n_dev} local devices')
  # Built as bench_train builds the production step (configs/default.py + the row's model, stub spec).
  config = bt.jaxseg_config(model, dtype, size, batch)
  spec = bt.stub_spec(num_classes)
  lr_fn = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
  tx = optim.create_optimizer(config.optimizer, lr_fn)
  shipped = state_lib.build_model(config, num_classes)
  plain = flax_layers_unet(shipped)

  host = state_lib.create_train_state(shipped, tx, jax.random.key(config.seed), (size, size, 3))
  # (b) starts from the very same state: it must be the same parameter tree.
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(
      lambda: m.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)))
  if shapes(shipped) != shapes(plain):
    raise AssertionError('the nn.ConvTranspose/nn.max_pool UNet has another parameter tree than the shipped one')
  # ... and really other layers: a refactor of unet.py (say, importing UpConv2x2 by name) would silently
  # turn (b) into (a). nn.max_pool lowers to reduce_window_max, nn.ConvTranspose to one more convolution
  # per up-step; jaxseg's formulations to neither.
  swapped = {k: forward_primitives(plain, size, k) - forward_primitives(shipped, size, k)
             for k in ('conv_general_dilated', 'reduce_window_max')}
  depth = bt.MODELS[model]['depth']
  if swapped != {'conv_general_dilated': depth, 'reduce_window_max': depth}:
    raise AssertionError(f'variant (b) does not swap the {depth} up-convolutions and max-pools of the UNet: '
                         f'extra primitives {swapped}')

  p_shipped = train.make_train_step(config, spec, lr_fn, None)
  steps = {'shipped': (p_shipped, host),
           'flax_layers': (train.make_train_step(config, spec, lr_fn, None), host.replace(apply_fn=plain.apply)),
           'no_donation': (without_donation(p_shipped, config, spec, lr_fn), host)}

  images, labels = bt.make_batch(batch, size, num_classes)
  per = batch // n_dev
  # A fixed device-resident uint8 batch, one shard per device: input loading is not measured.
  device_batch = jax.block_until_ready(jax.pmap(lambda b: b)(
      {'image': images.reshape(n_dev, per, size, size, 3), 'label': labels.reshape(n_dev, per, size, size)}))
  rng = state_lib.replicate(jax.random.fold_in(jax.random.key(config.seed), 1))
  # state_lib.replicate (as train_and_evaluate): laid out as the step returns it, so it compiles once.
  runners = {k: StepRunner(p, state_lib.replicate(s), device_batch, rng) for k, (p, s) in steps.items()}
  del host

  timing = time_interleaved(runners, warmup=settings['warmup'], iters=settings['steps'],
                            repeats=settings['repeats'], events=events)
  base = timing['shipped']['seconds']
  for k, entry in timing.items():
    entry['images_per_s'] = batch / entry['seconds']
    entry['ratio_to_shipped'] = base / entry['seconds']  # images/s of this variant / images/s of (a).
    entry['speedup'] = entry['seconds'] / base  # (a)'s speed-up over this variant.
    entry['first_loss'] = runners[k].losses[0]
  first = [e['first_loss'] for e in timing.values()]
  return {'comparison': 'train_step', 'case': f'{model} {size}x{size} batch {batch} {dtype}',
          'model': model, 'image_size': size, 'batch_size': batch, 'dtype': dtype, 'devices_used': n_dev,
          'baseline': 'shipped', 'variants': timing, 'flax_layers_extra_primitives': swapped,
          'first_loss_max_rel_diff': (max(first) - min(first)) / max(abs(first[0]), 1e-30)}


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
  w = max([len('case')] + [len(r['case']) for r in results])
  header = (f'{"comparison":<10} {"case":<{w}} {"variant":<31} {"ms":>9} {"img/s":>9} {"/(a)":>6} '
            f'{"speed-up":>8}  {"diff out | grad":>17}')
  lines = [header, '-' * len(header)]
  for r in results:
    first = True
    for label, entry in r['variants'].items():
      lead = f'{r["comparison"]:<10} {r["case"]:<{w}}' if first else ' ' * (11 + w)
      if r['comparison'] == 'train_step':
        name = dict(STEP_VARIANTS)[label]
        ips, ratio = f'{entry["images_per_s"]:.1f}', f'{entry["ratio_to_shipped"]:.2f}'
        ref = label == 'shipped'
        speedup = 'ref' if ref else f'{entry["speedup"]:.2f}x'
        diff = f'loss {r["first_loss_max_rel_diff"]:.1e}' if first else ''
      else:
        name, ips, ratio = label, '-', '-'
        ref = label == r['jaxseg']
        speedup = 'ref' if ref else f'{entry["speedup"]:.2f}x'
        diff = '' if label == r['baseline'] else f'{entry["out_max_abs_diff"]:.1e} | {entry["grad_max_rel_diff"]:.1e}'
      lines.append(f'{lead} {name:<31} {entry["ms"]:>9.3f} {ips:>9} {ratio:>6} {speedup:>8}  {diff:>17}')
      first = False
  lines.append('ms: median per call (train step: per step) of forward + backward (+ update); speed-up: this '
               "variant's time / jaxseg's (> 1: jaxseg's choice is faster); /(a): images/s over (a)'s; diff: max "
               "abs output and max relative gradient difference to the plain Flax variant at 'highest' precision (train step: relative "
               'spread of the first-step loss).')
  return '\n'.join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--comparisons', default='upconv,maxpool,conv3x3,step',
                 help='comma list of upconv, maxpool, conv3x3, step')
  p.add_argument('--upconv-shapes', type=parse_layer_shapes, default=None,
                 help=f'comma list of NxHxWxC:F (input activation : output features) (default: {DEFAULT_UPCONV})')
  p.add_argument('--pool-shapes', type=parse_pool_shapes, default=None,
                 help=f'comma list of NxHxWxC (default: {DEFAULT_POOL})')
  p.add_argument('--conv-shapes', type=parse_layer_shapes, default=None,
                 help=f'comma list of NxHxWxC:F (input activation : output features) (default: {DEFAULT_CONV})')
  p.add_argument('--model', default=None, help=f'UNet of benchmarks/bench_train.py MODELS for the train-step A/B '
                 f'(default: {DEFAULT_MODEL}, configs/unet.py\'s network)')
  p.add_argument('--image-size', type=int, default=None, help='train-step crop side (default: bench_train\'s CPU '
                 'shape for the model; 64 for unet-default)')
  p.add_argument('--batch-size', type=int, default=None, help='train-step global batch (default: bench_train\'s '
                 'CPU shape for the model; 16 for unet-default), split over the local devices')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='computation dtype')
  p.add_argument('--warmup', type=int, default=None, help='untimed calls per variant first (default 2; 1 --smoke)')
  p.add_argument('--repeats', type=int, default=None, help='timed blocks per variant, median reported '
                 '(default 10; 2 --smoke)')
  p.add_argument('--iters', type=int, default=None, help='op calls per timed block (default 10; 1 --smoke)')
  p.add_argument('--steps', type=int, default=None, help='train steps per timed block (default 5; 1 --smoke)')
  p.add_argument('--json', default=None, help='write the report here')
  p.add_argument('--smoke', action='store_true', help='tiny shapes, unet-tiny at 32x32, 2 repeats: checks the '
                 'harness runs; not a timing')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  comparisons = [c.strip() for c in args.comparisons.split(',') if c.strip()]
  for c in comparisons:
    if c not in ('upconv', 'maxpool', 'conv3x3', 'step'):
      raise SystemExit(f'unknown comparison {c!r}; choose from upconv, maxpool, conv3x3, step')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args.smoke and 'jax' not in sys.modules:
    # Not a timing: cheaper XLA:CPU code generation (compiling dominates a smoke run).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + bt.SMOKE_XLA_FLAGS).strip()
  if not args.smoke and 'jax' not in sys.modules:
    # The train step as run.py runs it: on a CPU-only host the cores form that many JAX devices.
    from jaxseg import distributed  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    b = args.batch_size or bt.CPU_SHAPES.get(args.model or DEFAULT_MODEL, (0, 1))[1]
    distributed.split_cpu_into_devices(ml_collections.ConfigDict({'batch_size': b, 'eval_batch_size': b}))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  pick = lambda value, default, smoke: value if value is not None else (smoke if args.smoke else default)
  settings = {'warmup': pick(args.warmup, 2, SMOKE['warmup']), 'repeats': pick(args.repeats, 10, SMOKE['repeats']),
              'iters': pick(args.iters, 10, SMOKE['iters']), 'steps': pick(args.steps, 5, SMOKE['steps'])}
  upconv_shapes = args.upconv_shapes or parse_layer_shapes(SMOKE['upconv'] if args.smoke else DEFAULT_UPCONV)
  conv_shapes = args.conv_shapes or parse_layer_shapes(SMOKE['conv'] if args.smoke else DEFAULT_CONV)
  pool_shapes = args.pool_shapes or parse_pool_shapes(SMOKE['pool'] if args.smoke else DEFAULT_POOL)
  model = args.model or (SMOKE['model'] if args.smoke else DEFAULT_MODEL)
  if model not in bt.MODELS:
    raise SystemExit(f'unknown model {model!r}; choose from {sorted(bt.MODELS)}')
  n_dev = jax.local_device_count()
  size, batch = (SMOKE['image_size'], max(SMOKE['batch_size'], n_dev)) if args.smoke else bt.CPU_SHAPES.get(
      model, bt.SMOKE_SHAPE)
  size, batch = args.image_size or size, args.batch_size or batch
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32

  device = jax.devices()[0]
  report = {
      'schema': SCHEMA,
      'command': ' '.join(['python', os.path.relpath(os.path.abspath(__file__), ROOT)] +
                          list(argv if argv is not None else sys.argv[1:])),
      'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'jax_version': jax.__version__, 'jaxlib_version': bt.version_of('jaxlib'),
      'flax_version': bt.version_of('flax'),
      'device': {'platform': device.platform, 'device_kind': device.device_kind, 'local_device_count': n_dev},
      'host_cpu_count': bt.cpu_count(),
      'settings': dict(settings, dtype=args.dtype, smoke=args.smoke),
      'comparisons': [],
  }
  print(f'jaxseg op A/B on {device.device_kind} ({device.platform}, {n_dev} local device(s)); jax {jax.__version__}; '
        f'{args.dtype}; warm-up {settings["warmup"]}, repeats {settings["repeats"]}, iters {settings["iters"]}, '
        f'steps {settings["steps"]}{", SMOKE (not a timing)" if args.smoke else ""}', flush=True)
  events = bt.CompileEvents()
  started = time.time()
  if 'upconv' in comparisons:
    report['comparisons'] += upconv_comparisons(upconv_shapes, dtype, settings, events)
  if 'maxpool' in comparisons:
    report['comparisons'] += pool_comparisons(pool_shapes, dtype, settings, events)
  if 'conv3x3' in comparisons:
    report['comparisons'] += conv_comparisons(conv_shapes, dtype, settings, events)
  if 'step' in comparisons:
    print(f'  train step {model} {size}x{size} batch {batch} ...', flush=True)
    report['comparisons'].append(step_comparison(model, args.dtype, size, batch, settings, events))
  report['wall_s'] = time.time() - started

  notes = [f'{r["comparison"]} {r["case"]}: {n} XLA compilation(s) inside the timed blocks; raise --warmup'
           for r in report['comparisons']
           for n in [next(iter(r['variants'].values()))['xla_compiles_in_timed']] if n]
  report['notes'] = notes
  print()
  print(format_table(report['comparisons']))
  for note in notes:
    print(f'Note: {note}')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1)
    print(f'Wrote {args.json}')
  return report


if __name__ == '__main__':
  main()
