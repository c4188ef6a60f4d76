"""Encoder registry: ImageNet backbones (torchvision layout) that return their feature maps at strides 2-32.

  encoder = create_encoder('resnet50', output_stride=16)
  features = encoder.apply(variables, images, train=False)   # [stride 2, 4, 8, 16, 16] maps, finest first
  encoder_channels('resnet50')                                 # (64, 256, 512, 1024, 2048)

A model that has an encoder keeps it as its submodule named `encoder` (ENCODER_SUBMODULE), so its variables
live at params['encoder'] and batch_stats['encoder']; `weights.merge_encoder_variables` puts weights
loaded with `weights.load_encoder_variables(name, path)` there.
"""

from jaxseg.models.encoders.registry import (  # noqa: F401
    ENCODER_SUBMODULE, ENCODERS, EncoderSpec, create_encoder, encoder_channels, encoder_spec,
    encoder_strides)
from jaxseg.models.encoders.resnet import ResNet  # noqa: F401
from jaxseg.models.encoders.vgg import VGG  # noqa: F401
from jaxseg.models.encoders.weights import (  # noqa: F401
    EncoderWeights, load_encoder_variables, merge_encoder_variables, read_encoder_weights, read_state_dict,
    state_dict_to_encoder_weights, torch_key_table, with_pretrained_encoder)
