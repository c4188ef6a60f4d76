"""VGG16 and VGG16-BN encoders (Simonyan & Zisserman, 2015) in torchvision's `features` layout.

Conv j of block b is `conv{b}_{j}` (and its BatchNorm `bn{b}_{j}` in VGG16-BN); `key_table` maps torchvision's
(= timm's) `features.<index>` keys onto these names.

The classifier's fc6/fc7 are not part of the encoder: the layout's extras named 'classifier' hand them to a
decoder that asks for them (FCN convolutionalises them), as Flax convolution kernels, from either layout:
torchvision's `classifier.0/3` (Linear 25088 -> 4096 and 4096 -> 4096; fc6 reshaped to a 7x7 convolution on
pool5's [512, 7, 7], channel-major as torchvision flattens it) or timm's `pre_logits.fc1/fc2` (already 7x7 and
1x1 convolutions). The last classifier layer (`classifier.6.*`, timm's `head.fc.*`) is skipped.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import base

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
        x = layers.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=KERNEL_INIT, dtype=self.dtype,
                    name=f'conv{b}_{j}')(x)
        if self.batch_norm:
          x = make_norm(name=f'bn{b}_{j}')(x)
        x = nn.relu(x)
      x = max_pool_2x2_floor(x)
      features.append(x)
    return features


# ---- The weight table, the classifier extras and the registered encoders. ----

# VGG's fc6/fc7 as the two layouts store them: key -> (layer, Flax leaf, shape in the file).
CLASSIFIER_KEYS = {
    'torchvision': {
        'classifier.0.weight': ('fc6', 'kernel', (4096, 512 * 7 * 7)),
        'classifier.0.bias': ('fc6', 'bias', (4096,)),
        'classifier.3.weight': ('fc7', 'kernel', (4096, 4096)),
        'classifier.3.bias': ('fc7', 'bias', (4096,)),
    },
    'timm': {
        'pre_logits.fc1.weight': ('fc6', 'kernel', (4096, 512, 7, 7)),
        'pre_logits.fc1.bias': ('fc6', 'bias', (4096,)),
        'pre_logits.fc2.weight': ('fc7', 'kernel', (4096, 4096, 1, 1)),
        'pre_logits.fc2.bias': ('fc7', 'bias', (4096,)),
    },
}
SKIPPED_KEYS = frozenset({'classifier.6.weight', 'classifier.6.bias', 'head.fc.weight', 'head.fc.bias'})


def key_table(batch_norm: bool) -> base.KeyTable:
  """torchvision's `features` indices: conv[, bn], relu per conv; one max-pool per block."""
  table: base.KeyTable = {}
  index = 0
  for b, (n_convs, _) in enumerate(VGG16_BLOCKS, start=1):
    for j in range(1, n_convs + 1):
      base.add_conv(table, f'features.{index}', (f'conv{b}_{j}',), bias=True)
      index += 1
      if batch_norm:
        base.add_batch_norm(table, f'features.{index}', (f'bn{b}_{j}',))
        index += 1
      index += 1  # ReLU.
    index += 1  # MaxPool2d.
  return table


def read_classifier(state_dict: Mapping[str, Any]) -> tuple[Optional[dict], list[str]]:
  """fc6/fc7 from either layout as HWIO kernels ({'fc6': {'kernel', 'bias'}, 'fc7': ...}), or None; problems."""
  keys = set(state_dict)
  present = {layout: keys & set(table) for layout, table in CLASSIFIER_KEYS.items()}
  if not any(present.values()):
    return None, []
  if all(present.values()):
    return None, ['it has the classifier in both the torchvision (classifier.0/3) and the timm '
                  '(pre_logits.fc1/fc2) layout']
  table = CLASSIFIER_KEYS['timm' if present['timm'] else 'torchvision']
  problems = [f'classifier key {k!r} {list(shape)} missing (the file has the others)'
              for k, (_, _, shape) in table.items() if k not in keys]
  problems += [f'classifier key {k!r} is {list(np.shape(state_dict[k]))} in the file, vgg16 needs {list(shape)}'
               for k, (_, _, shape) in table.items() if k in keys and tuple(np.shape(state_dict[k])) != shape]
  if problems:
    return None, problems
  classifier: dict[str, Any] = {}
  for key, (layer, leaf, _) in table.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if leaf == 'kernel':
      value = value.reshape(4096, -1, 7, 7) if layer == 'fc6' else value.reshape(4096, 4096, 1, 1)
      value = base.to_flax('conv', value)
    classifier.setdefault(layer, {})[leaf] = np.ascontiguousarray(value)
  return classifier, problems


CLASSIFIER = base.Extras('classifier', frozenset(k for t in CLASSIFIER_KEYS.values() for k in t), read_classifier)


def _spec(batch_norm: bool) -> base.EncoderSpec:
  def build(*, output_stride: int = 32, frozen_bn: bool = False, dtype: Any = jnp.float32, **kwargs) -> VGG:
    if output_stride != 32:
      raise ConfigError(f'VGG encoders have output_stride 32 only, got {output_stride!r}')
    return VGG(batch_norm=batch_norm, frozen_bn=frozen_bn, dtype=dtype, **kwargs)

  def layouts() -> tuple[base.WeightLayout, ...]:
    return (base.WeightLayout('torchvision', key_table(batch_norm), skipped=SKIPPED_KEYS, extras=CLASSIFIER),)

  return base.EncoderSpec(
      build=build, layouts=layouts,
      features=tuple(base.FeatureMap(2 ** (b + 1), width) for b, (_, width) in enumerate(VGG16_BLOCKS)))


ENCODERS = {'vgg16': _spec(False), 'vgg16_bn': _spec(True)}
