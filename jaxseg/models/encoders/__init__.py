"""Encoders: ImageNet backbones that return their feature maps, each declaring them as (stride, channels).

  encoder = create_encoder('resnet50', output_stride=16)
  features = encoder.apply(variables, images, train=False)   # [stride 2, 4, 8, 16, 16] maps, finest first
  encoder_spec('convnext_tiny').features                      # (FeatureMap(4, 96), ..., FeatureMap(32, 768))
  variables = load_encoder_variables('convnext_tiny', 'convnext_tiny.fb_in22k_ft_in1k.safetensors')

The contract is base.py; one module per family (resnet.py, vgg.py, convnext.py) and one line in registry.py
each. A model that has an encoder keeps it as its submodule named `encoder` (ENCODER_SUBMODULE), so its
variables live at params['encoder'] and batch_stats['encoder']; `merge_encoder_variables` puts loaded weights
there.
"""

from jaxseg.models.encoders.base import EncoderSpec, FeatureMap, features_by_stride  # noqa: F401
from jaxseg.models.encoders.registry import (  # noqa: F401
    ENCODER_SUBMODULE, ENCODERS, create_encoder, encoder_channels, encoder_spec, encoder_strides)
from jaxseg.models.encoders.resnet import ResNet  # noqa: F401
from jaxseg.models.encoders.vgg import VGG  # noqa: F401
from jaxseg.models.encoders.weights import (  # noqa: F401
    EncoderWeights, key_table, load_encoder_variables, merge_encoder_variables, read_encoder_weights,
    read_state_dict, state_dict_to_encoder_weights, with_pretrained_encoder)
