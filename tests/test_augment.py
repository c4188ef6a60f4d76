"""Tests for jaxseg.data.augment."""

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
  distinct = {x.tobytes() for x in labels}
  assert len(distinct) >= 6


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
  # Labels in 16 px blocks: the bilinear image and the nearest-neighbour
  # label then agree exactly away from block edges, and near edges the image
  # lies between the label values in a small window (bilinear reads the 2x2
  # neighbourhood of the nearest source pixel).
  image, label = _label_like(96, 112, block=16, ignore_frac=0.15)
  r = 2
  exact_fracs = []
  for i in range(12):
    out_image, out_label = _run(image, label, [9, i], crop_size=(72, 72),
                                scale_range=(0.5, 2.0))
    ch0 = out_image[..., 0] / 10.0
    center_label = out_label[r:-r, r:-r]
    center_image = ch0[r:-r, r:-r]
    lo = _window(out_label, r, np.min)
    hi = _window(out_label, r, np.max)
    valid = center_label != IGNORE
    # Padding pixels (image 0, label ignore) are excluded by `valid`; near
    # the padding the window still holds the real neighbours.
    assert np.all(center_image[valid] >= lo[valid] - 1e-3)
    assert np.all(center_image[valid] <= hi[valid] + 1e-3)
    constant = valid & (lo == hi)
    np.testing.assert_allclose(center_image[constant],
                               center_label[constant], atol=1e-3)
    exact = np.abs(center_image - center_label) < 1e-3
    exact_fracs.append(exact[valid].mean())
  assert np.mean(exact_fracs) > 0.8


def test_scale_changes_size_before_crop():
  # With a large crop and a small scale the scaled image is padded, so the
  # amount of ignore padding reveals the scale that was applied.
  image, label = _label_like(40, 40, ignore_frac=0.0)
  pads = set()
  for i in range(6):
    _, out_label = _run(image, label, [2, i], crop_size=(80, 80),
                        scale_range=(0.5, 1.0), hflip=False)
    valid_rows = int((out_label[:, 0] != IGNORE).sum())
    assert 20 <= valid_rows <= 40
    pads.add(valid_rows)
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
  changed = 0
  for i in range(8):
    base_image, base_label = _run(image, label, [4, i], crop_size=(32, 32))
    out_image, out_label = _run(image, label, [4, i], crop_size=(32, 32),
                                photometric=True, brightness=64.0)
    # Same seed: geometry is unchanged by turning photometric on.
    np.testing.assert_array_equal(out_label, base_label)
    assert out_image.min() >= 0.0 and out_image.max() <= 255.0
    if not np.allclose(out_image, base_image, atol=1e-3):
      changed += 1
  # P(no transform applied) = 1/16 per seed.
  assert changed >= 5


def test_photometric_clips_to_range():
  image = np.full((8, 8, 3), 250.0, np.float32)
  image[:4] = 5.0
  label = np.zeros((8, 8), np.int32)
  for i in range(16):
    out_image, _ = _run(image, label, [6, i], crop_size=(8, 8),
                        photometric=True, brightness=100.0,
                        contrast=(0.1, 3.0))
    assert out_image.min() >= 0.0 and out_image.max() <= 255.0


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


def test_normalize_matches_numpy():
  image = np.random.default_rng(3).uniform(0, 255, (4, 5, 3))
  out = augment.normalize(image.astype(np.float32))
  assert out.dtype == tf.float32
  expected = (image - np.array(augment.IMAGENET_MEAN)) / np.array(
      augment.IMAGENET_STD)
  np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
  # uint8 input is cast, not rescaled to [0, 1].
  out8 = augment.normalize(image.astype(np.uint8))
  expected8 = (image.astype(np.uint8) - np.array(augment.IMAGENET_MEAN)) / (
      np.array(augment.IMAGENET_STD))
  np.testing.assert_allclose(out8.numpy(), expected8, rtol=1e-5, atol=1e-5)


def test_invalid_config_raises():
  image, label = _label_like(8, 8)
  with pytest.raises(ConfigError, match="crop_size"):
    augment.train_augment(image, label, [0, 0], crop_size=(0, 8))
  with pytest.raises(ConfigError, match="scale_range"):
    augment.train_augment(image, label, [0, 0], crop_size=(8, 8),
                          scale_range=(2.0, 1.0))
