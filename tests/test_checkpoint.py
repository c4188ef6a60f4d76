"""A checkpoint restores into any layout (device count, replicated or fsdp) with the values saved; saving on one host
compiles nothing.

References: the arrays as orbax reads them from the files (tests/helpers.load_checkpoint: no jaxseg restore), and
the per-device share of each array worked out by hand from the fsdp rule.
"""

import os

import jax
import numpy as np
import pytest

from jaxseg import checkpoint
from jaxseg import settings as settings_lib
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg.data import datasets
from tests.conftest import tiny_unet_config
from tests.helpers import load_checkpoint, max_abs_diff


@pytest.fixture(scope='module')
def saved_on_one_device(tmp_path_factory):
  """A train state of the tiny UNet's layout, random values in every leaf (no initialiser compiled), saved as step 2
  (scored) from one device, replicated; (settings, num_classes, workdir)."""
  base = tmp_path_factory.mktemp('ckpt')
  settings = settings_lib.from_config(tiny_unet_config(str(base / 'tfds')))
  num_classes = datasets.resolve_spec(settings.dataset).num_classes
  setup = state_lib.build(settings, num_classes, sharding.make_mesh(jax.devices()[:1]), sharding='replicated')
  rng = np.random.default_rng(0)

  def random_leaf(x):
    value = (rng.integers(0, 1000, size=x.shape) if np.issubdtype(x.dtype, np.integer)
             else rng.normal(size=x.shape)).astype(x.dtype)
    return jax.device_put(value, x.sharding)

  workdir = str(base / 'wd')
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    ckpts.save(2, jax.tree.map(random_leaf, setup.abstract_state), {'mean_iou': 0.5})
    ckpts.wait()
  finally:
    ckpts.close()
  return settings, num_classes, workdir


@pytest.mark.parametrize('mode, devices', [('replicated', 1), ('fsdp', 4)])
def test_a_checkpoint_restores_on_any_mesh(saved_on_one_device, mode, devices, monkeypatch):
  """Restored as global arrays (fsdp: split over 4 devices), the values are the ones orbax reads from the files."""
  settings, num_classes, workdir = saved_on_one_device
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 64)  # Split even the tiny model's kernels.
  setup = state_lib.build(settings, num_classes, sharding.make_mesh(jax.devices()[:devices]), sharding=mode)
  state, step = checkpoint.restore_trained(workdir, setup.abstract_state, checkpoint='best')
  raw, raw_step = load_checkpoint(workdir)
  assert step == raw_step == 2
  assert max_abs_diff(jax.device_get(state.params), raw['params']) == 0.0
  assert max_abs_diff(jax.device_get(state.batch_stats), raw['batch_stats']) == 0.0
  assert max_abs_diff(jax.device_get(state.opt_state), raw['opt_state']) == 0.0
  assert int(state.step) == int(raw['step'])
  # By hand: under fsdp on 4 devices an array of at least 64 elements with a dimension 4 divides keeps a
  # quarter of its bytes per device; the rest, and everything when replicated, stays whole on each device.
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  expected_split = [jax.tree_util.keystr(path) for path, x in leaves
                    if mode == 'fsdp' and x.size >= 64 and any(d % 4 == 0 for d in x.shape)]
  assert [jax.tree_util.keystr(path) for path, x in leaves if not x.sharding.is_fully_replicated] == expected_split
  for path, x in leaves:
    parts = 4 if jax.tree_util.keystr(path) in expected_split else 1
    assert x.addressable_shards[0].data.nbytes == x.nbytes // parts, jax.tree_util.keystr(path)
  assert len(expected_split) > 0 if mode == 'fsdp' else not expected_split


def test_saving_a_replicated_state_on_one_host_compiles_nothing(tmp_path):
  """Orbax's replica-parallel default would slice every array across the 4 replicas, compiling a slice program per
  array shape and device at the first save (3.5 s of a ResNet-18 UNet's first save); on one host each array is
  written whole from one replica, and reads back as saved."""
  mesh = sharding.make_mesh()
  assert mesh.size == 4  # conftest's simulated devices.
  rng = np.random.default_rng(0)
  # Dimensions that 4 divides (orbax slices along one), in shapes no other test saves (no slice program of theirs
  # is cached in this process).
  host = {'kernel': rng.normal(size=(3, 5, 7, 44)).astype(np.float32),
          'bias': rng.normal(size=(52,)).astype(np.float32), 'step': np.int32(17)}
  state = jax.device_put(host, sharding.replicated(mesh))
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event) if event.startswith('/jax/core/compile') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  ckpts = checkpoint.Checkpoints(str(tmp_path))
  try:
    ckpts.save(1, state)
    ckpts.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    ckpts.close()
  assert not compiles, compiles
  raw, step = load_checkpoint(tmp_path)
  assert step == 1
  for key, value in host.items():
    np.testing.assert_array_equal(raw[key], value)


def test_a_checkpoint_of_another_layout_stops_naming_the_paths_and_stays(tmp_path):
  """A checkpoint whose variables are laid out otherwise (here as the UNet-on-encoder's were before its decoder
  moved under params/decoder) is refused naming both paths, with the reason, and is left where it is."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  old = {'params': {'decoder_block0': {'kernel': jnp.ones(3)}, 'encoder': {'w': jnp.ones(2)}}}
  saver = checkpoint.Checkpoints(str(tmp_path), keep=2)
  saver.save(1, old, {'mean_iou': 0.5})
  saver.wait()
  saver.close()
  new = {'params': {'decoder': {'block0': {'kernel': jax.ShapeDtypeStruct((3,), jnp.float32)}},
                    'encoder': {'w': jax.ShapeDtypeStruct((2,), jnp.float32)}}}
  checkpoints = checkpoint.Checkpoints(str(tmp_path), keep=2)
  with pytest.raises(checkpoint.CheckpointError, match=r'(?s)params\.decoder_block0.*another layout of variables'):
    checkpoints.restore(new)
  checkpoints.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
