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
