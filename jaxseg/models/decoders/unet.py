"""The UNet decoder of segmentation_models_pytorch (smp 0.6's `Unet`), on any encoder's maps.

Five blocks (`block0..4`, channels 256, 128, 64, 32, 16) each up-sample x2 (nearest), concatenate the encoder's
map at the stride they reach when the encoder has one, and apply two (3x3 conv -> BN -> ReLU): from the stride-32
map to stride 16, 8, 4, 2 and 1 (smp's centre block off, as for its ResNets). An encoder whose first map is at
stride 4 (ConvNeXt) gives no skip to the last two blocks, as smp does for such encoders. The head is a 3x3
convolution with bias at stride 1.
"""

from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.decoders import base

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Module):
  """smp's DecoderBlock: nearest 2x up-sampling, concatenate the skip, two (3x3 conv -> BN -> ReLU).

  The convs have no bias (smp's Conv2dReLU with BatchNorm); names conv1/bn1, conv2/bn2.
  """
  features: int
  train: bool = False
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, skip: Optional[jnp.ndarray]):
    x = layers.upsample_nearest_2x(x)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    make_norm = layers.make_norm('batch', train=self.train, dtype=self.dtype)
    for i in (1, 2):
      x = layers.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(make_norm(name=f'bn{i}')(x))
    return x


class UNetDecoder(base.Decoder):
  """smp's UnetDecoder: {stride: map} -> [N, H, W, 16] at stride 1 (see the module docstring)."""
  decoder_channels: Sequence[int] = DECODER_CHANNELS

  STRIDES: ClassVar[tuple[int, ...]] = (32,)
  NAME: ClassVar[str] = 'unet'
  HEAD_KERNEL: ClassVar[Optional[int]] = 3

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    if len(self.decoder_channels) != 5:
      raise ValueError(f'decoder_channels must have 5 entries (strides 16 to 1), got {self.decoder_channels}')
    y = maps[32]
    for i, channels in enumerate(self.decoder_channels):
      skip = maps.get(32 >> (i + 1))  # Strides 16, 8, 4, 2 (when the encoder has it), then 1 (never).
      y = DecoderBlock(channels, train=self.train, dtype=self.dtype, name=f'block{i}')(y, skip)
    return y
