"""The decoder contract: a Flax module that takes an encoder's maps by stride and declares what it needs.

A decoder module gets the encoder's declared maps (`encoder_features`, strides at the model's output stride) and,
when called, {stride: map}. It says, as class attributes and `check`, what the composition needs to know:

* STRIDES: the encoder maps it reads; `check(encoder, features, **fields)` raises a ConfigError naming the decoder,
  the encoder and the missing stride, or a dilated encoder (a decoder adapts where its reference library does,
  e.g. the UNet's top blocks go without a skip on an encoder whose first map is at stride 4; DeepLabV3+ and FCN
  override `check`: dilation, variants);
* HEAD_KERNEL: the segmentation head's convolution (1 or 3), or None when the decoder gives the logits itself;
* UPSAMPLE: how the head's output reaches the input size: 'align_corners' (smp's UpsamplingBilinear2d on an input
  padded to the coarsest stride) or 'resize' (transformers' interpolate to the input size, no padding);
* EXTRAS: names of encoder-file extras it takes (FCN: VGG's ImageNet classifier, as fc6/fc7);
* FIELDS: the config.model fields it takes, besides `encoder`;
* MODEL_FILE: the layout of the whole-model files its reference publishes (a ModelFile), or None.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.encoders.base import FeatureMap, KeyTable

# smp's initialize_decoder (kaiming_uniform_, fan_in, relu) for decoder convolutions.
DECODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def require_strides(decoder: str, encoder: str, features: Sequence[FeatureMap], strides: Sequence[int]) -> None:
  """ConfigError naming the first of `strides` the encoder's maps lack."""
  have = {f.stride for f in features}
  for stride in strides:
    if stride not in have:
      raise ConfigError(f'decoder {decoder!r} needs a stride-{stride} feature map, which encoder {encoder!r} does '
                        f'not give (its maps are at strides {sorted(have)})')


@dataclasses.dataclass(frozen=True)
class ModelFile:
  """A whole-model file layout (transformers' UperNet: encoder_prefix 'backbone.', encoder_layout 'hf').

  key_table(auxiliary_head) maps the file's other keys to Entries with paths from the model's root.
  """
  encoder_prefix: str
  encoder_layout: str
  key_table: Callable[[bool], KeyTable]


class Decoder(nn.Module):
  """The attributes every decoder has (see the module docstring for the class-level declarations).

  Attributes:
    encoder_features: the maps it reads, finest first: the encoder's at the model's output stride, or the neck's
      where the model has one.
    num_classes: K (for decoders that give logits themselves).
    train: training mode (BatchNorm statistics, dropout).
    dtype: computation dtype; parameters stay float32.
  """
  encoder_features: tuple[FeatureMap, ...]
  num_classes: int = 1
  train: bool = False
  dtype: Any = jnp.float32

  NAME: ClassVar[str] = ''
  STRIDES: ClassVar[tuple[int, ...]] = (32,)
  HEAD_KERNEL: ClassVar[Optional[int]] = 1
  UPSAMPLE: ClassVar[str] = 'align_corners'
  EXTRAS: ClassVar[tuple[str, ...]] = ()
  FIELDS: ClassVar[tuple[str, ...]] = ()
  MODEL_FILE: ClassVar[Optional[ModelFile]] = None

  @classmethod
  def check(cls, encoder: str, features: Sequence[FeatureMap], **fields) -> None:
    """ConfigError when the encoder lacks one of STRIDES or is dilated (its coarsest map finer than 32)."""
    del fields  # The decoders with field-dependent needs override check.
    cls.require_undilated(encoder, features, cls.STRIDES)

  @classmethod
  def require_undilated(cls, encoder: str, features: Sequence[FeatureMap], strides: Sequence[int]) -> None:
    """ConfigError when the encoder lacks one of `strides` or is dilated (its coarsest map finer than 32)."""
    require_strides(cls.NAME, encoder, features, strides)
    if max(f.stride for f in features) != 32:
      raise ConfigError(f'decoder {cls.NAME!r} needs the stride-32 map; encoder {encoder!r} is dilated')

  def channels_at(self, stride: int) -> int:
    return {f.stride: f.channels for f in self.encoder_features}[stride]
