"""The encoder registry: name -> how to build the module, its feature channels and strides."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.encoders.resnet import ResNet
from jaxseg.models.encoders.vgg import VGG

# A model with an encoder keeps it as the submodule of this name: params['encoder'], batch_stats['encoder'].
ENCODER_SUBMODULE = 'encoder'


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """How to build one registered encoder.

  Attributes:
    family: 'resnet' or 'vgg': the module class (ResNet, VGG) and which weights table applies.
    arch: the module's architecture fields (ResNet: block, stage_sizes; VGG: batch_norm).
    channels: channels of the 5 feature maps (strides 2, 4, 8, 16, 32).
  """
  family: str
  arch: dict[str, Any]
  channels: tuple[int, ...]

  @property
  def dilatable(self) -> bool:
    """Whether output_stride 16 and 8 are available (ResNets)."""
    return self.family == 'resnet'

  def make(self, *, output_stride: int = 32, **kwargs) -> nn.Module:
    if self.family == 'resnet':
      return ResNet(**self.arch, output_stride=output_stride, **kwargs)
    if output_stride != 32:
      raise ConfigError(f'VGG encoders have output_stride 32 only, got {output_stride!r}')
    return VGG(**self.arch, **kwargs)


BASIC_CHANNELS = (64, 64, 128, 256, 512)
BOTTLENECK_CHANNELS = (64, 256, 512, 1024, 2048)
VGG_CHANNELS = (64, 128, 256, 512, 512)

ENCODERS: dict[str, EncoderSpec] = {
    'resnet18': EncoderSpec('resnet', dict(block='basic', stage_sizes=(2, 2, 2, 2)), BASIC_CHANNELS),
    'resnet34': EncoderSpec('resnet', dict(block='basic', stage_sizes=(3, 4, 6, 3)), BASIC_CHANNELS),
    'resnet50': EncoderSpec('resnet', dict(block='bottleneck', stage_sizes=(3, 4, 6, 3)), BOTTLENECK_CHANNELS),
    'resnet101': EncoderSpec('resnet', dict(block='bottleneck', stage_sizes=(3, 4, 23, 3)), BOTTLENECK_CHANNELS),
    'vgg16': EncoderSpec('vgg', dict(batch_norm=False), VGG_CHANNELS),
    'vgg16_bn': EncoderSpec('vgg', dict(batch_norm=True), VGG_CHANNELS),
}


def encoder_spec(name: str) -> EncoderSpec:
  if name not in ENCODERS:
    raise ConfigError(f'encoder {name!r} is not a known encoder; choose one of {sorted(ENCODERS)}')
  return ENCODERS[name]


def create_encoder(encoder: str, *, dtype: Any = jnp.float32, output_stride: int = 32, frozen_bn: bool = False,
                   **module_kwargs) -> nn.Module:
  """The Flax module of `encoder` ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'vgg16', 'vgg16_bn').

  Args:
    encoder: a key of ENCODERS.
    dtype: computation dtype; parameters stay float32.
    output_stride: 32, or (ResNets) 16 / 8: the last stages dilate instead of striding.
    frozen_bn: BatchNorm uses its running statistics also when training and never updates them.
    **module_kwargs: passed to the module (e.g. name='encoder' inside a model).
  Returns:
    The module; `module(images, train=...)` returns the 5 feature maps (see `encoder_channels`).
  """
  return encoder_spec(encoder).make(dtype=dtype, output_stride=output_stride, frozen_bn=frozen_bn, **module_kwargs)


def encoder_channels(name: str) -> tuple[int, ...]:
  """Channels of encoder `name`'s 5 feature maps, finest (stride 2) first."""
  return encoder_spec(name).channels


def encoder_strides(name: str, output_stride: int = 32) -> tuple[int, ...]:
  """Strides of the 5 feature maps at this output stride: (2, 4, 8, 16, 32), (2, 4, 8, 16, 16) or (2, 4, 8, 8, 8)."""
  if output_stride != 32 and not encoder_spec(name).dilatable:
    raise ConfigError(f'encoder {name!r} has output_stride 32 only, got {output_stride!r}')
  return tuple(min(s, output_stride) for s in (2, 4, 8, 16, 32))
