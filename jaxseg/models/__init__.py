"""Model registry: `config.model.name` (the architecture) -> a Flax linen module.

Every encoder-based model is one composition (segmentation_model.SegmentationModel): `config.model.encoder` picks
the backbone (models/encoders), the name the decoder (models/decoders). The plain UNet and FCN (no encoder) are
their own modules.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.fcn import FCN
from jaxseg.models.encoders.registry import ENCODER_SUBMODULE as ENCODER  # noqa: F401
from jaxseg.models.encoders.registry import ENCODERS
from jaxseg.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_images  # noqa: F401
from jaxseg.models.segmentation_model import AUXILIARY_COLLECTION as AUXILIARY  # noqa: F401
from jaxseg.models.segmentation_model import SegmentationModel, load_encoder_file, load_model_file
from jaxseg.models.unet import UNet


def compose(decoder: str, *, num_classes: int, dtype: Any, encoder: Optional[str], output_stride: int = 32,
            auxiliary_head: bool = False, auxiliary_weight: float = 0.4, neck: Optional[str] = None,
            neck_fields: Optional[dict] = None, **decoder_fields) -> SegmentationModel:
  """The SegmentationModel of `decoder` on `encoder` (through `neck`), checked (ConfigError naming what does not fit).
  """
  if not isinstance(encoder, str):
    raise ConfigError(f'config.model.encoder must name an encoder for model {decoder!r}, got {encoder!r}')
  if not isinstance(auxiliary_head, bool):
    raise ConfigError(f'config.model.auxiliary_head must be True or False, got {auxiliary_head!r}')
  decoder_fields, neck_fields = _fields(decoder_fields), _fields(neck_fields or {})
  if encoder in ENCODERS:  # An unknown name is check()'s error.
    decoder_fields = {**ENCODERS[encoder].decoder_defaults.get(decoder, {}), **decoder_fields}
  return SegmentationModel(num_classes=num_classes, encoder_name=encoder, decoder_name=decoder,
                           decoder_fields=tuple(sorted(decoder_fields.items())), neck_name=neck,
                           neck_fields=tuple(sorted(neck_fields.items())), output_stride=output_stride,
                           auxiliary_head=auxiliary_head, auxiliary_weight=auxiliary_weight, dtype=dtype).check()


def _fields(fields: dict) -> dict:
  """A module's fields from a config: None means the module's default; lists become tuples (modules are hashed)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if v is not None}


def build_unet(*, num_classes: int, dtype: Any, encoder: Optional[str] = None, **unet_fields) -> nn.Module:
  """encoder None: the plain UNet (base_width, depth, norm, upsample); else smp's UNet decoder on the encoder.

  With an encoder the plain UNet's fields are not used (every UNet config has them).
  """
  if encoder is None:
    return UNet(num_classes=num_classes, dtype=dtype, **unet_fields)
  return compose('unet', num_classes=num_classes, dtype=dtype, encoder=encoder)


def build_fcn(*, num_classes: int, dtype: Any, encoder: Optional[str] = None, variant: str = 'fcn8s',
              dropout_rate: float = 0.5, **plain_fields) -> nn.Module:
  """encoder None: the from-scratch FCN; else fc6/fc7 and the FCN scores on the encoder (the paper's on vgg16)."""
  if encoder is None:
    return FCN(num_classes=num_classes, dtype=dtype, variant=variant, dropout_rate=dropout_rate, **plain_fields)
  return compose('fcn', num_classes=num_classes, dtype=dtype, encoder=encoder, variant=variant,
                 dropout_rate=dropout_rate)


VGG16_ENCODERS = ('vgg16', 'vgg16_bn')


def build_fcn_vgg16(*, num_classes: int, dtype: Any, encoder: Optional[str] = 'vgg16', **fields) -> nn.Module:
  """The recipe name 'fcn_vgg16': model 'fcn' on vgg16 (encoder None) or vgg16_bn."""
  if encoder not in (None, *VGG16_ENCODERS):
    raise ConfigError(f'config.model.encoder={encoder!r}: fcn_vgg16 takes one of {list(VGG16_ENCODERS)} (model '
                      "'fcn' takes any encoder)")
  return build_fcn(num_classes=num_classes, dtype=dtype, encoder=encoder or 'vgg16', **fields)


def _composed(decoder: str, default_encoder: str, **defaults) -> Callable[..., nn.Module]:
  def build(*, num_classes: int, dtype: Any, encoder: Optional[str] = default_encoder, **fields) -> nn.Module:
    return compose(decoder, num_classes=num_classes, dtype=dtype, encoder=encoder, **{**defaults, **fields})
  return build


def build_dpt(*, num_classes: int, dtype: Any, encoder: Optional[str] = 'vit_small_patch14_dinov2',
              readout: Optional[str] = None, neck_hidden_sizes=None, **fields) -> nn.Module:
  """DPT (Ranftl et al., 2021): the ViT's blocks reassembled into a pyramid (the 'reassemble' neck), fused, classified."""
  return compose('dpt', num_classes=num_classes, dtype=dtype, encoder=encoder, neck='reassemble',
                 neck_fields={'readout': readout, 'hidden_sizes': neck_hidden_sizes}, **fields)


# name -> (builder taking num_classes, dtype and the fields; the config.model fields it takes besides name,
# encoder_weights, weights and the input contract).
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    'unet': (build_unet, ('base_width', 'depth', 'norm', 'upsample', 'encoder')),
    'fcn': (build_fcn, ('variant', 'width_multiplier', 'fc_width', 'fc6_kernel', 'dropout_rate', 'norm', 'encoder')),
    'fcn_vgg16': (build_fcn_vgg16, ('variant', 'encoder', 'dropout_rate')),
    'deeplabv3plus': (_composed('deeplabv3plus', 'resnet50', output_stride=16), ('encoder', 'output_stride')),
    'fpn': (_composed('fpn', 'resnet34'), ('encoder', 'dropout_rate')),
    'upernet': (_composed('upernet', 'convnext_tiny'), ('encoder', 'channels', 'auxiliary_head', 'auxiliary_weight')),
    'segformer': (_composed('segformer', 'mit_b0'), ('encoder', 'channels', 'dropout_rate')),
    'dpt': (build_dpt, ('encoder', 'readout', 'neck_hidden_sizes', 'fusion_hidden_size', 'fusion_batch_norm',
                        'dropout_rate')),
    'linear': (_composed('linear', 'vit_small_patch14_dinov2'), ('encoder', 'class_token')),
}


def load_pretrained(model: nn.Module, variables: dict, path: str) -> dict:
  """`variables` (a freshly initialised `model`'s) with its encoder's from the weight file at `path`.

  The file is a state dict of the encoder in one of its layouts (torchvision, timm, transformers: the encoder
  module says which); its first convolution is adapted when the model takes other than 3 input channels;
  WeightsError names the file, the key and the shapes when it does not fit. The decoder takes the file's extras
  it asks for (FCN on VGG16: the ImageNet classifier's fc6/fc7; a file without them leaves them random, with a
  logged warning).
  """
  return load_encoder_file(model, variables, path)


def load_weights(model: nn.Module, variables: dict, path: str) -> dict:
  """`variables` with every weight from a whole-model file in the decoder's published layout (see load_model_file)."""
  if not has_encoder(model):
    raise ConfigError(f'config.model.weights needs an encoder-based model; {type(model).__name__} has no file layout')
  return load_model_file(model, variables, path)


INPUT_FIELDS = ('in_channels', 'input_mean', 'input_std')  # config.model fields any model takes (the input contract).


def has_encoder(model: nn.Module) -> bool:
  """Whether `model` keeps a pretrained-style encoder as its submodule ENCODER (and names it `encoder_name`)."""
  return hasattr(model, 'encoder_name')


def create_model(name: str, fields: dict, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """The module `name` with its config.model `fields` (not name, the weight files or the input contract).

  Raises ConfigError for a field the model does not take or a value it cannot build. Cheap (no parameters are
  made), so the settings check builds it once. Every module states its `size_multiple`: the factor it pads its
  input sides to.
  """
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r} is not a known model; choose one of {sorted(MODELS)}')
  cls, known = MODELS[name]
  unknown = set(fields) - set(known)
  if unknown:
    raise ConfigError(f'config.model has fields {sorted(unknown)} that model {name!r} does not take; '
                      f'it takes {list(known)}')
  return cls(num_classes=num_classes, dtype=dtype, **fields)
