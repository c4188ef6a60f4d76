"""The FPN decoder of segmentation_models_pytorch (smp 0.6's `FPN`, Kirillov et al.'s panoptic FPN head).

On the encoder's stride 4, 8, 16 and 32 maps (smp's c2..c5):
  p5 = 1x1 conv (with bias) of c5 to 256 channels; p4, p3, p2 = nearest 2x up-sampling of the coarser p plus a
    1x1 conv (with bias) of c4, c3, c2 (`p{k}_skip_conv`);
  seg_blocks 0-3 take p5, p4, p3, p2 to stride 4 with 3, 2, 1, 0 up-samplings: each step a 3x3 conv (no bias) to
    128 channels, GroupNorm(32), ReLU, then bilinear 2x up-sampling (align_corners=True); p2's block is one such
    conv without up-sampling;
  merged by addition, then channel dropout (smp's Dropout2d, 0.2).
The head (1x1 conv with bias, x4 bilinear align_corners=True) is the composition's. Names follow smp's keys:
`decoder.seg_blocks.1.block.0.block.0.weight` is params['decoder']['seg_blocks_1_block_0_block_0']['kernel'].
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.decoders import base

PYRAMID_CHANNELS = 256
SEGMENTATION_CHANNELS = 128
DROPOUT = 0.2
STRIDES = (4, 8, 16, 32)


class FPNDecoder(base.Decoder):
  """smp's FPNDecoder (merge policy 'add'): {stride: map} -> [N, H/4, W/4, 128]."""
  pyramid_channels: int = PYRAMID_CHANNELS
  segmentation_channels: int = SEGMENTATION_CHANNELS
  dropout_rate: float = DROPOUT

  STRIDES: ClassVar[tuple[int, ...]] = STRIDES
  NAME: ClassVar[str] = 'fpn'
  FIELDS: ClassVar[tuple[str, ...]] = ('dropout_rate',)

  def _conv(self, x, features: int, kernel: int, name: str, use_bias: bool):
    pad = kernel // 2
    return layers.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                   kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    pyramid = [self._conv(maps[32], self.pyramid_channels, 1, 'p5', use_bias=True)]
    for level, stride in zip((4, 3, 2), (16, 8, 4)):
      skip = self._conv(maps[stride], self.pyramid_channels, 1, f'p{level}_skip_conv', use_bias=True)
      pyramid.append(layers.upsample_nearest_2x(pyramid[-1]) + skip)
    merged = 0
    for i, (p, n_upsamples) in enumerate(zip(pyramid, (3, 2, 1, 0))):
      y = p
      for j in range(max(n_upsamples, 1)):
        y = self._conv(y, self.segmentation_channels, 3, f'seg_blocks_{i}_block_{j}_block_0', use_bias=False)
        y = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                         name=f'seg_blocks_{i}_block_{j}_block_1')(y)
        y = nn.relu(y)
        if n_upsamples:
          y = layers.upsample_bilinear_align_corners(y, 2)
      merged = merged + y
    return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not self.train)(merged)
