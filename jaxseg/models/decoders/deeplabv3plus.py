"""The DeepLabV3+ decoder (Chen et al., 2018): segmentation_models_pytorch 0.6's `DeepLabV3PlusDecoder`.

Layers (smp's names, '.' written '_': `decoder.aspp.0.convs.1.0.0.weight` is
params['decoder']['aspp_0_convs_1_0_0']['kernel']):
  decoder.aspp.0: ASPP on the deepest map: a 1x1 conv, three depthwise-separable 3x3 convs (depthwise 3x3 dilated,
    pointwise 1x1) at the atrous rates, image pooling (global mean, 1x1 conv, broadcast back), each with BN and
    ReLU; concatenated (1280 channels), projected by a 1x1 conv + BN + ReLU to 256, dropout 0.5.
  decoder.aspp.1-3: a separable 3x3 conv 256 -> 256, BN, ReLU.
  up-sampling to stride 4 (x4 at output stride 16, x2 at 8), bilinear with align_corners=True (smp's nn.Upsample).
  decoder.block1: the stride-4 map projected to 48 channels by a 1x1 conv + BN + ReLU.
  decoder.block2: concatenation [ASPP, block1] (304 channels), separable 3x3 conv -> 256, BN, ReLU.
All convs are bias-free. The head (1x1 conv with bias, x4 bilinear align_corners=True) is the composition's.

The encoder is dilated to output stride 16 or 8 (config.model.output_stride), which only encoders that can dilate
(ResNets, by smp's make_dilated rule) allow. Atrous rates: the paper's (6, 12, 18) at output stride 16, doubled at
8; smp's default is (12, 24, 36) whatever the stride; `atrous_rates` sets them (no parameter depends on them).
"""

from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.decoders import base

OUTPUT_STRIDES = (8, 16)
PAPER_ATROUS_RATES = (6, 12, 18)  # At output stride 16; doubled at 8.
DECODER_CHANNELS = 256
HIGHRES_CHANNELS = 48


class DeepLabV3PlusDecoder(base.Decoder):
  """smp's DeepLabV3PlusDecoder: {stride: map} -> [N, H/4, W/4, 256]."""
  atrous_rates: Optional[Sequence[int]] = None
  channels: int = DECODER_CHANNELS

  NAME: ClassVar[str] = 'deeplabv3plus'
  FIELDS: ClassVar[tuple[str, ...]] = ('output_stride',)

  @classmethod
  def check(cls, encoder, features, **fields):
    deepest = max(f.stride for f in features)
    if deepest not in OUTPUT_STRIDES:
      raise ConfigError(f'config.model.output_stride={deepest!r}: DeepLabV3+ takes 16 or 8')
    base.require_strides(cls.NAME, encoder, features, (4,))

  def _conv(self, x, features: int, kernel: int, name: str, *, dilation: int = 1, groups: int = 1):
    pad = dilation * (kernel // 2)
    return layers.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                   feature_group_count=groups, use_bias=False, kernel_init=base.DECODER_KERNEL_INIT,
                   dtype=self.dtype, name=name)(x)

  def _separable(self, x, features: int, name: str, dilation: int = 1):
    """smp's SeparableConv2d (bias off): depthwise 3x3 (dilated) `name_0`, pointwise 1x1 `name_1`."""
    x = self._conv(x, x.shape[-1], 3, f'{name}_0', dilation=dilation, groups=x.shape[-1])
    return self._conv(x, features, 1, f'{name}_1')

  def _bn_relu(self, x, name: str):
    return nn.relu(layers.make_norm('batch', train=self.train, dtype=self.dtype)(name=name)(x))

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    output_stride = max(maps)
    rates = self.atrous_rates
    if rates is None:
      rates = tuple(r * 16 // output_stride for r in PAPER_ATROUS_RATES)
    if len(rates) != 3:
      raise ValueError(f'DeepLabV3+ atrous_rates must have 3 entries, got {rates!r}')
    c = self.channels
    x = maps[output_stride]
    # ASPP (decoder.aspp.0).
    branches = [self._bn_relu(self._conv(x, c, 1, 'aspp_0_convs_0_0'), 'aspp_0_convs_0_1')]
    for i, rate in enumerate(rates, start=1):
      y = self._separable(x, c, f'aspp_0_convs_{i}_0', dilation=rate)
      branches.append(self._bn_relu(y, f'aspp_0_convs_{i}_1'))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1); its resize back is a broadcast.
    pooled = self._bn_relu(self._conv(pooled, c, 1, 'aspp_0_convs_4_1'), 'aspp_0_convs_4_2')
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (c,)))
    y = self._bn_relu(self._conv(jnp.concatenate(branches, axis=-1), c, 1, 'aspp_0_project_0'), 'aspp_0_project_1')
    y = nn.Dropout(0.5, deterministic=not self.train)(y)
    # decoder.aspp.1-3, then up to stride 4.
    y = self._bn_relu(self._separable(y, c, 'aspp_1'), 'aspp_2')
    y = layers.upsample_bilinear_align_corners(y, output_stride // 4)
    high = self._bn_relu(self._conv(maps[4], HIGHRES_CHANNELS, 1, 'block1_0'), 'block1_1')
    y = jnp.concatenate([y, high.astype(y.dtype)], axis=-1)
    return self._bn_relu(self._separable(y, c, 'block2_0'), 'block2_1')
