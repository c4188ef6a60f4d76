"""Loss and metrics against plain numpy, the ignore label included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses
from jaxseg import metrics

IGNORE = 255


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels, weights=None):
  """Mean over valid pixels of w * ce divided by the sum of w (PyTorch's weighted mean)."""
  lsm = np_log_softmax(logits.astype(np.float64))
  num = den = 0.0
  for idx in np.ndindex(labels.shape):
    c = labels[idx]
    if c == IGNORE:
      continue
    w = 1.0 if weights is None else weights[c]
    num += -lsm[idx + (c,)] * w
    den += w
  return num / den


def random_case(seed, shape=(2, 5, 6), k=4, ignore_frac=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (k,)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=shape)
  labels[rng.random(shape) < ignore_frac] = IGNORE
  return logits, labels


@pytest.mark.parametrize('weights', [None, (0.5, 2.0, 1.0, 3.0)])
def test_cross_entropy_matches_numpy(weights):
  logits, labels = random_case(0)
  s, w = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(labels), ignore_label=IGNORE,
                                   class_weights=weights)
  np.testing.assert_allclose(float(s / w), np_cross_entropy(logits, labels, weights), rtol=1e-5)


def test_ignored_pixels_do_not_change_the_loss():
  logits, labels = random_case(1)
  s1, w1 = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(labels), ignore_label=IGNORE)
  logits2 = logits.copy()
  logits2[labels == IGNORE] = 1e6  # Garbage where nothing counts.
  s2, w2 = losses.cross_entropy_sums(jnp.asarray(logits2), jnp.asarray(labels), ignore_label=IGNORE)
  assert float(w1) == float(w2) == float((labels != IGNORE).sum())
  np.testing.assert_allclose(float(s1), float(s2), rtol=1e-6)


def np_confusion(labels, preds, k):
  cm = np.zeros((k, k), np.int64)
  for l, p in zip(labels.ravel(), preds.ravel()):
    if l != IGNORE:
      cm[l, p] += 1
  return cm


def test_confusion_matrix_and_iou_match_numpy():
  rng = np.random.default_rng(3)
  k = 5
  labels = rng.integers(0, k - 1, size=(3, 17, 19))  # Class 4 never in the labels...
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  preds = rng.integers(0, k - 1, size=labels.shape)  # ...nor predicted: IoU NaN, left out of the mean.
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), k, IGNORE))
  np.testing.assert_array_equal(cm, np_confusion(labels, preds, k))
  result = metrics.metrics_from_confusion(cm)
  ious, accs = [], []
  for c in range(k - 1):
    tp = np.sum((labels == c) & (preds == c))
    fp = np.sum((labels != c) & (labels != IGNORE) & (preds == c))
    fn = np.sum((labels == c) & (preds != c))
    ious.append(tp / (tp + fp + fn))
    accs.append(tp / np.sum(labels == c))
  valid = labels != IGNORE
  np.testing.assert_allclose(result['per_class_iou'][:k - 1], ious)
  assert result['per_class_iou'][k - 1] is None
  np.testing.assert_allclose(result['mean_iou'], np.mean(ious))
  np.testing.assert_allclose(result['pixel_accuracy'], np.mean(labels[valid] == preds[valid]))
  np.testing.assert_allclose(result['mean_class_accuracy'], np.mean(accs))


def test_binary_task_reports_foreground_iou_and_dice():
  labels = np.array([[0, 1, 1, 1, IGNORE]])
  preds = np.array([[1, 1, 1, 0, 1]])
  result = metrics.metrics_from_confusion(np.asarray(metrics.confusion_matrix(labels, preds, 2, IGNORE)))
  # Foreground: tp=2, fp=1, fn=1.
  assert result['foreground_iou'] == pytest.approx(2 / 4)
  assert result['foreground_dice'] == pytest.approx(4 / 6)


def test_train_step_loss_is_the_mean_over_the_global_batch_not_a_mean_of_device_means():
  """Devices with very different numbers of valid pixels: the loss weighs every pixel equally."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxseg import models, settings, sharding, train  # pylint: disable=g-import-not-at-top
  from jaxseg import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data.datasets import DatasetSpec  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  n_dev = jax.local_device_count()
  assert n_dev == 4, 'tests run with 4 simulated devices (tests/conftest.py)'
  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(name='unet', base_width=4, depth=1, norm='none',
                                                 upsample='transpose'))
  spec = DatasetSpec(name='t', num_classes=3, class_names=('a', 'b', 'c'), ignore_label=IGNORE, image_key='image',
                     label_key='segmentation_mask', label_offset=0, ignore_values=(), train_split='train',
                     eval_split='validation')
  config.input.crop_size = (8, 8)
  mesh = sharding.make_mesh()
  run_settings = settings.from_config(config)
  setup = state_lib.build(run_settings, 3, mesh)
  state = setup.init_state()
  step = train.make_train_step(run_settings, spec, setup, None)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n_dev, 2, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, size=(n_dev, 2, 8, 8)).astype(np.uint8)
  labels[0, :, :, :7] = IGNORE  # Device 0: few valid pixels; the others: all valid.
  # Reference: the same model applied to the global batch on the host.
  variables = {'params': jax.device_get(state.params)}
  logits = setup.model.apply(variables, models.normalize_images(jnp.asarray(images.reshape(-1, 8, 8, 3)),
                                                                   jnp.float32))
  expected = np_cross_entropy(np.asarray(logits), labels.reshape(-1, 8, 8).astype(np.int64))
  # Row block d of the global batch lands on device d.
  batch = sharding.global_batch({'image': images.reshape(-1, 8, 8, 3), 'label': labels.reshape(-1, 8, 8)}, mesh)
  _, step_metrics = step(state, batch)
  np.testing.assert_allclose(float(step_metrics['loss']), expected, rtol=1e-5)
