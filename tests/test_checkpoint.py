"""Checkpoints written by jaxseg 0.1 (pmap era: host numpy arrays) restore into today's layouts and predict the same;
saving on one host compiles nothing."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxseg import checkpoint
from jaxseg import sharding
from jaxseg import state as state_lib
from jaxseg.api import Segmenter, load_workdir_config
from tests.helpers import load_checkpoint, max_abs_diff

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'pmap_era_checkpoint')


@pytest.fixture()
def old_workdir(tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(FIXTURE, workdir)
  return str(workdir)


def test_a_pmap_era_checkpoint_predicts_what_that_code_predicted(old_workdir):
  """The logits the commit that wrote the checkpoint computed (stored beside it) come out of today's Segmenter."""
  expected = np.load(os.path.join(old_workdir, 'expected_logits.npz'))
  seg = Segmenter.from_workdir(old_workdir, checkpoint='latest')
  assert seg.step == int(expected['step']) == 2
  np.testing.assert_allclose(seg.predictor.scores(expected['image']), expected['logits'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode, devices', [('replicated', 1), ('fsdp', 4)])
def test_a_pmap_era_checkpoint_restores_on_any_mesh(old_workdir, mode, devices, monkeypatch):
  """Restored as global arrays (fsdp: split over 4 devices), the values are the ones orbax reads from the files."""
  monkeypatch.setattr(sharding, 'FSDP_MIN_SIZE', 64)  # Split even the tiny model's kernels.
  config = load_workdir_config(old_workdir)
  config.sharding = mode
  setup = state_lib.build(config, 4, sharding.make_mesh(jax.devices()[:devices]))
  state, step = checkpoint.restore_trained(config, old_workdir, setup.abstract_state, checkpoint='latest')
  raw, raw_step = load_checkpoint(old_workdir)
  assert step == raw_step == 2
  assert max_abs_diff(jax.device_get(state.params), raw['params']) == 0.0
  assert max_abs_diff(jax.device_get(state.batch_stats), raw['batch_stats']) == 0.0
  assert int(state.step) == 2
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
