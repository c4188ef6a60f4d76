"""Fully convolutional networks (Long, Shelhamer & Darrell, 2015): FCN-32s, FCN-16s and FCN-8s on VGG16."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders.vgg import VGG16_BLOCKS

VARIANTS = ('fcn32s', 'fcn16s', 'fcn8s')


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


def check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ConfigError(f'config.model.variant={variant!r}: FCN takes one of {list(VARIANTS)}')


def same_conv(x, features: int, kernel: int, *, name: str, **conv_kwargs):
  """A stride-1 'SAME' kernel x kernel convolution (fc6, fc7); call inside a compact method (a submodule `name`).

  On a map smaller than its kernel (fc6 on small images) it is layers.PatchMatmulConv, the same function and
  parameters as a matrix product, which XLA:CPU runs far faster than a convolution that is mostly padding.
  """
  if kernel > min(x.shape[1:3]):
    return layers.PatchMatmulConv(features, (kernel, kernel), name=name, **conv_kwargs)(x)
  return nn.Conv(features, (kernel, kernel), padding='SAME', name=name, **conv_kwargs)(x)


def fcn_scores(x, pool3, pool4, *, num_classes: int, variant: str, dtype: Any,
               score_fr_init=nn.initializers.lecun_normal()):
  """FCN's head from fc7's output (stride 32) and the pool3/pool4 maps: scores at the input's (padded) size.

  Call inside a compact method: it adds the submodules score_fr, and for fcn16s/fcn8s upscore2 and
  score_pool4, and for fcn8s upscore_pool4 and score_pool3 (the paper's names). The 2x up-samplings are
  learnable 4x4 stride-2 transposed convs initialised to bilinear; the skip scores are zero-initialised so
  training starts from the coarser net's output (as in the paper); the final x32/x16/x8 up-sampling is a
  fixed bilinear resize. score_fr_init: score_fr's kernel init (zeros for a pretrained net, as the paper).
  """
  score = nn.Conv(num_classes, (1, 1), kernel_init=score_fr_init, dtype=dtype, name='score_fr')(x)

  def up2(s, name):
    return nn.ConvTranspose(num_classes, (4, 4), strides=(2, 2), padding='SAME', use_bias=False,
                            kernel_init=layers.bilinear_kernel_init, dtype=dtype, name=name)(s)

  def skip_score(feat, name):
    return nn.Conv(num_classes, (1, 1), kernel_init=nn.initializers.zeros_init(), dtype=dtype, name=name)(feat)

  stride = 32
  if variant in ('fcn16s', 'fcn8s'):
    score = up2(score, 'upscore2') + skip_score(pool4, 'score_pool4')
    stride = 16
  if variant == 'fcn8s':
    score = up2(score, 'upscore_pool4') + skip_score(pool3, 'score_pool3')
    stride = 8
  n, sh, sw, c = score.shape
  return jax.image.resize(score, (n, sh * stride, sw * stride, c), 'bilinear')
