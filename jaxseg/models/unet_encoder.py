"""UNet on a pretrained-style encoder: segmentation_models_pytorch's (smp 0.6) Unet decoder on a ResNet.

`config.model.encoder='resnet34'` (with config.model.name='unet') builds this model instead of the plain UNet;
`config.model.encoder_weights=PATH` starts its encoder from a torchvision/timm weights file. Its layers and
parameter counts are smp's `Unet(encoder_name)`: 24,436,369 parameters for resnet34 and 1 class.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.encoders import registry as encoder_registry

# Encoders the UNet takes. smp's VGG encoders feed the decoder their pre-pool maps (and a centre block);
# jaxseg's VGG returns the pool outputs (what FCN needs), so UNet-VGG is not offered.
UNET_ENCODERS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
DECODER_CHANNELS = (256, 128, 64, 32, 16)
# smp's initialize_decoder (kaiming_uniform_, fan_in, relu) and initialize_head (xavier_uniform_, bias 0).
DECODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
HEAD_KERNEL_INIT = nn.initializers.xavier_uniform()


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, C] -> [N, 2H, 2W, C], each pixel copied into its 2x2 block (torch's interpolate 'nearest', x2)."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


class DecoderBlock(nn.Module):
  """smp's DecoderBlock: nearest 2x up-sampling, concatenate the skip, two (3x3 conv -> BN -> ReLU).

  The convs have no bias (smp's Conv2dReLU with BatchNorm); names conv1/bn1, conv2/bn2.
  """
  features: int
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, skip: Optional[jnp.ndarray]):
    x = upsample_nearest_2x(x)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    make_norm = layers.make_norm('batch', train=self.train, dtype=self.dtype)
    for i in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=DECODER_KERNEL_INIT,
                  dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(make_norm(name=f'bn{i}')(x))
    return x


class EncoderUNet(nn.Module):
  """UNet with an encoder: images [N, H, W, 3] -> logits [N, H, W, num_classes].

  The encoder (submodule `encoder`) gives maps at strides 2, 4, 8, 16, 32; five decoder blocks
  (`decoder_block0..4`, channels 256, 128, 64, 32, 16) up-sample from stride 32, taking the stride 16, 8,
  4 and 2 maps as skips (the last block none), and a 3x3 convolution with bias (`segmentation_head`) gives
  the logits: smp's Unet (center block off, as for its ResNets). Inputs are zero-padded to a multiple of 32
  and the logits cropped back.

  Attributes:
    num_classes: K.
    encoder_name: one of UNET_ENCODERS.
    decoder_channels: channels of the five decoder blocks.
    frozen_bn: the encoder's BatchNorm layers normalise with their running statistics also in training and
      never update them (the decoder's train as usual); state.build_model sets it from
      config.finetune.freeze_encoder_batch_stats.
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  encoder_name: str = 'resnet34'
  decoder_channels: Sequence[int] = DECODER_CHANNELS
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  size_multiple = 32  # The encoder's coarsest stride.

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if len(self.decoder_channels) != 5:
      raise ValueError(f'decoder_channels must have 5 entries (one per encoder stride), got {self.decoder_channels}')
    x, (h, w) = layers.pad_to_multiple(x, self.size_multiple)
    features = encoder_registry.create_encoder(self.encoder_name, dtype=self.dtype, frozen_bn=self.frozen_bn,
                                               name=encoder_registry.ENCODER_SUBMODULE)(x, train=train)
    # smp drops its stride-1 identity feature; the head is the stride-32 map, the skips the others, coarsest first.
    y, skips = features[-1], features[-2::-1]
    for i, channels in enumerate(self.decoder_channels):
      skip = skips[i] if i < len(skips) else None
      y = DecoderBlock(channels, train=train, dtype=self.dtype, name=f'decoder_block{i}')(y, skip)
    y = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), kernel_init=HEAD_KERNEL_INIT, dtype=self.dtype,
                name='segmentation_head')(y)
    return y[:, :h, :w, :]
