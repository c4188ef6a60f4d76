"""Simple Copy-Paste for semantic segmentation (Ghiasi et al. 2021), on the host side of the tf.data pipeline.

Objects of a second training example, the *donor*, are cut out along their label and pasted onto the example being
augmented, the *target*: the target's pixels under the pasted objects take the donor's image values and labels.

What an "object" is: semantic labels have no instance ids, so an object is a connected region (8-connectivity,
`scipy.ndimage.label`) of the pixels of one class listed in `object_classes` in the donor's label. Two blobs of a
class that touch nowhere (not even at a corner) are two objects; touching instances of one class are one object;
regions of different classes are different objects even where they touch. Classes not listed (background, "stuff"
such as sky or road) are never cut out, and neither are `ignore_label` pixels. Multi-label masks [H, W, K] (0 / 1 /
ignore_label per class): the objects of class c are the connected regions of mask c == 1, so overlapping classes
give overlapping objects, and a pasted pixel takes the donor's whole label vector (all K masks' values, ignore_label
included: what the donor did not know about a pixel stays unknown).

How one paste is drawn (`paste_objects`, from a numpy Generator, in this order):
  1. each object is chosen independently with probability `object_prob` (one uniform draw per object, the objects
     ordered by class as listed in `object_classes`, then by scipy's component number); if none is chosen, one is
     chosen uniformly, so a donor with objects always gives a paste;
  2. the chosen objects are pasted as one group, as in the paper (one donor image's objects): the donor's image,
     label and the group's mask are rescaled by one factor s ~ U(scale_range), to round(H * s) x round(W * s)
     (at least 1 pixel per side, as augment.train_augment's scale does); the image bilinearly, label and mask by
     nearest neighbour, with tf.image.resize's conventions (half-pixel centres, no antialiasing). This is done by
     index arithmetic in numpy (`_nearest_index`, `_bilinear_taps`) rather than scipy.ndimage.zoom: label and mask
     are gathered with the very same index arrays, so they stay aligned exactly, and only the window that is
     pasted is computed;
  3. the bounding box of the rescaled group's mask is placed at a uniformly random position inside the target
     (where the box is larger than the target in a dimension, a uniformly random part of it that fits is used:
     one integer draw per axis either way);
  4. target pixels under the mask take the rescaled donor image (rounded back to the image dtype) and label values;
     every other pixel stays the target's. Mask edges are hard (no blending), so every pasted image pixel carries
     its pasted label. A group that the rescaling samples away entirely (objects thinner than 1 / s pixels) leaves
     the target unchanged.

Why before the geometric augmentation: the pipeline pastes at the images' own resolution, onto the decoded target,
and only then runs augment.train_augment on the composite. Pasted objects are thereby scaled, cropped, flipped and
colour-jittered together with the target's own pixels (no seam of different statistics for a model to learn from,
and the crop can cut a pasted object just as any other); the target's full extent is the canvas, not a crop of it,
so objects land anywhere in the image; and the padding train_augment adds (ignore_label) is never pasted over. The
scale jitter here is the donor's own, on top of train_augment's jitter of the composite (the paper's large scale
jitter of both images).

Determinism: `copy_paste` draws only from its `seed` ((config seed, stream position k) in the pipeline), and the
donor of position k is `donor_index(seed, k, n)`, a function of (seed, k) alone; a resumed run reproduces every
paste exactly, for any batch size or process count.
"""

import functools
import numbers
from typing import Sequence

import numpy as np
import scipy.ndimage
import tensorflow as tf

from jaxseg.errors import ConfigError

# Salts mixed into the seeds, so the draws here differ from every other use of the same (seed, position):
# PASTE_SALT: the numpy Generator of `paste_objects` in `copy_paste`, np.random.default_rng([seed0, seed1, PASTE_SALT]).
PASTE_SALT = 0x43505354  # 'CPST'
# COIN_SALT: the paste-or-not coin of `copy_paste`, a TF stateless uniform from stateless_fold_in(seed, COIN_SALT).
COIN_SALT = 0x434F494E  # 'COIN'
# DONOR_SALT: the SplitMix64 stream of `donor_index`.
DONOR_SALT = 0x444F4E52  # 'DONR'

_EIGHT_CONNECTED = np.ones((3, 3), bool)
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def check_options(*, object_classes, scale_range, object_prob, prob=0.0, ignore_label: int = 255,
                  multilabel: bool = False) -> tuple[tuple[int, ...], tuple[float, float], float, float]:
  """Validates the static options; returns (object_classes, scale_range, object_prob, prob), normalised.

  object_classes: a non-empty sequence of class indices >= 0 (a single int is taken as one class; repeats are
  dropped), not ignore_label for class-index labels. scale_range: (low, high), 0 < low <= high, finite.
  object_prob, prob: in [0, 1].

  Raises:
    ConfigError: naming the option, config.input.copy_paste_*.
  """
  if isinstance(object_classes, numbers.Integral) and not isinstance(object_classes, bool):
    object_classes = (object_classes,)
  try:
    classes = tuple(object_classes)
  except TypeError as e:
    raise ConfigError(f'config.input.copy_paste_object_classes must be a sequence of class indices, '
                      f'got {object_classes!r}') from e
  if not classes or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in classes):
    raise ConfigError(f'config.input.copy_paste_object_classes must be a non-empty sequence of class indices >= 0, '
                      f'got {object_classes!r}')
  classes = tuple(dict.fromkeys(int(c) for c in classes))
  if not multilabel and ignore_label in classes:
    raise ConfigError(f'config.input.copy_paste_object_classes must not hold ignore_label={ignore_label}, '
                      f'got {object_classes!r}')
  try:
    lo, hi = (float(v) for v in scale_range)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.input.copy_paste_scale_range must be a (low, high) pair of floats, '
                      f'got {scale_range!r}') from e
  if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
    raise ConfigError(f'config.input.copy_paste_scale_range must satisfy 0 < low <= high, got {scale_range!r}')
  for name, value in (('object_prob', object_prob), ('prob', prob)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
      raise ConfigError(f'config.input.copy_paste_{name} must be a number in [0, 1], got {value!r}')
  return classes, (lo, hi), float(object_prob), float(prob)


# ---------------------------------------------------------------------------------------------------------------
# The numpy core.
# ---------------------------------------------------------------------------------------------------------------


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
  """Source index of each output index of a nearest-neighbour resize in_size -> out_size (half-pixel centres)."""
  src = np.floor((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64)
  return np.minimum(src, in_size - 1)


def _bilinear_taps(out_index: np.ndarray, out_size: int, in_size: int):
  """(lower, upper, weight of upper) source taps of a bilinear resize in_size -> out_size (half-pixel centres,
  source coordinates clamped to the image, as tf.image.resize does) at the output indices `out_index`."""
  src = (out_index + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0.0, in_size - 1)
  lower = np.floor(src).astype(np.int64)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, (src - lower).astype(np.float32)


def _objects(donor_label: np.ndarray, classes: Sequence[int], multilabel: bool) -> list:
  """The donor's objects: [(component map, component number)], by class in `classes` order, then by number."""
  objects = []
  for c in classes:
    if multilabel:
      if c >= donor_label.shape[-1]:
        raise ValueError(f'copy_paste: object class {c} is not one of the {donor_label.shape[-1]} masks')
      mask = donor_label[..., c] == 1
    else:
      mask = donor_label == c
    components, count = scipy.ndimage.label(mask, structure=_EIGHT_CONNECTED)
    objects += [(components, i) for i in range(1, count + 1)]
  return objects


def _placement(box: int, size: int, draw: int) -> tuple[int, int, int]:
  """(offset into the target, offset into the box, length) along one axis for the uniform draw in [0, |size - box|]."""
  if box <= size:
    return draw, 0, box
  return 0, draw, size


def paste_objects(image: np.ndarray, label: np.ndarray, donor_image: np.ndarray, donor_label: np.ndarray,
                  rng: np.random.Generator, *, object_classes: Sequence[int], ignore_label: int,
                  multilabel: bool = False, scale_range: tuple[float, float] = (0.5, 1.5),
                  object_prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Pastes a random group of the donor's objects onto the target (see the module docstring for the draws).

  Args:
    image: the target image [H, W, C] (uint8 in the pipeline; any numeric dtype).
    label: the target label, class indices [H, W], or with `multilabel` masks [H, W, K].
    donor_image: the donor image [Hd, Wd, C].
    donor_label: the donor label [Hd, Wd] ([Hd, Wd, K] with `multilabel`).
    rng: the only source of randomness; the output is a pure function of the inputs and its state.
    object_classes: the classes whose connected regions are objects.
    ignore_label: the label of don't-care pixels (never part of an object).
    multilabel: the labels are K masks of 0 / 1 / ignore_label.
    scale_range: (low, high) of the donor's rescaling factor.
    object_prob: the probability each object is chosen.

  Returns:
    (image, label): new arrays of the target's shapes and dtypes; the target's own when the donor has no objects.
    Inputs are not modified.

  Raises:
    ConfigError: for an invalid option. ValueError: for arrays of the wrong shapes.
  """
  classes, (scale_lo, scale_hi), object_prob, _ = check_options(
      object_classes=object_classes, scale_range=scale_range, object_prob=object_prob, ignore_label=ignore_label,
      multilabel=multilabel)
  image, label = np.asarray(image), np.asarray(label)
  donor_image, donor_label = np.asarray(donor_image), np.asarray(donor_label)
  label_rank = 3 if multilabel else 2
  if (image.ndim != 3 or donor_image.ndim != 3 or image.shape[-1] != donor_image.shape[-1]
      or label.ndim != label_rank or donor_label.ndim != label_rank
      or label.shape[:2] != image.shape[:2] or donor_label.shape[:2] != donor_image.shape[:2]
      or label.shape[2:] != donor_label.shape[2:]):
    raise ValueError(f'copy_paste: images must be [H, W, C] with one C and labels [H, W]{" x K" * multilabel} '
                     f'of their images\' size, got image {image.shape}, label {label.shape}, donor image '
                     f'{donor_image.shape}, donor label {donor_label.shape}')

  objects = _objects(donor_label, classes, multilabel)
  if not objects:
    return image, label
  chosen = rng.random(len(objects)) < object_prob
  if not chosen.any():
    chosen[rng.integers(len(objects))] = True
  group = np.zeros(donor_label.shape[:2], bool)
  for (components, number), take in zip(objects, chosen):
    if take:
      group |= components == number

  # The donor rescaled by s: output pixel (i, j) of the mask and label is the donor's (rows[i], cols[j]).
  scale = rng.uniform(scale_lo, scale_hi)
  donor_h, donor_w = group.shape
  out_h, out_w = (max(1, int(np.round(n * scale))) for n in (donor_h, donor_w))
  rows, cols = _nearest_index(out_h, donor_h), _nearest_index(out_w, donor_w)
  # The rescaled group's bounding box: first the rows / columns that sample a row / column of the group, then
  # exactly, within that window (a downscale can skip the group's pixels in one row but not another).
  row_hits = np.flatnonzero(group.any(1)[rows])
  col_hits = np.flatnonzero(group.any(0)[cols])
  if not row_hits.size or not col_hits.size:
    return image, label
  rows, cols = rows[row_hits[0]:row_hits[-1] + 1], cols[col_hits[0]:col_hits[-1] + 1]
  first_row, first_col = row_hits[0], col_hits[0]
  mask = group[np.ix_(rows, cols)]
  row_any, col_any = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not row_any.size:
    return image, label
  top_in, bottom_in, left_in, right_in = row_any[0], row_any[-1] + 1, col_any[0], col_any[-1] + 1
  box_h, box_w = bottom_in - top_in, right_in - left_in

  height, width = label.shape[:2]
  top, box_top, length_h = _placement(box_h, height, int(rng.integers(0, abs(height - box_h) + 1)))
  left, box_left, length_w = _placement(box_w, width, int(rng.integers(0, abs(width - box_w) + 1)))
  # The pasted window, in rescaled-donor coordinates (row_index / col_index) and as source indices.
  window_r = slice(top_in + box_top, top_in + box_top + length_h)
  window_c = slice(left_in + box_left, left_in + box_left + length_w)
  mask = mask[window_r, window_c]
  src_r, src_c = rows[window_r], cols[window_c]
  row_index = first_row + np.arange(window_r.start, window_r.stop)
  col_index = first_col + np.arange(window_c.start, window_c.stop)

  pasted_label = donor_label[np.ix_(src_r, src_c)].astype(label.dtype)
  r0, r1, wr = _bilinear_taps(row_index, out_h, donor_h)
  c0, c1, wc = _bilinear_taps(col_index, out_w, donor_w)
  source = donor_image.astype(np.float32)
  wr, wc = wr[:, None, None], wc[None, :, None]
  upper_rows = source[r0][:, c0] * (1 - wc) + source[r0][:, c1] * wc
  lower_rows = source[r1][:, c0] * (1 - wc) + source[r1][:, c1] * wc
  pasted_image = upper_rows * (1 - wr) + lower_rows * wr
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    pasted_image = np.clip(np.rint(pasted_image), info.min, info.max)
  pasted_image = pasted_image.astype(image.dtype)

  out_image, out_label = image.copy(), label.copy()
  target = (slice(top, top + length_h), slice(left, left + length_w))
  out_image[target][mask] = pasted_image[mask]
  out_label[target][mask] = pasted_label[mask]
  return out_image, out_label


# ---------------------------------------------------------------------------------------------------------------
# The tf.data wrapper.
# ---------------------------------------------------------------------------------------------------------------


def _uint64(value) -> int:
  """A seed word as the non-negative int numpy's SeedSequence takes (two's complement for a negative one)."""
  return int(value) & _MASK64


def _paste_numpy(image, label, donor_image, donor_label, seed, **options):
  rng = np.random.default_rng([_uint64(seed[0]), _uint64(seed[1]), PASTE_SALT])
  return paste_objects(image, label, donor_image, donor_label, rng, **options)


def copy_paste(image, label, donor_image, donor_label, seed, *, object_classes: Sequence[int], ignore_label: int,
               multilabel: bool = False, scale_range: tuple[float, float] = (0.5, 1.5), object_prob: float = 0.5,
               prob: float = 0.5) -> tuple[tf.Tensor, tf.Tensor]:
  """Simple Copy-Paste of one example inside tf.data's map: with probability `prob`, `paste_objects`.

  The coin: tf.random.stateless_uniform([], stateless_fold_in(seed, COIN_SALT)) < prob (so prob=0 never pastes and
  prob=1 always does). On a paste, `paste_objects` runs through tf.numpy_function(stateful=False) with
  rng = np.random.default_rng([seed[0], seed[1], PASTE_SALT]); otherwise the inputs come back unchanged and no
  Python runs. The output is a pure function of (inputs, seed).

  Args:
    image: the target image, uint8 [H, W, C], C static, H and W may be dynamic.
    label: int32 [H, W] class indices, or with `multilabel` [H, W, K] masks, K static.
    donor_image: the donor's image, [Hd, Wd, C] of the image's dtype and C.
    donor_label: the donor's label, of the label's dtype ([Hd, Wd] or [Hd, Wd, K]).
    seed: int64 (or int32) [2], in the pipeline (config seed, stream position k).
    object_classes, ignore_label, multilabel, scale_range, object_prob: as for `paste_objects`.
    prob: the probability of a paste.

  Returns:
    (image, label) of the target's dtypes and shapes: static C / K, the target's (dynamic) H and W.

  Raises:
    ConfigError: for an invalid option, naming it (config.input.copy_paste_*), when called.
  """
  classes, scale_range, object_prob, prob = check_options(
      object_classes=object_classes, scale_range=scale_range, object_prob=object_prob, prob=prob,
      ignore_label=ignore_label, multilabel=multilabel)
  image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
  donor_image = tf.convert_to_tensor(donor_image, image.dtype)
  donor_label = tf.convert_to_tensor(donor_label, label.dtype)
  if image.shape.rank != 3 or image.shape[-1] is None:
    raise ValueError(f'copy_paste: images must be [H, W, C] with a static C, got shape {image.shape}')
  if multilabel and (label.shape.rank != 3 or label.shape[-1] is None):
    raise ValueError(f'copy_paste: multi-label masks must be [H, W, K] with a static K, got shape {label.shape}')
  if not multilabel and label.shape.rank != 2:
    raise ValueError(f'copy_paste: labels must be [H, W] class indices, got shape {label.shape}')
  seed = tf.ensure_shape(tf.cast(seed, tf.int64), [2])
  if prob == 0.0:
    return image, label

  paste = functools.partial(_paste_numpy, object_classes=classes, ignore_label=ignore_label, multilabel=multilabel,
                            scale_range=scale_range, object_prob=object_prob)

  def pasted():
    return tuple(tf.numpy_function(paste, [image, label, donor_image, donor_label, seed], [image.dtype, label.dtype],
                                   stateful=False))

  coin = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, COIN_SALT))
  out_image, out_label = tf.cond(coin < prob, pasted, lambda: (image, label))
  out_image = tf.ensure_shape(out_image, image.shape)
  out_label = tf.ensure_shape(out_label, label.shape)
  return out_image, out_label


# ---------------------------------------------------------------------------------------------------------------
# Donors.
# ---------------------------------------------------------------------------------------------------------------


def _splitmix64_finalize(z: np.ndarray) -> np.ndarray:
  """SplitMix64's output function (Steele et al. 2014; Vigna's splitmix64.c) on uint64 arrays, wrapping."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def donor_index(seed: int, position, num_examples: int, *, exclude=None) -> np.ndarray:
  """The training-example index of the donor of each stream position: a pure function of (seed, position).

  Counter-based, so any set of positions is computed at once and chunking never matters (nor batch size or process
  count): the stream key is key = SplitMix64(seed + DONOR_SALT * gamma), and position k's word is
  x = SplitMix64-finalize(key + (k + 1) * gamma) (gamma = 0x9E3779B97F4A7C15, all mod 2^64), i.e. the (k + 1)-th
  output of a SplitMix64 generator seeded with `key`. The donor is x mod num_examples (bias < num_examples / 2^64).

  With `exclude` (the example index at each position, broadcast against `position`) and num_examples > 1, the
  donor is drawn uniformly from the other num_examples - 1 examples, so an example is never its own donor: x mod
  (num_examples - 1), counted past `exclude`. Without it (or with one example), the example itself can be drawn.

  Args:
    seed: the config seed (an int; negative ones are taken mod 2^64).
    position: a stream position k >= 0, or an array of them.
    num_examples: the size of the training split, >= 1.
    exclude: optional example indices in [0, num_examples) never to return.

  Returns:
    int64 array of `position`'s shape (0-d for a scalar) in [0, num_examples).
  """
  if num_examples < 1:
    raise ValueError(f'donor_index: num_examples must be >= 1, got {num_examples}')
  position = np.asarray(position)
  if position.size and (not np.issubdtype(position.dtype, np.integer) or position.min() < 0):
    raise ValueError('donor_index: positions must be integers >= 0')
  gamma = np.uint64(_GOLDEN_GAMMA)
  with np.errstate(over='ignore'):
    key = _splitmix64_finalize(np.array([(_uint64(seed) + DONOR_SALT * _GOLDEN_GAMMA) & _MASK64], np.uint64))[0]
    x = np.asarray(_splitmix64_finalize(key + (position.astype(np.uint64) + np.uint64(1)) * gamma))
  if exclude is None or num_examples == 1:
    return (x % np.uint64(num_examples)).astype(np.int64)
  exclude = np.asarray(exclude, np.int64)
  if exclude.size and (exclude.min() < 0 or exclude.max() >= num_examples):
    raise ValueError(f'donor_index: exclude must be in [0, {num_examples})')
  donor = (x % np.uint64(num_examples - 1)).astype(np.int64)
  return donor + (donor >= exclude)

