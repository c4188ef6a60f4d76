"""ResNet-18/34/50/101 encoders (He et al., 2016) in torchvision's layout, returning their stride 2-32 features.

The module and variable names follow torchvision's state-dict keys one to one
(`layer1.0.conv1.weight` is params['layer1_0']['conv1']['kernel'],
`layer2.0.downsample.1.running_mean` is batch_stats['layer2_0']['downsample_1']['mean']), so that one explicit
table (`key_table`) reads torchvision and timm checkpoints (timm's ResNet keys are torchvision's); their
classifier (`fc.*`) is skipped.

Padding is explicit and symmetric as torch's (`padding=k//2 * dilation`), not 'SAME', which pads a strided
convolution on even inputs asymmetrically and would shift every feature map by a pixel.
"""

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.errors import ConfigError
from jaxseg.models import layers
from jaxseg.models.encoders import base

# torchvision's initialisation (kaiming_normal_, mode='fan_out', nonlinearity='relu'); BatchNorm scale 1, bias 0.
KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
STAGE_WIDTHS = (64, 128, 256, 512)
OUTPUT_STRIDES = (8, 16, 32)
DILATION_RULES = ('torchvision', 'smp')


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, dtype: Any, name: str) -> nn.Conv:
  """torch's Conv2d(kernel, stride, padding=dilation * (kernel // 2), dilation, bias=False)."""
  pad = dilation * (kernel // 2)
  return layers.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation), use_bias=False, kernel_init=KERNEL_INIT, dtype=dtype,
                 name=name)


def batch_norm(*, train: bool, dtype: Any, name: str) -> nn.Module:
  """torch's BatchNorm2d (eps 1e-5, momentum 0.1 = flax's 0.9)."""
  return layers.make_norm('batch', train=train, dtype=dtype)(name=name)


class _Block(nn.Module):
  """The attributes torchvision's two residual blocks share (see BasicBlock for their meaning)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  next_dilation: int = 1
  downsample: bool = False
  train_bn: bool = False
  dtype: Any = jnp.float32


class BasicBlock(_Block):
  """torchvision's BasicBlock: 3x3 conv (stride) -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, ReLU.

  Attributes:
    planes: output channels.
    stride: of conv1 and the downsample shortcut.
    dilation: of conv1 (in a dilated stage's first block: the previous stage's dilation, as torchvision).
    next_dilation: of conv2 (the stage's dilation). torchvision's BasicBlock refuses dilation; this
      extends its rule for Bottleneck: the conv that held the stride keeps the previous dilation, the
      3x3 convs after it take the stage's.
    downsample: a 1x1 conv (stride) + BN shortcut (downsample_0, downsample_1) instead of the identity.
    train_bn: BatchNorm in training mode (batch statistics, updated running averages).
  """
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype)
    y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, name='conv1', **kw)(x)
    y = nn.relu(batch_norm(train=self.train_bn, name='bn1', **kw)(y))
    y = conv(self.planes, 3, dilation=self.next_dilation, name='conv2', **kw)(y)
    y = batch_norm(train=self.train_bn, name='bn2', **kw)(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, stride=self.stride, name='downsample_0', **kw)(x)
      x = batch_norm(train=self.train_bn, name='downsample_1', **kw)(x)
    return nn.relu(y + x)


class Bottleneck(_Block):
  """torchvision's Bottleneck (ResNet v1.5): 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), each with BN.

  Attributes as BasicBlock's; `dilation` is the 3x3 conv's and `next_dilation` is unused (one 3x3 conv).
  """
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype)
    y = conv(self.planes, 1, name='conv1', **kw)(x)
    y = nn.relu(batch_norm(train=self.train_bn, name='bn1', **kw)(y))
    y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, name='conv2', **kw)(y)
    y = nn.relu(batch_norm(train=self.train_bn, name='bn2', **kw)(y))
    y = conv(self.planes * self.expansion, 1, name='conv3', **kw)(y)
    y = batch_norm(train=self.train_bn, name='bn3', **kw)(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, stride=self.stride, name='downsample_0', **kw)(x)
      x = batch_norm(train=self.train_bn, name='downsample_1', **kw)(x)
    return nn.relu(y + x)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def dilate_stages(output_stride: int) -> tuple[bool, bool, bool]:
  """torchvision's replace_stride_with_dilation for layer2, layer3, layer4 at this output stride."""
  if output_stride not in OUTPUT_STRIDES:
    raise ConfigError(f'encoder output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}')
  return {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]


def stage_plan(block: str, stage_sizes: Sequence[int], output_stride: int,
               dilation_rule: str = 'torchvision') -> list[list[dict]]:
  """Per stage, per block: the block's constructor arguments (torchvision's `_make_layer`, stride by stride).

  dilation_rule 'smp': segmentation_models_pytorch's make_dilated instead, which gives every conv of a dilated
  stage the stage's dilation (also the first block's strided 3x3 conv, which torchvision keeps at the previous
  stage's dilation); the same parameters, different outputs.
  """
  if dilation_rule not in DILATION_RULES:
    raise ConfigError(f'dilation_rule must be one of {DILATION_RULES}, got {dilation_rule!r}')
  expansion = BLOCKS[block].expansion
  dilate = (False,) + dilate_stages(output_stride)
  plan, dilation, inplanes = [], 1, 64
  for i, (n_blocks, planes) in enumerate(zip(stage_sizes, STAGE_WIDTHS)):
    stride = 1 if i == 0 else 2
    previous = dilation
    if dilate[i]:
      dilation *= stride
      stride = 1
      if dilation_rule == 'smp':
        previous = dilation
    stage = []
    for b in range(n_blocks):
      first = b == 0
      stage.append(dict(planes=planes, stride=stride if first else 1, dilation=previous if first else dilation,
                        next_dilation=dilation,
                        downsample=first and (stride != 1 or inplanes != planes * expansion)))
    inplanes = planes * expansion
    plan.append(stage)
  return plan


class ResNet(nn.Module):
  """A ResNet encoder: images [N, H, W, 3] (normalised) -> its 5 feature maps, finest first.

  features[0] is after conv1/bn1/relu (stride 2), features[1] after the max-pool and layer1 (4),
  features[2..4] after layer2, layer3, layer4 (8, 16, 32; at output_stride 16 or 8 the last stages keep
  their input's stride and dilate instead, see `strides`). Spatial sizes are those of torch's layers
  (ceil(H / stride) for any H).

  Attributes:
    block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    output_stride: 32, 16 or 8 (torchvision's replace_stride_with_dilation [F,F,F], [F,F,T], [F,T,T]).
    frozen_bn: BatchNorm always uses (and never updates) its running statistics, also when training.
    dilation_rule: 'torchvision' (replace_stride_with_dilation) or 'smp' (smp's make_dilated, which DeepLabV3+
      uses): see `stage_plan`. Only matters at output_stride 16 or 8.
    dtype: computation dtype; parameters stay float32.
  """
  block: str = 'basic'
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  output_stride: int = 32
  frozen_bn: bool = False
  dilation_rule: str = 'torchvision'
  dtype: Any = jnp.float32

  @property
  def channels(self) -> tuple[int, ...]:
    """Channels of the 5 feature maps."""
    return (64,) + tuple(w * BLOCKS[self.block].expansion for w in STAGE_WIDTHS)

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[jnp.ndarray]:
    if self.block not in BLOCKS:
      raise ConfigError(f"ResNet block must be 'basic' or 'bottleneck', got {self.block!r}")
    train_bn = train and not self.frozen_bn
    x = conv(64, 7, stride=2, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(batch_norm(train=train_bn, dtype=self.dtype, name='bn1')(x))
    features = [x]
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # Pads with -inf, as torch.
    block_cls = BLOCKS[self.block]
    for i, stage in enumerate(stage_plan(self.block, self.stage_sizes, self.output_stride, self.dilation_rule)):
      for b, kwargs in enumerate(stage):
        x = block_cls(**kwargs, train_bn=train_bn, dtype=self.dtype, name=f'layer{i + 1}_{b}')(x)
      features.append(x)
    return features


# ---- The weight table and the registered encoders. ----


def key_table(block: str, stage_sizes: Sequence[int]) -> base.KeyTable:
  """torchvision's (= timm's) ResNet keys -> the Flax variables (the same at every output stride)."""
  table: base.KeyTable = {}
  base.add_conv(table, 'conv1', ('conv1',))
  base.add_batch_norm(table, 'bn1', ('bn1',))
  n_convs = 3 if block == 'bottleneck' else 2
  for i, stage in enumerate(stage_plan(block, stage_sizes, 32)):
    for b, block_args in enumerate(stage):
      key, module = f'layer{i + 1}.{b}', f'layer{i + 1}_{b}'
      for c in range(1, n_convs + 1):
        base.add_conv(table, f'{key}.conv{c}', (module, f'conv{c}'))
        base.add_batch_norm(table, f'{key}.bn{c}', (module, f'bn{c}'))
      if block_args['downsample']:
        base.add_conv(table, f'{key}.downsample.0', (module, 'downsample_0'))
        base.add_batch_norm(table, f'{key}.downsample.1', (module, 'downsample_1'))
  return table


def _spec(block: str, stage_sizes: tuple[int, ...]) -> base.EncoderSpec:
  expansion = BLOCKS[block].expansion
  channels = (64,) + tuple(w * expansion for w in STAGE_WIDTHS)

  def build(*, output_stride: int = 32, frozen_bn: bool = False, dtype: Any = jnp.float32, **kwargs) -> ResNet:
    # Dilated for segmentation as segmentation_models_pytorch's make_dilated (DeepLabV3+'s reference); the
    # module's default is torchvision's replace_stride_with_dilation.
    kwargs.setdefault('dilation_rule', 'smp')
    return ResNet(block=block, stage_sizes=stage_sizes, output_stride=output_stride, frozen_bn=frozen_bn,
                  dtype=dtype, **kwargs)

  def layouts() -> tuple[base.WeightLayout, ...]:
    return (base.WeightLayout('torchvision', key_table(block, stage_sizes),
                              skipped=frozenset({'fc.weight', 'fc.bias'})),)

  return base.EncoderSpec(
      build=build, layouts=layouts, output_strides=OUTPUT_STRIDES,
      features=tuple(base.FeatureMap(s, c) for s, c in zip((2, 4, 8, 16, 32), channels)))


ENCODERS = {
    'resnet18': _spec('basic', (2, 2, 2, 2)),
    'resnet34': _spec('basic', (3, 4, 6, 3)),
    'resnet50': _spec('bottleneck', (3, 4, 6, 3)),
    'resnet101': _spec('bottleneck', (3, 4, 23, 3)),
}
