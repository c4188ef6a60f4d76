"""The DINOv2 paper's linear segmentation head ("lin.", Oquab et al., 2023): its repository's BNHead.

On the encoder's deepest map (a ViT: its last returned block's patch tokens, through the final LayerNorm as the
encoder gives them), in eval mode, as dinov2/eval/segmentation's BNHead with input_transform 'resize_concat':
  BatchNorm (`bn`; eps 1e-5, momentum 0.1 as torch's SyncBN) of the C channels;
the 1x1 conv to the classes (BNHead's conv_seg, with bias; its dropout_ratio is 0) is the composition's
segmentation_head, and the logits are resized to the input size (bilinear, align_corners=False), as mmsegmentation
does. The input is not padded. This is the paper's ADE20K / VOC "lin." configuration (dinov2_vit*14_*_linear_config:
backbone out_indices [8, 9, 10, 11], in_index [3], in_channels [C], channels C: the last block, patch tokens only).

class_token=True concatenates the class token, broadcast over the grid (its 1x1 map resized to h x w), after the
patch tokens (2C channels): BNHead with use_cls_token, as the DINOv2 repository's linear depth heads use it
(channels = C * 2); it needs a map that comes with its class token (a ViT's block output, no neck).
The paper's "+ms" setting (the last 4 blocks concatenated, multi-scale test) is not this head.

Flax names: params['decoder']['bn'] (BatchNorm), params['segmentation_head'] (the classifier).
"""

from typing import ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.decoders import base
from jaxseg.models.encoders import base as encoder_base


class LinearDecoder(base.Decoder):
  """BatchNorm of the deepest map's patch tokens (and class token): {stride: map} -> [N, h, w, C or 2C].

  Attributes:
    class_token: concatenate the class token to every patch token (see the module docstring).
  """
  class_token: bool = False

  NAME: ClassVar[str] = 'linear'
  UPSAMPLE: ClassVar[str] = 'resize'
  FIELDS: ClassVar[tuple[str, ...]] = ('class_token',)

  @classmethod
  def check(cls, encoder: str, features: Sequence[encoder_base.FeatureMap], *, class_token: bool = False) -> None:
    """ConfigError when class_token is asked for and the deepest map has none (a CNN, or a ViT through a neck)."""
    if not isinstance(class_token, bool):
      raise ConfigError(f"decoder 'linear': class_token must be True or False, got {class_token!r}")
    if class_token and not features[-1].class_token:
      raise ConfigError(f"decoder 'linear' with class_token reads a ViT's last block output with its class token; "
                        f'encoder {encoder!r} gives maps without class tokens (a CNN, or a ViT through a neck: use '
                        'no neck)')

  @nn.compact
  def __call__(self, maps: dict) -> jnp.ndarray:
    deepest = self.encoder_features[-1]
    x = maps[deepest.stride]
    if deepest.class_token:
      x, cls_token = x.patches, x.class_token
      if self.class_token:
        x = jnp.concatenate([x, jnp.broadcast_to(cls_token[:, None, None, :], x.shape)], axis=-1)
    return layers.make_norm('batch', train=self.train, dtype=self.dtype)(name='bn')(x)
