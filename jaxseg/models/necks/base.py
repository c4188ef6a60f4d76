"""The neck contract: an optional stage between the encoder and the decoder that turns the encoder's maps into others.

A plain ViT gives every chosen block at one stride (its patch size); a neck reassembles them into a pyramid, so
that a decoder which reads maps by stride (DPT's fusion, a feature pyramid) can run on it:

  encoder (maps, declared as FeatureMaps) -> neck (the maps it declares by `features`) -> decoder -> head

A neck module is built with the encoder's declared maps (`encoder_features`) and called with the encoder's maps as
a list, finest first (PatchTokens where the FeatureMap says class_token); it returns a list matching
`features(encoder_features, **fields)`. `check` raises a ConfigError naming the neck and the encoder when it cannot
work on that encoder's maps.
"""

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models.encoders.base import FeatureMap


class Neck(nn.Module):
  """The attributes every neck has. Each neck also defines the classmethod `features(encoder_features, **fields)`:
  the maps it returns on an encoder with these maps, finest first.

  Attributes:
    encoder_features: the encoder's declared maps, finest first.
    train: training mode (BatchNorm statistics, dropout).
    dtype: computation dtype; parameters stay float32.
  """
  encoder_features: tuple[FeatureMap, ...]
  train: bool = False
  dtype: Any = jnp.float32

  NAME: ClassVar[str] = ''
  FIELDS: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def check(cls, encoder: str, encoder_features: Sequence[FeatureMap], **fields) -> None:
    """ConfigError when the neck cannot work on these maps; the default accepts any."""
    del encoder, encoder_features, fields
