"""Test set-up: 4 simulated CPU devices, repo root importable, one prepared copy of the embedded dataset."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.helpers import DEPRECATION_MODULES, xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Before jax is imported anywhere: several CPU devices make the sharded paths real.
os.environ.setdefault('XLA_FLAGS', xla_flags(4))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('filterwarnings', f'error::DeprecationWarning:{DEPRECATION_MODULES}')


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory):
  """A tfds data dir holding jaxseg_shapes, prepared (as ArrayRecord) by jaxseg's own opening path, once per session."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = default.get_config()
  config.dataset.data_dir = data_dir
  datasets.open_dataset(config.dataset)
  return data_dir


@pytest.fixture(scope='session', autouse=True)
def session_compilation_cache(tmp_path_factory):
  """Compiled XLA programs, in-process and in workers, go to this session's cache, never ~/.cache/jaxseg."""
  import jax  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(tmp_path_factory.getbasetemp() / 'jax_compilation_cache'))
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  return os.environ['JAX_COMPILATION_CACHE_DIR']


def tiny_unet_config(data_dir: str, **overrides):
  """configs/unet.py shrunk so that a few steps run in seconds."""
  from configs import unet  # pylint: disable=g-import-not-at-top
  config = unet.get_config()
  config.dataset.data_dir = data_dir
  config.model.base_width = 4
  config.model.depth = 2
  config.input.crop_size = (32, 32)
  config.batch_size = 8
  config.eval_batch_size = 40
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config
