"""Pretrained encoder weights: torchvision / timm state dicts (.safetensors, or .pth/.pt) -> Flax variables.

One explicit table per encoder (`torch_key_table`) maps every torch key to a Flax variable path:

  conv1.weight                        -> params/conv1/kernel             (OIHW -> HWIO)
  bn1.weight, bn1.bias                -> params/bn1/scale, params/bn1/bias
  bn1.running_mean, bn1.running_var   -> batch_stats/bn1/mean, batch_stats/bn1/var
  layer1.0.conv1.weight               -> params/layer1_0/conv1/kernel
  layer2.0.downsample.0.weight        -> params/layer2_0/downsample_0/kernel
  features.0.weight, features.0.bias  -> params/conv1_1/kernel, params/conv1_1/bias   (VGG)
  features.1.running_mean             -> batch_stats/bn1_1/mean                        (VGG16-BN)

timm's ResNet keys are torchvision's. `*.num_batches_tracked`, ResNet's `fc.*` and VGG's last classifier
layer (`classifier.6.*`, timm: `head.fc.*`) are skipped on purpose. VGG's fc6/fc7 (`classifier.0`,
`classifier.3`; timm: `pre_logits.fc1`, `pre_logits.fc2`, already convolutions) are returned separately as
Flax convolution kernels. Every other key must be in the table and every table key in the file, each with
its exact shape; anything else is a WeightsError naming the file, the key and both shapes.

PyTorch is needed only for .pth/.pt files and imported only then; .safetensors files are read with the
safetensors package's numpy API.
"""

import dataclasses
import functools
import numbers
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.errors import WeightsError
from jaxseg.models.encoders import registry
from jaxseg.models.encoders import resnet as resnet_lib
from jaxseg.models.encoders import vgg as vgg_lib

# Keys of a classification checkpoint that an encoder does not use.
SKIPPED_KEYS = {
    'resnet': ('fc.weight', 'fc.bias'),
    'vgg': ('classifier.6.weight', 'classifier.6.bias', 'head.fc.weight', 'head.fc.bias'),
}
SKIPPED_SUFFIX = '.num_batches_tracked'
# VGG's fc6/fc7 as the two layouts store them: torch key -> (fc layer, Flax leaf, shape in the file).
VGG_CLASSIFIER_KEYS = {
    'torchvision': {
        'classifier.0.weight': ('fc6', 'kernel', (4096, 512 * 7 * 7)),
        'classifier.0.bias': ('fc6', 'bias', (4096,)),
        'classifier.3.weight': ('fc7', 'kernel', (4096, 4096)),
        'classifier.3.bias': ('fc7', 'bias', (4096,)),
    },
    'timm': {
        'pre_logits.fc1.weight': ('fc6', 'kernel', (4096, 512, 7, 7)),
        'pre_logits.fc1.bias': ('fc6', 'bias', (4096,)),
        'pre_logits.fc2.weight': ('fc7', 'kernel', (4096, 4096, 1, 1)),
        'pre_logits.fc2.bias': ('fc7', 'bias', (4096,)),
    },
}
SAFETENSORS_SUFFIXES = ('.safetensors',)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')  # .bin: Hugging Face's pytorch_model.bin.
MAX_LISTED = 6  # Problems of each kind spelled out in an error; the rest are counted.

Path = tuple[str, ...]


@dataclasses.dataclass
class EncoderWeights:
  """What a weights file gives an encoder.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} for the encoder module (batch_stats {} for VGG16);
      float32 numpy arrays laid out as the Flax module's.
    classifier: VGG only, when the file has them: {'fc6': {'kernel': [7, 7, 512, 4096], 'bias': [4096]},
      'fc7': {'kernel': [1, 1, 4096, 4096], 'bias': [4096]}}, the ImageNet classifier's first two layers as
      Flax convolution kernels (HWIO, for 'VALID' 7x7 and 1x1 convolutions on pool5); else None.
    source: 'torchvision' or 'timm' (VGG: which classifier layout the file had), for messages.
  """
  variables: dict[str, Any]
  classifier: Optional[dict[str, Any]]
  source: str


# ---- The tables. ----


def _add_batch_norm(table: dict, torch_prefix: str, path: Path) -> None:
  table[f'{torch_prefix}.weight'] = ('params', path + ('scale',))
  table[f'{torch_prefix}.bias'] = ('params', path + ('bias',))
  table[f'{torch_prefix}.running_mean'] = ('batch_stats', path + ('mean',))
  table[f'{torch_prefix}.running_var'] = ('batch_stats', path + ('var',))


def _resnet_table(block: str, stage_sizes) -> dict[str, tuple[str, Path]]:
  table = {'conv1.weight': ('params', ('conv1', 'kernel'))}
  _add_batch_norm(table, 'bn1', ('bn1',))
  n_convs = 3 if block == 'bottleneck' else 2
  for i, stage in enumerate(resnet_lib.stage_plan(block, stage_sizes, 32)):
    for b, block_args in enumerate(stage):
      torch_prefix, module = f'layer{i + 1}.{b}', f'layer{i + 1}_{b}'
      for c in range(1, n_convs + 1):
        table[f'{torch_prefix}.conv{c}.weight'] = ('params', (module, f'conv{c}', 'kernel'))
        _add_batch_norm(table, f'{torch_prefix}.bn{c}', (module, f'bn{c}'))
      if block_args['downsample']:
        table[f'{torch_prefix}.downsample.0.weight'] = ('params', (module, 'downsample_0', 'kernel'))
        _add_batch_norm(table, f'{torch_prefix}.downsample.1', (module, 'downsample_1'))
  return table


def _vgg_table(batch_norm: bool) -> dict[str, tuple[str, Path]]:
  """torchvision's `features` indices: conv[, bn], relu per conv; one max-pool per block."""
  table, index = {}, 0
  for b, (n_convs, _) in enumerate(vgg_lib.VGG16_BLOCKS, start=1):
    for j in range(1, n_convs + 1):
      table[f'features.{index}.weight'] = ('params', (f'conv{b}_{j}', 'kernel'))
      table[f'features.{index}.bias'] = ('params', (f'conv{b}_{j}', 'bias'))
      index += 1
      if batch_norm:
        _add_batch_norm(table, f'features.{index}', (f'bn{b}_{j}',))
        index += 1
      index += 1  # ReLU.
    index += 1  # MaxPool2d.
  return table


@functools.lru_cache(maxsize=None)
def torch_key_table(name: str) -> dict[str, tuple[str, Path]]:
  """Encoder `name`'s table: torch key -> (collection, path of the Flax variable inside the encoder).

  A path ending in 'kernel' is a convolution weight (torch OIHW, Flax HWIO); the others are vectors.
  """
  spec = registry.encoder_spec(name)
  if spec.family == 'resnet':
    return _resnet_table(spec.arch['block'], tuple(spec.arch['stage_sizes']))
  return _vgg_table(spec.arch['batch_norm'])


@functools.lru_cache(maxsize=None)
def _flax_shapes(name: str) -> dict[tuple[str, Path], tuple[int, ...]]:
  """(collection, path) -> shape of every variable of encoder `name` (traced, nothing computed)."""
  module = registry.create_encoder(name)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  shapes = {}
  for collection, tree in variables.items():
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shapes[(collection, tuple(k.key for k in key_path))] = tuple(leaf.shape)
  table_entries = set(torch_key_table(name).values())
  if table_entries != set(shapes):  # A bug in the table, not in a file.
    raise AssertionError(f'torch_key_table({name!r}) does not cover the module: '
                         f'{sorted(set(shapes) - table_entries)[:5]} unmapped, '
                         f'{sorted(table_entries - set(shapes))[:5]} not in the module')
  return shapes


def torch_shape(flax_path: Path, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the torch tensor of this Flax variable has (conv kernels HWIO -> OIHW)."""
  if flax_path[-1] == 'kernel':
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape)


def expected_torch_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """torch key -> the shape encoder `name` needs in a state dict (the encoder's keys only)."""
  shapes = _flax_shapes(name)
  return {key: torch_shape(path, shapes[(collection, path)])
          for key, (collection, path) in torch_key_table(name).items()}


# ---- Reading files. ----


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict saved as .safetensors (read with numpy) or .pth/.pt (torch.load, weights only) -> numpy arrays.

  A .pth holding a training checkpoint ({'state_dict': ...} or {'model': ...}) gives that state dict.
  Raises WeightsError naming the file when it is missing, of an unknown kind, truncated or corrupt.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise WeightsError(f'encoder weights {path}: no such file')
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise WeightsError(f'encoder weights {path}: reading .safetensors needs the safetensors package '
                         '(pip install safetensors)') from e
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except  # safetensors' errors have no common public base.
      raise WeightsError(f'encoder weights {path}: not a readable .safetensors file (truncated or corrupt?): '
                         f'{type(e).__name__}: {e}') from e
  if lower.endswith(TORCH_SUFFIXES):
    return _read_torch_file(path)
  raise WeightsError(f'encoder weights {path}: unknown file type; expected a state dict saved as .safetensors, '
                     '.pth, .pt or .bin')


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(
        f'encoder weights {path}: reading a .pth/.pt file needs PyTorch, which is not installed. Either '
        '`pip install torch` (the CPU build is enough), or convert the file once to .safetensors where torch '
        'is installed: python -c "import sys, torch, safetensors.torch as st; '
        "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
        'st.save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])" IN.pth OUT.safetensors') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises RuntimeError, EOFError, UnpicklingError...
    raise WeightsError(f'encoder weights {path}: torch.load cannot read it (truncated or corrupt, or not a '
                       f'state dict of tensors): {type(e).__name__}: {e}') from e
  if isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise WeightsError(f'encoder weights {path}: holds a {type(obj).__name__}, not a state dict (a mapping from '
                       'names to tensors)')
  arrays = {}
  for key, value in obj.items():
    if not torch.is_tensor(value):
      raise WeightsError(f'encoder weights {path}: {key!r} is a {type(value).__name__}, not a tensor')
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float32:
      value = value.float()  # float16 / bfloat16 checkpoints (numpy has no bfloat16).
    arrays[key] = value.numpy()
  return arrays


# ---- Checking and converting. ----


def _shape(shape) -> str:
  return str(list(shape))


def _guess_encoder(keys: set[str]) -> Optional[str]:
  """The registered encoder whose table the file's keys match exactly (ignoring skipped/classifier keys)."""
  for name, spec in registry.ENCODERS.items():
    table = torch_key_table(name)
    extra = {k for k in keys - set(table) if not _skipped_or_classifier(spec.family, k)}
    if set(table) <= keys and not extra:
      return name
  return None


def _skipped_or_classifier(family: str, key: str) -> bool:
  if key.endswith(SKIPPED_SUFFIX) or key in SKIPPED_KEYS[family]:
    return True
  return family == 'vgg' and any(key in keys for keys in VGG_CLASSIFIER_KEYS.values())


def _set(tree: dict, path: Path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def state_dict_to_encoder_weights(name: str, state_dict: Mapping[str, Any], *,
                                  source: str = 'the state dict') -> EncoderWeights:
  """Checks a torchvision/timm state dict (numpy arrays) against encoder `name` and converts it.

  Args:
    name: a registered encoder ('resnet18', ..., 'vgg16_bn').
    state_dict: torch key -> array (numpy, or anything np.asarray takes).
    source: what to call it in errors (the file's path).
  Raises:
    WeightsError: keys missing, keys not of this encoder (other than the skipped ones), or a shape that
      differs; the message names `source`, the keys and both shapes (as torch shapes).
  """
  spec = registry.encoder_spec(name)
  table, expected = torch_key_table(name), expected_torch_shapes(name)
  keys = set(state_dict)
  missing = [k for k in table if k not in keys]
  unexpected = sorted(k for k in keys - set(table) if not _skipped_or_classifier(spec.family, k))
  wrong = [(k, tuple(np.shape(state_dict[k])), expected[k]) for k in table
           if k in keys and tuple(np.shape(state_dict[k])) != expected[k]]
  classifier, layout, classifier_problems = None, 'torchvision', []
  if spec.family == 'vgg':
    classifier, layout, classifier_problems = _vgg_classifier(state_dict)
  if missing or unexpected or wrong or classifier_problems:
    problems = []
    if wrong:
      problems.append(f'{len(wrong)} key(s) with another shape: ' + '; '.join(
          f'{k!r} is {_shape(got)} in the file, {name} needs {_shape(want)}' for k, got, want in wrong[:MAX_LISTED]))
    if missing:
      problems.append(f'{len(missing)} key(s) of {name} missing from the file: ' + ', '.join(
          f'{k!r} {_shape(expected[k])}' for k in missing[:MAX_LISTED]))
    if unexpected:
      problems.append(f'{len(unexpected)} key(s) that {name} does not have: ' + ', '.join(
          f'{k!r} {_shape(np.shape(state_dict[k]))}' for k in unexpected[:MAX_LISTED]))
    problems += classifier_problems
    guess = _guess_encoder(keys)
    hint = f' It looks like {guess} weights: set config.model.encoder={guess!r}.' if guess and guess != name else ''
    if not guess and any(k.startswith('module.') for k in keys):
      hint = " Its keys start with 'module.' (saved from a DataParallel wrapper): save model.module.state_dict()."
    raise WeightsError(f'encoder weights {source} do not fit encoder {name!r}: ' + '. '.join(problems) + '.'
                       + hint)

  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, (collection, path) in table.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    _set(variables[collection], path, np.ascontiguousarray(value))
  return EncoderWeights(variables=variables, classifier=classifier, source=layout)


def _vgg_classifier(state_dict: Mapping[str, Any]) -> tuple[Optional[dict], str, list[str]]:
  """VGG's fc6/fc7 from either layout as HWIO kernels, or None when the file has neither; plus any problems."""
  keys = set(state_dict)
  present = {layout: keys & set(table) for layout, table in VGG_CLASSIFIER_KEYS.items()}
  if not any(present.values()):
    return None, 'torchvision', []
  if all(present.values()):
    return None, 'torchvision', ['it has the classifier in both the torchvision (classifier.0/3) and the timm '
                                 '(pre_logits.fc1/fc2) layout']
  layout = 'timm' if present['timm'] else 'torchvision'
  table = VGG_CLASSIFIER_KEYS[layout]
  problems = [f'classifier key {k!r} {_shape(shape)} missing (the file has the others)'
              for k, (_, _, shape) in table.items() if k not in keys]
  problems += [f'classifier key {k!r} is {_shape(np.shape(state_dict[k]))} in the file, vgg16 needs {_shape(shape)}'
               for k, (_, _, shape) in table.items() if k in keys and tuple(np.shape(state_dict[k])) != shape]
  if problems:
    return None, layout, problems
  classifier: dict[str, Any] = {}
  for key, (layer, leaf, _) in table.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    if leaf == 'kernel':
      if layer == 'fc6':
        value = value.reshape(4096, 512, 7, 7)  # torchvision flattens pool5 [512, 7, 7] channel-major.
      else:
        value = value.reshape(4096, 4096, 1, 1)
      value = value.transpose(2, 3, 1, 0)
    _set(classifier, (layer, leaf), np.ascontiguousarray(value))
  return classifier, layout, []


def read_encoder_weights(name: str, path: str) -> EncoderWeights:
  """Reads and checks a weights file for encoder `name`: its variables, and VGG's fc6/fc7 (see EncoderWeights)."""
  path = os.path.expanduser(os.fspath(path))
  return state_dict_to_encoder_weights(name, read_state_dict(path), source=path)


def load_encoder_variables(name: str, path: str) -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} for `create_encoder(name)` from a torchvision/timm weights file.

  The same variables serve every output_stride and frozen_bn setting (dilation changes no shapes).
  """
  return read_encoder_weights(name, path).variables


def adapt_first_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """A pretrained RGB first-convolution kernel [kh, kw, 3, out] (HWIO) adapted to `in_channels` inputs.

  timm's `adapt_input_conv`, for Flax's layout:
  * 1 channel: the sum over R, G, B, so a grayscale image gives the response
    the original kernel gives to that image replicated into R = G = B;
  * 3 channels: the kernel unchanged (a copy);
  * any other count: R, G, B repeated cyclically up to `in_channels` (R, G, B,
    R, ...) and scaled by 3 / in_channels, which keeps the response's scale
    for inputs of the same statistics (4-band satellite images, RGB + depth).

  Computed in float64, returned in the kernel's dtype.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[2] != 3:
    raise ValueError(f'adapt_first_conv takes an RGB kernel [kh, kw, 3, out] (HWIO), got shape {kernel.shape}')
  if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
    raise ValueError(f'in_channels must be a positive integer, got {in_channels!r}')
  k = kernel.astype(np.float64)
  if in_channels == 1:
    adapted = k.sum(axis=2, keepdims=True)
  elif in_channels == 3:
    adapted = k.copy()
  else:
    repeats = -(-in_channels // 3)
    adapted = np.tile(k, (1, 1, repeats, 1))[:, :, :in_channels, :] * (3.0 / in_channels)
  return adapted.astype(kernel.dtype)


# ---- Into a model's variables. ----


def merge_encoder_variables(variables: Mapping[str, Any], encoder_variables: Mapping[str, Any], *,
                            submodule: str = registry.ENCODER_SUBMODULE) -> dict[str, Any]:
  """A model's variables with its encoder's (params[submodule], batch_stats[submodule]) replaced.

  Args:
    variables: the model's variables (e.g. from model.init), whose encoder is the submodule `submodule`.
    encoder_variables: {'params': ..., 'batch_stats': ...} as load_encoder_variables returns.
    submodule: the encoder's name in the model.
  Raises:
    WeightsError: the encoder variables' tree or shapes differ from the model's encoder (another encoder).
  """
  merged = dict(variables)
  for collection in ('params', 'batch_stats'):
    new = encoder_variables.get(collection) or {}
    current = (variables.get(collection) or {}).get(submodule)
    if current is None:
      if new:
        raise WeightsError(f'the model has no {collection}[{submodule!r}] for the encoder weights to go to')
      continue
    _check_same_layout(current, new, f'{collection}/{submodule}')
    merged[collection] = {**variables[collection], submodule: new}
  return merged


def _check_same_layout(current, new, where: str) -> None:
  current_leaves = dict(_leaves_with_paths(current))
  new_leaves = dict(_leaves_with_paths(new))
  if set(current_leaves) != set(new_leaves):
    only_model = sorted(set(current_leaves) - set(new_leaves))[:MAX_LISTED]
    only_new = sorted(set(new_leaves) - set(current_leaves))[:MAX_LISTED]
    raise WeightsError(f'the encoder weights do not have the layout of the model\'s {where}: variables only in '
                       f'the model: {only_model}; only in the weights: {only_new}')
  for path, leaf in current_leaves.items():
    if tuple(np.shape(leaf)) != tuple(np.shape(new_leaves[path])):
      raise WeightsError(f'{where}/{path}: the encoder weights have shape {_shape(np.shape(new_leaves[path]))}, '
                         f'the model {_shape(np.shape(leaf))}')


def _leaves_with_paths(tree) -> list[tuple[str, Any]]:
  return [('/'.join(str(getattr(k, 'key', k)) for k in key_path), leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def with_pretrained_encoder(variables: Mapping[str, Any], name: str, path: str, *,
                            submodule: str = registry.ENCODER_SUBMODULE,
                            encoder_weights: Optional[EncoderWeights] = None) -> dict[str, Any]:
  """`variables` (a model's, fresh from model.init) with the encoder's replaced by the weights in `path`.

  models.load_pretrained calls it when a train state starts from scratch (state.Setup.init_state), outside
  any jit: the file is read once, on the host. A first convolution with other than 3 input channels gets
  the file's RGB kernel adapted (adapt_first_conv). `encoder_weights`: the file already read with
  read_encoder_weights(name, path) (a caller that also needs its classifier reads it once).
  """
  encoder_tree = {c: variables[c][submodule] for c in ('params', 'batch_stats')
                  if submodule in (variables.get(c) or {})}
  loaded = _matching(name, os.path.expanduser(os.fspath(path)), encoder_tree, encoder_weights)
  return merge_encoder_variables(variables, loaded, submodule=submodule)


def _matching(name: str, path: str, like, encoder_weights: Optional[EncoderWeights] = None) -> dict[str, Any]:
  """The file's encoder variables, checked to have `like`'s tree and shapes, in `like`'s dtypes.

  A 4-D kernel that differs from the model's only in its input channels, 3 in the file (the first
  convolution of a model for grayscale or multi-band images), is adapted with adapt_first_conv.
  """
  variables = (encoder_weights.variables if encoder_weights is not None
               else load_encoder_variables(name, path))
  variables = {c: variables[c] for c in like}

  def adapt(model_leaf, file_leaf):
    m, f = tuple(np.shape(model_leaf)), tuple(np.shape(file_leaf))
    if len(m) == 4 and len(f) == 4 and f[2] == 3 and m[2] != 3 and m[:2] + m[3:] == f[:2] + f[3:]:
      return adapt_first_conv(np.asarray(file_leaf), m[2])
    return file_leaf

  if 'params' in like:
    try:
      variables['params'] = jax.tree.map(adapt, like['params'], variables['params'])
    except ValueError:
      pass  # Another tree: _check_same_layout below names the differences.
  for collection in like:
    _check_same_layout(like[collection], variables[collection], f'{collection}/{registry.ENCODER_SUBMODULE}')
  return jax.tree.map(lambda x, l: np.asarray(x, dtype=l.dtype), variables, like)
