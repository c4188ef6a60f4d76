"""DeepLabV3+ (Chen et al., 2018) on a ResNet: segmentation_models_pytorch 0.6's `DeepLabV3Plus`, layer for layer.

`config.model.name='deeplabv3plus'` (recipe configs/deeplabv3plus_resnet50_scene_parse150.py) builds it;
`config.model.encoder_weights` starts its encoder (the submodule `encoder`) from a torchvision/timm weights file, as for the UNet.

Layers (smp's names, '.' written '_': `decoder.aspp.0.convs.1.0.0.weight` is
params['decoder']['aspp_0_convs_1_0_0']['kernel']):
  encoder: a ResNet dilated at output stride 16 (layer4) or 8 (layer3 and layer4), by smp's rule (every conv of a
    dilated stage dilated, see encoders.resnet.stage_plan).
  decoder.aspp.0: ASPP on the last map: a 1x1 conv, three depthwise-separable 3x3 convs (depthwise 3x3 dilated,
    pointwise 1x1) at the atrous rates, image pooling (global mean, 1x1 conv, broadcast back), each with BN and
    ReLU; concatenated (1280 channels), projected by a 1x1 conv + BN + ReLU to 256, dropout 0.5.
  decoder.aspp.1-3: a separable 3x3 conv 256 -> 256, BN, ReLU.
  up-sampling x4 (output stride 16; x2 at 8) bilinear with align_corners=True, as smp's nn.Upsample.
  decoder.block1: the stride-4 map (layer1) projected to 48 channels by a 1x1 conv + BN + ReLU.
  decoder.block2: concatenation [ASPP, block1] (304 channels), separable 3x3 conv -> 256, BN, ReLU.
  segmentation_head: a 1x1 conv with bias to K classes, bilinear up-sampling x4 (align_corners=True).
All convs but the head's are bias-free. Parameters: 26,677,585 (resnet50, K=1), 26,682,725 (resnet50, K=21),
45,674,853 (resnet101, K=21), smp's counts (tests/test_deeplab.py).

Atrous rates: the paper's (6, 12, 18) at output stride 16, doubled at 8 (the issue's specification). smp's
default is (12, 24, 36) whatever the stride; `atrous_rates` sets them explicitly (no parameter depends on them).
Inputs are zero-padded at the bottom/right to a multiple of the output stride and the logits cropped back (smp
refuses such inputs); on sizes that are multiples the logits are smp's.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import registry as encoder_registry

DEEPLAB_ENCODERS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
OUTPUT_STRIDES = (8, 16)
PAPER_ATROUS_RATES = (6, 12, 18)  # At output stride 16; doubled at 8.
DECODER_CHANNELS = 256
HIGHRES_CHANNELS = 48
# smp's initialize_decoder (kaiming_uniform_, fan_in, relu; depthwise fan_in = 9) and initialize_head.
DECODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
HEAD_KERNEL_INIT = nn.initializers.xavier_uniform()


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights of torch's bilinear resize with align_corners=True."""
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1 or n_out == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(src).astype(int), n_in - 2)
  frac = (src - lo).astype(np.float32)
  m[np.arange(n_out), lo] = 1.0 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m


def upsample_bilinear_align_corners(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """[N, H, W, C] -> [N, factor*H, factor*W, C]: torch's nn.Upsample(bilinear, align_corners=True).

  jax.image.resize's 'bilinear' is align_corners=False (half-pixel centres), not what smp uses here.
  """
  _, h, w, _ = x.shape
  mh = jnp.asarray(_align_corners_matrix(h, factor * h), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(w, factor * w), x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', mh, x, mw)


class DeepLabV3PlusDecoder(nn.Module):
  """smp's DeepLabV3PlusDecoder: features (5 maps, finest first) -> [N, H/4, W/4, 256]."""
  atrous_rates: Sequence[int]
  output_stride: int = 16
  channels: int = DECODER_CHANNELS
  train: bool = False
  dtype: Any = jnp.float32

  def _conv(self, x, features: int, kernel: int, name: str, *, dilation: int = 1, groups: int = 1):
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                   feature_group_count=groups, use_bias=False, kernel_init=DECODER_KERNEL_INIT, dtype=self.dtype,
                   name=name)(x)

  def _separable(self, x, features: int, name: str, dilation: int = 1):
    """smp's SeparableConv2d (bias off): depthwise 3x3 (dilated) `name_0`, pointwise 1x1 `name_1`."""
    x = self._conv(x, x.shape[-1], 3, f'{name}_0', dilation=dilation, groups=x.shape[-1])
    return self._conv(x, features, 1, f'{name}_1')

  def _bn_relu(self, x, name: str):
    return nn.relu(layers.make_norm('batch', train=self.train, dtype=self.dtype)(name=name)(x))

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> jnp.ndarray:
    c = self.channels
    x = features[-1]
    # ASPP (decoder.aspp.0).
    branches = [self._bn_relu(self._conv(x, c, 1, 'aspp_0_convs_0_0'), 'aspp_0_convs_0_1')]
    for i, rate in enumerate(self.atrous_rates, start=1):
      y = self._separable(x, c, f'aspp_0_convs_{i}_0', dilation=rate)
      branches.append(self._bn_relu(y, f'aspp_0_convs_{i}_1'))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1); its resize back is a broadcast.
    pooled = self._bn_relu(self._conv(pooled, c, 1, 'aspp_0_convs_4_1'), 'aspp_0_convs_4_2')
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (c,)))
    y = self._bn_relu(self._conv(jnp.concatenate(branches, axis=-1), c, 1, 'aspp_0_project_0'), 'aspp_0_project_1')
    y = nn.Dropout(0.5, deterministic=not self.train)(y)
    # decoder.aspp.1-3, then up to stride 4.
    y = self._bn_relu(self._separable(y, c, 'aspp_1'), 'aspp_2')
    y = upsample_bilinear_align_corners(y, 4 if self.output_stride == 16 else 2)
    high = self._bn_relu(self._conv(features[1], HIGHRES_CHANNELS, 1, 'block1_0'), 'block1_1')
    y = jnp.concatenate([y, high.astype(y.dtype)], axis=-1)
    return self._bn_relu(self._separable(y, c, 'block2_0'), 'block2_1')


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+: images [N, H, W, 3] (normalised) -> logits [N, H, W, num_classes].

  Attributes:
    num_classes: K.
    encoder_name: one of DEEPLAB_ENCODERS.
    output_stride: 16 (layer4 dilated) or 8 (layer3 and layer4).
    atrous_rates: the ASPP's three rates; None: (6, 12, 18) at stride 16, (12, 24, 36) at 8.
    frozen_bn: the encoder's BatchNorm layers use their running statistics also in training and never update
      them (state.build_model sets it from config.finetune.freeze_encoder_batch_stats).
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  encoder_name: str = 'resnet50'
  output_stride: int = 16
  atrous_rates: Optional[Sequence[int]] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @property
  def size_multiple(self) -> int:
    """Inputs are padded to a multiple of the encoder's coarsest stride."""
    return self.output_stride

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    rates = self.atrous_rates
    if rates is None:
      rates = tuple(r * 16 // self.output_stride for r in PAPER_ATROUS_RATES)
    if len(rates) != 3:
      raise ValueError(f'DeepLabV3+ atrous_rates must have 3 entries, got {rates!r}')
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    features = encoder_registry.create_encoder(
        self.encoder_name, dtype=self.dtype, output_stride=self.output_stride, frozen_bn=self.frozen_bn,
        dilation_rule='smp', name=encoder_registry.ENCODER_SUBMODULE)(x, train=train)
    y = DeepLabV3PlusDecoder(tuple(rates), self.output_stride, train=train, dtype=self.dtype,
                             name='decoder')(features)
    y = nn.Conv(self.num_classes, (1, 1), kernel_init=HEAD_KERNEL_INIT, dtype=self.dtype,
                name='segmentation_head')(y)
    y = upsample_bilinear_align_corners(y, 4)
    return y[:, :h, :w, :]


def build_deeplabv3plus(*, num_classes: int, dtype: Any, encoder: Optional[str] = 'resnet50',
                        output_stride: int = 16) -> nn.Module:
  """config.model (name 'deeplabv3plus'; recipe configs/deeplabv3plus_resnet50_scene_parse150.py) -> DeepLabV3Plus."""
  if encoder not in DEEPLAB_ENCODERS:
    raise ConfigError(f'config.model.encoder={encoder!r}: DeepLabV3+ takes one of {list(DEEPLAB_ENCODERS)}')
  if output_stride not in OUTPUT_STRIDES:
    raise ConfigError(f'config.model.output_stride={output_stride!r}: DeepLabV3+ takes 16 or 8')
  return DeepLabV3Plus(num_classes=num_classes, encoder_name=encoder, output_stride=output_stride, dtype=dtype)
