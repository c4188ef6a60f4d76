"""The serving function as an ONNX model (--mode=export with 'onnx' in config.export.formats), through jax2onnx.

The graph: uint8 images [batch, height, width, C] (NHWC, normalisation inside) -> logits float32 [batch, height,
width, K] and mask int32 [batch, height, width], the weights as initializers; fp32 throughout (onnxruntime's CPU
kernels have no bfloat16). The batch is dynamic; so are height and width, as multiples of the model's size
multiple, where the model traces with symbolic sides, else they are fixed at the recipe's crop size (ViTs, whose
position embedding is resized by a matrix computed on the host) -- model.json says which.

How (jax2onnx 0.17.1, `JAX2ONNX_VERSION`):
  1. jax traces the serving function to a jaxpr on symbolic shapes.
  2. jax2onnx converts a replay of that jaxpr's primitives (`replay`). Its own tracing would replace jnp, flax
     and jax.image functions with plugins of their own, several of which take static shapes only or other
     signatures than flax's; lax primitives are what it converts reliably. Two primitives are replayed in an
     equivalent form that its lowering takes (`_REWRITES`): an NHWC max pool (ResNet's stem; it would become a
     4-D ONNX MaxPool, which onnxruntime lacks) as a 3-D one, and constant padding as concatenation (its Pad
     lowering fails on symbolic sides).
  3. jax2onnx names only bare symbols as graph dimensions, not `32*h`: for sides that are multiples of m the
     traced input is [batch, h, m, w, m, C] and a Reshape at the front of the graph takes [batch, H, W, C].
  4. One flag of jax2onnx's gather lowering is module-wide where it should be per conversion; it is reset before
     each (`_reset_gather_constant_folding`), so a second export in one process converts as the first did.

jax2onnx is installed without its dependencies (its metadata pins orbax-checkpoint < 0.11.37, which jaxseg's
checkpoints cannot use, though the converter never imports orbax): `INSTALL` is the command.
"""

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

log = logging.getLogger('jaxseg')

ONNX_FILE = 'model.onnx'
JAX2ONNX_VERSION = '0.17.1'
OPSET = 23
INSTALL = f"pip install 'jaxseg[onnx]' && pip install --no-deps jax2onnx=={JAX2ONNX_VERSION}"
INPUT, OUTPUTS = 'images', ('logits', 'mask')
# The graph is checked against jax on one image at export; past this relative error the export fails.
MAX_RELATIVE_ERROR = 1e-3


class OnnxUnavailable(ImportError):
  """jax2onnx or onnx is not installed."""


def _converter():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise OnnxUnavailable(f'the ONNX export needs jax2onnx and onnx ({e}); install them with: {INSTALL}') from e
  return jax2onnx, onnx


# ---------------------------------------------------------------------------
# The jaxpr replay, with the rewrites jax2onnx's lowering needs.
# ---------------------------------------------------------------------------


def _max_pool_nhwc(operand, params):
  """reduce_window_max over [N, H, W, C] with a spatial window, as a window over [N*C, H, W] (3-D in ONNX)."""
  window, strides, padding = params['window_dimensions'], params['window_strides'], params['padding']
  n, h, w, c = operand.shape
  x = jax.lax.reshape(jax.lax.transpose(operand, (0, 3, 1, 2)), (n * c, h, w))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window[1:3]), (1, *strides[1:3]), ((0, 0), *padding[1:3]))
  return [jax.lax.transpose(jax.lax.reshape(x, (n, c, *x.shape[1:])), (0, 2, 3, 1))]


def _is_nhwc_max_pool(params) -> bool:
  window, strides = params['window_dimensions'], params['window_strides']
  return (len(window) == 4 and window[0] == window[3] == 1 and strides[0] == strides[3] == 1
          and tuple(params['padding'][0]) == tuple(params['padding'][3]) == (0, 0)
          and all(d == 1 for d in params.get('base_dilation', (1,) * 4))
          and all(d == 1 for d in params.get('window_dilation', (1,) * 4)))


def _pad_as_concatenation(operand, padding_value, params):
  """lax.pad without interior padding: blocks of the padding value concatenated (negative amounts: slices)."""
  x = operand
  for axis, (low, high, interior) in enumerate(params['padding_config']):
    assert interior == 0
    if low < 0:
      x = jax.lax.slice_in_dim(x, -low, x.shape[axis], axis=axis)
    if high < 0:
      x = jax.lax.slice_in_dim(x, 0, x.shape[axis] + high, axis=axis)
    blocks = []
    for amount in (low, high):
      shape = list(x.shape)
      shape[axis] = max(amount, 0)
      blocks.append(jax.lax.broadcast_in_dim(padding_value.astype(x.dtype), shape, ()) if amount > 0 else None)
    parts = [b for b in (blocks[0], x, blocks[1]) if b is not None]
    x = jax.lax.concatenate(parts, axis) if len(parts) > 1 else x
  return [x]


# primitive name -> (applies(params), replacement(*operands, params) -> outputs).
_REWRITES: dict[str, tuple[Callable, Callable]] = {
    'reduce_window_max': (_is_nhwc_max_pool, _max_pool_nhwc),
    'pad': (lambda params: all(interior == 0 for *_, interior in params['padding_config']), _pad_as_concatenation),
}
# Call-like primitives whose body is replayed inline (so that the rewrites reach inside): name -> its jaxpr param.
_INLINED = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
            'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr', 'remat': 'jaxpr', 'checkpoint': 'jaxpr'}


def replay(jaxpr, consts: Sequence[Any], *args) -> list:
  """Binds `jaxpr`'s primitives again on `args` (inside another trace), calls inlined and `_REWRITES` applied.

  The rewrites use lax functions only: jax2onnx replaces jnp's during its trace.
  """
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    operands = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    body = eqn.params.get(_INLINED.get(name, ''))
    rewrite = _REWRITES.get(name)
    if body is not None:
      inner = body.jaxpr if hasattr(body, 'jaxpr') else body
      outs = replay(inner, getattr(body, 'consts', ()), *operands)
    elif rewrite and rewrite[0](eqn.params):
      outs = rewrite[1](*operands, eqn.params)
    else:
      outs = eqn.primitive.bind(*operands, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


# ---------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx imports every plugin it ships (Equinox's and dm-pix's among them, absent here: warnings only) and
  onnx_ir warns of values without a dtype it drops; neither concerns the graph written."""
  loggers = [logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _reset_gather_constant_folding() -> None:
  """jax2onnx 0.17.1's gather lowering registers its constant folders on the first conversion's context and sets a
  module-wide flag, so later conversions in the process get none: their gathers with constant indices (jnp's
  indexing) take a path that needs static sides. Clearing the flag registers them on each new context."""
  from jax2onnx.plugins.jax.lax import gather  # pylint: disable=g-import-not-at-top
  if hasattr(gather, '_CONST_HANDLERS_REGISTERED'):
    gather._CONST_HANDLERS_REGISTERED = False  # pylint: disable=protected-access


def _convert(fn: Callable, arg: jax.ShapeDtypeStruct, name: str):
  """`fn` on `arg` as an onnx.ModelProto with input 'images' and outputs 'logits', 'mask'."""
  jax2onnx, _ = _converter()
  _reset_gather_constant_folding()
  closed = jax.make_jaxpr(fn)(arg)

  def replayed(images):
    return dict(zip(OUTPUTS, replay(closed.jaxpr, closed.consts, images)))

  with _quiet_converter():
    return jax2onnx.to_onnx(replayed, inputs=[arg], model_name=name, opset=OPSET, input_names=[INPUT],
                            output_names=list(OUTPUTS))


def _blocks_input(model, multiple: int, channels: int) -> None:
  """Makes the graph's [batch, h, m, w, m, C] input 'images' an inner value computed from a new input 'images'
  [batch, height, width, C] by a Reshape (height and width must be multiples of m)."""
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  graph = model.graph
  blocks = f'{INPUT}_blocks'
  for node in graph.node:
    node.input[:] = [blocks if i == INPUT else i for i in node.input]
  old = graph.input[0]
  graph.input.remove(old)
  graph.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ['batch', 'height', 'width',
                                                                                  channels]))
  consts = {'blocks_m': [multiple], 'blocks_c': [channels], 'blocks_0': [0], 'blocks_1': [1], 'blocks_2': [2]}
  graph.initializer.extend(helper.make_tensor(k, TensorProto.INT64, [1], v) for k, v in consts.items())
  nodes = [
      helper.make_node('Shape', [INPUT], ['blocks_shape']),
      helper.make_node('Gather', ['blocks_shape', 'blocks_0'], ['blocks_b']),
      helper.make_node('Gather', ['blocks_shape', 'blocks_1'], ['blocks_hm']),
      helper.make_node('Gather', ['blocks_shape', 'blocks_2'], ['blocks_wm']),
      helper.make_node('Div', ['blocks_hm', 'blocks_m'], ['blocks_h']),
      helper.make_node('Div', ['blocks_wm', 'blocks_m'], ['blocks_w']),
      helper.make_node('Concat', ['blocks_b', 'blocks_h', 'blocks_m', 'blocks_w', 'blocks_m', 'blocks_c'],
                       ['blocks_target'], axis=0),
      helper.make_node('Reshape', [INPUT, 'blocks_target'], [blocks]),
  ]
  for i, node in enumerate(nodes):
    graph.node.insert(i, node)


def output_shapes(num_classes: int, multilabel: bool, height='height', width='width') -> dict:
  """The serving function's outputs: logits [batch, H, W, K]; mask [batch, H, W] (multi-label [.., K])."""
  mask = ['batch', height, width] + ([num_classes] if multilabel else [])
  return {'logits': {'dtype': 'float32', 'shape': ['batch', height, width, num_classes]},
          'mask': {'dtype': 'int32', 'shape': mask}}


def _name_output_dims(model, height, width, num_classes: int, multilabel: bool) -> None:
  """Output shapes as the contract states them (jax2onnx names them after its inner symbols)."""
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  types = {'float32': TensorProto.FLOAT, 'int32': TensorProto.INT32}
  shapes = {name: (types[o['dtype']], o['shape'])
            for name, o in output_shapes(num_classes, multilabel, height, width).items()}
  for i, out in enumerate(list(model.graph.output)):
    dtype, shape = shapes[out.name]
    model.graph.output.remove(out)
    model.graph.output.insert(i, helper.make_tensor_value_info(out.name, dtype, shape))


def _from_blocks(fn: Callable, m: int) -> Callable:
  def traced(blocks):
    b, h, _, w, _, c = blocks.shape
    return fn(blocks.reshape(b, h * m, w * m, c))
  return traced


def to_onnx(fn: Callable, *, channels: int, num_classes: int, multiples: Sequence[int],
            fixed_size: Sequence[int], name: str = 'jaxseg', multilabel: bool = False):
  """`fn` (uint8 [B, H, W, C] -> {'logits', 'mask'}) as an ONNX model, sides dynamic where it traces so.

  Sides are tried as any size, multiples of each of `multiples` (in order), then fixed at `fixed_size`.

  Returns:
    (onnx.ModelProto, size rule): {'size_multiple': m} (any multiple of m) or {'fixed_size': [h, w]}.
  """
  _, onnx = _converter()
  errors = []
  attempts = [('dynamic', m, f'batch, height, width, {channels}' if m == 1 else
               f'batch, height, {m}, width, {m}, {channels}') for m in multiples]
  attempts.append(('fixed', None, f'batch, {fixed_size[0]}, {fixed_size[1]}, {channels}'))
  for kind, m, spec in attempts:
    arg = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.uint8)
    traced = _from_blocks(fn, m) if kind == 'dynamic' and m > 1 else fn
    try:
      model = _convert(traced, arg, name)
    except Exception as e:  # pylint: disable=broad-except  # Shape-polymorphism and converter errors vary.
      errors.append(f'[{spec}]: {type(e).__name__}: {str(e)[:400]}')
      continue
    if kind == 'dynamic':
      if m > 1:
        _blocks_input(model, m, channels)
      _name_output_dims(model, 'height', 'width', num_classes, multilabel)
      rule = {'size_multiple': m}
    else:
      _name_output_dims(model, int(fixed_size[0]), int(fixed_size[1]), num_classes, multilabel)
      rule = {'fixed_size': [int(fixed_size[0]), int(fixed_size[1])]}
      log.info('ONNX export with fixed height and width %s (symbolic sides: %s)', fixed_size, errors[-1])
    onnx.checker.check_model(model)
    return model, rule
  raise RuntimeError('the model could not be converted to ONNX:\n' + '\n'.join(errors))


def check_against(model, fn: Callable, images: np.ndarray) -> float:
  """Runs `model` with onnxruntime on uint8 `images` and returns the largest |onnx - jax| logit over max |jax|;
  None when onnxruntime is not installed."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  session = onnxruntime.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
  logits = session.run(['logits'], {INPUT: images})[0]
  expected = np.asarray(jax.jit(fn)(images)['logits'])
  return float(np.abs(logits - expected).max() / max(np.abs(expected).max(), 1e-12))


def write(fn: Callable, directory: str, *, channels: int, num_classes: int, multiples: Sequence[int],
          fixed_size: Sequence[int], name: str = 'jaxseg', multilabel: bool = False) -> dict:
  """Converts `fn`, checks it against jax on one random image, writes directory/model.onnx; model.json's entry."""
  _, onnx = _converter()
  model, rule = to_onnx(fn, channels=channels, num_classes=num_classes, multiples=multiples,
                        fixed_size=fixed_size, name=name, multilabel=multilabel)
  if 'fixed_size' in rule:
    h, w = rule['fixed_size']
  else:  # Not square, so that a height/width mix-up shows.
    m = rule['size_multiple']
    w = -(-40 // m) * m
    h = w + m
  sample = np.random.default_rng(0).integers(0, 256, (1, h, w, channels), dtype=np.uint8)
  error = check_against(model, fn, sample)
  if error is not None and not error <= MAX_RELATIVE_ERROR:
    raise RuntimeError(f'the ONNX graph computes other logits than the model: relative error {error:.3g} on a '
                       f'{h}x{w} image (more than {MAX_RELATIVE_ERROR:g}); no {ONNX_FILE} written')
  path = os.path.join(directory, ONNX_FILE)
  large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000  # protobuf's 2 GB limit.
  onnx.save_model(model, path, save_as_external_data=large, location=ONNX_FILE + '.data' if large else None)
  return {
      'file': ONNX_FILE, 'opset': OPSET, 'converter': f'jax2onnx {JAX2ONNX_VERSION}',
      'input': {'name': INPUT, 'dtype': 'uint8', 'channels': channels,
                'shape': ['batch', *(rule['fixed_size'] if 'fixed_size' in rule else ['height', 'width']),
                          channels],
                'size_multiple': rule.get('size_multiple'), 'fixed_size': rule.get('fixed_size')},
      'outputs': output_shapes(num_classes, multilabel),
      'compute_dtype': 'float32', 'checked_relative_error': error, 'checked_on': [h, w],
  }
