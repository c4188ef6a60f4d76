"""Fine-tuning controls (config.finetune, jaxseg/finetune.py) on a toy model with an `encoder` submodule.

References: the encoder's updates after real train steps against the update worked out by hand from a plain
`jax.grad` of the loss (normalisation and cross-entropy written out here); the optimiser against optax
transformations built directly; adapt_first_conv against hand-computed arrays and a convolution identity; the
optimiser state of models without an encoder against the optax chain they had before fine-tuning existed.
"""

import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from jaxseg import checkpoint as checkpoint_lib
from jaxseg import config_utils
from jaxseg import finetune
from jaxseg import models
from jaxseg import optim
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg import train
from jaxseg.data.datasets import DatasetSpec
from jaxseg.errors import ConfigError
from tests.conftest import tiny_unet_config

K = 3
SPEC = DatasetSpec(name='test', num_classes=K, class_names=tuple('abc'), ignore_label=255, image_key='image',
                   label_key='label', label_offset=0, ignore_values=(), train_split='train', eval_split='validation')
# ImageNet statistics (0-255 units) written out: the reference normalises by hand.
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
BASE_LR = 0.1


# ---------------------------------------------------------------------------
# Toy models: an encoder (conv + BatchNorm) and a head (conv + BatchNorm + classifier).
# ---------------------------------------------------------------------------


class ToyEncoder(nn.Module):
  frozen_bn: bool = False  # Normalise with the running averages in training too.

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3), use_bias=False, name='conv')(x)  # Before BatchNorm a bias has no gradient.
    x = nn.BatchNorm(use_running_average=not train or self.frozen_bn, momentum=0.9, name='bn')(x)
    return nn.relu(x)


class ToyNet(nn.Module):
  """A model with a pretrained encoder as jaxseg's convention has it: the submodule `encoder`, a `frozen_bn` field."""
  num_classes: int
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  honour_frozen_bn: bool = True  # False: the encoder ignores frozen_bn (to test the train step's side alone).

  @nn.compact
  def __call__(self, x, train=False):
    x = ToyEncoder(frozen_bn=self.frozen_bn and self.honour_frozen_bn, name='encoder')(x, train)
    x = nn.Conv(4, (3, 3), use_bias=False, name='head_conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='head_bn')(x)
    return nn.Conv(self.num_classes, (1, 1), name='classifier')(nn.relu(x))


class ToyNetStatsOnly(ToyNet):
  honour_frozen_bn: bool = False


class ToyNetWithoutFrozenBN(nn.Module):
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(self.num_classes, (1, 1), name='head')(ToyEncoder(name='encoder')(x, train))


@pytest.fixture(autouse=True)
def toy_models(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'toy', (ToyNet, ()))
  monkeypatch.setitem(models.MODELS, 'toy_stats_only', (ToyNetStatsOnly, ()))
  monkeypatch.setitem(models.MODELS, 'toy_no_frozen_bn', (ToyNetWithoutFrozenBN, ()))


def toy_config(model='toy', optimizer=None, **finetune_fields):
  config = default.get_config()
  config.model = ml_collections.ConfigDict({'name': model})
  config.input.crop_size = (8, 8)
  config.batch_size = 4
  config.num_train_steps = 10
  config.optimizer.update(name='sgd', learning_rate=BASE_LR, momentum=0.9, weight_decay=0.01, schedule='constant',
                          warmup_steps=0)
  config.optimizer.update(**(optimizer or {}))
  config.finetune.update(**finetune_fields)
  return config


def batches(n, seed=0):
  rng = np.random.RandomState(seed)
  return [{'image': rng.randint(0, 256, (4, 8, 8, 3)).astype(np.uint8),
           'label': rng.randint(0, K, (4, 8, 8)).astype(np.uint8)} for _ in range(n)]


def run_steps(config, n):
  """The host copies of the state before and after each of n real train steps (make_train_step, 4 devices)."""
  setup = state_lib.build(config, K, sharding.make_mesh())
  step_fn = train.make_train_step(config, SPEC, setup, class_weights=None)
  state = setup.init_state()
  history = [jax.device_get(state)]
  data = batches(n)
  for batch in data:
    state, _ = step_fn(state, batch)
    history.append(jax.device_get(state))  # The state is donated: copy it before the next step.
  return setup, history, data


def reference_grads(model, params, batch_stats, batch):
  """jax.grad of the mean pixel cross-entropy, normalisation and loss written out here (train-mode BatchNorm)."""
  images = (batch['image'].astype(np.float32) - MEAN) / STD
  labels = batch['label'].astype(np.int32)

  def loss(p):
    logits, _ = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  return jax.device_get(jax.grad(loss)(params))


def leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_identical(a, b):
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert np.array_equal(la[k], lb[k]), f'{k} moved'


def assert_all_moved(a, b):
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert not np.array_equal(la[k], lb[k]), f'{k} did not move'


def assert_close_update(actual_delta, expected_delta, rtol=2e-4):
  """Leaf by leaf; the step sums the gradient over 4 devices, the reference on one: a float32 rounding apart."""
  la, le = leaves(actual_delta), leaves(expected_delta)
  assert la.keys() == le.keys()
  for k in la:
    scale = float(np.max(np.abs(le[k])))
    assert scale > 0, k
    np.testing.assert_allclose(la[k], le[k], rtol=rtol, atol=rtol * scale, err_msg=k)


def encoder_opt_state(state):
  """The EncoderState inside the partitioned optimiser state (PartitionState -> MaskedState -> EncoderState)."""
  return state.opt_state.inner_states[finetune.ENCODER_LABEL].inner_state


def sub(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


# ---------------------------------------------------------------------------
# Freezing, the learning-rate multiplier and frozen BatchNorm statistics over real train steps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('optimizer', [{'name': 'sgd'}, {'name': 'adamw', 'weight_decay': 0.05}])
def test_a_frozen_encoder_does_not_move_while_the_head_trains(optimizer):
  """Weight decay and momentum are on: only a zeroed update keeps the encoder bit-identical."""
  _, history, _ = run_steps(toy_config(optimizer=optimizer, freeze_encoder=True), 3)
  first, last = history[0], history[-1]
  for state in history[1:]:
    assert_identical(state.params['encoder'], first.params['encoder'])
  for before, after in zip(history, history[1:]):
    assert_all_moved({k: v for k, v in after.params.items() if k != 'encoder'},
                     {k: v for k, v in before.params.items() if k != 'encoder'})
  # The encoder's optimiser state (momentum / Adam moments) was never touched; its step count went on.
  assert int(encoder_opt_state(last).count) == 3
  assert_identical(encoder_opt_state(last).inner_state, encoder_opt_state(first).inner_state)


def test_freeze_encoder_steps_then_a_fresh_update_at_the_schedules_step():
  """Frozen for N=2 updates, then the first encoder update is -m * lr(2) * (g + wd * kernel): momentum from zero."""
  n, m, wd, total = 2, 0.5, 0.01, 10
  config = toy_config(optimizer={'schedule': 'cosine', 'weight_decay': wd}, freeze_encoder_steps=n,
                      encoder_lr_multiplier=m)
  config.num_train_steps = total
  _, history, data = run_steps(config, 4)
  for t in (1, 2):
    assert_identical(history[t].params['encoder'], history[0].params['encoder'])
  assert_all_moved(history[3].params['encoder'], history[2].params['encoder'])
  assert_all_moved(history[4].params['encoder'], history[3].params['encoder'])
  assert_all_moved(history[1].params['head_conv'], history[0].params['head_conv'])

  before = history[2]
  model = ToyNet(num_classes=K)
  g = reference_grads(model, before.params, before.batch_stats, data[2])['encoder']
  lr = BASE_LR * 0.5 * (1 + math.cos(math.pi * n / total))  # Cosine decay at step 2, no warmup.
  p = before.params['encoder']
  expected = {'conv': {'kernel': -m * lr * (g['conv']['kernel'] + wd * p['conv']['kernel'])},  # Kernels decay.
              'bn': {'scale': -m * lr * g['bn']['scale'], 'bias': -m * lr * g['bn']['bias']}}
  assert_close_update(sub(history[3].params['encoder'], p), expected)
  assert int(encoder_opt_state(history[4]).count) == 4


def test_lr_multiplier_scales_the_encoders_sgd_update():
  """Plain SGD (no momentum, no decay): the encoder moves by -0.1 * lr * grad, the head by -lr * grad."""
  config = toy_config(optimizer={'momentum': 0.0, 'weight_decay': 0.0}, encoder_lr_multiplier=0.1)
  _, history, data = run_steps(config, 1)
  before, after = history
  g = reference_grads(ToyNet(num_classes=K), before.params, before.batch_stats, data[0])
  expected = {k: jax.tree.map(lambda x, s=(0.1 if k == 'encoder' else 1.0): -s * BASE_LR * x, v)
              for k, v in g.items()}
  assert_close_update(sub(after.params, before.params), expected)


@pytest.mark.parametrize('model', ['toy', 'toy_stats_only'])
def test_frozen_encoder_batch_stats_stay_while_the_heads_change(model):
  """'toy_stats_only' ignores frozen_bn in its forward pass: the train step alone keeps the statistics."""
  setup, history, _ = run_steps(toy_config(model=model, freeze_encoder_batch_stats=True), 2)
  assert setup.model.frozen_bn is True  # The builder passed the one field to the model.
  for state in history[1:]:
    assert_identical(state.batch_stats['encoder'], history[0].batch_stats['encoder'])
  assert_all_moved(history[-1].batch_stats['head_bn'], history[0].batch_stats['head_bn'])
  assert_all_moved(history[-1].params['encoder'], history[0].params['encoder'])  # The weights still train.


def test_without_the_flag_the_encoder_batch_stats_move():
  """The control of the test above: the same model and steps update the encoder's statistics."""
  setup, history, _ = run_steps(toy_config(model='toy_stats_only'), 1)
  assert setup.model.frozen_bn is False
  assert_all_moved(history[1].batch_stats['encoder'], history[0].batch_stats['encoder'])


def test_a_frozen_stage_resumes_into_an_unfrozen_one():
  """The state's layout does not depend on the controls: a frozen run's state trains on with the encoder free."""
  frozen = toy_config(freeze_encoder=True)
  free = toy_config(encoder_lr_multiplier=0.1)
  mesh = sharding.make_mesh()
  setups = [state_lib.build(c, K, mesh) for c in (frozen, free, toy_config(freeze_encoder_steps=5))]
  # The arrays a checkpoint holds (TrainState's apply_fn and tx are not part of it).
  saved = [{'params': s.abstract_state.params, 'opt_state': s.abstract_state.opt_state,
            'batch_stats': s.abstract_state.batch_stats} for s in setups]
  structures = [jax.tree.structure(t) for t in saved]
  shapes = [[(x.shape, x.dtype) for x in jax.tree.leaves(t)] for t in saved]
  assert structures[0] == structures[1] == structures[2]
  assert shapes[0] == shapes[1] == shapes[2]

  state = setups[0].init_state()
  data = batches(2)
  state, _ = train.make_train_step(frozen, SPEC, setups[0], None)(state, data[0])
  after_frozen = jax.device_get(state)
  # As a restore into the second run's abstract state does: its arrays, the second run's model and optimiser.
  state = state.replace(apply_fn=setups[1].model.apply, tx=setups[1].tx)
  state, _ = train.make_train_step(free, SPEC, setups[1], None)(state, data[1])
  assert_all_moved(jax.device_get(state.params['encoder']), after_frozen.params['encoder'])


# ---------------------------------------------------------------------------
# The optimiser against optax built directly.
# ---------------------------------------------------------------------------


def _params_with_encoder(rng):
  return {'encoder': {'conv': {'kernel': rng.normal(size=(3, 3, 3, 4)), 'bias': rng.normal(size=(4,))},
                      'bn': {'scale': rng.normal(size=(4,)) + 1.0}},
          'head': {'kernel': rng.normal(size=(1, 1, 4, 2)), 'bias': rng.normal(size=(2,))}}


@pytest.mark.parametrize('name, multiplier', [('sgd', 1.0), ('sgd', 0.1), ('adamw', 1.0), ('adamw', 0.1)])
def test_encoder_updates_are_the_optimiser_on_the_scaled_schedule(name, multiplier):
  """The encoder's updates equal optax's sgd/adamw built on multiplier x schedule, the head's on the schedule."""
  opt_config = default.get_config().optimizer
  opt_config.update(name=name, learning_rate=BASE_LR, momentum=0.9, nesterov=False, weight_decay=0.05,
                    schedule='cosine', warmup_steps=2)
  schedule = optim.create_learning_rate_schedule(opt_config, 6)
  tx = optim.create_optimizer(opt_config, schedule, finetune.FineTune(encoder_lr_multiplier=multiplier))

  def direct(sched):
    mask = lambda t: jax.tree.map(lambda x: x.ndim > 1, t)
    if name == 'sgd':
      return optax.chain(optax.add_decayed_weights(0.05, mask=mask), optax.sgd(sched, momentum=0.9))
    return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, mask=mask)

  rng = np.random.default_rng(0)
  to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  params = to32(_params_with_encoder(rng))
  enc_tx, head_tx = direct(lambda c: multiplier * schedule(c)), direct(schedule)
  state, enc_state, head_state = tx.init(params), enc_tx.init(params['encoder']), head_tx.init(params['head'])
  update, enc_update, head_update = jax.jit(tx.update), jax.jit(enc_tx.update), jax.jit(head_tx.update)
  for _ in range(4):  # Through the warmup (lr 0 at step 0) into the decay.
    grads = to32(_params_with_encoder(rng))
    updates, state = update(grads, state, params)
    enc_updates, enc_state = enc_update(grads['encoder'], enc_state, params['encoder'])
    head_updates, head_state = head_update(grads['head'], head_state, params['head'])
    expected = leaves({'encoder': enc_updates, 'head': head_updates})
    for k, got in leaves(updates).items():  # The same operations: equal to float32 rounding (in fact bit for bit).
      np.testing.assert_allclose(got, expected[k], rtol=1e-6, atol=1e-12, err_msg=k)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_models_without_an_encoder_keep_the_optimiser_state_of_before(name):
  """The unet's optimiser state is the tree optax's chain (as optim.py built it before fine-tuning) gives."""
  config = tiny_unet_config('unused')
  config.optimizer.name = name
  setup = state_lib.build(config, K, sharding.make_mesh(jax.devices()[:1]))
  opt = config.optimizer
  mask = lambda t: jax.tree.map(lambda x: x.ndim > 1, t)
  if name == 'sgd':
    before = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=mask),
                         optax.sgd(setup.learning_rate_fn, momentum=opt.momentum or None, nesterov=opt.nesterov))
  else:
    before = optax.adamw(setup.learning_rate_fn, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                         mask=mask)
  expected = jax.eval_shape(before.init, setup.abstract_state.params)
  got = setup.abstract_state.opt_state
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [(x.shape, x.dtype) for x in jax.tree.leaves(expected)]


# ---------------------------------------------------------------------------
# adapt_first_conv.
# ---------------------------------------------------------------------------


def test_adapt_first_conv_against_hand_computed_kernels():
  kernel = np.zeros((1, 1, 3, 2), np.float32)
  kernel[0, 0, :, 0] = [1.0, 2.0, 3.0]
  kernel[0, 0, :, 1] = [10.0, 20.0, 30.0]
  one = finetune.adapt_first_conv(kernel, 1)
  assert one.shape == (1, 1, 1, 2) and one.dtype == np.float32
  np.testing.assert_array_equal(one[0, 0], [[6.0, 60.0]])
  four = finetune.adapt_first_conv(kernel, 4)  # R, G, B, R, each x 3/4.
  assert four.shape == (1, 1, 4, 2)
  np.testing.assert_allclose(four[0, 0], [[0.75, 7.5], [1.5, 15.0], [2.25, 22.5], [0.75, 7.5]], rtol=1e-7)
  two = finetune.adapt_first_conv(kernel, 2)  # R, G, each x 3/2.
  np.testing.assert_allclose(two[0, 0], [[1.5, 15.0], [3.0, 30.0]], rtol=1e-7)
  three = finetune.adapt_first_conv(kernel, 3)
  np.testing.assert_array_equal(three, kernel)
  assert three is not kernel
  for bad_kernel, channels in ((np.zeros((3, 3, 4, 8)), 1), (np.zeros((3, 3, 3)), 1), (kernel, 0)):
    with pytest.raises(ValueError):
      finetune.adapt_first_conv(bad_kernel, channels)


def test_a_grayscale_image_through_the_adapted_kernel_is_the_replicated_image_through_the_original():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  gray = rng.uniform(0, 1, size=(2, 9, 9, 1)).astype(np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  rgb_out = conv(np.repeat(gray, 3, axis=-1), kernel)
  gray_out = conv(gray, finetune.adapt_first_conv(kernel, 1))
  np.testing.assert_allclose(np.asarray(gray_out), np.asarray(rgb_out), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The config.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('field, value, message', [
    ('encoder_lr_multiplier', 0.0, 'config.finetune.encoder_lr_multiplier must be a number > 0'),
    ('encoder_lr_multiplier', True, 'config.finetune.encoder_lr_multiplier must be a number > 0'),
    ('freeze_encoder', 1, 'config.finetune.freeze_encoder must be True or False'),
    ('freeze_encoder_batch_stats', 'yes', 'config.finetune.freeze_encoder_batch_stats must be True or False'),
    ('freeze_encoder_steps', -1, 'config.finetune.freeze_encoder_steps must be an integer >= 0'),
    ('freeze_encoder_steps', 1.5, 'config.finetune.freeze_encoder_steps must be an integer >= 0'),
])
def test_bad_finetune_values_name_the_field(field, value, message):
  config = default.get_config()
  # A new section: the ConfigDict's type checks would refuse the wrong types (hand-written configs, config.json do not).
  config.finetune = ml_collections.ConfigDict(dict(config.finetune.to_dict(), **{field: value}))
  with pytest.raises(ConfigError, match=message):
    config_utils.validate(config)


def test_finetune_section_defaults_conflicts_and_typos():
  config = default.get_config()
  assert finetune.settings(config) == finetune.FineTune() and finetune.FineTune().is_default
  del config['finetune']  # A config saved before the section existed.
  assert finetune.settings(config) == finetune.FineTune()
  config = default.get_config()
  config.finetune.update(freeze_encoder=True, freeze_encoder_steps=5)
  with pytest.raises(ConfigError, match='set only one of them'):
    config_utils.validate(config)
  config = default.get_config()
  config.finetune.freeze_encoders = True
  with pytest.raises(ConfigError, match=r"unknown fields \['freeze_encoders'\]"):
    config_utils.validate(config)


def test_finetune_controls_need_a_model_with_an_encoder():
  config = tiny_unet_config('unused')
  config.finetune.encoder_lr_multiplier = 0.1
  with pytest.raises(ConfigError, match="encoder_lr_multiplier=0.1, but model 'unet' has no pretrained encoder"):
    state_lib.build(config, K, sharding.make_mesh(jax.devices()[:1]))
  with pytest.raises(ConfigError, match="model 'toy_no_frozen_bn' cannot normalise its encoder with frozen"):
    state_lib.build_model(toy_config(model='toy_no_frozen_bn', freeze_encoder_batch_stats=True), K)


def test_in_channels_and_input_statistics_fields():
  config = default.get_config()
  assert finetune.in_channels_of(config.model) == 3  # Absent: RGB.
  assert finetune.input_statistics(config.model) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
  config.model.in_channels = 3
  config_utils.validate(config)
  config.model.in_channels = 1
  with pytest.raises(ConfigError, match=r"config.model.in_channels=1: dataset 'jaxseg_shapes' holds RGB images"):
    config_utils.validate(config)
  with pytest.raises(ConfigError, match='input_mean has 3 values; config.model.in_channels is 1'):
    finetune.input_statistics(config.model)
  config.model.input_mean, config.model.input_std = (128.0,), (64.0,)
  assert finetune.input_statistics(config.model) == ((128.0,), (64.0,))
  config.model.input_std = (0.0,)
  with pytest.raises(ConfigError, match='config.model.input_std must be a tuple of finite numbers'):
    finetune.input_statistics(config.model)
  config.model.in_channels = 0
  with pytest.raises(ConfigError, match='config.model.in_channels must be a positive integer'):
    finetune.in_channels_of(config.model)


def test_a_workdir_without_in_channels_matches_a_config_with_three(tmp_path):
  config = tiny_unet_config('unused')
  saved = json.loads(config.to_json_best_effort())
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config.model.in_channels = 3
  checkpoint_lib.check_model_matches_workdir(config, str(tmp_path))  # Absent in training = 3: no error.
  config.model.in_channels = 1
  with pytest.raises(ConfigError, match='model.in_channels: 1 here, 3 in training'):
    checkpoint_lib.check_model_matches_workdir(config, str(tmp_path))
