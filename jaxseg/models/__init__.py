"""Model registry: `config.model.name` -> a Flax linen module."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.fcn import FCN
from jaxseg.models.unet import UNet

# name -> (module class, the config fields it takes besides num_classes/dtype).
MODELS: dict[str, tuple[type, tuple[str, ...]]] = {
    'unet': (UNet, ('base_width', 'depth', 'norm', 'upsample')),
    'fcn': (FCN, ('variant', 'width_multiplier', 'fc_width', 'fc6_kernel', 'dropout_rate', 'norm')),
}


def register_model(name: str, cls: type, fields: tuple[str, ...]) -> None:
  """Adds a model so that `config.model.name = name` builds it."""
  MODELS[name] = (cls, fields)


def create_model(model_config: Any, *, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds the module named by `model_config.name` with its configured fields."""
  name = model_config.name
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r} is not a known model; choose one of {sorted(MODELS)}')
  cls, fields = MODELS[name]
  kwargs = {f: model_config[f] for f in fields if f in model_config}
  unknown = set(model_config.keys()) - set(fields) - {'name'}
  if unknown:
    raise ConfigError(f'config.model has fields {sorted(unknown)} that model {name!r} does not take; '
                      f'it takes {list(fields)}')
  return cls(num_classes=num_classes, dtype=dtype, **kwargs)
