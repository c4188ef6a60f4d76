"""Writes a multi-label folder dataset of photo-based scenes whose classes overlap, for jaxseg's multi-label task.

  python tools/make_multilabel_folder.py DIR [--train 300] [--val 60] [--seed 0] [--force]
  python run.py --config=configs/unet_multilabel.py --config.dataset.path=DIR   # its classes are these

Needs scikit-image (`pip install scikit-image`, in the `bench` extra), for
its bundled sample photographs only, as tools/make_photo_folder.py does:
nothing is downloaded. The scenes are make_photo_folder.py's, made with its
photo loading, texturing and object makers: a random crop of one photograph,
96-200 pixels per side (not square), with 1-4 objects pasted on it (horses,
balls and boxes, with shadows and antialiased edges), later ones occluding
earlier ones, and the same camera-like variation and file formats (mostly
JPEG, some PNG, a few grayscale).

What is new is damage: 60% of the objects of 200 pixels or more get a
damage patch over part of them, an irregular blob with a ragged edge
centred on one of the object's pixels, covering about 10-40% of it (a
quarter, typically). It is scorched (70%: charred near-black, mottled, with
the object browned around it) or rusted (30%: orange-brown, mottled, with
dark pits), and follows the object's shading; a style that would barely
show (char on a black horse, rust on a red ball) gives way to the other.
Horses, balls and boxes are damaged alike.

Classes (4 independent yes/no outputs; there is no background class: a pixel
with none of them is background):

  0 'object':  every pasted object's visible pixels, whatever its kind: the union;
  1 'horse':   the horses' visible pixels, a subset of object;
  2 'ball':    the balls' visible pixels, a subset of object (never a horse);
  3 'damaged': the damage patches' visible pixels, a subset of object.

They overlap by construction: a horse or ball pixel is also an object pixel
(2 classes), a damaged horse or ball pixel is object + horse/ball + damaged
(3), a damaged box pixel object + damaged (2). Boxes have no class of their
own: a box pixel is object only (an object that is neither horse nor ball),
so the kinds do not partition the union. Where a later object covers an
earlier one, the pixels are the later object's (its kind, its damage).

Masks are single-channel ('L') PNGs, one per class per image: 0 absent,
1 present, 255 ignore. In about half of the scenes, a 1-2 pixel band along
each class's own boundaries is 255 in that class's mask (as Pascal VOC marks
boundaries void): a horse's outline against the background is ignored in
'object' and 'horse'; where a box in front cuts it, in 'horse' only (both
sides are objects); a damage patch's edge in 'damaged' only. The output is a
pure function of (--seed, split, index).

Layout written (jaxseg's multi-label folder layout; tools/folder_layout.py)::

  DIR/train/images/train_00000.jpg   DIR/train/masks/<class>/train_00000.png  (one folder per class)
  DIR/val/images/val_00000.png       DIR/val/masks/<class>/val_00000.png
  DIR/classes.txt                    the class names, one per line, in class-index order
"""

from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image, ImageFilter

import folder_layout  # tools/folder_layout.py, beside this file.
import make_photo_folder as photo  # tools/make_photo_folder.py: photos, textures and object makers.

CLASS_NAMES = ('object', 'horse', 'ball', 'damaged')
IGNORE = 255
HORSE, BALL, BOX = 1, 2, 3      # make_photo_folder's object kinds (its MAKERS keys).
DAMAGE_PROB = 0.6               # Of an object (of at least MIN_DAMAGE_AREA pixels) being damaged.
MIN_DAMAGE_AREA = 200           # Pixels; smaller objects would get specks, not patches.
SCORCH_PROB = 0.7               # Of a damage patch being scorched (else rusted), unless it would not show.
SCORCH_RGB = np.array([42, 28, 18], np.float32)   # Char.
RUST_RGB = np.array([165, 78, 32], np.float32)
MIN_CONTRAST = 80.0             # RGB distance from the object's mean colour under the patch.
BAND_PROB = 0.5                 # Of a scene having ignore bands along its class boundaries.


# ---------------------------------------------------------------------------
# Damage.
# ---------------------------------------------------------------------------


def _noise(rng: np.random.Generator, hw: tuple[int, int], cell: float) -> np.ndarray:
  """Smooth random field float32 [h, w] (about unit scale), varying over about `cell` pixels."""
  h, w = hw
  grid = rng.standard_normal((int(np.ceil(h / cell)) + 2, int(np.ceil(w / cell)) + 2)).astype(np.float32)
  return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32)


def damage_patch(rng: np.random.Generator, hard: np.ndarray) -> np.ndarray:
  """An irregular blob (bool [h, w]) over part of the object `hard`, centred on one of its pixels."""
  hw = hard.shape
  ys, xs = np.nonzero(hard)
  k = int(rng.integers(ys.size))
  cy, cx = ys[k] + 0.5, xs[k] + 0.5
  r = max(np.sqrt(ys.size) * rng.uniform(0.25, 0.45), 4.0)
  stretch = np.sqrt(rng.uniform(0.6, 1.6))
  angle = rng.uniform(0.0, np.pi)
  c, s = np.cos(angle), np.sin(angle)
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32) + 0.5
  u = ((xx - cx) * c + (yy - cy) * s) / (r * stretch)
  v = (-(xx - cx) * s + (yy - cy) * c) * stretch / r
  # A disc, its edge pushed in and out by coarse noise (lobes) and fine noise (a ragged edge).
  field = (1.0 - np.sqrt(u ** 2 + v ** 2) + rng.uniform(0.25, 0.5) * _noise(rng, hw, 0.6 * r)
           + 0.12 * _noise(rng, hw, 2.5))
  return (field > 0) & hard


def paint_damage(rng: np.random.Generator, texture: np.ndarray, patch: np.ndarray) -> np.ndarray:
  """`texture` (float32 [h, w, 3]) with the damage painted over `patch`: scorched or rusted."""
  hw = patch.shape
  area = patch.astype(np.float32)
  alpha = photo._blur(area, rng.uniform(0.5, 1.0))[..., None]  # pylint: disable=protected-access
  lum = texture.mean(-1, keepdims=True)
  # Follow the object's shading (a ball's lit side, a horse's belly) and some of its texture.
  shade = np.clip(lum / max(float(lum[patch].mean()), 1.0), 0.55, 1.5)
  mottle = _noise(rng, hw, rng.uniform(2.0, 4.0))[..., None]
  scorch = rng.random() < SCORCH_PROB
  # Visible damage: a style whose colour is close to the object's there (char on a black horse, rust on a red
  # ball) gives way to the other one.
  mean = texture[patch].mean(0)
  if np.linalg.norm(mean - (SCORCH_RGB if scorch else RUST_RGB)) < MIN_CONTRAST:
    scorch = not scorch
  if scorch:
    # Heat-browned ring around the char, fading out over a few pixels.
    rim = photo._blur(area, rng.uniform(2.0, 4.0))  # pylint: disable=protected-access
    rim = np.clip(rim * 1.8, 0.0, 1.0)[..., None]
    texture = texture * (1.0 - rim * np.array([0.3, 0.45, 0.65], np.float32) * rng.uniform(0.6, 1.0))
    colour = SCORCH_RGB * rng.uniform(0.7, 1.3)
    damage = colour * (1.0 + 0.4 * mottle) * shade
  else:
    colour = RUST_RGB * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    damage = colour * (1.0 + 0.25 * mottle) * shade
    damage = np.where(mottle > 1.0, damage * 0.45, damage)  # Pits.
  return texture * (1.0 - alpha) + damage * alpha


# ---------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------


def make_scene(rng: np.random.Generator, photos: dict, horse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One scene: (image uint8 [H, W, 3], labels uint8 [K, H, W]: class k's mask, 0/1 and 255 for ignore)."""
  h, w = (int(v) for v in rng.integers(photo.MIN_SIDE, photo.MAX_SIDE + 1, size=2))
  image = photo.photo_crop(rng, photos[str(rng.choice(photo.BACKGROUND_PHOTOS))], h, w, scale_range=(0.4, 1.5))
  kind = np.zeros((h, w), np.uint8)      # The visible object's kind (0: none).
  damaged = np.zeros((h, w), bool)       # Whether the visible object is damaged there.
  for _ in range(int(rng.integers(1, 5))):
    cls = int(rng.choice([HORSE, BALL, BOX], p=photo.CLASS_PROBS))
    coverage, hard, texture, shadow = photo.MAKERS[cls](rng, (h, w), photos, horse)
    if not hard.any():
      continue
    patch = np.zeros((h, w), bool)
    if hard.sum() >= MIN_DAMAGE_AREA and rng.random() < DAMAGE_PROB:
      patch = damage_patch(rng, hard)
      texture = paint_damage(rng, texture, patch)
    image = image * (1.0 - shadow[..., None])
    image = image * (1.0 - coverage[..., None]) + texture * coverage[..., None]
    kind[hard] = cls
    damaged[hard] = patch[hard]
  # Camera-like variation, as make_photo_folder's scenes: colour cast, exposure, sensor noise, sometimes defocus.
  image = image * rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.2)
  image = image + rng.normal(0, rng.uniform(1.0, 6.0), size=image.shape)
  image = np.clip(image, 0, 255).astype(np.uint8)
  if rng.random() < 0.2:
    image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0))))
  labels = np.stack([kind > 0, kind == HORSE, kind == BALL, damaged]).astype(np.uint8)
  if rng.random() < BAND_PROB:
    width = int(rng.integers(1, 3))
    for k in range(len(CLASS_NAMES)):  # Each class's own boundaries, in its own mask.
      labels[k][photo._boundary_band(labels[k], width)] = IGNORE  # pylint: disable=protected-access
  return image, labels


def write_pair(image: np.ndarray, labels: np.ndarray, images_dir: str, mask_dirs: dict[str, str], stem: str,
               rng: np.random.Generator) -> str:
  """Saves the image (JPEG 75%, PNG 25%; 7% grayscale) and its class masks ('L' PNGs); returns the image file name."""
  pil = Image.fromarray(image)
  if rng.random() < 0.07:
    pil = pil.convert('L')
  if rng.random() < 0.75:
    name = stem + '.jpg'
    pil.save(os.path.join(images_dir, name), quality=int(rng.integers(70, 96)))
  else:
    name = stem + '.png'
    pil.save(os.path.join(images_dir, name))
  for k, class_name in enumerate(CLASS_NAMES):
    Image.fromarray(labels[k]).save(os.path.join(mask_dirs[class_name], stem + '.png'))
  return name


def label_fractions(present: np.ndarray, ignored: np.ndarray, multi: int, total: int) -> dict:
  """Per-class present and ignore fractions of all pixels, and the fraction of pixels with 2+ classes present."""
  total = max(total, 1)
  return {'class_pixel_fraction': {c: float(present[k] / total) for k, c in enumerate(CLASS_NAMES)},
          'multi_class_pixel_fraction': float(multi / total),
          'ignore_pixel_fraction': {c: float(ignored[k] / total) for k, c in enumerate(CLASS_NAMES)}}


def write_folder(path: str, *, train: int = 300, val: int = 60, seed: int = 0, force: bool = False,
                 verbose: bool = True) -> dict:
  """Writes the dataset (see the module docstring); returns per-split counts and pixel fractions.

  Args:
    path: the dataset folder to create.
    train: number of training scenes.
    val: number of validation scenes.
    seed: the output is a pure function of it.
    force: replace the four split folders if they exist (otherwise a non-empty one is an error).
    verbose: print progress.
  """
  photos, horse = photo.load_photos()
  summary = {'classes': list(CLASS_NAMES), 'splits': {}}
  for split_id, (split, n) in enumerate((('train', train), ('val', val))):
    images_dir, masks_dir = folder_layout.split_dirs(path, split, force)
    mask_dirs = folder_layout.class_mask_dirs(masks_dir, CLASS_NAMES)
    present = np.zeros(len(CLASS_NAMES), np.int64)
    ignored = np.zeros(len(CLASS_NAMES), np.int64)
    multi = total = 0
    formats = {'jpg': 0, 'png': 0}
    for i in range(n):
      rng = np.random.default_rng([seed, split_id, i])
      image, labels = make_scene(rng, photos, horse)
      name = write_pair(image, labels, images_dir, mask_dirs, f'{split}_{i:05d}', rng)
      formats[name.rsplit('.', 1)[1]] += 1
      present += (labels == 1).sum(axis=(1, 2))
      ignored += (labels == IGNORE).sum(axis=(1, 2))
      multi += int(((labels == 1).sum(0) >= 2).sum())
      total += labels[0].size
      if verbose and (i + 1) % 50 == 0:
        print(f'  {split}: {i + 1}/{n}', flush=True)
    summary['splits'][split] = {'pairs': n, 'formats': formats, **label_fractions(present, ignored, multi, total)}
  folder_layout.write_classes(path, CLASS_NAMES)
  return summary


def main(argv=None):
  args = folder_layout.parse_args(argv, __doc__, train=300, val=60)
  t0 = time.perf_counter()
  summary = write_folder(args.dir, train=args.train, val=args.val, seed=args.seed, force=args.force)
  for split, s in summary['splits'].items():
    present = ', '.join(f'{c} {v:.1%}' for c, v in s['class_pixel_fraction'].items())
    ignored = ', '.join(f'{c} {v:.1%}' for c, v in s['ignore_pixel_fraction'].items())
    print(f'{split}: {s["pairs"]} pairs ({s["formats"]["jpg"]} jpg, {s["formats"]["png"]} png); pixels present: '
          f'{present}; 2+ classes {s["multi_class_pixel_fraction"]:.1%}; ignore: {ignored}')
  print(f'Wrote {args.dir} in {time.perf_counter() - t0:.1f}s. Train on it with:\n'
        f'  python run.py --config=configs/unet_multilabel.py --config.dataset.path={args.dir}')


if __name__ == '__main__':
  main()
