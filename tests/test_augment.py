"""Tests for jaxseg.data.augment."""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from jaxseg.data import augment
from jaxseg.errors import ConfigError

IGNORE = 255


def _label_like(h, w, *, block=1, num_classes=20, ignore_frac=0.1,
                rng_seed=0):
  """Random label in blocks of `block` px, and an image with ch0 = label*10.

  The other two channels are random so that flips/crops of a wrong channel
  would be noticed too.
  """
  rng = np.random.default_rng(rng_seed)
  bh, bw = -(-h // block), -(-w // block)
  coarse = rng.integers(0, num_classes, size=(bh, bw))
  coarse[rng.random((bh, bw)) < ignore_frac] = IGNORE
  label = np.kron(coarse, np.ones((block, block), np.int64))[:h, :w]
  image = np.empty((h, w, 3), np.float32)
  image[..., 0] = label * 10.0
  image[..., 1:] = rng.uniform(0, 255, size=(h, w, 2))
  return image, label.astype(np.int32)


def _run(image, label, seed, **kwargs):
  out_image, out_label = augment.train_augment(
      tf.constant(image), tf.constant(label), tf.constant(seed, tf.int64),
      **kwargs)
  return out_image.numpy(), out_label.numpy()


# ---------------------------------------------------------------------------
# A numpy reference of train_augment. Only the random numbers come from TF:
# its stateless generators, driven by the documented sub-seed layout (one
# sub-seed per purpose split off the example seed, six uniform "coins"). The
# transforms themselves are written out here in numpy.
# ---------------------------------------------------------------------------


def _draws(seed, scale_range=(1.0, 1.0), brightness=32.0,
           contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=0.1):
  seeds = tf.random.experimental.stateless_split(
      tf.constant(seed, tf.int64), num=augment._NUM_SUBSEEDS)  # pylint: disable=protected-access
  sub = lambda i: seeds[i]
  uniform = lambda i, lo, hi: float(tf.random.stateless_uniform(
      [], sub(i), minval=lo, maxval=hi).numpy())
  # pylint: disable=protected-access
  return {
      'coins': tf.random.stateless_uniform(
          [augment._NUM_COINS], sub(augment._SEED_COINS)).numpy(),
      'scale': np.float32(uniform(augment._SEED_SCALE, *scale_range)),
      'offset': tf.random.stateless_uniform(
          [2], sub(augment._SEED_CROP), minval=0, maxval=tf.int32.max,
          dtype=tf.int32).numpy(),
      'brightness': uniform(augment._SEED_BRIGHTNESS, -brightness, brightness),
      'contrast': uniform(augment._SEED_CONTRAST, *contrast),
      'saturation': uniform(augment._SEED_SATURATION, *saturation),
      'hue': uniform(augment._SEED_HUE, -hue, hue),
  }
  # pylint: enable=protected-access


def _source_positions(in_len, out_len, *, nearest):
  """Half-pixel-centre source coordinates of each output pixel, in float32."""
  scale = np.float32(in_len) / np.float32(out_len)
  pos = (np.arange(out_len, dtype=np.float32) + np.float32(0.5)) * scale
  return pos if nearest else pos - np.float32(0.5)


def np_resize_bilinear(x, out_h, out_w):
  """Bilinear, half-pixel centres, no antialiasing; edges clamped."""
  x = x.astype(np.float64)
  for axis, out_len in ((0, out_h), (1, out_w)):
    in_len = x.shape[axis]
    pos = _source_positions(in_len, out_len, nearest=False).astype(np.float64)
    floor = np.floor(pos)
    lerp = pos - floor
    lo = np.clip(floor, 0, in_len - 1).astype(np.int64)
    hi = np.clip(np.ceil(pos), 0, in_len - 1).astype(np.int64)
    shape = [1] * x.ndim
    shape[axis] = out_len
    lerp = lerp.reshape(shape)
    x = np.take(x, lo, axis) + (np.take(x, hi, axis) - np.take(x, lo, axis)) * lerp
  return x


def np_resize_nearest(x, out_h, out_w):
  """Nearest neighbour, half-pixel centres: source index floor((i + 0.5) * in / out)."""
  rows = np.minimum(np.floor(_source_positions(x.shape[0], out_h, nearest=True)).astype(np.int64), x.shape[0] - 1)
  cols = np.minimum(np.floor(_source_positions(x.shape[1], out_w, nearest=True)).astype(np.int64), x.shape[1] - 1)
  return x[rows][:, cols]


def _hsv_map(image, fn):
  """Applies fn(h, s, v) -> (h, s, v) to every pixel with the standard library's colorsys."""
  out = np.empty(image.shape, np.float64)
  for idx in np.ndindex(image.shape[:2]):
    out[idx] = colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*image[idx])))
  return out


def np_photometric(image, d):
  """mmseg's PhotoMetricDistortion (augment._photometric's order), every step clipped to [0, 255].

  Saturation and hue exist for RGB only: other channel counts get brightness and contrast.
  """
  coins = d['coins']
  rgb = image.shape[-1] == 3
  clip = lambda x: np.clip(x, 0.0, 255.0)
  x = image.astype(np.float64)
  if coins[1] < 0.5:  # Brightness.
    x = clip(x + d['brightness'])
  contrast_first = coins[2] < 0.5
  if contrast_first and coins[3] < 0.5:
    x = clip(x * d['contrast'])
  if rgb and coins[4] < 0.5:  # Saturation, clamped to [0, 1].
    x = clip(_hsv_map(x, lambda h, s, v: (h, min(max(s * d['saturation'], 0.0), 1.0), v)))
  if rgb and coins[5] < 0.5:  # Hue, on the circle.
    x = clip(_hsv_map(x, lambda h, s, v: ((h + d['hue']) % 1.0, s, v)))
  if not contrast_first and coins[3] < 0.5:
    x = clip(x * d['contrast'])
  return x


def np_augment(image, label, seed, *, crop_size, scale_range=(1.0, 1.0),
               hflip=True, photometric=False, ignore=IGNORE, **photometric_kwargs):
  """Scale (image bilinear, label nearest), pad bottom/right, crop, flip, photometric: numpy."""
  crop_h, crop_w = crop_size
  d = _draws(seed, scale_range=scale_range, **photometric_kwargs)
  image = np.asarray(image, np.float64)
  label = np.asarray(label)
  if tuple(scale_range) != (1.0, 1.0):
    h, w = label.shape
    new_h = max(int(np.round(np.float32(h) * d['scale'])), 1)
    new_w = max(int(np.round(np.float32(w) * d['scale'])), 1)
    image = np_resize_bilinear(image, new_h, new_w)
    label = np_resize_nearest(label, new_h, new_w)
  h, w = label.shape
  ph, pw = max(crop_h, h), max(crop_w, w)
  image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
  label = np.pad(label, ((0, ph - h), (0, pw - w)), constant_values=ignore)
  y, x = d['offset'] % (np.array([ph, pw]) - np.array([crop_h, crop_w]) + 1)
  image = image[y:y + crop_h, x:x + crop_w]
  label = label[y:y + crop_h, x:x + crop_w]
  flipped = hflip and d['coins'][0] < 0.5
  if flipped:
    image, label = image[:, ::-1], label[:, ::-1]
  if photometric:
    image = np_photometric(image, d)
  return image, label, dict(d, flipped=flipped, origin=(int(y), int(x)))


def test_same_seed_same_output_different_seeds_different_crops():
  image, label = _label_like(64, 80)
  kwargs = dict(crop_size=(32, 40), scale_range=(0.75, 1.5),
                photometric=True)
  a = _run(image, label, [3, 7], **kwargs)
  b = _run(image, label, [3, 7], **kwargs)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  # Seed dtype must not matter, only its values.
  c = augment.train_augment(image, label, tf.constant([3, 7], tf.int32),
                            **kwargs)
  np.testing.assert_array_equal(a[0], c[0].numpy())

  labels = [_run(image, label, [0, i], crop_size=(32, 40))[1]
            for i in range(8)]
  windows = set()
  for i, got in enumerate(labels):
    _, want, info = np_augment(image, label, [0, i], crop_size=(32, 40))
    np.testing.assert_array_equal(got, want)
    windows.add(info['origin'] + (info['flipped'],))
  # As many different labels as different windows (offset, flip) drawn: 7
  # for these 8 seeds (two draw the same window).
  assert len({x.tobytes() for x in labels}) == len(windows) == 7


def test_geometry_consistency_no_scale():
  # 50 x 60 image with crop 64 x 48: forces padding in height and a random
  # crop offset in width.
  image, label = _label_like(50, 60)
  for i in range(10):
    out_image, out_label = _run(image, label, [1, i], crop_size=(64, 48),
                                scale_range=(1.0, 1.0))
    valid = out_label != IGNORE
    assert valid.any()
    np.testing.assert_array_equal(out_image[..., 0][valid] / 10.0,
                                  out_label[valid])
    # Rows 50.. are padding: ignore in the label, 0 in the image.
    np.testing.assert_array_equal(out_label[50:], IGNORE)
    np.testing.assert_array_equal(out_image[50:], 0.0)
    # The crop (possibly flipped) must be a contiguous window of the input.
    rows = out_label[:50]
    found = any(
        np.array_equal(rows, cand[:, x:x + 48])
        for cand in (label, label[:, ::-1]) for x in range(60 - 48 + 1))
    assert found
    # ... exactly the window and flip the seed draws.
    want_image, want_label, _ = np_augment(image, label, [1, i],
                                           crop_size=(64, 48))
    np.testing.assert_array_equal(out_label, want_label)
    np.testing.assert_array_equal(out_image, want_image)


def test_flip_happens_for_some_seeds_and_not_others():
  image, label = _label_like(32, 32)
  flipped = []
  for i in range(16):
    _, out_label = _run(image, label, [5, i], crop_size=(32, 32))
    if np.array_equal(out_label, label[:, ::-1]):
      flipped.append(True)
    else:
      np.testing.assert_array_equal(out_label, label)
      flipped.append(False)
  assert any(flipped) and not all(flipped)
  assert flipped == [bool(_draws([5, i])['coins'][0] < 0.5) for i in range(16)]
  # hflip=False never flips.
  for i in range(4):
    _, out_label = _run(image, label, [5, i], crop_size=(32, 32), hflip=False)
    np.testing.assert_array_equal(out_label, label)


def _window(x, r, fn):
  """fn (np.min / np.max) over a (2r+1)^2 window; borders are dropped."""
  h, w = x.shape
  stack = [x[r + dy:h - r + dy, r + dx:w - r + dx]
           for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
  return fn(np.stack(stack), axis=0)


def test_geometry_consistency_with_scale():
  # Labels in 16 px blocks; each seed draws a scale in [0.5, 2]: the label
  # is resized nearest-neighbour and the image bilinearly (half-pixel
  # centres, as tf.image.resize), then padded, cropped and maybe flipped.
  image, label = _label_like(96, 112, block=16, ignore_frac=0.15)
  scales = []
  for i in range(12):
    out_image, out_label = _run(image, label, [9, i], crop_size=(72, 72),
                                scale_range=(0.5, 2.0))
    want_image, want_label, info = np_augment(
        image, label, [9, i], crop_size=(72, 72), scale_range=(0.5, 2.0))
    np.testing.assert_array_equal(out_label, want_label)
    np.testing.assert_allclose(out_image, want_image, atol=1e-3)
    scales.append(float(info['scale']))
  assert min(scales) < 0.9 and max(scales) > 1.1  # Shrunk and enlarged both.


def test_scale_changes_size_before_crop():
  # With a large crop and a small scale the scaled image is padded, so the
  # amount of ignore padding reveals the scale that was applied.
  image, label = _label_like(40, 40, ignore_frac=0.0)
  pads = set()
  for i in range(6):
    _, out_label = _run(image, label, [2, i], crop_size=(80, 80),
                        scale_range=(0.5, 1.0), hflip=False)
    scale = _draws([2, i], scale_range=(0.5, 1.0))['scale']
    size = int(np.round(np.float32(40) * scale))  # tf.round: half to even.
    valid = out_label != IGNORE
    np.testing.assert_array_equal(valid.any(1), np.arange(80) < size)
    np.testing.assert_array_equal(valid.any(0), np.arange(80) < size)
    # The 80 x 80 crop of the padded 40*s image can only start at (0, 0).
    np.testing.assert_array_equal(out_label[:size, :size],
                                  np_resize_nearest(label, size, size))
    pads.add(size)
  assert len(pads) > 1


def test_static_shapes_in_dataset_map_with_dynamic_inputs():
  sizes = [(30, 50), (70, 20), (64, 64), (17, 91)]

  def gen():
    for h, w in sizes:
      image, label = _label_like(h, w)
      yield image, label

  ds = tf.data.Dataset.from_generator(
      gen, output_signature=(
          tf.TensorSpec([None, None, 3], tf.float32),
          tf.TensorSpec([None, None], tf.int32)))

  def fn(index, example):
    seed = tf.stack([tf.constant(42, tf.int64), index])
    return augment.train_augment(example[0], example[1], seed,
                                 crop_size=(32, 48), scale_range=(0.5, 2.0),
                                 photometric=True)

  mapped = ds.enumerate().map(fn, num_parallel_calls=2, deterministic=True)
  image_spec, label_spec = mapped.element_spec
  assert image_spec.shape.as_list() == [32, 48, 3]
  assert label_spec.shape.as_list() == [32, 48]
  assert image_spec.dtype == tf.float32 and label_spec.dtype == tf.int32
  batches = list(mapped.batch(2, drop_remainder=True).as_numpy_iterator())
  assert len(batches) == 2
  assert batches[0][0].shape == (2, 32, 48, 3)
  # Graph-mode output equals eager output for the same seed.
  again = list(mapped.as_numpy_iterator())
  np.testing.assert_array_equal(again[0][0], batches[0][0][0])
  eager = augment.train_augment(
      *_label_like(*sizes[1]), tf.constant([42, 1], tf.int64),
      crop_size=(32, 48), scale_range=(0.5, 2.0), photometric=True)
  np.testing.assert_array_equal(eager[0].numpy(), again[1][0])
  np.testing.assert_array_equal(eager[1].numpy(), again[1][1])


def test_photometric_changes_image_not_label():
  rng = np.random.default_rng(1)
  image = rng.uniform(0, 255, size=(40, 40, 3)).astype(np.float32)
  label = rng.integers(0, 20, size=(40, 40)).astype(np.int32)
  changed, drawn = [], []
  for i in range(8):
    base_image, base_label = _run(image, label, [4, i], crop_size=(32, 32))
    out_image, out_label = _run(image, label, [4, i], crop_size=(32, 32),
                                photometric=True, brightness=64.0)
    # Same seed: geometry is unchanged by turning photometric on.
    np.testing.assert_array_equal(out_label, base_label)
    want, _, info = np_augment(image, label, [4, i], crop_size=(32, 32),
                               photometric=True, brightness=64.0)
    np.testing.assert_allclose(out_image, want, atol=1e-3)
    changed.append(not np.allclose(out_image, base_image, atol=1e-3))
    # Coins 1, 3, 4, 5: brightness, contrast, saturation, hue.
    drawn.append(any(info['coins'][j] < 0.5 for j in (1, 3, 4, 5)))
  assert changed == drawn  # The image changes exactly when a transform is drawn.
  assert sum(drawn) >= 5  # These seeds draw one for most images.


def test_photometric_clips_to_range():
  image = np.full((8, 8, 3), 250.0, np.float32)
  image[:4] = 5.0
  label = np.zeros((8, 8), np.int32)
  clipped = 0
  for i in range(16):
    kwargs = dict(crop_size=(8, 8), photometric=True, brightness=100.0,
                  contrast=(0.1, 3.0))
    out_image, _ = _run(image, label, [6, i], **kwargs)
    want, _, _ = np_augment(image, label, [6, i], **kwargs)
    np.testing.assert_allclose(out_image, want, atol=1e-3)
    clipped += int(np.any(want == 0.0) or np.any(want == 255.0))
  assert clipped >= 8  # Most seeds push some pixels past 0 or 255.


def test_pad_to_size():
  image, label = _label_like(20, 30)
  out_image, out_label = augment.pad_to_size(image, label, (32, 40),
                                             ignore_label=99)
  assert out_image.shape == (32, 40, 3) and out_label.shape == (32, 40)
  np.testing.assert_array_equal(out_image[:20, :30], image)
  np.testing.assert_array_equal(out_label[:20, :30], label)
  np.testing.assert_array_equal(out_image[20:], 0.0)
  np.testing.assert_array_equal(out_image[:, 30:], 0.0)
  np.testing.assert_array_equal(out_label[20:], 99)
  np.testing.assert_array_equal(out_label[:, 30:], 99)


def test_pad_to_size_static_shape_in_graph():
  spec = (tf.TensorSpec([None, None, 3], tf.float32),
          tf.TensorSpec([None, None], tf.int32))
  fn = tf.function(lambda img, lbl: augment.pad_to_size(img, lbl, (32, 40)),
                   input_signature=spec)
  out_image, out_label = fn.get_concrete_function().structured_outputs
  assert out_image.shape.as_list() == [32, 40, 3]
  assert out_label.shape.as_list() == [32, 40]


def test_pad_to_size_errors_when_too_large():
  image, label = _label_like(20, 50)
  with pytest.raises(tf.errors.InvalidArgumentError, match="pad_to_size"):
    augment.pad_to_size(image, label, (32, 40))
  # Inside tf.data with static shapes (caught at trace time) ...
  with pytest.raises(tf.errors.InvalidArgumentError, match="pad_to_size"):
    tf.data.Dataset.from_tensors((image, label)).map(
        lambda img, lbl: augment.pad_to_size(img, lbl, (32, 40)))
  # ... and with dynamic shapes, where the run-time assert must not be
  # pruned (else tf.pad fails with an opaque negative-padding error).
  ds = tf.data.Dataset.from_generator(
      lambda: iter([(image, label)]), output_signature=(
          tf.TensorSpec([None, None, 3], tf.float32),
          tf.TensorSpec([None, None], tf.int32)))
  ds = ds.map(lambda img, lbl: augment.pad_to_size(img, lbl, (32, 40)))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="must be <= target size"):
    list(ds)


def test_invalid_config_raises():
  image, label = _label_like(8, 8)
  with pytest.raises(ConfigError, match="crop_size"):
    augment.train_augment(image, label, [0, 0], crop_size=(0, 8))
  with pytest.raises(ConfigError, match="scale_range"):
    augment.train_augment(image, label, [0, 0], crop_size=(8, 8),
                          scale_range=(2.0, 1.0))


# ---------------------------------------------------------------------------
# The options added later (vflip, rot90, rotate_degrees, aspect_range, blur,
# noise, cutout). Their draws come from sub-seeds split off the reserved one;
# the transforms are again written out in numpy (and scipy for the blur).
# ---------------------------------------------------------------------------


def _extra_draws(seed, *, rotate_degrees=10.0, aspect_range=(1.0, 1.0),
                 blur_sigma=(0.1, 2.0), noise_std=1.0, cutout_holes=0,
                 crop_size=(1, 1)):
  # pylint: disable=protected-access
  seeds = tf.random.experimental.stateless_split(
      tf.constant(seed, tf.int64), num=augment._NUM_SUBSEEDS)
  extra = tf.random.experimental.stateless_split(
      seeds[augment._SEED_RESERVED], num=augment._NUM_EXTRA_SUBSEEDS)
  uniform = lambda i, lo=0.0, hi=1.0: float(tf.random.stateless_uniform(
      [], extra[i], minval=lo, maxval=hi).numpy())
  log_lo, log_hi = np.log(aspect_range)
  return {
      'log_aspect': uniform(augment._EXTRA_ASPECT, log_lo, log_hi),
      'k': int(tf.random.stateless_uniform(
          [], extra[augment._EXTRA_ROT90], minval=0, maxval=4,
          dtype=tf.int32)),
      'degrees': uniform(augment._EXTRA_ROTATE, -rotate_degrees,
                         rotate_degrees),
      'vflip': uniform(augment._EXTRA_VFLIP) < 0.5,
      'blur_coin': uniform(augment._EXTRA_BLUR_COIN),
      'sigma': uniform(augment._EXTRA_BLUR_SIGMA, *blur_sigma),
      'noise_std': uniform(augment._EXTRA_NOISE_STD, 0.0, noise_std),
      'centres': tf.random.stateless_uniform(
          [cutout_holes, 2], extra[augment._EXTRA_CUTOUT], minval=0,
          maxval=tf.int32.max, dtype=tf.int32).numpy() % np.array(crop_size),
  }
  # pylint: enable=protected-access


def np_cutout_mask(centres, hole_h, hole_w, crop_h, crop_w):
  mask = np.zeros((crop_h, crop_w), bool)
  for cy, cx in centres:
    top, left = cy - hole_h // 2, cx - hole_w // 2
    mask[max(top, 0):max(top + hole_h, 0), max(left, 0):max(left + hole_w, 0)] = True
  return mask


def np_augment_geometry(image, label, seed, *, crop_size, scale_range=(1.0, 1.0),
                        aspect_range=(1.0, 1.0), rot90=False, hflip=True,
                        vflip=False, cutout_holes=0, cutout_size=0.25,
                        ignore=IGNORE, multilabel=False):
  """Scale and aspect, rot90, pad, crop, hflip, vflip, cutout (no rotation, no photometric): numpy.

  `label` is [H, W], or [H, W, K] masks with `multilabel` (every mask moved alike).
  """
  del multilabel  # The label's rank says it.
  crop_h, crop_w = crop_size
  d = _draws(seed, scale_range=scale_range)
  e = _extra_draws(seed, aspect_range=aspect_range, cutout_holes=cutout_holes,
                   crop_size=crop_size)
  image = np.asarray(image, np.float64)
  label = np.asarray(label)
  if tuple(scale_range) != (1.0, 1.0) or tuple(aspect_range) != (1.0, 1.0):
    s = float(d['scale']) if tuple(scale_range) != (1.0, 1.0) else 1.0
    sqrt_r = np.exp(0.5 * e['log_aspect'])
    h, w = label.shape[:2]
    new_h = max(int(np.round(h * s / sqrt_r)), 1)
    new_w = max(int(np.round(w * s * sqrt_r)), 1)
    image = np_resize_bilinear(image, new_h, new_w)
    label = np_resize_nearest(label, new_h, new_w)
  if rot90:
    image, label = np.rot90(image, e['k']), np.rot90(label, e['k'])
  h, w = label.shape[:2]
  ph, pw = max(crop_h, h), max(crop_w, w)
  image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
  label = np.pad(label, ((0, ph - h), (0, pw - w)) + ((0, 0),) * (label.ndim - 2),
                 constant_values=ignore)
  y, x = d['offset'] % (np.array([ph, pw]) - np.array([crop_h, crop_w]) + 1)
  image = image[y:y + crop_h, x:x + crop_w]
  label = label[y:y + crop_h, x:x + crop_w]
  if hflip and d['coins'][0] < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  if vflip and e['vflip']:
    image, label = image[::-1], label[::-1]
  if cutout_holes:
    mask = np_cutout_mask(e['centres'], max(1, round(cutout_size * crop_h)),
                          max(1, round(cutout_size * crop_w)), crop_h, crop_w)
    image = np.where(mask[..., None], 0.0, image)
    label = np.where(mask.reshape(mask.shape + (1,) * (label.ndim - 2)), ignore, label)
  return image, label, e


def np_rotate(x, degrees, fill, *, nearest):
  """Rotation of x [H, W, ...] about its centre ((W-1)/2, (H-1)/2), pixel centres at integers, same size.

  Output pixel p = (col, row) takes the input at c + R (p - c), R = [[cos, -sin], [sin, cos]] on (col, row): a
  positive angle turns the content counter-clockwise on screen. Nearest rounds to the closest pixel; bilinear
  weighs the 4 around (each outside one counts as `fill`). Returns (out, ambiguous): `ambiguous` marks the
  pixels whose source lies within 1e-3 of a rounding tie, where float32 and float64 may pick differently.
  """
  h, w = x.shape[:2]
  theta = np.deg2rad(degrees)
  cos, sin = np.cos(theta), np.sin(theta)
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij')
  cy, cx = (h - 1) / 2, (w - 1) / 2
  src_x = cx + cos * (cols - cx) - sin * (rows - cy)
  src_y = cy + sin * (cols - cx) + cos * (rows - cy)
  x = x.astype(np.float64)
  tail = x.shape[2:]

  def read(yy, xx):
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    got = x[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    return np.where(inside.reshape(inside.shape + (1,) * len(tail)), got, fill)

  if nearest:
    near = lambda v: np.abs(v - np.floor(v) - 0.5) < 1e-3
    ambiguous = near(src_x) | near(src_y)
    yy = np.floor(src_y + 0.5).astype(np.int64)
    xx = np.floor(src_x + 0.5).astype(np.int64)
    return read(yy, xx), ambiguous
  y0, x0 = np.floor(src_y), np.floor(src_x)
  wy, wx = src_y - y0, src_x - x0
  wy = wy.reshape(wy.shape + (1,) * len(tail))
  wx = wx.reshape(wx.shape + (1,) * len(tail))
  y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
  top = read(y0, x0) * (1 - wx) + read(y0, x0 + 1) * wx
  bottom = read(y0 + 1, x0) * (1 - wx) + read(y0 + 1, x0 + 1) * wx
  return top * (1 - wy) + bottom * wy, np.zeros((h, w), bool)


def _bits(label, k=3):
  """Multi-label masks [H, W, K] of a class-index label: mask k is bit k of the class id; ignore stays ignore."""
  bits = (label[..., None] >> np.arange(k)) & 1
  return np.where(label[..., None] == IGNORE, IGNORE, bits).astype(np.int32)


def test_rot90_vflip_aspect_cutout_match_numpy_non_square_crop():
  image, label = _label_like(30, 44)
  kwargs = dict(crop_size=(24, 36), scale_range=(0.75, 1.25), aspect_range=(0.8, 1.25), rot90=True, vflip=True,
                cutout_holes=2, cutout_size=0.2)
  ks, vflips = set(), set()
  for i in range(8):
    out_image, out_label = _run(image, label, [7, i], **kwargs)
    want_image, want_label, e = np_augment_geometry(image, label, [7, i], **kwargs)
    assert out_label.shape == (24, 36) and out_image.shape == (24, 36, 3)
    np.testing.assert_array_equal(out_label, want_label)
    np.testing.assert_allclose(out_image, want_image, atol=1e-3)
    ks.add(e['k'])
    vflips.add(e['vflip'])
  assert len(ks) >= 3 and vflips == {True, False}


def test_rot90_and_vflip_for_some_seeds_and_not_others():
  image, label = _label_like(32, 32)
  seen = set()
  for i in range(12):
    _, out_label = _run(image, label, [3, i], crop_size=(32, 32), hflip=False, rot90=True, vflip=True)
    e = _extra_draws([3, i])
    want = np.rot90(label, e['k'])
    np.testing.assert_array_equal(out_label, want[::-1] if e['vflip'] else want)
    seen.add((e['k'], e['vflip']))
  assert len(seen) >= 5  # Both flips, several turns, identity among them or not.
  # Off by default: the label comes back as it went in.
  np.testing.assert_array_equal(_run(image, label, [3, 0], crop_size=(32, 32), hflip=False)[1], label)


def test_rotation_matches_numpy_and_fills_with_ignore():
  image, label = _label_like(41, 57, block=8, ignore_frac=0.0)
  angles = []
  for i in range(6):
    out_image, out_label = _run(image, label, [11, i], crop_size=(41, 57), hflip=False, rotate_degrees=30.0)
    degrees = _extra_draws([11, i], rotate_degrees=30.0)['degrees']
    want_label, ambiguous = np_rotate(label, degrees, IGNORE, nearest=True)
    want_image, _ = np_rotate(image, degrees, 0.0, nearest=False)
    assert ambiguous.mean() < 0.02
    np.testing.assert_array_equal(out_label[~ambiguous], want_label[~ambiguous])
    np.testing.assert_allclose(out_image, want_image, atol=0.05)
    # The corners come from outside the image: ignore in the label, 0 in the image.
    if abs(degrees) > 5:
      for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert out_label[corner] == IGNORE and not out_image[corner].any()
    angles.append(degrees)
  assert min(angles) < -5 and max(angles) > 5


def test_rotation_positive_quarter_turn_is_counter_clockwise_as_np_rot90():
  # The sign convention: 90 degrees about the centre of a square is an exact turn, as np.rot90.
  image, label = _label_like(9, 9)
  out_image, out_label = augment._rotate(  # pylint: disable=protected-access
      tf.constant(image), tf.constant(label[..., None]), tf.constant(np.pi / 2, tf.float32), IGNORE)
  np.testing.assert_array_equal(out_label.numpy()[..., 0], np.rot90(label))
  np.testing.assert_allclose(out_image.numpy(), np.rot90(image), atol=1e-2)  # cos(pi/2) is -4e-8 in float32.


def test_rotation_of_zero_degrees_adds_no_op():
  spec = (tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([None, None], tf.int32))
  ops = {}
  for degrees in (0.0, 5.0):
    fn = tf.function(lambda img, lbl, d=degrees: augment.train_augment(
        img, lbl, tf.constant([0, 0], tf.int64), crop_size=(8, 8), rotate_degrees=d), input_signature=spec)
    ops[degrees] = {op.type for op in fn.get_concrete_function().graph.get_operations()}
  assert 'ImageProjectiveTransformV3' in ops[5.0] and 'ImageProjectiveTransformV3' not in ops[0.0]


def test_aspect_jitter_changes_sides_by_the_drawn_ratio():
  # A large crop pads the resized image: the padding shows its height and width.
  image, label = _label_like(40, 40, ignore_frac=0.0)
  ratios = []
  for i in range(6):
    _, out_label = _run(image, label, [2, i], crop_size=(96, 96), hflip=False, scale_range=(0.75, 1.25),
                        aspect_range=(0.5, 2.0))
    s = float(_draws([2, i], scale_range=(0.75, 1.25))['scale'])
    r = np.exp(_extra_draws([2, i], aspect_range=(0.5, 2.0))['log_aspect'])
    new_h, new_w = int(np.round(40 * s / np.sqrt(r))), int(np.round(40 * s * np.sqrt(r)))
    valid = out_label != IGNORE
    np.testing.assert_array_equal(valid.any(1), np.arange(96) < new_h)
    np.testing.assert_array_equal(valid.any(0), np.arange(96) < new_w)
    np.testing.assert_array_equal(out_label[:new_h, :new_w], np_resize_nearest(label, new_h, new_w))
    assert 0.5 - 0.05 <= new_w / new_h <= 2.0 + 0.05  # The aspect range, up to rounding.
    ratios.append(new_w / new_h)
  assert min(ratios) < 0.9 and max(ratios) > 1.1
  # With aspect_range (1, 1) the scale alone: both sides alike.
  _, out_label = _run(image, label, [2, 0], crop_size=(96, 96), hflip=False, scale_range=(0.75, 1.25))
  valid = out_label != IGNORE
  assert valid.any(1).sum() == valid.any(0).sum()


def test_blur_matches_scipy_gaussian_filter_and_leaves_the_label():
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, size=(20, 26, 3)).astype(np.float32)
  label = rng.integers(0, 20, size=(20, 26)).astype(np.int32)
  sigma = 1.3
  out_image, out_label = _run(image, label, [1, 0], crop_size=(20, 26), hflip=False, blur_prob=1.0,
                              blur_sigma=(sigma, sigma))
  # Kernel radius ceil(3 * sigma) = 4; edge padding is scipy's mode='nearest'.
  want = scipy.ndimage.gaussian_filter(image.astype(np.float64), sigma, mode='nearest', radius=4, axes=(0, 1))
  np.testing.assert_allclose(out_image, want, atol=1e-3)
  np.testing.assert_array_equal(out_label, label)
  # blur_prob 0.5: blurred (with its drawn sigma) exactly when the coin says so.
  blurred = []
  for i in range(6):
    out_image, out_label = _run(image, label, [1, i], crop_size=(20, 26), hflip=False, blur_prob=0.5,
                                blur_sigma=(0.5, 1.5))
    e = _extra_draws([1, i], blur_sigma=(0.5, 1.5))
    want = (scipy.ndimage.gaussian_filter(image.astype(np.float64), e['sigma'], mode='nearest', radius=5,
                                          axes=(0, 1)) if e['blur_coin'] < 0.5 else image)
    np.testing.assert_allclose(out_image, want, atol=1e-3)
    np.testing.assert_array_equal(out_label, label)
    blurred.append(e['blur_coin'] < 0.5)
  assert any(blurred) and not all(blurred)


def test_noise_has_the_drawn_std_and_leaves_the_label():
  image = np.full((32, 32, 3), 128.0, np.float32)
  label = np.random.default_rng(0).integers(0, 20, size=(32, 32)).astype(np.int32)
  stds = []
  for i in range(5):
    out_image, out_label = _run(image, label, [8, i], crop_size=(32, 32), hflip=False, noise_std=20.0)
    want_std = _extra_draws([8, i], noise_std=20.0)['noise_std']
    residual = out_image.astype(np.float64) - 128.0
    assert want_std <= 20.0
    np.testing.assert_allclose(residual.std(), want_std, rtol=0.06)
    assert abs(residual.mean()) < 0.1 * want_std + 0.1
    np.testing.assert_array_equal(out_label, label)
    stds.append(residual.std())
  assert max(stds) - min(stds) > 2.0  # The std is drawn per example.
  # Clipped to [0, 255].
  out_image, _ = _run(np.full((32, 32, 3), 250.0, np.float32), label, [8, 0], crop_size=(32, 32), noise_std=20.0)
  assert out_image.max() == 255.0 and out_image.min() < 250.0


def test_cutout_sets_image_0_and_label_ignore_over_rectangles():
  rng = np.random.default_rng(5)
  image = rng.uniform(1, 255, size=(32, 48, 3)).astype(np.float32)
  label = rng.integers(0, 20, size=(32, 48)).astype(np.int32)
  for i in range(4):
    out_image, out_label = _run(image, label, [4, i], crop_size=(32, 48), hflip=False, cutout_holes=3,
                                cutout_size=0.25)
    centres = _extra_draws([4, i], cutout_holes=3, crop_size=(32, 48))['centres']
    mask = np_cutout_mask(centres, 8, 12, 32, 48)  # 0.25 x 32, 0.25 x 48.
    assert mask.any()
    np.testing.assert_array_equal(out_label, np.where(mask, IGNORE, label))
    np.testing.assert_array_equal(out_image, np.where(mask[..., None], 0.0, image))
  # One hole: a single rectangle, 8 x 12 unless clipped by the crop's border.
  full = 0
  for i in range(8):
    _, out_label = _run(image, label, [4, i], crop_size=(32, 48), hflip=False, cutout_holes=1, cutout_size=0.25)
    rows, cols = np.nonzero(out_label == IGNORE)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert len(rows) == height * width and height <= 8 and width <= 12
    full += (height, width) == (8, 12)
  assert full >= 4


def test_multilabel_masks_move_with_the_image():
  image, label = _label_like(24, 40, ignore_frac=0.0)
  masks = _bits(label)
  kwargs = dict(crop_size=(24, 32), rot90=True, vflip=True, multilabel=True)
  for i in range(4):
    out_image, out_masks = _run(image, masks, [6, i], **kwargs)
    want_image, want_masks, _ = np_augment_geometry(image, masks, [6, i], **kwargs)
    assert out_masks.shape == (24, 32, 3)
    np.testing.assert_array_equal(out_masks, want_masks)
    np.testing.assert_allclose(out_image, want_image, atol=1e-3)
  # Rotation: every mask sampled nearest, as the label would be.
  out_image, out_masks = _run(image, masks, [6, 0], crop_size=(24, 40), hflip=False, rotate_degrees=20.0,
                              multilabel=True)
  degrees = _extra_draws([6, 0], rotate_degrees=20.0)['degrees']
  want_masks, ambiguous = np_rotate(masks, degrees, IGNORE, nearest=True)
  np.testing.assert_array_equal(out_masks[~ambiguous], want_masks[~ambiguous])
  assert (out_masks == IGNORE).all(-1).any()  # Outside the image: ignore in every mask.


def test_invalid_new_options_raise_naming_the_option():
  image, label = _label_like(8, 8)
  bad = [('rotate_degrees', -1.0), ('rotate_degrees', float('nan')), ('blur_prob', 1.5), ('blur_prob', -0.1),
         ('blur_sigma', (0.0, 1.0)), ('blur_sigma', (2.0, 1.0)), ('noise_std', -1.0), ('cutout_holes', -1),
         ('cutout_holes', 1.5), ('cutout_size', 0.0), ('cutout_size', 1.5), ('aspect_range', (0.0, 1.0)),
         ('aspect_range', (1.5, 1.0))]
  for name, value in bad:
    with pytest.raises(ConfigError, match=name):
      augment.train_augment(image, label, [0, 0], crop_size=(8, 8), **{name: value})


def test_all_options_in_dataset_map_give_static_shapes():
  sizes = [(30, 50), (70, 20), (17, 91)]

  def gen():
    for h, w in sizes:
      yield _label_like(h, w)

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([None, None], tf.int32)))
  kwargs = dict(crop_size=(24, 40), scale_range=(0.5, 2.0), aspect_range=(0.75, 1.33), photometric=True,
                vflip=True, rot90=True, rotate_degrees=15.0, blur_prob=0.5, noise_std=8.0, cutout_holes=2)
  mapped = ds.enumerate().map(
      lambda i, ex: augment.train_augment(ex[0], ex[1], tf.stack([tf.constant(1, tf.int64), i]), **kwargs))
  image_spec, label_spec = mapped.element_spec
  assert image_spec.shape.as_list() == [24, 40, 3] and label_spec.shape.as_list() == [24, 40]
  out = list(mapped.as_numpy_iterator())
  assert len(out) == 3
  for image, label in out:
    assert 0 <= image.min() and image.max() <= 255
    assert set(np.unique(label)) <= set(range(20)) | {IGNORE}  # Nearest: class ids, never blends.


def test_config_input_fields_reach_settings():
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxseg import settings as settings_lib  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  got = settings_lib.from_config(config).input
  assert (got.vflip, got.rot90, got.rotate_degrees, got.aspect_range, got.blur_prob, got.blur_sigma, got.noise_std,
          got.cutout_holes, got.cutout_size) == (False, False, 0.0, (1.0, 1.0), 0.0, (0.1, 2.0), 0.0, 0, 0.25)
  values = dict(vflip=True, rot90=True, rotate_degrees=12.5, aspect_range=(0.75, 1.25), blur_prob=0.3,
                blur_sigma=(0.5, 1.5), noise_std=6.0, cutout_holes=2, cutout_size=0.125)
  for name, value in values.items():
    config.input[name] = value
  got = settings_lib.from_config(config).input
  assert {name: getattr(got, name) for name in values} == values
  # A config.json written before these fields existed still loads, with the defaults.
  old = default.get_config()
  for name in values:
    del old.input[name]
  assert settings_lib.from_config(old).input.cutout_holes == 0
  for name, value in [('rotate_degrees', -5.0), ('blur_prob', 2.0), ('blur_sigma', (0.0, 1.0)), ('noise_std', -1.0),
                      ('cutout_holes', -1), ('cutout_size', 0.0), ('aspect_range', (2.0, 1.0)), ('vflip', 1)]:
    config = default.get_config()
    config.input[name] = value
    with pytest.raises(ConfigError, match=f'config.input.{name}'):
      settings_lib.from_config(config)
