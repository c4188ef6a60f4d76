"""UNet (Ronneberger et al., 2015) with 'same' padding, as most modern reimplementations use."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxseg.models import layers


class DoubleConv(nn.Module):
  """(3x3 conv -> norm -> ReLU) twice; convs have no bias when a norm follows."""
  features: int
  norm: str
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    make_norm = layers.make_norm(self.norm, train=self.train, dtype=self.dtype)
    for i in range(2):
      x = layers.Conv(self.features, (3, 3), padding='SAME', use_bias=self.norm == 'none', dtype=self.dtype,
                  name=f'conv{i}')(x)
      x = make_norm(name=f'norm{i}')(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """UNet: images [N, H, W, C] -> logits [N, H, W, num_classes].

  Attributes:
    num_classes: number of output classes.
    base_width: channels of the first level; each down-step doubles them.
    depth: number of down-steps (the paper uses 4).
    norm: 'batch' (paper-era reimplementations), 'group' or 'none'.
    upsample: 'transpose' (2x2 stride-2 transposed conv, as the paper) or
      'bilinear' (bilinear resize then 1x1 conv halving the channels).
    dtype: computation dtype (e.g. bfloat16); parameters stay float32.
  Any input size is accepted: it is zero-padded to a multiple of 2**depth and
  the logits are cropped back to the input size.
  """
  num_classes: int
  base_width: int = 64
  depth: int = 4
  norm: str = 'batch'
  upsample: str = 'transpose'
  dtype: Any = jnp.float32

  @property
  def size_multiple(self) -> int:
    """Inputs are padded to a multiple of this: one per down-step halving."""
    return 2 ** self.depth

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    block = lambda feats, name: DoubleConv(feats, self.norm, train, self.dtype, name=name)
    skips = []
    x = block(self.base_width, 'enc0')(x)
    for level in range(1, self.depth + 1):
      skips.append(x)
      x = layers.max_pool_2x2(x)
      x = block(self.base_width * 2 ** level, f'enc{level}')(x)
    for level in reversed(range(self.depth)):
      feats = self.base_width * 2 ** level
      if self.upsample == 'transpose':
        x = layers.UpConv2x2(feats, dtype=self.dtype, name=f'up{level}')(x)
      elif self.upsample == 'bilinear':
        n, hh, ww, c = x.shape
        x = jax.image.resize(x, (n, 2 * hh, 2 * ww, c), 'bilinear')
        x = layers.Conv(feats, (1, 1), dtype=self.dtype, name=f'up{level}')(x)
      else:
        raise ValueError(f"model.upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = block(feats, f'dec{level}')(x)
    x = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head')(x)
    return x[:, :h, :w, :]
