"""The auto recipe (jaxseg/recipe.py): crop, evaluation size and class weighting from the dataset, printed, saved,
reused by --mode=eval; explicit values win. Expected values are worked out by hand from the masks written here."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from jaxseg import recipe
from jaxseg import settings as settings_lib
from jaxseg.data import datasets
from jaxseg.errors import ConfigError
from tests.conftest import tiny_unet_config
from tests.helpers import jaxseg_log_records

IGNORE = 255
# (height, width) per image. Train median: 90 x 130. Largest validation image: 100 x 140.
TRAIN_SIZES = [(70, 100), (90, 130), (110, 150)]
VAL_SIZES = [(100, 60), (60, 140)]


def _write(root, sizes_by_split, rare_class_pixels):
  """Masks of 4 classes: class 0 fills the image but for a 10x10 square of class 1 and a strip of class 2 with
  `rare_class_pixels` pixels; class 3 never appears. Images: random RGB."""
  rng = np.random.default_rng(0)
  masks = {}
  for split, sizes in sizes_by_split.items():
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    masks[split] = []
    for i, (h, w) in enumerate(sizes):
      mask = np.zeros((h, w), np.uint8)
      mask[5:15, 5:15] = 1
      mask[-1, :rare_class_pixels] = 2
      mask[0, -3:] = IGNORE
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / 'images' / f'{i}.png')
      Image.fromarray(mask).save(root / split / 'masks' / f'{i}.png')
      masks[split].append(mask)
  return masks


def _config(tmp_path, **overrides):
  config = tiny_unet_config(str(tmp_path / 'tfds'), **{
      'dataset.name': 'folder', 'dataset.path': str(tmp_path / 'ds'), 'dataset.num_classes': 4,
      'model.depth': 3, **overrides})
  return config


def _resolve(settings, spec, builder):
  """recipe.resolve's settings, and its printed choices: {field: (value as printed, reason)}."""
  with jaxseg_log_records() as records:
    resolved = recipe.resolve(settings, spec, builder)
  printed = [re.fullmatch(r'Auto recipe: ([a-z_.]+)=(.*?): (.*)\.', r.getMessage(), re.S) for r in records]
  return resolved, {m.group(1): (m.group(2), m.group(3)) for m in printed if m}


@pytest.mark.parametrize('value, expected', [
    ('auto', 'auto'), (('auto',), 'auto'), ('(96,128)', (96, 128)), ('96, 128', (96, 128)), ((64, 32), (64, 32)),
])
def test_size_values_as_configs_and_command_lines_give_them(value, expected):
  config = tiny_unet_config('', **{'input.crop_size': value})
  assert settings_lib.from_config(config).input.crop_size == expected


@pytest.mark.parametrize('value', ['big', (64,), (64, 0), (64.0, 64), '(1, 2, 3)', (True, 4)])
def test_a_bad_size_names_the_field(value):
  config = tiny_unet_config('', **{'input.crop_size': value})
  with pytest.raises(ConfigError, match=re.escape("config.input.crop_size must be 'auto' or (height, width)")):
    settings_lib.from_config(config)


@pytest.mark.parametrize('model, multiple', [({'name': 'unet', 'depth': 3}, 8), ({'name': 'unet', 'depth': 4}, 16),
                                             ({'name': 'unet', 'depth': 4, 'encoder': 'resnet18'}, 32),
                                             ({'name': 'fcn'}, 32)])
def test_size_multiple_is_the_models_padding_factor(model, multiple):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model = ml_collections.ConfigDict(model)
  assert settings_lib.from_config(config).model.size_multiple == multiple


def test_auto_fields_follow_the_data(tmp_path):
  masks = _write(tmp_path / 'ds', {'train': TRAIN_SIZES, 'val': VAL_SIZES}, rare_class_pixels=20)
  config = _config(tmp_path, **{'input.crop_size': 'auto', 'input.eval_size': 'auto',
                                'loss.class_weighting': 'auto'})
  settings = settings_lib.from_config(config)
  spec, builder = datasets.open_dataset(settings.dataset)
  resolved, printed = _resolve(settings, spec, builder)
  # Crop: median 90 x 130 rounded to multiples of 2**3: 88 (11.25 -> 11) x 128 (16.25 -> 16).
  assert printed['input.crop_size'][0] == '(88, 128)' and resolved.input.crop_size == (88, 128)
  # Eval size: the largest sides 100 and 140 rounded up: 104 (12.5 -> 13) x 144 (17.5 -> 18); both images fit.
  assert printed['input.eval_size'][0] == '(104, 144)' and resolved.input.eval_size == (104, 144)
  # Class pixels, counted here: class 2 (20 per image) against class 0 (the rest): far over 10x apart.
  counts = sum(np.bincount(m[m != IGNORE], minlength=4) for m in masks['train'])
  assert counts[0] / counts[2] > 10 and counts[3] == 0
  assert printed['loss.class_weighting'][0] == "'median_frequency'"
  assert resolved.loss.class_weighting == 'median_frequency'
  reason = printed['loss.class_weighting'][1]
  assert f'{100 * counts[2] / counts.sum():.2g}% (class 2)' in reason and '1 class(es) absent' in reason
  assert settings.input.crop_size == 'auto'  # The caller's settings are left as they were.
  assert resolved.auto_fields() == []


def test_balanced_classes_are_not_weighted_and_explicit_values_win(tmp_path):
  # Class 2 on 3 full rows of a 16-wide image (48 px) against class 0 (about 200 px per image): under 10x.
  _write(tmp_path / 'ds', {'train': [(16, 16)] * 3, 'val': [(16, 16)]}, rare_class_pixels=0)
  masks_dir = tmp_path / 'ds' / 'train' / 'masks'
  for path in masks_dir.iterdir():
    mask = np.array(Image.open(path))
    mask[-3:, :] = 2
    Image.fromarray(mask).save(path)
  config = _config(tmp_path, **{'input.crop_size': (24, 40), 'loss.class_weighting': 'auto'})
  settings = settings_lib.from_config(config)
  spec, builder = datasets.open_dataset(settings.dataset)
  resolved, printed = _resolve(settings, spec, builder)
  assert list(printed) == ['loss.class_weighting']
  assert resolved.loss.class_weighting == 'none'
  assert resolved.input.crop_size == (24, 40) and resolved.input.eval_size == (96, 96)


def test_training_prints_and_saves_its_choices_and_eval_reuses_them(tmp_path):
  from jaxseg import cli, startup, train  # pylint: disable=g-import-not-at-top
  _write(tmp_path / 'ds', {'train': TRAIN_SIZES, 'val': VAL_SIZES}, rare_class_pixels=20)
  overrides = {'input.crop_size': 'auto', 'input.eval_size': 'auto', 'loss.class_weighting': 'auto',
               'num_train_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2, 'log_every_steps': 1,
               'eval_batch_size': 4, 'batch_size': 4}
  workdir = tmp_path / 'wd'
  with jaxseg_log_records() as records:
    train.train_and_evaluate(_config(tmp_path, **overrides), str(workdir))
  messages = [r.getMessage() for r in records]
  printed = [m for m in messages if m.startswith('Auto recipe: ')]
  assert printed[0].startswith('Auto recipe: input.crop_size=(88, 128): the median training image is 90x130 (3 '
                               'images)'), printed
  assert printed[1].startswith('Auto recipe: input.eval_size=(104, 144): the largest evaluation image is 100x140')
  assert printed[2].startswith("Auto recipe: loss.class_weighting='median_frequency': class pixel frequencies")
  assert any(m.startswith('Class weights (median frequency): ') for m in messages)
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['input']['crop_size'] == [88, 128] and saved['input']['eval_size'] == [104, 144]
  assert saved['loss']['class_weighting'] == 'median_frequency'

  # --mode=eval with the same 'auto' config scores at the size training chose: every pixel once.
  result = cli.evaluate_checkpoint(_config(tmp_path, **overrides), str(workdir), checkpoint='latest')
  assert np.asarray(result['confusion_matrix']).sum() == sum(h * w for h, w in VAL_SIZES) - 3 * len(VAL_SIZES)
  # A workdir that never trained has no choice to reuse.
  with pytest.raises(ConfigError, match=re.escape("config.input.crop_size='auto' is chosen by training")):
    recipe.settle(settings_lib.from_config(_config(tmp_path, **overrides)),
                  startup.trained_settings(str(tmp_path / 'elsewhere')), str(tmp_path / 'elsewhere' / 'config.json'))
