"""SegFormer (MiT encoders, jaxseg.models.encoders.mit; the all-MLP head, decoders/segformer.py) against transformers.

The reference is transformers' SegformerModel / SegformerForImageClassification / SegformerForSemanticSegmentation
(checked with 5.25.0 beside torch 2.13.0), built from config objects with random weights: nothing is downloaded.
Its weights reach jaxseg as a user's do: written by save_pretrained (model.safetensors, in the file layout
transformers publishes: encoder.block.*, attention.self.key/value, decode_head.linear_c.*; transformers 5.x
renames them in memory and back when saving) and read from that file. The original NVlabs layout has no
installable reference here, so it is checked by renaming the transformers file's keys to NVlabs' published names
(mmseg/models/backbones/mix_transformer.py: patch_embedN.proj/norm, blockN.M.norm1/norm2,
attn.q/kv/sr/norm/proj, mlp.fc1/dwconv.dwconv/fc2, normN, the classifier head.*), key and value concatenated
into kv (keys first), and converting that through the nvlabs table.

Every parameter the initialisers leave constant (LayerNorm weights 1 and biases 0, Linear and conv biases 0,
BatchNorm statistics) is randomised, the inputs are 70x90 or 100x75 (not multiples of 32), the references run
in eval mode, float32, and maps and logits are compared to 1e-4 relative (max |diff| / max |reference|).
Architectures other than the registered B0-B5 (a tiny MiT) are registered for this module only.
"""

import functools
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import models
from jaxseg.errors import WeightsError
from jaxseg.models import encoders
from jaxseg.models.decoders.segformer import SegFormerDecoder
from jaxseg.models.encoders import mit, registry
from tests.helpers import import_torch_or_skip
from tests.test_convnext import randomize_
from tests.test_encoders import assert_close_relative

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 2, 1, 1), heads=(1, 2, 2, 4))
TINY_NAME = 'test_mit_tiny'
B0 = mit.ARCHS['mit_b0']
H, W = 70, 90
# SegformerForSemanticSegmentation with 150 classes (transformers 5.25.0, counted on the meta device), and its
# SegformerModel alone (the encoder's count).
MODEL_PARAMS = {'mit_b0': 3_752_694, 'mit_b2': 27_461_974, 'mit_b5': 84_708_694}
ENCODER_PARAMS = {'mit_b0': 3_319_392, 'mit_b2': 24_196_288, 'mit_b5': 81_443_008}
# transformers' file keys -> NVlabs' (its names for the same modules); key/value are fused separately.
HF_TO_NVLABS = (
    (r'^encoder\.patch_embeddings\.(\d)\.proj\.', lambda m: f'patch_embed{int(m[1]) + 1}.proj.'),
    (r'^encoder\.patch_embeddings\.(\d)\.layer_norm\.', lambda m: f'patch_embed{int(m[1]) + 1}.norm.'),
    (r'^encoder\.layer_norm\.(\d)\.', lambda m: f'norm{int(m[1]) + 1}.'),
    (r'^encoder\.block\.(\d)\.(\d+)\.', lambda m: f'block{int(m[1]) + 1}.{m[2]}.'),
)
HF_TO_NVLABS_BLOCK = (('layer_norm_1.', 'norm1.'), ('layer_norm_2.', 'norm2.'), ('attention.self.query.', 'attn.q.'),
                      ('attention.self.sr.', 'attn.sr.'), ('attention.self.layer_norm.', 'attn.norm.'),
                      ('attention.output.dense.', 'attn.proj.'), ('mlp.dense1.', 'mlp.fc1.'),
                      ('mlp.dense2.', 'mlp.fc2.'))


@pytest.fixture(autouse=True, scope='module')
def _test_encoders():
  """Registers the tiny MiT for this module and restores the registry after it."""
  before = dict(registry.ENCODERS)
  registry.ENCODERS[TINY_NAME] = mit.spec(**TINY, decoder=16)
  yield
  registry.ENCODERS.clear()
  registry.ENCODERS.update(before)


@pytest.fixture(name='hf', scope='module')
def transformers_module():
  os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Everything here is built locally; nothing is downloaded.
  import_torch_or_skip('torch')
  return import_torch_or_skip('transformers')


def hf_config(hf, dims, depths, heads=mit.HEADS, **kwargs):
  return hf.SegformerConfig(hidden_sizes=list(dims), depths=list(depths), num_attention_heads=list(heads), **kwargs)


def saved_state_dict(model, directory):
  """The model written by save_pretrained and read back: its file's keys and tensors (numpy), as a user has them."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model.save_pretrained(directory)
  return load_file(os.path.join(directory, 'model.safetensors'))


def to_nvlabs(state_dict):
  """A transformers SegformerModel file's state dict renamed to NVlabs' keys, key and value fused into kv."""
  out = {}
  for key, value in state_dict.items():
    for pattern, repl in HF_TO_NVLABS:
      new, n = re.subn(pattern, repl, key)
      if n:
        break
    else:
      raise AssertionError(f'no NVlabs name for {key}')
    if '.attention.self.value.' in new:
      continue
    if '.attention.self.key.' in new:
      new = new.replace('attention.self.key.', 'attn.kv.')
      value = np.concatenate([value, state_dict[key.replace('.key.', '.value.')]], axis=0)
    for old, nv in HF_TO_NVLABS_BLOCK:
      new = new.replace(old, nv)
    out[new] = value
  return out


def random_input(seed, h=H, w=W):
  x = np.random.default_rng(seed).normal(size=(1, h, w, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def hidden_states(model, x_nchw):
  """A SegformerModel's four stage outputs, NHWC numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.from_numpy(x_nchw), output_hidden_states=True)
  assert len(out.hidden_states) == 4
  return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]


@functools.lru_cache(maxsize=None)
def jitted_encoder(name):
  module = registry.create_encoder(name)
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def check_features(name, weights, x, want, what):
  got = jitted_encoder(name)(weights.variables, x)
  assert len(got) == 4
  for stride, g, w in zip(mit.STRIDES, got, want):
    assert_close_relative(g, w, f'{what}, stride {stride}')


def n_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def zeros_like_init(model, size=(64, 64)):
  """A model's variables as zeros (every one of them is then read from a file): no compilation."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---- Parameter counts and tables. ----


def test_parameter_counts_equal_transformers(hf):
  """The composed model (segformer on mit_bN, 150 classes, the encoder's default head width) has
  SegformerForSemanticSegmentation's count, and the encoder SegformerModel's."""
  import torch  # pylint: disable=g-import-not-at-top
  for name, count in MODEL_PARAMS.items():
    arch = mit.ARCHS[name]
    with torch.device('meta'):  # Shapes only: nothing allocated or initialised.
      reference = hf.SegformerForSemanticSegmentation(hf_config(hf, arch['dims'], arch['depths'], num_labels=150,
                                                                decoder_hidden_size=arch['decoder']))
    assert sum(p.numel() for p in reference.parameters()) == count, name
    assert sum(p.numel() for p in reference.segformer.parameters()) == ENCODER_PARAMS[name], name
    model = models.compose('segformer', num_classes=150, dtype=jnp.float32, encoder=name)
    assert dict(model.decoder_fields) == {'channels': arch['decoder']}
    assert model.size_multiple == 1
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
    assert n_params(params) == count, name
    assert n_params(params['encoder']) == ENCODER_PARAMS[name], name


def test_tables_are_the_files_keys(tiny_reference):
  """The hf table is exactly the keys (and shapes) of the file transformers writes, less the classifier; the
  nvlabs table is their NVlabs names; both fill the same variables."""
  sd, _, _ = tiny_reference
  encoder_sd = {k[len('segformer.'):]: v.shape for k, v in sd.items() if k.startswith('segformer.')}
  assert set(sd) - {'segformer.' + k for k in encoder_sd} == {'classifier.weight', 'classifier.bias'}
  assert encoder_sd == encoders.weights.expected_torch_shapes(TINY_NAME, 'hf')
  nvlabs = {k: v.shape for k, v in to_nvlabs({k[len('segformer.'):]: v for k, v in sd.items()
                                              if k.startswith('segformer.')}).items()}
  assert nvlabs == encoders.weights.expected_torch_shapes(TINY_NAME, 'nvlabs')
  hf_table, nv_table = mit.key_table('hf', TINY['depths']), mit.key_table('nvlabs', TINY['depths'])
  assert sorted({e.path for e in hf_table.values()}) == sorted(e.path for e in nv_table.values())
  assert hf_table['encoder.block.1.1.attention.self.value.weight'] == encoders.base.Entry(
      'params', ('block2_1', 'attn', 'kv', 'kernel'), 'dense', part=(1, 2))
  assert 'encoder.block.3.0.attention.self.sr.weight' not in hf_table  # sr_ratio 1 in the last stage.


# ---- The encoder against transformers' SegformerModel, through both layouts. ----


@pytest.fixture(name='tiny_reference', scope='module')
def tiny_reference_fixture(hf, tmp_path_factory):
  """A tiny SegformerForImageClassification (nvidia/mit-b* files' class), random: its file, the input, its maps."""
  model = randomize_(hf.SegformerForImageClassification(hf_config(hf, **TINY, num_labels=5)), seed=0)
  sd = saved_state_dict(model, tmp_path_factory.mktemp('mit_tiny'))
  x, x_nchw = random_input(1)
  return sd, x, hidden_states(model.segformer, x_nchw)


def test_tiny_encoder_from_a_classification_file(tiny_reference):
  """hf layout, as nvidia/mit-b* files are (`segformer.` prefix, a classifier that is skipped), found from the
  keys; transformers' key and value Linears land as the two halves of kv."""
  sd, x, want = tiny_reference
  weights = encoders.state_dict_to_encoder_weights(TINY_NAME, sd)
  assert weights.layout == 'hf'
  kv = weights.variables['params']['block2_1']['attn']['kv']
  np.testing.assert_array_equal(kv['kernel'][:, :16], sd['segformer.encoder.block.1.1.attention.self.key.weight'].T)
  np.testing.assert_array_equal(kv['bias'][16:], sd['segformer.encoder.block.1.1.attention.self.value.bias'])
  check_features(TINY_NAME, weights, x, want, 'tiny MiT, hf layout')


def test_tiny_encoder_through_the_nvlabs_layout(tiny_reference):
  sd, x, want = tiny_reference
  nv = to_nvlabs({k[len('segformer.'):]: v for k, v in sd.items() if k.startswith('segformer.')})
  nv.update({'head.weight': sd['classifier.weight'], 'head.bias': sd['classifier.bias']})  # Skipped on purpose.
  weights = encoders.state_dict_to_encoder_weights(TINY_NAME, nv)
  assert weights.layout == 'nvlabs'
  check_features(TINY_NAME, weights, x, want, 'tiny MiT, nvlabs layout')


def test_small_patch_embedding_where_the_layer_norm_epsilon_matters(hf, tmp_path):
  """The first patch embedding's conv scaled by 1e-3: its LayerNorm sees a variance near 1e-6, so that any other
  epsilon than transformers' 1e-5 (e.g. the original code's 1e-6 of the block norms) would be far off."""
  import torch  # pylint: disable=g-import-not-at-top
  model = randomize_(hf.SegformerModel(hf_config(hf, **TINY)), seed=2)
  with torch.no_grad():
    model.stages[0].patch_embeddings.proj.weight.mul_(1e-3)
    model.stages[0].patch_embeddings.proj.bias.mul_(1e-3)
  x, x_nchw = random_input(3)
  weights = encoders.state_dict_to_encoder_weights(TINY_NAME, saved_state_dict(model, tmp_path))
  check_features(TINY_NAME, weights, x, hidden_states(model, x_nchw), 'tiny MiT, patch embedding x 1e-3')


@pytest.fixture(name='b0_reference', scope='module')
def b0_reference_fixture(hf, tmp_path_factory):
  model = randomize_(hf.SegformerModel(hf_config(hf, B0['dims'], B0['depths'])), seed=4)
  sd = saved_state_dict(model, tmp_path_factory.mktemp('mit_b0'))
  x, x_nchw = random_input(5)
  return sd, x, hidden_states(model, x_nchw)


def test_mit_b0_through_both_layouts(b0_reference):
  sd, x, want = b0_reference
  assert set(sd) == set(mit.key_table('hf', B0['depths']))
  check_features('mit_b0', encoders.state_dict_to_encoder_weights('mit_b0', sd, layout='hf'), x, want,
                 'MiT-B0, hf layout')
  check_features('mit_b0', encoders.state_dict_to_encoder_weights('mit_b0', to_nvlabs(sd), layout='nvlabs'), x,
                 want, 'MiT-B0, nvlabs layout')


# ---- The whole model against SegformerForSemanticSegmentation. ----


def hf_segformer(hf, seed, num_labels=150, **arch):
  arch = arch or B0
  config = hf_config(hf, arch['dims'], arch['depths'], arch.get('heads', mit.HEADS), num_labels=num_labels,
                     decoder_hidden_size=arch.get('decoder', 256))
  return randomize_(hf.SegformerForSemanticSegmentation(config), seed=seed)


def check_whole_model(hf, tmp_path, h, w, bfloat16=False):
  """SegFormer-B0, 150 classes: transformers' file through models.load_weights; its stride-4 logits resized to the
  input (bilinear, align_corners=False) are jaxseg's logits. Returns jaxseg's model, variables and input."""
  import torch  # pylint: disable=g-import-not-at-top
  reference = hf_segformer(hf, seed=6)
  saved_state_dict(reference, tmp_path)
  model = models.compose('segformer', num_classes=150, dtype=jnp.float32, encoder='mit_b0')
  variables = models.load_weights(model, zeros_like_init(model), str(tmp_path / 'model.safetensors'))
  x, x_nchw = random_input(7, h, w)
  with torch.no_grad():
    logits = reference(torch.from_numpy(x_nchw)).logits
    assert tuple(logits.shape[2:]) == (-(-h // 4), -(-w // 4))
    want = torch.nn.functional.interpolate(logits, size=(h, w), mode='bilinear', align_corners=False)
  want = want.numpy().transpose(0, 2, 3, 1)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_close_relative(got, want, f'SegFormer-B0 logits at {h}x{w}')
  if bfloat16:
    half = models.compose('segformer', num_classes=150, dtype=jnp.bfloat16, encoder='mit_b0')
    got16 = np.asarray(jax.jit(lambda v, x: half.apply(v, x, train=False))(variables, x), np.float32)
    assert np.isfinite(got16).all()
    err = np.max(np.abs(got16 - want)) / np.max(np.abs(want))
    assert err < 0.1, f'SegFormer-B0 bfloat16 logits at {h}x{w}: relative error {err:.2e}'


def test_whole_file_gives_transformers_logits(hf, tmp_path):
  check_whole_model(hf, tmp_path, 100, 75)


@pytest.mark.slow
def test_whole_file_gives_transformers_logits_at_512(hf, tmp_path):
  """ADE20K's size, and the same weights computed in bfloat16 (loosely close)."""
  check_whole_model(hf, tmp_path, 512, 512, bfloat16=True)


def test_a_whole_file_for_other_classes_keeps_the_classifiers_init(hf, tmp_path, caplog):
  """A 150-class file into a 3-class model: all but the classifier loads, with a warning (tiny MiT, no compute)."""
  reference = hf_segformer(hf, seed=8, **TINY, decoder=16)
  sd = saved_state_dict(reference, tmp_path)
  model = models.compose('segformer', num_classes=3, dtype=jnp.float32, encoder=TINY_NAME)
  fresh = zeros_like_init(model)
  with caplog.at_level(logging.WARNING):
    loaded = models.load_weights(model, fresh, str(tmp_path / 'model.safetensors'))
  assert 'another number of classes' in caplog.text and 'decode_head.classifier.weight' in caplog.text
  params = loaded['params']
  np.testing.assert_array_equal(params['segmentation_head']['kernel'], fresh['params']['segmentation_head']['kernel'])
  np.testing.assert_array_equal(params['decoder']['linear_c_3']['kernel'], sd['decode_head.linear_c.3.proj.weight'].T)
  np.testing.assert_array_equal(params['decoder']['linear_fuse']['kernel'][0, 0],
                                sd['decode_head.linear_fuse.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(loaded['batch_stats']['decoder']['batch_norm']['var'],
                                sd['decode_head.batch_norm.running_var'])
  np.testing.assert_array_equal(params['encoder']['block2_1']['attn']['kv']['kernel'][:, 16:],
                                sd['segformer.encoder.block.1.1.attention.self.value.weight'].T)


# ---- bfloat16, bad files. ----


def random_variables(model, seed, size=(64, 64)):
  """Random variables for `model` without compiling its init: kernels normal with std 1/sqrt(fan_in), norm
  scales normal(1, 0.2), biases and BatchNorm means normal(0, 0.2), BatchNorm variances uniform(0.5, 1.5)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    if name == 'var':
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return ((name == 'scale') + 0.2 * rng.normal(size=s.shape)).astype(s.dtype)

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.slow  # bfloat16 compiles the model a second time; CI runs it (-m slow).
def test_bfloat16_runs_close_to_float32():
  """The composed model (tiny MiT) in bfloat16: finite logits, close to float32's with the same (float32)
  parameters."""
  x = np.random.default_rng(9).normal(size=(2, H, W, 3)).astype(np.float32)
  full = models.compose('segformer', num_classes=5, dtype=jnp.float32, encoder=TINY_NAME)
  half = models.compose('segformer', num_classes=5, dtype=jnp.bfloat16, encoder=TINY_NAME)
  variables = random_variables(full, seed=10)
  want = np.asarray(jax.jit(lambda v, x: full.apply(v, x, train=False))(variables, x))
  got = jax.jit(lambda v, x: half.apply(v, x, train=False))(variables, x)
  assert got.shape == (2, H, W, 5) and got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 0.05, f'bfloat16 logits: relative error {err:.2e}'


def test_a_file_of_another_mit_size_names_the_key_and_both_shapes():
  rng = np.random.default_rng(0)
  b0_file = {'segformer.' + k: rng.normal(size=s).astype(np.float32)
             for k, s in encoders.weights.expected_torch_shapes('mit_b0', 'hf').items()}
  with pytest.raises(WeightsError, match=r"mit-b0\.safetensors \(hf layout\) do not fit encoder 'mit_b2'.*"
                                         r"'segformer\.encoder\.patch_embeddings\.0\.proj\.weight' is \[32, 3, 7, 7\] "
                                         r'in the file, mit_b2 needs \[64, 3, 7, 7\].*It looks like mit_b0 weights'):
    encoders.state_dict_to_encoder_weights('mit_b2', b0_file, source='mit-b0.safetensors')


def test_the_decoder_declares_what_the_composition_needs():
  assert SegFormerDecoder.STRIDES == (4, 8, 16, 32) and SegFormerDecoder.HEAD_KERNEL == 1
  assert SegFormerDecoder.UPSAMPLE == 'resize' and SegFormerDecoder.MODEL_FILE.encoder_prefix == 'segformer.'
  for name, arch in mit.ARCHS.items():
    assert registry.encoder_spec(name).decoder_defaults == {'segformer': {'channels': arch['decoder']}}
    assert encoders.encoder_strides(name) == (4, 8, 16, 32)
