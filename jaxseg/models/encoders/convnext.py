"""ConvNeXt-T/S/B encoders (Liu et al., 2022) returning their four stage outputs (strides 4, 8, 16, 32).

The network, its two weight layouts (timm, transformers) and its registered encoders `convnext_tiny`,
`convnext_small`, `convnext_base`; checked against transformers' ConvNextModel / ConvNextBackbone
(tests/test_convnext.py).

The network, as timm's `ConvNeXt` and transformers' `ConvNextModel` compute it in eval mode:

  stem        4x4 conv, stride 4, no padding (+ bias), then LayerNorm over channels
  stage i>0   downsample: LayerNorm over channels, then 2x2 conv, stride 2, no padding (+ bias)
  block       x + gamma * fc2(gelu(fc1(LayerNorm(dwconv7x7(x)))))   (dwconv: depthwise, padding 3, + bias;
              fc1: C -> 4C, fc2: 4C -> C, both with bias; gamma: per-channel layer scale)

Exactly as the references:
* every LayerNorm has epsilon 1e-6 (timm's LayerNorm/LayerNorm2d default; transformers passes eps=1e-6 to each
  of these, its config's layer_norm_eps 1e-12 is only the pooled classifier norm, which this encoder lacks) and
  computes the variance in two passes (mean of (x - mean)^2), as torch does, not Flax's default E[x^2] - E[x]^2;
* GELU is the exact one (erf), torch's nn.GELU() / F.gelu default, not the tanh approximation (Flax's nn.gelu
  default);
* no drop path (stochastic depth): an encoder run with train=False is the references' eval mode, and this module
  has no stochastic depth at all (fine-tuning with drop path would need it added);
* convolutions have no padding where torch's have none: a size that is not a multiple of 32 is floored at each
  stride as torch floors it (70 -> 17 -> 8 -> 4 -> 2), unlike ResNet's padded convs, which round up.

The four feature maps are the outputs of the four stages, finest first: what timm's
`create_model(..., features_only=True)` returns (hooks on `stages.0..3`, no normalisation) and transformers'
ConvNextModel(...)(x, output_hidden_states=True).hidden_states[1:]. transformers' ConvNextBackbone
(out_features=['stage1', ..., 'stage4'], which UperNet uses) instead applies one more LayerNorm (eps 1e-6) to
each of them, its `hidden_states_norms.stageN` (the original ConvNeXt segmentation code's `norm{i}` layers):
`output_norms=True` adds those four LayerNorms, and the registered encoders have them (the backbone of the
ConvNeXt paper's segmentation models and of transformers' UperNet). Classification checkpoints (timm's,
facebook/convnext-*-224) have no weights for them: they start at scale 1, bias 0, what transformers gives them
when it loads such a file into a ConvNextBackbone (`complete_output_norms`).

Flax names follow timm's keys one to one: `stages.1.blocks.0.mlp.fc1.weight` is
params['stages_1']['blocks_0']['mlp_fc1']['kernel'], `stem.1.bias` is params['stem_1']['bias']; the output norms
are params['out_norm_0'..'out_norm_3'] (transformers' hidden_states_norms.stage1..stage4).

Weight layouts (`key_table(layout, depths, output_norms)`, every key -> Flax variable and its conversion):

  timm (convnext_tiny.fb_in22k_ft_in1k, ...)   transformers (facebook/convnext-tiny-224, ...)
  stem.0.{weight,bias}                          embeddings.patch_embeddings.{weight,bias}      -> stem_0 (conv)
  stem.1.{weight,bias}                          embeddings.layernorm.{weight,bias}             -> stem_1 (norm)
  stages.N.downsample.0.{weight,bias}           encoder.stages.N.downsampling_layer.0.*        -> stages_N/downsample_0
  stages.N.downsample.1.{weight,bias}           encoder.stages.N.downsampling_layer.1.*        -> stages_N/downsample_1
  stages.N.blocks.M.conv_dw.{weight,bias}       encoder.stages.N.layers.M.dwconv.*             -> .../conv_dw
  stages.N.blocks.M.norm.{weight,bias}          encoder.stages.N.layers.M.layernorm.*          -> .../norm
  stages.N.blocks.M.mlp.fc1.{weight,bias}       encoder.stages.N.layers.M.pwconv1.*            -> .../mlp_fc1
  stages.N.blocks.M.mlp.fc2.{weight,bias}       encoder.stages.N.layers.M.pwconv2.*            -> .../mlp_fc2
  stages.N.blocks.M.gamma                       encoder.stages.N.layers.M.layer_scale_parameter -> .../gamma
  (none)                                        hidden_states_norms.stageK.{weight,bias}       -> out_norm_{K-1}

(stages.0 has no downsample.) Transposes: conv weights OIHW -> HWIO (the depthwise [C, 1, 7, 7] -> [7, 7, 1, C]
likewise); Linear weights [out, in] -> Dense kernels [in, out]; LayerNorm weight -> scale; vectors as they are.
transformers' keys are those of a ConvNextModel / ConvNextBackbone state dict; its classification files
(ConvNextForImageClassification) prefix them with `convnext.`, which the converter strips. Skipped on purpose:
the classifier and the norm of the pooled features before it (timm's head.norm/head.fc; transformers'
layernorm/classifier).
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import base

# The published architectures: stage depths and widths (timm's convnext_tiny/small/base, transformers'
# facebook/convnext-{tiny,small,base}-224 configs).
ARCHS = {
    'convnext_tiny': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    'convnext_small': dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    'convnext_base': dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
}
STRIDES = (4, 8, 16, 32)
NORM_EPS = 1e-6
# timm's init (trunc_normal_(std=.02), whose bounds +-2 are absolute, i.e. ~100 sigma: a plain normal) and
# transformers' (normal, initializer_range 0.02) for conv and Linear weights; biases zero.
KERNEL_INIT = nn.initializers.normal(stddev=0.02)
LAYOUTS = ('timm', 'hf')
# Keys of a classification checkpoint that the encoder does not use, skipped on purpose: the classifier and the
# LayerNorm on the pooled features before it (timm's head.norm; transformers' ConvNextModel.layernorm).
SKIPPED_KEYS = {
    'timm': frozenset({'head.norm.weight', 'head.norm.bias', 'head.fc.weight', 'head.fc.bias'}),
    'hf': frozenset({'layernorm.weight', 'layernorm.bias', 'classifier.weight', 'classifier.bias'}),
}
HF_PREFIX = 'convnext.'  # ConvNextForImageClassification's name for its ConvNextModel.


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  """torch's LayerNorm(C, eps=1e-6) over the last (channel) axis: two-pass variance, as torch computes it."""
  return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


class Block(nn.Module):
  """A ConvNeXt block: x + gamma * fc2(gelu(fc1(LayerNorm(dwconv7x7(x))))), on NHWC maps of `dim` channels.

  Attributes:
    dim: channels (in and out).
    layer_scale_init: gamma's initial value (1e-6 as the references).
    dtype: computation dtype; parameters stay float32.
  """
  dim: int
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # The grouped convolution, not layers.DepthwiseConv: 49 shifted copies run 3.9x faster on XLA:CPU but compile
    # ~3 s longer per block (benchmarks/NOTES.md), and ConvNeXt is trained on accelerators.
    y = layers.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                    kernel_init=KERNEL_INIT, dtype=self.dtype, name='conv_dw')(x)
    y = layer_norm('norm', self.dtype)(y)
    y = nn.Dense(4 * self.dim, kernel_init=KERNEL_INIT, dtype=self.dtype, name='mlp_fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.dim, kernel_init=KERNEL_INIT, dtype=self.dtype, name='mlp_fc2')(y)
    gamma = self.param('gamma', nn.initializers.constant(self.layer_scale_init), (self.dim,), jnp.float32)
    return x + y * jnp.asarray(gamma, y.dtype)


class Stage(nn.Module):
  """One stage: (stages 1-3) LayerNorm + 2x2 stride-2 conv to `dim` channels, then `depth` blocks."""
  dim: int
  depth: int
  downsample: bool
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = layer_norm('downsample_0', self.dtype)(x)
      x = layers.Conv(self.dim, (2, 2), strides=(2, 2), padding='VALID', kernel_init=KERNEL_INIT, dtype=self.dtype,
                  name='downsample_1')(x)
    for j in range(self.depth):
      x = Block(self.dim, self.layer_scale_init, dtype=self.dtype, name=f'blocks_{j}')(x)
    return x


class ConvNeXt(nn.Module):
  """A ConvNeXt encoder: images [N, H, W, 3] (normalised) -> its 4 stage outputs, finest first.

  features[i] has dims[i] channels at stride STRIDES[i] (4, 8, 16, 32); spatial sizes are torch's
  (floor(H / 4), then halved and floored per stage). See the module docstring for the exact semantics.

  Attributes:
    depths: blocks per stage: (3, 3, 9, 3) ConvNeXt-T, (3, 3, 27, 3) -S and -B (see ARCHS).
    dims: channels per stage: (96, 192, 384, 768) T and S, (128, 256, 512, 1024) B.
    layer_scale_init: the layer scales' (gamma's) initial value; must be > 0 (every T/S/B checkpoint has them).
    output_norms: a LayerNorm (eps 1e-6) on each returned map, as transformers' ConvNextBackbone; False: the
      stage outputs as they are, as timm's features_only.
    dtype: computation dtype; parameters stay float32.
  """
  depths: Sequence[int] = ARCHS['convnext_tiny']['depths']
  dims: Sequence[int] = ARCHS['convnext_tiny']['dims']
  layer_scale_init: float = 1e-6
  output_norms: bool = False
  dtype: Any = jnp.float32

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the 4 feature maps."""
    return tuple(self.dims)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[jnp.ndarray]:
    del train  # No batch statistics and no drop path: training and eval compute the same function.
    if len(self.depths) != 4 or len(self.dims) != 4:
      raise ConfigError(f'ConvNeXt takes 4 stage depths and 4 dims, got depths={self.depths!r} dims={self.dims!r}')
    if not self.layer_scale_init > 0:
      raise ConfigError(f'ConvNeXt layer_scale_init must be > 0, got {self.layer_scale_init!r}')
    x = layers.Conv(self.dims[0], (4, 4), strides=(4, 4), padding='VALID', kernel_init=KERNEL_INIT, dtype=self.dtype,
                name='stem_0')(x)
    x = layer_norm('stem_1', self.dtype)(x)
    features = []
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = Stage(dim, depth, downsample=i > 0, layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                name=f'stages_{i}')(x)
      features.append(layer_norm(f'out_norm_{i}', self.dtype)(x) if self.output_norms else x)
    return features


# ---- The weight tables and the registered encoders. ----


def key_table(layout: str, depths: Sequence[int], *, output_norms: bool = False) -> base.KeyTable:
  """Layout `layout`'s table for a ConvNeXt of these depths (see the module docstring).

  Args:
    layout: 'timm' (stem.*, stages.N.downsample.*, stages.N.blocks.M.*) or 'hf' (transformers' ConvNextModel /
      ConvNextBackbone keys: embeddings.*, encoder.stages.*, hidden_states_norms.*).
    depths: blocks per stage.
    output_norms: the encoder has output norms: the hf table lists hidden_states_norms.stage1..4 as optional
      keys (its classification files lack them); timm's files never have them.
  """
  if layout not in LAYOUTS:
    raise ConfigError(f'ConvNeXt weights layout must be one of {LAYOUTS}, got {layout!r}')
  table: base.KeyTable = {}
  timm = layout == 'timm'
  base.add_conv(table, 'stem.0' if timm else 'embeddings.patch_embeddings', ('stem_0',), bias=True)
  base.add_layer_norm(table, 'stem.1' if timm else 'embeddings.layernorm', ('stem_1',))
  for i, depth in enumerate(depths):
    stage = ('stages_' + str(i),)
    prefix = f'stages.{i}' if timm else f'encoder.stages.{i}'
    if i > 0:
      down = f'{prefix}.downsample' if timm else f'{prefix}.downsampling_layer'
      base.add_layer_norm(table, f'{down}.0', stage + ('downsample_0',))
      base.add_conv(table, f'{down}.1', stage + ('downsample_1',), bias=True)
    for j in range(depth):
      block = stage + (f'blocks_{j}',)
      p = f'{prefix}.blocks.{j}' if timm else f'{prefix}.layers.{j}'
      names = (('conv_dw', 'norm', 'mlp.fc1', 'mlp.fc2', 'gamma') if timm
               else ('dwconv', 'layernorm', 'pwconv1', 'pwconv2', 'layer_scale_parameter'))
      base.add_conv(table, f'{p}.{names[0]}', block + ('conv_dw',), bias=True)
      base.add_layer_norm(table, f'{p}.{names[1]}', block + ('norm',))
      base.add_dense(table, f'{p}.{names[2]}', block + ('mlp_fc1',))
      base.add_dense(table, f'{p}.{names[3]}', block + ('mlp_fc2',))
      table[f'{p}.{names[4]}'] = base.Entry('params', block + ('gamma',))
  if output_norms and not timm:
    for i in range(len(depths)):
      base.add_layer_norm(table, f'hidden_states_norms.stage{i + 1}', (f'out_norm_{i}',), optional=True)
  return table


def complete_output_norms(variables: dict, shapes: Mapping[tuple[str, tuple], tuple]) -> dict:
  """The output norms a file lacks: scale 1, bias 0 (what transformers gives a ConvNextBackbone it loads)."""
  params = variables.setdefault('params', {})
  for (collection, path), shape in shapes.items():
    if collection == 'params' and path[0].startswith('out_norm_') and path[0] not in params:
      params[path[0]] = {'scale': np.ones(shape, np.float32), 'bias': np.zeros(shape, np.float32)}
  return variables


def spec(depths: Sequence[int], dims: Sequence[int], *, output_norms: bool = True) -> base.EncoderSpec:
  """The EncoderSpec of ConvNeXt(depths, dims, output_norms)."""
  depths, dims = tuple(depths), tuple(dims)

  def build(*, output_stride: int = 32, frozen_bn: bool = False, dtype: Any = jnp.float32,
            **kwargs) -> ConvNeXt:
    del frozen_bn  # No BatchNorm.
    if output_stride != 32:
      raise ConfigError(f'ConvNeXt encoders have output_stride 32 only, got {output_stride!r}')
    return ConvNeXt(depths=depths, dims=dims, output_norms=output_norms, dtype=dtype, **kwargs)

  def layouts() -> tuple[base.WeightLayout, ...]:
    complete = complete_output_norms if output_norms else None
    return (base.WeightLayout('timm', key_table('timm', depths, output_norms=output_norms),
                              skipped=SKIPPED_KEYS['timm'], complete=complete),
            base.WeightLayout('hf', key_table('hf', depths, output_norms=output_norms),
                              skipped=SKIPPED_KEYS['hf'], prefix=HF_PREFIX, complete=complete))

  return base.EncoderSpec(build=build, layouts=layouts,
                          features=tuple(base.FeatureMap(s, c) for s, c in zip(STRIDES, dims)))


ENCODERS = {name: spec(**arch) for name, arch in ARCHS.items()}
