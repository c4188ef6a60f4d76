"""The jitted train step over a mesh: device-count and FSDP equivalence, donation, sharded state memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg import train
from jaxseg.data.datasets import DatasetSpec
from tests.conftest import tiny_unet_config
from tests.helpers import max_abs_diff

NUM_CLASSES = 4
SPEC = DatasetSpec(name='test', num_classes=NUM_CLASSES, class_names=tuple('abcd'), ignore_label=255,
                   image_key='image', label_key='label', label_offset=0, ignore_values=(), train_split='train',
                   eval_split='validation')


@pytest.mark.parametrize('shape, shards, expected', [
    ((3, 3, 64, 128), 4, P(None, None, None, 'data')),   # Largest dimension that 4 divides.
    ((3, 3, 64, 130), 4, P(None, None, 'data', None)),   # 130 does not divide: the next largest.
    ((1000, 30), 4, P('data', None)),
    ((7, 7, 9, 263), 4, P()),                            # No dimension divides: replicated.
    ((128,), 4, P()),                                    # Small (a bias): replicated.
    ((3, 3, 64, 128), 1, P()),                           # One device: nothing to split.
])
def test_fsdp_spec_splits_the_largest_dimension_that_divides(shape, shards, expected):
  assert sharding.fsdp_spec(shape, shards) == expected


def _batches(n, batch=8, size=32, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    labels = rng.randint(0, NUM_CLASSES, (batch, size, size)).astype(np.uint8)
    labels[:, :4] = 255  # Some ignored pixels.
    out.append({'image': rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8), 'label': labels})
  return out


def _train(config, devices, batches):
  """Runs the production train step over a mesh of `devices`; returns (losses, host state)."""
  mesh = sharding.make_mesh(devices)
  settings = settings_lib.from_config(config)
  setup = state_lib.build(settings, NUM_CLASSES, mesh)
  step = train.make_train_step(settings, SPEC, setup, class_weights=None)
  state = setup.init_state()
  got = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    got.append(float(metrics['loss']))
  return got, jax.device_get(state)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  config = tiny_unet_config(str(tmp_path_factory.mktemp('unused')))
  config.model.base_width = 8
  batches = _batches(3)
  return config, batches, _train(config, jax.devices()[:1], batches)


@pytest.mark.parametrize('mode', ['replicated', 'fsdp'])
def test_four_devices_train_like_one_device(reference_run, mode, monkeypatch):
  """Same losses and parameters after 3 steps on 1 device and on 4 (replicated, and fsdp with the state split)."""
  config, batches, (ref_losses, ref_state) = reference_run
  config = config.copy_and_resolve_references()
  config.sharding = mode
  # Split even the tiny model's arrays under fsdp, so that the sharded path is really taken.
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 256)
  losses_4, state_4 = _train(config, jax.devices()[:4], batches)
  np.testing.assert_allclose(losses_4, ref_losses, rtol=2e-5)
  assert max_abs_diff(state_4.params, ref_state.params) < 2e-5
  assert max_abs_diff(state_4.batch_stats, ref_state.batch_stats) < 2e-5
  assert max_abs_diff(state_4.opt_state, ref_state.opt_state) < 1e-4  # Momentum: sums of gradients of size ~1.
  assert int(state_4.step) == 3
  assert ref_losses[0] != ref_losses[-1]  # Training moved: not a comparison of two untouched inits.


@pytest.mark.parametrize('mean, std', [
    (None, None),                                  # ImageNet's statistics, the default.
    ((10.0, 20.0, 30.0), (2.0, 4.0, 8.0)),         # config.model.input_mean / input_std.
])
def test_first_step_matches_a_plain_jax_grad(reference_run, mean, std):
  """The step's first update equals SGD on jax.grad of the mean pixel cross-entropy, computed without jaxseg's step."""
  config, batches, _ = reference_run
  config = config.copy_and_resolve_references()
  config.optimizer.warmup_steps = 0  # The first step's learning rate is the peak, not 0.
  config.model.input_mean, config.model.input_std = mean, std
  mesh = sharding.make_mesh(jax.devices()[:4])
  settings = settings_lib.from_config(config)
  setup = state_lib.build(settings, NUM_CLASSES, mesh)
  host = jax.device_get(setup.init_state())
  batch = batches[0]
  mean = np.array(mean or (123.675, 116.28, 103.53))
  std = np.array(std or (58.395, 57.12, 57.375))
  images = (batch['image'].astype(np.float32) - mean) / std

  def loss_fn(params):
    logits, _ = setup.model.apply({'params': params, 'batch_stats': host.batch_stats}, jnp.asarray(images, jnp.float32),
                                  train=True, mutable=['batch_stats'])
    labels = batch['label'].astype(np.int32)
    valid = labels != 255
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, labels, 0))
    return jnp.sum(ce * valid) / valid.sum()

  grads = jax.jit(jax.grad(loss_fn))(host.params)  # Jitted: op-by-op on CPU takes half a minute.
  lr0 = float(setup.learning_rate_fn(0))
  step = train.make_train_step(settings, SPEC, setup, class_weights=None)
  new_state, metrics = step(setup.init_state(), sharding.global_batch(batch, mesh))
  assert float(metrics['loss']) == pytest.approx(float(jax.jit(loss_fn)(host.params)), rel=1e-5)
  # SGD + momentum from zero + L2 on kernels: first update = -lr * (g + wd * p for kernels).
  wd = config.optimizer.weight_decay
  expected = jax.tree.map(lambda p, g: p - lr0 * (g + (wd * p if p.ndim > 1 else 0.0)), host.params, grads)
  assert max_abs_diff(jax.device_get(new_state.params), expected) < 1e-5


def test_the_state_is_donated_and_updated_in_place(reference_run):
  config, batches, _ = reference_run
  mesh = sharding.make_mesh(jax.devices()[:2])
  settings = settings_lib.from_config(config)
  setup = state_lib.build(settings, NUM_CLASSES, mesh)
  step = train.make_train_step(settings, SPEC, setup, class_weights=None)
  state = setup.init_state()
  batch = sharding.global_batch(batches[0], mesh)
  compiled = step.lower(state, batch).compile()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # Every state buffer, and nothing else, is an alias of an output: the step writes the new state into the
  # old one's memory (replicated: each device holds the whole state).
  assert compiled.memory_analysis().alias_size_in_bytes == state_bytes
  leaves = jax.tree.leaves(state)
  new_state, _ = step(state, batch)
  assert all(x.is_deleted() for x in leaves)
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def test_fsdp_splits_the_state_across_devices(tmp_path):
  """Per-device bytes of FCN-VGG16-sized layers: about 1/4 under fsdp on 4 devices, counted from the shards."""
  from configs import fcn  # pylint: disable=g-import-not-at-top
  config = fcn.get_config()
  config.input.crop_size = (32, 32)
  mesh = sharding.make_mesh(jax.devices()[:4])
  per_device = {}
  for mode in ('replicated', 'fsdp'):
    config.sharding = mode
    state = state_lib.build(settings_lib.from_config(config), NUM_CLASSES, mesh).init_state()
    per_device[mode] = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    total = sum(x.nbytes for x in jax.tree.leaves(state))
  assert per_device['replicated'] == total
  # By hand: an array of at least FSDP_MIN_SIZE elements with a dimension that 4 divides keeps a quarter
  # of its bytes per device; every other array (biases, counters, ...) stays whole on each device.
  split = lambda x: x.size >= sharding.FSDP_MIN_SIZE and any(d % 4 == 0 for d in x.shape)
  expected = sum(x.nbytes // 4 if split(x) else x.nbytes for x in jax.tree.leaves(state))
  assert per_device['fsdp'] == expected
  assert expected < 0.3 * total  # VGG16-sized kernels all split.
  assert sharding.tree_bytes_per_device(state) == per_device['fsdp']


def _buffers(state) -> list:
  """(device id, buffer address) of every shard of every leaf."""
  return [(s.device.id, s.data.unsafe_buffer_pointer()) for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards]


@pytest.mark.parametrize('devices,layout', [(1, 'replicated'), (4, 'replicated'), (4, 'fsdp')])
def test_a_state_from_a_weight_file_with_averages_owns_every_buffer(devices, layout, tmp_path):
  """From an encoder weight file with EMA, no two leaves share a buffer (the donated step would get it twice), on
  any layout; the averages equal the weights and the encoder is the file's. check_distinct_buffers names an alias."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from jaxseg.models import encoders  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: encoders.create_encoder('resnet18').init(jax.random.key(0),
                                                                          jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  file_values = {}
  for key, entry in encoders.key_table('resnet18').items():
    collection, path = entry.collection, entry.path
    leaf = shapes[collection]
    for p in path:
      leaf = leaf[p]
    shape = leaf.shape if len(leaf.shape) != 4 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))  # HWIO -> OIHW.
    file_values[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
  path = str(tmp_path / 'resnet18.safetensors')
  safetensors.numpy.save_file(file_values, path)
  config = tiny_unet_config('', **{'model.encoder': 'resnet18', 'model.encoder_weights': path, 'ema_decay': 0.99,
                                   'sharding': layout})
  state = state_lib.build(settings_lib.from_config(config), NUM_CLASSES,
                          sharding.make_mesh(jax.devices()[:devices])).init_state()

  buffers = _buffers(state)
  assert len(set(buffers)) == len(buffers)
  state_lib.check_distinct_buffers(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params), jax.device_get(state.params))
  np.testing.assert_array_equal(state.params['encoder']['conv1']['kernel'],
                                file_values['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.ema_batch_stats['encoder']['bn1']['var'], file_values['bn1.running_var'])
  with pytest.raises(RuntimeError, match=r"share a device buffer.*\.ema_params\['decoder'\]\['block0'\]"):
    state_lib.check_distinct_buffers(state.replace(ema_params=state.params))
