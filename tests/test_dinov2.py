"""DINOv2 ViT encoders, DPT's reassemble neck and decoder, and the linear head, against Hugging Face transformers.

The references are transformers (checked with 5.25.0 beside torch 2.13.0), built from config objects with random
weights (nothing is downloaded):
* the encoders: Dinov2Backbone (apply_layernorm=True, reshape_hidden_states=False: the chosen blocks' tokens through
  the final LayerNorm) and Dinov2WithRegistersBackbone, their weights written by save_pretrained (the keys of the
  published files) and read by jaxseg's one converter; timm cannot be installed, so the timm layout is checked by
  renaming those keys to timm's (query/key/value fused into qkv), as tests/test_convnext.py does;
* DPT: no transformers class runs DINOv2 with DPT's segmentation head, so the reference is composed from
  transformers' modules as its DPTForDepthEstimation composes backbone and neck (Dinov2Backbone -> DPTNeck with
  patch_height = H // 14, patch_width = W // 14) with DPTForSemanticSegmentation's head (DPTSemanticSegmentationHead),
  whose logits are resized to the input size (bilinear, align_corners=False) as its loss does;
* the linear head (the DINOv2 paper's BNHead): computed by hand in numpy/torch on the encoder's output.

Every parameter the initialisers leave constant (layer scales, LayerNorm weights and biases, biases, register
tokens, BatchNorm statistics) is randomised; the input is 100x86 (not 518, not a multiple of 14: the patch grid is
7x6, floored as torch's conv floors, and its odd height exercises DPT's fusion resize); references run in eval mode,
float32, compared to 1e-4 relative (max |diff| / max |reference|). Tiny architectures are registered for this
module only; the full ViT-S/14 runs in the slow selection.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import models
from jaxseg.errors import ConfigError
from jaxseg.models import encoders
from jaxseg.models.decoders import dpt
from jaxseg.models.encoders import base, registry, vit
from jaxseg.models.necks import reassemble
from tests.helpers import import_torch_or_skip
from tests.test_encoders import assert_close_relative

H, W = 100, 86  # A 7x6 patch grid (floored), not 518x518's 37x37.
TINY = dict(dim=32, depth=5, heads=2, pos_grid=6, out_blocks=(1, 2, 3, 4))  # pos_grid 6: HF image_size 84.
TINY_NAME, TINY_REG_NAME = 'test_vit_tiny', 'test_vit_tiny_reg2'
REG = 2
# transformers 5.25.0's Dinov2Model for ViT-S/14 (facebook/dinov2-small's config), its mask token included.
HF_VITS_PARAMS = 22_056_576


@pytest.fixture(autouse=True, scope='module')
def _test_encoders():
  """Registers the tiny architectures for this module only."""
  before = dict(registry.ENCODERS)
  registry.ENCODERS[TINY_NAME] = vit.spec(**TINY)
  registry.ENCODERS[TINY_REG_NAME] = vit.spec(**TINY, reg_tokens=REG)
  yield
  registry.ENCODERS.clear()
  registry.ENCODERS.update(before)


@pytest.fixture(name='hf', scope='module')
def transformers_module():
  os.environ.setdefault('HF_HUB_OFFLINE', '1')  # Everything here is built locally; nothing is downloaded.
  import_torch_or_skip('torch')
  return import_torch_or_skip('transformers')


def hf_vit_config(hf, reg_tokens=0, dim=32, depth=5, heads=2, pos_grid=6, out_blocks=(1, 2, 3, 4)):
  """A Dinov2(WithRegisters)Config of this architecture, its backbone returning `out_blocks` (0-based) tokens."""
  cls = hf.Dinov2WithRegistersConfig if reg_tokens else hf.Dinov2Config
  kwargs = dict(num_register_tokens=reg_tokens) if reg_tokens else {}
  return cls(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, image_size=14 * pos_grid,
             patch_size=14, out_indices=[i + 1 for i in out_blocks], apply_layernorm=True,
             reshape_hidden_states=False, **kwargs)


def randomize_(model, seed):
  """Every parameter and BatchNorm statistic random, at scales that keep every block's contribution visible.

  Tokens and embeddings normal(0, 1); weights normal with std 1/sqrt(fan_in); 1-D weights (LayerNorm, BatchNorm)
  normal(1, 0.3); biases normal(0, 0.2); layer scales normal(0, 0.5) (their 1e-5 / 1.0 inits would hide, or
  equalise, every block's branches); BatchNorm means normal(0, 0.2), variances uniform(0.5, 1.5).
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=gen)
      if name.split('.')[-1] in ('cls_token', 'mask_token', 'position_embeddings', 'register_tokens'):
        p.copy_(z)
      elif name.endswith('lambda1'):
        p.copy_(0.5 * z)
      elif p.dim() > 1:
        p.copy_(z / np.sqrt(p[0].numel()))
      elif name.endswith('.weight'):
        p.copy_(1 + 0.3 * z)
      else:
        p.copy_(0.2 * z)
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
  return model.eval()


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def published_state_dict(model):
  """A transformers model's state dict with the keys its files have (save_pretrained's renaming of 5.x's in-memory
  attention.q_proj/k_proj/v_proj/o_proj back to attention.attention.query/key/value, attention.output.dense)."""
  from transformers.core_model_loading import revert_weight_conversion  # pylint: disable=g-import-not-at-top
  return {k: v.detach().numpy().copy() for k, v in revert_weight_conversion(model, model.state_dict()).items()}


def saved_state_dict(model, path):
  """The model's state dict as save_pretrained writes it (the published files' keys), read back as numpy."""
  model.save_pretrained(path)
  return encoders.read_state_dict(os.path.join(path, 'model.safetensors'))


def random_input(seed, h=H, w=W):
  x = np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def hf_tokens(backbone, x_nchw, reg_tokens=0):
  """The backbone's feature maps (tokens, LayerNormed) as (patches [N, h, w, C], class token [N, C]) numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    maps = backbone(torch.from_numpy(x_nchw)).feature_maps
  h, w = x_nchw.shape[2] // 14, x_nchw.shape[3] // 14
  return [(m[:, 1 + reg_tokens:].reshape(m.shape[0], h, w, -1).numpy(), m[:, 0].numpy()) for m in maps]


@functools.lru_cache(maxsize=None)
def jitted_encoder(name, dtype=jnp.float32):
  module = registry.create_encoder(name, dtype=dtype)
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def assert_tokens_close(got, want, what):
  assert len(got) == len(want), what
  for i, (g, (patches, cls_token)) in enumerate(zip(got, want)):
    assert isinstance(g, base.PatchTokens)
    assert_close_relative(g.patches, patches, f'{what}, map {i} patches')
    assert_close_relative(g.class_token, cls_token, f'{what}, map {i} class token')


# Published transformers keys -> timm's (query/key/value are fused separately).
HF_TO_TIMM = (
    (r'^embeddings\.cls_token$', 'cls_token'),
    (r'^embeddings\.mask_token$', 'mask_token'),
    (r'^embeddings\.position_embeddings$', 'pos_embed'),
    (r'^embeddings\.register_tokens$', 'register_tokens'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^encoder\.layer\.(\d+)\.attention\.output\.dense\.', r'blocks.\1.attn.proj.'),
    (r'^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$', r'blocks.\1.ls\2.gamma'),
    (r'^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.', r'blocks.\1.\2.'),
    (r'^layernorm\.', 'norm.'),
)


def to_timm(state_dict):
  """A published-keys Dinov2 state dict in timm's (and the original DINOv2's) names, q/k/v fused into qkv."""
  out = {}
  for key, value in state_dict.items():
    m = re.match(r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$', key)
    if m:
      if m.group(2) == 'query':
        parts = [state_dict[f'encoder.layer.{m.group(1)}.attention.attention.{n}.{m.group(3)}']
                 for n in ('query', 'key', 'value')]
        out[f'blocks.{m.group(1)}.attn.qkv.{m.group(3)}'] = np.concatenate(parts, axis=0)
      continue
    for pattern, repl in HF_TO_TIMM:
      new, n = re.subn(pattern, repl, key)
      if n:
        out[new] = value
        break
    else:
      raise AssertionError(f'no timm name for {key}')
  return out


def variables_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- Position embeddings. ----


@pytest.mark.parametrize('antialias', [False, True])
def test_position_embeddings_are_resampled_as_torch_does(antialias):
  """torch's F.interpolate(size=..., mode='bicubic', align_corners=False[, antialias=True]) on a 37x37 grid, to
  non-square grids larger, smaller and mixed (what transformers' Dinov2Model / ...WithRegistersModel call)."""
  torch = import_torch_or_skip('torch')
  grid = np.random.default_rng(0).normal(size=(1, 8, 37, 37)).astype(np.float32)
  for size in ((7, 6), (40, 52), (3, 80), (37, 37)):
    want = torch.nn.functional.interpolate(torch.from_numpy(grid), size=size, mode='bicubic', align_corners=False,
                                           antialias=antialias).numpy()[0].transpose(1, 2, 0)
    got = vit.interpolate_pos_embed(jnp.asarray(grid[0].transpose(1, 2, 0)), size, antialias)
    assert_close_relative(got, want, f'bicubic{" antialias" * antialias} 37x37 -> {size}')


# ---- Tables and parameter counts. ----


def test_vit_small_parameter_count_and_hf_table_are_transformers(hf):
  """ViT-S/14: the encoder's count + the mask token = transformers' Dinov2Model's 22,056,576; the hf table is exactly
  its (and Dinov2WithRegistersModel's) file keys less the mask token, with their shapes (nothing computed)."""
  import torch  # pylint: disable=g-import-not-at-top
  shapes = encoders.weights.flax_shapes('vit_small_patch14_dinov2')
  assert sum(int(np.prod(s)) for s in shapes.values()) + 384 == HF_VITS_PARAMS
  with torch.device('meta'):
    model = hf.Dinov2Model(hf.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518))
    reg_model = hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(hidden_size=384, num_attention_heads=6,
                                                                         image_size=518, patch_size=14,
                                                                         num_register_tokens=4))
  assert sum(p.numel() for p in model.parameters()) == HF_VITS_PARAMS
  from transformers.core_model_loading import revert_weight_conversion  # pylint: disable=g-import-not-at-top
  for name, m in (('vit_small_patch14_dinov2', model), ('vit_small_patch14_reg4_dinov2', reg_model)):
    file_shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(m, m.state_dict()).items()}
    assert file_shapes.pop('embeddings.mask_token') == (1, 384)
    assert file_shapes == encoders.weights.expected_torch_shapes(name, 'hf'), name
  timm_shapes = encoders.weights.expected_torch_shapes('vit_small_patch14_dinov2', 'timm')
  assert len(timm_shapes) == 4 + 12 * 14 + 2  # timm's state dict, its (absent) head aside.
  assert timm_shapes['pos_embed'] == (1, 1 + 37 * 37, 384)
  assert timm_shapes['blocks.11.attn.qkv.weight'] == (1152, 384)
  assert encoders.weights.expected_torch_shapes('vit_base_patch14_reg4_dinov2', 'original')['register_tokens'] == (
      1, 4, 768)


def test_query_key_value_are_the_thirds_of_qkv():
  table = vit.key_table('hf', depth=2)
  assert table['encoder.layer.1.attention.attention.key.weight'] == base.Entry(
      'params', ('blocks_1', 'attn_qkv', 'kernel'), 'dense', part=(1, 3))
  assert table['encoder.layer.0.attention.attention.value.bias'] == base.Entry(
      'params', ('blocks_0', 'attn_qkv', 'bias'), part=(2, 3))
  with pytest.raises(ConfigError, match="fold the class token's position embedding"):
    vit.key_table('timm', depth=2, reg_tokens=4)
  assert [layout.name for layout in registry.encoder_spec('vit_small_patch14_reg4_dinov2').layouts()] == [
      'hf', 'original']


# ---- The encoder against transformers' backbones. ----


@pytest.fixture(name='tiny_reference', scope='module')
def tiny_reference_fixture(hf, tmp_path_factory):
  """transformers' Dinov2Backbone (tiny), random weights: its published-key state dict, the input, its tokens."""
  backbone = randomize_(hf.Dinov2Backbone(hf_vit_config(hf)), seed=0)
  path = str(tmp_path_factory.mktemp('dinov2'))
  sd = saved_state_dict(backbone, path)
  x, x_nchw = random_input(1)
  return sd, os.path.join(path, 'model.safetensors'), x, hf_tokens(backbone, x_nchw)


def test_tokens_match_transformers_through_a_saved_file(tiny_reference):
  """hf layout: the file save_pretrained wrote (.safetensors, with the mask token, skipped), read by the converter."""
  _, path, x, want = tiny_reference
  weights = encoders.read_encoder_weights(TINY_NAME, path)
  assert weights.layout == 'hf'
  got = jitted_encoder(TINY_NAME)(weights.variables, x)
  assert [g.patches.shape for g in got] == [(2, 7, 6, 32)] * 4
  assert_tokens_close(got, want, 'tiny DINOv2, hf layout')


def test_timm_and_classification_layouts_give_the_same_variables(tiny_reference):
  """timm's names (q/k/v fused, a classifier head that is skipped) and a Dinov2ForImageClassification file
  (`dinov2.` prefix, its classifier) give the hf file's variables."""
  sd, _, _, _ = tiny_reference
  hf_variables = encoders.state_dict_to_encoder_weights(TINY_NAME, sd, layout='hf').variables
  timm_sd = to_timm(sd)
  timm_sd.update({'head.weight': np.zeros((10, 32), np.float32), 'head.bias': np.zeros(10, np.float32)})
  timm = encoders.state_dict_to_encoder_weights(TINY_NAME, timm_sd)
  assert timm.layout == 'timm'
  variables_equal(timm.variables, hf_variables)
  file_sd = {'dinov2.' + k: v for k, v in sd.items()}
  file_sd.update({'classifier.weight': np.zeros((10, 64), np.float32), 'classifier.bias': np.zeros(10, np.float32)})
  variables_equal(encoders.state_dict_to_encoder_weights(TINY_NAME, file_sd).variables, hf_variables)


def test_register_tokens_match_transformers(hf, tmp_path):
  """Dinov2WithRegistersBackbone (2 registers, antialiased position resampling): hf layout, and the original
  DINOv2 file names (`register_tokens`) giving the same variables."""
  backbone = randomize_(hf.Dinov2WithRegistersBackbone(hf_vit_config(hf, reg_tokens=REG)), seed=2)
  sd = saved_state_dict(backbone, str(tmp_path))
  x, x_nchw = random_input(3)
  variables = encoders.state_dict_to_encoder_weights(TINY_REG_NAME, sd).variables
  assert variables['params']['reg_token'].shape == (1, REG, 32)
  got = jitted_encoder(TINY_REG_NAME)(variables, x)
  assert_tokens_close(got, hf_tokens(backbone, x_nchw, reg_tokens=REG), 'tiny DINOv2 with registers')
  original = encoders.state_dict_to_encoder_weights(TINY_REG_NAME, to_timm(sd))
  assert original.layout == 'original'
  variables_equal(original.variables, variables)


def test_bfloat16_encoder_is_close_to_float32(tiny_reference):
  sd, _, x, _ = tiny_reference
  variables = encoders.state_dict_to_encoder_weights(TINY_NAME, sd).variables
  want = jitted_encoder(TINY_NAME)(variables, x)
  got = jitted_encoder(TINY_NAME, jnp.bfloat16)(variables, x)
  for g, w in zip(got, want):
    assert g.patches.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(g.patches, np.float32)).all()
    err = np.abs(np.asarray(g.patches, np.float32) - np.asarray(w.patches)).max() / np.abs(np.asarray(w.patches)).max()
    assert err < 0.05, err


@pytest.mark.slow
def test_vit_small_tokens_match_transformers(hf):
  """The registered vit_small_patch14_dinov2 (blocks 3, 6, 9, 12) against Dinov2Backbone, out_indices (3, 6, 9, 12)."""
  backbone = randomize_(hf.Dinov2Backbone(hf_vit_config(hf, dim=384, depth=12, heads=6, pos_grid=37,
                                                        out_blocks=vit.OUT_BLOCKS)), seed=4)
  sd = published_state_dict(backbone)
  x, x_nchw = random_input(5)
  variables = encoders.state_dict_to_encoder_weights('vit_small_patch14_dinov2', sd).variables
  got = jitted_encoder('vit_small_patch14_dinov2')(variables, x)
  assert_tokens_close(got, hf_tokens(backbone, x_nchw), 'ViT-S/14 DINOv2')


# ---- DPT: the reassemble neck and the decoder against transformers' DPTNeck + semantic head. ----


HIDDEN_SIZES = [4, 8, 16, 32]  # (C/8, C/4, C/2, C): the neck's default for the tiny width 32.
FUSION = 16


def hf_dpt(hf, seed, num_labels=5, **config):
  """transformers' Dinov2Backbone, DPTNeck and DPTSemanticSegmentationHead for the tiny ViT, random weights."""
  dpt_config = hf.DPTConfig(backbone_config=hf_vit_config(hf), neck_hidden_sizes=HIDDEN_SIZES,
                            fusion_hidden_size=FUSION, num_labels=num_labels, **config)
  from transformers.models.dpt import modeling_dpt  # pylint: disable=g-import-not-at-top
  backbone = hf.Dinov2Backbone(dpt_config.backbone_config)
  neck, head = modeling_dpt.DPTNeck(dpt_config), modeling_dpt.DPTSemanticSegmentationHead(dpt_config)
  return [randomize_(m, seed + i) for i, m in enumerate((backbone, neck, head))]


def hf_dpt_logits(backbone, neck, head, x_nchw):
  """As DPTForDepthEstimation runs backbone and neck, DPTForSemanticSegmentation its head, and its loss resizes."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    pixel_values = torch.from_numpy(x_nchw)
    hidden_states = backbone.forward_with_filtered_kwargs(pixel_values).feature_maps
    _, _, height, width = pixel_values.shape
    hidden_states = neck(hidden_states, height // 14, width // 14)
    logits = head(hidden_states)
    logits = torch.nn.functional.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)
  return logits.numpy().transpose(0, 2, 3, 1)


def dpt_variables(model, backbone, neck, head, readout='project', fusion_batch_norm=False):
  """The transformers modules' weights as the model's variables: the backbone through the encoder converter, the
  neck and head through the reassemble and DPT tables (every key but the unused one placed exactly once)."""
  sd = {**{'neck.' + k: v for k, v in numpy_state_dict(neck).items()},
        **{'head.' + k: v for k, v in numpy_state_dict(head).items()}}
  sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  table = {**reassemble.hf_key_table(readout), **dpt.hf_key_table(fusion_batch_norm)}
  assert set(sd) - set(table) == {k for k in sd if k.startswith(dpt.UNUSED_HF_PREFIX)}
  assert set(table) <= set(sd)
  variables = base.assemble(table, sd, {k: k for k in table}, {})
  encoder_sd = published_state_dict(backbone)
  encoder_variables = encoders.state_dict_to_encoder_weights(model.encoder_name, encoder_sd, layout='hf').variables
  variables['params'][registry.ENCODER_SUBMODULE] = encoder_variables['params']
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3))))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, variables)
  return variables


def compose_dpt(readout='project', fusion_batch_norm=False, dtype=jnp.float32):
  return models.compose('dpt', num_classes=5, dtype=dtype, encoder=TINY_NAME, neck='reassemble',
                        neck_fields={'readout': readout}, fusion_hidden_size=FUSION,
                        fusion_batch_norm=fusion_batch_norm)


@pytest.mark.parametrize('readout,fusion_batch_norm', [('project', False),
                                                        pytest.param('ignore', True, marks=pytest.mark.slow)])
def test_dpt_logits_match_transformers(hf, readout, fusion_batch_norm):
  """DINOv2 (tiny) + reassemble + DPT at 100x86: the logits at the input size; readout 'project' without fusion
  BatchNorm (transformers' defaults), and 'ignore' with it (use_batch_norm_in_fusion_residual)."""
  modules = hf_dpt(hf, seed=10, readout_type=readout, use_batch_norm_in_fusion_residual=fusion_batch_norm)
  model = compose_dpt(readout, fusion_batch_norm)
  assert model.size_multiple == 1
  assert [(f.stride, f.channels) for f in model.decoder_features] == [(3.5, 4), (7, 8), (14, 16), (28, 32)]
  variables = dpt_variables(model, *modules, readout=readout, fusion_batch_norm=fusion_batch_norm)
  x, x_nchw = random_input(11)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert got.shape == (2, H, W, 5)
  assert_close_relative(got, hf_dpt_logits(*modules, x_nchw), f'DPT logits, readout {readout!r}')


@pytest.mark.slow  # bfloat16 compiles the model a second time; CI runs it (-m slow).
def test_dpt_readout_add_and_bfloat16(hf):
  """readout 'add' against transformers; the same model in bfloat16 is finite and close to float32."""
  modules = hf_dpt(hf, seed=20, readout_type='add')
  model = compose_dpt('add')
  variables = dpt_variables(model, *modules, readout='add')
  x, x_nchw = random_input(21)
  want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_close_relative(want, hf_dpt_logits(*modules, x_nchw), "DPT logits, readout 'add'")
  model16 = compose_dpt('add', dtype=jnp.bfloat16)
  got = np.asarray(jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x), np.float32)
  assert np.isfinite(got).all()
  assert np.abs(got - np.asarray(want)).max() / np.abs(np.asarray(want)).max() < 0.05


def test_reassemble_transposed_convolution_is_torchs():
  """The factor-4 resize (ConvTranspose2d, kernel = stride = 4) with torch's [in, out, k, k] weight read as 'conv'."""
  torch = import_torch_or_skip('torch')
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  weight, bias = rng.normal(size=(3, 5, 4, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  x = rng.normal(size=(1, 3, 2, 3)).astype(np.float32)
  conv = torch.nn.ConvTranspose2d(3, 5, 4, stride=4)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(weight))
    conv.bias.copy_(torch.from_numpy(bias))
    want = conv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  layer = nn.ConvTranspose(5, (4, 4), strides=(4, 4), padding='VALID', transpose_kernel=True)
  got = layer.apply({'params': {'kernel': base.to_flax('conv', weight), 'bias': bias}}, x.transpose(0, 2, 3, 1))
  assert_close_relative(got, want, 'transposed conv')


# ---- The linear head. ----


@pytest.mark.parametrize('class_token', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_linear_head_is_batch_norm_and_a_1x1_conv(class_token):
  """BNHead by hand: the last block's patch tokens ([patches, class token broadcast] with class_token) ->
  BatchNorm (running statistics) -> 1x1 conv -> resized to the input (torch's bilinear, align_corners=False)."""
  torch = import_torch_or_skip('torch')
  model = models.compose('linear', num_classes=3, dtype=jnp.float32, encoder=TINY_NAME, class_token=class_token)
  x, _ = random_input(30)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  c = 64 if class_token else 32
  rng = np.random.default_rng(31)
  bn = {'mean': rng.normal(size=c).astype(np.float32) * 0.2, 'var': rng.uniform(0.5, 1.5, c).astype(np.float32)}
  scale, shift = 1 + 0.3 * rng.normal(size=c).astype(np.float32), 0.2 * rng.normal(size=c).astype(np.float32)
  kernel, head_bias = rng.normal(size=(1, 1, c, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
  assert variables['params']['segmentation_head']['kernel'].shape == kernel.shape
  variables = {'params': {**variables['params'], 'decoder': {'bn': {'scale': scale, 'bias': shift}},
                          'segmentation_head': {'kernel': kernel, 'bias': head_bias}},
               'batch_stats': {'decoder': {'bn': bn}}}
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  tokens = jitted_encoder(TINY_NAME)({'params': variables['params']['encoder']}, x)[-1]
  feats = np.asarray(tokens.patches)
  if class_token:
    feats = np.concatenate([feats, np.broadcast_to(np.asarray(tokens.class_token)[:, None, None], feats.shape)], -1)
  normed = (feats - bn['mean']) / np.sqrt(bn['var'] + 1e-5) * scale + shift
  logits = normed @ kernel[0, 0] + head_bias
  want = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(logits.transpose(0, 3, 1, 2))),
                                         size=(H, W), mode='bilinear', align_corners=False)
  assert_close_relative(got, want.numpy().transpose(0, 2, 3, 1), f'linear head logits, class_token={class_token}')


# ---- Which pairs build. ----


def test_pairs_build_or_say_what_does_not_fit():
  with pytest.raises(ConfigError, match=r"decoder 'dpt' reads 4 maps .* need the neck 'reassemble'"):
    models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder='vit_small_patch14_dinov2')
  with pytest.raises(ConfigError, match=r"neck 'reassemble' takes a ViT's 4 block outputs .* 'convnext_tiny' gives "
                                        r'4 map\(s\) at strides \[4, 8, 16, 32\] without class tokens'):
    models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder='convnext_tiny', neck='reassemble')
  with pytest.raises(ConfigError, match=r"decoder 'linear' with class_token reads a ViT's last block output"):
    models.compose('linear', num_classes=2, dtype=jnp.float32, encoder='convnext_tiny', class_token=True)
  with pytest.raises(ConfigError, match=r"decoder 'linear' with class_token reads a ViT's last block output"):
    models.compose('linear', num_classes=2, dtype=jnp.float32, encoder=TINY_NAME, neck='reassemble',
                   class_token=True)
  models.compose('linear', num_classes=2, dtype=jnp.float32, encoder='convnext_tiny')  # A linear probe of a CNN.
  with pytest.raises(ConfigError, match=r"readout must be one of \['project', 'add', 'ignore'\]"):
    models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder=TINY_NAME, neck='reassemble',
                   neck_fields={'readout': 'cls'})
  with pytest.raises(ConfigError, match=r"'vit_small_patch14_dinov2' has output_stride 32 only \(it cannot dilate\)"):
    registry.create_encoder('vit_small_patch14_dinov2', output_stride=16)
  with pytest.raises(ConfigError, match=r"dpt needs output_stride 16, but encoder 'test_vit_tiny' has output_stride"):
    models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder=TINY_NAME, neck='reassemble', output_stride=16)
  # DPT also runs on a CNN pyramid (transformers' DPT on hierarchical backbones skips the reassemble stage).
  models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder='convnext_tiny')
  model = models.compose('dpt', num_classes=2, dtype=jnp.float32, encoder='vit_base_patch14_dinov2',
                         neck='reassemble')
  assert [f.channels for f in model.decoder_features] == [96, 192, 384, 768]


@pytest.mark.slow
def test_dpt_on_vit_small_with_the_default_fields_matches_transformers(hf):
  """The registered vit_small_patch14_dinov2 + reassemble (hidden sizes 48, 96, 192, 384) + DPT (fusion 256), 150
  classes, against transformers' modules configured so (DPTConfig defaults, Dinov2Backbone out_indices 3, 6, 9, 12)."""
  from transformers.models.dpt import modeling_dpt  # pylint: disable=g-import-not-at-top
  backbone_config = hf_vit_config(hf, dim=384, depth=12, heads=6, pos_grid=37, out_blocks=vit.OUT_BLOCKS)
  config = hf.DPTConfig(backbone_config=backbone_config, neck_hidden_sizes=[48, 96, 192, 384], num_labels=150)
  modules = [randomize_(m, 40 + i) for i, m in enumerate((hf.Dinov2Backbone(backbone_config),
                                                           modeling_dpt.DPTNeck(config),
                                                           modeling_dpt.DPTSemanticSegmentationHead(config)))]
  model = models.compose('dpt', num_classes=150, dtype=jnp.float32, encoder='vit_small_patch14_dinov2',
                         neck='reassemble')
  variables = dpt_variables(model, *modules)
  x, x_nchw = random_input(41)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert_close_relative(got, hf_dpt_logits(*modules, x_nchw), 'DPT on ViT-S/14 logits')
