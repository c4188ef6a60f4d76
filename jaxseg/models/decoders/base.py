"""The decoder contract: a Flax module that takes an encoder's maps by stride and declares what it needs.

A decoder module gets the encoder's declared maps (`encoder_features`, strides at the model's output stride) and,
when called, {stride: map}. It says, as class attributes and `check`, what the composition needs to know:

* `check(encoder, features, **fields)`: ConfigError when it cannot work on this encoder, naming the decoder, the
  encoder and the missing stride (a decoder adapts where its reference library does, e.g. the UNet's top block
  goes without a skip on an encoder whose first map is at stride 4);
* HEAD_KERNEL: the segmentation head's convolution (1 or 3), or None when the decoder gives the logits itself;
* UPSAMPLE: how the head's output reaches the input size: 'align_corners' (smp's UpsamplingBilinear2d on an input
  padded to the coarsest stride) or 'resize' (transformers' interpolate to the input size, no padding);
* EXTRAS: names of encoder-file extras it takes (FCN: VGG's ImageNet classifier, as fc6/fc7);
* FIELDS: the config.model fields it takes, besides `encoder`;
* MODEL_FILE: (prefix of the encoder's keys, the encoder's layout) of the whole-model files its reference
  publishes (transformers' UperNet: ('backbone.', 'hf')), whose other keys `model_key_table` maps; or None.
"""

from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.encoders.base import FeatureMap

# smp's initialize_decoder (kaiming_uniform_, fan_in, relu) for decoder convolutions.
DECODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def require_strides(decoder: str, encoder: str, features: Sequence[FeatureMap], strides: Sequence[int]) -> None:
  """ConfigError naming the first of `strides` the encoder's maps lack."""
  have = {f.stride for f in features}
  for stride in strides:
    if stride not in have:
      raise ConfigError(f'decoder {decoder!r} needs a stride-{stride} feature map, which encoder {encoder!r} does '
                        f'not give (its maps are at strides {sorted(have)})')


class Decoder(nn.Module):
  """The attributes every decoder has (see the module docstring for the class-level declarations).

  Attributes:
    encoder_features: the encoder's maps at the model's output stride, finest first.
    num_classes: K (for decoders that give logits themselves).
    train: training mode (BatchNorm statistics, dropout).
    dtype: computation dtype; parameters stay float32.
  """
  encoder_features: tuple[FeatureMap, ...]
  num_classes: int = 1
  train: bool = False
  dtype: Any = jnp.float32

  NAME: ClassVar[str] = ''
  HEAD_KERNEL: ClassVar[Optional[int]] = 1
  UPSAMPLE: ClassVar[str] = 'align_corners'
  EXTRAS: ClassVar[tuple[str, ...]] = ()
  FIELDS: ClassVar[tuple[str, ...]] = ()
  MODEL_FILE: ClassVar[Optional[tuple[str, str]]] = None

  @classmethod
  def model_key_table(cls, auxiliary_head: bool):
    """A whole-model file's keys other than the encoder's -> Entry with paths from the model's root."""
    raise NotImplementedError(f'decoder {cls.NAME!r} reads no whole-model files')

  @classmethod
  def check(cls, encoder: str, features: Sequence[FeatureMap], **fields) -> None:
    """ConfigError when this decoder cannot work on these maps or with these fields."""
    raise NotImplementedError

  def channels_at(self, stride: int) -> int:
    return {f.stride: f.channels for f in self.encoder_features}[stride]
