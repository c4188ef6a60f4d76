"""Fine-tuning as parameter-group rules (jaxseg/optim.py; config.finetune read by jaxseg/settings.py), on a toy model
with an `encoder` submodule and on the UNet.

References: the updates after real train steps against the update worked out by hand from a plain `jax.grad` of
the loss (normalisation and cross-entropy written out here) and, for param_rules, a table of each parameter's
multiplier, freezing and weight decay written in the test; the default rules' optimiser against the optax chains
the optimiser was built from before the rules (decay mask ndim > 1, the encoder's own chain on the scaled schedule
started fresh after its frozen updates; written out here, on a hand-written schedule), over every parameter of a
UNet on resnet18 and of the plain UNet; adapt_first_conv against hand-computed arrays and a convolution identity.
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
from jaxseg import models
from jaxseg import optim
from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import startup
from jaxseg import state as state_lib
from jaxseg import train
from jaxseg.data.datasets import DatasetSpec
from jaxseg.errors import CheckpointError, ConfigError
from jaxseg.models.encoders.weights import adapt_first_conv
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
  norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3), use_bias=not self.norm, name='conv')(x)  # Before BatchNorm a bias has no gradient.
    if self.norm:
      x = nn.BatchNorm(use_running_average=not train or self.frozen_bn, momentum=0.9, name='bn')(x)
    return nn.relu(x)


class ToyNet(nn.Module):
  """A model with a pretrained-style encoder as jaxseg's convention has it: the submodule `encoder`, the fields
  `encoder_name` and `frozen_bn`."""
  num_classes: int
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  encoder_name: str = 'toy'
  honour_frozen_bn: bool = True  # False: the encoder ignores frozen_bn (to test the train step's side alone).
  encoder_norm: bool = True  # False: an encoder without BatchNorm (as VGG16's), so without batch_stats.
  size_multiple = 1

  @nn.compact
  def __call__(self, x, train=False):
    x = ToyEncoder(frozen_bn=self.frozen_bn and self.honour_frozen_bn, norm=self.encoder_norm,
                   name='encoder')(x, train)
    x = nn.Conv(4, (3, 3), use_bias=False, name='head_conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='head_bn')(x)
    return nn.Conv(self.num_classes, (1, 1), name='classifier')(nn.relu(x))


class ToyNetStatsOnly(ToyNet):
  honour_frozen_bn: bool = False


class ToyNetEncoderWithoutNorm(ToyNet):
  encoder_norm: bool = False


@pytest.fixture(autouse=True)
def toy_models(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'toy', (ToyNet, ()))
  monkeypatch.setitem(models.MODELS, 'toy_stats_only', (ToyNetStatsOnly, ()))
  monkeypatch.setitem(models.MODELS, 'toy_encoder_without_norm', (ToyNetEncoderWithoutNorm, ()))


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


def build(config, mesh=None):
  settings = settings_lib.from_config(config)
  return settings, state_lib.build(settings, K, mesh or sharding.make_mesh())


def run_steps(config, n):
  """The host copies of the state before and after each of n real train steps (make_train_step, 4 devices)."""
  settings, setup = build(config)
  step_fn = train.make_train_step(settings, SPEC, setup, class_weights=None)
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

  return jax.device_get(jax.jit(jax.grad(loss))(params))  # Jitted: compiles faster than it runs op by op.


def path_str(path):
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def leaves(tree):
  return {path_str(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


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


def group_states(state, prefix):
  """The optimiser states (GroupState) of the parameter groups whose parameters all lie under params[prefix].

  A group's state holds arrays for its own parameters only (optax.multi_transform masks the others out), so the
  paths of its arrays say whose state it is.
  """
  found = []
  for masked in state.opt_state.inner_states.values():
    group = masked.inner_state
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(group.inner_state)]
    # Per-parameter arrays (momentum, Adam moments) have dict keys in their paths; Adam's step count has none.
    keys = [[k.key for k in p if isinstance(k, jax.tree_util.DictKey)] for p in paths]
    keys = [k for k in keys if k]
    if keys and all(k[0] == prefix for k in keys):
      found.append(group)
  return found


def sub(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


# ---------------------------------------------------------------------------
# Freezing, learning-rate multipliers, weight decay and frozen BatchNorm statistics over real train steps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('optimizer', [{'name': 'sgd'}, {'name': 'adamw', 'weight_decay': 0.05}])
def test_a_frozen_encoder_does_not_move_while_the_head_trains(optimizer):
  """Weight decay and momentum are on: only a zeroed update keeps the encoder bit-identical."""
  setup, history, _ = run_steps(toy_config(optimizer=optimizer, freeze_encoder=True), 3)
  assert leaves(setup.frozen) == {k: k.startswith('encoder/') for k in leaves(history[0].params)}
  first, last = history[0], history[-1]
  for state in history[1:]:
    assert_identical(state.params['encoder'], first.params['encoder'])
  for before, after in zip(history, history[1:]):
    assert_all_moved({k: v for k, v in after.params.items() if k != 'encoder'},
                     {k: v for k, v in before.params.items() if k != 'encoder'})
  # The encoder's optimiser state (momentum / Adam moments) was never touched; its step count went on.
  encoder_first, encoder_last = group_states(first, 'encoder'), group_states(last, 'encoder')
  assert len(encoder_last) == 2  # The kernel (decayed) and the BatchNorm scale and bias (not decayed).
  for before, after in zip(encoder_first, encoder_last):
    assert int(after.count) == 3
    assert_identical(after.inner_state, before.inner_state)


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
  assert [int(s.count) for s in group_states(history[4], 'encoder')] == [4, 4]


def test_param_rules_over_real_train_steps():
  """config.finetune.param_rules, then the encoder's rule (encoder_lr_multiplier 0.1), then no decay on biases and
  scales; each property of a parameter from the first matching rule that sets it:
    'encoder/conv' frozen: that kernel never moves (SGD with momentum and weight decay), every other parameter moves
      at each step;
    'head_conv' 0.25 without decay, 'head_bn' 0.5: layer-wise multipliers (encoder 0.1, head_conv 0.25, head_bn 0.5,
      classifier 1), not the later 'head' rule's 2.0;
    'encoder/bn/scale' decay on: before the default rule that turns it off.
  The first update is -multiplier * lr * (g + wd * p if decayed else g) (momentum starts at zero), from the table.
  The model ignores frozen_bn without the flag (the control of the frozen-statistics tests: its encoder's statistics
  move).
  """
  wd = 0.01
  rules = (('encoder/conv', 'frozen', None), ('head_conv', 0.25, False), ('head_bn', 0.5, None),
           ('encoder/bn/scale', None, True), ('head', 2.0, None))
  config = toy_config(model='toy_stats_only', optimizer={'weight_decay': wd}, encoder_lr_multiplier=0.1,
                      param_rules=rules)
  setup, history, data = run_steps(config, 2)
  table = {  # (learning-rate multiplier or 'frozen', decayed)
      'encoder/conv/kernel': ('frozen', None),
      'encoder/bn/scale': (0.1, True),
      'encoder/bn/bias': (0.1, False),
      'head_conv/kernel': (0.25, False),
      'head_bn/scale': (0.5, False),
      'head_bn/bias': (0.5, False),
      'classifier/kernel': (1.0, True),
      'classifier/bias': (1.0, False),
  }
  assert leaves(setup.frozen) == {k: m == 'frozen' for k, (m, _) in table.items()}
  for before, after in zip(history, history[1:]):
    b, a = leaves(before.params), leaves(after.params)
    assert a.keys() == table.keys()
    for k, (m, _) in table.items():
      assert np.array_equal(a[k], b[k]) == (m == 'frozen'), k

  before, after = history[:2]
  g = leaves(reference_grads(ToyNet(num_classes=K), before.params, before.batch_stats, data[0]))
  p = leaves(before.params)
  expected = {k: -m * BASE_LR * (g[k] + wd * p[k] if decayed else g[k])
              for k, (m, decayed) in table.items() if m != 'frozen'}
  delta = {k: v for k, v in leaves(sub(after.params, before.params)).items() if k in expected}
  assert_close_update(delta, expected)

  assert setup.model.frozen_bn is False
  assert_all_moved(history[1].batch_stats['encoder'], history[0].batch_stats['encoder'])


@pytest.mark.parametrize('model', ['toy', 'toy_stats_only'])
def test_frozen_encoder_batch_stats_stay_while_the_heads_change(model):
  """'toy_stats_only' ignores frozen_bn in its forward pass: the train step alone keeps the statistics."""
  setup, history, _ = run_steps(toy_config(model=model, freeze_encoder_batch_stats=True), 2)
  assert setup.model.frozen_bn is True  # The builder passed the one field to the model.
  for state in history[1:]:
    assert_identical(state.batch_stats['encoder'], history[0].batch_stats['encoder'])
  assert_all_moved(history[-1].batch_stats['head_bn'], history[0].batch_stats['head_bn'])
  assert_all_moved(history[-1].params['encoder'], history[0].params['encoder'])  # The weights still train.


def test_frozen_encoder_batch_stats_of_an_encoder_without_batchnorm():
  """An encoder without BatchNorm (VGG16's) has no statistics to keep: the steps train, the head's move."""
  setup, history, _ = run_steps(toy_config(model='toy_encoder_without_norm', freeze_encoder_batch_stats=True), 1)
  assert setup.model.frozen_bn is True
  assert 'encoder' not in history[0].batch_stats
  assert_all_moved(history[1].batch_stats['head_bn'], history[0].batch_stats['head_bn'])
  assert_all_moved(history[1].params, history[0].params)


def test_a_frozen_stage_resumes_into_an_unfrozen_one():
  """The state's layout depends on the rules' patterns, not their values: a frozen run's state trains on with the
  encoder free (by the encoder fields, or by a rule of the user's that changed from 'frozen' to a multiplier)."""
  frozen = toy_config(freeze_encoder=True)
  free = toy_config(encoder_lr_multiplier=0.1)
  mesh = sharding.make_mesh()
  (frozen_settings, frozen_setup), (free_settings, free_setup), *others = [
      build(c, mesh) for c in (frozen, free, toy_config(freeze_encoder_steps=5), toy_config())]
  by_user_rule = [build(toy_config(param_rules=(('encoder/conv', value, None),)), mesh)[1] for value in ('frozen', 0.1)]
  user_layouts = [jax.tree.structure(s.abstract_state.opt_state) for s in by_user_rule]
  assert user_layouts[0] == user_layouts[1]
  setups = [frozen_setup, free_setup] + [s for _, s in others]
  # The arrays a checkpoint holds (TrainState's apply_fn and tx are not part of it).
  saved = [{'params': s.abstract_state.params, 'opt_state': s.abstract_state.opt_state,
            'batch_stats': s.abstract_state.batch_stats} for s in setups]
  structures = [jax.tree.structure(t) for t in saved]
  shapes = [[(x.shape, x.dtype) for x in jax.tree.leaves(t)] for t in saved]
  assert all(s == structures[0] for s in structures)
  assert all(s == shapes[0] for s in shapes)

  state = frozen_setup.init_state()
  data = batches(2)
  state, _ = train.make_train_step(frozen_settings, SPEC, frozen_setup, None)(state, data[0])
  after_frozen = jax.device_get(state)
  # As a restore into the second run's abstract state does: its arrays, the second run's model and optimiser.
  state = state.replace(apply_fn=free_setup.model.apply, tx=free_setup.tx)
  state, _ = train.make_train_step(free_settings, SPEC, free_setup, None)(state, data[1])
  assert_all_moved(jax.device_get(state.params['encoder']), after_frozen.params['encoder'])


# ---------------------------------------------------------------------------
# The default rules against the optimiser of before the rules (optax chains, written out here).
# ---------------------------------------------------------------------------

WARMUP, TOTAL, WD = 1, 6, 0.05


def hand_schedule(count):
  """Linear warmup from 0 over WARMUP steps, then cosine decay to 0 at TOTAL (config.optimizer's 'cosine')."""
  c = jnp.asarray(count, jnp.float32)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(c - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)))
  return BASE_LR * jnp.where(c < WARMUP, c / WARMUP, cosine)


def optimizer_of_before(name, schedule):
  """optim.py's optimiser before the rules: decay on kernels (ndim > 1) only, the schedule as its learning rate."""
  kernels = lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(WD, mask=kernels), optax.sgd(schedule, momentum=0.9))
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, mask=kernels)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
@pytest.mark.parametrize('model, multiplier, frozen_steps', [('resnet18', 0.1, 2), ('unet', 1.0, 0)])
def test_the_default_rules_give_the_updates_of_before(name, model, multiplier, frozen_steps):
  """Every parameter's update over 5 optimiser updates (through the warmup, the freezing and the decay) equals the
  optimiser of before: the network but the encoder on the schedule; the encoder zero while frozen, then the same
  optimiser started fresh at update N on multiplier x the schedule (its own count 0 at update N).

  The optimiser is the one training builds (state.build) for a UNet on resnet18 and for the plain UNet; it runs on
  trees of their parameters' paths and ranks with each side cut to at most 3 (what the rules and the old decay mask
  decide on; the full sizes would only make the compilation slower).
  """
  fields = {'optimizer.name': name, 'optimizer.learning_rate': BASE_LR, 'optimizer.schedule': 'cosine',
            'optimizer.warmup_steps': WARMUP, 'optimizer.weight_decay': WD, 'optimizer.momentum': 0.9,
            'num_train_steps': TOTAL, 'finetune.encoder_lr_multiplier': multiplier,
            'finetune.freeze_encoder_steps': frozen_steps}
  if model == 'resnet18':
    fields['model.encoder'] = 'resnet18'
  _, setup = build(tiny_unet_config('unused', **fields), sharding.make_mesh(jax.devices()[:1]))
  shapes = setup.abstract_state.params
  assert ('encoder' in shapes) == (model == 'resnet18')
  rng = np.random.default_rng(0)
  random_tree = lambda: jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(tuple(min(d, 3) for d in s.shape), np.float32)), shapes)
  params = random_tree()
  rest = lambda tree: {k: v for k, v in tree.items() if k != 'encoder'}
  rest_tx = optimizer_of_before(name, hand_schedule)
  encoder_tx = optimizer_of_before(name, lambda c: multiplier * hand_schedule(c + frozen_steps))
  update = jax.jit(setup.tx.update)
  state, rest_state, encoder_state = setup.tx.init(params), rest_tx.init(rest(params)), None
  for t in range(5):
    grads = random_tree()
    updates, state = update(grads, state, params)
    expected, rest_state = rest_tx.update(rest(grads), rest_state, rest(params))
    if 'encoder' in params:
      if t < frozen_steps:
        expected['encoder'] = jax.tree.map(jnp.zeros_like, params['encoder'])
      else:
        if encoder_state is None:
          encoder_state = encoder_tx.init(params['encoder'])
        expected['encoder'], encoder_state = encoder_tx.update(grads['encoder'], encoder_state, params['encoder'])
    got, want = leaves(updates), leaves(expected)
    assert got.keys() == want.keys() == leaves(params).keys()
    for k, value in got.items():
      scale = float(np.max(np.abs(want[k])))
      if t == 0 or (k.startswith('encoder/') and t < frozen_steps):  # Learning rate 0 (warmup) or frozen.
        assert not np.any(value), f'{k} at update {t}'
      else:
        assert scale > 0, f'{k} at update {t}'
      np.testing.assert_allclose(value, want[k], rtol=1e-5, atol=1e-6 * scale, err_msg=f'{k} at update {t}')
    params = optax.apply_updates(params, updates)


# ---------------------------------------------------------------------------
# adapt_first_conv.
# ---------------------------------------------------------------------------


def test_adapt_first_conv_against_hand_computed_kernels():
  kernel = np.zeros((1, 1, 3, 2), np.float32)
  kernel[0, 0, :, 0] = [1.0, 2.0, 3.0]
  kernel[0, 0, :, 1] = [10.0, 20.0, 30.0]
  one = adapt_first_conv(kernel, 1)
  assert one.shape == (1, 1, 1, 2) and one.dtype == np.float32
  np.testing.assert_array_equal(one[0, 0], [[6.0, 60.0]])
  four = adapt_first_conv(kernel, 4)  # R, G, B, R, each x 3/4.
  assert four.shape == (1, 1, 4, 2)
  np.testing.assert_allclose(four[0, 0], [[0.75, 7.5], [1.5, 15.0], [2.25, 22.5], [0.75, 7.5]], rtol=1e-7)
  two = adapt_first_conv(kernel, 2)  # R, G, each x 3/2.
  np.testing.assert_allclose(two[0, 0], [[1.5, 15.0], [3.0, 30.0]], rtol=1e-7)
  three = adapt_first_conv(kernel, 3)
  np.testing.assert_array_equal(three, kernel)
  assert three is not kernel
  for bad_kernel, channels in ((np.zeros((3, 3, 4, 8)), 1), (np.zeros((3, 3, 3)), 1), (kernel, 0)):
    with pytest.raises(ValueError):
      adapt_first_conv(bad_kernel, channels)


def test_a_grayscale_image_through_the_adapted_kernel_is_the_replicated_image_through_the_original():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  gray = rng.uniform(0, 1, size=(2, 9, 9, 1)).astype(np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  rgb_out = conv(np.repeat(gray, 3, axis=-1), kernel)
  gray_out = conv(gray, adapt_first_conv(kernel, 1))
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
    settings_lib.from_config(config)


def test_finetune_section_defaults_conflicts_and_typos():
  # The defaults: the encoder's rule changing nothing (multiplier 1, not frozen, not required), then no decay on
  # biases and normalisation scales.
  defaults = (optim.ParamRule('^encoder/', lr_multiplier=1.0, frozen_steps=0),
              optim.ParamRule(r'(^|/)(bias|scale)$', weight_decay=False))
  config = default.get_config()
  settings = settings_lib.from_config(config)
  assert settings.param_rules == defaults and settings.freeze_encoder_batch_stats is False
  del config['finetune']  # A hand-written config without the section.
  assert settings_lib.from_config(config).param_rules == defaults
  config = default.get_config()
  config.finetune.update(freeze_encoder=True, freeze_encoder_steps=5)
  with pytest.raises(ConfigError, match='set only one of them'):
    settings_lib.from_config(config)
  config = default.get_config()
  config.finetune.freeze_encoders = True
  with pytest.raises(ConfigError, match=r"unknown fields \['freeze_encoders'\]"):
    settings_lib.from_config(config)


def test_param_rules_read_from_the_config_and_its_saved_json():
  """User rules come first, each property set or left to later rules; config.json (lists) reads the same."""
  config = default.get_config()
  config.finetune.param_rules = (('encoder/layer1', 'frozen', None), ('encoder/layer2', 0.5, False))
  config.finetune.encoder_lr_multiplier = 0.1
  expected = (optim.ParamRule('encoder/layer1', frozen_steps=optim.FROZEN, required=True),
              optim.ParamRule('encoder/layer2', lr_multiplier=0.5, weight_decay=False, required=True),
              optim.ParamRule('^encoder/', lr_multiplier=0.1, frozen_steps=0, required=True),
              optim.ParamRule(r'(^|/)(bias|scale)$', weight_decay=False))
  assert settings_lib.from_config(config).param_rules == expected
  saved = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  assert settings_lib.from_config(saved).param_rules == expected


@pytest.mark.parametrize('rule, message', [
    (('encoder/(conv', 0.5, None), r"param_rules\[0\]: 'encoder/\(conv' is not a regular expression"),
    ((3, 0.5, None), r'param_rules\[0\]: 3 is not a regular expression'),
    (('encoder/conv', 0.0, None), r"param_rules\[0\]: the learning-rate multiplier must be a number > 0, 'frozen'"),
    (('encoder/conv', -1, None), r'param_rules\[0\]: the learning-rate multiplier must be .* got -1'),
    (('encoder/conv', 'freeze', None), r"param_rules\[0\]: the learning-rate multiplier must be .* got 'freeze'"),
    (('encoder/conv', True, None), r'param_rules\[0\]: the learning-rate multiplier must be .* got True'),
    (('encoder/conv', None, 'no'), r"param_rules\[0\]: weight decay must be True, False or None, got 'no'"),
    (('encoder/conv', 0.5), r"param_rules\[0\] must be \(pattern, lr multiplier \| 'frozen' \| None, weight decay"),
    ('encoder/conv', r"param_rules\[0\] must be \(pattern"),
])
def test_a_bad_param_rule_names_the_rule_and_the_problem(rule, message):
  config = toy_config()
  with config.finetune.ignore_type():
    config.finetune.param_rules = (rule,)
  with pytest.raises(ConfigError, match='config.finetune.' + message):
    settings_lib.from_config(config)


def test_a_rule_that_matches_no_parameter_is_refused_when_the_model_is_built():
  """A typo in a pattern would change nothing: the build names the pattern and the model."""
  config = toy_config(param_rules=(('encoder/conv', 0.5, None), ('encoder/layer9', 'frozen', None)))
  settings = settings_lib.from_config(config)  # The parameter paths are known only from the model.
  with pytest.raises(ConfigError, match=r"param_rules\[1\]: the pattern 'encoder/layer9' matches no parameter of model 'toy'"):
    state_lib.build(settings, K, sharding.make_mesh(jax.devices()[:1]))


def test_finetune_controls_need_a_model_with_an_encoder():
  mesh = sharding.make_mesh(jax.devices()[:1])
  for fields in ({'finetune.encoder_lr_multiplier': 0.1}, {'finetune.freeze_encoder': True},
                 {'finetune.freeze_encoder_steps': 3}):
    settings = settings_lib.from_config(tiny_unet_config('unused', **fields))
    with pytest.raises(ConfigError, match=r"encoder fields need a model with an encoder.*the pattern '\^encoder/' "
                                          r"matches no parameter of model 'unet'"):
      state_lib.build(settings, K, mesh)
  with pytest.raises(ConfigError, match="freeze_encoder_batch_stats=True, but model 'unet' has no encoder"):
    settings_lib.from_config(tiny_unet_config('unused', **{'finetune.freeze_encoder_batch_stats': True}))


def test_in_channels_and_input_statistics_fields():
  config = default.get_config()
  model = settings_lib.from_config(config).model
  assert model.in_channels == 3
  assert model.input_stats == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
  config.model.in_channels = 1
  with pytest.raises(ConfigError, match=r"config.model.in_channels=1: dataset 'jaxseg_shapes' holds RGB images"):
    settings_lib.from_config(config)
  config.dataset.name = 'folder'  # Folders take any channel count.
  config.dataset.path = '/unused'
  config.dataset.num_classes = 2
  with pytest.raises(ConfigError, match='input_mean has 3 values; config.model.in_channels is 1'):
    settings_lib.from_config(config)
  config.model.input_mean, config.model.input_std = (128.0,), (64.0,)
  assert settings_lib.from_config(config).model.input_stats == ((128.0,), (64.0,))
  config.model.input_std = (0.0,)
  with pytest.raises(ConfigError, match='config.model.input_std must be a tuple of finite numbers'):
    settings_lib.from_config(config)
  config.model.in_channels = 0
  with pytest.raises(ConfigError, match='config.model.in_channels must be .*got 0'):
    settings_lib.from_config(config)


def test_a_workdir_without_in_channels_matches_a_config_with_three(tmp_path):
  """A config.json without the field means 3 channels: a config with 3 passes the model check (and fails only for
  want of a checkpoint); one with other input statistics is refused, naming the field."""
  config = tiny_unet_config('unused')
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['in_channels']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'checkpoints').mkdir()
  assert startup.trained_settings(str(tmp_path)).model.in_channels == 3
  config.model.in_channels = 3
  with pytest.raises(CheckpointError, match='no checkpoint in'):
    startup.open_run(config, str(tmp_path), mode='predict', devices=jax.devices()[:1])
  config.model.input_mean = (0.0, 0.0, 0.0)
  with pytest.raises(ConfigError, match=r'model.input_mean: \[0.0, 0.0, 0.0\] here, \[123.675'):
    startup.open_run(config, str(tmp_path), mode='predict', devices=jax.devices()[:1])
