"""The ADE20K benchmark (ADEChallengeData2016, 150 classes) as a jaxseg folder dataset.

  python tools/ade20k_folder.py ADEChallengeData2016 ADE20K_FOLDER

ADEChallengeData2016.zip (the MIT Scene Parsing benchmark, what SegFormer, UPerNet and every ADE20K number in
papers use; http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) unpacks to

  images/{training,validation}/ADE_*.jpg       annotations/{training,validation}/ADE_*.png

whose masks hold 0 for "other" (not one of the 150 classes) and 1..150 for the classes. This writes the folder
layout jaxseg reads (tools/folder_layout.py): train/ and val/ with the images linked (or copied with --copy) and each
mask as a palette PNG of class indices, value v -> v - 1 and 0 -> 255 (ignored): mmsegmentation's
`reduce_zero_label`, the class indices of Hugging Face's ADE20K-trained SegFormer and UPerNet files. classes.txt
lists the 150 names in that order. Every mask is checked (a single band, its image's size, values <= 150); a
problem stops the tool naming the file, and leaves the destination as it was.

Then train or evaluate with --config.dataset.name=folder --config.dataset.path=ADE20K_FOLDER (the SegFormer and
DPT recipes, configs/segformer_b0_ade20k.py, do so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # folder_layout beside this file; jaxseg.
  if _path not in sys.path:
    sys.path.insert(0, _path)
import folder_layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxseg.data import catalog  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASS_NAMES = catalog.ADE20K_CLASS_NAMES
IGNORE = 255
SPLITS = (('training', 'train'), ('validation', 'val'))


def mapped_mask(raw: np.ndarray) -> np.ndarray:
  """ADE20K annotation values (0 other, 1..150 classes) -> class indices 0..149, 255 ignored."""
  return np.where(raw == 0, IGNORE, raw.astype(np.int32) - 1).astype(np.uint8)


def pairs(source: str, split: str) -> list[tuple[str, str]]:
  """(image, annotation) paths of one ADEChallengeData2016 split, checked; SystemExit naming what is wrong."""
  images_dir = os.path.join(source, 'images', split)
  masks_dir = os.path.join(source, 'annotations', split)
  for d in (images_dir, masks_dir):
    if not os.path.isdir(d):
      sys.exit(f'{d}: no such folder; expected ADEChallengeData2016 with images/{{training,validation}} and '
               'annotations/{training,validation}')
  found = []
  for name in sorted(os.listdir(images_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in ('.jpg', '.jpeg', '.png'):
      continue
    mask = os.path.join(masks_dir, stem + '.png')
    if not os.path.isfile(mask):
      sys.exit(f'image {os.path.join(images_dir, name)} has no annotation: expected {mask}')
    found.append((os.path.join(images_dir, name), mask))
  if not found:
    sys.exit(f'{images_dir}: no images')
  return found


def check_pair(image_path: str, mask_path: str) -> np.ndarray:
  """The annotation as an array, after checking it against its image; SystemExit naming the file otherwise."""
  try:
    with Image.open(image_path) as image:
      size = image.size
    with Image.open(mask_path) as mask:
      if mask.mode not in ('L', 'P', 'I;16', 'I'):
        sys.exit(f'annotation {mask_path}: mode {mask.mode}, expected a single-band PNG of class values 0..150')
      raw = np.asarray(mask)
  except (OSError, ValueError) as e:
    sys.exit(f'cannot read {image_path} or {mask_path} (truncated or not an image?): {e}')
  if (raw.shape[1], raw.shape[0]) != size:
    sys.exit(f'annotation {mask_path} is {raw.shape[1]}x{raw.shape[0]}, its image {image_path} is '
             f'{size[0]}x{size[1]}')
  if raw.size and int(raw.max()) > len(CLASS_NAMES):
    sys.exit(f'annotation {mask_path} has value {int(raw.max())}; ADE20K masks hold 0..{len(CLASS_NAMES)}')
  return raw


def convert(source: str, dest: str, *, copy: bool = False, force: bool = False) -> dict[str, int]:
  """Writes the folder dataset at `dest` from ADEChallengeData2016 at `source`; returns pairs per split.

  Written into a staging folder beside `dest` and moved into place at the end, so a bad annotation found half way
  leaves `dest` as it was.
  """
  found = {out: pairs(source, split) for split, out in SPLITS}  # Every split listed before anything is written.
  for out in found:
    for sub in ('images', 'masks'):
      d = os.path.join(dest, out, sub)
      if os.path.isdir(d) and os.listdir(d) and not force:
        sys.exit(f'{d} is not empty; pass --force to replace it')
  os.makedirs(dest, exist_ok=True)
  stage = tempfile.mkdtemp(prefix='.ade20k_folder_', dir=dest)
  try:
    palette = folder_layout.voc_palette()
    for out, split_pairs in found.items():
      images_dir, masks_dir = folder_layout.split_dirs(stage, out, force=False)
      for image_path, mask_path in split_pairs:
        label = mapped_mask(check_pair(image_path, mask_path))
        target = os.path.join(images_dir, os.path.basename(image_path))
        if copy:
          shutil.copyfile(image_path, target)
        else:
          os.symlink(os.path.abspath(image_path), target)
        mask = Image.frombytes('P', (label.shape[1], label.shape[0]), label.tobytes())
        mask.putpalette(palette)
        mask.save(os.path.join(masks_dir, os.path.splitext(os.path.basename(mask_path))[0] + '.png'))
    for out in found:
      for sub in ('images', 'masks'):
        d = os.path.join(dest, out, sub)
        if os.path.isdir(d):
          shutil.rmtree(d)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        os.replace(os.path.join(stage, out, sub), d)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  folder_layout.write_classes(dest, CLASS_NAMES)
  return {out: len(split_pairs) for out, split_pairs in found.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('source', help='the unpacked ADEChallengeData2016 folder')
  p.add_argument('dest', help='the folder dataset to write (train/, val/, classes.txt)')
  p.add_argument('--copy', action='store_true', help='copy the images instead of linking them')
  p.add_argument('--force', action='store_true', help='replace existing split folders')
  args = p.parse_args(argv)
  counts = convert(args.source, args.dest, copy=args.copy, force=args.force)
  print(f'Wrote {args.dest}: {counts["train"]} training and {counts["val"]} validation pairs, 150 classes. Use it '
        f'with --config.dataset.name=folder --config.dataset.path={args.dest}')


if __name__ == '__main__':
  main()
