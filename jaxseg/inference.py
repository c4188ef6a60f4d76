"""Inference: restore a trained model, segment images whole or by sliding window, with optional TTA.

How an image is segmented (`Predictor`):
  1. Views: the image itself, plus its horizontal flip (`inference.flip`) and
     rescaled copies (`inference.scales`), each resized on the host.
  2. Tiles: a view is segmented whole (padded with zeros at the bottom/right
     to a multiple of `inference.size_multiple`, so that similar sizes share
     one compiled program) or by a sliding window of `inference.window` with
     `inference.stride` (windows are clamped inside the view, which is padded
     only when smaller than the window). 'auto' slides over views larger than
     `input.eval_size` -- the size the model is evaluated at during training --
     and takes smaller ones whole.
  3. Tiles of the same shape -- from any views of any images -- are stacked into
     batches of `inference.batch_size`, padded, and run by one jitted program
     over a mesh of this process's devices (no collectives, so processes may
     run different numbers of batches); each tile shape compiles once.
  4. Logits of overlapping windows are averaged; a view's logits are cropped,
     flipped back and resized (bilinear) to the image's size.
  5. One view: the scores are those logits. Several views (TTA): the scores
     are the mean of the views' softmax probabilities (logits of differently
     scaled views are not on a common scale; probabilities are).
The mask is the argmax of the scores, at the image's own size.

--mode=predict (files in, masks and overlays out) is `jaxseg/predict.py`; training's evaluation uses the
Predictor too, so nothing here reads or writes files.
"""

import collections
import dataclasses
import functools
import logging
import math
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxseg import checkpoint as checkpoint_lib
from jaxseg import compilation_cache
from jaxseg import config_utils
from jaxseg import image_io
from jaxseg import models
from jaxseg import recipe
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg.data import datasets
from jaxseg.errors import ConfigError

log = logging.getLogger('jaxseg')


SEGMENTATION_MODES = ('auto', 'whole', 'slide')  # config.inference.mode.
OPTION_FIELDS = ('mode', 'window', 'stride', 'flip', 'scales', 'batch_size', 'size_multiple')


# ---------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How images are segmented (see the module docstring); built from `config.inference` by `options_from_config`."""
  mode: str = 'auto'
  window: tuple[int, int] = (64, 64)
  stride: tuple[int, int] = (43, 43)
  flip: bool = False
  scales: tuple[float, ...] = (1.0,)
  batch_size: int = 8
  size_multiple: int = 32
  whole_max_size: tuple[int, int] = (96, 96)  # 'auto': views that fit in this go whole, larger ones slide.

  @property
  def uses_tta(self) -> bool:
    return self.flip or tuple(self.scales) != (1.0,)

  def describe(self) -> str:
    parts = [self.mode if self.mode != 'slide' else f'slide {self.window[0]}x{self.window[1]} stride '
             f'{self.stride[0]}x{self.stride[1]}']
    if self.flip:
      parts.append('flip')
    if tuple(self.scales) != (1.0,):
      parts.append('scales ' + '/'.join(f'{s:g}' for s in self.scales))
    return ', '.join(parts)


def _pair(value, field: str) -> tuple[int, int]:
  try:
    pair = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2 or any(v < 1 for v in pair) or pair != tuple(value):
    raise ConfigError(f'config.inference.{field} must be (height, width) in pixels, got {value!r}')
  return pair


def options_from_config(config, **overrides) -> InferenceOptions:
  """`config.inference` (each field optional) plus keyword overrides -> checked InferenceOptions.

  Defaults: mode 'auto'; window input.crop_size; stride 2/3 of the window;
  no TTA; batch_size eval_batch_size / processes; size_multiple 32.
  """
  section = dict(config.get('inference') or {})
  for source, keys in (('config.inference', section), ('inference option', overrides)):
    unknown = sorted(set(keys) - set(OPTION_FIELDS))
    if unknown:
      raise ConfigError(f'unknown {source} field(s) {unknown}; the fields are {list(OPTION_FIELDS)}')
  section.update({k: v for k, v in overrides.items() if v is not None})
  get = lambda key, default: default if section.get(key) is None else section[key]
  mode = get('mode', 'auto')
  if mode not in SEGMENTATION_MODES:
    raise ConfigError(f'config.inference.mode must be one of {SEGMENTATION_MODES}, got {mode!r}')
  window = _pair(get('window', tuple(config.input.crop_size)), 'window')
  stride = _pair(get('stride', tuple(max(1, (2 * w) // 3) for w in window)), 'stride')
  if any(s > w for s, w in zip(stride, window)):
    raise ConfigError(f'config.inference.stride={stride} is larger than the window {window}: pixels between '
                      f'windows would get no prediction')
  scales = tuple(float(s) for s in get('scales', (1.0,)))
  if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
    raise ConfigError(f'config.inference.scales must be positive numbers, got {scales!r}')
  batch_size = get('batch_size', max(1, int(config.get('eval_batch_size', 8)) // jax.process_count()))
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError(f'config.inference.batch_size must be a positive integer, got {batch_size!r}')
  size_multiple = get('size_multiple', 32)
  if not isinstance(size_multiple, int) or size_multiple < 1:
    raise ConfigError(f'config.inference.size_multiple must be a positive integer, got {size_multiple!r}')
  flip = get('flip', False)
  if not isinstance(flip, bool):
    raise ConfigError(f'config.inference.flip must be True or False, got {flip!r}')
  whole_max = tuple(config.input.get('eval_size', window))
  return InferenceOptions(mode=mode, window=window, stride=stride, flip=flip, scales=scales,
                          batch_size=batch_size, size_multiple=size_multiple,
                          whole_max_size=(max(whole_max[0], 1), max(whole_max[1], 1)))


# ---------------------------------------------------------------------------
# Geometry helpers (numpy, host).
# ---------------------------------------------------------------------------


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window offsets covering [0, size) (size >= window): every `stride`, the last one flush with the end."""
  if size <= window:
    return [0]
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] + window < size:
    starts.append(size - window)
  return starts


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Zero-pads an image [h, w, C] at the bottom/right to [height, width, C] (as the eval pipeline pads)."""
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  return np.pad(image, ((0, height - h), (0, width - w), (0, 0)))


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of [h, w, C] float arrays (half-pixel centres, as jax.image.resize / tf.image.resize)."""
  for axis, out_len in ((0, size[0]), (1, size[1])):
    in_len = x.shape[axis]
    if in_len == out_len:
      continue
    pos = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
    pos = np.clip(pos, 0, in_len - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_len - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out_len
    frac = frac.reshape(shape)
    x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
  return x


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
  """uint8 image [h, w, C] scaled by `scale` (bilinear; PIL antialiases when shrinking)."""
  h, w = image.shape[:2]
  size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
  if size == (w, h):
    return image
  if image.shape[-1] == 3:
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  # Band by band: PIL would premultiply a 4th band as alpha, and has no [h, w, 1] mode.
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(size, Image.BILINEAR))
                   for c in range(image.shape[-1])], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------
# The predictor.
# ---------------------------------------------------------------------------


def forward(model, variables: dict, images: jnp.ndarray, dtype, input_stats: Optional[tuple] = None) -> jnp.ndarray:
  """uint8 images [N, H, W, C] -> float32 logits [N, H, W, K] (normalised on the device: input_stats = (mean,
  std), None for ImageNet's)."""
  logits = model.apply(variables, models.normalize_images(images, dtype, *(input_stats or ())), train=False)
  return logits.astype(jnp.float32)


class _View:
  """One view (scale, flip) of one image, and the logits accumulated over its tiles."""

  def __init__(self, index: int, image: np.ndarray, scale: float, flip: bool, options: InferenceOptions,
               num_classes: int):
    self.index, self.scale, self.flip = index, scale, flip
    self.out_size = image.shape[:2]
    view = resize_image(image, scale)
    if flip:
      view = view[:, ::-1]
    self.size = view.shape[:2]
    h, w = self.size
    slide = options.mode == 'slide' or (
        options.mode == 'auto' and (h > options.whole_max_size[0] or w > options.whole_max_size[1]))
    if slide:
      self.tile = options.window
      ph, pw = max(h, self.tile[0]), max(w, self.tile[1])
      self.starts = [(y, x) for y in window_starts(ph, self.tile[0], options.stride[0])
                     for x in window_starts(pw, self.tile[1], options.stride[1])]
    else:
      ph, pw = _round_up(h, options.size_multiple), _round_up(w, options.size_multiple)
      self.tile = (ph, pw)
      self.starts = [(0, 0)]
    self.padded = pad_image(np.ascontiguousarray(view), ph, pw)
    self.sum = np.zeros((ph, pw, num_classes), np.float32) if len(self.starts) > 1 else None
    self.count = np.zeros((ph, pw, 1), np.float32) if len(self.starts) > 1 else None
    self.logits = None

  def crop(self, y: int, x: int) -> np.ndarray:
    return self.padded[y:y + self.tile[0], x:x + self.tile[1]]

  def add(self, y: int, x: int, logits: np.ndarray) -> None:
    if self.sum is None:
      self.logits = logits
    else:
      self.sum[y:y + self.tile[0], x:x + self.tile[1]] += logits
      self.count[y:y + self.tile[0], x:x + self.tile[1]] += 1.0

  def release(self) -> None:
    self.padded = self.sum = self.count = self.logits = None

  def finish(self) -> np.ndarray:
    """float32 logits [H, W, K] at the image's own size and orientation."""
    logits = self.logits if self.sum is None else self.sum / self.count
    logits = logits[:self.size[0], :self.size[1]]
    if self.flip:
      logits = logits[:, ::-1]
    if logits.shape[:2] != tuple(self.out_size):
      logits = resize_bilinear(logits, self.out_size)
    return np.ascontiguousarray(logits, np.float32)


class Predictor:
  """Segments uint8 images of the model's channel count (see the module docstring for the method).

  Args:
    model: the Flax module.
    variables: its variables ({'params': ..., 'batch_stats': ...}; numpy or jax arrays), or None to
      give them later with `with_variables`.
    num_classes: K.
    options: InferenceOptions.
    dtype: compute dtype (bfloat16 with half precision).
    devices: the devices to run on (default: this process's local devices).
    input_stats: (mean, std) per channel that images are normalised with (None: ImageNet's, RGB). Their
      length is the model's channel count (config.model.in_channels), which images are checked against.
  """

  def __init__(self, model, variables: Optional[dict], num_classes: int, options: InferenceOptions, *,
               dtype=jnp.float32, devices: Optional[Sequence[Any]] = None, input_stats: Optional[tuple] = None):
    self.model = model
    self.channels = len(input_stats[0]) if input_stats else 3
    self.num_classes = num_classes
    self.options = options
    self.dtype = dtype
    self.devices = list(devices or jax.local_devices())
    self._mesh = sharding.make_mesh(self.devices)
    n = len(self.devices)
    self.per_device = max(1, -(-options.batch_size // n))
    self.batch_size = self.per_device * n
    self._variables = None if variables is None else self._place(variables)
    tiles = sharding.batch_sharding(self._mesh)
    self._forward = jax.jit(functools.partial(forward, model, dtype=dtype, input_stats=input_stats),
                            in_shardings=(sharding.replicated(self._mesh), tiles), out_shardings=tiles)

  def _place(self, variables: dict) -> dict:
    return jax.device_put(variables, sharding.replicated(self._mesh))

  def with_options(self, **changes) -> 'Predictor':
    """The same model with other options (shares the variables and compiled programs)."""
    other = object.__new__(Predictor)
    other.__dict__.update(self.__dict__)
    other.options = dataclasses.replace(self.options, **changes)
    other.per_device = max(1, -(-other.options.batch_size // len(self.devices)))
    other.batch_size = other.per_device * len(self.devices)
    return other

  def with_variables(self, variables: dict) -> 'Predictor':
    """The same program with other variables of the same shapes (e.g. a later training step): no recompilation."""
    other = object.__new__(Predictor)
    other.__dict__.update(self.__dict__)
    other._variables = self._place(variables)  # pylint: disable=protected-access
    return other

  # -- Tiles to logits. --

  def _run_tiles(self, tiles: list[tuple[_View, int, int]]) -> None:
    """Runs tiles of one shape in full batches (the last padded), dispatching one batch ahead of the fetch."""
    shape = tuple(tiles[0][0].tile)
    n = len(self.devices)
    pending = None
    for start in range(0, len(tiles) + self.batch_size, self.batch_size):
      chunk = tiles[start:start + self.batch_size]
      launched = None
      if chunk:
        # A short batch is padded to the next power of two per device, not to the full batch: few
        # programs to compile, little padding for single images.
        b = min(self.per_device, 1 << (-(-len(chunk) // n) - 1).bit_length())
        batch = np.zeros((n * b,) + shape + (self.channels,), np.uint8)
        for j, (view, y, x) in enumerate(chunk):
          batch[j] = view.crop(y, x)
        launched = (chunk, self._forward(self._variables, batch))
      if pending is not None:
        done, out = pending
        logits = np.asarray(out)
        for j, (view, y, x) in enumerate(done):
          view.add(y, x, logits[j])
      pending = launched
      if not chunk:
        break

  def _views_of(self, index: int, image: np.ndarray) -> list[_View]:
    opts = self.options
    return [_View(index, image, scale, flip, opts, self.num_classes)
            for scale in opts.scales for flip in ((False, True) if opts.flip else (False,))]

  def _scores_of(self, views: list[_View], num_images: int) -> list[np.ndarray]:
    """Runs the tiles of `views` (of images 0..num_images-1) and combines each image's views."""
    by_shape = collections.defaultdict(list)
    for view in views:
      for y, x in view.starts:
        by_shape[view.tile].append((view, y, x))
    for tiles in by_shape.values():
      self._run_tiles(tiles)
    per_image = len(self.options.scales) * (2 if self.options.flip else 1)
    scores = [None] * num_images
    for view in views:
      logits = view.finish()
      view.release()  # Only one view's accumulators and the running sums stay in memory.
      if per_image == 1:
        scores[view.index] = logits
      else:
        probs = softmax(logits)
        scores[view.index] = probs if scores[view.index] is None else scores[view.index] + probs
    if per_image > 1:
      scores = [s / per_image for s in scores]
    return scores

  # -- Public API. --

  def iter_scores(self, images: Iterable[np.ndarray], *, chunk: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yields float32 scores [H, W, K] per image, in order: logits (one view) or mean probabilities (TTA).

    Images (uint8 [H, W, C] with C = self.channels, any sizes; see
    image_io.to_uint8 for the arrays accepted) are gathered until their tiles fill
    a batch (or `chunk` images, default the batch size, are waiting), so that
    tiles of several small images share batches while a large image is
    processed alone.
    """
    max_images = chunk or self.batch_size
    views, count, tiles = [], 0, 0
    for image in images:
      new = self._views_of(count, image_io.to_uint8(image, self.channels))
      views += new
      count += 1
      tiles += sum(len(v.starts) for v in new)
      if count >= max_images or tiles >= self.batch_size:
        yield from self._scores_of(views, count)
        views, count, tiles = [], 0, 0
    if count:
      yield from self._scores_of(views, count)

  def iter_masks(self, images: Iterable[np.ndarray], *, chunk: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yields uint8 class-index masks [H, W] per image, in order."""
    for scores in self.iter_scores(images, chunk=chunk):
      yield np.argmax(scores, axis=-1).astype(np.uint8)

  def scores(self, image: np.ndarray) -> np.ndarray:
    return next(self.iter_scores([image]))

  def predict(self, image: np.ndarray) -> np.ndarray:
    return next(self.iter_masks([image]))


# ---------------------------------------------------------------------------
# Restoring a trained model.
# ---------------------------------------------------------------------------


def load_predictor(config, workdir: str, *, checkpoint: str = 'best', **overrides):
  """Restores `workdir`'s checkpoint into a Predictor (--mode=predict and jaxseg.api start here).

  Returns:
    (predictor, spec, restored step).
  """
  config_utils.validate(config)
  compilation_cache.enable(config)
  config = recipe.settle(config, os.path.abspath(workdir))  # 'auto' sizes: those training chose.
  spec = datasets.resolve_spec(config.dataset)
  options = options_from_config(config, **overrides)
  # Each process restores a full copy onto its own devices: prediction runs without collectives.
  setup = state_lib.build(config, spec.num_classes, sharding.make_mesh(jax.local_devices()), sharding='replicated')
  state, step = checkpoint_lib.restore_trained(config, workdir, setup.abstract_state, checkpoint=checkpoint)
  predictor = Predictor(setup.model, state_lib.inference_variables(state), spec.num_classes, options, dtype=setup.dtype,
                        input_stats=setup.input_stats)
  return predictor, spec, step
