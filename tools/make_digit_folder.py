"""Writes a folder dataset of real handwritten digits pasted on varied backgrounds, for learning curves.

  python tools/make_digit_folder.py DIR [--train 400] [--val 100] [--seed 0] [--force]
  python run.py --config=configs/unet.py --config.dataset.name=folder --config.dataset.path=DIR \
      --config.dataset.num_classes=11
  # Named classes in the logs (optional; the tool prints the whole flag): --config.dataset.class_names=...

Needs scikit-learn (`pip install scikit-learn`, in the `bench` extra), for
`sklearn.datasets.load_digits()` only: 1797 scans of handwritten digits (UCI
optdigits, 8x8 pixels, 17 grey levels) that ship inside the wheel; nothing
is downloaded. jaxseg itself does not need scikit-learn.

The handwriting is real; the scenes are composed. Every scene is an RGB image
of 64-128 pixels per side (height and width drawn separately, never equal)
with 2-6 digits pasted at random positions, sizes (16-40 pixels high, width
0.8-1.2x that) and slight rotations (+-15 degrees). Each 8x8 scan is
upsampled with PIL's bicubic filter, so strokes are smooth, and used as the
ink's opacity; the ink colour is drawn at random per digit (dark or coloured,
contrasting with the background under it), independently of the digit, so
classes differ by shape only. Backgrounds are a flat colour or a linear
gradient between two random colours, with mild noise; a few scenes get a
slight blur. Later digits may partly cover earlier ones. Images are PNG
(about 70%) or JPEG (quality 80-95).

Masks are palette ('P') PNGs of class indices (VOC colours): a pixel is a
digit's ink where its upsampled intensity is at least half the maximum, and
takes the class of the last digit inked there. In about half of the scenes
the 1-pixel ring of background around the ink is 255 (ignore): those pixels
are partly inked (antialiased), neither clearly ink nor background.

Classes (11): 0 background, 1 zero, 2 one, 3 two, ... 10 nine (digit d is
class d + 1).

Train and val scenes draw their digits from disjoint halves of load_digits
(train: indices 0-897, val: 898-1796; `split_indices`), so no handwriting
sample is in both splits. The output is a pure function of (--seed, split,
index).

Layout written (jaxseg's folder layout, see README "Your own folders")::

  DIR/train/images/train_00000.png   DIR/train/masks/train_00000.png
  DIR/val/images/val_00000.jpg       DIR/val/masks/val_00000.png
  DIR/classes.txt                    one class name per line
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from PIL import Image, ImageFilter

import folder_layout  # tools/folder_layout.py, beside this file.

CLASS_NAMES = ('background', 'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
IGNORE = 255
MIN_SIDE, MAX_SIDE = 64, 128          # Image height and width range (pixels, inclusive).
MIN_DIGIT, MAX_DIGIT = 16, 40         # Pasted digit height range (pixels, before rotation).
MIN_DIGITS, MAX_DIGITS = 2, 6         # Digits per scene.
INK_THRESHOLD = 0.5                   # Upsampled intensity (0..1) at and above which a pixel is ink.
SPLITS = ('train', 'val')
NUM_SCANS = 1797                      # len(load_digits()); split_indices halves it.


def load_scans() -> tuple[np.ndarray, np.ndarray]:
  """load_digits' scans as float32 [1797, 8, 8] in 0..1 and their digits (int [1797]).

  Raises:
    SystemExit: scikit-learn is missing.
  """
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('make_digit_folder.py needs scikit-learn for its bundled digits: pip install scikit-learn')
  digits = load_digits()
  scans = np.asarray(digits.images, np.float32) / 16.0  # 17 grey levels, 0..16.
  if len(scans) != NUM_SCANS:
    sys.exit(f'load_digits() returned {len(scans)} scans, expected {NUM_SCANS}')
  return scans, np.asarray(digits.target, np.int64)


def split_indices(split: str) -> np.ndarray:
  """The load_digits indices a split draws its digits from: contiguous halves, disjoint.

  Contiguous rather than shuffled: the file is roughly grouped by writer, so the
  halves share fewer writers than a random split would.
  """
  half = NUM_SCANS // 2
  return np.arange(0, half) if split == 'train' else np.arange(half, NUM_SCANS)


# ---------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A flat colour or a linear gradient between two colours, float32 [h, w, 3] in 0-255."""
  c0 = rng.uniform(20, 250, size=3)
  if rng.random() < 0.4:
    return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
  c1 = np.clip(c0 + rng.normal(0, 70, size=3), 0, 255)
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  t = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)
  t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
  return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def ink_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A random ink colour (dark or coloured) at least 90 RGB units from `under` (the paper's mean colour)."""
  for _ in range(20):
    if rng.random() < 0.4:
      colour = rng.uniform(0, 60, size=3)  # Dark ink.
    else:
      colour = rng.uniform(0, 255, size=3)
    if np.linalg.norm(colour - under) >= 90:
      return colour
  return np.where(under > 127, 0.0, 255.0)  # Pale paper: black ink; dark paper: white.


def digit_opacity(rng: np.random.Generator, scan: np.ndarray) -> np.ndarray:
  """An 8x8 scan upsampled (bicubic) to a random size, slightly rotated: float32 [h, w] in 0..1."""
  height = int(rng.integers(MIN_DIGIT, MAX_DIGIT + 1))
  width = max(int(round(height * rng.uniform(0.8, 1.2))), 8)
  img = Image.fromarray(scan, 'F').resize((width, height), Image.Resampling.BICUBIC)
  img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, expand=True)
  return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def _paste(canvas_hw: tuple[int, int], small: np.ndarray, top: int, left: int) -> np.ndarray:
  """Puts `small` onto a zero canvas at (top, left), clipping at the borders."""
  h, w = canvas_hw
  out = np.zeros((h, w), np.float32)
  sh, sw = small.shape
  y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + sh, h), min(left + sw, w)
  if y1 > y0 and x1 > x0:
    out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
  return out


def make_scene(rng: np.random.Generator, scans: np.ndarray, targets: np.ndarray,
               pool: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """One scene from digits of `pool` (load_digits indices).

  Returns:
    (image uint8 [H, W, 3], label uint8 [H, W] with classes 0..10 and 255 for ignore, the load_digits
    indices pasted, in order).
  """
  h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
  w = int(rng.integers(MIN_SIDE, MAX_SIDE))
  w += w >= h  # Never square: w is drawn from the range without h.
  image = background(rng, h, w)
  label = np.zeros((h, w), np.uint8)
  used = []
  for _ in range(int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))):
    index = int(rng.choice(pool))
    small = digit_opacity(rng, scans[index])
    sh, sw = small.shape
    # Mostly inside: at most 15% of the digit's box beyond each border.
    top = int(rng.integers(-int(0.15 * sh), max(h - int(0.85 * sh), -int(0.15 * sh)) + 1))
    left = int(rng.integers(-int(0.15 * sw), max(w - int(0.85 * sw), -int(0.15 * sw)) + 1))
    opacity = _paste((h, w), small, top, left)
    ink = opacity >= INK_THRESHOLD
    if not ink.any():
      continue
    colour = ink_colour(rng, image[ink].mean(axis=0))
    alpha = (opacity * rng.uniform(0.85, 1.0))[..., None]
    image = image * (1 - alpha) + colour * alpha
    label[ink] = targets[index] + 1
    used.append(index)
  image = image + rng.normal(0, rng.uniform(1.0, 5.0), size=image.shape)
  image = np.clip(image, 0, 255).astype(np.uint8)
  if rng.random() < 0.15:
    image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7))))
  if rng.random() < 0.5:
    # The background ring around the ink: pixels next to ink that are partly inked, not labelled ink.
    near_ink = np.asarray(Image.fromarray((label > 0).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))) > 0
    label = np.where(near_ink & (label == 0), IGNORE, label).astype(np.uint8)
  return image, label, used


def write_pair(image: np.ndarray, label: np.ndarray, images_dir: str, masks_dir: str, stem: str,
               rng: np.random.Generator, palette: list[int]) -> str:
  """Saves the image (PNG 70%, JPEG 30%) and its palette mask; returns the image file name."""
  pil = Image.fromarray(image)
  if rng.random() < 0.7:
    name = stem + '.png'
    pil.save(os.path.join(images_dir, name))
  else:
    name = stem + '.jpg'
    pil.save(os.path.join(images_dir, name), quality=int(rng.integers(80, 96)))
  mask = Image.frombytes('P', (label.shape[1], label.shape[0]), label.tobytes())
  mask.putpalette(palette)
  mask.save(os.path.join(masks_dir, stem + '.png'))
  return name


def write_folder(path: str, *, train: int = 400, val: int = 100, seed: int = 0, force: bool = False,
                 verbose: bool = True) -> dict:
  """Writes the dataset (see the module docstring).

  Args:
    path: the dataset folder to create.
    train: number of training pairs.
    val: number of validation pairs.
    seed: the output is a pure function of it (and of split and index).
    force: replace the four split folders if they exist (otherwise a non-empty one is an error).
    verbose: print progress.

  Returns:
    {'classes': names, 'splits': {split: {'pairs', 'formats', 'class_pixel_fraction',
    'ignore_pixel_fraction', 'digits': per pair, the load_digits indices pasted}}}.
  """
  scans, targets = load_scans()
  palette = folder_layout.voc_palette()
  summary = {'classes': list(CLASS_NAMES), 'splits': {}}
  for split_id, (split, n) in enumerate(zip(SPLITS, (train, val))):
    images_dir, masks_dir = folder_layout.split_dirs(path, split, force)
    pool = split_indices(split)
    counts = np.zeros(256, np.int64)
    formats = {'png': 0, 'jpg': 0}
    digits = []
    for i in range(n):
      rng = np.random.default_rng([seed, split_id, i])
      image, label, used = make_scene(rng, scans, targets, pool)
      name = write_pair(image, label, images_dir, masks_dir, f'{split}_{i:05d}', rng, palette)
      formats[name.rsplit('.', 1)[1]] += 1
      counts += np.bincount(label.ravel(), minlength=256)
      digits.append(used)
      if verbose and (i + 1) % 100 == 0:
        print(f'  {split}: {i + 1}/{n}', flush=True)
    summary['splits'][split] = {'pairs': n, 'formats': formats, 'digits': digits,
                                **folder_layout.pixel_fractions(counts, CLASS_NAMES, IGNORE)}
  folder_layout.write_classes(path, CLASS_NAMES)
  return summary


def main(argv=None):
  args = folder_layout.parse_args(argv, __doc__, train=400, val=100)
  t0 = time.perf_counter()
  summary = write_folder(args.dir, train=args.train, val=args.val, seed=args.seed, force=args.force)
  for split, s in summary['splits'].items():
    digits = sum(len(d) for d in s['digits'])
    fractions = ', '.join(f'{c} {v:.1%}' for c, v in s['class_pixel_fraction'].items())
    print(f'{split}: {s["pairs"]} pairs ({s["formats"]["png"]} png, {s["formats"]["jpg"]} jpg), {digits} digits; '
          f'pixels: {fractions}, ignore {s["ignore_pixel_fraction"]:.1%}')
  print(f'Wrote {args.dir} in {time.perf_counter() - t0:.1f}s. Train on it with:\n'
        f'  python run.py --config=configs/unet.py --config.dataset.name=folder --config.dataset.path={args.dir} '
        f'--config.dataset.num_classes={len(CLASS_NAMES)}\n'
        f'(optional, for named classes in the logs: --config.dataset.class_names="{CLASS_NAMES!r}")')


if __name__ == '__main__':
  main()
