"""ViT-S/14 and ViT-B/14 encoders with DINOv2 weights (Oquab et al., 2023; registers: Darcet et al., 2024).

The network, its weight layouts and its registered encoders `vit_small_patch14_dinov2`, `vit_base_patch14_dinov2`,
`vit_small_patch14_reg4_dinov2`, `vit_base_patch14_reg4_dinov2` (timm's names); checked against transformers'
Dinov2Model / Dinov2Backbone and Dinov2WithRegistersModel / ...Backbone (tests/test_dinov2.py).

The network, as transformers computes it in eval mode (tokens are the patch grid's cells, row-major):

  patch embed   conv, kernel = stride = 14, no padding (+ bias): an H x W image gives floor(H/14) x floor(W/14)
                patches (the rest of the image is never seen, as torch's conv floors)
  tokens        [class token, patches] + position embeddings; then, in the register variants, the 4 register
                tokens are inserted after the class token (they get no position embedding)
  block         x = x + ls1 * proj(attention(norm1(x)));  x = x + ls2 * fc2(gelu(fc1(norm2(x))))
  attention     q, k, v = the three thirds of one Linear(C -> 3C) (`qkv`), `heads` heads of C / heads,
                softmax(q k^T / sqrt(head_dim)) v
  outputs       the outputs of blocks `out_blocks` (0-based; (2, 5, 8, 11): blocks 3, 6, 9, 12), each through the
                final LayerNorm `norm` (transformers' Dinov2Backbone with apply_layernorm=True and
                out_indices (3, 6, 9, 12) -- its stage 0 is the embeddings -- and the original DINOv2's
                get_intermediate_layers(n=[2, 5, 8, 11], norm=True), which DPT / Depth Anything read), returned as
                PatchTokens(patches [N, h, w, C], class_token [N, C]); the register tokens are dropped.

The position embeddings are learnt for a 37 x 37 grid (518 x 518 pretraining images) plus the class token's; on
another grid the 37 x 37 part is resampled to (h, w) = (floor(H/14), floor(W/14)) exactly as transformers does it
(`interpolate_pos_embed`), in float32 whatever the compute dtype:
* Dinov2Model: torch's F.interpolate(size=(h, w), mode='bicubic', align_corners=False), no antialias: Keys'
  cubic convolution with a = -0.75, 4 taps, source index (i + 0.5) * 37 / h - 0.5, edge taps clamped;
* Dinov2WithRegistersModel: the same with antialias=True, which in torch is another filter: PIL's, a = -0.5,
  stretched by the scale when shrinking, taps outside the grid dropped and the weights renormalised.
(The original DINOv2 code resamples the non-register models with scale_factor=(h + 0.1) / 37 instead of the size,
and timm resamples both kinds with antialias=True: these differ from transformers by a fraction of a percent of
the embeddings on grids other than 37 x 37; jaxseg follows transformers.)
jax.image.resize's 'cubic' is a = -0.5 without clamping, neither of these, so both are written here as [out, in]
weight matrices (computed in numpy at trace time, applied with one einsum).

Exactly as the reference otherwise: every LayerNorm has epsilon 1e-6 (the DINOv2 configs' layer_norm_eps) and the
two-pass variance (as torch); GELU is the exact one (erf); the attention is jax.nn.dot_product_attention on
[B, tokens, heads, head_dim] (layers.dot_product_attention: cuDNN's fused kernel on a GPU in bfloat16/float16);
no dropout and no drop path (stochastic depth), so train=True computes the same function (fine-tuning with drop
path would need it added). Parameters stay float32; with dtype=bfloat16 the blocks compute in bfloat16.

Flax names follow timm's keys: `blocks.3.attn.qkv.weight` is params['blocks_3']['attn_qkv']['kernel'],
`blocks.3.ls1.gamma` is params['blocks_3']['ls1_gamma'], `patch_embed.proj` is ['patch_embed_proj'].

Weight layouts (`key_table(layout, depth, reg_tokens)`; N = block):

  timm (timm's vit_*_patch14_dinov2 files;     hf (facebook/dinov2-small, -base, ...:      Flax
  the original DINOv2 pretrain .pth files)      Dinov2Model / Dinov2Backbone files)
  cls_token                                     embeddings.cls_token                        cls_token [1, 1, C]
  pos_embed                                     embeddings.position_embeddings              pos_embed [1, 1+37*37, C]
  register_tokens (original reg files)          embeddings.register_tokens                  reg_token [1, 4, C]
  patch_embed.proj.{weight,bias}                embeddings.patch_embeddings.projection.*    patch_embed_proj (conv)
  blocks.N.norm1.{weight,bias}                  encoder.layer.N.norm1.*                     blocks_N/norm1
  blocks.N.attn.qkv.{weight,bias}               encoder.layer.N.attention.attention.query.* blocks_N/attn_qkv, 1st 3rd
                                                encoder.layer.N.attention.attention.key.*   ..., 2nd third
                                                encoder.layer.N.attention.attention.value.* ..., 3rd third
  blocks.N.attn.proj.{weight,bias}              encoder.layer.N.attention.output.dense.*    blocks_N/attn_proj
  blocks.N.ls1.gamma                            encoder.layer.N.layer_scale1.lambda1        blocks_N/ls1_gamma
  blocks.N.norm2.{weight,bias}                  encoder.layer.N.norm2.*                     blocks_N/norm2
  blocks.N.mlp.fc1.{weight,bias}                encoder.layer.N.mlp.fc1.*                   blocks_N/mlp_fc1
  blocks.N.mlp.fc2.{weight,bias}                encoder.layer.N.mlp.fc2.*                   blocks_N/mlp_fc2
  blocks.N.ls2.gamma                            encoder.layer.N.layer_scale2.lambda1        blocks_N/ls2_gamma
  norm.{weight,bias}                            layernorm.*                                 norm

Transposes: the patch conv OIHW -> HWIO; Linear weights [out, in] -> Dense kernels [in, out]; LayerNorm weight ->
scale; the rest as they are. transformers' query/key/value Linears are the thirds (`Entry.part`) of `qkv`'s kernel
and bias, as timm's and the original's qkv output is (B, T, 3, heads, head_dim). The hf keys are those of the files
transformers publishes and writes (save_pretrained reverts 5.x's in-memory names attention.q_proj/k_proj/v_proj/
o_proj to these); its classification files prefix them with `dinov2.` (`dinov2_with_registers.` for the register
models), which the converter strips. Skipped on purpose: the mask token (transformers' embeddings.mask_token, the
original's mask_token: masked-image pretraining only) and the classifiers (timm's head / fc_norm, transformers'
`classifier`).

The register variants read the hf layout and the original DINOv2 files (`register_tokens`, the 'original' layout),
not timm's: timm's conversion adds the class token's position embedding into cls_token and drops it from pos_embed
([1, 37*37, C]), which no key table can split back (a table moves tensors, it does not add them).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import base

# The published architectures (timm's vit_{small,base}_patch14_dinov2 and _reg4_; transformers'
# facebook/dinov2-{small,base} and facebook/dinov2-with-registers-{small,base} configs).
ARCHS = {
    'vit_small_patch14_dinov2': dict(dim=384, depth=12, heads=6),
    'vit_base_patch14_dinov2': dict(dim=768, depth=12, heads=12),
    'vit_small_patch14_reg4_dinov2': dict(dim=384, depth=12, heads=6, reg_tokens=4),
    'vit_base_patch14_reg4_dinov2': dict(dim=768, depth=12, heads=12, reg_tokens=4),
}
PATCH_SIZE = 14
POS_GRID = 37  # 518 / 14: the pretraining grid of the position embeddings.
MLP_RATIO = 4
OUT_BLOCKS = (2, 5, 8, 11)  # 0-based: blocks 3, 6, 9, 12 (transformers' Dinov2Backbone out_indices (3, 6, 9, 12)).
NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-5  # DINOv2's (timm's init_values); the published weights replace it.
# transformers' init (trunc_normal, std initializer_range 0.02, whose +-2 bounds are ~100 sigma) for the Linear and
# conv weights, the class token and the position embeddings; biases and register tokens zero.
KERNEL_INIT = nn.initializers.normal(stddev=0.02)
LAYOUTS = ('timm', 'hf', 'original')
SKIPPED_KEYS = {
    'timm': frozenset({'mask_token', 'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}),
    'original': frozenset({'mask_token', 'head.weight', 'head.bias'}),
    'hf': frozenset({'embeddings.mask_token', 'classifier.weight', 'classifier.bias'}),
}
# Dinov2ForImageClassification's / Dinov2WithRegistersForImageClassification's name for its model.
HF_PREFIX = {False: 'dinov2.', True: 'dinov2_with_registers.'}


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  """torch's LayerNorm(C, eps=1e-6) over the last axis: two-pass variance, as torch computes it."""
  return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


# ---- Position embeddings: torch's bicubic resampling, as [out, in] matrices. ----


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter a (torch: a = -0.75; with antialias, PIL's a = -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """[n_out, n_in] float32 weights of torch's F.interpolate(size=n_out, mode='bicubic', align_corners=False).

  antialias=False (torch's upsample_bicubic2d): source x = (i + 0.5) * n_in / n_out - 0.5, taps floor(x) - 1 ..
  floor(x) + 2 with weights W(x - tap), a = -0.75, tap indices clamped to [0, n_in - 1].
  antialias=True (torch's _upsample_bicubic2d_aa, PIL's resampling): centre c = (i + 0.5) * s, s = n_in / n_out;
  support 2 * max(s, 1); taps j in [int(c - support + 0.5), int(c + support + 0.5)) within [0, n_in), weights
  W((j - c + 0.5) / max(s, 1)) with a = -0.5, divided by their sum.
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  if not antialias:  # In float32 arithmetic, as torch computes the coefficients for float32 tensors.
    f32 = np.float32
    scale32 = f32(n_in) / f32(n_out)
    for i in range(n_out):
      x = scale32 * (f32(i) + f32(0.5)) - f32(0.5)
      lo = int(np.floor(x))
      t = f32(x - f32(lo))
      for k in range(4):
        m[i, min(max(lo - 1 + k, 0), n_in - 1)] += _cubic(f32(t + f32(1 - k)), f32(-0.75))
    return m.astype(np.float32)
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  for i in range(n_out):
    centre = (i + 0.5) * scale
    first = max(int(centre - support + 0.5), 0)
    stop = min(int(centre + support + 0.5), n_in)
    taps = np.arange(first, stop)
    w = _cubic((taps - centre + 0.5) / stretch, -0.5)
    total = w.sum()
    m[i, first:stop] = w / total if total != 0 else w
  return m.astype(np.float32)


def interpolate_pos_embed(grid: jnp.ndarray, size: tuple[int, int], antialias: bool = False) -> jnp.ndarray:
  """A [g, g, C] position-embedding grid resampled to [*size, C] in float32, as transformers does (see above)."""
  g_h, g_w = grid.shape[:2]
  if (g_h, g_w) == tuple(size):
    return grid.astype(jnp.float32)  # torch's resampling to the same size is the identity.
  mh = jnp.asarray(bicubic_matrix(g_h, size[0], antialias))
  mw = jnp.asarray(bicubic_matrix(g_w, size[1], antialias))
  return jnp.einsum('ph,hwc,qw->pqc', mh, grid.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)


# ---- The network. ----


class Block(nn.Module):
  """A pre-norm transformer block with layer scales, on tokens [B, T, dim] (names as timm's, see the docstring)."""
  dim: int
  heads: int
  mlp_ratio: int = MLP_RATIO
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    head_dim = self.dim // self.heads

    def dense(features, name):
      return nn.Dense(features, kernel_init=KERNEL_INIT, dtype=self.dtype, name=name)

    def layer_scale(name):
      return jnp.asarray(self.param(name, nn.initializers.constant(LAYER_SCALE_INIT), (self.dim,), jnp.float32),
                         self.dtype)

    y = layer_norm('norm1', self.dtype)(x)
    qkv = dense(3 * self.dim, 'attn_qkv')(y).reshape(b, t, 3, self.heads, head_dim)
    y = layers.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, t, c)
    x = x + dense(self.dim, 'attn_proj')(y) * layer_scale('ls1_gamma')
    y = layer_norm('norm2', self.dtype)(x)
    y = nn.gelu(dense(self.mlp_ratio * self.dim, 'mlp_fc1')(y), approximate=False)
    return x + dense(self.dim, 'mlp_fc2')(y) * layer_scale('ls2_gamma')


class VisionTransformer(nn.Module):
  """A DINOv2 ViT encoder: images [N, H, W, 3] (normalised) -> len(out_blocks) PatchTokens, shallowest first.

  Each is PatchTokens(patches [N, floor(H/14), floor(W/14), dim], class_token [N, dim]); see the module docstring.

  Attributes:
    dim: token width (384 ViT-S, 768 ViT-B).
    depth: blocks.
    heads: attention heads (dim / heads = 64 in every published one).
    reg_tokens: register tokens (4 in the _reg4_ variants, 0 otherwise).
    patch_size: the patch conv's kernel and stride.
    pos_grid: the position embeddings' grid side (37 for the published weights).
    out_blocks: the blocks whose outputs it returns (0-based).
    output_norm: apply the final LayerNorm to each returned block output (transformers' apply_layernorm).
    pos_antialias: resample the position embeddings with torch's antialias=True (transformers' register models)
      instead of plain bicubic (its Dinov2Model).
    dtype: computation dtype; parameters stay float32.
  """
  dim: int = 384
  depth: int = 12
  heads: int = 6
  reg_tokens: int = 0
  patch_size: int = PATCH_SIZE
  pos_grid: int = POS_GRID
  out_blocks: Sequence[int] = OUT_BLOCKS
  output_norm: bool = True
  pos_antialias: bool = False
  mlp_ratio: int = MLP_RATIO
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[base.PatchTokens]:
    del train  # No dropout, no drop path, no batch statistics: training computes the same function.
    if self.dim % self.heads:
      raise ConfigError(f'ViT dim {self.dim} does not split into {self.heads} heads')
    blocks = tuple(self.out_blocks)
    if not blocks or any(not 0 <= i < self.depth for i in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:])):
      raise ConfigError(f'ViT out_blocks must be increasing block indices in [0, {self.depth}), got {blocks!r}')
    p = self.patch_size
    if x.shape[1] < p or x.shape[2] < p:
      raise ValueError(f'the ViT needs images of at least {p}x{p} pixels, got {x.shape[1]}x{x.shape[2]}')
    x = layers.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', kernel_init=KERNEL_INIT, dtype=self.dtype,
                name='patch_embed_proj')(x)
    n, h, w, c = x.shape
    cls_token = self.param('cls_token', KERNEL_INIT, (1, 1, c), jnp.float32)
    pos_embed = self.param('pos_embed', KERNEL_INIT, (1, 1 + self.pos_grid ** 2, c), jnp.float32)
    patch_pos = interpolate_pos_embed(pos_embed[0, 1:].reshape(self.pos_grid, self.pos_grid, c), (h, w),
                                      self.pos_antialias)
    pos = jnp.concatenate([pos_embed[0, :1], patch_pos.reshape(h * w, c)], axis=0).astype(self.dtype)
    tokens = [jnp.broadcast_to(cls_token.astype(self.dtype), (n, 1, c)), x.reshape(n, h * w, c)]
    x = jnp.concatenate(tokens, axis=1) + pos
    if self.reg_tokens:
      reg_token = self.param('reg_token', nn.initializers.zeros_init(), (1, self.reg_tokens, c), jnp.float32)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg_token.astype(self.dtype), (n, self.reg_tokens, c)),
                           x[:, 1:]], axis=1)
    norm = layer_norm('norm', self.dtype)
    outputs = []
    for i in range(max(self.out_blocks) + 1):
      x = Block(self.dim, self.heads, self.mlp_ratio, dtype=self.dtype, name=f'blocks_{i}')(x)
      if i in self.out_blocks:
        y = norm(x) if self.output_norm else x
        outputs.append(base.PatchTokens(patches=y[:, 1 + self.reg_tokens:].reshape(n, h, w, c),
                                        class_token=y[:, 0]))
    if not self.output_norm and self.is_initializing():
      norm(x)  # The final norm's parameters exist (every weight file has them) also when the outputs skip it.
    for i in range(max(self.out_blocks) + 1, self.depth):
      if self.is_initializing():  # Blocks after the last returned one: parameters only (the files have them).
        x = Block(self.dim, self.heads, self.mlp_ratio, dtype=self.dtype, name=f'blocks_{i}')(x)
    return outputs


# ---- The weight tables and the registered encoders. ----


def key_table(layout: str, depth: int, reg_tokens: int = 0) -> base.KeyTable:
  """Layout `layout`'s table for a ViT of `depth` blocks (see the module docstring).

  Args:
    layout: 'timm' (timm's names; also the original DINOv2 files of the models without registers),
      'original' (the original DINOv2 files: timm's names, `register_tokens`) or 'hf' (transformers'
      Dinov2Model / Dinov2WithRegistersModel file keys).
    depth: blocks.
    reg_tokens: register tokens (their key: timm layout none, see the module docstring).
  """
  if layout not in LAYOUTS:
    raise ConfigError(f'ViT weights layout must be one of {LAYOUTS}, got {layout!r}')
  table: base.KeyTable = {}
  if layout == 'hf':
    table['embeddings.cls_token'] = base.Entry('params', ('cls_token',))
    table['embeddings.position_embeddings'] = base.Entry('params', ('pos_embed',))
    if reg_tokens:
      table['embeddings.register_tokens'] = base.Entry('params', ('reg_token',))
    base.add_conv(table, 'embeddings.patch_embeddings.projection', ('patch_embed_proj',), bias=True)
    for i in range(depth):
      block, p = (f'blocks_{i}',), f'encoder.layer.{i}'
      base.add_layer_norm(table, f'{p}.norm1', block + ('norm1',))
      for index, name in enumerate(('query', 'key', 'value')):
        table[f'{p}.attention.attention.{name}.weight'] = base.Entry('params', block + ('attn_qkv', 'kernel'),
                                                                     'dense', part=(index, 3))
        table[f'{p}.attention.attention.{name}.bias'] = base.Entry('params', block + ('attn_qkv', 'bias'),
                                                                   part=(index, 3))
      base.add_dense(table, f'{p}.attention.output.dense', block + ('attn_proj',))
      table[f'{p}.layer_scale1.lambda1'] = base.Entry('params', block + ('ls1_gamma',))
      base.add_layer_norm(table, f'{p}.norm2', block + ('norm2',))
      base.add_dense(table, f'{p}.mlp.fc1', block + ('mlp_fc1',))
      base.add_dense(table, f'{p}.mlp.fc2', block + ('mlp_fc2',))
      table[f'{p}.layer_scale2.lambda1'] = base.Entry('params', block + ('ls2_gamma',))
    base.add_layer_norm(table, 'layernorm', ('norm',))
    return table
  if layout == 'timm' and reg_tokens:
    raise ConfigError("timm's register-token DINOv2 files fold the class token's position embedding into "
                      "cls_token: read the 'hf' or 'original' layout")
  table['cls_token'] = base.Entry('params', ('cls_token',))
  table['pos_embed'] = base.Entry('params', ('pos_embed',))
  if reg_tokens:
    table['register_tokens'] = base.Entry('params', ('reg_token',))
  base.add_conv(table, 'patch_embed.proj', ('patch_embed_proj',), bias=True)
  for i in range(depth):
    block, p = (f'blocks_{i}',), f'blocks.{i}'
    base.add_layer_norm(table, f'{p}.norm1', block + ('norm1',))
    base.add_dense(table, f'{p}.attn.qkv', block + ('attn_qkv',))
    base.add_dense(table, f'{p}.attn.proj', block + ('attn_proj',))
    table[f'{p}.ls1.gamma'] = base.Entry('params', block + ('ls1_gamma',))
    base.add_layer_norm(table, f'{p}.norm2', block + ('norm2',))
    base.add_dense(table, f'{p}.mlp.fc1', block + ('mlp_fc1',))
    base.add_dense(table, f'{p}.mlp.fc2', block + ('mlp_fc2',))
    table[f'{p}.ls2.gamma'] = base.Entry('params', block + ('ls2_gamma',))
  base.add_layer_norm(table, 'norm', ('norm',))
  return table


def spec(dim: int, depth: int, heads: int, *, reg_tokens: int = 0, pos_grid: int = POS_GRID,
         out_blocks: Sequence[int] = OUT_BLOCKS) -> base.EncoderSpec:
  """The EncoderSpec of VisionTransformer(dim, depth, heads, reg_tokens, ...) with its layouts.

  The models without registers read 'timm' and 'hf' files, those with registers 'hf' and 'original' ones; the
  register models resample their position embeddings with antialias, as transformers' Dinov2WithRegistersModel.
  Its maps are declared at stride 14 with their class tokens; it cannot dilate, so it is built at the composition's
  default output_stride 32 only (which leaves stride-14 maps as they are: strides beyond 32 only are capped).
  """
  out_blocks = tuple(out_blocks)

  def build(*, output_stride: int = 32, frozen_bn: bool = False, dtype: Any = jnp.float32,
            **kwargs) -> VisionTransformer:
    del frozen_bn  # No BatchNorm.
    if output_stride != 32:
      raise ConfigError(f'ViT encoders cannot dilate: output_stride must be 32 (their maps stay at stride '
                        f'{PATCH_SIZE}), got {output_stride!r}')
    return VisionTransformer(dim=dim, depth=depth, heads=heads, reg_tokens=reg_tokens, pos_grid=pos_grid,
                             out_blocks=out_blocks, pos_antialias=bool(reg_tokens), dtype=dtype, **kwargs)

  def layouts() -> tuple[base.WeightLayout, ...]:
    hf = base.WeightLayout('hf', key_table('hf', depth, reg_tokens), skipped=SKIPPED_KEYS['hf'],
                           prefix=HF_PREFIX[bool(reg_tokens)])
    if reg_tokens:
      return (hf, base.WeightLayout('original', key_table('original', depth, reg_tokens),
                                    skipped=SKIPPED_KEYS['original']))
    return (base.WeightLayout('timm', key_table('timm', depth), skipped=SKIPPED_KEYS['timm']), hf)

  return base.EncoderSpec(build=build, layouts=layouts,
                          features=tuple(base.FeatureMap(PATCH_SIZE, dim, class_token=True) for _ in out_blocks))


ENCODERS = {name: spec(**arch) for name, arch in ARCHS.items()}
