"""SegFormer's all-MLP decode head (Xie et al., 2021) as Hugging Face transformers' `SegformerDecodeHead`.

On the encoder's stride 4, 8, 16 and 32 maps (transformers' SegformerModel hidden states), in eval mode:
  linear_c 0-3: each map a Linear (with bias) to `channels` (transformers' SegformerMLP `proj`), resized to the
    stride-4 map's size (bilinear, align_corners=False; the stride-4 one stays as it is);
  concatenated coarsest first (stride 32, 16, 8, 4: transformers' `all_hidden_states[::-1]`), then
  linear_fuse: a 1x1 conv without bias to `channels`, BatchNorm (eps 1e-5, momentum 0.1 as torch's), ReLU;
  dropout (transformers' classifier_dropout_prob 0.1, element-wise as torch's nn.Dropout; training only).
The classifier (transformers' decode_head.classifier, a 1x1 conv with bias) is the composition's
segmentation_head; its stride-4 logits are resized to the input size (bilinear, align_corners=False), as
transformers' loss and post-processing do (SegformerForSemanticSegmentation itself returns them at stride 4).
The input is not padded: any size works, as transformers'.

`channels` is transformers' decoder_hidden_size: 256 for MiT-B0/B1, 768 for B2-B5 (the MiT encoders' decoder
defaults). Flax names: params['decoder']['linear_c_{i}'] (Dense), ['linear_fuse'] (Conv), ['batch_norm'].

`hf_key_table` maps a whole SegformerForSemanticSegmentation file (nvidia/segformer-b0-finetuned-ade-512-512:
`segformer.encoder.*`, the encoder in its 'hf' layout, and `decode_head.*`) onto the model:

  decode_head.linear_c.{i}.proj.{weight,bias}                   -> decoder/linear_c_{i} (dense)
  decode_head.linear_fuse.weight                                -> decoder/linear_fuse/kernel (conv)
  decode_head.batch_norm.{weight,bias,running_mean,running_var} -> decoder/batch_norm (scale, bias; mean, var)
  decode_head.classifier.{weight,bias}                          -> segmentation_head (conv)

(transformers 5.x names linear_c `linear_projections` in memory; its files, and save_pretrained, keep
linear_c.) SegFormer files have no auxiliary head: a model built with `auxiliary_head` keeps that head's
initialisation.
"""

from typing import ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.decoders import base
from jaxseg.models.encoders import base as encoder_base

CHANNELS = 256
DROPOUT = 0.1
STRIDES = (4, 8, 16, 32)
# transformers' init (normal, initializer_range 0.02) for the linear_c Linears.
LINEAR_INIT = nn.initializers.normal(stddev=0.02)


def hf_key_table(auxiliary_head: bool) -> encoder_base.KeyTable:
  """transformers' decode_head.* keys -> paths from the model's root (classifier: the segmentation_head).

  auxiliary_head: SegFormer files have none, so the table is the same either way.
  """
  del auxiliary_head
  table: encoder_base.KeyTable = {}
  for i in range(len(STRIDES)):
    encoder_base.add_dense(table, f'decode_head.linear_c.{i}.proj', ('decoder', f'linear_c_{i}'))
  encoder_base.add_conv(table, 'decode_head.linear_fuse', ('decoder', 'linear_fuse'))
  encoder_base.add_batch_norm(table, 'decode_head.batch_norm', ('decoder', 'batch_norm'))
  encoder_base.add_conv(table, 'decode_head.classifier', ('segmentation_head',), bias=True)
  return table


class SegFormerDecoder(base.Decoder):
  """transformers' SegformerDecodeHead without its classifier: {stride: map} -> [N, H/4, W/4, channels].

  Attributes:
    channels: the head's width (transformers' decoder_hidden_size: 256 on MiT-B0/B1, 768 on B2-B5).
    dropout_rate: dropout before the classifier, in training (transformers' classifier_dropout_prob).
  """
  channels: int = CHANNELS
  dropout_rate: float = DROPOUT

  STRIDES: ClassVar[tuple[int, ...]] = STRIDES
  NAME: ClassVar[str] = 'segformer'
  FIELDS: ClassVar[tuple[str, ...]] = ('channels', 'dropout_rate')
  UPSAMPLE: ClassVar[str] = 'resize'
  HEAD_KERNEL: ClassVar[Optional[int]] = 1
  MODEL_FILE: ClassVar[Optional[base.ModelFile]] = base.ModelFile('segformer.', 'hf', hf_key_table)

  @nn.compact
  def __call__(self, maps: dict[int, jnp.ndarray]) -> jnp.ndarray:
    size = maps[STRIDES[0]].shape[1:3]
    projected = []
    for i, stride in enumerate(STRIDES):
      y = nn.Dense(self.channels, kernel_init=LINEAR_INIT, dtype=self.dtype, name=f'linear_c_{i}')(maps[stride])
      projected.append(layers.resize_bilinear(y, size))
    y = layers.Conv(self.channels, (1, 1), use_bias=False, kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype,
                name='linear_fuse')(jnp.concatenate(projected[::-1], axis=-1))
    y = layers.make_norm('batch', train=self.train, dtype=self.dtype)(name='batch_norm')(y)
    y = nn.relu(y)
    return nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
