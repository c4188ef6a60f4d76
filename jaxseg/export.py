"""--mode=export: the trained model as artefacts that run without jaxseg.

WORKDIR/export/ gets (config.export.formats chooses; all three by default)
  model.jax_exported  `jax.export` serialisation of  uint8 images [B, H, W, C] ->
                      {'logits': float32 [B, H, W, K], 'mask': int32 [B, H, W]}
                      (multi-label: 'mask' int32 [B, H, W, K] of 0 / 1, logit > 0),
                      normalisation and weights inside; B is symbolic, and so are
                      H and W (as multiples of `size_multiple` when the model
                      cannot take any size symbolically; fixed at the recipe's
                      crop size when it cannot take symbolic sides at all, as a
                      ViT -- see model.json). Lowered for CPU, CUDA and TPU where
                      possible. C is the model's config.model.in_channels (3: RGB;
                      1: grayscale; 4: e.g. RGB + near-infrared).
  saved_model/        the same function as a TensorFlow SavedModel (jax2tf), where
                      jax2tf works.
  model.onnx          the same function as an ONNX graph (jaxseg/onnx_export.py),
                      fp32, batch dynamic, sides as model.json['onnx'] says;
                      checked against jax with onnxruntime when it is installed.
  model.json          class names, palette, input/output spec, size rule,
                      platforms, checkpoint step, the model config.

Loading needs only jax and numpy:

  exp = jax.export.deserialize(open('WORKDIR/export/model.jax_exported', 'rb').read())
  out = exp.call(images)  # images uint8 [B, H, W, C], H and W multiples of size_multiple

or `jaxseg.export.load(dir)`, which pads any size and crops back; model.onnx needs only onnxruntime (README).
"""

import contextlib
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import inference
from jaxseg import onnx_export
from jaxseg import startup
from jaxseg import state as state_lib
from jaxseg import viz

log = logging.getLogger('jaxseg')

MODEL_FILE = 'model.jax_exported'
META_FILE = 'model.json'
SAVED_MODEL_DIR = 'saved_model'
ALL_PLATFORMS = ('cpu', 'cuda', 'tpu')
# How model.json describes the input's channels (the bands in the order the training files held them).
_LAYOUTS = {1: 'grayscale', 3: 'RGB', 4: '4 bands (e.g. RGB + near-infrared, in the training files\' order)'}


def serving_function(model, variables: dict, dtype, input_stats=None, multilabel: bool = False):
  """uint8 [B, H, W, C] -> {'logits': float32 [B, H, W, K], 'mask': int32 [B, H, W]}, weights closed over.

  C = len(input_stats[0]) (the model's channel count; 3 without input_stats). `multilabel`: 'mask' is
  int32 [B, H, W, K], 1 where a class's sigmoid exceeds 0.5.
  """
  def serve(images):
    logits = inference.forward(model, variables, images, dtype, input_stats)
    mask = (logits > 0) if multilabel else jnp.argmax(logits, axis=-1)
    return {'logits': logits, 'mask': mask.astype(jnp.int32)}

  return serve


def size_multiples(model) -> list[int]:
  """The side multiples an export tries for `model`, in order (then the crop size, fixed).

  A model that pads to a multiple m (UNet, FCN, encoder-decoders on a stride) gets [m] alone: any size would only
  add symbolic padding, whose expressions can take minutes to trace. One that takes any size (resizing decoders)
  gets [1, its encoder's coarsest stride], the stride where its floor divisions are exact.
  """
  m = int(model.size_multiple)
  if m > 1:
    return [m]
  strides = [f.stride for f in getattr(model, 'encoder_features', ())]
  coarsest = max(strides, default=1)
  return [1] + ([int(coarsest)] if coarsest > 1 and float(coarsest).is_integer() else [])


def export_function(fn, multiples: list[int], platforms: tuple[str, ...] = ALL_PLATFORMS, channels: int = 3,
                    fixed_size: Optional[tuple[int, int]] = None):
  """Exports `fn` on uint8 [B, H, W, channels] with a symbolic batch and the most general H/W that lowers.

  H and W are tried as symbolic multiples of each of `multiples` (1: any size), then fixed at `fixed_size` (a model
  that resizes by a matrix computed on the host, as a ViT's position embedding).

  Returns:
    (jax.export.Exported, size rule: {'size_multiple': m} (1: any H/W) or {'fixed_size': [h, w]}, shape spec).
  """
  errors = []
  specs = [(f'b, h, w, {channels}' if m == 1 else f'b, {m}*h, {m}*w, {channels}', {'size_multiple': m})
           for m in multiples]
  if fixed_size is not None:
    specs.append((f'b, {fixed_size[0]}, {fixed_size[1]}, {channels}', {'fixed_size': list(fixed_size)}))
  for spec, rule in specs:
    for plats in (platforms, (jax.default_backend(),)):
      try:
        arg = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.uint8)
        return jax.export.export(jax.jit(fn), platforms=plats)(arg), rule, spec
      except Exception as e:  # pylint: disable=broad-except  # Shape-polymorphism and lowering errors vary.
        errors.append(f'[{spec}] on {plats}: {type(e).__name__}: {str(e)[:300]}')
  raise RuntimeError('the model could not be exported with a symbolic shape:\n' + '\n'.join(errors))


def _write_saved_model(fn, spec: str, directory: str, platforms: tuple[str, ...], channels: int = 3) -> None:
  """`fn` as a TensorFlow SavedModel (jax2tf): uint8 images [B, H, W, C] with the export's symbolic shape."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[f'({spec})'], native_serialization_platforms=platforms)
  module = tf.Module()
  module.serve = tf.function(tf_fn, input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8,
                                                                       name='images')],
                             autograph=False)
  with _stablehlo_readable_by_tensorflow():  # jax2tf serialises the program when save traces it.
    tf.saved_model.save(module, directory, signatures={'serving_default': module.serve})


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow():
  """jax serialises StableHLO for a consumer at most ~4 weeks older than itself; TensorFlow's XlaCallModule, which
  runs a SavedModel's program, reads the StableHLO of its own release, often older (jax 0.12 writes its shape
  assertions as custom_call_v2 ops that TensorFlow 2.21 cannot read). Within this block jax targets the older of
  the two versions; the program keeps its shape assertions."""
  from jaxlib.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
  try:
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=g-import-not-at-top
    tf_version = tf_stablehlo.get_current_version()
  except (ImportError, AttributeError):  # A TensorFlow without its StableHLO bindings: jax's own target.
    yield
    return
  jax_target = stablehlo.get_version_from_compatibility_requirement
  as_tuple = lambda v: tuple(int(x) for x in v.split('.'))
  stablehlo.get_version_from_compatibility_requirement = (
      lambda requirement: min(jax_target(requirement), tf_version, key=as_tuple))
  try:
    yield
  finally:
    stablehlo.get_version_from_compatibility_requirement = jax_target


def export_model(config, workdir: str, *, checkpoint: str = 'best', output_dir: Optional[str] = None) -> str:
  """--mode=export: writes the best (or latest) checkpoint of `workdir` to WORKDIR/export (or `output_dir`).

  Returns:
    The export directory.
  """
  # The weights go into the artefact as constants: one copy, on one device.
  run = startup.open_run(config, workdir, mode='export', checkpoint=checkpoint, devices=jax.local_devices()[:1],
                         sharding_mode='replicated')
  settings, spec, setup, step = run.settings, run.spec, run.setup, run.step
  out = os.path.abspath(output_dir or os.path.join(run.workdir, 'export'))
  variables = jax.device_get(state_lib.inference_variables(run.state))
  fn = serving_function(setup.model, variables, setup.dtype, setup.input_stats, spec.multilabel)
  channels, k, formats = settings.model.in_channels, spec.num_classes, settings.export_formats
  # Sides symbolic multiples of one of size_multiples (1: any size) where the program traces so, else the crop size.
  fixed_size = tuple(settings.input.crop_size)
  multiples = size_multiples(setup.model)
  os.makedirs(out, exist_ok=True)
  meta = {'formats': list(formats), 'jax_version': jax.__version__}
  written = []

  if 'jax' in formats or 'saved_model' in formats:
    exported, size_rule, shape_spec = export_function(fn, multiples, channels=channels, fixed_size=fixed_size)
    if 'jax' in formats:
      with open(os.path.join(out, MODEL_FILE), 'wb') as f:
        f.write(exported.serialize())
      meta.update({'format': 'jax.export', 'file': MODEL_FILE, 'platforms': list(exported.platforms)})
      written.append(f'{MODEL_FILE} (platforms {", ".join(exported.platforms)})')
    meta['saved_model'] = None
    if 'saved_model' in formats:
      try:
        _write_saved_model(fn, shape_spec, os.path.join(out, SAVED_MODEL_DIR), tuple(exported.platforms), channels)
        meta['saved_model'] = SAVED_MODEL_DIR
        written.append(SAVED_MODEL_DIR + '/')
      except Exception as e:  # pylint: disable=broad-except  # jax2tf is best effort; the other files are complete.
        log.warning('No TensorFlow SavedModel written (%s: %s); the other formats are complete without it.',
                    type(e).__name__, str(e)[:500])
    meta['input'] = _input_contract(channels, size_rule, shape_spec)

  meta['onnx'] = None
  if 'onnx' in formats:
    # fp32 whatever the training's precision: onnxruntime's CPU kernels have no bfloat16.
    fp32 = serving_function(setup.model, variables, jnp.float32, setup.input_stats, spec.multilabel)
    try:
      meta['onnx'] = onnx_export.write(fp32, out, channels=channels, num_classes=k, multiples=multiples,
                                       fixed_size=fixed_size, name=settings.model.name, multilabel=spec.multilabel)
      written.append(onnx_export.ONNX_FILE)
      if 'input' not in meta:
        onnx_input = meta['onnx']['input']
        meta['input'] = _input_contract(channels, {key: onnx_input[key] for key in ('size_multiple', 'fixed_size')
                                                   if onnx_input[key]}, None)
    except onnx_export.OnnxUnavailable as e:
      if settings.export_formats_given:
        raise
      log.warning('No ONNX model written: %s', e)

  meta.update({
      'task': settings.task, 'outputs': onnx_export.output_shapes(k, spec.multilabel),
      'normalization': {'mean': list(setup.input_stats[0]), 'std': list(setup.input_stats[1]),
                        'applied_inside': True},
      'num_classes': k, 'class_names': list(spec.class_names), 'ignore_label': spec.ignore_label,
      'palette': viz.palette_for(spec.name, k, spec.multilabel).tolist(), 'dataset': spec.name,
      'model': settings.model.as_dict(), 'checkpoint': checkpoint, 'checkpoint_step': step,
  })
  with open(os.path.join(out, META_FILE), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)
  if jax.process_index() == 0:
    print(f'Exported the {checkpoint} checkpoint (step {step}) to {out}: {", ".join(written + [META_FILE])}; '
          f'batch dynamic, {_describe(meta["input"])}', flush=True)
  return out


def _input_contract(channels: int, rule: dict, shape_spec: Optional[str]) -> dict:
  """model.json's 'input': the images every format takes, and the size rule."""
  if 'fixed_size' in rule:
    h, w = rule['fixed_size']
    note = (f'height and width must be {h} and {w}: pad smaller images at the bottom/right with zeros and crop '
            'the outputs (jaxseg.export.load does this), tile larger ones')
    shape = ['batch', h, w, channels]
  else:
    m = rule['size_multiple']
    note = ('height and width must be multiples of size_multiple: pad images at the bottom/right with zeros and '
            'crop the outputs (jaxseg.export.load does this)') if m > 1 else 'any height and width'
    shape = ['batch', 'height', 'width', channels]
  return {'name': 'images', 'dtype': 'uint8', 'shape': shape,
          'layout': f'NHWC, {_LAYOUTS.get(channels, f"{channels} bands")}, 0-255', 'channels': channels,
          'symbolic_shape': shape_spec, 'size_multiple': rule.get('size_multiple'),
          'fixed_size': rule.get('fixed_size'), 'note': note}


def _describe(contract: dict) -> str:
  if contract['fixed_size']:
    return 'height x width fixed at {}x{}'.format(*contract['fixed_size'])
  m = contract['size_multiple']
  return 'any height and width' if m == 1 else f'height and width multiples of {m}'


class ExportedModel:
  """A loaded export: call it on uint8 images [B, H, W, C] (or one [H, W, C]) of any size.

  C is meta['input']['shape'][-1], the model's channel count; a grayscale
  model (C = 1) also takes [B, H, W] (or one [H, W]).

  Needs only jax and numpy. Images are zero-padded at the bottom/right to the
  export's size multiple (or its fixed size, which larger images exceed: an
  error) and the outputs cropped back.

  Attributes:
    meta: the contents of model.json.
    exported: the jax.export.Exported.
  """

  def __init__(self, directory: str):
    with open(os.path.join(directory, META_FILE), encoding='utf-8') as f:
      self.meta = json.load(f)
    with open(os.path.join(directory, self.meta.get('file', MODEL_FILE)), 'rb') as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    self.class_names = self.meta['class_names']
    self.palette = np.asarray(self.meta['palette'], np.uint8)
    self.size_multiple = self.meta['input']['size_multiple']  # None when the sides are fixed.
    self.fixed_size = self.meta['input'].get('fixed_size')

  def __call__(self, images: Any) -> dict:
    images = np.asarray(images, np.uint8)
    channels = int(self.meta['input']['shape'][-1])
    if channels == 1 and images.ndim in (2, 3) and images.shape[-1] != 1:
      images = images[..., None]  # Grayscale without its channel axis.
    single = images.ndim == 3
    if single:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != channels:
      raise ValueError(f'this export takes uint8 images [B, H, W, {channels}] or one [H, W, {channels}], got shape '
                       f'{np.shape(images)}')
    _, h, w, _ = images.shape
    if self.fixed_size:
      ph, pw = self.fixed_size
      if h > ph or w > pw:
        raise ValueError(f'this export takes images of at most {ph}x{pw} (its fixed size), got {h}x{w}: tile it')
    else:
      m = self.size_multiple
      ph, pw = -(-h // m) * m, -(-w // m) * m
    if (ph, pw) != (h, w):
      images = np.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    out = {k: np.asarray(v)[:, :h, :w] for k, v in self.exported.call(images).items()}
    return {k: v[0] for k, v in out.items()} if single else out


def load(directory: str) -> ExportedModel:
  """Loads WORKDIR/export (as written by --mode=export)."""
  return ExportedModel(directory)
