"""tools/make_multilabel_folder.py: multi-label layout, overlapping classes, determinism, command line."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT

pytest.importorskip('skimage')  # The tool's sample photographs (the bench extra).

if os.path.join(ROOT, 'tools') not in sys.path:
  sys.path.insert(0, os.path.join(ROOT, 'tools'))

import make_multilabel_folder  # pylint: disable=g-import-not-at-top,wrong-import-position

TOOL = os.path.join(ROOT, 'tools', 'make_multilabel_folder.py')
CLASSES = make_multilabel_folder.CLASS_NAMES
SEED, TRAIN, VAL = 4, 3, 2


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """(folder, write_folder's summary): a tiny folder, written once."""
  path = str(tmp_path_factory.mktemp('multilabel'))
  return path, make_multilabel_folder.write_folder(path, train=TRAIN, val=VAL, seed=SEED, verbose=False)


def _labels(path, split):
  """{stem: (image size, labels uint8 [K, H, W])} read back from the folder."""
  out = {}
  for f in sorted(os.listdir(os.path.join(path, split, 'images'))):
    stem = f.rsplit('.', 1)[0]
    image = Image.open(os.path.join(path, split, 'images', f))
    masks = [Image.open(os.path.join(path, split, 'masks', c, stem + '.png')) for c in CLASSES]
    assert all(m.mode == 'L' and m.size == image.size for m in masks), (split, stem)
    out[stem] = (image.size, np.stack([np.asarray(m) for m in masks]))
  return out


def _files(path):
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for d, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(d, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(d, f), path)] = fh.read()
  return out


def test_layout_and_mask_values(folder):
  path, summary = folder
  with open(os.path.join(path, 'classes.txt'), encoding='utf-8') as f:
    assert f.read().splitlines() == list(CLASSES)
  assert 'background' not in CLASSES  # Multi-label: no class is the absence of the others.
  for split, n in (('train', TRAIN), ('val', VAL)):
    assert sorted(os.listdir(os.path.join(path, split, 'masks'))) == sorted(CLASSES)
    stems = [f.rsplit('.', 1)[0] for f in sorted(os.listdir(os.path.join(path, split, 'images')))]
    assert stems == [f'{split}_{i:05d}' for i in range(n)] and summary['splits'][split]['pairs'] == n
    for c in CLASSES:  # One mask per image in every class folder, nothing else.
      assert sorted(os.listdir(os.path.join(path, split, 'masks', c))) == [s + '.png' for s in stems]
    for (w, h), labels in _labels(path, split).values():
      assert 96 <= h <= 200 and 96 <= w <= 200
      assert set(np.unique(labels).tolist()) <= {0, 1, 255}
      assert (labels[0] == 1).any()  # Every scene shows an object.


def test_object_is_the_union_of_the_others(folder):
  path, _ = folder
  object_, horse, ball, damaged = range(4)
  labels = np.concatenate([l.reshape(4, -1) for split in ('train', 'val') for _, l in _labels(path, split).values()],
                          axis=1)
  on = labels == 1
  assert (on.sum(0) >= 2).any()
  # Kinds and damage are parts of object: wherever one is present, object is present (not even ignored: a
  # boundary band of object is a boundary band of the part too); where object is absent, so are they.
  for part in (horse, ball, damaged):
    assert (labels[object_][on[part]] == 1).all(), CLASSES[part]
    assert (labels[part][labels[object_] == 0] == 0).all(), CLASSES[part]
  assert not (on[horse] & on[ball]).any()

def test_scenes_hold_the_overlaps_and_ignore_bands():
  """Over a few scenes (no files): every combination of classes occurs, and ignore bands are per class.

  (0,) is a box, (0, 1) a horse, (0, 2) a ball, (0, 3) a damaged box, (0, 1, 3) a damaged horse, (0, 2, 3) a
  damaged ball; no other combination can occur.
  """
  photos, horse = make_multilabel_folder.photo.load_photos()
  seen = set()
  for i in range(12):
    _, labels = make_multilabel_folder.make_scene(np.random.default_rng([SEED, 0, i]), photos, horse)
    on = labels == 1
    seen |= {tuple(int(k) for k in np.flatnonzero(on[:, y, x])) for y, x in zip(*np.nonzero(on.any(0)))}
    ignored = labels == 255
    if ignored.any():
      seen.add('ignore')
      # Bands in a part's mask where object is not ignored: a horse cut by another object, a damage patch's edge.
      if (ignored[1] & (labels[0] == 1)).any():
        seen.add('horse band inside object')
      if (ignored[3] & (labels[0] == 1)).any():
        seen.add('damaged band inside object')
  assert seen == {(0,), (0, 1), (0, 2), (0, 3), (0, 1, 3), (0, 2, 3), 'ignore', 'horse band inside object',
                  'damaged band inside object'}, seen


def test_same_seed_same_bytes_other_seed_differs(folder, tmp_path):
  path, _ = folder
  again = str(tmp_path / 'again')
  make_multilabel_folder.write_folder(again, train=TRAIN, val=VAL, seed=SEED, verbose=False)
  first, second = _files(path), _files(again)
  assert sorted(first) == sorted(second) and all(first[k] == second[k] for k in first)
  other = str(tmp_path / 'other')
  make_multilabel_folder.write_folder(other, train=1, val=0, seed=SEED + 1, verbose=False)
  assert _files(other)['train/masks/object/train_00000.png'] != first['train/masks/object/train_00000.png']


def test_command_line_summary_and_non_empty_folder(tmp_path):
  path = str(tmp_path / 'cli')
  run = lambda *args: subprocess.run([sys.executable, TOOL, path, '--train', '1', '--val', '1', *args],
                                     capture_output=True, text=True, check=False, timeout=120)
  done = run('--seed', '2')
  assert done.returncode == 0, done.stderr
  assert 'pixels present: object' in done.stdout and '2+ classes' in done.stdout and 'ignore:' in done.stdout
  assert '--config=configs/unet_multilabel.py' in done.stdout
  stopped = run()
  assert stopped.returncode != 0 and 'not empty' in stopped.stderr and '--force' in stopped.stderr
  assert run('--force').returncode == 0
