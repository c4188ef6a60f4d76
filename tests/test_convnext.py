"""ConvNeXt encoders (jaxseg.models.encoders.convnext) against transformers' ConvNextModel / ConvNextBackbone.

The reference is transformers (checked with 5.25.0 beside torch 2.13.0), built from config objects with random
weights: no pretrained file is downloaded. timm cannot be the reference here (its releases need torch 2.14, which
is not installed), so the timm layout is checked by renaming the transformers state dict's keys to timm's
published names (timm's ConvNeXt module attributes: stem.0/1, stages.N.downsample.0/1,
stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}, head.norm/head.fc; the names its checkpoint_filter_fn
gives Facebook's files) and converting that through the timm table.

Every parameter the initialisers leave constant (layer scales 1e-6, LayerNorm weights 1 and biases 0, conv and
Linear biases 0) is randomised, the input is 70x90 (not a multiple of 32), the references run in eval mode,
float32, and each of the four feature maps is compared to 1e-4 relative (max |diff| / max |reference|).

The weights go through jaxseg's one converter (encoders.state_dict_to_encoder_weights) with ConvNeXt's tables;
architectures other than the registered T/S/B (tiny depths, no output norms) are registered for this module only.
CI's Python 3.11 leg installs transformers (JAXSEG_REQUIRE_TORCH=1 makes these tests fail without it); the
key-table and error tests need neither torch nor transformers.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.errors import WeightsError
from jaxseg.models import encoders
from jaxseg.models.encoders import base, convnext, registry
from tests.helpers import import_torch_or_skip
from tests.test_encoders import assert_close_relative, parse_keys

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
T = convnext.ARCHS['convnext_tiny']
# Parameter counts. transformers 5.25.0's ConvNextModel includes `layernorm` (the LayerNorm on the pooled
# features, last width x 2), which the encoder does not have; its ConvNextBackbone has instead the four output
# LayerNorms (2 x (96 + 192 + 384 + 768) = 2880 for T), which the encoder has with output_norms=True.
HF_MODEL_PARAMS = {'convnext_tiny': 27_820_128, 'convnext_small': 49_454_688, 'convnext_base': 87_566_464}
ENCODER_PARAMS = {'convnext_tiny': 27_818_592, 'convnext_small': 49_453_152, 'convnext_base': 87_564_416}
HF_BACKBONE_PARAMS_T = 27_821_472
# timm's convnext_tiny state dict, in order, up to stage 1's first block (178 encoder keys + head.norm/head.fc).
TIMM_TINY_FIRST_KEYS = """
stem.0.weight:96x3x4x4 stem.0.bias:96 stem.1.weight:96 stem.1.bias:96 stages.0.blocks.0.gamma:96
stages.0.blocks.0.conv_dw.weight:96x1x7x7 stages.0.blocks.0.conv_dw.bias:96 stages.0.blocks.0.norm.weight:96
stages.0.blocks.0.norm.bias:96 stages.0.blocks.0.mlp.fc1.weight:384x96 stages.0.blocks.0.mlp.fc1.bias:384
stages.0.blocks.0.mlp.fc2.weight:96x384 stages.0.blocks.0.mlp.fc2.bias:96
"""
TIMM_TINY_STAGE1_START = """
stages.1.downsample.0.weight:96 stages.1.downsample.0.bias:96 stages.1.downsample.1.weight:192x96x2x2
stages.1.downsample.1.bias:192 stages.1.blocks.0.gamma:192 stages.1.blocks.0.conv_dw.weight:192x1x7x7
"""
# transformers' ConvNextModel keys -> timm's (timm's names for the same modules).
HF_TO_TIMM = (
    (r'^embeddings\.patch_embeddings\.', 'stem.0.'),
    (r'^embeddings\.layernorm\.', 'stem.1.'),
    (r'^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.', r'stages.\1.downsample.\2.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.', r'stages.\1.blocks.\2.conv_dw.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.', r'stages.\1.blocks.\2.norm.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.', r'stages.\1.blocks.\2.mlp.fc1.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.', r'stages.\1.blocks.\2.mlp.fc2.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$', r'stages.\1.blocks.\2.gamma'),
)


@pytest.fixture(autouse=True, scope='module')
def _test_encoders():
  """Removes the architectures registered here from the registry after this module."""
  before = dict(registry.ENCODERS)
  yield
  registry.ENCODERS.clear()
  registry.ENCODERS.update(before)


def encoder_name(depths, dims, output_norms=False):
  """A registered encoder of this architecture (T with output norms is convnext_tiny itself)."""
  depths, dims = tuple(depths), tuple(dims)
  if (depths, dims, output_norms) == (T['depths'], T['dims'], True):
    return 'convnext_tiny'
  name = f"test_convnext_{'_'.join(map(str, depths))}_{'_'.join(map(str, dims))}{'_norms' * output_norms}"
  registry.ENCODERS.setdefault(name, convnext.spec(depths, dims, output_norms=output_norms))
  return name


def to_variables(state_dict, layout, depths, dims, output_norms=False, source='the state dict'):
  """The state dict through jaxseg's converter, read as `layout`."""
  return encoders.state_dict_to_encoder_weights(encoder_name(depths, dims, output_norms), state_dict, layout=layout,
                                                source=source).variables


def expected_shapes(layout, depths, dims, output_norms=False):
  return encoders.weights.expected_torch_shapes(encoder_name(depths, dims, output_norms), layout)


def param_count(depths, dims, output_norms=False):
  shapes = encoders.weights.flax_shapes(encoder_name(depths, dims, output_norms))
  return sum(int(np.prod(s)) for (collection, _), s in shapes.items() if collection == 'params')


def to_timm(state_dict):
  """A transformers ConvNextModel/Backbone state dict renamed to timm's keys (its output norms dropped)."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith('hidden_states_norms.'):
      continue
    for pattern, repl in HF_TO_TIMM:
      new, n = re.subn(pattern, repl, key)
      if n:
        out[new] = value
        break
    else:
      raise AssertionError(f'no timm name for {key}')
  return out


def n_params(tree):
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def jitted_apply(depths, dims, output_norms):
  """One compiled forward per architecture (the tests sharing one reuse it)."""
  module = convnext.ConvNeXt(depths=depths, dims=dims, output_norms=output_norms)
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def run_flax(variables, x_nhwc, depths, dims, output_norms):
  return [np.asarray(f) for f in jitted_apply(tuple(depths), tuple(dims), output_norms)(variables, x_nhwc)]


# ---- transformers references. ----


@pytest.fixture(name='hf', scope='module')
def transformers_module():
  os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Everything here is built locally; nothing is downloaded.
  import_torch_or_skip('torch')
  return import_torch_or_skip('transformers')


def hf_config(hf, depths, dims, **kwargs):
  # Lists, not tuples: transformers 5.25's ConvNextBackbone concatenates hidden_sizes to a list.
  return hf.ConvNextConfig(depths=list(depths), hidden_sizes=list(dims), **kwargs)


def randomize_(model, seed):
  """Every parameter (and BatchNorm statistic) random, at scales that keep every block's contribution visible.

  Weights (conv, depthwise conv, Linear): normal with std 1/sqrt(fan_in); LayerNorm weights normal(1, 0.5);
  biases normal(0, 0.2); layer scales normal(0, 0.5) (transformers initialises them to 1e-6, which would hide
  every block's branch behind its residual).
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=gen)
      if name.endswith('layer_scale_parameter'):
        p.copy_(0.5 * z)
      elif p.dim() > 1:
        p.copy_(z / np.sqrt(p[0].numel()))
      elif name.endswith('.weight'):  # A 1-D weight is a LayerNorm's.
        p.copy_(1 + 0.5 * z)
      else:
        p.copy_(0.2 * z)
    for module in model.modules():  # BatchNorm statistics (transformers' UperNet heads), away from 0 and 1.
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
  return model.eval()


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_input(seed, h=70, w=90):
  x = np.random.default_rng(seed).normal(size=(1, h, w, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def torch_outputs(model, x_nchw):
  """A ConvNextBackbone's (feature maps, raw stage outputs hidden_states[1:]), NHWC numpy."""
  out = _run_torch(model, x_nchw)
  return [_nhwc(f) for f in out.feature_maps], [_nhwc(h) for h in out.hidden_states[1:]]


def torch_outputs_model(model, x_nchw):
  """A ConvNextModel's (None, raw stage outputs hidden_states[1:]), NHWC numpy."""
  return None, [_nhwc(h) for h in _run_torch(model, x_nchw).hidden_states[1:]]


def _run_torch(model, x_nchw):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nchw, np.float32)), output_hidden_states=True)
  assert len(out.hidden_states) == 5  # The stem's output, then the 4 stages'.
  return out


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(name='tiny_backbone', scope='module')
def tiny_backbone_reference(hf):
  """transformers' ConvNextBackbone, ConvNeXt-T, random weights: its state dict, the input, both kinds of maps."""
  model = randomize_(hf.ConvNextBackbone(hf_config(hf, T['depths'], T['dims'],
                                                   out_features=['stage1', 'stage2', 'stage3', 'stage4'])), seed=0)
  assert n_params(numpy_state_dict(model)) == HF_BACKBONE_PARAMS_T
  x, x_nchw = random_input(1)
  normed, raw = torch_outputs(model, x_nchw)
  return numpy_state_dict(model), x, normed, raw


# ---- Parameter counts and tables against transformers. ----


def test_parameter_counts_equal_transformers(hf):
  """The encoder's count = transformers' ConvNextModel's less its pooled-feature LayerNorm (2 x last width).

  ConvNeXt-T: ConvNextModel 27,820,128 = 27,818,592 (encoder) + 1,536 (`layernorm`); with output_norms=True the
  encoder has ConvNextBackbone's count, 27,821,472 (checked on the backbone in the features test).
  """
  import torch  # pylint: disable=g-import-not-at-top
  for name, arch in convnext.ARCHS.items():
    assert param_count(**arch) == ENCODER_PARAMS[name], name
    with torch.device('meta'):  # Shapes only: nothing allocated or initialised.
      model = hf.ConvNextModel(hf_config(hf, **arch))
    hf_count = sum(p.numel() for p in model.parameters())
    assert hf_count == HF_MODEL_PARAMS[name], name
    assert hf_count == ENCODER_PARAMS[name] + model.layernorm.weight.numel() + model.layernorm.bias.numel()
  assert param_count(**T, output_norms=True) == HF_BACKBONE_PARAMS_T  # The registered convnext_tiny.


def test_hf_table_is_transformers_state_dict(hf):
  """The 'hf' table: exactly ConvNextModel's keys less the skipped ones, with its shapes; and ConvNextBackbone's."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    model = hf.ConvNextModel(hf_config(hf, **T))
    backbone = hf.ConvNextBackbone(hf_config(hf, **T, out_features=['stage1', 'stage2', 'stage3', 'stage4']))
  sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  expected = expected_shapes('hf', T['depths'], T['dims'])
  assert set(sd) - set(expected) == {'layernorm.weight', 'layernorm.bias'}
  assert all(sd[k] == shape for k, shape in expected.items())
  backbone_sd = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
  assert backbone_sd == expected_shapes('hf', T['depths'], T['dims'], output_norms=True)


# ---- Features against transformers, through both layouts. ----


def test_features_match_transformers_backbone(tiny_backbone):
  """hf layout, output_norms=True: ConvNextBackbone's feature_maps (each stage's output, LayerNormed)."""
  sd, x, normed, _ = tiny_backbone
  variables = to_variables(sd, 'hf', T['depths'], T['dims'], output_norms=True)
  got = run_flax(variables, x, T['depths'], T['dims'], True)
  assert [f.shape[1:3] for f in got] == [(17, 22), (8, 11), (4, 5), (2, 2)]  # torch's floors of 70x90 / 4..32.
  for stride, g, w in zip(convnext.STRIDES, got, normed):
    assert_close_relative(g, w, f'ConvNeXt-T hf layout, output norms, stride {stride}')


def test_features_match_through_timm_layout(tiny_backbone):
  """timm layout (keys renamed to timm's, plus a classification head that is skipped): the raw stage outputs."""
  sd, x, _, raw = tiny_backbone
  timm_sd = to_timm(sd)
  assert set(timm_sd) == set(convnext.key_table('timm', T['depths']))
  rng = np.random.default_rng(5)
  head = {'head.norm.weight': (768,), 'head.norm.bias': (768,), 'head.fc.weight': (1000, 768), 'head.fc.bias': (1000,)}
  timm_sd.update({k: rng.normal(size=s).astype(np.float32) for k, s in head.items()})
  variables = to_variables(timm_sd, 'timm', T['depths'], T['dims'])
  got = run_flax(variables, x, T['depths'], T['dims'], False)
  for stride, g, w in zip(convnext.STRIDES, got, raw):
    assert_close_relative(g, w, f'ConvNeXt-T timm layout, stride {stride}')


def test_features_match_from_classification_file_layout(tiny_backbone):
  """hf layout as ConvNextForImageClassification saves it (`convnext.` prefix, its layernorm and classifier)."""
  sd, x, _, raw = tiny_backbone
  rng = np.random.default_rng(6)
  file_sd = {'convnext.' + k: v for k, v in sd.items() if not k.startswith('hidden_states_norms.')}
  file_sd.update({k: rng.normal(size=s).astype(np.float32) for k, s in (
      ('convnext.layernorm.weight', (768,)), ('convnext.layernorm.bias', (768,)),
      ('classifier.weight', (1000, 768)), ('classifier.bias', (1000,)))})
  variables = to_variables(file_sd, 'hf', T['depths'], T['dims'])
  got = run_flax(variables, x, T['depths'], T['dims'], False)
  for stride, g, w in zip(convnext.STRIDES, got, raw):
    assert_close_relative(g, w, f'ConvNeXt-T from a classification file, stride {stride}')


def test_output_norms_from_a_classification_file_are_what_transformers_gives(hf, tmp_path):
  """A classification file into ConvNextBackbone: transformers gives its output norms scale 1, bias 0; so does
  the converter with output norms, and the features agree (tiny depths, its own saved file)."""
  classifier = randomize_(hf.ConvNextForImageClassification(hf_config(hf, **TINY, num_labels=5)), seed=2)
  classifier.save_pretrained(tmp_path)
  backbone = hf.ConvNextBackbone.from_pretrained(tmp_path, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  backbone.eval()
  for norm in backbone.hidden_states_norms.values():
    np.testing.assert_array_equal(norm.weight.detach().numpy(), 1)
    np.testing.assert_array_equal(norm.bias.detach().numpy(), 0)
  x, x_nchw = random_input(3, 70, 90)
  normed, _ = torch_outputs(backbone, x_nchw)
  variables = to_variables(numpy_state_dict(classifier), 'hf', **TINY, output_norms=True)
  got = run_flax(variables, x, TINY['depths'], TINY['dims'], True)
  for stride, g, w in zip(convnext.STRIDES, got, normed):
    assert_close_relative(g, w, f'tiny ConvNeXt, classification file into output norms, stride {stride}')


def test_small_stem_output_where_the_layer_norm_epsilon_matters(hf):
  """The stem's conv scaled by 1e-3: its LayerNorm sees a variance near 1e-6, its epsilon, so that an epsilon of
  1e-5 (torch's LayerNorm default) would be far off (tiny depths, ConvNextModel)."""
  import torch  # pylint: disable=g-import-not-at-top
  model = randomize_(hf.ConvNextModel(hf_config(hf, **TINY)), seed=4)
  with torch.no_grad():
    model.embeddings.patch_embeddings.weight.mul_(1e-3)
    model.embeddings.patch_embeddings.bias.mul_(1e-3)
  x, x_nchw = random_input(7)
  _, raw = torch_outputs_model(model, x_nchw)
  variables = to_variables(numpy_state_dict(model), 'hf', **TINY)
  got = run_flax(variables, x, TINY['depths'], TINY['dims'], False)
  for stride, g, w in zip(convnext.STRIDES, got, raw):
    assert_close_relative(g, w, f'tiny ConvNeXt, stem x 1e-3, stride {stride}')


# ---- Tables (no torch needed). ----


def test_timm_table_has_timms_keys():
  table = convnext.key_table('timm', T['depths'])
  assert len(table) == 178  # timm's convnext_tiny state dict has 182 keys: these and head.norm/head.fc.
  shapes = expected_shapes('timm', T['depths'], T['dims'])
  first = parse_keys(TIMM_TINY_FIRST_KEYS)
  assert {k: shapes[k] for k in list(table)[:len(first)]} == first
  for key, shape in parse_keys(TIMM_TINY_STAGE1_START).items():
    assert shapes[key] == shape, key
  assert table['stages.2.blocks.8.mlp.fc2.weight'] == base.Entry('params', ('stages_2', 'blocks_8', 'mlp_fc2',
                                                                          'kernel'), 'dense')
  assert table['stages.3.downsample.1.weight'] == base.Entry('params', ('stages_3', 'downsample_1', 'kernel'), 'conv')
  assert table['stem.1.weight'] == base.Entry('params', ('stem_1', 'scale'))
  assert set(convnext.SKIPPED_KEYS['timm']) == {'head.norm.weight', 'head.norm.bias', 'head.fc.weight',
                                                'head.fc.bias'}
  hf_table = convnext.key_table('hf', T['depths'], output_norms=True)
  assert hf_table['encoder.stages.1.layers.2.layer_scale_parameter'] == base.Entry('params', ('stages_1', 'blocks_2',
                                                                                         'gamma'))
  assert hf_table['hidden_states_norms.stage4.bias'] == base.Entry('params', ('out_norm_3', 'bias'), optional=True)
  # The two layouts name the same variables.
  assert sorted(v.path for v in table.values()) == sorted(v.path for k, v in hf_table.items()
                                                          if not k.startswith('hidden_states_norms.'))


def random_state_dict(layout, seed=0, output_norms=False, **arch):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32)
          for k, s in expected_shapes(layout, arch['depths'], arch['dims'],
                                               output_norms=output_norms).items()}


def test_each_tensor_lands_where_the_table_says_transposed():
  sd = random_state_dict('timm', **TINY)
  params = to_variables(sd, 'timm', **TINY)['params']
  np.testing.assert_array_equal(params['stem_0']['kernel'], sd['stem.0.weight'].transpose(2, 3, 1, 0))
  dw = params['stages_2']['blocks_0']['conv_dw']['kernel']
  assert dw.shape == (7, 7, 1, 32)
  np.testing.assert_array_equal(dw[:, :, 0, 5], sd['stages.2.blocks.0.conv_dw.weight'][5, 0])
  np.testing.assert_array_equal(params['stages_1']['blocks_0']['mlp_fc1']['kernel'],
                                sd['stages.1.blocks.0.mlp.fc1.weight'].T)
  np.testing.assert_array_equal(params['stages_3']['downsample_0']['scale'], sd['stages.3.downsample.0.weight'])
  np.testing.assert_array_equal(params['stages_0']['blocks_0']['gamma'], sd['stages.0.blocks.0.gamma'])
  module = convnext.ConvNeXt(**TINY)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, {'params': params})


# ---- Errors. ----


def test_wrong_shape_names_the_key_and_both_shapes():
  sd = random_state_dict('hf', **TINY)
  sd['encoder.stages.1.layers.0.pwconv1.weight'] = np.zeros((64, 8), np.float32)  # Needs [64, 16].
  with pytest.raises(WeightsError, match=r"'encoder\.stages\.1\.layers\.0\.pwconv1\.weight' is \[64, 8\] in the "
                                         r'file, test_convnext_1_1_1_1_8_16_32_64 needs \[64, 16\]'):
    to_variables(sd, 'hf', **TINY, source='w.safetensors')
  timm_sd = random_state_dict('timm', **TINY)
  timm_sd['stem.0.weight'] = np.zeros((8, 3, 7, 7), np.float32)
  with pytest.raises(WeightsError, match=r"'stem\.0\.weight' is \[8, 3, 7, 7\] in the file, .* needs \[8, 3, 4, 4\]"):
    to_variables(timm_sd, 'timm', **TINY)


def test_missing_and_unexpected_keys_are_named():
  sd = random_state_dict('timm', **TINY)
  del sd['stages.2.blocks.0.gamma']
  with pytest.raises(WeightsError, match=r"w\.pth \(timm layout\).*1 key\(s\) of .* missing from the file: "
                                         r"'stages\.2\.blocks\.0\.gamma' \[32\]"):
    to_variables(sd, 'timm', **TINY, source='w.pth')
  sd = random_state_dict('timm', **TINY)
  sd['stages.0.blocks.1.gamma'] = np.zeros(8, np.float32)  # A block the encoder does not have.
  with pytest.raises(WeightsError, match=r"does not have: 'stages\.0\.blocks\.1\.gamma' \[8\]"):
    to_variables(sd, 'timm', **TINY)
  # A prefixed classification file: the missing key is named with its prefix.
  hf_sd = {'convnext.' + k: v for k, v in random_state_dict('hf', **TINY).items()}
  del hf_sd['convnext.embeddings.layernorm.bias']
  with pytest.raises(WeightsError, match=r"'convnext\.embeddings\.layernorm\.bias' \[8\]"):
    to_variables(hf_sd, 'hf', **TINY)


def test_skipped_keys_hints_and_output_norms():
  hf_sd = random_state_dict('hf', **TINY)
  extra = {k: np.zeros(1, np.float32) for k in convnext.SKIPPED_KEYS['hf']}
  to_variables({**hf_sd, **extra}, 'hf', **TINY)  # The classifier keys are skipped.
  with pytest.raises(WeightsError, match=r"keys are in the 'hf' layout, not 'timm'"):
    to_variables(hf_sd, 'timm', **TINY)
  backbone_sd = random_state_dict('hf', output_norms=True, **TINY)
  with pytest.raises(WeightsError, match=r"does not have: .*'hidden_states_norms\.stage1\.weight' \[8\]"):
    to_variables(backbone_sd, 'hf', **TINY)
  params = to_variables(backbone_sd, 'hf', **TINY, output_norms=True)['params']
  np.testing.assert_array_equal(params['out_norm_2']['scale'], backbone_sd['hidden_states_norms.stage3.weight'])
  del backbone_sd['hidden_states_norms.stage4.bias']  # Some output norms but not all: an error.
  with pytest.raises(WeightsError, match=r"missing from the file: 'hidden_states_norms\.stage4\.bias' \[64\]"):
    to_variables(backbone_sd, 'hf', **TINY, output_norms=True)
  fresh = to_variables(random_state_dict('timm', **TINY), 'timm', **TINY, output_norms=True)
  np.testing.assert_array_equal(fresh['params']['out_norm_3']['scale'], np.ones(64))
  np.testing.assert_array_equal(fresh['params']['out_norm_3']['bias'], np.zeros(64))
