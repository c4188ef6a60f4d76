"""Per-example augmentation for semantic segmentation, written in TensorFlow.

Every function here is graph-mode safe and meant to run inside
`tf.data.Dataset.map`. Geometric transforms are applied identically to the
image and its label; photometric ones touch the image only.

All randomness comes from TF *stateless* random ops driven by an explicit
`seed` tensor of shape [2] (int32 or int64). The output of `train_augment` is
therefore a pure function of (example, seed): the input pipeline derives the
seed from (config seed, global example index), which makes training exactly
reproducible and resumable from any step.

Conventions:
  * image: float32 [H, W, C] in [0, 255] (not yet normalised; uint8 is accepted
    and cast); C, the channel count (1, 3 or 4), must be static. Geometric
    transforms move every band; photometric distortion is RGB's for C = 3 and
    brightness / contrast only otherwise (see `_photometric`).
  * label: int32 [H, W] class indices, `ignore_label` marks "don't care"
    pixels ([H, W, 1] and other integer dtypes are accepted and converted);
    with `multilabel`, int32 [H, W, K] (K static) of 0 / 1 / ignore_label,
    every class's mask moved as the image is.
  * H and W may be dynamic.
"""

from typing import Sequence

import tensorflow as tf

from jaxseg.errors import ConfigError
from jaxseg.settings import size_pair

# Fixed number of sub-seeds split off the example seed. It never depends on
# which augmentations are enabled, so turning e.g. photometric distortion on
# or off does not change the crops and flips a given seed produces.
_NUM_SUBSEEDS = 8
(_SEED_SCALE, _SEED_CROP, _SEED_COINS, _SEED_BRIGHTNESS, _SEED_CONTRAST,
 _SEED_SATURATION, _SEED_HUE, _SEED_RESERVED) = range(_NUM_SUBSEEDS)
# Indices into the vector of uniform "coins" drawn from _SEED_COINS.
(_COIN_FLIP, _COIN_BRIGHTNESS, _COIN_CONTRAST_MODE, _COIN_CONTRAST,
 _COIN_SATURATION, _COIN_HUE) = range(6)
_NUM_COINS = 6


def _check_range(name: str, value: Sequence[float], lowest: float) -> tuple[
    float, float]:
  """Validates a static (low, high) float range with lowest <= low <= high."""
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ConfigError(
        f"{name} must be a (low, high) pair of floats, got {value!r}") from e
  if not lowest <= lo <= hi:
    raise ConfigError(
        f"{name} must satisfy {lowest} <= low <= high, got {value!r}")
  return lo, hi


def _as_image(image) -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.float32:
    # Plain cast (not convert_image_dtype): keep the 0-255 value range.
    image = tf.cast(image, tf.float32)
  return image


def _channels(image: tf.Tensor) -> int:
  """The static channel count of an [H, W, C] image (shapes and crops need it)."""
  channels = image.shape[-1] if image.shape.rank == 3 else None
  if channels is None:
    raise ValueError(f"augment: images must be [H, W, C] with a static C, got shape {image.shape}")
  return channels


def _as_label(label, multilabel: bool = False) -> tf.Tensor:
  """The label as int32 [H, W, L]: L = 1 for class indices ([H, W] or [H, W, 1]), K for multi-label masks."""
  label = tf.convert_to_tensor(label)
  # The rank is static in practice, so this is a trace-time decision.
  if multilabel:
    if label.shape.rank != 3 or label.shape[-1] is None:
      raise ValueError(f"augment: multi-label masks must be [H, W, K] with a static K, got shape {label.shape}")
  elif label.shape.rank == 2:
    label = label[..., None]
  if label.dtype != tf.int32:
    label = tf.cast(label, tf.int32)
  return label


def _as_output_label(label: tf.Tensor, multilabel: bool) -> tf.Tensor:
  return label if multilabel else label[..., 0]


def _as_seed(seed) -> tf.Tensor:
  # Always split as int64 so that the same seed values give the same
  # augmentation whether the caller passes int32 or int64.
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  return tf.ensure_shape(seed, [2])


def _pad_bottom_right(image, label, pad_h, pad_w, ignore_label):
  """Pads image with 0 and label with `ignore_label` at the bottom/right."""
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0.0)
  label = tf.pad(label, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=ignore_label)
  return image, label


def pad_to_size(image, label, size: tuple[int, int], *,
                ignore_label: int = 255, multilabel: bool = False):
  """Pads an evaluation example to exactly `size`.

  Padding goes at the bottom/right, so pixel (0, 0) stays put and predictions
  can be cropped back with a plain slice. Padded label pixels are
  `ignore_label`, so they never count towards metrics.

  Args:
    image: float32 [H, W, C] in [0, 255], C static.
    label: int32 [H, W] ([H, W, K] with `multilabel`).
    size: static (height, width) to pad to.
    ignore_label: label value written into the padding.
    multilabel: the label is K masks [H, W, K].

  Returns:
    (image float32 [size_h, size_w, C], label int32 [size_h, size_w] (or
    [size_h, size_w, K])) with static shapes.

  Raises:
    tf.errors.InvalidArgumentError: if the image is larger than `size` in
      either dimension; raised at trace time when the shape is static, else
      when the op runs.
  """
  size_h, size_w = size_pair(size, "pad_to_size: size")
  image = _as_image(image)
  label = _as_label(label, multilabel)
  message = (f"pad_to_size: image [height, width] must be <= target size "
             f"[{size_h}, {size_w}]")
  static_hw = image.shape[:2]
  if any(d is not None and d > s for d, s in zip(static_hw, (size_h, size_w))):
    # Statically too large: tf.pad's shape inference would otherwise fail at
    # trace time with a bare "Paddings must be non-negative" ValueError.
    # Raise the same error type the run-time assert raises.
    raise tf.errors.InvalidArgumentError(
        None, None, f"{message}; got image shape {image.shape}")
  hw = tf.shape(image)[:2]
  check = tf.debugging.assert_less_equal(
      hw, tf.constant([size_h, size_w], tf.int32), message=message)
  # Explicit control dependency: without it a tf.data map function could
  # prune the assert, and tf.pad would fail later with an opaque
  # "negative paddings" error instead.
  with tf.control_dependencies([check] if check is not None else []):
    pad_h = size_h - hw[0]
    pad_w = size_w - hw[1]
  image, label = _pad_bottom_right(image, label, pad_h, pad_w, ignore_label)
  image = tf.ensure_shape(image, [size_h, size_w, _channels(image)])
  label = tf.ensure_shape(label, [size_h, size_w, label.shape[-1]])
  return image, _as_output_label(label, multilabel)


def _scaled_hw(hw, scale) -> tf.Tensor:
  """Rounds hw * scale to int32, with every side at least 1 pixel."""
  new_hw = tf.round(tf.cast(hw, tf.float32) * scale)
  return tf.maximum(tf.cast(new_hw, tf.int32), 1)


def _random_scale(image, label, seed, lo, hi):
  """Resizes image (bilinear) and label (nearest) by one U(lo, hi) factor."""
  scale = tf.random.stateless_uniform([], seed, minval=lo, maxval=hi)
  new_hw = _scaled_hw(tf.shape(image)[:2], scale)
  image = tf.image.resize(image, new_hw, method="bilinear")
  # Nearest-neighbour keeps class indices valid (no blending of ids) and
  # returns the input dtype (int32).
  label = tf.image.resize(label, new_hw, method="nearest")
  return image, label


def _random_crop(image, label, seed, crop_h, crop_w):
  """Crops the same uniformly random window out of image and label."""
  hw = tf.shape(image)[:2]
  # The int op only takes scalar bounds, so draw from [0, 2^31 - 1) and
  # reduce to 0 .. H - crop_h (inclusive) per axis; the modulo bias is
  # below 1e-5 for any realistic image size.
  offset = tf.random.stateless_uniform(
      [2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
  offset = offset % (hw - tf.constant([crop_h, crop_w]) + 1)
  image = tf.slice(image, [offset[0], offset[1], 0], [crop_h, crop_w, -1])
  label = tf.slice(label, [offset[0], offset[1], 0], [crop_h, crop_w, -1])
  return image, label


def _maybe(coin, fn, image):
  """Applies `fn` to `image` when the uniform `coin` is below 0.5."""
  return tf.cond(coin < 0.5, lambda: fn(image), lambda: image)


def _photometric(image, seeds, coins, brightness, contrast, saturation, hue):
  """mmseg's PhotoMetricDistortion, on a float image in [0, 255].

  Order: brightness, contrast (mode 0), saturation, hue, contrast (mode 1);
  each transform is applied with probability 0.5 and the image is clipped to
  [0, 255] after each, as mmseg does. Unlike mmseg, intermediate values are
  not truncated to uint8 and the hue delta is continuous.

  Saturation and hue are defined for RGB only: an image of another channel
  count (grayscale, 4 bands) gets brightness and contrast alone, the same
  delta and factor on every band, from the same random draws as RGB.
  """
  is_rgb = _channels(image) == 3
  def clip(x):
    return tf.clip_by_value(x, 0.0, 255.0)

  delta = tf.random.stateless_uniform(
      [], seeds[_SEED_BRIGHTNESS], minval=-brightness, maxval=brightness)
  alpha_c = tf.random.stateless_uniform(
      [], seeds[_SEED_CONTRAST], minval=contrast[0], maxval=contrast[1])
  alpha_s = tf.random.stateless_uniform(
      [], seeds[_SEED_SATURATION], minval=saturation[0], maxval=saturation[1])
  delta_h = tf.random.stateless_uniform(
      [], seeds[_SEED_HUE], minval=-hue, maxval=hue)

  # mmseg's "contrast" is a plain multiplicative scale of pixel values (cv2
  # convert with alpha), not tf.image.adjust_contrast's scaling about the
  # mean; we follow mmseg so hyper-parameters transfer.
  def apply_contrast(x):
    return _maybe(coins[_COIN_CONTRAST], lambda y: clip(y * alpha_c), x)

  contrast_first = coins[_COIN_CONTRAST_MODE] < 0.5

  image = _maybe(coins[_COIN_BRIGHTNESS], lambda x: clip(x + delta), image)
  image = tf.cond(contrast_first, lambda: apply_contrast(image),
                  lambda: image)
  # The HSV kernels behind adjust_saturation / adjust_hue are invariant to
  # the value scale, so they work on [0, 255] floats directly.
  if is_rgb:
    image = _maybe(coins[_COIN_SATURATION],
                   lambda x: clip(tf.image.adjust_saturation(x, alpha_s)),
                   image)
    image = _maybe(coins[_COIN_HUE],
                   lambda x: clip(tf.image.adjust_hue(x, delta_h)), image)
  image = tf.cond(contrast_first, lambda: image,
                  lambda: apply_contrast(image))
  return image


def train_augment(image, label, seed, *, crop_size: tuple[int, int],
                  scale_range: tuple[float, float] = (1.0, 1.0),
                  hflip: bool = True, photometric: bool = False,
                  brightness: float = 32.0,
                  contrast: tuple[float, float] = (0.5, 1.5),
                  saturation: tuple[float, float] = (0.5, 1.5),
                  hue: float = 18.0 / 360.0 * 2,
                  ignore_label: int = 255, multilabel: bool = False):
  """Training-time augmentation of one example (mmseg-style pipeline).

  Steps, in order:
    1. random scale by a factor ~ U(scale_range) (image bilinear, label
       nearest; skipped when the range is (1, 1));
    2. pad bottom/right to at least `crop_size` (image 0, label
       `ignore_label`);
    3. random crop of `crop_size` at a uniform offset (same for both);
    4. horizontal flip with probability 0.5 when `hflip`;
    5. photometric distortion of the image when `photometric` (see
       `_photometric`: brightness, contrast, saturation and hue for RGB;
       brightness and contrast only for 1 or 4 channels), clipped back to
       [0, 255].

  Args:
    image: float32 [H, W, C] in [0, 255]; H and W may be dynamic, C (1, 3 or
      4) static; every band is scaled, cropped and flipped alike.
    label: int32 [H, W] class indices, or with `multilabel` [H, W, K] masks.
    seed: int32/int64 tensor of shape [2]; the output is a pure function of
      (image, label, seed).
    crop_size: static (height, width) of the output.
    scale_range: (low, high) range of the random scale factor.
    hflip: whether to flip horizontally with probability 0.5.
    photometric: whether to apply photometric distortion.
    brightness: maximum absolute brightness delta, 0-255 units.
    contrast: (low, high) range of the multiplicative contrast factor.
    saturation: (low, high) range of the saturation factor.
    hue: maximum absolute hue delta as a fraction of the hue circle; the
      default 0.1 equals mmseg's hue_delta=18 on OpenCV's 0-180 hue scale.
    ignore_label: label value used for padding.
    multilabel: the label is K masks [H, W, K] (K static), each moved alike.

  Returns:
    (image float32 [crop_h, crop_w, C] in [0, 255], label int32
    [crop_h, crop_w] (or [crop_h, crop_w, K])) with static shapes.

  Raises:
    ConfigError: if a static argument is invalid.
  """
  crop_h, crop_w = size_pair(crop_size, "crop_size")
  scale_lo, scale_hi = _check_range("scale_range", scale_range, 1e-6)
  if photometric:
    contrast = _check_range("contrast", contrast, 0.0)
    saturation = _check_range("saturation", saturation, 0.0)
    if brightness < 0 or not 0 <= hue <= 0.5:
      raise ConfigError(
          f"brightness must be >= 0 and hue in [0, 0.5], got "
          f"brightness={brightness!r}, hue={hue!r}")

  image = _as_image(image)
  channels = _channels(image)
  label = _as_label(label, multilabel)
  seeds = tf.random.experimental.stateless_split(_as_seed(seed),
                                                 num=_NUM_SUBSEEDS)
  coins = tf.random.stateless_uniform([_NUM_COINS], seeds[_SEED_COINS])

  if (scale_lo, scale_hi) != (1.0, 1.0):
    image, label = _random_scale(image, label, seeds[_SEED_SCALE], scale_lo,
                                 scale_hi)

  hw = tf.shape(image)[:2]
  pad_h = tf.maximum(crop_h - hw[0], 0)
  pad_w = tf.maximum(crop_w - hw[1], 0)
  image, label = _pad_bottom_right(image, label, pad_h, pad_w, ignore_label)

  image, label = _random_crop(image, label, seeds[_SEED_CROP], crop_h, crop_w)

  if hflip:
    flip = coins[_COIN_FLIP] < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, axis=[1]), lambda: label)

  if photometric:
    image = _photometric(image, seeds, coins, brightness, contrast,
                         saturation, hue)

  image = tf.ensure_shape(image, [crop_h, crop_w, channels])
  label = tf.ensure_shape(label, [crop_h, crop_w, label.shape[-1]])
  return image, _as_output_label(label, multilabel)
