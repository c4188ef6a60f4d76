"""tools/ade20k_folder.py: ADEChallengeData2016 -> jaxseg's folder layout, on a small copy of that layout."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from jaxseg.data import folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import ade20k_folder  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_ade(root, counts=(('training', 3), ('validation', 2)), seed=0):
  """A small ADEChallengeData2016: JPEG images and single-band annotations with values 0..150."""
  rng = np.random.default_rng(seed)
  masks = {}
  for split, n in counts:
    os.makedirs(root / 'images' / split)
    os.makedirs(root / 'annotations' / split)
    for i in range(n):
      stem = f'ADE_{split}_{i:08d}'
      h, w = 12 + i, 17
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / 'images' / split / f'{stem}.jpg')
      raw = rng.integers(0, 151, (h, w)).astype(np.uint8)
      raw[0, :3] = (0, 1, 150)  # "other", the first class and the last.
      Image.fromarray(raw).save(root / 'annotations' / split / f'{stem}.png')
      masks[(split, stem)] = raw
  return masks


def test_converts_masks_links_images_and_reads_as_a_folder_dataset(tmp_path):
  masks = write_ade(tmp_path / 'ADEChallengeData2016')
  counts = ade20k_folder.convert(str(tmp_path / 'ADEChallengeData2016'), str(tmp_path / 'out'))
  assert counts == {'train': 3, 'val': 2}
  for (split, stem), raw in masks.items():
    out = 'train' if split == 'training' else 'val'
    written = np.asarray(Image.open(tmp_path / 'out' / out / 'masks' / f'{stem}.png'))
    want = np.where(raw == 0, 255, raw.astype(int) - 1)  # reduce_zero_label, by hand.
    np.testing.assert_array_equal(written, want)
    assert tuple(written[0, :3]) == (255, 0, 149)
    image = tmp_path / 'out' / out / 'images' / f'{stem}.jpg'
    assert os.path.islink(image)
    assert os.path.samefile(image, tmp_path / 'ADEChallengeData2016' / 'images' / split / f'{stem}.jpg')
  names = (tmp_path / 'out' / 'classes.txt').read_text().splitlines()
  assert len(names) == 150 and names[0] == 'wall' and names[-1] == 'flag'
  # jaxseg's own folder checks accept it as a 150-class dataset.
  folder.validate_folder(str(tmp_path / 'out'), num_classes=150, ignore_label=255)


@pytest.mark.parametrize('problem', ['value', 'size', 'missing'])
def test_a_bad_annotation_stops_before_writing_and_names_the_file(tmp_path, problem):
  masks = write_ade(tmp_path / 'ade')
  split, stem = next(iter(masks))
  path = tmp_path / 'ade' / 'annotations' / split / f'{stem}.png'
  if problem == 'missing':
    os.remove(path)
  else:
    raw = masks[(split, stem)].copy()
    if problem == 'value':
      raw[1, 1] = 151
    else:
      raw = raw[:-1]
    Image.fromarray(raw).save(path)
  with pytest.raises(SystemExit) as e:
    ade20k_folder.convert(str(tmp_path / 'ade'), str(tmp_path / 'out'))
  assert stem in str(e.value)
  assert not os.path.exists(tmp_path / 'out' / 'train') and not os.path.exists(tmp_path / 'out' / 'val')
