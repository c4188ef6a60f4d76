"""Model registry: `config.model.name` -> a Flax linen module."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.deeplabv3plus import build_deeplabv3plus
from jaxseg.models.fcn import FCN
from jaxseg.models.encoders.registry import ENCODER_SUBMODULE as ENCODER  # noqa: F401
from jaxseg.models.fcn_vgg16 import FCNVGG16, build_fcn_vgg16, with_pretrained_classifier
from jaxseg.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_images  # noqa: F401
from jaxseg.models.unet import UNet
from jaxseg.models.unet_encoder import UNET_ENCODERS, EncoderUNet


def build_unet(*, num_classes: int, dtype: Any, encoder: Optional[str] = None, **unet_fields) -> nn.Module:
  """config.model.encoder None: the plain UNet (base_width, depth, norm, upsample); else EncoderUNet on it.

  With an encoder the plain UNet's fields are not used (every UNet config has them).
  """
  if encoder is None:
    return UNet(num_classes=num_classes, dtype=dtype, **unet_fields)
  if encoder not in UNET_ENCODERS:
    raise ConfigError(f'config.model.encoder={encoder!r}: the UNet takes one of {list(UNET_ENCODERS)} (or None '
                      'for the plain UNet)')
  return EncoderUNet(num_classes=num_classes, encoder_name=encoder, dtype=dtype)


# name -> (module class or builder taking num_classes, dtype and the fields, the config.model fields it takes
# besides name, encoder_weights and the input contract).
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    'unet': (build_unet, ('base_width', 'depth', 'norm', 'upsample', 'encoder')),
    'fcn': (FCN, ('variant', 'width_multiplier', 'fc_width', 'fc6_kernel', 'dropout_rate', 'norm')),
    'deeplabv3plus': (build_deeplabv3plus, ('encoder', 'output_stride')),
    'fcn_vgg16': (build_fcn_vgg16, ('variant', 'encoder', 'dropout_rate')),
}


def load_pretrained(model: nn.Module, variables: dict, path: str) -> dict:
  """`variables` (a freshly initialised `model`'s) with its encoder's taken from the weight file at `path`.

  The file is a torchvision/timm state dict for the model's encoder (its first convolution adapted when the
  model takes other than 3 input channels); WeightsError names the file, the key and the shapes when it does
  not fit. FCNVGG16 also gets the file's ImageNet fc6/fc7 (VGG's classifier.0/3, reshaped into 7x7 and 1x1
  convolutions); a file without a classifier leaves them random, with a logged warning.
  """
  from jaxseg.models.encoders import weights  # pylint: disable=g-import-not-at-top
  read = weights.read_encoder_weights(model.encoder_name, path)  # Read once (VGG16: ~530 MB), encoder and fc6/fc7.
  variables = weights.with_pretrained_encoder(variables, model.encoder_name, path, encoder_weights=read)
  if isinstance(model, FCNVGG16):
    variables = with_pretrained_classifier(variables, read.classifier, path)
  return variables


INPUT_FIELDS = ('in_channels', 'input_mean', 'input_std')  # config.model fields any model takes (the input contract).


def has_encoder(model: nn.Module) -> bool:
  """Whether `model` keeps a pretrained-style encoder as its submodule ENCODER."""
  return hasattr(model, 'encoder_name')


def create_model(name: str, fields: dict, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """The module `name` with its config.model `fields` (not name, encoder_weights or the input contract).

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
