"""Per-example augmentation for semantic segmentation, written in TensorFlow.

Every function here is graph-mode safe and meant to run inside
`tf.data.Dataset.map`. Geometric transforms (scale and aspect, flips, 90
degree turns, small rotations, crops) are applied identically to the image
(bilinear or exact) and its label (nearest neighbour or exact: class ids are
never blended); colour jitter, blur and noise touch the image only; cutout
blanks the image and marks the label "ignore" under its holes. Which of them
suit a dataset depends on what its classes are: README "Augmentation".

All randomness comes from TF *stateless* random ops driven by an explicit
`seed` tensor of shape [2] (int32 or int64). The output of `train_augment` is
therefore a pure function of (example, seed): the input pipeline derives the
seed from (config seed, global example index), which makes training exactly
reproducible and resumable from any step.

Conventions:
  * image: float32 [H, W, C] in [0, 255] (not yet normalised; uint8 is accepted
    and cast); C, the channel count (1, 3 or 4), must be static. Geometric
    transforms move every band; photometric distortion (colour jitter) is
    RGB's for C = 3 and brightness / contrast only otherwise (see
    `_photometric`); blur and noise treat every band alike.
  * label: int32 [H, W] class indices, `ignore_label` marks "don't care"
    pixels ([H, W, 1] and other integer dtypes are accepted and converted);
    with `multilabel`, int32 [H, W, K] (K static) of 0 / 1 / ignore_label,
    every class's mask moved as the image is.
  * H and W may be dynamic.
"""

import math
import numbers
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
# The transforms added after the eight sub-seeds above were fixed (aspect,
# rot90, rotation, vflip, blur, noise, cutout) draw from sub-seeds split off
# seeds[_SEED_RESERVED]: a fixed number of them, whichever options are on,
# so turning one on changes no other's draws, and the configurations that
# existed before them give bit-identical outputs. _EXTRA_RESERVED is kept
# for a later transform.
_NUM_EXTRA_SUBSEEDS = 10
(_EXTRA_ASPECT, _EXTRA_ROT90, _EXTRA_ROTATE, _EXTRA_VFLIP, _EXTRA_BLUR_COIN,
 _EXTRA_BLUR_SIGMA, _EXTRA_NOISE_STD, _EXTRA_NOISE, _EXTRA_CUTOUT,
 _EXTRA_RESERVED) = range(_NUM_EXTRA_SUBSEEDS)


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


def _random_scale(image, label, seed, lo, hi, aspect_seed=None,
                  aspect_range=(1.0, 1.0)):
  """Resizes image (bilinear) and label (nearest) by a random scale and aspect.

  The scale s ~ U(lo, hi) (exactly 1, with no draw, for (1, 1)); the aspect
  r (width over height, relative to the input's) is log-uniform over
  `aspect_range`. The new size is round(h * s / sqrt(r)) x
  round(w * s * sqrt(r)); with aspect_range (1, 1) no aspect is drawn and
  both sides take the one factor s, as before aspect jitter existed.
  """
  if (lo, hi) != (1.0, 1.0):
    scale = tf.random.stateless_uniform([], seed, minval=lo, maxval=hi)
  else:
    scale = tf.constant(1.0)
  if tuple(aspect_range) == (1.0, 1.0):
    factor = scale
  else:
    log_r = tf.random.stateless_uniform(
        [], aspect_seed, minval=math.log(aspect_range[0]),
        maxval=math.log(aspect_range[1]))
    sqrt_r = tf.exp(0.5 * log_r)
    factor = tf.stack([scale / sqrt_r, scale * sqrt_r])
  new_hw = _scaled_hw(tf.shape(image)[:2], factor)
  image = tf.image.resize(image, new_hw, method="bilinear")
  # Nearest-neighbour keeps class indices valid (no blending of ids) and
  # returns the input dtype (int32).
  label = tf.image.resize(label, new_hw, method="nearest")
  return image, label


def _random_rot90(image, label, seed):
  """Turns image and label by the same k * 90 degrees, k uniform in {0, 1, 2, 3}.

  Counter-clockwise, as np.rot90; exact (no resampling).
  """
  k = tf.random.stateless_uniform([], seed, minval=0, maxval=4, dtype=tf.int32)
  return tf.image.rot90(image, k), tf.image.rot90(label, k)


def _rotate(image, label, angle, ignore_label):
  """Rotates image (bilinear) and label (nearest) by `angle` radians about the image centre.

  Positive angles turn the content counter-clockwise (as keras'
  RandomRotation). The output keeps the input's size; pixels that come from
  outside the input are 0 in the image and `ignore_label` in the label.
  """
  hw = tf.shape(image)[:2]
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  # ImageProjectiveTransformV3 samples output pixel (x, y) (column, row;
  # pixel centres at integer coordinates) from the input at
  # (a0 x + a1 y + a2, b0 x + b1 y + b2) (c0 = c1 = 0: no projection):
  # here the rotation of (x, y) about the centre ((w - 1) / 2, (h - 1) / 2).
  x0 = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
  y0 = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
  transform = tf.stack([cos, -sin, x0, sin, cos, y0, 0.0, 0.0])[None]

  def warp(x, interpolation, fill):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform, output_shape=hw,
        fill_value=tf.constant(fill, tf.float32), interpolation=interpolation,
        fill_mode="CONSTANT")[0]

  # NEAREST rounds the source coordinate (half away from zero), so every
  # label pixel is one input label pixel: no blending of class ids.
  return (warp(image, "BILINEAR", 0.0),
          warp(label, "NEAREST", float(ignore_label)))


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


def _gaussian_blur(image, sigma, radius: int):
  """Gaussian blur of an [H, W, C] image, every band alike: separable depthwise convolution.

  The kernel is exp(-x^2 / (2 sigma^2)) for x = -radius .. radius,
  normalised to sum 1 (as scipy.ndimage.gaussian_filter's). The output keeps
  the input's size ('SAME'), with edge padding: the border pixels repeated
  (scipy's mode='nearest'), which works for an image of any size.
  """
  channels = _channels(image)
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel = kernel / tf.reduce_sum(kernel)
  padded = tf.concat([tf.repeat(image[:1], radius, axis=0), image,
                      tf.repeat(image[-1:], radius, axis=0)], axis=0)
  padded = tf.concat([tf.repeat(padded[:, :1], radius, axis=1), padded,
                      tf.repeat(padded[:, -1:], radius, axis=1)], axis=1)
  vertical = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])
  horizontal = tf.tile(kernel[None, :, None, None], [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(padded[None], vertical, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, horizontal, [1, 1, 1, 1], "VALID")
  return tf.clip_by_value(out[0], 0.0, 255.0)


def _cutout_mask(seed, holes: int, size: float, crop_h: int, crop_w: int):
  """bool [crop_h, crop_w, 1]: the union of `holes` rectangles of side size x the crop's.

  Each rectangle is round(size * crop_h) x round(size * crop_w) pixels (at
  least 1), its centre pixel (row, column) uniform over the crop, clipped to
  the crop: rows centre - hole_h // 2 .. centre - hole_h // 2 + hole_h - 1.
  """
  hole_h = max(1, int(round(size * crop_h)))
  hole_w = max(1, int(round(size * crop_w)))
  # As in _random_crop: uniform int32 draws reduced modulo the side.
  centres = tf.random.stateless_uniform(
      [holes, 2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
  centres = centres % tf.constant([crop_h, crop_w])
  top = centres[:, :1] - hole_h // 2
  left = centres[:, 1:] - hole_w // 2
  rows = tf.range(crop_h)[None]
  cols = tf.range(crop_w)[None]
  in_rows = (rows >= top) & (rows < top + hole_h)  # [holes, crop_h]
  in_cols = (cols >= left) & (cols < left + hole_w)  # [holes, crop_w]
  mask = tf.reduce_any(in_rows[:, :, None] & in_cols[:, None, :], axis=0)
  return mask[..., None]


def check_options(rotate_degrees, aspect_range, blur_prob, blur_sigma,
                   noise_std, cutout_holes, cutout_size):
  """Validates train_augment's later options (ConfigError naming config.input's field); returns them as numbers.

  settings.from_config checks a config with it, before any work.
  """
  def number(name, value, ok, what):
    try:
      value = float(value)
    except (TypeError, ValueError):
      value = math.nan
    if not (math.isfinite(value) and ok(value)):
      raise ConfigError(f"config.input.{name} must be {what}, got {value!r}")
    return value

  def positive_range(name, value):
    try:
      lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
      raise ConfigError(
          f"config.input.{name} must be a (low, high) pair of floats, got {value!r}") from e
    if not (math.isfinite(hi) and 0 < lo <= hi):
      raise ConfigError(
          f"config.input.{name} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi

  rotate_degrees = number("rotate_degrees", rotate_degrees,
                          lambda v: 0 <= v <= 180, "in [0, 180]")
  aspect_range = positive_range("aspect_range", aspect_range)
  blur_prob = number("blur_prob", blur_prob, lambda v: 0 <= v <= 1,
                     "in [0, 1]")
  blur_sigma = positive_range("blur_sigma", blur_sigma)
  noise_std = number("noise_std", noise_std, lambda v: 0 <= v <= 255,
                     "in [0, 255]")
  if (isinstance(cutout_holes, bool)
      or not isinstance(cutout_holes, numbers.Integral) or cutout_holes < 0):
    raise ConfigError(
        f"config.input.cutout_holes must be an integer >= 0 (0: no cutout), got {cutout_holes!r}")
  cutout_size = number("cutout_size", cutout_size, lambda v: 0 < v <= 1,
                       "in (0, 1]")
  return (rotate_degrees, aspect_range, blur_prob, blur_sigma, noise_std,
          int(cutout_holes), cutout_size)


def train_augment(image, label, seed, *, crop_size: tuple[int, int],
                  scale_range: tuple[float, float] = (1.0, 1.0),
                  hflip: bool = True, photometric: bool = False,
                  brightness: float = 32.0,
                  contrast: tuple[float, float] = (0.5, 1.5),
                  saturation: tuple[float, float] = (0.5, 1.5),
                  hue: float = 18.0 / 360.0 * 2,
                  ignore_label: int = 255, multilabel: bool = False,
                  vflip: bool = False, rot90: bool = False,
                  rotate_degrees: float = 0.0,
                  aspect_range: tuple[float, float] = (1.0, 1.0),
                  blur_prob: float = 0.0,
                  blur_sigma: tuple[float, float] = (0.1, 2.0),
                  noise_std: float = 0.0, cutout_holes: int = 0,
                  cutout_size: float = 0.25):
  """Training-time augmentation of one example (mmseg-style pipeline).

  Steps, in order (each skipped at trace time when its option is off):
    1. random scale and aspect: scale s ~ U(scale_range), aspect r
       log-uniform over `aspect_range`; the new size is
       round(h * s / sqrt(r)) x round(w * s * sqrt(r)) (image bilinear,
       label nearest; skipped when both ranges are (1, 1));
    2. `rot90`: a turn by k * 90 degrees, k uniform in {0, 1, 2, 3} (exact;
       before the crop, so the output is `crop_size` even when not square);
    3. `rotate_degrees` d > 0: rotation by an angle ~ U(-d, d) degrees about
       the centre, same size (image bilinear, label nearest; pixels from
       outside the image: image 0, label `ignore_label`);
    4. pad bottom/right to at least `crop_size` (image 0, label
       `ignore_label`);
    5. random crop of `crop_size` at a uniform offset (same for both);
    6. horizontal flip with probability 0.5 when `hflip`;
    7. vertical flip with probability 0.5 when `vflip`;
    8. colour jitter: photometric distortion of the image when `photometric`
       (see `_photometric`: brightness, contrast, saturation and hue for
       RGB; brightness and contrast only for 1 or 4 channels), clipped back
       to [0, 255];
    9. with probability `blur_prob`, Gaussian blur of the image with
       sigma ~ U(blur_sigma) (see `_gaussian_blur`: edge padding);
    10. `noise_std` > 0: additive Gaussian noise on the image, per pixel and
       band, its std ~ U(0, noise_std) per example (0-255 units), clipped to
       [0, 255];
    11. `cutout_holes` > 0: that many rectangles (see `_cutout_mask`) set to
       0 in the image and `ignore_label` in the label.

  The random draws of steps 1 (scale), 5, 6 and 8 are those of the original
  eight sub-seeds; the other steps draw from sub-seeds split off the
  reserved one, each its own, so an example's crop, flips and colours do not
  change when another option is turned on or off.

  Args:
    image: float32 [H, W, C] in [0, 255]; H and W may be dynamic, C (1, 3 or
      4) static; every band is moved alike.
    label: int32 [H, W] class indices, or with `multilabel` [H, W, K] masks.
    seed: int32/int64 tensor of shape [2]; the output is a pure function of
      (image, label, seed).
    crop_size: static (height, width) of the output.
    scale_range: (low, high) range of the random scale factor.
    hflip: whether to flip horizontally with probability 0.5.
    photometric: whether to apply photometric distortion (colour jitter).
    brightness: maximum absolute brightness delta, 0-255 units.
    contrast: (low, high) range of the multiplicative contrast factor.
    saturation: (low, high) range of the saturation factor.
    hue: maximum absolute hue delta as a fraction of the hue circle; the
      default 0.1 equals mmseg's hue_delta=18 on OpenCV's 0-180 hue scale.
    ignore_label: label value used for padding, rotation fill and cutout.
    multilabel: the label is K masks [H, W, K] (K static), each moved alike.
    vflip: whether to flip vertically with probability 0.5.
    rot90: whether to turn by a random multiple of 90 degrees.
    rotate_degrees: maximum absolute rotation angle in degrees, in [0, 180];
      0 disables the rotation.
    aspect_range: (low, high), 0 < low <= high, range of the aspect factor r
      (log-uniform); (1, 1) disables it.
    blur_prob: probability of blurring, in [0, 1]; 0 disables it.
    blur_sigma: (low, high), 0 < low <= high, range of the blur's sigma in
      pixels; the kernel radius is ceil(3 * high).
    noise_std: maximum std of the additive noise, 0-255 units, in [0, 255];
      0 disables it.
    cutout_holes: number of cutout rectangles, >= 0; 0 disables cutout.
    cutout_size: side of a cutout rectangle as a fraction of the crop's
      side, in (0, 1].

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
  (rotate_degrees, aspect_range, blur_prob, blur_sigma, noise_std,
   cutout_holes, cutout_size) = check_options(
       rotate_degrees, aspect_range, blur_prob, blur_sigma, noise_std,
       cutout_holes, cutout_size)

  image = _as_image(image)
  channels = _channels(image)
  label = _as_label(label, multilabel)
  seeds = tf.random.experimental.stateless_split(_as_seed(seed),
                                                 num=_NUM_SUBSEEDS)
  coins = tf.random.stateless_uniform([_NUM_COINS], seeds[_SEED_COINS])
  extra = tf.random.experimental.stateless_split(seeds[_SEED_RESERVED],
                                                 num=_NUM_EXTRA_SUBSEEDS)

  if (scale_lo, scale_hi) != (1.0, 1.0) or aspect_range != (1.0, 1.0):
    image, label = _random_scale(image, label, seeds[_SEED_SCALE], scale_lo,
                                 scale_hi, extra[_EXTRA_ASPECT], aspect_range)

  if rot90:
    image, label = _random_rot90(image, label, extra[_EXTRA_ROT90])

  if rotate_degrees > 0:
    angle = tf.random.stateless_uniform(
        [], extra[_EXTRA_ROTATE], minval=-rotate_degrees,
        maxval=rotate_degrees) * (math.pi / 180.0)
    image, label = _rotate(image, label, angle, ignore_label)

  hw = tf.shape(image)[:2]
  pad_h = tf.maximum(crop_h - hw[0], 0)
  pad_w = tf.maximum(crop_w - hw[1], 0)
  image, label = _pad_bottom_right(image, label, pad_h, pad_w, ignore_label)

  image, label = _random_crop(image, label, seeds[_SEED_CROP], crop_h, crop_w)
  image = tf.ensure_shape(image, [crop_h, crop_w, channels])
  label = tf.ensure_shape(label, [crop_h, crop_w, label.shape[-1]])

  if hflip:
    flip = coins[_COIN_FLIP] < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, axis=[1]), lambda: label)

  if vflip:
    flip = tf.random.stateless_uniform([], extra[_EXTRA_VFLIP]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[0]), lambda: image)
    label = tf.cond(flip, lambda: tf.reverse(label, axis=[0]), lambda: label)

  if photometric:
    image = _photometric(image, seeds, coins, brightness, contrast,
                         saturation, hue)

  if blur_prob > 0:
    blur = tf.random.stateless_uniform([], extra[_EXTRA_BLUR_COIN]) < blur_prob
    sigma = tf.random.stateless_uniform(
        [], extra[_EXTRA_BLUR_SIGMA], minval=blur_sigma[0],
        maxval=blur_sigma[1])
    radius = math.ceil(3 * blur_sigma[1])
    image = tf.cond(blur, lambda: _gaussian_blur(image, sigma, radius),
                    lambda: image)

  if noise_std > 0:
    std = tf.random.stateless_uniform([], extra[_EXTRA_NOISE_STD], minval=0.0,
                                      maxval=noise_std)
    noise = tf.random.stateless_normal([crop_h, crop_w, channels],
                                       extra[_EXTRA_NOISE])
    image = tf.clip_by_value(image + std * noise, 0.0, 255.0)

  if cutout_holes > 0:
    # Cutout hides what is under its holes; the label there is ignored, not
    # kept: the model cannot see the object it would be asked to name, and
    # learning to paint a class onto a blank patch is no use.
    mask = _cutout_mask(extra[_EXTRA_CUTOUT], cutout_holes, cutout_size,
                        crop_h, crop_w)
    image = tf.where(mask, tf.zeros_like(image), image)
    label = tf.where(mask, tf.fill(tf.shape(label), ignore_label), label)

  image = tf.ensure_shape(image, [crop_h, crop_w, channels])
  label = tf.ensure_shape(label, [crop_h, crop_w, label.shape[-1]])
  return image, _as_output_label(label, multilabel)
