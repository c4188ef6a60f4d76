"""Tests for the synthetic `jaxseg_shapes` tfds dataset."""

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import shapes


def _dilate(region, iterations):
  """4-neighbour binary dilation (keeps the test free of scipy)."""
  for _ in range(iterations):
    padded = np.pad(region, 1)
    region = (
        padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
        | padded[1:-1, :-2] | padded[1:-1, 2:]
    )
  return region


def _example(split, index, size=shapes.IMAGE_SIZE):
  rng = np.random.default_rng([shapes.SPLIT_SEEDS[split], index])
  return shapes.generate_example(rng, size=size)


def test_class_constants():
  assert shapes.CLASS_NAMES == ('background', 'disc', 'square', 'triangle')
  assert shapes.NUM_CLASSES == 4


def test_shapes_and_dtypes():
  for index in range(5):
    image, mask = _example('train', index)
    assert image.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and mask.dtype == np.uint8
    # Every image has foreground and background.
    assert 0 < np.count_nonzero(mask) < mask.size
  image, mask = _example('train', 0, size=64)
  assert image.shape == (64, 64, 3) and mask.shape == (64, 64)


class ScriptedShapes:
  """A numpy Generator for `generate_example` whose shape draws are given; colours and noise stay random.

  shapes: (class, radius, (cx, cy), theta) per shape, in drawing order. Triangles get no angle or radius
  jitter, so they are equilateral.
  """

  def __init__(self, shape_list, seed=0):
    self._rng = np.random.default_rng(seed)
    self._todo = list(shape_list)
    self._current = None

  def integers(self, low, high=None, size=None, **kwargs):
    if (low, high, size) == (shapes._MIN_OBJECTS, shapes._MAX_OBJECTS + 1, None):  # pylint: disable=protected-access
      return len(self._todo)
    if (low, high, size) == (1, shapes.NUM_CLASSES, None):
      self._current = self._todo.pop(0)
      return self._current[0]
    return self._rng.integers(low, high, size=size, **kwargs)

  def uniform(self, low=0.0, high=1.0, size=None):
    _, radius, centre, theta = self._current or (None,) * 4
    if (low, high, size) == (shapes._MIN_RADIUS, shapes._MAX_RADIUS, None):  # pylint: disable=protected-access
      return radius
    if (low, high, size) == (0.0, shapes.IMAGE_SIZE, 2):
      return np.array(centre, np.float64)
    if (low, high, size) == (0.0, 2.0 * np.pi, None):
      return theta
    if (low, high, size) == (-0.15, 0.15, 3):  # Triangle angle jitter.
      return np.zeros(3)
    if (low, high, size) == (0.9, 1.1, 3):  # Triangle radius jitter.
      return np.ones(3)
    return self._rng.uniform(low, high, size)

  def normal(self, *args, **kwargs):
    return self._rng.normal(*args, **kwargs)


def test_mask_is_exactly_the_visible_shapes_by_hand():
  """A disc, an axis-aligned square over part of it, a triangle: each pixel centre's class worked out by hand."""
  disc = (1, 14.0, (30.0, 34.0), 0.0)
  square = (2, 12.0, (50.0, 44.0), np.pi / 4)  # Rotated by 45 degrees its corners are diagonal: axis-aligned.
  triangle = (3, 10.0, (72.0, 74.0), np.pi / 2)  # First vertex straight below the centre (y grows downwards).
  rng = ScriptedShapes([disc, square, triangle])
  image, mask = shapes.generate_example(rng, size=shapes.IMAGE_SIZE)
  assert not rng._todo  # pylint: disable=protected-access  # Each shape placed at its first try.

  n = shapes.IMAGE_SIZE
  ys, xs = np.mgrid[0:n, 0:n] + 0.5  # Pixel centres.
  expected = np.zeros((n, n), np.uint8)
  # Disc: rows within r of the centre, columns within the half chord sqrt(r^2 - dy^2).
  _, r, (cx, cy), _ = disc
  dy = ys - cy
  half_chord = np.sqrt(np.maximum(r * r - dy * dy, 0.0))
  expected[(np.abs(dy) <= r) & (np.abs(xs - cx) <= half_chord)] = 1
  # Square of the disc's area pi r^2: side sqrt(pi) r, axis-aligned; drawn over the disc.
  _, r, (cx, cy), _ = square
  half_side = np.sqrt(np.pi) * r / 2
  inside_square = (np.abs(xs - cx) <= half_side) & (np.abs(ys - cy) <= half_side)
  assert ((expected == 1) & inside_square).any(), 'the square should cover part of the disc'
  expected[inside_square] = 2
  # Equilateral triangle of area pi r^2 (side^2 sqrt(3) / 4 = pi r^2), circumradius side / sqrt(3): barycentric test.
  _, r, (cx, cy), theta = triangle
  side = np.sqrt(4 * np.pi * r * r / np.sqrt(3))
  angles = theta + np.array([0.0, 2.0, 4.0]) * np.pi / 3
  (x1, y1), (x2, y2), (x3, y3) = np.stack([cx + side / np.sqrt(3) * np.cos(angles),
                                           cy + side / np.sqrt(3) * np.sin(angles)], -1)
  det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
  a = ((y2 - y3) * (xs - x3) + (x3 - x2) * (ys - y3)) / det
  b = ((y3 - y1) * (xs - x3) + (x1 - x3) * (ys - y3)) / det
  c = 1 - a - b
  assert np.min(np.abs(np.stack([a, b, c]))) > 1e-6  # No pixel centre on an edge: the hand result is unambiguous.
  expected[(a > 0) & (b > 0) & (c > 0)] = 3

  np.testing.assert_array_equal(mask, expected)
  # The disc keeps most of its area, as generate_example requires (at least 60% of what it had).
  assert 0.6 * np.pi * 14.0 ** 2 < np.count_nonzero(expected == 1) < np.pi * 14.0 ** 2
  assert image.shape == (n, n, 3) and image.dtype == np.uint8


def test_deterministic_per_index():
  # Generate in two different orders: each index must give the same arrays.
  forward = [_example('train', i) for i in range(4)]
  backward = [_example('train', i) for i in reversed(range(4))][::-1]
  for (img_a, mask_a), (img_b, mask_b) in zip(forward, backward):
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(mask_a, mask_b)
  # Different indices and splits give different examples.
  assert not np.array_equal(forward[0][0], forward[1][0])
  assert not np.array_equal(_example('validation', 0)[0], forward[0][0])


def test_all_classes_appear():
  seen = set()
  for index in range(8):
    seen.update(np.unique(_example('train', index)[1]).tolist())
  assert seen == set(range(shapes.NUM_CLASSES))


def test_object_count_and_sizes():
  for index in range(30):
    mask = _example('validation', index)[1]
    foreground = np.count_nonzero(mask)
    # 2 to 5 shapes of radius 10..28 px: at least a quarter of the smallest
    # disc is visible, and the image is never (nearly) all foreground.
    assert foreground >= 70
    assert foreground < 0.97 * mask.size


def test_class_mean_colour_not_separable():
  """Colour must not identify the class: per-class mean colours coincide."""
  sums = np.zeros((shapes.NUM_CLASSES, 3))
  counts = np.zeros(shapes.NUM_CLASSES)
  pixels = []
  for index in range(200):
    image, mask = _example('train', index)
    for cls in range(shapes.NUM_CLASSES):
      selected = image[mask == cls].astype(np.float64)
      sums[cls] += selected.sum(axis=0)
      counts[cls] += len(selected)
    pixels.append(image.reshape(-1, 3)[::37])
  means = sums / counts[:, None]
  distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
  spread = np.concatenate(pixels).std(axis=0).mean()
  # Colours vary a lot (std well above 40 per channel), yet class means lie
  # within a few units of each other.
  assert spread > 40.0, spread
  assert distances.max() < 25.0, (means, distances)


def test_objects_contrast_with_surroundings():
  """Each shape's edge is visible: inner and outer border colours differ."""
  contrasts = []
  for index in range(20):
    image, mask = _example('train', index)
    image = image.astype(np.float64)
    for cls in range(1, shapes.NUM_CLASSES):
      region = mask == cls
      if region.sum() < 50:
        continue
      inner = region & _dilate(~region, 2)
      outer = _dilate(region, 2) & ~region
      if outer.sum() < 20:
        continue
      contrasts.append(
          np.linalg.norm(image[inner].mean(0) - image[outer].mean(0))
      )
  assert np.median(contrasts) > 60.0, contrasts
  assert np.min(contrasts) > 25.0, contrasts


def test_builder_registered_and_info(shapes_data_dir):
  builder = tfds.builder('jaxseg_shapes', data_dir=shapes_data_dir)
  assert isinstance(builder, shapes.JaxsegShapes)
  assert str(builder.info.version) == '2.0.0'
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert set(builder.info.features.keys()) == {
      'image', 'segmentation_mask', 'file_name'
  }
  assert builder.info.features['image'].shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
  assert builder.info.features['segmentation_mask'].shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 1)
  assert builder.info.splits['train'].num_examples == 2000
  assert builder.info.splits['validation'].num_examples == 200
  for name in shapes.CLASS_NAMES:
    assert name in builder.info.description


def test_prepared_splits(shapes_data_dir):
  builder = tfds.builder('jaxseg_shapes', data_dir=shapes_data_dir)
  validation = builder.as_data_source('validation')
  assert len(validation) == 200
  names = []
  for example in validation:
    assert example['image'].shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
    assert example['image'].dtype == np.uint8
    assert example['segmentation_mask'].shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 1)
    assert example['segmentation_mask'].dtype == np.uint8
    name = example['file_name'].decode()
    prefix, index = name.split('_')
    assert prefix == 'validation'
    names.append(name)
    # Stored PNGs are lossless copies of what `generate_example` returns for the file's index.
    image, mask = _example('validation', int(index))
    np.testing.assert_array_equal(example['image'], image)
    np.testing.assert_array_equal(example['segmentation_mask'][..., 0], mask)
  assert sorted(names) == [f'validation_{i:05d}' for i in range(200)]

  train = builder.as_data_source('train', decoders={
      'image': tfds.decode.SkipDecoding(), 'segmentation_mask': tfds.decode.SkipDecoding()})
  names = [ex['file_name'].decode() for ex in train]
  assert len(names) == 2000
  assert len(set(names)) == 2000
  assert all(name.startswith('train_') for name in names)
