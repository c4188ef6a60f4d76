"""Tests for jaxseg.data.copy_paste: each checks against values computed another way (slicing, np.kron, scipy's
component counts, a pure-Python SplitMix64), never the function against itself."""

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from jaxseg.data import copy_paste as cp
from jaxseg.errors import ConfigError

IGNORE = 255
TARGET_CLASS = 7  # The target's label everywhere: no donor holds it, so `label != TARGET_CLASS` is the pasted region.
EIGHT = np.ones((3, 3), bool)


def _target(h=64, w=72, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3)).astype(np.uint8), np.full((h, w), TARGET_CLASS, np.int32)


def _donor(seed=1):
  """A 40 x 48 donor: background 0, class 1 (an L shape), class 2 (a rectangle touching it), class 5 (not an
  object class), ignore pixels touching the objects; a random image."""
  label = np.zeros((40, 48), np.int32)
  label[6:18, 8:12] = 1
  label[14:18, 8:20] = 1
  label[10:22, 20:30] = 2      # Touches class 1's foot: a separate object of another class.
  label[22:26, 20:30] = IGNORE  # Right under class 2.
  label[4:6, 8:20] = IGNORE     # Right over class 1.
  label[30:36, 2:40] = 5
  image = np.random.default_rng(seed).integers(0, 256, (40, 48, 3)).astype(np.uint8)
  return image, label


def _bbox(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _translated_paste(image, label, donor_image, donor_label, group, changed):
  """The reference paste at scale 1: the donor's `group` pixels copied, unscaled, to where `changed` (the pasted
  region of the output) starts; returns the expected (image, label)."""
  r0, r1, c0, c1 = _bbox(group)
  t0, _, u0, _ = _bbox(changed)
  expected_image, expected_label = image.copy(), label.copy()
  inside = group[r0:r1, c0:c1]
  window = np.s_[t0:t0 + r1 - r0, u0:u0 + c1 - c0]
  expected_label[window][inside] = donor_label[r0:r1, c0:c1][inside]
  expected_image[window][inside] = donor_image[r0:r1, c0:c1][inside]
  return expected_image, expected_label


def _paste(image, label, donor_image, donor_label, seed, **options):
  options.setdefault('ignore_label', IGNORE)
  return cp.paste_objects(image, label, donor_image, donor_label, np.random.default_rng(seed), **options)


def _count(mask):
  return scipy.ndimage.label(mask, structure=EIGHT)[1]


# ---------------------------------------------------------------------------------------------------------------
# The numpy core.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', range(6))
def test_unit_scale_pastes_a_translated_copy_of_the_objects(seed):
  image, label = _target()
  donor_image, donor_label = _donor()
  inputs = [a.copy() for a in (image, label, donor_image, donor_label)]
  out_image, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(1, 2),
                                scale_range=(1, 1), object_prob=1.0)
  for before, after in zip(inputs, (image, label, donor_image, donor_label)):
    np.testing.assert_array_equal(before, after)  # Inputs untouched.
  assert out_image.dtype == np.uint8 and out_label.dtype == np.int32 and out_label.shape == label.shape

  group = (donor_label == 1) | (donor_label == 2)
  expected_image, expected_label = _translated_paste(image, label, donor_image, donor_label, group,
                                                     out_label != TARGET_CLASS)
  np.testing.assert_array_equal(out_label, expected_label)
  np.testing.assert_array_equal(out_image, expected_image)


def test_placement_is_uniform_inside_the_target():
  image, label = _target(30, 40)
  donor_image, donor_label = _donor()
  corners = set()
  for seed in range(60):
    _, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(2,), scale_range=(1, 1))
    t0, t1, u0, u1 = _bbox(out_label != TARGET_CLASS)
    assert (t1 - t0, u1 - u0) == (12, 10)
    corners.add((t0, u0))
  rows, cols = zip(*corners)
  # 19 x 31 possible corners: the draws spread over them, first and last included somewhere.
  assert len(corners) > 40 and min(rows) <= 2 and max(rows) >= 16 and min(cols) <= 3 and max(cols) >= 28


def test_a_box_larger_than_the_target_pastes_a_random_part_that_fits():
  image, label = _target(30, 20)
  donor_label = np.zeros((16, 50), np.int32)
  donor_label[3:13, 4:44] = 3  # 10 x 40: wider than the target.
  donor_image = np.random.default_rng(5).integers(0, 256, (16, 50, 3)).astype(np.uint8)
  parts = set()
  for seed in range(20):
    out_image, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(3,),
                                  scale_range=(1, 1))
    t0, t1, u0, u1 = _bbox(out_label != TARGET_CLASS)
    assert (t1 - t0, u0, u1) == (10, 0, 20)
    np.testing.assert_array_equal(out_image[:t0], image[:t0])
    np.testing.assert_array_equal(out_image[t1:], image[t1:])
    found = [a for a in range(21) if np.array_equal(out_image[t0:t1], donor_image[3:13, 4 + a:24 + a])]
    assert len(found) == 1
    parts.add(found[0])
  assert len(parts) > 5


def test_three_objects_with_object_prob_one_and_at_least_one_with_a_small_one():
  image, label = _target()
  donor_label = np.zeros((30, 40), np.int32)
  donor_label[2:8, 2:8] = 1
  donor_label[12:20, 3:9] = 1    # A second, separate object of class 1.
  donor_label[5:15, 20:30] = 2
  donor_image = (donor_label * 40).astype(np.uint8)[..., None].repeat(3, -1)
  kwargs = dict(object_classes=(1, 2), scale_range=(1, 1))
  for seed in range(5):
    _, out = _paste(image, label, donor_image, donor_label, seed, object_prob=1.0, **kwargs)
    assert (_count(out == 1), _count(out == 2)) == (2, 1)
    assert ((out == 1).sum(), (out == 2).sum()) == (36 + 48, 100)
  counts = []
  for seed in range(40):
    _, out = _paste(image, label, donor_image, donor_label, seed, object_prob=0.05, **kwargs)
    counts.append(_count(out == 1) + _count(out == 2))
  assert min(counts) >= 1 and max(counts) <= 3 and counts.count(1) > 30


def test_objects_are_eight_connected_regions_of_one_class():
  image, label = _target()
  donor_label = np.zeros((30, 40), np.int32)
  donor_label[2:6, 2:6] = 1
  donor_label[6:10, 6:10] = 1   # Touches the first square at a corner only: the same object.
  donor_label[6:10, 10:16] = 2  # Touches class 1's side: its own object.
  donor_image = np.zeros((30, 40, 3), np.uint8)
  seen = set()
  for seed in range(30):
    _, out = _paste(image, label, donor_image, donor_label, seed, object_classes=(1, 2), scale_range=(1, 1),
                    object_prob=0.0)  # Exactly one object.
    seen.add(((out == 1).sum(), (out == 2).sum()))
  assert seen == {(32, 0), (0, 24)}


@pytest.mark.parametrize('seed', range(8))
def test_ignore_pixels_and_other_classes_are_never_pasted(seed):
  image, label = _target()
  donor_image, donor_label = _donor()
  _, out = _paste(image, label, donor_image, donor_label, seed, object_classes=(1, 2), scale_range=(0.5, 1.7))
  assert set(np.unique(out)) <= {TARGET_CLASS, 1, 2} and (out != TARGET_CLASS).any()


@pytest.mark.parametrize('scale', [2.0, 1.5])
def test_rescaled_objects_keep_image_and_label_aligned(scale):
  image, label = _target(100, 110)
  donor_label = np.zeros((24, 30), np.int32)
  donor_label[4:14, 3:9] = 1
  donor_label[8:20, 9:25] = 2   # Touches class 1: where they meet, image and label must agree.
  donor_label[2:22, 26:28] = 3
  donor_label[20:23, 5:15] = IGNORE
  donor_image = np.where(donor_label == IGNORE, 250, donor_label * 40).astype(np.uint8)[..., None].repeat(3, -1)
  group = np.isin(donor_label, (1, 2, 3))
  for seed in range(4):
    out_image, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(1, 2, 3),
                                  scale_range=(scale, scale), object_prob=1.0)
    changed = out_label != TARGET_CLASS
    if scale == 2.0:
      # round(24 * 2) rows: nearest neighbour repeats every donor pixel 2 x 2, exactly.
      assert changed.sum() == 4 * group.sum()
      r0, r1, c0, c1 = _bbox(group)
      t0, t1, u0, u1 = _bbox(changed)
      np.testing.assert_array_equal(changed[t0:t1, u0:u1], np.kron(group[r0:r1, c0:c1], np.ones((2, 2), bool)))
      np.testing.assert_array_equal(out_label[t0:t1, u0:u1][changed[t0:t1, u0:u1]],
                                    np.kron(donor_label[r0:r1, c0:c1], np.ones((2, 2), int))[
                                        changed[t0:t1, u0:u1]])
    else:
      assert abs(changed.sum() / group.sum() - scale ** 2) < 0.3
    # The pasted pixels are tf.image.resize's rescaled donor (bilinear image, nearest label), translated.
    size = [round(24 * scale), round(30 * scale)]
    resized_label = tf.image.resize(donor_label[..., None], size, method='nearest').numpy()[..., 0]
    resized_image = np.rint(tf.image.resize(donor_image.astype(np.float32), size, method='bilinear').numpy())
    r0, r1, c0, c1 = _bbox(np.isin(resized_label, (1, 2, 3)))
    t0, t1, u0, u1 = _bbox(changed)
    assert (t1 - t0, u1 - u0) == (r1 - r0, c1 - c0)
    inside = changed[t0:t1, u0:u1]
    np.testing.assert_array_equal(out_label[t0:t1, u0:u1][inside], resized_label[r0:r1, c0:c1][inside])
    difference = np.abs(out_image[t0:t1, u0:u1][inside].astype(int) - resized_image[r0:r1, c0:c1][inside])
    assert difference.max() <= (0 if scale == 2.0 else 1)
    # Up to 2x, a pixel's bilinear taps are its own and its neighbours' nearest sources: where the 3 x 3
    # neighbourhood's label is uniform, the image is exactly that label's colour.
    uniform = scipy.ndimage.maximum_filter(out_label, 3) == scipy.ndimage.minimum_filter(out_label, 3)
    check = changed & uniform
    assert check.sum() > 0.4 * changed.sum()
    np.testing.assert_array_equal(out_image[check], (out_label[check] * 40)[:, None].repeat(3, -1))
    np.testing.assert_array_equal(out_image[~changed], image[~changed])


def test_a_donor_without_objects_leaves_the_target_unchanged():
  image, label = _target()
  donor_image, donor_label = _donor()
  for seed in range(3):
    out_image, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(4, 6))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
  out_image, out_label = cp.copy_paste(image, label, donor_image, donor_label, tf.constant([0, 1], tf.int64),
                                       object_classes=(4,), ignore_label=IGNORE, prob=1.0)
  np.testing.assert_array_equal(out_image.numpy(), image)
  np.testing.assert_array_equal(out_label.numpy(), label)


def _multilabel_donor():
  """K = 3 masks: class 0 = square A, class 1 = square B overlapping A, class 2 = random 0 / 1 / ignore."""
  rng = np.random.default_rng(3)
  masks = np.zeros((30, 34, 3), np.int32)
  masks[4:14, 4:14, 0] = 1
  masks[10:20, 8:22, 1] = 1
  masks[22:28, 2:30, 0] = IGNORE  # Not part of an object of class 0.
  masks[..., 2] = rng.choice([0, 1, IGNORE], size=(30, 34))
  return rng.integers(0, 256, (30, 34, 3)).astype(np.uint8), masks


def test_multilabel_pastes_every_mask_of_the_objects():
  image = _target()[0]
  label = np.zeros(image.shape[:2] + (3,), np.int32)
  donor_image, donor_label = _multilabel_donor()
  a, b = donor_label[..., 0] == 1, donor_label[..., 1] == 1
  seen = set()
  for seed, object_prob in [(0, 1.0), (1, 1.0)] + [(s, 0.0) for s in range(2, 14)]:
    out_image, out_label = _paste(image, label, donor_image, donor_label, seed, object_classes=(0, 1),
                                  multilabel=True, scale_range=(1, 1), object_prob=object_prob)
    assert out_label.shape == label.shape and out_label.dtype == np.int32
    changed = (out_label != 0).any(-1)
    group = {int(a.sum()): a, int(b.sum()): b, int((a | b).sum()): a | b}[int(changed.sum())]
    seen.add(int(group.sum()))
    expected_image, expected_label = _translated_paste(image, label, donor_image, donor_label, group, changed)
    np.testing.assert_array_equal(out_label, expected_label)
    np.testing.assert_array_equal(out_image, expected_image)
    assert not (out_label[..., 0] == IGNORE).any()
    if object_prob == 1.0:
      assert group is not a and group is not b
  # Object prob 0: one of A (100 px) and B (140 px), overlap carried along; prob 1: both (A | B).
  assert seen == {100, 140, 100 + 140 - 4 * 6}


# ---------------------------------------------------------------------------------------------------------------
# The tf.data wrapper.
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = dict(object_classes=(1, 2), ignore_label=IGNORE, scale_range=(0.5, 1.5))


def _run_dataset(image, label, donor_image, donor_label, seeds, dynamic=False, **options):
  """copy_paste over (0, k) seeds inside Dataset.map, parallel and deterministic; with `dynamic`, H and W unknown."""
  def generate():
    for k in seeds:
      yield image, label, donor_image, donor_label, np.array([0, k], np.int64)
  signature = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.int32),
               tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.int32),
               tf.TensorSpec([2], tf.int64))
  if dynamic:
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
  else:
    ds = tf.data.Dataset.from_tensor_slices(
        tuple(np.stack([x] * len(seeds)) for x in (image, label, donor_image, donor_label))
        + (np.array([[0, k] for k in seeds], np.int64),))
  ds = ds.map(lambda i, l, di, dl, s: cp.copy_paste(i, l, di, dl, s, **{**OPTIONS, **options}),
              num_parallel_calls=4, deterministic=True)
  if dynamic:
    assert ds.element_spec[0].shape.as_list() == [None, None, 3]
    assert ds.element_spec[1].shape.as_list() == [None, None]
  return list(ds.as_numpy_iterator())


def test_the_wrapper_is_deterministic_and_follows_the_documented_generator():
  image, label = _target()
  donor_image, donor_label = _donor()
  seeds = list(range(16))
  first = _run_dataset(image, label, donor_image, donor_label, seeds, dynamic=True, prob=0.7)
  second = _run_dataset(image, label, donor_image, donor_label, seeds, prob=0.7)
  pasted = 0
  for k, (a, b) in enumerate(zip(first, second)):
    eager = cp.copy_paste(image, label, donor_image, donor_label, tf.constant([0, k], tf.int64), prob=0.7,
                          **OPTIONS)
    for x, y, z in zip(a, b, eager):
      np.testing.assert_array_equal(x, y)
      np.testing.assert_array_equal(x, z.numpy())
    if not np.array_equal(a[1], label):
      pasted += 1
      # A paste is paste_objects with the documented Generator.
      rng = np.random.default_rng([0, k, cp.PASTE_SALT])
      expected = cp.paste_objects(image, label, donor_image, donor_label, rng, **OPTIONS)
      np.testing.assert_array_equal(a[0], expected[0])
      np.testing.assert_array_equal(a[1], expected[1])
  assert 4 <= pasted <= 15
  # Other seeds, other pastes.
  labels = [x[1].tobytes() for x in first if not np.array_equal(x[1], label)]
  assert len(set(labels)) == len(labels)


def test_prob_zero_never_pastes_prob_one_always_does():
  image, label = _target(32, 40)
  donor_image, donor_label = _donor()
  seeds = list(range(40))
  for out_image, out_label in _run_dataset(image, label, donor_image, donor_label, seeds, prob=0.0):
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
  assert all((out_label != label).any()
             for _, out_label in _run_dataset(image, label, donor_image, donor_label, seeds, prob=1.0))
  half = sum((out_label != label).any()
             for _, out_label in _run_dataset(image, label, donor_image, donor_label, range(200), prob=0.5))
  assert 70 <= half <= 130


def test_the_wrapper_keeps_multilabel_shapes():
  image = _target(32, 40)[0]
  label = np.zeros((32, 40, 3), np.int32)
  donor_image, donor_label = _multilabel_donor()
  fn = tf.function(lambda *args: cp.copy_paste(*args, object_classes=(0, 1), ignore_label=IGNORE, multilabel=True,
                                               prob=1.0),
                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None, 3], tf.int32),
                                    tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None, 3], tf.int32),
                                    tf.TensorSpec([2], tf.int64)])
  out = fn.get_concrete_function().structured_outputs
  assert [t.shape.as_list() for t in out] == [[None, None, 3], [None, None, 3]]
  out_image, out_label = fn(image, label, donor_image, donor_label, tf.constant([3, 4], tf.int64))
  assert out_image.shape == image.shape and out_label.shape == label.shape
  assert (out_label.numpy()[..., :2] == 1).any()


# ---------------------------------------------------------------------------------------------------------------
# Donors.
# ---------------------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z):
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


def test_the_python_splitmix64_reference_matches_the_published_outputs():
  # Vigna's splitmix64.c seeded with 1234567: its first outputs.
  assert [_mix((1234567 + i * _GAMMA) & _M64) for i in range(1, 4)] == [
      6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_donor_index_is_documented_splitmix64_deterministic_and_chunk_independent():
  seed, n = 42, 1000
  key = _mix((seed + cp.DONOR_SALT * _GAMMA) & _M64)
  positions = np.arange(3000)
  expected = [_mix((key + (k + 1) * _GAMMA) & _M64) % n for k in range(3000)]
  donors = cp.donor_index(seed, positions, n)
  assert donors.dtype == np.int64 and donors.shape == (3000,)
  np.testing.assert_array_equal(donors, expected)
  np.testing.assert_array_equal(cp.donor_index(seed, positions, n), donors)
  cuts = [0, 1, 8, 500, 1234, 2999, 3000]
  chunks = np.concatenate([cp.donor_index(seed, positions[a:b], n) for a, b in zip(cuts, cuts[1:])])
  np.testing.assert_array_equal(chunks, donors)
  assert cp.donor_index(seed, 1234, n).shape == () and int(cp.donor_index(seed, 1234, n)) == donors[1234]
  np.testing.assert_array_equal(cp.donor_index(seed, positions.reshape(30, 100), n), donors.reshape(30, 100))
  assert (cp.donor_index(seed + 1, positions, n) != donors).mean() > 0.99


def test_donor_index_is_roughly_uniform_and_can_exclude_the_example():
  n, draws = 10, 5000
  counts = np.bincount(cp.donor_index(7, np.arange(draws), n), minlength=n)
  chi2 = ((counts - draws / n) ** 2 / (draws / n)).sum()
  assert counts.sum() == draws and chi2 < 30  # 9 degrees of freedom: p ~ 4e-4.
  exclude = np.random.default_rng(0).integers(0, n, draws)
  donors = cp.donor_index(7, np.arange(draws), n, exclude=exclude)
  assert (donors != exclude).all() and donors.min() >= 0 and donors.max() < n
  counts = np.bincount(donors, minlength=n)
  assert ((counts - draws / n) ** 2 / (draws / n)).sum() < 30
  np.testing.assert_array_equal(cp.donor_index(7, np.arange(5), 1, exclude=np.zeros(5, int)), np.zeros(5))
  with pytest.raises(ValueError):
    cp.donor_index(7, -1, n)


# ---------------------------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('option, value', [
    ('prob', 1.5), ('prob', -0.1), ('object_prob', 2.0), ('object_prob', -1), ('scale_range', (0.0, 1.0)),
    ('scale_range', (1.5, 0.5)), ('scale_range', (1.0,)), ('scale_range', 'big'), ('object_classes', ()),
    ('object_classes', (1.5,)), ('object_classes', (-1, 2)), ('object_classes', (1, IGNORE)),
    ('object_classes', None)])
def test_bad_options_raise_a_config_error_naming_the_option(option, value):
  image, label = _target(8, 8)
  options = {**OPTIONS, option: value}
  with pytest.raises(ConfigError, match=f'config.input.copy_paste_{option}'):
    cp.copy_paste(image, label, image, label, tf.constant([0, 0], tf.int64), **options)
  if option != 'prob':
    with pytest.raises(ConfigError, match=f'config.input.copy_paste_{option}'):
      cp.paste_objects(image, label, image, label, np.random.default_rng(0), **options)
