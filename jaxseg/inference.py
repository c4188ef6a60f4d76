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
Multi-label (a sigmoid per class): TTA averages the views' sigmoid
probabilities and the scores are the logits of that mean, so scores are
always logits; the masks are K binary masks [H, W, K], class k where its
probability exceeds 0.5 (logit > 0).

--mode=predict (files in, masks and overlays out) is `jaxseg/predict.py`; training's evaluation uses the
Predictor too, so nothing here reads or writes files.
"""

import collections
import dataclasses
import functools
import logging
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxseg import image_io
from jaxseg import models
from jaxseg import sharding
from jaxseg import startup
from jaxseg import state as state_lib
from jaxseg.settings import InferenceOptions

log = logging.getLogger('jaxseg')


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


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # Overflow-free for any x.


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


def masks_of(scores: np.ndarray, multilabel: bool) -> np.ndarray:
  """Scores [..., K] -> uint8 class indices [...] (argmax), or multi-label 0/1 masks [..., K] (logit > 0)."""
  if multilabel:
    return (scores > 0).astype(np.uint8)
  return np.argmax(scores, axis=-1).astype(np.uint8)


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


class Program:
  """What a Predictor runs: the model's forward pass jitted over a mesh of `devices`, compiled once per tile shape.

  Args:
    model: the Flax module.
    num_classes: K.
    dtype: compute dtype (bfloat16 with half precision).
    devices: the devices to run on (default: this process's local devices).
    input_stats: (mean, std) per channel that images are normalised with (None: ImageNet's, RGB). Their
      length is the model's channel count (config.model.in_channels), which images are checked against.
    multilabel: the K outputs are independent sigmoids (config.task='multilabel'), not a softmax.
  """

  def __init__(self, model, num_classes: int, *, dtype=jnp.float32, devices: Optional[Sequence[Any]] = None,
               input_stats: Optional[tuple] = None, multilabel: bool = False):
    self.model = model
    self.num_classes = num_classes
    self.multilabel = multilabel
    self.channels = len(input_stats[0]) if input_stats else 3
    self.devices = list(devices or jax.local_devices())
    self.mesh = sharding.make_mesh(self.devices)
    tiles = sharding.batch_sharding(self.mesh)
    self.forward = jax.jit(functools.partial(forward, model, dtype=dtype, input_stats=input_stats),
                           in_shardings=(sharding.replicated(self.mesh), tiles), out_shardings=tiles)

  def place(self, variables: dict) -> dict:
    return jax.device_put(variables, sharding.replicated(self.mesh))


class Predictor:
  """Segments uint8 images of the model's channel count (see the module docstring for the method).

  Args:
    program: the compiled model (Program); predictors with other options or variables share it.
    variables: the model's variables ({'params': ..., 'batch_stats': ...}; numpy or jax arrays), or None to
      give them later with `with_variables`.
    options: InferenceOptions.
  """

  def __init__(self, program: Program, variables: Optional[dict], options: InferenceOptions):
    self.program = program
    self.options = options
    self.channels = program.channels
    self.num_classes = program.num_classes
    self.multilabel = program.multilabel
    n = len(program.devices)
    self.per_device = max(1, -(-options.batch_size // n))
    self.batch_size = self.per_device * n
    self._variables = None if variables is None else program.place(variables)

  @classmethod
  def create(cls, model, variables: Optional[dict], num_classes: int, options: InferenceOptions, *,
             dtype=jnp.float32, devices: Optional[Sequence[Any]] = None,
             input_stats: Optional[tuple] = None, multilabel: bool = False) -> 'Predictor':
    """A Predictor of `model` with a Program of its own (see Program for the arguments)."""
    return cls(Program(model, num_classes, dtype=dtype, devices=devices, input_stats=input_stats,
                       multilabel=multilabel), variables, options)

  def with_options(self, **changes) -> 'Predictor':
    """The same model with other options (shares the variables and compiled programs)."""
    return Predictor(self.program, self._variables, dataclasses.replace(self.options, **changes))

  def with_variables(self, variables: dict) -> 'Predictor':
    """The same program with other variables of the same shapes (e.g. a later training step): no recompilation."""
    return Predictor(self.program, variables, self.options)

  # -- Tiles to logits. --

  def _run_tiles(self, tiles: list[tuple[_View, int, int]]) -> None:
    """Runs tiles of one shape in full batches (the last padded), dispatching one batch ahead of the fetch."""
    shape = tuple(tiles[0][0].tile)
    n = len(self.program.devices)
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
        launched = (chunk, self.program.forward(self._variables, batch))
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
        probs = sigmoid(logits) if self.multilabel else softmax(logits)
        scores[view.index] = probs if scores[view.index] is None else scores[view.index] + probs
    if per_image > 1:
      scores = [s / per_image for s in scores]
      if self.multilabel:
        # Back to logits, clipped so a certain class stays finite.
        scores = [np.log(p) - np.log1p(-p) for p in (np.clip(s, 1e-7, 1 - 1e-7) for s in scores)]
    return scores

  # -- Public API. --

  def iter_scores(self, images: Iterable[np.ndarray], *, chunk: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yields float32 scores [H, W, K] per image, in order: logits (one view) or mean probabilities (TTA;
    multi-label: their logits).

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
    """Yields uint8 class-index masks [H, W] per image, in order; multi-label: 0/1 masks [H, W, K]."""
    for scores in self.iter_scores(images, chunk=chunk):
      yield masks_of(scores, self.multilabel)

  def scores(self, image: np.ndarray) -> np.ndarray:
    return next(self.iter_scores([image]))

  def predict(self, image: np.ndarray) -> np.ndarray:
    return next(self.iter_masks([image]))


# ---------------------------------------------------------------------------
# Restoring a trained model.
# ---------------------------------------------------------------------------


def load_predictor(config, workdir: str, *, checkpoint: str = 'best', **overrides):
  """Restores `workdir`'s checkpoint into a Predictor (--mode=predict and jaxseg.api start here).

  `overrides`: inference options that replace config.inference's (mode, window, stride, flip, scales,
  batch_size, size_multiple).

  Returns:
    (predictor, spec, restored step).
  """
  # Each process restores a full copy onto its own devices: prediction runs without collectives.
  run = startup.open_run(config, workdir, mode='predict', checkpoint=checkpoint, devices=jax.local_devices(),
                         sharding_mode='replicated')
  options = run.settings.inference_options(processes=jax.process_count(), **overrides)
  setup = run.setup
  predictor = Predictor.create(setup.model, state_lib.inference_variables(run.state), run.spec.num_classes, options,
                               dtype=setup.dtype, input_stats=setup.input_stats, multilabel=run.spec.multilabel)
  return predictor, run.spec, run.step
