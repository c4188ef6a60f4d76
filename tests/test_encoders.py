"""Encoders (ResNet-18/34/50/101, VGG16/-BN), their weights loader, and UNet on an encoder, against torch.

The references are tests/torch_reference.py: plain torch.nn with torchvision's, timm's and smp's parameter
names (checked once against torchvision 0.28.0, timm 1.0.31 and segmentation_models_pytorch 0.6.0: identical
state-dict keys and shapes, bit-identical outputs for the same weights). Weights are random from fixed
seeds, saved as torchvision/timm state dicts in both formats (.pth with torch.save, .safetensors), read by
jaxseg, and every stride's features compared in eval mode, float32, to 1e-4 relative.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import unet as unet_config
from jaxseg import models
from jaxseg.settings import WEIGHT_FIELDS
from jaxseg.errors import ConfigError, WeightsError
from jaxseg.models import encoders
from jaxseg.models.unet import UNet
from jaxseg.models.encoders.base import Entry
from jaxseg.models.segmentation_model import SegmentationModel
from tests.helpers import save_state_dict

# CI (.ci/run) installs PyTorch and sets this: the PyTorch checks must then run, never skip.
RTOL = 1e-4

# torchvision's resnet18().state_dict() without the 20 num_batches_tracked entries (122 with them), as
# torchvision 0.28.0 builds it: key:shape.
RESNET18_KEYS = """
conv1.weight:64x3x7x7 bn1.weight:64 bn1.bias:64 bn1.running_mean:64 bn1.running_var:64
layer1.0.conv1.weight:64x64x3x3 layer1.0.bn1.weight:64 layer1.0.bn1.bias:64 layer1.0.bn1.running_mean:64
layer1.0.bn1.running_var:64 layer1.0.conv2.weight:64x64x3x3 layer1.0.bn2.weight:64 layer1.0.bn2.bias:64
layer1.0.bn2.running_mean:64 layer1.0.bn2.running_var:64 layer1.1.conv1.weight:64x64x3x3 layer1.1.bn1.weight:64
layer1.1.bn1.bias:64 layer1.1.bn1.running_mean:64 layer1.1.bn1.running_var:64 layer1.1.conv2.weight:64x64x3x3
layer1.1.bn2.weight:64 layer1.1.bn2.bias:64 layer1.1.bn2.running_mean:64 layer1.1.bn2.running_var:64
layer2.0.conv1.weight:128x64x3x3 layer2.0.bn1.weight:128 layer2.0.bn1.bias:128 layer2.0.bn1.running_mean:128
layer2.0.bn1.running_var:128 layer2.0.conv2.weight:128x128x3x3 layer2.0.bn2.weight:128 layer2.0.bn2.bias:128
layer2.0.bn2.running_mean:128 layer2.0.bn2.running_var:128 layer2.0.downsample.0.weight:128x64x1x1
layer2.0.downsample.1.weight:128 layer2.0.downsample.1.bias:128 layer2.0.downsample.1.running_mean:128
layer2.0.downsample.1.running_var:128 layer2.1.conv1.weight:128x128x3x3 layer2.1.bn1.weight:128
layer2.1.bn1.bias:128 layer2.1.bn1.running_mean:128 layer2.1.bn1.running_var:128 layer2.1.conv2.weight:128x128x3x3
layer2.1.bn2.weight:128 layer2.1.bn2.bias:128 layer2.1.bn2.running_mean:128 layer2.1.bn2.running_var:128
layer3.0.conv1.weight:256x128x3x3 layer3.0.bn1.weight:256 layer3.0.bn1.bias:256 layer3.0.bn1.running_mean:256
layer3.0.bn1.running_var:256 layer3.0.conv2.weight:256x256x3x3 layer3.0.bn2.weight:256 layer3.0.bn2.bias:256
layer3.0.bn2.running_mean:256 layer3.0.bn2.running_var:256 layer3.0.downsample.0.weight:256x128x1x1
layer3.0.downsample.1.weight:256 layer3.0.downsample.1.bias:256 layer3.0.downsample.1.running_mean:256
layer3.0.downsample.1.running_var:256 layer3.1.conv1.weight:256x256x3x3 layer3.1.bn1.weight:256
layer3.1.bn1.bias:256 layer3.1.bn1.running_mean:256 layer3.1.bn1.running_var:256 layer3.1.conv2.weight:256x256x3x3
layer3.1.bn2.weight:256 layer3.1.bn2.bias:256 layer3.1.bn2.running_mean:256 layer3.1.bn2.running_var:256
layer4.0.conv1.weight:512x256x3x3 layer4.0.bn1.weight:512 layer4.0.bn1.bias:512 layer4.0.bn1.running_mean:512
layer4.0.bn1.running_var:512 layer4.0.conv2.weight:512x512x3x3 layer4.0.bn2.weight:512 layer4.0.bn2.bias:512
layer4.0.bn2.running_mean:512 layer4.0.bn2.running_var:512 layer4.0.downsample.0.weight:512x256x1x1
layer4.0.downsample.1.weight:512 layer4.0.downsample.1.bias:512 layer4.0.downsample.1.running_mean:512
layer4.0.downsample.1.running_var:512 layer4.1.conv1.weight:512x512x3x3 layer4.1.bn1.weight:512
layer4.1.bn1.bias:512 layer4.1.bn1.running_mean:512 layer4.1.bn1.running_var:512 layer4.1.conv2.weight:512x512x3x3
layer4.1.bn2.weight:512 layer4.1.bn2.bias:512 layer4.1.bn2.running_mean:512 layer4.1.bn2.running_var:512
fc.weight:1000x512 fc.bias:1000
"""
# torchvision's vgg16().state_dict(): `features` indices of the 13 convs, then the classifier.
VGG16_KEYS = """
features.0.weight:64x3x3x3 features.0.bias:64 features.2.weight:64x64x3x3 features.2.bias:64
features.5.weight:128x64x3x3 features.5.bias:128 features.7.weight:128x128x3x3 features.7.bias:128
features.10.weight:256x128x3x3 features.10.bias:256 features.12.weight:256x256x3x3 features.12.bias:256
features.14.weight:256x256x3x3 features.14.bias:256 features.17.weight:512x256x3x3 features.17.bias:512
features.19.weight:512x512x3x3 features.19.bias:512 features.21.weight:512x512x3x3 features.21.bias:512
features.24.weight:512x512x3x3 features.24.bias:512 features.26.weight:512x512x3x3 features.26.bias:512
features.28.weight:512x512x3x3 features.28.bias:512 classifier.0.weight:4096x25088 classifier.0.bias:4096
classifier.3.weight:4096x4096 classifier.3.bias:4096 classifier.6.weight:1000x4096 classifier.6.bias:1000
"""
# torchvision's vgg16_bn: `features` indices of the convs and of their BatchNorms.
VGG16_BN_CONVS = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
VGG16_BN_NORMS = (1, 4, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38, 41)
# torchvision's state-dict sizes (with num_batches_tracked) and parameter counts (its weights' metadata).
TORCHVISION_SIZES = {'resnet18': (122, 11_689_512), 'resnet34': (218, 21_797_672), 'resnet50': (320, 25_557_032),
                     'resnet101': (626, 44_549_160), 'vgg16': (32, 138_357_544), 'vgg16_bn': (97, 138_365_992)}


def parse_keys(text):
  out = {}
  for item in text.split():
    key, shape = item.split(':')
    out[key] = tuple(int(d) for d in shape.split('x'))
  return out




def random_images(seed, n=2, h=64, w=64):
  """Normalised-scale float images, NHWC (jax) and the same as NCHW (torch)."""
  x = np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def torch_features(ref, model, x_nchw):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return [f.numpy().transpose(0, 2, 3, 1) for f in ref.encoder_features(model, torch.from_numpy(x_nchw))]


def assert_close_relative(got, want, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
  assert err < RTOL, f'{what}: relative error {err:.2e}'


# ---- Names and shapes against torchvision's. ----


def test_reference_state_dicts_have_torchvisions_keys_and_shapes(ref):
  """The torch references are torchvision's layout (pinned lists), and jaxseg's tables cover exactly them."""
  for name in ('resnet18', 'vgg16'):
    sd = ref.make_encoder(name).state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    want = parse_keys(RESNET18_KEYS if name == 'resnet18' else VGG16_KEYS)
    assert list(got) == list(want)
    assert got == want
  assert len(parse_keys(RESNET18_KEYS)) == 102
  bn_sd = ref.make_encoder('vgg16_bn').state_dict()
  assert tuple(sorted({int(k.split('.')[1]) for k in bn_sd if k.endswith('running_var')})) == VGG16_BN_NORMS
  assert tuple(sorted({int(k.split('.')[1]) for k, v in bn_sd.items() if v.dim() == 4})) == VGG16_BN_CONVS
  for name, (n_keys, n_params) in TORCHVISION_SIZES.items():
    model = ref.make_encoder(name)
    sd = model.state_dict()
    assert len(sd) == n_keys, name
    assert sum(p.numel() for p in model.parameters()) == n_params, name
    # jaxseg's table: every key but the classifier's and num_batches_tracked, with the shapes torch has.
    table_shapes = encoders.weights.expected_torch_shapes(name)
    skipped = {k for k in sd if k.endswith('num_batches_tracked') or k.startswith(('fc.', 'classifier.'))}
    assert set(table_shapes) == set(sd) - skipped, name
    assert all(table_shapes[k] == tuple(sd[k].shape) for k in table_shapes), name


def test_table_maps_torchvision_names_onto_flax_paths():
  table = encoders.key_table('resnet50')
  assert table['layer1.0.conv1.weight'] == Entry('params', ('layer1_0', 'conv1', 'kernel'), 'conv')
  assert table['layer3.5.bn3.running_mean'] == Entry('batch_stats', ('layer3_5', 'bn3', 'mean'))
  assert table['layer4.0.downsample.1.running_var'] == Entry('batch_stats', ('layer4_0', 'downsample_1', 'var'))
  assert table['bn1.weight'] == Entry('params', ('bn1', 'scale'))
  bn_table = encoders.key_table('vgg16_bn')
  assert bn_table['features.40.weight'] == Entry('params', ('conv5_3', 'kernel'), 'conv')
  assert bn_table['features.41.bias'] == Entry('params', ('bn5_3', 'bias'))
  assert encoders.key_table('vgg16')['features.28.bias'] == Entry('params', ('conv5_3', 'bias'))


# ---- Features against the torch references, from files in both formats. ----


@pytest.mark.parametrize('name,output_stride,fmt', [
    ('resnet18', 32, 'safetensors'),
    ('resnet18', 8, 'pth'),  # BasicBlock dilated (jaxseg's extension, see torch_reference).
    ('resnet34', 32, 'pth'),
    ('resnet34', 16, 'safetensors'),
    ('resnet50', 16, 'safetensors'),
    ('resnet50', 8, 'pth'),
    ('resnet101', 32, 'pth'),
    ('resnet101', 16, 'safetensors'),
])
def test_resnet_features_match_torch(ref, tmp_path, name, output_stride, fmt):
  model = ref.randomize_(ref.make_encoder(name, output_stride), seed=1)
  path = save_state_dict(model.state_dict(), tmp_path / f'{name}.{fmt}')
  variables = encoders.load_encoder_variables(name, path)
  x, x_nchw = random_images(2)
  encoder = encoders.create_encoder(name, output_stride=output_stride, dilation_rule='torchvision')
  got = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(variables, x)
  want = torch_features(ref, model, x_nchw)
  assert encoders.encoder_strides(name, output_stride) == tuple(64 // f.shape[1] for f in want)
  assert tuple(f.shape[-1] for f in want) == encoders.encoder_channels(name) == encoder.channels
  for stride, g, w in zip(encoders.encoder_strides(name, output_stride), got, want):
    assert_close_relative(g, w, f'{name} os{output_stride} stride {stride}')


def test_resnet101_loads_every_tensor_where_its_table_says(ref, tmp_path):
  """ResNet-101 (the same Bottleneck code as ResNet-50, whose features are compared above): every value lands."""
  model = ref.randomize_(ref.make_encoder('resnet101'), seed=3)
  sd = model.state_dict()
  path = save_state_dict(sd, tmp_path / 'resnet101.safetensors')
  variables = encoders.load_encoder_variables('resnet101', path)
  for key, entry in encoders.key_table('resnet101').items():
    leaf = variables[entry.collection]
    for k in entry.path:
      leaf = leaf[k]
    want = sd[key].numpy()
    np.testing.assert_array_equal(leaf, want.transpose(2, 3, 1, 0) if want.ndim == 4 else want, err_msg=key)
  shapes = jax.eval_shape(lambda: encoders.create_encoder('resnet101').init(jax.random.key(0),
                                                                            jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)


def vgg_case(ref, tmp_path, name, layout, fmt, seed):
  model = ref.randomize_(ref.make_encoder(name), seed=seed)
  sd = model.state_dict()
  if layout == 'timm':
    sd = ref.to_timm_vgg(sd)
  return model, save_state_dict(sd, tmp_path / f'{name}_{layout}.{fmt}')


# Each model and each layout (file format) once: the layouts name the same tensors for both models.
@pytest.mark.parametrize('name,layout,fmt', [('vgg16', 'torchvision', 'pth'), ('vgg16_bn', 'timm', 'safetensors')])
def test_vgg_features_and_classifier_match_torch(ref, tmp_path, name, layout, fmt):
  """The 5 pool outputs, and fc6/fc7 (torchvision Linear or timm conv layout) as Flax convolutions."""
  import torch  # pylint: disable=g-import-not-at-top
  model, path = vgg_case(ref, tmp_path, name, layout, fmt, seed=4)
  weights = encoders.read_encoder_weights(name, path)
  os.remove(path)  # ~530 MB.
  assert weights.layout == 'torchvision'  # timm's VGG keys are torchvision's but for the classifier.
  x, x_nchw = random_images(5, h=64, w=96)
  encoder = encoders.create_encoder(name)
  got = jax.jit(lambda v, x: encoder.apply(v, x, train=False))(weights.variables, x)
  for stride, g, w in zip((2, 4, 8, 16, 32), got, torch_features(ref, model, x_nchw)):
    assert_close_relative(g, w, f'{name} stride {stride}')

  fc = weights.extras['classifier']
  assert fc['fc6']['kernel'].shape == (7, 7, 512, 4096) and fc['fc7']['kernel'].shape == (1, 1, 4096, 4096)
  pool5 = np.random.default_rng(6).normal(size=(1, 7, 7, 512)).astype(np.float32)

  def fc7(fc, pool5):
    conv = lambda x, p: jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), 'VALID',
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias']
    return jax.nn.relu(conv(jax.nn.relu(conv(pool5, fc['fc6'])), fc['fc7']))

  got = jax.jit(fc7)(fc, pool5)[:, 0, 0, :]
  with torch.no_grad():
    want = model.fc7(torch.from_numpy(np.ascontiguousarray(pool5.transpose(0, 3, 1, 2)))).numpy()
  assert_close_relative(got, want, f'{name} fc7')


# ---- Files that do not fit. ----


@pytest.fixture(name='resnet18_sd')
def resnet18_state_dict(ref):
  return ref.randomize_(ref.make_encoder('resnet18'), seed=7).state_dict()


def test_skipped_keys_may_be_absent(resnet18_sd, tmp_path):
  """torchvision's published files predate num_batches_tracked; a backbone saved without fc loads too."""
  sd = {k: v for k, v in resnet18_sd.items() if not k.endswith('num_batches_tracked') and not k.startswith('fc.')}
  assert len(sd) == 100
  variables = encoders.load_encoder_variables('resnet18', save_state_dict(sd, tmp_path / 'r18.safetensors'))
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['downsample_1']['var'],
                                sd['layer2.0.downsample.1.running_var'].numpy())
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                sd['conv1.weight'].numpy().transpose(2, 3, 1, 0))


def test_a_file_of_another_architecture_is_refused_naming_file_keys_and_shapes(ref, resnet18_sd, tmp_path):
  path = save_state_dict(resnet18_sd, tmp_path / 'r18.pth')
  with pytest.raises(WeightsError) as e:
    encoders.load_encoder_variables('resnet34', path)
  msg = str(e.value)
  assert path in msg and "'layer1.2.conv1.weight' [64, 64, 3, 3]" in msg and 'missing' in msg
  assert "looks like resnet18 weights: set config.model.encoder='resnet18'" in msg

  r50 = save_state_dict(ref.make_encoder('resnet50').state_dict(), tmp_path / 'r50.safetensors')
  with pytest.raises(WeightsError) as e:
    encoders.load_encoder_variables('resnet34', r50)
  msg = str(e.value)
  assert r50 in msg
  assert "'layer1.0.conv1.weight' is [64, 64, 1, 1] in the file, resnet34 needs [64, 64, 3, 3]" in msg
  assert "'layer1.0.conv3.weight' [256, 64, 1, 1]" in msg  # Not in resnet34.
  assert 'looks like resnet50' in msg

  vgg = {k: v for k, v in ref.make_encoder('vgg16').state_dict().items() if k.startswith('features.')}
  with pytest.raises(WeightsError, match=r"'features.0.weight' \[64, 3, 3, 3\]"):
    encoders.load_encoder_variables('resnet18', save_state_dict(vgg, tmp_path / 'vgg.safetensors'))


@pytest.mark.parametrize('change,message', [
    ('missing', r"1 key\(s\) of resnet18 missing from the file: 'layer3.1.bn2.running_var' \[256\]"),
    ('unexpected', r"1 key\(s\) that resnet18 does not have: 'layer5.0.conv1.weight' \[3, 3\]"),
    ('shape', r"'bn1.weight' is \[32\] in the file, resnet18 needs \[64\]"),
    ('prefixed', r"start with 'module.'"),
])
def test_a_wrong_key_or_shape_is_refused(resnet18_sd, tmp_path, change, message):
  import torch  # pylint: disable=g-import-not-at-top
  sd = dict(resnet18_sd)
  if change == 'missing':
    del sd['layer3.1.bn2.running_var']
  elif change == 'unexpected':
    sd['layer5.0.conv1.weight'] = torch.zeros(3, 3)
  elif change == 'shape':
    sd['bn1.weight'] = torch.ones(32)
  else:
    sd = {f'module.{k}': v for k, v in sd.items()}
  for fmt in ('pth', 'safetensors'):
    path = save_state_dict(sd, tmp_path / f'bad.{fmt}')
    with pytest.raises(WeightsError, match=message) as e:
      encoders.load_encoder_variables('resnet18', path)
    assert path in str(e.value)


def test_unreadable_files_are_refused_naming_the_file(resnet18_sd, tmp_path, monkeypatch):
  for fmt in ('pth', 'safetensors'):
    path = save_state_dict(resnet18_sd, tmp_path / f'r18.{fmt}')
    truncated = tmp_path / f'truncated.{fmt}'
    truncated.write_bytes(open(path, 'rb').read()[:100_000])
    with pytest.raises(WeightsError, match='truncated or corrupt') as e:
      encoders.load_encoder_variables('resnet18', str(truncated))
    assert str(truncated) in str(e.value)
  with pytest.raises(WeightsError, match='no such file'):
    encoders.load_encoder_variables('resnet18', str(tmp_path / 'absent.safetensors'))
  (tmp_path / 'w.npz').write_bytes(b'x')
  with pytest.raises(WeightsError, match=r'unknown file type; expected a state dict saved as .safetensors, .pth'):
    encoders.load_encoder_variables('resnet18', str(tmp_path / 'w.npz'))
  # Without PyTorch a .pth names the two ways out; .safetensors needs no torch.
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(WeightsError, match=r'needs PyTorch.*`pip install torch`.*\.safetensors'):
    encoders.load_encoder_variables('resnet18', str(tmp_path / 'r18.pth'))
  assert encoders.load_encoder_variables('resnet18', str(tmp_path / 'r18.safetensors'))['params']


# ---- Encoder options. ----


def test_frozen_batch_norm_neither_updates_nor_uses_batch_statistics():
  x = jnp.asarray(random_images(8, h=32, w=32)[0])
  frozen = encoders.create_encoder('resnet18', frozen_bn=True)
  variables = frozen.init(jax.random.key(0), x)
  # Running statistics away from the batch's, so that using either shows.
  variables['batch_stats'] = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])

  def run(module, train):
    return jax.jit(lambda v, x: module.apply(v, x, train=train, mutable=['batch_stats']))(variables, x)

  feats, updated = run(frozen, True)
  eval_feats = frozen.apply(variables, x, train=False)
  for a, b in zip(jax.tree.leaves(updated['batch_stats']), jax.tree.leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(feats, eval_feats):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  _, live = run(encoders.create_encoder('resnet18'), True)
  assert not np.allclose(live['batch_stats']['bn1']['mean'], variables['batch_stats']['bn1']['mean'])
  # In the UNet (state.build_model's frozen_bn for config.finetune.freeze_encoder_batch_stats): the encoder's
  # statistics stay, the decoder's train.
  unet = unet_on(num_classes=2, encoder_name='resnet18', frozen_bn=True)
  unet_vars = unet.init(jax.random.key(0), x)
  _, updated = jax.jit(lambda v, x: unet.apply(v, x, train=True, mutable=['batch_stats']))(unet_vars, x)
  jax.tree.map(np.testing.assert_array_equal, updated['batch_stats']['encoder'], unet_vars['batch_stats']['encoder'])
  assert not np.allclose(updated['batch_stats']['decoder']['block0']['bn1']['mean'],
                         unet_vars['batch_stats']['decoder']['block0']['bn1']['mean'])


def test_compute_dtype_with_float32_parameters():
  for name in ('resnet50', 'vgg16_bn'):
    encoder = encoders.create_encoder(name, dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda e=encoder: e.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    feats = jax.eval_shape(lambda v, e=encoder: e.apply(v, jnp.zeros((2, 64, 64, 3))), variables)
    assert [f.dtype for f in feats] == [jnp.dtype(jnp.bfloat16)] * 5
    assert [f.shape[1] for f in feats] == [32, 16, 8, 4, 2]


def test_bad_encoder_options_are_config_errors():
  with pytest.raises(ConfigError, match='not a known encoder'):
    encoders.create_encoder('resnet152')
  with pytest.raises(ConfigError, match='output_stride must be one of'):
    jax.eval_shape(lambda: encoders.create_encoder('resnet50', output_stride=4).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ConfigError, match='output_stride 32 only'):
    encoders.create_encoder('vgg16', output_stride=16)


# ---- UNet on an encoder. ----


def unet_with(encoder, **model_fields):
  config = unet_config.get_config()
  config.model.encoder = encoder
  for k, v in model_fields.items():
    config.model[k] = v
  return config


def unet_model(encoder, num_classes, **model_fields):
  """configs/unet.py's model on `encoder` (models.create_model takes the module's fields: no name, weight file or
  input contract)."""
  fields = {k: v for k, v in unet_with(encoder, **model_fields).model.items()
            if k not in ('name', *WEIGHT_FIELDS, *models.INPUT_FIELDS)}
  return models.create_model('unet', fields, num_classes=num_classes)


def param_count(model, size=64):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('encoder,k,count', [
    ('resnet18', 1, 14_328_209), ('resnet18', 21, 14_331_109),
    ('resnet34', 1, 24_436_369), ('resnet34', 21, 24_439_269),
    ('resnet50', 1, 32_521_105),
])
def test_unet_parameter_count_is_smps(encoder, k, count):
  """smp 0.6 Unet(encoder, classes=K): parameters + BatchNorm scale/bias, not the running statistics."""
  model = unet_model(encoder, k)
  assert isinstance(model, SegmentationModel) and model.decoder_name == 'unet'
  assert param_count(model) == count


def test_registry_keeps_the_plain_unet_and_checks_the_encoder_fields():
  from jaxseg import settings  # pylint: disable=g-import-not-at-top
  config = unet_config.get_config()
  assert config.model.encoder is None and config.model.encoder_weights is None
  model = unet_model(None, 3)
  assert model == UNet(num_classes=3, base_width=16, depth=3, norm='batch', upsample='transpose')
  plain = settings.from_config(config).model
  assert (plain.size_multiple, plain.has_encoder, plain.encoder_weights) == (2 ** 3, False, None)  # depth 3.
  config.model.encoder_weights = '/x/resnet34.pth'
  with pytest.raises(ConfigError, match=r"config.model.encoder_weights='/x/resnet34.pth' needs a model with a "
                                        r'pretrained encoder.*set config.model.encoder'):
    settings.from_config(config)
  with pytest.raises(ConfigError, match=r"config.model.encoder='resnet152' is not a known encoder"):
    unet_model('resnet152', 3)
  on_resnet34 = settings.from_config(unet_with('resnet34', encoder_weights='/x/r34.pth')).model
  assert on_resnet34.encoder_weights == '/x/r34.pth' and 'encoder_weights' not in on_resnet34.kwargs
  assert (on_resnet34.size_multiple, on_resnet34.has_encoder) == (32, True)
  model = models.create_model(on_resnet34.name, on_resnet34.kwargs, num_classes=3)
  assert model == unet_on(num_classes=3, encoder_name='resnet34')  # The file is the state's, not the module's.
  # `--config.model.encoder_weights=None` on a recipe that names a file: ml_collections' flag parser gives the str
  # field the string 'None', which means no file.
  for none in ('None', ''):
    assert settings.from_config(unet_with('resnet34', encoder_weights=none)).model.encoder_weights is None



def unet_on(num_classes, encoder_name, **fields):
  """smp's Unet on `encoder_name`: the composition with the UNet decoder."""
  return SegmentationModel(num_classes=num_classes, encoder_name=encoder_name, decoder_name='unet', **fields)


def torch_unet_to_flax(ref, torch_model, encoder):
  """smp's Unet state dict -> the UNet-on-an-encoder's variables: the encoder through jaxseg's loader, the rest by hand."""
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  enc = encoders.state_dict_to_encoder_weights(
      encoder, {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}).variables
  params, stats = {'encoder': enc['params']}, {'encoder': enc['batch_stats']}
  for i in range(5):
    block_p = params.setdefault('decoder', {}).setdefault(f'block{i}', {})
    block_s = stats.setdefault('decoder', {}).setdefault(f'block{i}', {})
    for j in (1, 2):
      t = f'decoder.blocks.{i}.conv{j}'
      block_p[f'conv{j}'] = {'kernel': sd[f'{t}.0.weight'].transpose(2, 3, 1, 0)}
      block_p[f'bn{j}'] = {'scale': sd[f'{t}.1.weight'], 'bias': sd[f'{t}.1.bias']}
      block_s[f'bn{j}'] = {'mean': sd[f'{t}.1.running_mean'], 'var': sd[f'{t}.1.running_var']}
  params['segmentation_head'] = {'kernel': sd['segmentation_head.0.weight'].transpose(2, 3, 1, 0),
                                 'bias': sd['segmentation_head.0.bias']}
  return {'params': params, 'batch_stats': stats}


def test_unet_resnet18_logits_match_smps(ref):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = ref.randomize_(ref.Unet('resnet18', classes=3), seed=9)
  variables = torch_unet_to_flax(ref, torch_model, 'resnet18')
  model = unet_on(num_classes=3, encoder_name='resnet18')
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
  x, x_nchw = random_images(10, h=64, w=96)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
  assert_close_relative(apply(variables, x), want, 'UNet-ResNet18 logits')
  # Any size: padded to a multiple of 32 and cropped back.
  assert apply(variables, x[:, :50, :70]).shape == (2, 50, 70, 3)


def random_variables(model, x, seed=0):
  """A model's variable tree (shapes traced from its init, nothing compiled) holding random values."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def test_load_pretrained_puts_the_file_into_the_encoder_and_stops_on_a_bad_one(ref, resnet18_sd, tmp_path):
  path = save_state_dict(resnet18_sd, tmp_path / 'r18.safetensors')
  loaded = encoders.load_encoder_variables('resnet18', path)
  model = unet_on(num_classes=2, encoder_name='resnet18')
  x = jnp.zeros((1, 32, 32, 3))
  random_init = random_variables(model, x)
  variables = models.load_pretrained(model, random_init, path)
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]['encoder'], loaded[collection])
  jax.tree.map(np.testing.assert_array_equal, variables['params']['decoder']['block0'],
               random_init['params']['decoder']['block0'])  # Only the encoder changes.
  # A missing or wrong file stops as a WeightsError (the CLI's 'jaxseg: error: ...') naming it.
  with pytest.raises(WeightsError, match='gone.pth: no such file'):
    models.load_pretrained(model, random_init, str(tmp_path / 'gone.pth'))
  resnet34 = unet_on(num_classes=2, encoder_name='resnet34')
  resnet34_init = random_variables(resnet34, x)
  with pytest.raises(WeightsError, match='looks like resnet18'):
    models.load_pretrained(resnet34, resnet34_init, path)
  # merge_encoder_variables refuses another encoder's variables.
  with pytest.raises(WeightsError, match='do not have the layout'):
    encoders.merge_encoder_variables(random_init, {'params': {'conv1': {}}, 'batch_stats': {}})


def test_a_one_channel_model_gets_the_rgb_kernel_summed(resnet18_sd, tmp_path):
  """in_channels 1: the first convolution's kernel is the file's summed over R, G, B (timm's adapt_input_conv)."""
  path = save_state_dict(resnet18_sd, tmp_path / 'r18.safetensors')
  model = unet_on(num_classes=2, encoder_name='resnet18')
  grey_init = random_variables(model, jnp.zeros((1, 32, 32, 1)))
  variables = models.load_pretrained(model, grey_init, path)
  rgb = np.asarray(resnet18_sd['conv1.weight']).transpose(2, 3, 1, 0)  # OIHW -> HWIO, [7, 7, 3, 64].
  np.testing.assert_allclose(variables['params']['encoder']['conv1']['kernel'], rgb.sum(axis=2, keepdims=True),
                             rtol=1e-5, atol=1e-7)
