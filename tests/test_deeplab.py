"""DeepLabV3+ (jaxseg.models.decoders.deeplabv3plus on a ResNet) against segmentation_models_pytorch 0.6's DeepLabV3Plus.

The reference is tests/torch_reference.py's DeepLabV3Plus: plain torch.nn written from smp 0.6's
decoders/deeplabv3 (decoder.py, model.py), base/heads.py and encoders/_utils.py (make_dilated), with smp's
module names, so its state dict has smp's keys. Parameter counts are smp's, pinned from
`smp.DeepLabV3Plus(encoder, classes=K)`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import deeplabv3plus_resnet50_scene_parse150 as deeplab_config
from configs import fcn as fcn_config
from configs import unet as unet_config
from jaxseg import models
from jaxseg.settings import WEIGHT_FIELDS
from jaxseg.errors import ConfigError
from jaxseg.models import encoders
from jaxseg.models.layers import upsample_bilinear_align_corners
from jaxseg.models.segmentation_model import SegmentationModel
from tests.helpers import save_state_dict
from tests.test_encoders import assert_close_relative, param_count, random_images, random_variables
from tests.helpers import import_torch_or_skip


def module_fields(config):
  """config.model's fields that the module takes (models.create_model's: no name, weight file or input contract)."""
  return {k: v for k, v in config.model.items() if k not in ('name', *WEIGHT_FIELDS, *models.INPUT_FIELDS)}


def DeepLabV3Plus(num_classes, encoder_name, output_stride=16, atrous_rates=None, **fields):  # pylint: disable=invalid-name
  """smp's DeepLabV3Plus: the composition with the DeepLabV3+ decoder."""
  decoder_fields = (('atrous_rates', tuple(atrous_rates)),) if atrous_rates else ()
  return SegmentationModel(num_classes=num_classes, encoder_name=encoder_name, decoder_name='deeplabv3plus',
                           decoder_fields=decoder_fields, output_stride=output_stride, **fields)


def deeplab_with(**model_fields):
  config = deeplab_config.get_config()
  for k, v in model_fields.items():
    config.model[k] = v
  return config


def deeplab_model(num_classes, **model_fields):
  """The recipe's (configs/deeplabv3plus_resnet50_scene_parse150.py) model with `model_fields` changed."""
  return models.create_model('deeplabv3plus', module_fields(deeplab_with(**model_fields)), num_classes=num_classes)


@pytest.mark.parametrize('encoder,k,count', [
    ('resnet50', 1, 26_677_585), ('resnet50', 21, 26_682_725), ('resnet101', 21, 45_674_853),
])
def test_parameter_count_is_smps(encoder, k, count):
  """smp 0.6 DeepLabV3Plus(encoder, classes=K): parameters + BatchNorm scale/bias, not the running statistics."""
  model = deeplab_model(k, encoder=encoder)
  assert isinstance(model, SegmentationModel) and model.decoder_name == 'deeplabv3plus'
  assert param_count(model) == count
  assert param_count(model.clone(output_stride=8)) == count  # The stride changes no shape.


def test_registry_fields_and_errors():
  from jaxseg import settings  # pylint: disable=g-import-not-at-top
  # The recipe read as settings: the weight file is the state's (settings.model.encoder_weights), not the module's.
  model_settings = settings.from_config(deeplab_with(encoder_weights='/x/r50.pth')).model
  assert (model_settings.name, model_settings.kwargs) == ('deeplabv3plus', {'encoder': 'resnet50', 'output_stride': 16})
  assert model_settings.encoder_weights == '/x/r50.pth' and model_settings.has_encoder
  assert model_settings.size_multiple == 16  # The output stride.
  assert settings.from_config(deeplab_with(output_stride=8)).model.size_multiple == 8
  model = models.create_model(model_settings.name, model_settings.kwargs, num_classes=3)
  assert model == DeepLabV3Plus(num_classes=3, encoder_name='resnet50', output_stride=16)
  assert model.clone(frozen_bn=True).frozen_bn  # state.build_model's freeze_encoder_batch_stats path.
  with pytest.raises(ConfigError, match=r"deeplabv3plus needs output_stride 16, but encoder 'vgg16' has "
                                        r'output_stride 32 only'):
    deeplab_model(3, encoder='vgg16')
  with pytest.raises(ConfigError, match=r'config.model.output_stride=32: DeepLabV3\+ takes 16 or 8'):
    deeplab_model(3, output_stride=32)
  # The other recipes still build (output_stride is not their field).
  models.create_model('unet', module_fields(unet_config.get_config()), num_classes=3)
  models.create_model('fcn', module_fields(fcn_config.get_config()), num_classes=3)


def test_upsampling_is_torch_align_corners_true():
  torch = import_torch_or_skip('torch')
  x = np.random.RandomState(0).randn(2, 3, 5, 4).astype(np.float32)
  want = torch.nn.Upsample(scale_factor=4, mode='bilinear', align_corners=True)(torch.from_numpy(x)).numpy()
  got = upsample_bilinear_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)), 4)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('output_stride', [16, 8])
def test_output_shape_at_odd_sizes(output_stride):
  model = DeepLabV3Plus(num_classes=5, encoder_name='resnet18', output_stride=output_stride)
  x = jnp.zeros((2, 37, 53, 3))
  out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  assert out.shape == (2, 37, 53, 5)


def torch_deeplab_to_flax(torch_model, encoder):
  """smp's DeepLabV3Plus state dict -> jaxseg variables: the encoder through jaxseg's loader, the rest by name."""
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  enc = encoders.state_dict_to_encoder_weights(
      encoder, {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}).variables
  params, stats = {'encoder': enc['params'], 'decoder': {}}, {'encoder': enc['batch_stats'], 'decoder': {}}
  for key, value in sd.items():
    if not key.startswith('decoder.') or key.endswith('num_batches_tracked'):
      continue
    module, leaf = key[len('decoder.'):].rsplit('.', 1)
    module = module.replace('.', '_')
    if value.ndim == 4:
      params['decoder'].setdefault(module, {})['kernel'] = value.transpose(2, 3, 1, 0)
    elif leaf in ('running_mean', 'running_var'):
      stats['decoder'].setdefault(module, {})[leaf[len('running_'):]] = value
    else:
      params['decoder'].setdefault(module, {})['scale' if leaf == 'weight' else 'bias'] = value
  params['segmentation_head'] = {'kernel': sd['segmentation_head.0.weight'].transpose(2, 3, 1, 0),
                                 'bias': sd['segmentation_head.0.bias']}
  return {'params': params, 'batch_stats': stats}


# Some of smp 0.6 DeepLabV3Plus's decoder keys (key: shape), for resnet50 and 256 channels.
SMP_DECODER_KEYS = {
    'decoder.aspp.0.convs.0.0.weight': (256, 2048, 1, 1), 'decoder.aspp.0.convs.1.0.0.weight': (2048, 1, 3, 3),
    'decoder.aspp.0.convs.1.0.1.weight': (256, 2048, 1, 1), 'decoder.aspp.0.convs.4.1.weight': (256, 2048, 1, 1),
    'decoder.aspp.0.convs.4.2.running_var': (256,), 'decoder.aspp.0.project.0.weight': (256, 1280, 1, 1),
    'decoder.aspp.1.0.weight': (256, 1, 3, 3), 'decoder.aspp.1.1.weight': (256, 256, 1, 1),
    'decoder.aspp.2.weight': (256,), 'decoder.block1.0.weight': (48, 256, 1, 1), 'decoder.block1.1.bias': (48,),
    'decoder.block2.0.0.weight': (304, 1, 3, 3), 'decoder.block2.0.1.weight': (256, 304, 1, 1),
    'decoder.block2.1.running_mean': (256,), 'segmentation_head.0.weight': (21, 256, 1, 1),
    'segmentation_head.0.bias': (21,),
}


@pytest.mark.parametrize('encoder,output_stride,size', [('resnet50', 16, (64, 96)), ('resnet18', 8, (48, 40))])
def test_logits_match_smps(ref, encoder, output_stride, size):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = ref.randomize_(ref.DeepLabV3Plus(encoder, classes=21 if encoder == 'resnet50' else 3,
                                                 output_stride=output_stride), seed=5)
  if encoder == 'resnet50':
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert {k: shapes.get(k) for k in SMP_DECODER_KEYS} == SMP_DECODER_KEYS
    assert sum(v.numel() for v in torch_model.parameters()) == 26_682_725
  variables = torch_deeplab_to_flax(torch_model, encoder)
  # smp's default rates (12, 24, 36) here; jaxseg's default is the paper's (6, 12, 18 at stride 16).
  model = DeepLabV3Plus(num_classes=torch_model.segmentation_head[0].out_channels, encoder_name=encoder,
                        output_stride=output_stride, atrous_rates=(12, 24, 36))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
  x, x_nchw = random_images(3, h=size[0], w=size[1])
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_close_relative(got, want, f'DeepLabV3+-{encoder} OS{output_stride} logits')


def test_load_pretrained_puts_a_resnet50_file_into_the_encoder(ref, tmp_path):
  torch_encoder = ref.randomize_(ref.make_encoder('resnet50'), seed=4)
  path = save_state_dict(torch_encoder.state_dict(), tmp_path / 'r50.safetensors')
  model = deeplab_model(2)
  random_init = random_variables(model, jnp.zeros((1, 32, 32, 3)))
  variables = models.load_pretrained(model, random_init, path)
  loaded = encoders.load_encoder_variables('resnet50', path)
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]['encoder'], loaded[collection])
  jax.tree.map(np.testing.assert_array_equal, variables['params']['decoder'], random_init['params']['decoder'])


def test_train_mode_uses_dropout_rng_and_frozen_bn_keeps_encoder_statistics():
  model = DeepLabV3Plus(num_classes=2, encoder_name='resnet18', frozen_bn=True)
  x = jnp.asarray(random_images(1, h=32, w=32)[0])
  variables = jax.jit(model.init)(jax.random.key(0), x)

  @jax.jit
  def step(variables, key):
    return model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})

  (a, new), (b, _) = step(variables, jax.random.key(1)), step(variables, jax.random.key(2))
  assert a.shape == (2, 32, 32, 2) and not np.allclose(a, b)  # Dropout 0.5 after the ASPP projection.
  jax.tree.map(np.testing.assert_array_equal, new['batch_stats']['encoder'], variables['batch_stats']['encoder'])
  assert not np.allclose(new['batch_stats']['decoder']['aspp_2']['mean'],
                         variables['batch_stats']['decoder']['aspp_2']['mean'])
