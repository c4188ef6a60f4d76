"""Model registry: `config.model.name` -> a Flax linen module."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.deeplabv3plus import build_deeplabv3plus
from jaxseg.models.fcn import FCN
from jaxseg.models.fcn_vgg16 import build_fcn_vgg16
from jaxseg.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_images  # noqa: F401
from jaxseg.models.unet import UNet
from jaxseg.models.unet_encoder import UNET_ENCODERS, EncoderUNet


def build_unet(*, num_classes: int, dtype: Any, encoder: Optional[str] = None, encoder_weights: Optional[str] = None,
               **unet_fields) -> nn.Module:
  """config.model.encoder None: the plain UNet (base_width, depth, norm, upsample); else EncoderUNet on it.

  With an encoder the plain UNet's fields are not used (every UNet config has them).
  """
  if encoder is None:
    if encoder_weights:
      raise ConfigError(f'config.model.encoder_weights={encoder_weights!r} needs config.model.encoder (one of '
                        f'{list(UNET_ENCODERS)}); the plain UNet has no pretrained encoder')
    return UNet(num_classes=num_classes, dtype=dtype, **unet_fields)
  if encoder not in UNET_ENCODERS:
    raise ConfigError(f'config.model.encoder={encoder!r}: the UNet takes one of {list(UNET_ENCODERS)} (or None '
                      'for the plain UNet)')
  # encoder_weights is not a module field: state.Setup.init_state puts the file into a fresh state
  # (load_pretrained), and a restored run needs no file.
  return EncoderUNet(num_classes=num_classes, encoder_name=encoder, dtype=dtype)


# name -> (module class or builder taking num_classes, dtype and the fields, the config fields it takes
# besides num_classes/dtype).
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    'unet': (build_unet, ('base_width', 'depth', 'norm', 'upsample', 'encoder', 'encoder_weights')),
    'fcn': (FCN, ('variant', 'width_multiplier', 'fc_width', 'fc6_kernel', 'dropout_rate', 'norm')),
    'deeplabv3plus': (build_deeplabv3plus, ('encoder', 'encoder_weights', 'output_stride')),
    'fcn_vgg16': (build_fcn_vgg16, ('variant', 'encoder', 'encoder_weights', 'dropout_rate')),
}


def load_pretrained(model_config: Any, variables: dict) -> dict:
  """`variables` (a freshly initialised model's) with what config.model's weights file provides, or as they are.

  config.model.encoder_weights: a torchvision/timm state dict for config.model.encoder, put into the
  encoder submodule (its first convolution adapted when the model takes other than 3 input channels).
  Raises WeightsError naming the file, the key and the shapes when the file does not fit.
  'fcn_vgg16' also gets the file's ImageNet fc6/fc7 (VGG's classifier.0/3, reshaped into 7x7 and 1x1
  convolutions) in params['fc6'], params['fc7']; a file without a classifier leaves them random, with a
  logged warning (fcn_vgg16.with_pretrained_classifier).
  """
  path = model_config.get('encoder_weights')
  if not path:
    return variables
  from jaxseg.models.encoders import weights  # pylint: disable=g-import-not-at-top
  if model_config.name == 'fcn_vgg16':
    from jaxseg.models import fcn_vgg16  # pylint: disable=g-import-not-at-top
    encoder = model_config.get('encoder') or 'vgg16'
    read = weights.read_encoder_weights(encoder, path)  # Read once (~530 MB), for the encoder and fc6/fc7.
    variables = weights.with_pretrained_encoder(variables, encoder, path, encoder_weights=read)
    return fcn_vgg16.with_pretrained_classifier(variables, read.classifier, path)
  return weights.with_pretrained_encoder(variables, model_config.encoder, path)


INPUT_FIELDS = ('in_channels', 'input_mean', 'input_std')  # config.model fields any model takes.


def register_model(name: str, cls: Callable[..., nn.Module], fields: tuple[str, ...]) -> None:
  """Adds a model so that `config.model.name = name` builds it (a module class or a builder function)."""
  MODELS[name] = (cls, fields)


def create_model(model_config: Any, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds the module named by `model_config.name` with its configured fields."""
  name = model_config.name
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r} is not a known model; choose one of {sorted(MODELS)}')
  cls, fields = MODELS[name]
  kwargs = {f: model_config[f] for f in fields if f in model_config}
  # The input contract (channels, normalisation) is every model's; the step applies it, not the module.
  unknown = set(model_config.keys()) - set(fields) - {'name'} - set(INPUT_FIELDS)
  if unknown:
    raise ConfigError(f'config.model has fields {sorted(unknown)} that model {name!r} does not take; '
                      f'it takes {list(fields)}')
  return cls(num_classes=num_classes, dtype=dtype, **kwargs)
