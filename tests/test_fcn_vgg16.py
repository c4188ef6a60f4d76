"""FCN-32s/16s/8s on an ImageNet VGG16 (models 'fcn_vgg16'): layers, initialisation, and fc6/fc7 from the classifier.

References: the paper's FCN-8s layer list (tests/test_models.py's by-hand count, 134,376,863 parameters at 21
classes), the paper's bilinear up-sampling filter (its surgery.upsample_filt, recomputed here in numpy), and
tests/torch_reference.py's VGG (torchvision's vgg16 keys; its classifier.0 is the Linear 25088 -> 4096 that fc6
convolutionalises).
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import models
from jaxseg.settings import WEIGHT_FIELDS
from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models.segmentation_model import SegmentationModel
from tests.test_models import fcn8s_vgg16_layer_counts_by_hand

VGG_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
             'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')


def shapes(model, h=64, w=64):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3))))


def layer_counts(params):
  return {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layer)) for name, layer in params.items()}


def model_fields(**fields):
  """config.model's fields of an 'fcn_vgg16' model that the module takes (no name, weight file or input contract)."""
  return {'variant': 'fcn8s', 'encoder': 'vgg16', 'dropout_rate': 0.5, **fields}


def upsample_filt(size):
  """The FCN paper's surgery.upsample_filt: a 2-D bilinear kernel of this size."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  og = np.ogrid[:size, :size]
  return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def FCNVGG16(num_classes, variant='fcn8s', encoder_name='vgg16'):  # pylint: disable=invalid-name
  """FCN on VGG16: the composition with the FCN decoder."""
  return SegmentationModel(num_classes=num_classes, encoder_name=encoder_name, decoder_name='fcn',
                           decoder_fields=(('variant', variant),))


def test_parameter_count_equals_the_from_scratch_fcn8s():
  """The same layers as the paper's (and jaxseg's FCN) FCN-8s, the 13 VGG convs under params['encoder']."""
  expected = fcn8s_vgg16_layer_counts_by_hand(21)
  params = shapes(FCNVGG16(num_classes=21, variant='fcn8s'))['params']
  got = layer_counts(params['decoder'])
  got.update(layer_counts(params['encoder']))
  assert got == expected
  assert sum(jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))) == 134_376_863
  # VGG16-BN: + a scale and a bias per conv channel (4,224 channels), no BatchNorm in fc6/fc7.
  variables = shapes(FCNVGG16(num_classes=21, encoder_name='vgg16_bn'))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == 134_376_863 + 2 * 4224
  assert set(variables['batch_stats']) == {'encoder'}
  for variant, layers in (('fcn32s', {'score_fr'}), ('fcn16s', {'score_fr', 'upscore2', 'score_pool4'})):
    params = shapes(FCNVGG16(num_classes=21, variant=variant))['params']
    assert set(params) == {'encoder', 'decoder'} and set(params['decoder']) == {'fc6', 'fc7'} | layers


def test_score_layers_start_at_zero_and_upsampling_bilinear():
  """At an odd input size: the output is exactly 0 at init (all score layers zero), up-sampling kernels bilinear."""
  k = 3
  model = FCNVGG16(num_classes=k, variant='fcn8s')
  x = jax.random.normal(jax.random.key(1), (1, 37, 45, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params = variables['params']['decoder']
  for name in ('score_fr', 'score_pool4', 'score_pool3'):
    assert not np.any(np.asarray(params[name]['kernel'])) and not np.any(np.asarray(params[name]['bias'])), name
  want = upsample_filt(4)[:, :, None, None] * np.eye(k)[None, None]  # Channel c -> c only.
  np.testing.assert_allclose(want[:, :, 0, 0], np.outer([.25, .75, .75, .25], [.25, .75, .75, .25]))
  for name in ('upscore2', 'upscore_pool4'):
    assert set(params[name]) == {'kernel'}  # No bias, as the paper's Deconvolution.
    np.testing.assert_allclose(np.asarray(params[name]['kernel']), want, rtol=0, atol=1e-7, err_msg=name)
  # fc6/fc7 random (torchvision's Linear init, std 0.01), not zero.
  assert 0.005 < float(jnp.std(params['fc7']['kernel'])) < 0.02
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert out.shape == (1, 37, 45, k)
  assert not np.any(np.asarray(out))


@pytest.mark.parametrize('variant', ['fcn32s', 'fcn16s', 'fcn8s'])
def test_output_shape_at_an_odd_size(variant):
  model = models.create_model('fcn_vgg16', model_fields(variant=variant), num_classes=5)
  assert isinstance(model, SegmentationModel) and dict(model.decoder_fields)['variant'] == variant
  x = jnp.zeros((2, 53, 71, 3))
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x, train=False))
  assert out.shape == (2, 53, 71, 5)
  # Training mode (dropout) traces too.
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x, train=True,
                                           rngs={'dropout': jax.random.key(1)}))
  assert out.shape == (2, 53, 71, 5)


def test_registry_and_recipe():
  from configs import fcn8s_vgg16_oxford_pet as recipe  # pylint: disable=g-import-not-at-top
  config = recipe.get_config()
  fields = {k: v for k, v in config.model.items() if k not in ('name', *WEIGHT_FIELDS, *models.INPUT_FIELDS)}
  model = models.create_model(config.model.name, fields, num_classes=21)
  assert (model.decoder_name, model.encoder_name) == ('fcn', 'vgg16')
  assert dict(model.decoder_fields) == {'variant': 'fcn8s', 'dropout_rate': 0.5}
  assert model.size_multiple == 32  # pool5's stride.
  assert models.create_model('fcn_vgg16', model_fields(encoder='vgg16_bn'), num_classes=2).encoder_name == 'vgg16_bn'
  assert models.create_model('fcn_vgg16', model_fields(encoder=None), num_classes=2).encoder_name == 'vgg16'
  with pytest.raises(ConfigError, match=r"config.model.encoder='resnet18': fcn_vgg16 takes one of"):
    models.create_model('fcn_vgg16', model_fields(encoder='resnet18'), num_classes=2)
  with pytest.raises(ConfigError, match=r"config.model.variant='fcn4s': FCN takes one of"):
    models.create_model('fcn_vgg16', model_fields(variant='fcn4s'), num_classes=2)
  with pytest.raises(ConfigError, match=r"fields \['width_multiplier'\] that model 'fcn_vgg16' does not take"):
    models.create_model('fcn_vgg16', model_fields(width_multiplier=0.5), num_classes=2)


def zeros_like_shapes(model):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes(model))


def test_load_pretrained_puts_encoder_fc6_fc7_in_place_and_fc6_is_the_linear(ref, tmp_path):
  """A torchvision vgg16 state dict: encoder, fc6 (Linear [4096, 25088] -> [7, 7, 512, 4096]) and fc7 land.

  fc6 as the model's 'SAME' 7x7 convolution on a 7x7 pool5 map, at the centre, is torch's Linear on the
  flattened map (the paper's convolutionalisation), and so is fc7 after it.
  """
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = ref.randomize_(ref.make_encoder('vgg16'), seed=11)
  sd = torch_model.state_dict()
  path = str(tmp_path / 'vgg16.safetensors')
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
  model = FCNVGG16(num_classes=4)
  loaded = models.load_pretrained(model, zeros_like_shapes(model), path)
  os.remove(path)  # ~550 MB.
  params = {**loaded['params']['decoder'], 'encoder': loaded['params']['encoder']}

  enc = params['encoder']
  assert set(enc) == set(VGG_CONVS)
  np.testing.assert_array_equal(enc['conv1_1']['kernel'], sd['features.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(enc['conv5_3']['bias'], sd['features.28.bias'].numpy())
  np.testing.assert_array_equal(enc['conv3_2']['kernel'][1, 2, 17, 200], sd['features.12.weight'][200, 17, 1, 2])

  w6, k6 = sd['classifier.0.weight'].numpy(), params['fc6']['kernel']
  assert w6.shape == (4096, 25088) and k6.shape == (7, 7, 512, 4096)
  # torch flattens pool5 [512, 7, 7] channel-major: input (c, i, j) is column c * 49 + i * 7 + j.
  o, c, i, j = 1234, 300, 2, 5
  assert k6[i, j, c, o] == w6[o, c * 49 + i * 7 + j]
  assert k6[0, 6, 511, 4095] == w6[4095, 511 * 49 + 6]
  # array_equal: assert_array_equal's NaN bookkeeping takes 4 s on these 102M values.
  assert np.array_equal(k6, w6.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['fc6']['bias'], sd['classifier.0.bias'].numpy())
  np.testing.assert_array_equal(params['fc7']['kernel'][0, 0], sd['classifier.3.weight'].numpy().T)
  np.testing.assert_array_equal(params['fc7']['bias'], sd['classifier.3.bias'].numpy())
  assert params['fc6']['kernel'].dtype == np.float32
  for name in ('score_fr', 'upscore2', 'score_pool4', 'upscore_pool4', 'score_pool3'):  # Untouched.
    assert not any(np.any(x) for x in jax.tree.leaves(params[name])), name

  # The paper's equivalence, with the model's own fc6/fc7 layers ('SAME' nn.Conv on a 7x7 map).
  pool5 = np.random.default_rng(3).normal(size=(1, 7, 7, 512)).astype(np.float32)
  fc = {'fc6': params['fc6'], 'fc7': params['fc7']}

  def fc6_fc7(fc, pool5):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    h6 = nn.Conv(4096, (7, 7), padding='SAME').apply({'params': fc['fc6']}, pool5)
    h7 = nn.Conv(4096, (1, 1)).apply({'params': fc['fc7']}, jax.nn.relu(h6))
    return h6[:, 3, 3], jax.nn.relu(h7)[:, 3, 3]

  got6, got7 = jax.jit(fc6_fc7)(fc, pool5)
  with torch.no_grad():
    flat = torch.from_numpy(np.ascontiguousarray(pool5.transpose(0, 3, 1, 2))).flatten(1)
    want6 = torch_model.classifier[0](flat).numpy()
    want7 = torch_model.fc7(flat.reshape(1, 512, 7, 7)).numpy()
  for got, want, what in ((got6, want6, 'fc6'), (got7, want7, 'fc7')):
    err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
    assert err < 1e-4, f'{what}: relative error {err:.2e}'


def test_file_without_classifier_keeps_fc6_fc7_random_with_a_warning(ref, tmp_path, caplog):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  sd = ref.randomize_(ref.make_encoder('vgg16'), seed=12).state_dict()
  features = {k: v.contiguous() for k, v in sd.items() if k.startswith('features.')}
  path = str(tmp_path / 'vgg16_features.safetensors')
  safetensors.torch.save_file(features, path)
  model = FCNVGG16(num_classes=2, variant='fcn32s')
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes(model))
  with caplog.at_level(logging.WARNING):
    loaded = models.load_pretrained(model, variables, path)
  assert 'have no classifier' in caplog.text and path in caplog.text
  assert all(loaded['params']['decoder'][fc] is variables['params']['decoder'][fc] for fc in ('fc6', 'fc7'))
  np.testing.assert_array_equal(loaded['params']['encoder']['conv1_1']['kernel'],
                                sd['features.0.weight'].numpy().transpose(2, 3, 1, 0))

  # Part of a classifier, or one of another shape: an error naming the file and the key.
  bad = dict(features, **{'classifier.3.weight': sd['classifier.3.weight'][:10, :10].contiguous(),
                          'classifier.3.bias': sd['classifier.3.bias']})
  bad_path = str(tmp_path / 'vgg16_bad.safetensors')
  safetensors.torch.save_file(bad, bad_path)
  with pytest.raises(WeightsError, match=r"vgg16_bad\.safetensors.*'classifier\.0\.weight'.*missing"):
    models.load_pretrained(model, variables, bad_path)
