"""The UPerNet decoder (Xiao et al., 2018) as Hugging Face transformers' `UperNetForSemanticSegmentation`.

On the encoder's stride 4, 8, 16 and 32 maps (transformers' backbone feature maps, `decode_head`):
  psp_modules: the stride-32 map average-pooled to 1x1, 2x2, 3x3 and 6x6 (adaptive, as torch), each a 1x1
    ConvModule to 512 (conv without bias, BatchNorm, ReLU) resized back (bilinear, align_corners=False);
  bottleneck: [stride-32 map, the four pooled maps] -> 3x3 ConvModule to 512 (the top lateral);
  lateral_convs 0-2: 1x1 ConvModules of the stride 4, 8, 16 maps to 512; top-down, each lateral plus the
    coarser one resized to its size; fpn_convs 0-2: 3x3 ConvModules on them;
  fpn_bottleneck: the four levels resized to stride 4 and concatenated (2048) -> 3x3 ConvModule to 512.
The head (transformers' decode_head.classifier, a 1x1 conv with bias) is the composition's, and the logits are
resized to the input size (bilinear, align_corners=False); the input is not padded (any size works, as
transformers'). The auxiliary FCN head on the stride-16 map (transformers' auxiliary_head) is the composition's
option `auxiliary_head`.

`hf_key_table` maps a whole UperNetForSemanticSegmentation state dict (backbone aside) onto the model.
"""

from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.decoders import base
from jaxseg.models.encoders import base as encoder_base

CHANNELS = 512
POOL_SCALES = (1, 2, 3, 6)
STRIDES = (4, 8, 16, 32)


class ConvModule(nn.Module):
  """transformers' UperNetConvModule: conv (no bias, 'same' padding) -> BatchNorm -> ReLU; names conv, batch_norm."""
  features: int
  kernel: int = 1
  train: bool = False
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel // 2
    x = layers.Conv(self.features, (self.kernel, self.kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
                kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype, name='conv')(x)
    x = layers.make_norm('batch', train=self.train, dtype=self.dtype)(name='batch_norm')(x)
    return nn.relu(x)


def add_conv_module(table: encoder_base.KeyTable, key: str, path: tuple[str, ...]) -> None:
  encoder_base.add_conv(table, f'{key}.conv', path + ('conv',))
  encoder_base.add_batch_norm(table, f'{key}.batch_norm', path + ('batch_norm',))


def hf_key_table(auxiliary_head: bool, pool_scales: Sequence[int] = POOL_SCALES) -> encoder_base.KeyTable:
  """transformers' decode_head.* (and auxiliary_head.*) keys -> paths from the model's root.

  decode_head.classifier is the composition's segmentation_head; the auxiliary head's are its auxiliary_head's.
  """
  table: encoder_base.KeyTable = {}
  for j in range(len(pool_scales)):
    add_conv_module(table, f'decode_head.psp_modules.{j}.1', ('decoder', f'psp_modules_{j}_1'))
  add_conv_module(table, 'decode_head.bottleneck', ('decoder', 'bottleneck'))
  for i in range(len(STRIDES) - 1):
    add_conv_module(table, f'decode_head.lateral_convs.{i}', ('decoder', f'lateral_convs_{i}'))
    add_conv_module(table, f'decode_head.fpn_convs.{i}', ('decoder', f'fpn_convs_{i}'))
  add_conv_module(table, 'decode_head.fpn_bottleneck', ('decoder', 'fpn_bottleneck'))
  encoder_base.add_conv(table, 'decode_head.classifier', ('segmentation_head',), bias=True)
  if auxiliary_head:
    add_conv_module(table, 'auxiliary_head.convs.0', ('auxiliary_head', 'convs_0'))
    encoder_base.add_conv(table, 'auxiliary_head.classifier', ('auxiliary_head', 'classifier'), bias=True)
  return table


class UPerNetDecoder(base.Decoder):
  """transformers' UperNetHead without its classifier: {stride: map} -> [N, H/4, W/4, channels].

  Attributes:
    channels: the width of every ConvModule (transformers' UperNetConfig.hidden_size, 512).
    pool_scales: the pyramid pooling's output sizes.
  """
  channels: int = CHANNELS
  pool_scales: Sequence[int] = POOL_SCALES

  STRIDES: ClassVar[tuple[int, ...]] = STRIDES
  NAME: ClassVar[str] = 'upernet'
  FIELDS: ClassVar[tuple[str, ...]] = ('channels',)
  UPSAMPLE: ClassVar[str] = 'resize'
  MODEL_FILE: ClassVar[Optional[base.ModelFile]] = base.ModelFile('backbone.', 'hf', hf_key_table)

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    def conv(x, kernel, name):
      return ConvModule(self.channels, kernel, train=self.train, dtype=self.dtype, name=name)(x)

    top = maps[32]
    psp = [top]
    for j, scale in enumerate(self.pool_scales):
      pooled = conv(layers.adaptive_avg_pool(top, scale), 1, f'psp_modules_{j}_1')
      psp.append(layers.resize_bilinear(pooled, top.shape[1:3]))
    laterals = [conv(maps[s], 1, f'lateral_convs_{i}') for i, s in enumerate(STRIDES[:-1])]
    laterals.append(conv(jnp.concatenate(psp, axis=-1), 3, 'bottleneck'))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + layers.resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(laterals[i], 3, f'fpn_convs_{i}') for i in range(len(laterals) - 1)] + [laterals[-1]]
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [layers.resize_bilinear(o, size) for o in outs[1:]]
    return conv(jnp.concatenate(outs, axis=-1), 3, 'fpn_bottleneck')


class AuxiliaryHead(nn.Module):
  """transformers' UperNetFCNHead (mmsegmentation's FCNHead, one conv): a map -> class logits at its stride.

  A 3x3 ConvModule to 256 channels (`convs_0`), then a 1x1 conv with bias (`classifier`).
  """
  num_classes: int
  channels: int = 256
  train: bool = False
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvModule(self.channels, 3, train=self.train, dtype=self.dtype, name='convs_0')(x)
    return layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
