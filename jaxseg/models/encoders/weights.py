"""Pretrained encoder weights: state dicts (.safetensors, or .pth/.pt/.bin) -> Flax variables, for any encoder.

Each encoder family owns its tables (see base.py): for every layout it reads (torchvision, timm, transformers), a
map from each key of such a file to the Flax variable it fills and how its tensor converts:

  conv1.weight                        -> params/conv1/kernel             (conv: OIHW -> HWIO)
  bn1.running_mean                    -> batch_stats/bn1/mean            (vector: as it is)
  stages.0.blocks.0.mlp.fc1.weight    -> params/stages_0/blocks_0/mlp_fc1/kernel   (dense: [out, in] -> [in, out])

This module has one converter for all of them. The file's layout is the one whose table shares the most keys
with it (after its classification prefix, e.g. transformers' `convnext.`, is stripped). Keys the layout skips
on purpose (a classifier, `*.num_batches_tracked`) are ignored; every other key must be in the table and every
non-optional table key in the file, each with its exact shape; anything else is a WeightsError naming the file,
the key and both shapes. A layout's extras (VGG's fc6/fc7) come back beside the encoder's variables, for a
decoder that asks for them.

PyTorch is needed only for .pth/.pt/.bin files and imported only then; .safetensors files are read with the
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
from jaxseg.models.encoders import base, registry

SKIPPED_SUFFIX = '.num_batches_tracked'
SAFETENSORS_SUFFIXES = ('.safetensors',)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')  # .bin: Hugging Face's pytorch_model.bin.
MAX_LISTED = 6  # Problems of each kind spelled out in an error; the rest are counted.

Path = tuple[str, ...]


@dataclasses.dataclass
class EncoderWeights:
  """What a weights file gives an encoder.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} for the encoder module (batch_stats {} when it has no
      BatchNorm); float32 numpy arrays laid out as the Flax module's.
    extras: the layout's extras the file has, by name (VGG: {'classifier': {'fc6': {'kernel': [7, 7, 512, 4096],
      'bias'}, 'fc7': {'kernel': [1, 1, 4096, 4096], 'bias'}}}, its ImageNet classifier's first two layers as
      Flax convolution kernels); {} when it has none.
    layout: the layout the file was read as ('torchvision', 'timm', 'hf').
  """
  variables: dict[str, Any]
  extras: dict[str, Any]
  layout: str


# ---- The tables and the shapes they must fill. ----


def key_table(name: str, layout: Optional[str] = None) -> base.KeyTable:
  """Encoder `name`'s table for `layout` (None: its first layout): file key -> base.Entry."""
  spec = registry.encoder_spec(name)
  return (spec.layout(layout) if layout else spec.layouts()[0]).table


@functools.lru_cache(maxsize=None)
def _layouts(name: str) -> tuple[base.WeightLayout, ...]:
  return registry.encoder_spec(name).layouts()


@functools.lru_cache(maxsize=None)
def flax_shapes(name: str) -> dict[tuple[str, Path], tuple[int, ...]]:
  """(collection, path) -> shape of every variable of encoder `name` (traced, nothing computed)."""
  module = registry.create_encoder(name)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  shapes = {}
  for collection, tree in variables.items():
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shapes[(collection, tuple(k.key for k in key_path))] = tuple(leaf.shape)
  for layout in _layouts(name):  # A bug in a table, not in a file.
    entries = {(e.collection, e.path) for e in layout.table.values()}
    unmapped = set(shapes) - entries
    if entries - set(shapes) or (unmapped and layout.complete is None):
      raise AssertionError(f'the {layout.name} table of {name!r} does not cover the module: '
                           f'{sorted(unmapped)[:5]} unmapped, {sorted(entries - set(shapes))[:5]} not in the module')
  return shapes


def expected_torch_shapes(name: str, layout: Optional[str] = None) -> dict[str, tuple[int, ...]]:
  """File key -> the shape encoder `name` needs in a state dict of `layout` (None: its first layout)."""
  shapes = flax_shapes(name)
  return {key: base.file_shape(e, shapes[(e.collection, e.path)]) for key, e in key_table(name, layout).items()}


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


def _strip(layout: base.WeightLayout, keys) -> dict[str, str]:
  """The layout's key -> the key as the file has it (its classification prefix removed where present)."""
  if not layout.prefix:
    return {k: k for k in keys}
  return {(k[len(layout.prefix):] if k.startswith(layout.prefix) else k): k for k in keys}


def _known(layout: base.WeightLayout, key: str) -> bool:
  return (key in layout.table or key in layout.skipped or key.endswith(SKIPPED_SUFFIX)
          or (layout.extras is not None and key in layout.extras.keys))


def _best_layout(name: str, keys) -> base.WeightLayout:
  """The layout of encoder `name` whose table shares the most keys with the file (the first on a tie)."""
  layouts = _layouts(name)
  return max(layouts, key=lambda layout: (len(set(_strip(layout, keys)) & set(layout.table)),
                                          -layouts.index(layout)))


def _guess_encoder(keys: set[str]) -> Optional[str]:
  """The registered encoder one of whose layouts the file's keys match exactly (skipped and extra keys aside)."""
  for name in registry.ENCODERS:
    for layout in _layouts(name):
      stripped = _strip(layout, keys)
      required = {k for k, e in layout.table.items() if not e.optional}
      if required <= set(stripped) and all(_known(layout, k) for k in stripped):
        return name
  return None


def state_dict_to_encoder_weights(name: str, state_dict: Mapping[str, Any], *, layout: Optional[str] = None,
                                  source: str = 'the state dict') -> EncoderWeights:
  """Checks a state dict (numpy arrays) against encoder `name` in one of its layouts and converts it.

  Args:
    name: a registered encoder.
    state_dict: file key -> array (numpy, or anything np.asarray takes).
    layout: the layout to read it as; None: the layout whose table shares the most keys with it.
    source: what to call it in errors (the file's path).
  Raises:
    WeightsError: keys missing, keys not of this encoder (other than the skipped ones), or a shape that
      differs; the message names `source`, the keys and both shapes (as the file's shapes).
  """
  chosen = registry.encoder_spec(name).layout(layout) if layout else _best_layout(name, state_dict)
  table, shapes = chosen.table, flax_shapes(name)
  expected = {key: base.file_shape(e, shapes[(e.collection, e.path)]) for key, e in table.items()}
  original = _strip(chosen, state_dict)
  if len(original) != len(state_dict):
    raise WeightsError(f'encoder weights {source}: some keys are there both with and without the prefix '
                       f'{chosen.prefix!r}')
  optional = [k for k, e in table.items() if e.optional]
  optional_given = any(k in original for k in optional)
  missing = [k for k, e in table.items() if k not in original and (not e.optional or optional_given)]
  unexpected = sorted(original[k] for k in original if not _known(chosen, k))
  wrong = [(original[k], tuple(np.shape(state_dict[original[k]])), expected[k]) for k in table
           if k in original and tuple(np.shape(state_dict[original[k]])) != expected[k]]
  extras, extra_problems = {}, []
  if chosen.extras is not None:
    extra_tree, extra_problems = chosen.extras.read(state_dict)
    if extra_tree is not None:
      extras[chosen.extras.name] = extra_tree
  if missing or unexpected or wrong or extra_problems:
    problems = []
    if wrong:
      problems.append(f'{len(wrong)} key(s) with another shape: ' + '; '.join(
          f'{k!r} is {_shape(got)} in the file, {name} needs {_shape(want)}' for k, got, want in wrong[:MAX_LISTED]))
    if missing:
      prefix = chosen.prefix if any(k != v for k, v in original.items()) else ''
      problems.append(f'{len(missing)} key(s) of {name} missing from the file: ' + ', '.join(
          f'{prefix + k!r} {_shape(expected[k])}' for k in missing[:MAX_LISTED]))
    if unexpected:
      problems.append(f'{len(unexpected)} key(s) that {name} does not have: ' + ', '.join(
          f'{k!r} {_shape(np.shape(state_dict[k]))}' for k in unexpected[:MAX_LISTED]))
    problems += extra_problems
    guess = _guess_encoder(set(state_dict))
    hint = f' It looks like {guess} weights: set config.model.encoder={guess!r}.' if guess and guess != name else ''
    best = _best_layout(name, state_dict)
    if layout and best.name != layout:
      hint += f' Its keys are in the {best.name!r} layout, not {layout!r}.'
    if not guess and any(k.startswith('module.') for k in state_dict):
      hint = " Its keys start with 'module.' (saved from a DataParallel wrapper): save model.module.state_dict()."
    raise WeightsError(f'encoder weights {source} ({chosen.name} layout) do not fit encoder {name!r}: '
                       + '. '.join(problems) + '.' + hint)

  variables: dict[str, Any] = base.assemble(table, state_dict, original, shapes)
  if chosen.complete is not None:
    variables = chosen.complete(variables, shapes)
  return EncoderWeights(variables=variables, extras=extras, layout=chosen.name)


def read_encoder_weights(name: str, path: str, layout: Optional[str] = None) -> EncoderWeights:
  """Reads and checks a weights file for encoder `name`: its variables and extras (see EncoderWeights)."""
  path = os.path.expanduser(os.fspath(path))
  return state_dict_to_encoder_weights(name, read_state_dict(path), layout=layout, source=path)


def load_encoder_variables(name: str, path: str, layout: Optional[str] = None) -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} for `create_encoder(name)` from a weights file of one of its layouts.

  The same variables serve every output_stride and frozen_bn setting (dilation changes no shapes).
  """
  return read_encoder_weights(name, path, layout).variables


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
