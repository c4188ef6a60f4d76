"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015): FCN-32s, FCN-16s and FCN-8s on VGG16."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.decoders.fcn import check_variant, fcn_scores, same_conv
from jaxseg.models.encoders.vgg import VGG16_BLOCKS


class FCN(nn.Module):
  """FCN on a VGG16-style backbone: images [N, H, W, C] -> logits [N, H, W, num_classes].

  Attributes:
    num_classes: number of output classes.
    variant: 'fcn32s', 'fcn16s' or 'fcn8s' (how many skip connections from
      pool4 and pool3 refine the stride-32 scores).
    width_multiplier: scales the VGG conv widths (1.0 = VGG16; smaller for CPU).
    fc_width: channels of fc6/fc7 as convolutions (4096 in the paper).
    fc6_kernel: spatial size of fc6 (7 in the paper).
    dropout_rate: dropout after fc6 and fc7 (0.5 in the paper).
    norm: 'none' (the paper's VGG16) or 'batch' (VGG16-BN: BatchNorm after
      every backbone conv and fc6/fc7, which trains from scratch far faster).
    dtype: computation dtype; parameters stay float32.
  Uses 'same' padding instead of the paper's pad-100-and-crop, so the score
  maps align exactly; the input is zero-padded to a multiple of 32 and the
  logits are cropped back. The 2x up-samplings between skips are learnable
  transposed convs initialised to bilinear (as the paper); the final
  up-sampling is a fixed bilinear resize.
  """
  num_classes: int
  variant: str = 'fcn8s'
  width_multiplier: float = 1.0
  fc_width: int = 4096
  fc6_kernel: int = 7
  dropout_rate: float = 0.5
  norm: str = 'none'
  dtype: Any = jnp.float32

  size_multiple = 32  # pool5's stride.

  def __post_init__(self):
    check_variant(self.variant)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    # He initialisation: a plain 15-layer ReLU stack trained from scratch keeps its
    # activation scale (the paper started from ImageNet weights instead).
    make_norm = layers.make_norm(self.norm, train=train, dtype=self.dtype)

    def conv_relu(x, feats, kernel, name):
      x = same_conv(x, feats, kernel, use_bias=self.norm == 'none', dtype=self.dtype,
                    kernel_init=nn.initializers.kaiming_normal(), name=name)
      return nn.relu(make_norm(name=f'{name}_norm')(x))

    pools = []
    for b, (n_convs, width) in enumerate(VGG16_BLOCKS):
      feats = max(1, int(round(width * self.width_multiplier)))
      for i in range(n_convs):
        x = conv_relu(x, feats, 3, f'conv{b + 1}_{i + 1}')
      x = layers.max_pool_2x2(x)
      pools.append(x)
    pool3, pool4 = pools[2], pools[3]
    x = conv_relu(x, self.fc_width, self.fc6_kernel, 'fc6')
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = conv_relu(x, self.fc_width, 1, 'fc7')
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    score = fcn_scores(x, pool3, pool4, num_classes=self.num_classes, variant=self.variant, dtype=self.dtype)
    return score[:, :h, :w, :]
