"""FCN-32s/16s/8s (Long, Shelhamer & Darrell, 2015) on an ImageNet VGG16 / VGG16-BN encoder.

The paper's fine-tuning set-up: the VGG16 convolutions (the `encoder` submodule, torchvision layout) and
fc6/fc7 come from the ImageNet classifier, fc6 and fc7 "convolutionalised" (torchvision's Linear 25088 -> 4096
reshaped into a 7x7 convolution on pool5, Linear 4096 -> 4096 into a 1x1 one; `with_pretrained_classifier`);
all score layers (score_fr, score_pool4, score_pool3) start at zero and the up-samplings bilinear. The head is jaxseg.models.fcn's (`fcn_scores`),
shared with the from-scratch FCN, so the parameters are the same layers under the same names, with the 13
VGG convolutions under params['encoder'].
"""

import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models import layers
from jaxseg.models.encoders import registry as encoder_registry
from jaxseg.models.fcn import check_variant, fcn_scores, same_conv

VGG_ENCODERS = ('vgg16', 'vgg16_bn')
FC_WIDTH = 4096
FC6_KERNEL = 7
# torchvision's Linear init of the classifier (nn.init.normal_(0, 0.01)): fc6/fc7 without a pretrained classifier.
FC_INIT = nn.initializers.normal(0.01)


class FCNVGG16(nn.Module):
  """FCN on an ImageNet VGG16(-BN): images [N, H, W, 3] (ImageNet-normalised) -> logits [N, H, W, num_classes].

  Attributes:
    num_classes: number of output classes.
    variant: 'fcn32s', 'fcn16s' or 'fcn8s'.
    encoder_name: 'vgg16' or 'vgg16_bn' (the encoder submodule; fc6/fc7 have no BatchNorm in either, as
      torchvision's classifier).
    dropout_rate: dropout after fc6 and fc7 (0.5 as the paper and torchvision's classifier).
    frozen_bn: vgg16_bn's BatchNorm uses its running statistics also in training (state.py sets it from
      config.finetune.freeze_encoder_batch_stats).
    dtype: computation dtype; parameters stay float32.
  Any input size works: the input is zero-padded to a multiple of 32 and the logits cropped back, fc6 is a
  'SAME' 7x7 convolution (on a 7x7 pool5 map its centre output is exactly the ImageNet Linear layer), computed
  as layers.PatchMatmulConv when pool5 is smaller than 7x7.
  """
  num_classes: int
  variant: str = 'fcn8s'
  encoder_name: str = 'vgg16'
  dropout_rate: float = 0.5
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  size_multiple = 32  # pool5's stride.

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    pools = encoder_registry.create_encoder(self.encoder_name, dtype=self.dtype, frozen_bn=self.frozen_bn,
                                            name=encoder_registry.ENCODER_SUBMODULE)(x, train=train)
    pool3, pool4, pool5 = pools[2], pools[3], pools[4]
    x = pool5
    for name, kernel in (('fc6', FC6_KERNEL), ('fc7', 1)):
      x = nn.relu(same_conv(x, FC_WIDTH, kernel, kernel_init=FC_INIT, dtype=self.dtype, name=name))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # All score layers start at zero (the paper: "We initialize to zero the class scoring layer"), so the
    # net's first output is 0 and fine-tuning starts from the pretrained fc7 features.
    score = fcn_scores(x, pool3, pool4, num_classes=self.num_classes, variant=self.variant, dtype=self.dtype,
                       score_fr_init=nn.initializers.zeros_init())
    return score[:, :h, :w, :]


def build_fcn_vgg16(*, num_classes: int, dtype: Any, variant: str = 'fcn8s', encoder: Optional[str] = 'vgg16',
                    dropout_rate: float = 0.5) -> nn.Module:
  """The 'fcn_vgg16' model of config.model (encoder None: vgg16)."""
  encoder = encoder or 'vgg16'
  if encoder not in VGG_ENCODERS:
    raise ConfigError(f'config.model.encoder={encoder!r}: fcn_vgg16 takes one of {list(VGG_ENCODERS)}')
  check_variant(variant)
  return FCNVGG16(num_classes=num_classes, variant=variant, encoder_name=encoder, dropout_rate=dropout_rate,
                  dtype=dtype)


def with_pretrained_classifier(variables: Mapping[str, Any], classifier: Optional[Mapping[str, Any]],
                               path: str) -> dict[str, Any]:
  """`variables` with params['fc6'], params['fc7'] replaced by the ImageNet classifier's (as Flax conv kernels).

  Args:
    variables: an FCNVGG16's variables (fresh from init).
    classifier: encoders.read_encoder_weights(...).classifier: {'fc6': {'kernel': [7, 7, 512, 4096], 'bias'},
      'fc7': {'kernel': [1, 1, 4096, 4096], 'bias'}}, or None when the file has no classifier.
    path: the weights file, for messages.
  A file without any classifier keys (a features-only backbone) is accepted: fc6/fc7 keep their random
  init and a warning is logged. A file with part of the classifier or wrong shapes is rejected earlier, by
  read_encoder_weights (WeightsError naming the file and keys); a shape that does not fit the model here is a
  WeightsError naming the file.
  """
  if classifier is None:
    logging.warning('encoder weights %s have no classifier (classifier.0/3 or pre_logits.fc1/fc2): fcn_vgg16\'s '
                    'fc6 and fc7 keep their random initialisation', path)
    return dict(variables)
  params = dict(variables['params'])
  for layer in ('fc6', 'fc7'):
    if layer not in params:
      raise WeightsError(f'encoder weights {path}: the model has no params[{layer!r}] for the classifier to go to')
    new = {}
    for leaf, current in params[layer].items():
      value = classifier[layer][leaf]
      if tuple(np.shape(value)) != tuple(np.shape(current)):
        raise WeightsError(f'encoder weights {path}: {layer}/{leaf} is {list(np.shape(value))} in the file, the '
                           f'model has {list(np.shape(current))}')
      new[leaf] = np.asarray(value, dtype=current.dtype)
    params[layer] = new
  return {**variables, 'params': params}
