"""The FCN decoder (Long, Shelhamer & Darrell, 2015): fc6/fc7 on the stride-32 map, then FCN-32s/16s/8s scores.

On an encoder (FCN on VGG16 / VGG16-BN as the paper, config.model.name 'fcn' with an encoder, or the recipe name
'fcn_vgg16'): fc6 (a 'SAME' 7x7 convolution to 4096 channels) and fc7 (1x1, 4096), each with ReLU and dropout,
on the stride-32 map; the score layers of `fcn_scores` on fc7 and the stride-16 (pool4) and stride-8 (pool3)
maps. The paper's fine-tuning set-up: fc6/fc7 start from the ImageNet classifier when the encoder's weight file
has one (VGG's extras 'classifier': torchvision's Linear 25088 -> 4096 is exactly the 7x7 convolution at the
centre of a 7x7 pool5 map, `take_extras`), else from torchvision's Linear init (normal, std 0.01); all score
layers start at zero. The decoder gives the logits itself (no segmentation head).

Also here: the score layers and fc6's convolution, shared with the from-scratch FCN (models/fcn.py).
"""

import logging
from typing import Any, ClassVar, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models import layers
from jaxseg.models.decoders import base

VARIANTS = ('fcn32s', 'fcn16s', 'fcn8s')
FC_WIDTH = 4096
FC6_KERNEL = 7
# torchvision's Linear init of the classifier (nn.init.normal_(0, 0.01)): fc6/fc7 without a pretrained classifier.
FC_INIT = nn.initializers.normal(0.01)


def check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ConfigError(f'config.model.variant={variant!r}: FCN takes one of {list(VARIANTS)}')


def same_conv(x, features: int, kernel: int, *, name: str, **conv_kwargs):
  """A stride-1 'SAME' kernel x kernel convolution (fc6, fc7); call inside a compact method (a submodule `name`).

  On a map smaller than its kernel (fc6 on small images) it is layers.PatchMatmulConv, the same function and
  parameters as a matrix product, which XLA:CPU runs far faster than a convolution that is mostly padding. A map of
  symbolic size (an export for any image size) takes the convolution, which holds for every size.
  """
  if all(isinstance(d, int) for d in x.shape[1:3]) and kernel > min(x.shape[1:3]):
    return layers.PatchMatmulConv(features, (kernel, kernel), name=name, **conv_kwargs)(x)
  return layers.Conv(features, (kernel, kernel), padding='SAME', name=name, **conv_kwargs)(x)


def fcn_scores(x, pool3, pool4, *, num_classes: int, variant: str, dtype: Any,
               score_fr_init=nn.initializers.lecun_normal()):
  """FCN's head from fc7's output (stride 32) and the pool3/pool4 maps: scores at the input's (padded) size.

  Call inside a compact method: it adds the submodules score_fr, and for fcn16s/fcn8s upscore2 and
  score_pool4, and for fcn8s upscore_pool4 and score_pool3 (the paper's names). The 2x up-samplings are
  learnable 4x4 stride-2 transposed convs initialised to bilinear; the skip scores are zero-initialised so
  training starts from the coarser net's output (as in the paper); the final x32/x16/x8 up-sampling is a
  fixed bilinear resize. score_fr_init: score_fr's kernel init (zeros for a pretrained net, as the paper).
  """
  score = layers.Conv(num_classes, (1, 1), kernel_init=score_fr_init, dtype=dtype, name='score_fr')(x)

  def up2(s, name):
    return nn.ConvTranspose(num_classes, (4, 4), strides=(2, 2), padding='SAME', use_bias=False,
                            kernel_init=layers.bilinear_kernel_init, dtype=dtype, name=name)(s)

  def skip_score(feat, name):
    return layers.Conv(num_classes, (1, 1), kernel_init=nn.initializers.zeros_init(), dtype=dtype, name=name)(feat)

  stride = 32
  if variant in ('fcn16s', 'fcn8s'):
    score = up2(score, 'upscore2') + skip_score(pool4, 'score_pool4')
    stride = 16
  if variant == 'fcn8s':
    score = up2(score, 'upscore_pool4') + skip_score(pool3, 'score_pool3')
    stride = 8
  n, sh, sw, c = score.shape
  return jax.image.resize(score, (n, sh * stride, sw * stride, c), 'bilinear')


class FCNDecoder(base.Decoder):
  """fc6, fc7 and the FCN score layers: {stride: map} -> logits at the (padded) input size.

  Attributes:
    variant: 'fcn32s', 'fcn16s' or 'fcn8s'.
    dropout_rate: dropout after fc6 and fc7 (0.5 as the paper and torchvision's classifier).
  """
  variant: str = 'fcn8s'
  dropout_rate: float = 0.5

  NAME: ClassVar[str] = 'fcn'
  HEAD_KERNEL: ClassVar[Optional[int]] = None
  EXTRAS: ClassVar[tuple[str, ...]] = ('classifier',)
  FIELDS: ClassVar[tuple[str, ...]] = ('variant', 'dropout_rate')

  @classmethod
  def check(cls, encoder, features, *, variant='fcn8s', dropout_rate=0.5):
    check_variant(variant)
    needed = {'fcn32s': (32,), 'fcn16s': (16, 32)}.get(variant, (8, 16, 32))
    cls.require_undilated(encoder, features, needed)

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    x = maps[32]
    for name, kernel in (('fc6', FC6_KERNEL), ('fc7', 1)):
      x = nn.relu(same_conv(x, FC_WIDTH, kernel, kernel_init=FC_INIT, dtype=self.dtype, name=name))
      x = nn.Dropout(self.dropout_rate, deterministic=not self.train)(x)
    # All score layers start at zero (the paper: "We initialize to zero the class scoring layer"), so the
    # net's first output is 0 and fine-tuning starts from the pretrained fc7 features.
    return fcn_scores(x, maps.get(8), maps.get(16), num_classes=self.num_classes, variant=self.variant,
                      dtype=self.dtype, score_fr_init=nn.initializers.zeros_init())

  @staticmethod
  def take_extras(params: Mapping[str, Any], extras: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The decoder's params with fc6/fc7 from the file's ImageNet classifier (extras['classifier']).

    A file without a classifier (a features-only backbone) leaves them random, with a logged warning; a shape
    that does not fit the model (an encoder other than VGG16's 512 channels) is a WeightsError naming the file.
    """
    classifier = extras.get('classifier')
    if classifier is None:
      logging.warning('encoder weights %s have no classifier (classifier.0/3 or pre_logits.fc1/fc2): the FCN\'s '
                      'fc6 and fc7 keep their random initialisation', path)
      return dict(params)
    params = dict(params)
    for layer in ('fc6', 'fc7'):
      new = {}
      for leaf, current in params[layer].items():
        value = classifier[layer][leaf]
        if tuple(np.shape(value)) != tuple(np.shape(current)):
          raise WeightsError(f'encoder weights {path}: {layer}/{leaf} is {list(np.shape(value))} in the file, the '
                             f'model has {list(np.shape(current))}')
        new[leaf] = np.asarray(value, dtype=current.dtype)
      params[layer] = new
    return params
