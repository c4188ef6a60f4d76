"""`jaxseg_shapes`: a synthetic segmentation dataset generated offline.

jaxseg needs a default dataset that works without a network connection or a
manual download, is small enough to prepare in seconds, and is still a real
segmentation problem. Each 96x96 image holds 2 to 4 filled shapes (disc,
rotated square, rotated triangle) on a textured background. Colours and
textures of every region, background included, come from one shared
distribution, so a model cannot tell classes apart by colour and has to learn
the shapes themselves.

The features use the same keys and layout as tfds' `oxford_iiit_pet`
(`image`, `segmentation_mask` with one channel, `file_name`), so a single
input pipeline reads both.

Importing this module registers the builder with tfds under the name
`jaxseg_shapes`. jaxseg prepares it as ArrayRecord and reads it by index:

  import jaxseg.data.shapes  # pylint: disable=unused-import
  builder = tfds.builder('jaxseg_shapes', data_dir='/tmp/tfds', file_format='array_record')
  builder.download_and_prepare()
  examples = builder.as_data_source(split='train')  # examples[i]: a dict of numpy arrays
"""

from __future__ import annotations

import functools
import inspect

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import datasets

CLASS_NAMES = ('background', 'disc', 'square', 'triangle')
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 96

# Per-split seeds; every example uses `default_rng([seed, index])`, so an
# example depends only on its split and index, not on generation order.
SPLIT_SEEDS = {'train': 0x5EED0, 'validation': 0x5EED1}
SPLIT_SIZES = {'train': 2000, 'validation': 200}

# Generation parameters, in pixels at 96x96 (scaled by size / 96).
_MIN_OBJECTS, _MAX_OBJECTS = 2, 4
_MIN_RADIUS, _MAX_RADIUS = 10.0, 28.0
# Minimum RGB distance between an object's mean colour and the mean of what
# it covers: large enough that every edge is visible, yet well inside the
# spread of colours in an image, so a colour threshold does not find objects.
_MIN_CONTRAST = 70.0
_MAX_COLOUR_TRIES = 20
# Occlusion is allowed, but a new shape may not leave less than this fraction
# of an earlier shape's visible area; placements are retried otherwise.
_MIN_VISIBLE_FRACTION = 0.6
_MAX_PLACEMENT_TRIES = 10
# Shared colour/texture distribution for background and objects.
_COLOUR_LOW, _COLOUR_HIGH = 20.0, 235.0
_MIN_GRID, _MAX_GRID = 3, 7  # coarse-noise grid sizes (inclusive)
_MIN_TEXTURE_AMP, _MAX_TEXTURE_AMP = 15.0, 40.0
_MIN_NOISE_STD, _MAX_NOISE_STD = 3.0, 10.0

_DESCRIPTION = f"""\
Synthetic semantic segmentation dataset generated offline by jaxseg.

Each {IMAGE_SIZE}x{IMAGE_SIZE} RGB image contains {_MIN_OBJECTS} to \
{_MAX_OBJECTS} filled shapes drawn in painter's order (later shapes occlude \
earlier ones; shapes may be cut by the image border) on a smooth random colour \
field with per-pixel Gaussian noise. Object and background colours come from \
the same distribution, so classes differ by shape, not colour. Characteristic \
radius (the radius of a disc of equal area) is {_MIN_RADIUS * IMAGE_SIZE / 96:.3g} to \
{_MAX_RADIUS * IMAGE_SIZE / 96:.3g} pixels.

`segmentation_mask` holds one class index per pixel:
{chr(10).join(f'  {i}: {name}' for i, name in enumerate(CLASS_NAMES))}

Splits: train ({SPLIT_SIZES['train']} examples), validation \
({SPLIT_SIZES['validation']} examples). Every example is a deterministic \
function of its split and index.
"""


@functools.lru_cache(maxsize=64)
def _interp_matrix(grid: int, size: int) -> np.ndarray:
  """Returns a [size, grid] matrix that smoothly upsamples `grid` -> `size`.

  Uses cosine (smoothstep) weights between neighbouring coarse points, which
  avoids the visible creases of plain bilinear interpolation.
  """
  u = np.linspace(0.0, grid - 1.0, size)
  lo = np.minimum(np.floor(u).astype(np.int64), grid - 2)
  frac = u - lo
  frac = frac * frac * (3.0 - 2.0 * frac)
  w = np.zeros((size, grid))
  rows = np.arange(size)
  w[rows, lo] = 1.0 - frac
  w[rows, lo + 1] = frac
  w.flags.writeable = False  # Shared through the cache.
  return w


def _textured_fill(rng: np.random.Generator, size: int) -> np.ndarray:
  """Returns a [size, size, 3] float colour field: base colour + smooth noise.

  Background and objects both use this, so colour and texture statistics
  carry no information about the class.
  """
  base = rng.uniform(_COLOUR_LOW, _COLOUR_HIGH, size=3)
  grid = int(rng.integers(_MIN_GRID, _MAX_GRID + 1))
  amp = rng.uniform(_MIN_TEXTURE_AMP, _MAX_TEXTURE_AMP)
  coarse = rng.normal(0.0, amp, size=(3, grid, grid))
  w = _interp_matrix(grid, size)
  field = (w @ coarse @ w.T).transpose(1, 2, 0)  # [size, size, 3]
  return base + field


def _convex_polygon_coverage(
    xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray
) -> np.ndarray:
  """Returns a boolean mask of pixel centres inside a convex CCW polygon."""
  inside = np.ones(np.broadcast(xs, ys).shape, dtype=bool)
  nxt = np.roll(vertices, -1, axis=0)
  for (x0, y0), (x1, y1) in zip(vertices, nxt):
    inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0.0
  return inside


def _shape_coverage(
    rng: np.random.Generator,
    cls: int,
    xs: np.ndarray,
    ys: np.ndarray,
    size: int,
) -> np.ndarray:
  """Samples a shape of class `cls` and returns its boolean pixel coverage.

  All classes share one size distribution: `r` is the radius of a disc of
  the same area, so object area is not a class cue either. The centre lies
  anywhere in the image, so shapes near the border are partly cut off.
  """
  scale = size / IMAGE_SIZE
  r = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * scale
  cx, cy = rng.uniform(0.0, size, size=2)
  theta = rng.uniform(0.0, 2.0 * np.pi)
  if CLASS_NAMES[cls] == 'disc':
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
  if CLASS_NAMES[cls] == 'square':
    # Side sqrt(pi) * r gives area pi * r^2; circumradius is side / sqrt(2).
    circum = np.sqrt(np.pi / 2.0) * r
    angles = theta + np.arange(4) * (np.pi / 2.0)
    radii = np.full(4, circum)
  elif CLASS_NAMES[cls] == 'triangle':
    # Equilateral triangle of area pi * r^2 has circumradius
    # sqrt(4 * pi / (3 * sqrt(3))) * r; jitter angles and radii slightly so
    # triangles are only roughly equilateral. The jitter keeps it convex and
    # counter-clockwise.
    circum = np.sqrt(4.0 * np.pi / (3.0 * np.sqrt(3.0))) * r
    angles = (
        theta
        + np.arange(3) * (2.0 * np.pi / 3.0)
        + rng.uniform(-0.15, 0.15, size=3)
    )
    radii = circum * rng.uniform(0.9, 1.1, size=3)
  else:
    raise ValueError(f'Not a shape class: {cls}')
  vertices = np.stack(
      [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=-1
  )
  return _convex_polygon_coverage(xs, ys, vertices)


def generate_example(
    rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one image and its segmentation mask.

  Shapes are painted in order onto a textured background; each one is drawn
  from a single boolean coverage array into both the image and the mask, so
  the mask is exactly what is visible (later shapes occlude earlier ones).
  A placement that would leave an earlier shape with less than 60% of its
  visible area is retried, and after repeated failures the new shape is
  dropped (never below two shapes), so occlusion does not leave unlearnable
  slivers.

  Args:
    rng: source of randomness; the result is a deterministic function of its
      state.
    size: height and width in pixels. Radii scale with `size / 96`.

  Returns:
    `(image, mask)`: uint8 RGB image of shape [size, size, 3] and uint8 class
    indices (see `CLASS_NAMES`) of shape [size, size].
  """
  centres = np.arange(size, dtype=np.float64) + 0.5
  ys, xs = centres[:, None], centres[None, :]

  canvas = _textured_fill(rng, size)
  mask = np.zeros((size, size), dtype=np.uint8)
  # Instance ids (0 = background) and each instance's visible area when it
  # was placed, to keep occlusion from reducing shapes to slivers.
  instances = np.zeros((size, size), dtype=np.int64)
  placed_area = [0]
  num_objects = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
  for _ in range(num_objects):
    cls = int(rng.integers(1, NUM_CLASSES))
    coverage = None
    for _ in range(_MAX_PLACEMENT_TRIES):
      candidate = _shape_coverage(rng, cls, xs, ys, size)
      remaining = np.bincount(
          instances[~candidate], minlength=len(placed_area)
      )[1:]
      if np.all(remaining >= _MIN_VISIBLE_FRACTION * np.array(placed_area[1:])):
        coverage = candidate
        break
    if coverage is None:
      if len(placed_area) - 1 >= _MIN_OBJECTS:
        continue  # Drop this object rather than hide an earlier one.
      coverage = candidate
    # Resample the fill until its mean differs enough from what it covers,
    # keeping the most contrasting try if none reaches the margin.
    under = canvas[coverage].mean(axis=0)
    best_fill, best_contrast = None, -1.0
    for _ in range(_MAX_COLOUR_TRIES):
      fill = _textured_fill(rng, size)
      contrast = float(np.linalg.norm(fill[coverage].mean(axis=0) - under))
      if contrast > best_contrast:
        best_fill, best_contrast = fill, contrast
      if contrast >= _MIN_CONTRAST:
        break
    canvas[coverage] = best_fill[coverage]
    mask[coverage] = cls
    instances[coverage] = len(placed_area)
    placed_area.append(int(coverage.sum()))

  noise_std = rng.uniform(_MIN_NOISE_STD, _MAX_NOISE_STD)
  canvas += rng.normal(0.0, noise_std, size=canvas.shape)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
  return image, mask


class JaxsegShapes(tfds.core.GeneratorBasedBuilder):
  """tfds builder for `jaxseg_shapes`; generates data, downloads nothing."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: discs, squares and triangles, 96x96.',
      '2.0.0': 'Clearer scenes: 2 to 4 shapes, each at least 60% visible, contrast >= 70, less pixel noise.',
  }

  # tfds 4.9.10's `code_path` reaches for the `importlib_resources` package,
  # which it declares as a dependency only for Python < 3.9, so
  # `download_and_prepare` dies with ModuleNotFoundError where that package is
  # absent (tensorflow/datasets#11212). Return what tfds' own fallback returns:
  # the file that defines the class.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=datasets.segmentation_features(IMAGE_SIZE),
        supervised_keys=('image', 'segmentation_mask'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is generated locally.
    return {
        split: self._generate_examples(split, num)
        for split, num in SPLIT_SIZES.items()
    }

  def _generate_examples(self, split: str, num_examples: int):
    seed = SPLIT_SEEDS[split]
    for index in range(num_examples):
      image, mask = generate_example(np.random.default_rng([seed, index]))
      yield index, {
          'image': image,
          'segmentation_mask': mask[..., None],
          'file_name': f'{split}_{index:05d}',
      }
