"""VGG16 and VGG16-BN encoders (Simonyan & Zisserman, 2015) in torchvision's `features` layout.

Conv j of block b is `conv{b}_{j}` (and its BatchNorm `bn{b}_{j}` in VGG16-BN);
`jaxseg.models.encoders.weights` maps torchvision's `features.<index>` keys onto these names.
The classifier (fc6/fc7) is not part of the encoder: the weights loader hands it out separately.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers

# torchvision's cfg 'D': convolutions per block and their widths.
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # torchvision's kaiming_normal_ (fan_out).


def max_pool_2x2_floor(x: jnp.ndarray) -> jnp.ndarray:
  """torch's MaxPool2d(2, 2): odd sizes drop their last row/column."""
  _, h, w, _ = x.shape
  return layers.max_pool_2x2(x[:, :h - h % 2, :w - w % 2])


class VGG(nn.Module):
  """VGG16 (or VGG16-BN) features: images [N, H, W, 3] (normalised) -> the outputs of its 5 max-pools.

  Attributes:
    batch_norm: VGG16-BN (BatchNorm after every conv) instead of VGG16.
    frozen_bn: BatchNorm always uses (and never updates) its running statistics, also when training.
    dtype: computation dtype; parameters stay float32.
  """
  batch_norm: bool = False
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the 5 feature maps (pool1..pool5)."""
    return tuple(width for _, width in VGG16_BLOCKS)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[jnp.ndarray]:
    make_norm = layers.make_norm('batch', train=train and not self.frozen_bn, dtype=self.dtype)
    features = []
    for b, (n_convs, width) in enumerate(VGG16_BLOCKS, start=1):
      for j in range(1, n_convs + 1):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=KERNEL_INIT, dtype=self.dtype,
                    name=f'conv{b}_{j}')(x)
        if self.batch_norm:
          x = make_norm(name=f'bn{b}_{j}')(x)
        x = nn.relu(x)
      x = max_pool_2x2_floor(x)
      features.append(x)
    return features
