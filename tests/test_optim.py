"""AdamW and the moving average of the weights (EMA): AdamW's updates against numpy, the EMA over real train
steps against numpy, and evaluation, prediction and export with the averaged weights. (Exact resume of the
AdamW + EMA state, the richest there is, after a SIGTERM and a kill -9 mid-save: tests/test_faults.py.)"""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default
from jaxseg import evaluate
from jaxseg import optim
from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg import train
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.data.datasets import DatasetSpec
from jaxseg.errors import ConfigError
from tests.conftest import tiny_unet_config
from tests.helpers import load_checkpoint, max_abs_diff

NUM_CLASSES = 4
SPEC = DatasetSpec(name='test', num_classes=NUM_CLASSES, class_names=tuple('abcd'), ignore_label=255,
                   image_key='image', label_key='label', label_offset=0, ignore_values=(), train_split='train',
                   eval_split='validation')


# ---------------------------------------------------------------------------
# AdamW against a hand-written numpy Adam with decoupled weight decay.
# ---------------------------------------------------------------------------


def _tree(rng):
  return {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)), 'bias': rng.normal(size=(4,))},
          'norm': {'scale': rng.normal(size=(4,)) + 1.0},
          'dense': {'kernel': rng.normal(size=(5, 3))}}


# (schedule fields, num_train_steps, the learning rates at steps 0 and 1 worked out by hand).
BASE_LR = 0.1
SCHEDULES = [
    ({'schedule': 'cosine', 'warmup_steps': 0}, 10, [BASE_LR, BASE_LR * 0.5 * (1 + math.cos(math.pi / 10))]),
    ({'schedule': 'constant', 'warmup_steps': 4}, 10, [0.0, BASE_LR / 4]),  # Linear warmup from 0.
    ({'schedule': 'poly', 'warmup_steps': 0, 'poly_power': 2.0}, 10, [BASE_LR, BASE_LR * 0.9 ** 2]),
]


@pytest.mark.parametrize('fields, num_steps, lrs', SCHEDULES)
def test_adamw_first_two_updates_match_numpy(fields, num_steps, lrs):
  """Bias-corrected Adam moments, then param -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * param) on kernels only."""
  b1, b2, eps, wd = 0.8, 0.95, 1e-3, 0.05  # Not optax's defaults: the config's fields must reach the optimiser.
  config = default.get_config()
  config.optimizer.update(name='adamw', learning_rate=BASE_LR, b1=b1, b2=b2, eps=eps, weight_decay=wd, **fields)
  settings = settings_lib.from_config(config)
  rng = np.random.default_rng(0)
  params = _tree(rng)
  # The default parameter-group rules (no weight decay on biases and norm scales), as training builds them.
  tx = optim.create_optimizer(settings.optimizer, optim.create_learning_rate_schedule(settings.optimizer, num_steps),
                              settings.param_rules, params)
  grads = [_tree(rng), _tree(rng)]
  to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  got = to32(params)
  opt_state = tx.init(got)
  got_after = []
  for g in grads:
    updates, opt_state = tx.update(to32(g), opt_state, got)
    got = jax.tree.map(lambda p, u: p + u, got, updates)
    got_after.append(jax.device_get(got))

  # The reference, leaf by leaf in float64.
  decayed = lambda path: path[-1] == 'kernel'  # The kernels: ndim > 1 in _tree.
  flat = {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  m = {k: np.zeros_like(x) for k, x in flat.items()}
  v = {k: np.zeros_like(x) for k, x in flat.items()}
  p = dict(flat)
  for t, (g_tree, lr) in enumerate(zip(grads, lrs), start=1):
    g_flat = {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(g_tree)[0]}
    for k in p:
      g = g_flat[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1 ** t)
      v_hat = v[k] / (1 - b2 ** t)
      step = m_hat / (np.sqrt(v_hat) + eps) + (wd * p[k] if decayed(k) else 0.0)
      p[k] = p[k] - lr * step
    for k, expected in p.items():
      actual = got_after[t - 1]
      for name in k:
        actual = actual[name]
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=f'{k} after update {t}')
  # The updates moved every leaf where the learning rate was not 0 (not a comparison of two untouched trees).
  assert max_abs_diff(got_after[-1], params) > 1e-3


@pytest.mark.parametrize('field, value, message', [
    ('optimizer.name', 'adam', "config.optimizer.name must be one of ('sgd', 'adamw'), got 'adam'"),
    ('optimizer.schedule', 'step',
     "config.optimizer.schedule must be one of ('constant', 'cosine', 'poly'), got 'step'"),
    ('optimizer.b1', 1.0, 'config.optimizer.b1 must be a number in [0, 1)'),
    ('optimizer.b2', -0.1, 'config.optimizer.b2 must be a number in [0, 1)'),
    ('optimizer.eps', 0.0, 'config.optimizer.eps must be a number in (0, inf)'),
    ('optimizer.weight_decay', -1e-4, 'config.optimizer.weight_decay must be a number in [0, inf)'),
    ('ema_decay', 1.0, 'config.ema_decay must be a number in [0, 1)'),
    ('ema_decay', -0.5, 'config.ema_decay must be a number in [0, 1)'),
])
def test_bad_optimizer_and_ema_values_name_the_field(field, value, message):
  config = default.get_config()
  config.optimizer.name = 'adamw'
  *path, last = field.split('.')
  target = config
  for p in path:
    target = target[p]
  target[last] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    settings_lib.from_config(config)


# ---------------------------------------------------------------------------
# The EMA over real train steps.
# ---------------------------------------------------------------------------


def _batches(n, batch=8, size=32, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    labels = rng.randint(0, NUM_CLASSES, (batch, size, size)).astype(np.uint8)
    labels[:, :4] = 255
    out.append({'image': rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8), 'label': labels})
  return out


def test_ema_after_real_train_steps_matches_numpy(tmp_path, monkeypatch):
  """FSDP over 4 devices, AdamW: the averages are split like the parameters, and after each step equal
  d_t * ema + (1 - d_t) * new, d_t = min(decay, (1 + t) / (10 + t)), recomputed in numpy from the
  parameters and statistics fetched after each step."""
  decay = 0.2  # Reached at t = 2: the steps cover the warm-up (0.1, 0.18) and the plain decay.
  config = tiny_unet_config(str(tmp_path), **{
      'ema_decay': decay, 'optimizer.name': 'adamw', 'optimizer.learning_rate': 0.01,
      'optimizer.warmup_steps': 0, 'sharding': 'fsdp'})
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 256)  # Split even the tiny model's kernels.
  mesh = sharding.make_mesh(jax.devices()[:4])
  settings = settings_lib.from_config(config)
  setup = state_lib.build(settings, NUM_CLASSES, mesh)
  assert isinstance(setup.abstract_state, state_lib.EmaTrainState)
  specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)
  assert specs(setup.state_sharding.ema_params) == specs(setup.state_sharding.params)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(setup.state_sharding.ema_params))

  step_fn = train.make_train_step(settings, SPEC, setup, class_weights=None)
  state = setup.init_state()
  host = jax.device_get(state)
  assert max_abs_diff(host.ema_params, host.params) == 0.0  # The average starts at the initial weights.
  ema = jax.tree.map(lambda x: np.asarray(x, np.float64), (host.params, host.batch_stats))
  for t, batch in enumerate(_batches(3)):
    state, _ = step_fn(state, sharding.global_batch(batch, mesh))
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(state.ema_params),
                                                           jax.tree.leaves(state.params)))
    host = jax.device_get(state)  # Before the next step donates these buffers.
    d = min(decay, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, x: d * e + (1 - d) * np.asarray(x, np.float64), ema,
                       (host.params, host.batch_stats))
    assert max_abs_diff(host.ema_params, ema[0]) < 1e-6, t
    assert max_abs_diff(host.ema_batch_stats, ema[1]) < 1e-6, t
  assert max_abs_diff(host.ema_params, host.params) > 1e-4  # The average lags the weights.
  assert int(host.step) == 3


# ---------------------------------------------------------------------------
# A short AdamW + EMA run. (Exact resume of this state after a SIGTERM and a kill -9 mid-save:
# tests/test_faults.py.)
# ---------------------------------------------------------------------------

OVERRIDES = {'num_train_steps': 6, 'checkpoint_every_steps': 2, 'eval_every_steps': 6, 'log_every_steps': 3,
             'optimizer.name': 'adamw', 'optimizer.learning_rate': 0.01, 'ema_decay': 0.3}


@pytest.fixture(scope='module')
def averaged_run(shapes_data_dir, tmp_path_factory):
  """6 steps of AdamW + EMA (in this process, on its 4 devices): (workdir, raw checkpoint of step 6)."""
  workdir = tmp_path_factory.mktemp('ema_run')
  train.train_and_evaluate(tiny_unet_config(shapes_data_dir, **OVERRIDES), str(workdir))
  raw, step = load_checkpoint(workdir)
  assert step == 6
  assert max_abs_diff(raw['ema_params'], raw['params']) > 1e-4  # The average is not the weights.
  assert max_abs_diff(raw['params'], load_checkpoint(workdir, step=4)[0]['params']) > 1e-4  # Training moved.
  return workdir, raw


# ---------------------------------------------------------------------------
# Evaluation, prediction and export use the averaged weights.
# ---------------------------------------------------------------------------


def _bare_logits(config, variables, images):
  """The bare Flax module applied to `variables` (no jaxseg step, Predictor or restore)."""
  from jaxseg import models  # pylint: disable=g-import-not-at-top
  model = state_lib.build_model(settings_lib.from_config(config), NUM_CLASSES)
  return np.asarray(model.apply(variables, models.normalize_images(jnp.asarray(images), jnp.float32), train=False))


def test_the_evaluator_scores_the_averaged_weights(tmp_path):
  """Same confusion matrix as the plain state holding the averages as its weights, another than the live
  weights'; over the eval step's batches and the larger image the Predictor segments at full size."""
  root = tmp_path / 'ds'
  rng = np.random.default_rng(0)
  for split, sizes in (('train', [(24, 24)] * 2), ('val', [(24, 24), (16, 20), (40, 18)])):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / 'images' / f'{i}.png')
      Image.fromarray(rng.integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)).save(root / split / 'masks' / f'{i}.png')
  overrides = {'dataset.name': 'folder', 'dataset.path': str(root), 'dataset.num_classes': NUM_CLASSES,
               'input.eval_size': (24, 24), 'eval_batch_size': 4}
  settings = settings_lib.from_config(tiny_unet_config(str(tmp_path / 'tfds'), ema_decay=0.99, **overrides))
  plain_settings = settings_lib.from_config(tiny_unet_config(str(tmp_path / 'tfds'), **overrides))
  spec, builder = datasets.open_dataset(settings.dataset)
  eval_data = pipeline.eval_dataset(builder, spec, settings.input, global_batch=4, process_index=0, process_count=1,
                                    cache=False)
  mesh = sharding.make_mesh()
  setup = state_lib.build(settings, NUM_CLASSES, mesh)
  host = jax.device_get(setup.init_state())
  # Averages and live weights that predict differently: the live ones perturbed, statistics apart.
  noise = np.random.default_rng(1)
  live_params = jax.tree.map(lambda x: x + 0.5 * noise.normal(size=x.shape).astype(x.dtype), host.params)
  live_stats = jax.tree.map(lambda x: x + 0.3, host.batch_stats)
  ema_stats = jax.tree.map(lambda x: x + 0.1, host.batch_stats)
  ema_state = host.replace(params=live_params, batch_stats=live_stats, ema_batch_stats=ema_stats)
  got, _ = evaluate.Evaluator(spec, setup, settings.inference_options()).run(ema_state, eval_data)

  plain_setup = state_lib.build(plain_settings, NUM_CLASSES, mesh)
  plain = jax.device_get(plain_setup.init_state())
  plain_evaluator = evaluate.Evaluator(spec, plain_setup, plain_settings.inference_options())
  with_averages, _ = plain_evaluator.run(plain.replace(params=host.ema_params, batch_stats=ema_stats), eval_data)
  with_live, _ = plain_evaluator.run(plain.replace(params=live_params, batch_stats=live_stats), eval_data)

  confusion = np.asarray(got['confusion_matrix'])
  assert confusion.sum() == 24 * 24 + 16 * 20 + 40 * 18  # Every pixel, the large image's included.
  np.testing.assert_array_equal(confusion, np.asarray(with_averages['confusion_matrix']))
  assert got['mean_iou'] == with_averages['mean_iou']
  assert got['loss'] == pytest.approx(with_averages['loss'], rel=1e-6)
  assert np.abs(confusion - np.asarray(with_live['confusion_matrix'])).sum() > 0.05 * confusion.sum()


def test_predict_and_export_use_the_averaged_weights(shapes_data_dir, averaged_run, tmp_path):
  """load_predictor (--mode=predict, jaxseg.api) and the export compute the bare module on the checkpoint's
  raw averages; an eval config without the EMA is refused with a message naming the field."""
  from jaxseg import export, inference  # pylint: disable=g-import-not-at-top
  workdir, raw = averaged_run
  config = tiny_unet_config(shapes_data_dir, **OVERRIDES)
  config.export.formats = 'jax,onnx'
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
  averaged = _bare_logits(config, {'params': raw['ema_params'], 'batch_stats': raw['ema_batch_stats']}, images)
  live = _bare_logits(config, {'params': raw['params'], 'batch_stats': raw['batch_stats']}, images)
  assert np.abs(averaged - live).max() > 1e-3

  predictor, _, step = inference.load_predictor(config, str(workdir), checkpoint='latest', mode='whole')
  assert step == 6
  np.testing.assert_allclose(np.stack([predictor.scores(i) for i in images]), averaged, atol=1e-4)

  out = export.export_model(config, str(workdir), checkpoint='latest', output_dir=str(tmp_path / 'export'))
  np.testing.assert_allclose(export.load(out)(images)['logits'], averaged, atol=1e-4)
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(os.path.join(out, 'model.onnx'), providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(session.run(['logits'], {'images': images})[0], averaged, atol=1e-4)

  no_ema = tiny_unet_config(shapes_data_dir, **dict(OVERRIDES, ema_decay=0.0))
  with pytest.raises(ConfigError, match=re.escape('ema_decay > 0: False here, True in training')):
    inference.load_predictor(no_ema, str(workdir), checkpoint='latest')
