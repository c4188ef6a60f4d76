"""The DPT decoder (Ranftl et al., 2021) as Hugging Face transformers' DPTNeck convs + fusion stage and its
DPTSemanticSegmentationHead.

On four maps at strides s, 2s, 4s, 8s (on a ViT: the reassemble neck's, models/necks/reassemble.py; s = 3.5 on a
ViT/14), in eval mode:
  convs i        a 3x3 conv without bias (padding 1) of map i to `fusion_hidden_size` (transformers' neck.convs.i);
  fusion layer j coarsest first (transformers' neck.fusion_stage.layers.j, j = 0 on the 8s map):
                   j > 0: the map (`residual`) is resized to the fused map's size where they differ (bilinear,
                     align_corners=False; on odd grids the 2s-upsampled fused map is one pixel larger), then
                     fused = fused + residual_layer1(residual);
                   fused = residual_layer2(fused), then up x2 (bilinear, align_corners=True), then a 1x1 conv with
                   bias (`projection`);
                 a residual layer (transformers' DPTPreActResidualLayer) is x + conv2(relu(conv1(relu(x)))), 3x3
                 convs with bias, or without bias and each followed by BatchNorm where `fusion_batch_norm`
                 (use_batch_norm_in_fusion_residual); the first fusion layer has no residual input, and its
                 residual_layer1 is never run (transformers still builds its weights: `UNUSED_HF_KEYS`);
  head           on the last fused map (stride s/2): 3x3 conv without bias -> BatchNorm (eps 1e-5) -> ReLU ->
                 dropout (transformers' semantic_classifier_dropout 0.1, training only) -> 1x1 conv with bias to the
                 classes -> up x2 (bilinear, align_corners=True): the logits at stride s/4 (transformers'
                 DPTSemanticSegmentationHead, head.head.0/1/4).
The decoder gives the logits itself (no segmentation head); the composition resizes them to the input size
(bilinear, align_corners=False), as transformers' loss does. The input is not padded.

This is what transformers computes for a DINOv2 + DPT segmentation model composed as its DPTForDepthEstimation
composes backbone and neck (Dinov2Backbone with reshape_hidden_states=False, then DPTNeck with patch_height =
H // 14, patch_width = W // 14), with the head of DPTForSemanticSegmentation (tests/test_dinov2.py): no transformers
class is that composition, so no published file has this layout and the decoder reads no whole-model files;
`hf_key_table` maps the keys of the modules composed so onto the model.

Flax names: params['decoder']['convs_i'], ['fusion_stage_layers_j'] with 'projection', 'residual_layer1',
'residual_layer2' (each 'convolution1', 'convolution2' and, with BatchNorm, 'batch_norm1', 'batch_norm2'), and
'head_0', 'head_1' (BatchNorm), 'head_4'.
"""

from typing import ClassVar, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.decoders import base
from jaxseg.models.encoders import base as encoder_base

FUSION_HIDDEN_SIZE = 256
DROPOUT = 0.1
MAPS = 4
# Weights transformers builds but never uses: the first fusion layer's residual_layer1 (it has no residual input).
UNUSED_HF_PREFIX = 'neck.fusion_stage.layers.0.residual_layer1.'


class ResidualLayer(nn.Module):
  """transformers' DPTPreActResidualLayer: x + conv2(relu(conv1(relu(x)))) (each conv + BatchNorm when batch_norm)."""
  features: int
  batch_norm: bool = False
  train: bool = False
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = x
    for k in (1, 2):
      y = nn.relu(y)
      y = layers.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=not self.batch_norm,
                  kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype, name=f'convolution{k}')(y)
      if self.batch_norm:
        y = layers.make_norm('batch', train=self.train, dtype=self.dtype)(name=f'batch_norm{k}')(y)
    return y + x


class FusionLayer(nn.Module):
  """transformers' DPTFeatureFusionLayer (see the module docstring)."""
  features: int
  batch_norm: bool = False
  train: bool = False
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None):
    def residual_layer(name):
      return ResidualLayer(self.features, self.batch_norm, train=self.train, dtype=self.dtype, name=name)

    if residual is not None:
      if residual.shape != x.shape:
        residual = layers.resize_bilinear(residual, x.shape[1:3])
      x = x + residual_layer('residual_layer1')(residual)
    x = residual_layer('residual_layer2')(x)
    x = layers.upsample_bilinear_align_corners(x, 2)
    return layers.Conv(self.features, (1, 1), kernel_init=base.DECODER_KERNEL_INIT, dtype=self.dtype,
                   name='projection')(x)


class DPTDecoder(base.Decoder):
  """DPT's convs, fusion stage and segmentation head: four maps (strides s..8s) -> logits at stride s/4.

  Attributes:
    fusion_hidden_size: the fusion stage's width (transformers' fusion_hidden_size, 256).
    fusion_batch_norm: BatchNorm in the fusion residual layers, whose convs then have no bias (transformers'
      use_batch_norm_in_fusion_residual, False).
    dropout_rate: the head's dropout (transformers' semantic_classifier_dropout, 0.1).
  """
  fusion_hidden_size: int = FUSION_HIDDEN_SIZE
  fusion_batch_norm: bool = False
  dropout_rate: float = DROPOUT

  NAME: ClassVar[str] = 'dpt'
  HEAD_KERNEL: ClassVar[Optional[int]] = None
  UPSAMPLE: ClassVar[str] = 'resize'
  FIELDS: ClassVar[tuple[str, ...]] = ('fusion_hidden_size', 'fusion_batch_norm', 'dropout_rate')

  @classmethod
  def check(cls, encoder: str, features: Sequence[encoder_base.FeatureMap], *,
            fusion_hidden_size: int = FUSION_HIDDEN_SIZE, fusion_batch_norm: bool = False,
            dropout_rate: float = DROPOUT) -> None:
    """ConfigError unless the maps are 4 arrays at strides s, 2s, 4s, 8s (the reassemble neck's on a ViT)."""
    if isinstance(fusion_hidden_size, bool) or not isinstance(fusion_hidden_size, int) or fusion_hidden_size < 1:
      raise ConfigError(f"decoder 'dpt': fusion_hidden_size must be a positive integer, got {fusion_hidden_size!r}")
    if not isinstance(fusion_batch_norm, bool):
      raise ConfigError(f"decoder 'dpt': fusion_batch_norm must be True or False, got {fusion_batch_norm!r}")
    if not 0 <= dropout_rate < 1:
      raise ConfigError(f"decoder 'dpt': dropout_rate must be in [0, 1), got {dropout_rate!r}")
    strides = [f.stride for f in features]
    pyramid = (len(features) == MAPS and not any(f.class_token for f in features)
               and all(b == 2 * a for a, b in zip(strides, strides[1:])))
    if not pyramid:
      vit = any(f.class_token for f in features)
      raise ConfigError(f"decoder 'dpt' reads {MAPS} maps at strides s, 2s, 4s, 8s; encoder {encoder!r} gives "
                        f'{len(features)} at strides {strides}'
                        + (": a ViT's blocks need the neck 'reassemble' (config.model.neck)" if vit else ''))

  @nn.compact
  def __call__(self, maps: dict) -> jnp.ndarray:
    width = self.fusion_hidden_size
    feats = [layers.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=base.DECODER_KERNEL_INIT,
                     dtype=self.dtype, name=f'convs_{i}')(maps[f.stride])
             for i, f in enumerate(self.encoder_features)]
    fused = None
    for j, x in enumerate(reversed(feats)):
      layer = FusionLayer(width, self.fusion_batch_norm, train=self.train, dtype=self.dtype,
                          name=f'fusion_stage_layers_{j}')
      fused = layer(x) if fused is None else layer(fused, x)
    y = layers.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=base.DECODER_KERNEL_INIT,
                dtype=self.dtype, name='head_0')(fused)
    y = nn.relu(layers.make_norm('batch', train=self.train, dtype=self.dtype)(name='head_1')(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
    y = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head_4')(y)
    return layers.upsample_bilinear_align_corners(y, 2)


def hf_key_table(fusion_batch_norm: bool = False) -> encoder_base.KeyTable:
  """transformers' neck.convs.*, neck.fusion_stage.* and head.head.* keys -> paths from the model's root.

  The first fusion layer's residual_layer1 (keys starting with UNUSED_HF_PREFIX) is not in the table: transformers
  never runs it and the decoder has no such weights. The reassemble stage's keys are the neck's
  (necks.reassemble.hf_key_table).
  """
  table: encoder_base.KeyTable = {}
  for i in range(MAPS):
    encoder_base.add_conv(table, f'neck.convs.{i}', ('decoder', f'convs_{i}'))
  for j in range(MAPS):
    layer = ('decoder', f'fusion_stage_layers_{j}')
    encoder_base.add_conv(table, f'neck.fusion_stage.layers.{j}.projection', layer + ('projection',), bias=True)
    for r in ((2,) if j == 0 else (1, 2)):
      key, path = f'neck.fusion_stage.layers.{j}.residual_layer{r}', layer + (f'residual_layer{r}',)
      for k in (1, 2):
        encoder_base.add_conv(table, f'{key}.convolution{k}', path + (f'convolution{k}',), bias=not fusion_batch_norm)
        if fusion_batch_norm:
          encoder_base.add_batch_norm(table, f'{key}.batch_norm{k}', path + (f'batch_norm{k}',))
  encoder_base.add_conv(table, 'head.head.0', ('decoder', 'head_0'))
  encoder_base.add_batch_norm(table, 'head.head.1', ('decoder', 'head_1'))
  encoder_base.add_conv(table, 'head.head.4', ('decoder', 'head_4'), bias=True)
  return table
