"""MiT-B0..B5 encoders (Mix Transformer, Xie et al., 2021: SegFormer's backbone), four maps at strides 4-32.

The network, its two weight layouts (transformers, the original NVlabs/SegFormer) and its registered encoders
`mit_b0` .. `mit_b5`; checked against transformers' SegformerModel (tests/test_segformer.py).

The network, as transformers' `SegformerModel` computes it in eval mode (output_hidden_states: the 4 stage
outputs), on NHWC maps (tokens are the map's pixels, row-major, as torch's flatten(2)):

  stage i     patch_embed: conv (7x7, stride 4, padding 3 for stage 0; 3x3, stride 2, padding 1 after; + bias),
              then LayerNorm over channels; then `depths[i]` blocks; then LayerNorm (the stage's `norm`)
  block       x = x + attn(norm1(x));  x = x + mlp(norm2(x))
  attn        efficient self-attention of `heads[i]` heads (head_dim = C / heads, scale head_dim^-0.5):
              q = Linear(x); keys and values from x, or, where sr_ratio > 1, from LayerNorm(sr(x)), sr a conv of
              kernel = stride = sr_ratio, no padding (+ bias), which shrinks the map sr_ratio times (floored);
              k, v = the two halves of one Linear(C -> 2C) (`kv`; transformers' separate key/value Linears);
              softmax(q k^T * scale) v, then Linear (`proj`)
  mlp         Mix-FFN: Linear C -> 4C, depthwise 3x3 conv (padding 1, + bias), GELU, Linear 4C -> C

Exactly as the reference:
* every LayerNorm has epsilon 1e-5 (torch's nn.LayerNorm default, which transformers' SegFormer uses for each of
  them: patch embeddings, spatial reduction, the blocks' norms and the stage norms; its config's
  layer_norm_eps 1e-6 is read nowhere) and computes the variance in two passes (mean of (x - mean)^2), as torch
  does, not Flax's default E[x^2] - E[x]^2. The original NVlabs code (and segmentation_models_pytorch's copy
  of it) builds the blocks' norm1/norm2 and the stage norms with eps 1e-6 instead; `norm_eps` sets those
  (1e-6: the original's computation), the registered encoders keep transformers' 1e-5 (the two differ by
  ~eps / variance of each normalised token: ~1e-6 relative on trained weights);
* GELU is the exact one (erf), transformers' ACT2FN['gelu'] / torch's nn.GELU(), not Flax's tanh default;
* the attention is `jax.nn.dot_product_attention` on [B, tokens, heads, head_dim] through
  layers.dot_product_attention: cuDNN's fused kernel on a GPU in bfloat16/float16, XLA's formulation otherwise
  (jax's own default, which never picks cuDNN by itself);
* no dropout and no drop path (stochastic depth): every reference dropout rate is 0 and drop path acts in
  training only, so train=True computes the same function (fine-tuning with drop path would need it added);
* convolutions pad symmetrically as torch's: a side of n pixels gives ceil(n / 4), then halves rounding up
  (70 -> 18 -> 9 -> 5 -> 3), and the spatial reduction floors (18 / 8 -> 2).

The four feature maps are the four stage outputs, finest first: transformers' SegformerModel(...)(x,
output_hidden_states=True).hidden_states (NCHW there), NVlabs' forward_features outputs.

Flax names follow the original (NVlabs) keys: `block2.1.attn.kv.weight` is
params['block2_1']['attn']['kv']['kernel'], `patch_embed1.norm.bias` is params['patch_embed1']['norm']['bias'],
`mlp.dwconv.dwconv` is ['mlp']['dwconv'], the stage norms are params['norm1'..'norm4'].

Weight layouts (`key_table(layout, depths, sr_ratios)`; N = stage 1..4, n = N - 1, M = block):

  nvlabs (NVlabs mit_b*.pth, smp's mix_transformer)  hf (nvidia/mit-b0, ...; `segformer.` prefixed)
  patch_embedN.proj.{weight,bias}        encoder.patch_embeddings.n.proj.*              -> patch_embedN/proj (conv)
  patch_embedN.norm.{weight,bias}        encoder.patch_embeddings.n.layer_norm.*        -> patch_embedN/norm
  blockN.M.norm1.{weight,bias}           encoder.block.n.M.layer_norm_1.*               -> blockN_M/norm1
  blockN.M.attn.q.{weight,bias}          encoder.block.n.M.attention.self.query.*       -> blockN_M/attn/q
  blockN.M.attn.kv.{weight,bias}         encoder.block.n.M.attention.self.key.*         -> .../attn/kv, 1st half
                                         encoder.block.n.M.attention.self.value.*       -> .../attn/kv, 2nd half
  blockN.M.attn.sr.{weight,bias}         encoder.block.n.M.attention.self.sr.*          -> .../attn/sr (conv)
  blockN.M.attn.norm.{weight,bias}       encoder.block.n.M.attention.self.layer_norm.*  -> .../attn/norm
  blockN.M.attn.proj.{weight,bias}       encoder.block.n.M.attention.output.dense.*     -> .../attn/proj
  blockN.M.norm2.{weight,bias}           encoder.block.n.M.layer_norm_2.*               -> blockN_M/norm2
  blockN.M.mlp.fc1.{weight,bias}         encoder.block.n.M.mlp.dense1.*                 -> blockN_M/mlp/fc1
  blockN.M.mlp.dwconv.dwconv.*           encoder.block.n.M.mlp.dwconv.dwconv.*          -> .../mlp/dwconv (conv)
  blockN.M.mlp.fc2.{weight,bias}         encoder.block.n.M.mlp.dense2.*                 -> blockN_M/mlp/fc2
  normN.{weight,bias}                    encoder.layer_norm.n.*                         -> normN

(sr and attn.norm only in stages whose sr_ratio > 1: 1-3 of the registered ones.) Transposes: conv weights
OIHW -> HWIO (the depthwise [4C, 1, 3, 3] -> [3, 3, 1, 4C]); Linear weights [out, in] -> Dense kernels [in, out];
LayerNorm weight -> scale; transformers' key and value Linears are the halves (`Entry.part`) of `kv`'s kernel
and bias, keys first, as NVlabs' kv output is (B, N, 2, heads, head_dim). The hf keys are those of the files
transformers publishes and writes (save_pretrained reverts its 5.x in-memory module names, `stages.n.blocks.M.
attention.q_proj`, ..., to these); its classification files (SegformerForImageClassification, nvidia/mit-b*)
and segmentation files prefix them with `segformer.`, which the converter strips. Skipped on purpose: the
ImageNet classifier (NVlabs' `head.*`, transformers' `classifier.*`).
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import base

# The published architectures (NVlabs' mit_b0..b5; transformers' nvidia/mit-b0..b5 configs): stage widths and
# depths; every one has heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), MLP ratio 4. decoder: the width of the
# SegFormer head they are published with (transformers' decoder_hidden_size).
HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
ARCHS = {
    'mit_b0': dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder=256),
    'mit_b1': dict(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder=256),
    'mit_b2': dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder=768),
    'mit_b3': dict(dims=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder=768),
    'mit_b4': dict(dims=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder=768),
    'mit_b5': dict(dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder=768),
}
STRIDES = (4, 8, 16, 32)
MLP_RATIO = 4
NORM_EPS = 1e-5  # torch's nn.LayerNorm default: every LayerNorm of transformers' SegFormer.
ORIGINAL_NORM_EPS = 1e-6  # NVlabs' (and smp's) blocks' norm1/norm2 and stage norms.
# transformers' init (normal, initializer_range 0.02) for Linear and conv weights; biases zero.
KERNEL_INIT = nn.initializers.normal(stddev=0.02)
LAYOUTS = ('hf', 'nvlabs')
SKIPPED_KEYS = {
    'hf': frozenset({'classifier.weight', 'classifier.bias'}),
    'nvlabs': frozenset({'head.weight', 'head.bias'}),
}
HF_PREFIX = 'segformer.'  # SegformerForImageClassification's / ...ForSemanticSegmentation's SegformerModel.


def layer_norm(name: str, dtype: Any, epsilon: float = NORM_EPS) -> nn.LayerNorm:
  """torch's LayerNorm(C, eps) over the last (channel) axis: two-pass variance, as torch computes it."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


def dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, kernel_init=KERNEL_INIT, dtype=dtype, name=name)


class Attention(nn.Module):
  """Efficient self-attention with spatial reduction, on an NHWC map of `dim` channels (names q, kv, sr, norm, proj).

  Attributes:
    dim: channels (in and out).
    heads: attention heads (dim must divide into them).
    sr_ratio: keys and values come from the map shrunk this many times by a strided conv (1: the map itself).
    dtype: computation dtype; parameters stay float32.
  """
  dim: int
  heads: int
  sr_ratio: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    head_dim = self.dim // self.heads
    q = dense(self.dim, 'q', self.dtype)(x).reshape(b, h * w, self.heads, head_dim)
    source = x
    if self.sr_ratio > 1:
      r = self.sr_ratio
      source = layers.Conv(self.dim, (r, r), strides=(r, r), padding='VALID', kernel_init=KERNEL_INIT,
                       dtype=self.dtype, name='sr')(source)
      source = layer_norm('norm', self.dtype)(source)
    kv = dense(2 * self.dim, 'kv', self.dtype)(source)
    kv = kv.reshape(b, -1, 2, self.heads, head_dim)
    y = layers.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])  # Scale head_dim^-0.5.
    return dense(self.dim, 'proj', self.dtype)(y.reshape(b, h, w, self.dim))


class MixFFN(nn.Module):
  """Mix-FFN: Linear dim -> hidden, depthwise 3x3 conv, exact GELU, Linear hidden -> dim (names fc1, dwconv, fc2)."""
  dim: int
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.hidden, 'fc1', self.dtype)(x)
    x = layers.DepthwiseConv(self.hidden, 3, kernel_init=KERNEL_INIT, dtype=self.dtype, name='dwconv')(x)
    x = nn.gelu(x, approximate=False)
    return dense(self.dim, 'fc2', self.dtype)(x)


class Block(nn.Module):
  """A MiT block: x + attn(norm1(x)), then + mlp(norm2(x)), on NHWC maps of `dim` channels."""
  dim: int
  heads: int
  sr_ratio: int = 1
  mlp_ratio: int = MLP_RATIO
  norm_eps: float = NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layer_norm('norm1', self.dtype, self.norm_eps)(x)
    x = x + Attention(self.dim, self.heads, self.sr_ratio, dtype=self.dtype, name='attn')(y)
    y = layer_norm('norm2', self.dtype, self.norm_eps)(x)
    return x + MixFFN(self.dim, self.dim * self.mlp_ratio, dtype=self.dtype, name='mlp')(y)


class PatchEmbed(nn.Module):
  """Overlapping patch embedding: conv (kernel, stride, padding kernel // 2, + bias) then LayerNorm (proj, norm)."""
  dim: int
  kernel: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.kernel // 2
    x = layers.Conv(self.dim, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                kernel_init=KERNEL_INIT, dtype=self.dtype, name='proj')(x)
    return layer_norm('norm', self.dtype)(x)


class MixTransformer(nn.Module):
  """A MiT encoder: images [N, H, W, 3] (normalised) -> its 4 stage outputs, finest first.

  features[i] has dims[i] channels at stride STRIDES[i] (4, 8, 16, 32); spatial sizes are torch's (ceil(H / 4),
  then halved rounding up per stage). See the module docstring for the exact semantics.

  Attributes:
    dims: channels per stage: (32, 64, 160, 256) B0, (64, 128, 320, 512) B1-B5.
    depths: blocks per stage (see ARCHS).
    heads: attention heads per stage (1, 2, 5, 8).
    sr_ratios: spatial reduction per stage (8, 4, 2, 1).
    mlp_ratio: the Mix-FFN's hidden width over dim (4).
    norm_eps: epsilon of the blocks' norm1/norm2 and the stage norms: 1e-5 transformers (the registered
      encoders), 1e-6 the original NVlabs code; the other LayerNorms have 1e-5 in both.
    dtype: computation dtype; parameters stay float32.
  """
  dims: Sequence[int] = ARCHS['mit_b0']['dims']
  depths: Sequence[int] = ARCHS['mit_b0']['depths']
  heads: Sequence[int] = HEADS
  sr_ratios: Sequence[int] = SR_RATIOS
  mlp_ratio: int = MLP_RATIO
  norm_eps: float = NORM_EPS
  dtype: Any = jnp.float32

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the 4 feature maps."""
    return tuple(self.dims)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[jnp.ndarray]:
    del train  # No batch statistics, no dropout, no drop path: training and eval compute the same function.
    if not len(self.dims) == len(self.depths) == len(self.heads) == len(self.sr_ratios) == 4:
      raise ConfigError(f'MixTransformer takes 4 stages, got dims={self.dims!r} depths={self.depths!r} '
                        f'heads={self.heads!r} sr_ratios={self.sr_ratios!r}')
    for dim, heads in zip(self.dims, self.heads):
      if dim % heads:
        raise ConfigError(f'MixTransformer: width {dim} does not divide into {heads} heads')
    features = []
    for i, (dim, depth, heads, sr) in enumerate(zip(self.dims, self.depths, self.heads, self.sr_ratios)):
      x = PatchEmbed(dim, 7 if i == 0 else 3, 4 if i == 0 else 2, dtype=self.dtype, name=f'patch_embed{i + 1}')(x)
      for j in range(depth):
        x = Block(dim, heads, sr, self.mlp_ratio, self.norm_eps, dtype=self.dtype, name=f'block{i + 1}_{j}')(x)
      x = layer_norm(f'norm{i + 1}', self.dtype, self.norm_eps)(x)
      features.append(x)
    return features


# ---- The weight tables and the registered encoders. ----


def key_table(layout: str, depths: Sequence[int], sr_ratios: Sequence[int] = SR_RATIOS) -> base.KeyTable:
  """Layout `layout`'s table for a MiT of these depths and sr ratios (see the module docstring).

  Args:
    layout: 'hf' (transformers' SegformerModel file keys: encoder.patch_embeddings.*, encoder.block.*,
      encoder.layer_norm.*) or 'nvlabs' (the original: patch_embedN.*, blockN.M.*, normN.*).
    depths: blocks per stage.
    sr_ratios: spatial reduction per stage (the sr conv and its norm exist where > 1).
  """
  if layout not in LAYOUTS:
    raise ConfigError(f'MiT weights layout must be one of {LAYOUTS}, got {layout!r}')
  table: base.KeyTable = {}
  hf = layout == 'hf'
  for i, (depth, sr) in enumerate(zip(depths, sr_ratios)):
    embed = (f'patch_embed{i + 1}',)
    key = f'encoder.patch_embeddings.{i}' if hf else f'patch_embed{i + 1}'
    base.add_conv(table, f'{key}.proj', embed + ('proj',), bias=True)
    base.add_layer_norm(table, f'{key}.layer_norm' if hf else f'{key}.norm', embed + ('norm',))
    for j in range(depth):
      block = (f'block{i + 1}_{j}',)
      attn = block + ('attn',)
      if hf:
        p = f'encoder.block.{i}.{j}'
        base.add_layer_norm(table, f'{p}.layer_norm_1', block + ('norm1',))
        base.add_dense(table, f'{p}.attention.self.query', attn + ('q',))
        for index, name in enumerate(('key', 'value')):
          table[f'{p}.attention.self.{name}.weight'] = base.Entry('params', attn + ('kv', 'kernel'), 'dense',
                                                                 part=(index, 2))
          table[f'{p}.attention.self.{name}.bias'] = base.Entry('params', attn + ('kv', 'bias'), part=(index, 2))
        if sr > 1:
          base.add_conv(table, f'{p}.attention.self.sr', attn + ('sr',), bias=True)
          base.add_layer_norm(table, f'{p}.attention.self.layer_norm', attn + ('norm',))
        base.add_dense(table, f'{p}.attention.output.dense', attn + ('proj',))
        base.add_layer_norm(table, f'{p}.layer_norm_2', block + ('norm2',))
        base.add_dense(table, f'{p}.mlp.dense1', block + ('mlp', 'fc1'))
        base.add_conv(table, f'{p}.mlp.dwconv.dwconv', block + ('mlp', 'dwconv'), bias=True)
        base.add_dense(table, f'{p}.mlp.dense2', block + ('mlp', 'fc2'))
      else:
        p = f'block{i + 1}.{j}'
        base.add_layer_norm(table, f'{p}.norm1', block + ('norm1',))
        base.add_dense(table, f'{p}.attn.q', attn + ('q',))
        base.add_dense(table, f'{p}.attn.kv', attn + ('kv',))
        if sr > 1:
          base.add_conv(table, f'{p}.attn.sr', attn + ('sr',), bias=True)
          base.add_layer_norm(table, f'{p}.attn.norm', attn + ('norm',))
        base.add_dense(table, f'{p}.attn.proj', attn + ('proj',))
        base.add_layer_norm(table, f'{p}.norm2', block + ('norm2',))
        base.add_dense(table, f'{p}.mlp.fc1', block + ('mlp', 'fc1'))
        base.add_conv(table, f'{p}.mlp.dwconv.dwconv', block + ('mlp', 'dwconv'), bias=True)
        base.add_dense(table, f'{p}.mlp.fc2', block + ('mlp', 'fc2'))
    base.add_layer_norm(table, f'encoder.layer_norm.{i}' if hf else f'norm{i + 1}', (f'norm{i + 1}',))
  return table


def spec(dims: Sequence[int], depths: Sequence[int], *, heads: Sequence[int] = HEADS,
         sr_ratios: Sequence[int] = SR_RATIOS, mlp_ratio: int = MLP_RATIO, decoder: int = 256,
         norm_eps: float = NORM_EPS) -> base.EncoderSpec:
  """The EncoderSpec of MixTransformer(dims, depths, heads, sr_ratios, mlp_ratio, norm_eps).

  decoder: the SegFormer head's width it is published with (decoder_defaults['segformer']['channels']).
  """
  dims, depths, heads, sr_ratios = tuple(dims), tuple(depths), tuple(heads), tuple(sr_ratios)

  def build(*, output_stride: int = 32, frozen_bn: bool = False, dtype: Any = jnp.float32,
            **kwargs) -> MixTransformer:
    del frozen_bn  # No BatchNorm.
    if output_stride != 32:
      raise ConfigError(f'MiT encoders have output_stride 32 only, got {output_stride!r}')
    return MixTransformer(dims=dims, depths=depths, heads=heads, sr_ratios=sr_ratios, mlp_ratio=mlp_ratio,
                          norm_eps=norm_eps, dtype=dtype, **kwargs)

  def layouts() -> tuple[base.WeightLayout, ...]:
    return (base.WeightLayout('hf', key_table('hf', depths, sr_ratios), skipped=SKIPPED_KEYS['hf'],
                              prefix=HF_PREFIX),
            base.WeightLayout('nvlabs', key_table('nvlabs', depths, sr_ratios), skipped=SKIPPED_KEYS['nvlabs']))

  defaults: Mapping[str, Mapping[str, Any]] = {'segformer': {'channels': decoder}}
  return base.EncoderSpec(build=build, layouts=layouts, decoder_defaults=defaults,
                          features=tuple(base.FeatureMap(s, c) for s, c in zip(STRIDES, dims)))


ENCODERS = {name: spec(**arch) for name, arch in ARCHS.items()}
