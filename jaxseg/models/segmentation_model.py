"""The one composition every encoder-based model is: encoder -> (neck) -> decoder -> segmentation head (+ auxiliary).

  SegmentationModel(num_classes=150, encoder_name='convnext_tiny', decoder_name='upernet')

* `encoder` (the submodule name every fine-tuning rule and weight loader relies on): a registered encoder, built at
  `output_stride`; its maps go to the decoder as {stride: map}.
* `neck` (optional): a registered neck (models/necks) that turns the encoder's maps into the ones the decoder reads
  (a ViT's blocks, all at its patch stride, reassembled into a pyramid for DPT).
* `decoder`: a registered decoder (models/decoders), with its fields; it reads the neck's maps where there is one.
* `segmentation_head`: a convolution to K classes (the decoder's HEAD_KERNEL; none when the decoder gives logits),
  then up to the input size as the decoder's reference does (UPSAMPLE).
* `auxiliary_head` (optional): mmsegmentation's / transformers' FCN head on the stride-16 map, used for a weighted
  extra loss in training (train.py reads it from the 'auxiliary' collection); evaluation and prediction use the
  main logits only.

Inputs are zero-padded at the bottom/right to a multiple of the encoder's coarsest stride (`size_multiple`) when the
decoder's reference needs whole strides (smp's), and the logits are cropped back; transformers-style decoders
(UPerNet) take any size and resize.

A new encoder-decoder pair needs no code: `check` says whether the decoder can work on the encoder's maps.
"""

import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models import layers
from jaxseg.models.decoders import DECODERS
from jaxseg.models.decoders.upernet import AuxiliaryHead
from jaxseg.models.encoders import base as encoder_base
from jaxseg.models.encoders import registry as encoder_registry
from jaxseg.models.encoders import weights as encoder_weights
from jaxseg.models.necks import NECKS

# smp's initialize_head (xavier_uniform_, bias 0) for the segmentation head.
HEAD_KERNEL_INIT = nn.initializers.xavier_uniform()
AUXILIARY_STRIDE = 16  # transformers' UperNetFCNHead reads the third backbone map (in_index 2).
AUXILIARY_COLLECTION = 'auxiliary'


class SegmentationModel(nn.Module):
  """Encoder -> decoder -> head: images [N, H, W, C] (normalised) -> logits [N, H, W, num_classes].

  Attributes:
    num_classes: K.
    encoder_name: a registered encoder (models.encoders.ENCODERS).
    decoder_name: a registered decoder (models.decoders.DECODERS).
    decoder_fields: the decoder module's fields, as ((name, value), ...).
    neck_name: a registered neck (models.necks.NECKS), or None for the encoder's maps as they are.
    neck_fields: the neck module's fields, as ((name, value), ...).
    output_stride: the encoder's (32; 16 or 8 for DeepLabV3+ on an encoder that dilates).
    auxiliary_head: add the auxiliary FCN head on the stride-16 map (its loss weight: auxiliary_weight).
    auxiliary_weight: the auxiliary loss's weight in training (transformers' auxiliary_loss_weight, 0.4).
    frozen_bn: the encoder's BatchNorm layers normalise with their running statistics also in training and
      never update them (state.build_model sets it from config.finetune.freeze_encoder_batch_stats).
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  encoder_name: str
  decoder_name: str
  decoder_fields: tuple[tuple[str, Any], ...] = ()
  neck_name: Optional[str] = None
  neck_fields: tuple[tuple[str, Any], ...] = ()
  output_stride: int = 32
  auxiliary_head: bool = False
  auxiliary_weight: float = 0.4
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @property
  def encoder_spec(self) -> encoder_base.EncoderSpec:
    return encoder_registry.encoder_spec(self.encoder_name)

  @property
  def encoder_features(self) -> tuple[encoder_base.FeatureMap, ...]:
    return encoder_registry.encoder_spec(self.encoder_name).features_at(self.output_stride)

  @property
  def decoder_features(self) -> tuple[encoder_base.FeatureMap, ...]:
    """The maps the decoder reads: the neck's, or the encoder's when there is no neck."""
    if self.neck_name is None:
      return self.encoder_features
    return NECKS[self.neck_name].features(self.encoder_features, **dict(self.neck_fields))

  @property
  def decoder_class(self):
    return DECODERS[self.decoder_name]

  @property
  def size_multiple(self) -> int:
    """The input sides' multiple the model pads to: the coarsest stride, or 1 for decoders that resize."""
    if self.decoder_class.UPSAMPLE == 'resize':
      return 1
    return int(max(f.stride for f in self.encoder_features))

  @property
  def auxiliary_loss_weight(self) -> float:
    return self.auxiliary_weight if self.auxiliary_head else 0.0

  def check(self) -> 'SegmentationModel':
    """ConfigError when the encoder, the decoder, the output stride and the fields do not go together."""
    if self.encoder_name not in encoder_registry.ENCODERS:
      raise ConfigError(f'config.model.encoder={self.encoder_name!r} is not a known encoder; choose one of '
                        f'{sorted(encoder_registry.ENCODERS)}')
    if self.decoder_name not in DECODERS:
      raise ConfigError(f'decoder {self.decoder_name!r} is not a known decoder; choose one of {sorted(DECODERS)}')
    spec = encoder_registry.encoder_spec(self.encoder_name)
    encoder_base.check_output_stride(self.encoder_name, spec, self.output_stride, needed_by=self.decoder_name)
    if self.neck_name is not None:
      if self.neck_name not in NECKS:
        raise ConfigError(f'config.model.neck={self.neck_name!r} is not a known neck; choose one of {sorted(NECKS)}')
      NECKS[self.neck_name].check(self.encoder_name, self.encoder_features, **dict(self.neck_fields))
    self.decoder_class.check(self.encoder_name, self.decoder_features, **dict(self.decoder_fields))
    if self.auxiliary_head and AUXILIARY_STRIDE not in {f.stride for f in self.decoder_features}:
      raise ConfigError(f'config.model.auxiliary_head needs a stride-{AUXILIARY_STRIDE} map, which encoder '
                        f'{self.encoder_name!r} does not give')
    return self

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    spec = encoder_registry.encoder_spec(self.encoder_name)
    features = self.decoder_features
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    encoder = spec.build(output_stride=self.output_stride, frozen_bn=self.frozen_bn, dtype=self.dtype,
                         name=encoder_registry.ENCODER_SUBMODULE)
    maps = encoder(x, train=train)
    if self.neck_name is not None:
      maps = NECKS[self.neck_name](encoder_features=self.encoder_features, train=train, dtype=self.dtype,
                                   name='neck', **dict(self.neck_fields))(maps)
    maps = encoder_base.features_by_stride(maps, features)
    decoder = self.decoder_class(encoder_features=features, num_classes=self.num_classes, train=train,
                                 dtype=self.dtype, name='decoder', **dict(self.decoder_fields))
    y = decoder(maps)
    if self.decoder_class.HEAD_KERNEL is not None:
      k = self.decoder_class.HEAD_KERNEL
      y = layers.Conv(self.num_classes, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)),
                  kernel_init=HEAD_KERNEL_INIT, dtype=self.dtype, name='segmentation_head')(y)
    y = self._to_input_size(y, x.shape[1:3], (h, w))
    if self.auxiliary_head:
      # Computed in every mode so that init makes its parameters; only training reads it (XLA drops it elsewhere).
      aux = AuxiliaryHead(self.num_classes, train=train, dtype=self.dtype,
                          name='auxiliary_head')(maps[AUXILIARY_STRIDE])
      if not self.is_initializing():  # init returns parameters and statistics, not outputs.
        self.sow(AUXILIARY_COLLECTION, 'logits', self._to_input_size(aux, x.shape[1:3], (h, w)))
    return y

  def _to_input_size(self, y, padded: tuple[int, int], size: tuple[int, int]):
    if self.decoder_class.UPSAMPLE == 'resize':
      return layers.resize_bilinear(y, size)
    if y.shape[1] != padded[0]:
      y = layers.upsample_bilinear_align_corners(y, padded[0] // y.shape[1])
    return y[:, :size[0], :size[1], :]


# ---- Weight files. ----


def load_encoder_file(model: SegmentationModel, variables: Mapping[str, Any], path: str) -> dict[str, Any]:
  """`variables` (a fresh init of `model`) with the encoder's from a weight file of one of its layouts.

  The encoder's first convolution is adapted when the model takes other than 3 input channels; the decoder takes
  the file's extras it asks for (FCN: VGG's ImageNet classifier as fc6/fc7).
  """
  read = encoder_weights.read_encoder_weights(model.encoder_name, path)  # Read once (VGG16: ~530 MB).
  variables = encoder_weights.with_pretrained_encoder(variables, model.encoder_name, path, encoder_weights=read)
  if model.decoder_class.EXTRAS:
    params = dict(variables['params'])
    params['decoder'] = model.decoder_class.take_extras(params['decoder'], read.extras, path)
    variables = {**variables, 'params': params}
  return variables


def load_model_file(model: SegmentationModel, variables: Mapping[str, Any], path: str) -> dict[str, Any]:
  """`variables` (a fresh init of `model`) with every weight from a whole-model file in the decoder's layout.

  transformers' UperNetForSemanticSegmentation files (e.g. openmmlab/upernet-convnext-tiny): `backbone.*` is the
  encoder in its transformers layout, `decode_head.*` the decoder and head, `auxiliary_head.*` the auxiliary head
  (ignored when the model has none). A head trained for another number of classes (ADE20K's 150) is left at its
  initialisation, with a logged warning, so that the rest fine-tunes; any other missing, unknown or misshapen
  key is a WeightsError naming the file, the key and both shapes.
  """
  layout = model.decoder_class.MODEL_FILE
  if layout is None:
    raise WeightsError(f'model weights {path}: decoder {model.decoder_name!r} reads no whole-model files; start its '
                       'encoder from a file with config.model.encoder_weights instead')
  prefix, encoder_layout = layout.encoder_prefix, layout.encoder_layout
  state_dict = encoder_weights.read_state_dict(path)
  encoder_part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not encoder_part:
    raise WeightsError(f'model weights {path}: no {prefix}* keys (the encoder\'s): not a whole '
                       f'{model.decoder_name} file in its {encoder_layout} layout')
  read = encoder_weights.state_dict_to_encoder_weights(model.encoder_name, encoder_part, layout=encoder_layout,
                                                       source=f'{path} ({prefix}*)')
  variables = encoder_weights.with_pretrained_encoder(variables, model.encoder_name, path, encoder_weights=read)
  table = layout.key_table(model.auxiliary_head)
  rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
  if not model.auxiliary_head:
    rest = {k: v for k, v in rest.items() if not k.startswith('auxiliary_head.')}
  missing = sorted(set(table) - set(rest))
  unexpected = sorted(k for k in set(rest) - set(table) if not k.endswith(encoder_weights.SKIPPED_SUFFIX))
  new = {c: _unfreeze(variables.get(c, {})) for c in ('params', 'batch_stats')}
  wrong, other_classes = [], []
  for key, entry in table.items():
    if key not in rest:
      continue
    leaf = _get(new[entry.collection], entry.path)
    want = encoder_base.file_shape(entry, np.shape(leaf))
    got = tuple(np.shape(rest[key]))
    if got != want:
      classifier = entry.path[0] == 'segmentation_head' or entry.path[:2] == ('auxiliary_head', 'classifier')
      (other_classes if classifier else wrong).append((key, got, want))
  if missing or unexpected or wrong:
    problems = []
    if wrong:
      problems.append('; '.join(f'{k!r} is {list(g)} in the file, the model needs {list(w)}' for k, g, w in wrong[:6]))
    if missing:
      problems.append(f'{len(missing)} key(s) missing from the file: {missing[:6]}')
    if unexpected:
      problems.append(f'{len(unexpected)} key(s) the model does not have: {unexpected[:6]}')
    raise WeightsError(f'model weights {path} do not fit {model.decoder_name}-{model.encoder_name} with '
                       f'{model.num_classes} classes: ' + '. '.join(problems))
  skipped = {k for k, _, _ in other_classes}
  if skipped:
    logging.warning('model weights %s: its classifier has another number of classes (%s), so %s keep their '
                    'initialisation', path, other_classes[0][1], sorted(skipped))
  for key, entry in table.items():
    if key in rest and key not in skipped:
      leaf = _get(new[entry.collection], entry.path)
      value = encoder_base.to_flax(entry.kind, np.asarray(rest[key], np.float32)).astype(leaf.dtype)
      _set(new[entry.collection], entry.path, value)
  return {**variables, **{c: new[c] for c in new if c in variables}}


def _unfreeze(tree):
  return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value
