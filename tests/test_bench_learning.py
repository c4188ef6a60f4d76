"""tools/make_digit_folder.py checked against sklearn's load_digits, and benchmarks/bench_learning.py run on a tiny
digit folder: its curve is run.py's evaluations, and a budget stops a run cleanly (a harness check, not a timing)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits  # In the test extra: the digit tool needs it.

from tests.helpers import ROOT, xla_flags

if os.path.join(ROOT, 'tools') not in sys.path:
  sys.path.insert(0, os.path.join(ROOT, 'tools'))

import make_digit_folder  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED, TRAIN, VAL = 3, 16, 8
TINY = ['--config.model.base_width=4', '--config.model.depth=2', '--config.input.crop_size=(32,32)',
        '--config.batch_size=8', '--config.eval_batch_size=8', '--config.log_every_steps=4',
        '--config.optimizer.warmup_steps=2']


@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory):
  """(folder, write_folder's summary, a tfds data dir the runs share: the folder is prepared once)."""
  path = str(tmp_path_factory.mktemp('digits'))
  summary = make_digit_folder.write_folder(path, train=TRAIN, val=VAL, seed=SEED, verbose=False)
  return path, summary, str(tmp_path_factory.mktemp('tfds'))


def _pairs(path, split):
  images = sorted(os.listdir(os.path.join(path, split, 'images')))
  return [(os.path.join(path, split, 'images', f), os.path.join(path, split, 'masks', f[:-4] + '.png'))
          for f in images]


def test_digit_folder_layout_masks_and_sizes(digit_folder):
  path, summary, _ = digit_folder
  targets = load_digits().target
  with open(os.path.join(path, 'classes.txt'), encoding='utf-8') as f:
    assert f.read().split() == ['background', 'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                                'eight', 'nine']
  for split, n in (('train', TRAIN), ('val', VAL)):
    pairs = _pairs(path, split)
    assert len(pairs) == n == len(summary['splits'][split]['digits'])
    for (image_path, mask_path), used in zip(pairs, summary['splits'][split]['digits']):
      image, mask = Image.open(image_path), Image.open(mask_path)
      assert image.mode == 'RGB' and mask.mode == 'P' and image.size == mask.size
      w, h = image.size
      assert 64 <= h <= 128 and 64 <= w <= 128 and h != w
      assert 2 <= len(used) <= 6
      values = set(np.unique(np.asarray(mask)).tolist())
      # Only the pasted digits' classes (digit d is class d + 1), background and ignore; some ink is visible.
      assert values <= {0, 255} | {int(targets[i]) + 1 for i in used}
      assert values - {0, 255}


def test_digit_splits_use_disjoint_halves_of_load_digits(digit_folder):
  _, summary, _ = digit_folder
  assert len(load_digits().images) == make_digit_folder.NUM_SCANS
  train_pool, val_pool = make_digit_folder.split_indices('train'), make_digit_folder.split_indices('val')
  assert not set(train_pool) & set(val_pool)
  assert sorted(set(train_pool) | set(val_pool)) == list(range(make_digit_folder.NUM_SCANS))
  used = {s: {i for scene in summary['splits'][s]['digits'] for i in scene} for s in ('train', 'val')}
  assert used['train'] <= set(train_pool) and used['val'] <= set(val_pool)


def test_digit_scene_is_a_pure_function_of_seed_split_and_index(digit_folder, tmp_path):
  path, _, _ = digit_folder
  # A smaller folder with the same seed: its pairs are byte for byte the first ones of the big folder.
  make_digit_folder.write_folder(str(tmp_path / 'same'), train=3, val=2, seed=SEED, verbose=False)
  for split in ('train', 'val'):
    for (a_img, a_mask), (b_img, b_mask) in zip(_pairs(str(tmp_path / 'same'), split), _pairs(path, split)):
      for a, b in ((a_img, b_img), (a_mask, b_mask)):
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
          assert os.path.basename(a) == os.path.basename(b) and fa.read() == fb.read()
  make_digit_folder.write_folder(str(tmp_path / 'other'), train=1, val=0, seed=SEED + 1, verbose=False)
  other, first = _pairs(str(tmp_path / 'other'), 'train')[0][1], _pairs(path, 'train')[0][1]
  assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(first)))
  # The written mask is the scene made from load_digits' own scans (class = digit + 1).
  digits = load_digits()
  _, label, _ = make_digit_folder.make_scene(
      np.random.default_rng([SEED, 1, 0]), digits.images.astype(np.float32) / 16, digits.target,
      make_digit_folder.split_indices('val'))
  np.testing.assert_array_equal(label, np.asarray(Image.open(_pairs(path, 'val')[0][1])))


BENCH = os.path.join(ROOT, 'benchmarks', 'bench_learning.py')


def _bench(folder, data_dir, own_args, run_args, timeout=240):
  """bench_learning.py with `own_args`, on the digit folder with a tiny UNet and `run_args` for run.py."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  cmd = [sys.executable, BENCH, '--config=configs/unet.py', *own_args, '--', '--config.dataset.name=folder',
         f'--config.dataset.path={folder}', '--config.dataset.num_classes=11', f'--config.dataset.data_dir={data_dir}',
         *TINY, *run_args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def curve(digit_folder, tmp_path_factory):
  """An 8-step run with evaluations at steps 4 and 8: (bench output, JSON result, workdir, its files' dir)."""
  folder, _, data_dir = digit_folder
  tmp_path = tmp_path_factory.mktemp('curve')
  out, png, workdir = tmp_path / 'curve.json', tmp_path / 'curve.png', tmp_path / 'wd'
  proc = _bench(folder, data_dir, ['--budget_s=600', '--label=tiny', f'--json={out}', f'--png={png}',
                                   f'--workdir={workdir}', '--override=num_train_steps=8'],
                ['--config.eval_every_steps=4'])
  return proc, json.loads(out.read_text()), workdir, tmp_path




@pytest.mark.slow
def test_curve_is_the_runs_evaluations(curve, tmp_path):
  proc, result, workdir, files = curve
  out, png = files / 'curve.json', files / 'curve.png'
  evals = [json.loads(line) for line in open(workdir / 'metrics.jsonl') if '"eval"' in line]
  train_losses = {r['step']: r['loss'] for r in map(json.loads, open(workdir / 'metrics.jsonl')) if r.get('split') == 'train'}
  assert result['schema'] == 'jaxseg-bench-learning/1' and result['label'] == 'tiny'
  assert result['finished'] and result['returncode'] == 0 and result['budget_s'] == 600
  assert '--config.num_train_steps=8' in result['command'] and '--config.eval_every_steps=4' in result['command']
  assert result['config']['num_train_steps'] == 8 and result['config']['dataset']['num_classes'] == 11
  assert {'cpu_count', 'platform', 'jax'} <= set(result['host'])
  points = result['points']
  assert [p['step'] for p in points] == [r['step'] for r in evals] == [4, 8]
  walls = [p['wall_s'] for p in points]
  assert 0 < walls[0] < walls[1] <= result['wall_s']
  for p, r in zip(points, evals):
    assert p['mean_iou'] == r['mean_iou'] and p['per_class_iou'] == r['per_class_iou']
    assert p['pixel_accuracy'] == r['pixel_accuracy'] and len(p['per_class_iou']) == 11
    # Training logs every 4 steps (TINY), so each evaluation has the training loss of its own step.
    assert p['loss'] == r['loss'] and p['train_loss'] == train_losses[p['step']]
  assert result['final'] == points[-1]
  # The final point's classes above 0.3 and 0.5 and its weakest class, counted here; a class absent from the split
  # and never predicted (None) is left out.
  ious = [v for v in points[-1]['per_class_iou'] if v is not None]
  assert result['classes_above'] == {'0.3': sum(v > 0.3 for v in ious), '0.5': sum(v > 0.5 for v in ious)}
  assert result['min_class_iou'] == min(ious)
  assert 'mean IoU' in proc.stdout and 'final:' in proc.stdout
  with Image.open(png) as img:
    assert img.format == 'PNG' and img.size[0] > 100
    img.verify()
  # --compare plots saved curves without training.
  other = dict(result, label='tiny again', finished=False)
  (tmp_path / 'other.json').write_text(json.dumps(other))
  compare = subprocess.run([sys.executable, BENCH, '--compare', str(out), str(tmp_path / 'other.json'),
                            f'--png={tmp_path / "compare.png"}'], cwd=ROOT, capture_output=True, text=True, check=False)
  assert compare.returncode == 0, compare.stderr[-3000:]
  assert 'tiny again: stopped at the budget' in compare.stdout
  with Image.open(tmp_path / 'compare.png') as img:
    assert img.format == 'PNG'


@pytest.mark.slow
def test_budget_stops_the_run_with_sigterm(digit_folder, curve, tmp_path):
  folder, _, data_dir = digit_folder
  out, workdir = tmp_path / 'curve.json', tmp_path / 'wd'
  # Past start-up, so that the SIGTERM reaches the train loop: well after the 8-step run (same start-up) had made its
  # first evaluation -- this run's schedule differs, so its train step compiles again, and a busy machine is slower --
  # and long before the end.
  budget = math.ceil(1.5 * curve[1]['points'][0]['wall_s']) + 10
  proc = _bench(folder, data_dir, [f'--budget_s={budget}', f'--json={out}', f'--workdir={workdir}', '--grace_s=60'],
                ['--config.num_train_steps=100000', '--config.eval_every_steps=8',
                 '--config.checkpoint_every_steps=100000'])
  result = json.loads(out.read_text())
  assert 'SIGTERM' in proc.stdout
  assert not result['finished'] and result['wall_s'] >= budget
  # Stopped inside the train loop: jaxseg saved a checkpoint at the current step and exited cleanly.
  assert result['returncode'] == 0, proc.stdout[-2000:]
  saved = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert saved and max(saved) < 100000
  assert result['points'] and result['points'][-1]['step'] <= max(saved)

