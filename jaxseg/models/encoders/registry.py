"""The encoder registry: name -> EncoderSpec (see base.py for the contract). One line per family."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models.encoders import base, convnext, mit, resnet, vgg, vit

# A model with an encoder keeps it as the submodule of this name: params['encoder'], batch_stats['encoder'].
ENCODER_SUBMODULE = 'encoder'

ENCODERS: dict[str, base.EncoderSpec] = {
    **resnet.ENCODERS,  # resnet18, resnet34, resnet50, resnet101
    **vgg.ENCODERS,  # vgg16, vgg16_bn
    **convnext.ENCODERS,  # convnext_tiny, convnext_small, convnext_base
    **mit.ENCODERS,  # mit_b0 .. mit_b5
    **vit.ENCODERS,  # vit_small_patch14_dinov2, vit_base_patch14_dinov2, their _reg4_ variants
}


def encoder_spec(name: str) -> base.EncoderSpec:
  if name not in ENCODERS:
    raise ConfigError(f'encoder {name!r} is not a known encoder; choose one of {sorted(ENCODERS)}')
  return ENCODERS[name]


def create_encoder(encoder: str, *, dtype: Any = jnp.float32, output_stride: int = 32, frozen_bn: bool = False,
                   **module_kwargs) -> nn.Module:
  """The Flax module of a registered encoder.

  Args:
    encoder: a key of ENCODERS.
    dtype: computation dtype; parameters stay float32.
    output_stride: 32, or one of the spec's other output_strides (ResNets: 16, 8): the last stages dilate instead
      of striding.
    frozen_bn: BatchNorm (where the encoder has it) uses its running statistics also when training and never
      updates them.
    **module_kwargs: passed to the module (e.g. name='encoder' inside a model).
  Returns:
    The module; `module(images, train=...)` returns the maps of `encoder_spec(encoder).features_at(output_stride)`.
  """
  spec = encoder_spec(encoder)
  base.check_output_stride(encoder, spec, output_stride)
  return spec.build(dtype=dtype, output_stride=output_stride, frozen_bn=frozen_bn, **module_kwargs)


def encoder_channels(name: str) -> tuple[int, ...]:
  """Channels of encoder `name`'s feature maps, finest first."""
  return tuple(f.channels for f in encoder_spec(name).features)


def encoder_strides(name: str, output_stride: int = 32) -> tuple[int, ...]:
  """Strides of encoder `name`'s feature maps at this output stride, finest first."""
  spec = encoder_spec(name)
  base.check_output_stride(name, spec, output_stride)
  return tuple(f.stride for f in spec.features_at(output_stride))
