"""Class imbalance: median-frequency weights, recipe.class_weights, the global Dice loss, binary tasks."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxseg import losses
from jaxseg import recipe
from jaxseg import settings as settings_lib
from jaxseg import train
from jaxseg.errors import ConfigError
from tests.conftest import tiny_unet_config
from tests.helpers import best_checkpoint_logits_fn
from tests.test_losses_metrics import np_cross_entropy, np_log_softmax

IGNORE = 255


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def write_folder_dataset(root, masks_by_split, seed=0):
  """Writes DIR/{train,val}/{images,masks} with random RGB images for the given uint8 masks."""
  rng = np.random.default_rng(seed)
  for split, masks in masks_by_split.items():
    os.makedirs(root / split / 'images', exist_ok=True)
    os.makedirs(root / split / 'masks', exist_ok=True)
    for i, mask in enumerate(masks):
      image = rng.integers(0, 256, size=mask.shape + (3,), dtype=np.uint8)
      image[mask == 1] //= 4  # Foreground darker: a binary task a few steps can start on.
      Image.fromarray(image).save(root / split / 'images' / f'{i:03d}.png')
      Image.fromarray(mask.astype(np.uint8)).save(root / split / 'masks' / f'{i:03d}.png')
  return str(root)


def folder_config(path, data_dir, num_classes, **loss):
  """configs/default.py's config on a folder dataset, with these config.loss fields."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.update({'name': 'folder', 'path': path, 'num_classes': num_classes, 'data_dir': data_dir,
                         'ignore_label': IGNORE})
  config.loss.update({'class_weights': None, 'class_weighting': 'none', **loss})
  return config


def np_soft_dice(logits, labels, k, smooth=1.0, classes=None):
  """1 - mean over classes of (2 I + s) / (C + s), with I and C summed over every valid pixel of the batch."""
  probs = np.exp(np_log_softmax(logits.astype(np.float64)))
  valid = labels != IGNORE
  onehot = np.eye(k)[np.where(valid, labels, 0)] * valid[..., None]
  probs = probs * valid[..., None]
  axes = tuple(range(labels.ndim))
  inter = (probs * onehot).sum(axes)
  card = (probs + onehot).sum(axes)
  dice = (2 * inter + smooth) / (card + smooth)
  if classes is not None:
    dice = dice[list(classes)]
  return 1.0 - dice.mean()


# ---------------------------------------------------------------------------
# (a) Median-frequency weights.
# ---------------------------------------------------------------------------


def test_median_frequency_weights_by_hand():
  """Eigen & Fergus: f_c = pixels of c / pixels of the images where c appears; w_c = median(f) / f_c."""
  counts = np.array([600, 0, 50, 100, 20])
  present = np.array([1000, 0, 200, 400, 100])  # Valid pixels of the images holding each class.
  # f = (0.6, -, 0.25, 0.25, 0.2); median of the present classes' f: (0.25 + 0.25) / 2 = 0.25.
  weights = recipe.median_frequency_weights(counts, present)
  np.testing.assert_allclose(weights, [0.25 / 0.6, 0.0, 1.0, 1.0, 1.25], rtol=1e-12)
  assert weights[1] == 0.0  # Absent class: weight 0, not inf or nan.


def test_median_frequency_weights_even_median_and_nothing_present():
  # f = (0.5, 0.1, 0.2, 0.4); median (0.2 + 0.4) / 2 = 0.3.
  np.testing.assert_allclose(recipe.median_frequency_weights([50, 10, 20, 40], [100, 100, 100, 100]),
                             [0.6, 3.0, 1.5, 0.75])
  with warnings.catch_warnings():  # numpy warns about the median of no classes; the weights are still 0.
    warnings.simplefilter('ignore', RuntimeWarning)
    np.testing.assert_array_equal(recipe.median_frequency_weights([0, 0, 0], [0, 0, 0]), [0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------
# (b) recipe.class_weights.
# ---------------------------------------------------------------------------


def test_resolve_class_weights_from_the_config():
  from jaxseg.data.datasets import DatasetSpec  # pylint: disable=g-import-not-at-top
  spec = DatasetSpec(name='t', num_classes=3, class_names=('a', 'b', 'c'), ignore_label=IGNORE,
                     image_key='image', label_key='segmentation_mask', label_offset=0, ignore_values=(),
                     train_split='train', eval_split='validation')
  config = folder_config('unused', 'unused', 3, class_weights=(1, 2.5, 0.5))
  assert recipe.class_weights(settings_lib.from_config(config), spec, builder=None) == (1.0, 2.5, 0.5)
  config.loss.class_weights = (1.0, 2.0)
  with pytest.raises(ConfigError, match=r'config\.loss\.class_weights has 2 values; num_classes is 3'):
    settings_lib.from_config(config)  # The config is checked once, before any work.
  config.loss.class_weights = None
  assert recipe.class_weights(settings_lib.from_config(config), spec, builder=None) is None


def test_median_frequency_weights_from_a_folder_dataset(tmp_path):
  from jaxseg.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  masks = []
  # Unbalanced: class 0 everywhere, 1 in two images, 2 in one, 3 never; ignore pixels must not count.
  for (h, w), p in (((20, 24), [0.7, 0.2, 0.05, 0.05]), ((17, 30), [0.6, 0.35, 0.0, 0.05]),
                    ((32, 16), [0.9, 0.0, 0.0, 0.1])):
    masks.append(rng.choice([0, 1, 2, IGNORE], size=(h, w), p=p).astype(np.uint8))
  path = write_folder_dataset(tmp_path / 'data', {'train': masks, 'val': masks[:1]})
  config = folder_config(path, str(tmp_path / 'tfds'), 4, class_weighting='median_frequency')
  spec, builder = datasets.open_dataset(config.dataset)

  # Numpy reference: per class, its pixels and the valid pixels of the images it appears in.
  counts = np.zeros(4, np.int64)
  present = np.zeros(4, np.int64)
  for mask in masks:
    per_image = np.bincount(mask[mask != IGNORE], minlength=4)
    counts += per_image
    present += np.where(per_image > 0, per_image.sum(), 0)
  assert counts[3] == 0 and counts[2] > 0 and present[2] < present[1] < present[0]
  stats = pipeline.split_statistics(builder, spec, spec.train_split)
  np.testing.assert_array_equal(stats.class_pixels, counts)
  np.testing.assert_array_equal(stats.present_pixels, present)

  weights = recipe.class_weights(settings_lib.from_config(config), spec, builder)
  freq = counts[:3] / present[:3]
  median = np.median(freq)  # Of the present classes only.
  np.testing.assert_allclose(weights, [median / freq[0], median / freq[1], median / freq[2], 0.0], rtol=1e-6)
  assert weights[2] > weights[1] > weights[0]  # Rarer classes weigh more.

  # Weights given in the config win over the computed ones.
  config.loss.class_weights = (1.0, 1.0, 1.0, 1.0)
  assert recipe.class_weights(settings_lib.from_config(config), spec, builder) == (1.0, 1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------
# (c) The Dice loss in the train step is the global Dice.
# ---------------------------------------------------------------------------


def _tiny_step_setup(num_classes, dice_weight):
  from jaxseg import sharding  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data.datasets import DatasetSpec  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(name='unet', base_width=4, depth=1, norm='none',
                                                 upsample='transpose'))
  config.loss.terms = f'cross_entropy:1,dice:{dice_weight}'
  # Plain gradient descent with lr 1 from step 0: the parameter change after one step is minus the gradient.
  config.optimizer.update(dict(learning_rate=1.0, momentum=0.0, weight_decay=0.0, schedule='constant',
                               warmup_steps=0))
  spec = DatasetSpec(name='t', num_classes=num_classes, class_names=tuple(f'c{i}' for i in range(num_classes)),
                     ignore_label=IGNORE, image_key='image', label_key='segmentation_mask', label_offset=0,
                     ignore_values=(), train_split='train', eval_split='validation')
  config.input.crop_size = (8, 8)
  settings = settings_lib.from_config(config)
  setup = state_lib.build(settings, num_classes, sharding.make_mesh())
  return settings, spec, setup


def _skewed_batch(num_classes, n_dev):
  """Per device 2 images 8x8; every device sees different classes, in different amounts, some pixels ignored."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(n_dev, 2, 8, 8, 3), dtype=np.uint8)
  labels = np.zeros((n_dev, 2, 8, 8), np.uint8)  # Device 0: background only.
  labels[1, :, 2:6, 2:6] = 1  # Device 1: a small foreground square.
  labels[2] = rng.integers(0, num_classes, size=(2, 8, 8))  # Device 2: every class, evenly.
  labels[3] = num_classes - 1  # Device 3: the last class only, half of it ignored.
  labels[3, :, :, :4] = IGNORE
  labels[0, 0, 0, :] = IGNORE
  return images, labels


@pytest.mark.parametrize('num_classes', [3, 2])
def test_train_step_dice_is_the_global_dice_and_its_gradient(num_classes):
  """4 devices with different class content: loss and gradient are those of the Dice over the whole batch.

  A mean of per-device Dice losses would differ (checked below), so the test tells the two apart. For a
  binary task only the foreground class counts in the Dice.
  """
  from jaxseg import sharding  # pylint: disable=g-import-not-at-top
  from jaxseg import models  # pylint: disable=g-import-not-at-top

  n_dev = jax.local_device_count()
  assert n_dev == 4, 'tests run with 4 simulated devices (tests/conftest.py)'
  dice_weight = 0.7
  settings, spec, setup = _tiny_step_setup(num_classes, dice_weight)
  model = setup.model
  state = setup.init_state()
  images, labels = _skewed_batch(num_classes, n_dev)
  classes = (1,) if num_classes == 2 else None
  flat_images = models.normalize_images(jnp.asarray(images.reshape(-1, 8, 8, 3)), jnp.float32)
  flat_labels = labels.reshape(-1, 8, 8).astype(np.int64)

  # Reference on one device (no mesh): the model's logits for the whole batch, and jax.grad of the global
  # loss, with and without its Dice term; one jit so that it compiles once.
  def global_loss(params, weight):
    out = model.apply({'params': params}, flat_images)
    return losses.combined_loss(out, jnp.asarray(flat_labels), (('cross_entropy', 1.0), ('dice', weight)),
                                multilabel=False, ignore_label=IGNORE)

  @jax.jit
  def reference(params):
    logits = model.apply({'params': params}, flat_images)
    return (logits, jax.value_and_grad(global_loss)(params, dice_weight),
            jax.grad(global_loss)(params, 0.0))

  logits, (ref_loss, ref_grads), ce_grads = jax.device_get(reference(jax.device_get(state.params)))
  ce = np_cross_entropy(logits, flat_labels)
  dice = np_soft_dice(logits, flat_labels, num_classes, classes=classes)
  per_device_dice = np.mean([np_soft_dice(l, y, num_classes, classes=classes)
                             for l, y in zip(logits.reshape(n_dev, -1, 8, 8, num_classes),
                                             flat_labels.reshape(n_dev, -1, 8, 8))])
  assert abs(per_device_dice - dice) > 1e-2, 'the batch does not tell global from per-device Dice'
  np.testing.assert_allclose(float(ref_loss), ce + dice_weight * dice, rtol=1e-5)

  step = train.make_train_step(settings, spec, setup, None)
  old_params = jax.device_get(state.params)
  # Row block d of the global batch lands on device d: each device holds different class content.
  batch = sharding.global_batch({'image': images.reshape(-1, 8, 8, 3), 'label': labels.reshape(-1, 8, 8)},
                                setup.mesh)
  new_state, step_metrics = step(state, batch)
  reported = float(step_metrics['loss'])
  np.testing.assert_allclose(reported - ce, dice_weight * dice, rtol=1e-4, atol=1e-6)

  # lr 1, no momentum or weight decay: old - new = the gradient the step applied.
  new_params = jax.device_get(new_state.params)
  step_grads = jax.tree.map(lambda o, n: np.asarray(o, np.float64) - np.asarray(n, np.float64),
                            old_params, new_params)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  for got, want in zip(jax.tree.leaves(step_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-3, atol=1e-5 * scale)

  # The Dice term matters in the gradient compared (cross-entropy alone gives a clearly different one).
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(ce_grads), jax.tree.leaves(ref_grads)))
  assert diff > 100 * 1e-5 * scale


# ---------------------------------------------------------------------------
# (d) A binary task end to end.
# ---------------------------------------------------------------------------


def test_binary_folder_task_trains_with_dice_and_reports_foreground_metrics(tmp_path):
  rng = np.random.default_rng(2)

  def binary_mask(h, w):
    mask = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y:y + h // 3, x:x + w // 3] = 1  # A small foreground: the imbalance Dice is for.
    mask[y:y + h // 3, x + w // 3] = IGNORE  # A boundary band, as real datasets have.
    return mask

  train_masks = [binary_mask(int(rng.integers(36, 48)), int(rng.integers(36, 48))) for _ in range(8)]
  val_masks = [binary_mask(40, 44) for _ in range(3)]
  path = write_folder_dataset(tmp_path / 'data', {'train': train_masks, 'val': val_masks})
  config = tiny_unet_config(str(tmp_path / 'tfds'), **{
      'dataset.name': 'folder', 'dataset.path': path, 'dataset.num_classes': 2, 'loss.terms': 'cross_entropy:1,dice:0.5',
      'loss.class_weighting': 'median_frequency', 'input.eval_size': (48, 48), 'eval_batch_size': 4,
      'num_train_steps': 3, 'log_every_steps': 3, 'eval_every_steps': 3, 'checkpoint_every_steps': 3,
      'optimizer.warmup_steps': 1})
  workdir = tmp_path / 'work'
  with jax.default_prng_impl('rbg'):  # XLA:CPU compiles threefry initialisers several times slower.
    result = train.train_and_evaluate(config, str(workdir))

  # Reference: the checkpoint's raw arrays applied by the bare Flax module to the validation images, padded
  # at the bottom/right to input.eval_size as evaluation pads them; foreground counts by hand.
  logits_fn = best_checkpoint_logits_fn(config, str(workdir))
  images = [np.asarray(Image.open(tmp_path / 'data' / 'val' / 'images' / f'{i:03d}.png')) for i in range(3)]
  padded = np.zeros((3, 48, 48, 3), np.uint8)
  for i, image in enumerate(images):
    padded[i, :image.shape[0], :image.shape[1]] = image
  preds = logits_fn(padded).argmax(-1)[:, :40, :44]
  labels = np.stack(val_masks)
  valid = labels != IGNORE
  tp = int(np.sum(valid & (labels == 1) & (preds == 1)))
  fp = int(np.sum(valid & (labels == 0) & (preds == 1)))
  fn = int(np.sum(valid & (labels == 1) & (preds == 0)))
  print(f'foreground: tp {tp}, fp {fp}, fn {fn}; reported IoU {result["foreground_iou"]}, '
        f'Dice {result["foreground_dice"]}')
  assert tp > 0 and fp + fn > 0, 'the model should predict some foreground, not all of it right'
  iou, dice = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)
  assert result['foreground_iou'] == pytest.approx(iou, abs=1e-3)
  assert result['foreground_dice'] == pytest.approx(dice, abs=1e-3)

  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl', encoding='utf-8')]
  evals = [l for l in lines if l['split'] == 'eval']
  trains = [l for l in lines if l['split'] == 'train']
  assert [e['step'] for e in evals] == [3] and [t['step'] for t in trains] == [3]
  assert len(evals[0]['per_class_iou']) == 2
  assert all(np.isfinite(t['loss']) for t in trains)
  assert evals[0]['foreground_iou'] == pytest.approx(iou, abs=1e-3)
  assert evals[0]['foreground_dice'] == pytest.approx(dice, abs=1e-3)
