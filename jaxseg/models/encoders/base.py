"""The encoder contract: what an encoder family module declares, and the key-table entries of its weight files.

An encoder family is one module (resnet.py, vgg.py, convnext.py) that defines its Flax network and an
`ENCODERS` dict of `EncoderSpec`s, one per registered name; registry.py merges those dicts (one line per family).
A spec states everything the rest of jaxseg needs, so nothing outside the family module asks which family it is:

* `features`: the feature maps the network returns, finest first, as (stride, channels) at output stride 32;
* `output_strides`: the output strides it can be built for (dilating its last stages instead of striding);
* `input_mean` / `input_std`: the statistics its published weights were trained with (0-255 units);
* `layouts`: for every weight-file layout it reads (torchvision, timm, transformers), a table from each key of
  such a file to the Flax variable it fills, plus the keys skipped on purpose; `weights.py` turns any of them
  into the encoder's variables with one generic converter.

Decoders ask for strides, never positions: `features_by_stride` gives them {stride: map}.
"""

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import numpy as np

from jaxseg.errors import ConfigError
from jaxseg.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

Path = tuple[str, ...]

# How a tensor of a weight file becomes the Flax variable (see Entry.kind).
KINDS = ('conv', 'dense', 'vector')


@dataclasses.dataclass(frozen=True)
class FeatureMap:
  """One feature map an encoder returns: its stride (input pixels per map pixel) and channels.

  stride: an int for CNN pyramids; a neck on a ViT/14 gives 3.5 and 7 as well (patch size / 4, / 2).
  class_token: the map comes as PatchTokens (a ViT block's patch grid and its class token), not an array.
  """
  stride: float
  channels: int
  class_token: bool = False


class PatchTokens(NamedTuple):
  """A ViT block's output as a map: `patches` [N, h, w, C] (the patch tokens on their grid), `class_token` [N, C]."""
  patches: Any
  class_token: Any


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one key of a weight file goes: collection ('params' / 'batch_stats'), path inside the encoder, kind.

  kind: 'conv' (torch OIHW -> Flax HWIO; also depthwise [C, 1, k, k] -> [k, k, 1, C]), 'dense' (torch Linear
  [out, in] -> Dense [in, out]) or 'vector' (as it is: biases, norm weights, running statistics, layer scales).
  optional: a file may lack all of the layout's optional keys (e.g. transformers' ConvNextBackbone output norms
  in its classification files); the layout's `complete` then supplies those variables.
  part: (index, count) when the file splits one Flax variable into `count` tensors: this key is slice `index` of
    `count` equal slices of the variable's last axis (transformers' separate query/key/value Linears, which
    timm's and the original files fuse into one `qkv` / `kv` Linear, as the Flax modules do).
  """
  collection: str
  path: Path
  kind: str = 'vector'
  optional: bool = False
  part: Optional[tuple[int, int]] = None


KeyTable = dict[str, Entry]


@dataclasses.dataclass(frozen=True)
class Extras:
  """Weights a file of this layout may hold besides the encoder's, for a decoder that asks for them by `name`.

  VGG's ImageNet classifier (fc6/fc7, which FCN convolutionalises) is the one case: `read(state_dict)` returns
  (tree or None when the file has none of `keys`, problems as messages).
  """
  name: str
  keys: frozenset
  read: Callable[[Mapping[str, Any]], tuple[Optional[dict], list[str]]]


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """One layout of weight files an encoder reads.

  Attributes:
    name: 'torchvision', 'timm', 'hf' (Hugging Face transformers), ...: for messages and `layout=` arguments.
    table: file key -> Entry, for every variable of the encoder the layout has.
    skipped: keys of a classification checkpoint the encoder does not use (the classifier), skipped on purpose.
    prefix: a prefix the layout's classification files put before every key (transformers' `convnext.`),
      stripped when present.
    complete: fills the variables that a file of this layout lacks (its optional keys, or variables the layout
      never has), given the converted variables and the encoder's variable shapes; None when there are none.
    extras: weights beside the encoder's that files of this layout may hold (see Extras).
  """
  name: str
  table: KeyTable
  skipped: frozenset = frozenset()
  prefix: str = ''
  complete: Optional[Callable[[dict, Mapping[tuple[str, Path], tuple]], dict]] = None
  extras: Optional[Extras] = None


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """A registered encoder: how to build it and what it declares (see the module docstring).

  Attributes:
    build: (output_stride, frozen_bn, dtype, **module kwargs such as name) -> the Flax module, whose
      `__call__(images, train=...)` returns the maps of `features_at(output_stride)`, finest first.
    features: the maps at output stride 32, finest first.
    layouts: a function giving the weight layouts, each a WeightLayout (built lazily: tables can be long).
    output_strides: the output strides `build` takes; (32,) for an encoder that cannot dilate.
    input_mean, input_std: per RGB channel, 0-255 units.
    decoder_defaults: decoder name -> its fields as the encoder's published pairing has them (SegFormer's head
      is 256 wide on MiT-B0/B1, 768 on B2-B5); a config's own value wins.
  """
  build: Callable[..., nn.Module]
  features: tuple[FeatureMap, ...]
  layouts: Callable[[], tuple[WeightLayout, ...]]
  output_strides: tuple[int, ...] = (32,)
  input_mean: tuple[float, ...] = IMAGENET_MEAN
  input_std: tuple[float, ...] = IMAGENET_STD
  decoder_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def features_at(self, output_stride: int = 32) -> tuple[FeatureMap, ...]:
    """The maps when built at `output_stride`: strides beyond it stay at it (the dilated stages)."""
    return tuple(dataclasses.replace(f, stride=min(f.stride, output_stride)) for f in self.features)

  def layout(self, name: str) -> WeightLayout:
    layouts = {layout.name: layout for layout in self.layouts()}
    if name not in layouts:
      raise ConfigError(f'weight layout {name!r} is not one this encoder reads; it reads {list(layouts)}')
    return layouts[name]


def check_output_stride(encoder: str, spec: EncoderSpec, output_stride: int, needed_by: str = '') -> None:
  """ConfigError unless `spec` can be built at `output_stride`."""
  if output_stride not in spec.output_strides:
    who = f'{needed_by} needs output_stride {output_stride}, but ' if needed_by else ''
    if spec.output_strides == (32,):
      raise ConfigError(f'{who}encoder {encoder!r} has output_stride 32 only (it cannot dilate), got '
                        f'{output_stride!r}')
    raise ConfigError(f'{who}encoder {encoder!r}: output_stride must be one of {spec.output_strides}, got '
                      f'{output_stride!r}')


def features_by_stride(maps: Sequence[Any], features: Sequence[FeatureMap]) -> dict[int, Any]:
  """{stride: map}; where dilation leaves several maps at one stride, the deepest (last) one."""
  if len(maps) != len(features):
    raise ValueError(f'the encoder returned {len(maps)} maps; it declares {len(features)}')
  return {f.stride: m for f, m in zip(features, maps)}


def to_flax(kind: str, value: np.ndarray) -> np.ndarray:
  """A weight file's tensor -> the Flax variable of this kind."""
  if kind == 'conv':
    return value.transpose(2, 3, 1, 0)
  if kind == 'dense':
    return value.T
  return value


def file_shape(entry: Entry, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of `entry`'s tensor in a weight file, for a Flax variable of shape `flax_shape`."""
  if entry.part is not None:
    index, count = entry.part
    if flax_shape[-1] % count:
      raise AssertionError(f'{entry.path}: last axis {flax_shape[-1]} does not split into {count} parts')
    flax_shape = (*flax_shape[:-1], flax_shape[-1] // count)
  return torch_shape(entry.kind, flax_shape)


def assemble(table: KeyTable, state_dict: Mapping[str, Any], keys: Mapping[str, str],
             shapes: Mapping[tuple[str, Path], tuple[int, ...]]) -> dict[str, dict]:
  """{collection: tree} of the Flax variables that `table`'s keys present in the file give (float32 numpy).

  keys: table key -> the key as the file has it (only those present); shapes: (collection, path) -> Flax shape,
  needed for the variables split into parts (filled slice by slice).
  """
  variables: dict[str, dict] = {'params': {}, 'batch_stats': {}}
  parts: dict[tuple[str, Path], np.ndarray] = {}
  for key, entry in table.items():
    if key not in keys:
      continue
    value = to_flax(entry.kind, np.asarray(state_dict[keys[key]], dtype=np.float32))
    if entry.part is not None:
      index, count = entry.part
      full = parts.setdefault((entry.collection, entry.path),
                              np.zeros(shapes[(entry.collection, entry.path)], np.float32))
      width = full.shape[-1] // count
      full[..., index * width:(index + 1) * width] = value
      value = full
    tree = variables.setdefault(entry.collection, {})
    for k in entry.path[:-1]:
      tree = tree.setdefault(k, {})
    tree[entry.path[-1]] = np.ascontiguousarray(value)
  return variables


def torch_shape(kind: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The shape a weight file's tensor has for a Flax variable of this kind and shape."""
  if kind == 'conv':
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if kind == 'dense':
    i, o = flax_shape
    return (o, i)
  return tuple(flax_shape)


# ---- Helpers the family modules use to write their tables. ----


def add_conv(table: KeyTable, key: str, path: Path, *, bias: bool = False) -> None:
  """A torch Conv2d at `key` (key.weight, and key.bias when it has one) -> params path/kernel (and bias)."""
  table[f'{key}.weight'] = Entry('params', path + ('kernel',), 'conv')
  if bias:
    table[f'{key}.bias'] = Entry('params', path + ('bias',))


def add_dense(table: KeyTable, key: str, path: Path) -> None:
  """A torch Linear (weight and bias) -> a Flax Dense."""
  table[f'{key}.weight'] = Entry('params', path + ('kernel',), 'dense')
  table[f'{key}.bias'] = Entry('params', path + ('bias',))


def add_batch_norm(table: KeyTable, key: str, path: Path) -> None:
  """A torch BatchNorm2d -> Flax BatchNorm: weight/bias to params scale/bias, running mean/var to batch_stats."""
  table[f'{key}.weight'] = Entry('params', path + ('scale',))
  table[f'{key}.bias'] = Entry('params', path + ('bias',))
  table[f'{key}.running_mean'] = Entry('batch_stats', path + ('mean',))
  table[f'{key}.running_var'] = Entry('batch_stats', path + ('var',))


def add_layer_norm(table: KeyTable, key: str, path: Path, *, optional: bool = False) -> None:
  """A torch LayerNorm / GroupNorm (weight, bias) -> Flax scale, bias."""
  table[f'{key}.weight'] = Entry('params', path + ('scale',), optional=optional)
  table[f'{key}.bias'] = Entry('params', path + ('bias',), optional=optional)
