"""jaxseg's folder-dataset layout (README "Your own folders"), shared by the tools that write one.

  DIR/{train,val}/images/<stem>.png|jpg   DIR/{train,val}/masks/<stem>.png (palette PNG of class indices)
  DIR/classes.txt                          one class name per line

Multi-label (config.task='multilabel'): the masks are one folder per class, of single-channel ('L') PNGs
(0 absent, 1 present, 255 ignore), DIR/{train,val}/masks/<class_name>/<stem>.png (`class_mask_dirs`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np


def voc_palette() -> list[int]:
  """Pascal VOC's 256-colour palette (class i's colour from the bits of i), flattened for PIL."""
  palette = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette += [r, g, b]
  return palette


def split_dirs(path: str, split: str, force: bool) -> tuple[str, str]:
  """Creates DIR/split/images and DIR/split/masks, empty; a non-empty one stops the tool unless `force`."""
  images_dir = os.path.join(path, split, 'images')
  masks_dir = os.path.join(path, split, 'masks')
  for d in (images_dir, masks_dir):
    if os.path.isdir(d) and os.listdir(d):
      if not force:
        sys.exit(f'{d} is not empty; pass --force to replace it')
      shutil.rmtree(d)
    os.makedirs(d, exist_ok=True)
  return images_dir, masks_dir


def class_mask_dirs(masks_dir: str, class_names) -> dict[str, str]:
  """Creates masks_dir/<class_name>/ for every class (the multi-label layout); returns the folders by class name."""
  dirs = {}
  for name in class_names:
    if not name or name in ('.', '..') or name != name.strip() or '/' in name or '\\' in name:
      raise ValueError(f'class name {name!r} cannot be a mask folder name')
    dirs[name] = os.path.join(masks_dir, name)
    os.makedirs(dirs[name], exist_ok=True)
  return dirs


def pixel_fractions(counts: np.ndarray, class_names, ignore: int) -> dict:
  """Per-class and ignore fractions of the label values counted in `counts` ([256] histogram)."""
  total = max(int(counts.sum()), 1)
  return {'class_pixel_fraction': {c: float(counts[k] / total) for k, c in enumerate(class_names)},
          'ignore_pixel_fraction': float(counts[ignore] / total)}


def write_classes(path: str, class_names) -> None:
  with open(os.path.join(path, 'classes.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(class_names) + '\n')


def parse_args(argv, doc: str, *, train: int, val: int) -> argparse.Namespace:
  """A generator's command line: DIR [--train N] [--val N] [--seed S] [--force]; `doc` is its module docstring."""
  p = argparse.ArgumentParser(description=doc.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('dir', help='dataset folder to write (train/images, train/masks, val/images, val/masks)')
  p.add_argument('--train', type=int, default=train, help=f'training pairs (default {train})')
  p.add_argument('--val', type=int, default=val, help=f'validation pairs (default {val})')
  p.add_argument('--seed', type=int, default=0, help='the dataset is a pure function of the seed')
  p.add_argument('--force', action='store_true', help='replace existing split folders')
  return p.parse_args(argv)
