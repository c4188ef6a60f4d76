"""Writes a folder dataset of photo-based image/mask pairs, for trying jaxseg on real-looking data.

  python tools/make_photo_folder.py DIR [--train 300] [--val 60] [--seed 0] [--force]
  python run.py --config=configs/unet.py --config.dataset.name=folder --config.dataset.path=DIR \
      --config.dataset.num_classes=4 --config.dataset.class_names="('background','horse','ball','box')"

Needs scikit-image (`pip install scikit-image`), for its bundled sample
photographs only (astronaut, chelsea, coffee, rocket, the stereo motorcycle,
camera, grass, gravel, brick, coins, moon, Hubble deep field, retina, ...);
they ship inside the wheel, nothing is downloaded. jaxseg itself does not
need scikit-image.

Every scene is a random crop of one photograph (random scale, random size of
96-200 pixels per side, not square) with 1-4 objects pasted on it, later ones
occluding earlier ones:

  class 1 'horse': skimage's horse silhouette, scaled, flipped, slightly
    rotated, textured with a crop of another photo, with a soft drop shadow
    and antialiased (blurred) edges;
  class 2 'ball': a disc or ellipse textured with a photo crop and shaded as
    a lit sphere, with a contact shadow;
  class 3 'box': a rotated rectangle textured with a photo crop, one edge
    darkened, with a drop shadow.

Class 0 is the background. Photometric variation (colour cast, noise, blur),
JPEG compression and grayscale images make it look like a camera dataset:
images are mostly JPEG (quality 70-95), some PNG, a few grayscale. Masks are
palette ('P') PNGs of class indices (VOC colours); about half of the scenes
have a 1-2 pixel band of 255 (ignore) along object boundaries, as in Pascal
VOC. The output is a pure function of (--seed, split, index).

Layout written (jaxseg's folder layout, see README "Your own folders")::

  DIR/train/images/train_00000.jpg   DIR/train/masks/train_00000.png
  DIR/val/images/val_00000.png       DIR/val/masks/val_00000.png
  DIR/classes.txt                    one class name per line
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import folder_layout  # tools/folder_layout.py, beside this file.

CLASS_NAMES = ('background', 'horse', 'ball', 'box')
IGNORE = 255
MIN_SIDE, MAX_SIDE = 96, 200

# Photographs used as backgrounds and as object textures: skimage.data function names (all bundled
# in the scikit-image wheel; checked by load_photos). Grayscale ones are tinted when used.
BACKGROUND_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'motorcycle', 'camera', 'grass', 'gravel',
                     'brick', 'moon', 'hubble_deep_field', 'immunohistochemistry', 'page')
# Per class, the photos its texture is cropped from (overlapping, as real classes share looks).
TEXTURE_PHOTOS = {
    1: ('chelsea', 'coffee', 'camera', 'gravel', 'brick', 'astronaut', 'motorcycle'),
    2: ('coins', 'hubble_deep_field', 'rocket', 'retina', 'moon', 'coffee', 'colorwheel', 'astronaut'),
    3: ('brick', 'page', 'text', 'grass', 'motorcycle', 'rocket', 'immunohistochemistry', 'camera'),
}
CLASS_PROBS = (0.4, 0.3, 0.3)  # Of horse, ball, box for each pasted object.


# ---------------------------------------------------------------------------
# Source photographs.
# ---------------------------------------------------------------------------


def load_photos() -> tuple[dict[str, np.ndarray], np.ndarray]:
  """skimage's bundled sample photos as RGB uint8 arrays, and the horse silhouette (bool, True = horse).

  Raises:
    SystemExit: scikit-image is missing, or a photo is not bundled with the installed version.
  """
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit('make_photo_folder.py needs scikit-image for its sample photographs: pip install scikit-image')
  loaders: dict[str, Callable[[], np.ndarray]] = {
      name: getattr(data, name, None) for name in set(BACKGROUND_PHOTOS).union(*TEXTURE_PHOTOS.values())}
  loaders['motorcycle'] = lambda: data.stereo_motorcycle()[0]  # The left view.
  photos = {}
  for name, load in sorted(loaders.items()):
    try:
      img = np.asarray(load())
    except Exception as e:  # pylint: disable=broad-except  # Missing optional data (pooch) and the like.
      sys.exit(f'skimage.data.{name} could not be loaded offline ({type(e).__name__}: {e}); '
               'install a scikit-image wheel that bundles it')
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, axis=-1)
    photos[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
  horse = ~np.asarray(data.horse(), bool)  # The file is black on white: False is the horse.
  ys, xs = np.nonzero(horse)
  horse = horse[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  return photos, horse


def _is_gray(photo: np.ndarray) -> bool:
  return bool(np.array_equal(photo[..., 0], photo[..., 1]) and np.array_equal(photo[..., 1], photo[..., 2]))


def photo_crop(rng: np.random.Generator, photo: np.ndarray, height: int, width: int, *,
               scale_range=(0.6, 1.6)) -> np.ndarray:
  """A random crop of `photo` at a random scale, resized to float32 [height, width, 3] in 0-255."""
  ph, pw = photo.shape[:2]
  scale = rng.uniform(*scale_range)
  # Source window: (height, width) / scale pixels, clipped to the photo, aspect ratio kept.
  ch, cw = height / scale, width / scale
  shrink = max(ch / ph, cw / pw, 1.0)
  ch, cw = max(int(ch / shrink), 2), max(int(cw / shrink), 2)
  y0 = int(rng.integers(0, ph - ch + 1))
  x0 = int(rng.integers(0, pw - cw + 1))
  window = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
  if rng.random() < 0.5:
    window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  out = np.asarray(window.resize((width, height), Image.Resampling.BILINEAR), np.float32)
  if _is_gray(photo):  # Tint grayscale photos so textures are not all gray.
    out = out * rng.uniform(0.6, 1.2, size=3).astype(np.float32)
  return out


# ---------------------------------------------------------------------------
# Objects: each returns (coverage float32 [h, w] in 0..1 with soft edges, hard mask bool [h, w],
# texture float32 [h, w, 3], shadow float32 [h, w] in 0..1) on a canvas the size of the scene.
# ---------------------------------------------------------------------------


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
  if radius <= 0:
    return a.astype(np.float32)
  img = Image.fromarray(np.clip(a * 255.0, 0, 255).astype(np.uint8))
  return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(a)
  h, w = a.shape
  ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
  xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
  out[yd, xd] = a[ys, xs]
  return out


def _place(rng, canvas_hw, shape_hw, max_outside=0.3) -> tuple[int, int]:
  """Top-left corner for a shape, at most `max_outside` of each side outside the canvas."""
  (h, w), (sh, sw) = canvas_hw, shape_hw
  y = int(rng.integers(-int(sh * max_outside), max(h - int(sh * (1 - max_outside)), -int(sh * max_outside)) + 1))
  x = int(rng.integers(-int(sw * max_outside), max(w - int(sw * (1 - max_outside)), -int(sw * max_outside)) + 1))
  return y, x


def _paste_mask(canvas_hw, small: np.ndarray, top: int, left: int) -> np.ndarray:
  """Puts float mask `small` onto a zero canvas at (top, left), clipping at the borders."""
  h, w = canvas_hw
  out = np.zeros((h, w), np.float32)
  sh, sw = small.shape
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + sh, h), min(left + sw, w)
  if y1 > y0 and x1 > x0:
    out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
  return out


def make_horse(rng, hw, photos, horse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  h, w = hw
  target_h = int(min(h, w) * rng.uniform(0.35, 0.8))
  aspect = rng.uniform(0.85, 1.2)  # Slight stretch: ponies and thoroughbreds.
  target_w = max(int(target_h * horse.shape[1] / horse.shape[0] * aspect), 8)
  sil = Image.fromarray(horse.astype(np.uint8) * 255).resize((target_w, target_h), Image.Resampling.BILINEAR)
  if rng.random() < 0.5:
    sil = sil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  sil = sil.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=True)
  small = np.asarray(sil, np.float32) / 255.0
  top, left = _place(rng, hw, small.shape)
  hard = _paste_mask(hw, small, top, left) >= 0.5
  coverage = _blur(hard.astype(np.float32), rng.uniform(0.5, 1.2))
  texture = photo_crop(rng, photos[str(rng.choice(TEXTURE_PHOTOS[1]))], h, w, scale_range=(1.0, 2.5))
  # Coat colour: horses come brown, black, grey and white.
  coat = np.array(rng.choice([(0.8, 0.55, 0.35), (0.35, 0.3, 0.28), (0.85, 0.85, 0.85), (1.0, 0.95, 0.9)]))
  mix = rng.uniform(0.3, 0.7)
  texture = texture * (1 - mix) + texture.mean(-1, keepdims=True) * coat[None, None] * 1.3 * mix
  # Soft shading from top (lit back) to bottom (belly in shadow).
  grad = np.linspace(1.1, 0.75, h, dtype=np.float32)[:, None, None]
  texture = texture * grad
  dy, dx = int(rng.integers(1, max(3, h // 25))), int(rng.integers(-h // 20, h // 20 + 1))
  shadow = _blur(_shift(hard.astype(np.float32), dy, dx), rng.uniform(2.0, 4.0)) * rng.uniform(0.3, 0.55)
  return coverage, hard, texture, shadow


def make_ball(rng, hw, photos, horse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  del horse
  h, w = hw
  d = min(h, w) * rng.uniform(0.15, 0.45)
  ry = d / 2 * rng.uniform(0.85, 1.0)  # Slightly elliptical: perspective.
  rx = d / 2 * rng.uniform(0.85, 1.0) if rng.random() < 0.5 else d / 2
  cy = rng.uniform(-0.2 * ry, h + 0.2 * ry)
  cx = rng.uniform(-0.2 * rx, w + 0.2 * rx)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  ny, nx = (yy + 0.5 - cy) / ry, (xx + 0.5 - cx) / rx
  r2 = ny ** 2 + nx ** 2
  hard = r2 <= 1.0
  # Antialiased edge: coverage falls off over about a pixel.
  coverage = np.clip((1.0 - np.sqrt(r2)) * min(rx, ry) + 0.5, 0.0, 1.0).astype(np.float32)
  coverage = _blur(coverage, rng.uniform(0.0, 0.8))
  texture = photo_crop(rng, photos[str(rng.choice(TEXTURE_PHOTOS[2]))], h, w, scale_range=(0.8, 2.0))
  # Lambertian sphere shading with a light from the upper left, plus a specular highlight.
  nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
  light = np.array([-0.5, -0.5, 0.7]) * rng.uniform(0.8, 1.2, size=3)
  light = light / np.linalg.norm(light)
  lambert = np.clip(ny * light[0] + nx * light[1] + nz * light[2], 0.0, 1.0)
  spec = np.clip(lambert, 0, 1) ** 30 * rng.uniform(40, 120)
  texture = texture * (0.35 + 0.8 * lambert)[..., None] + spec[..., None]
  shadow_y = cy + ry * rng.uniform(0.7, 0.95)
  sr2 = ((yy - shadow_y) / (0.35 * ry)) ** 2 + ((xx - cx - 0.2 * rx) / (1.05 * rx)) ** 2
  shadow = _blur((sr2 <= 1.0).astype(np.float32), rng.uniform(1.5, 3.0)) * rng.uniform(0.35, 0.6)
  return coverage, hard, texture, shadow


def make_box(rng, hw, photos, horse) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  del horse
  h, w = hw
  bh = min(h, w) * rng.uniform(0.2, 0.5)
  bw = bh * rng.uniform(0.6, 1.8)
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  angle = rng.uniform(-np.pi / 5, np.pi / 5)
  c, s = np.cos(angle), np.sin(angle)
  corners = [(cx + dx * c - dy * s, cy + dx * s + dy * c)
             for dx, dy in ((-bw / 2, -bh / 2), (bw / 2, -bh / 2), (bw / 2, bh / 2), (-bw / 2, bh / 2))]
  # Draw at 4x and downsample: antialiased edges for free.
  big = Image.new('L', (w * 4, h * 4), 0)
  ImageDraw.Draw(big).polygon([(x * 4, y * 4) for x, y in corners], fill=255)
  coverage = np.asarray(big.resize((w, h), Image.Resampling.BOX), np.float32) / 255.0
  hard = coverage >= 0.5
  texture = photo_crop(rng, photos[str(rng.choice(TEXTURE_PHOTOS[3]))], h, w, scale_range=(0.8, 2.0))
  # One lit face: brightness ramps along the box's own axis.
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  along = ((xx - cx) * c + (yy - cy) * s) / max(bw, 1.0)
  texture = texture * np.clip(1.0 - 0.45 * (along + 0.5), 0.5, 1.1)[..., None]
  # Darker rim: a thin band inside the edge, like a box's edges.
  rim = hard & ~(_blur(coverage, 1.5) > 0.9)
  texture[rim] *= 0.7
  dy, dx = int(rng.integers(1, max(3, h // 20))), int(rng.integers(1, max(3, w // 20)))
  shadow = _blur(_shift(hard.astype(np.float32), dy, dx), rng.uniform(1.5, 3.5)) * rng.uniform(0.3, 0.55)
  return coverage, hard, texture, shadow


MAKERS = {1: make_horse, 2: make_ball, 3: make_box}


# ---------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------


def _boundary_band(label: np.ndarray, width: int) -> np.ndarray:
  """Pixels within `width` of a boundary between two different labels (VOC-style void band)."""
  size = 2 * width + 1
  img = Image.fromarray(label.astype(np.uint8))
  hi = np.asarray(img.filter(ImageFilter.MaxFilter(size)))
  lo = np.asarray(img.filter(ImageFilter.MinFilter(size)))
  return hi != lo


def make_scene(rng: np.random.Generator, photos: dict, horse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One scene: (image uint8 [H, W, 3], label uint8 [H, W] with classes 0..3 and 255 for ignore)."""
  h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
  image = photo_crop(rng, photos[str(rng.choice(BACKGROUND_PHOTOS))], h, w, scale_range=(0.4, 1.5))
  label = np.zeros((h, w), np.uint8)
  for _ in range(int(rng.integers(1, 5))):
    cls = int(rng.choice([1, 2, 3], p=CLASS_PROBS))
    coverage, hard, texture, shadow = MAKERS[cls](rng, (h, w), photos, horse)
    if not hard.any():
      continue
    image = image * (1.0 - shadow[..., None])  # Shadows fall on whatever is below, objects included.
    image = image * (1.0 - coverage[..., None]) + texture * coverage[..., None]
    label[hard] = cls
  # Camera-like variation: colour cast, exposure, sensor noise, sometimes defocus.
  image = image * rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.2)
  image = image + rng.normal(0, rng.uniform(1.0, 6.0), size=image.shape)
  image = np.clip(image, 0, 255).astype(np.uint8)
  if rng.random() < 0.2:
    image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0))))
  if rng.random() < 0.5:
    band = _boundary_band(label, int(rng.integers(1, 3)))
    label = np.where(band, IGNORE, label).astype(np.uint8)
  return image, label


def write_pair(image: np.ndarray, label: np.ndarray, images_dir: str, masks_dir: str, stem: str,
               rng: np.random.Generator, palette: list[int]) -> str:
  """Saves the image (JPEG 75%, PNG 25%; 7% grayscale) and its palette mask; returns the image file name."""
  pil = Image.fromarray(image)
  if rng.random() < 0.07:
    pil = pil.convert('L')
  if rng.random() < 0.75:
    name = stem + '.jpg'
    pil.save(os.path.join(images_dir, name), quality=int(rng.integers(70, 96)))
  else:
    name = stem + '.png'
    pil.save(os.path.join(images_dir, name))
  mask = Image.frombytes('P', (label.shape[1], label.shape[0]), label.tobytes())
  mask.putpalette(palette)
  mask.save(os.path.join(masks_dir, stem + '.png'))
  return name


def write_folder(path: str, *, train: int = 300, val: int = 60, seed: int = 0, force: bool = False,
                 verbose: bool = True) -> dict:
  """Writes the dataset (see the module docstring); returns per-split counts and class pixel fractions.

  Args:
    path: the dataset folder to create.
    train: number of training pairs.
    val: number of validation pairs.
    seed: the output is a pure function of it.
    force: replace the four split folders if they exist (otherwise a non-empty one is an error).
    verbose: print progress.
  """
  photos, horse = load_photos()
  palette = folder_layout.voc_palette()
  summary = {'classes': list(CLASS_NAMES), 'splits': {}}
  for split_id, (split, n) in enumerate((('train', train), ('val', val))):
    images_dir, masks_dir = folder_layout.split_dirs(path, split, force)
    counts = np.zeros(256, np.int64)
    formats = {'jpg': 0, 'png': 0}
    for i in range(n):
      rng = np.random.default_rng([seed, split_id, i])
      image, label = make_scene(rng, photos, horse)
      name = write_pair(image, label, images_dir, masks_dir, f'{split}_{i:05d}', rng, palette)
      formats[name.rsplit('.', 1)[1]] += 1
      counts += np.bincount(label.ravel(), minlength=256)
      if verbose and (i + 1) % 50 == 0:
        print(f'  {split}: {i + 1}/{n}', flush=True)
    summary['splits'][split] = {'pairs': n, 'formats': formats,
                                **folder_layout.pixel_fractions(counts, CLASS_NAMES, IGNORE)}
  folder_layout.write_classes(path, CLASS_NAMES)
  return summary


def main(argv=None):
  args = folder_layout.parse_args(argv, __doc__, train=300, val=60)
  t0 = time.perf_counter()
  summary = write_folder(args.dir, train=args.train, val=args.val, seed=args.seed, force=args.force)
  for split, s in summary['splits'].items():
    fractions = ', '.join(f'{c} {v:.1%}' for c, v in s['class_pixel_fraction'].items())
    print(f'{split}: {s["pairs"]} pairs ({s["formats"]["jpg"]} jpg, {s["formats"]["png"]} png); pixels: '
          f'{fractions}, ignore {s["ignore_pixel_fraction"]:.1%}')
  print(f'Wrote {args.dir} in {time.perf_counter() - t0:.1f}s. Train on it with:\n'
        f'  python run.py --config=configs/unet.py --config.dataset.name=folder --config.dataset.path={args.dir} '
        f"--config.dataset.num_classes=4 --config.dataset.class_names=\"{CLASS_NAMES!r}\"")


if __name__ == '__main__':
  main()
