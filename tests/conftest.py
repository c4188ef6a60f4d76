"""Test set-up: 4 simulated CPU devices, repo root importable, one prepared copy of the embedded dataset."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.helpers import DEPENDENCY_DEPRECATIONS, DEPRECATION_MODULES, import_torch_or_skip, xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Before jax is imported anywhere: several CPU devices make the sharded paths real.
os.environ.setdefault('XLA_FLAGS', xla_flags(4))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# `import tensorflow` also imports Keras 3 eagerly (1.3 s of its 3.8 s), in pytest and in every worker process
# (they inherit this environment). jaxseg uses no Keras; with this, tf.keras would mean tf_keras, which is not
# installed, so TensorFlow skips that import, and any use of Keras by jaxseg would fail the tests.
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('filterwarnings', f'error::DeprecationWarning:{DEPRECATION_MODULES}')
  for message, module in DEPENDENCY_DEPRECATIONS:  # Later lines take precedence.
    config.addinivalue_line('filterwarnings', f'ignore:{message}:DeprecationWarning:{module}')


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


@pytest.fixture(name='ref')
def torch_reference():
  """tests/torch_reference.py (needs PyTorch; see helpers.import_torch_or_skip)."""
  import_torch_or_skip('torch')
  from tests import torch_reference as reference  # pylint: disable=g-import-not-at-top
  return reference


# configs/unet.py shrunk so that a few steps run in seconds, with the training recipe that the tests' reference
# values assume written out (SGD at 0.1, no moving average, fixed sizes, no class weighting), whatever
# configs/unet.py's own recipe is. Tests of AdamW, the EMA and the auto recipe set those fields themselves.
TINY_UNET = {
    'model.base_width': 4, 'model.depth': 2, 'input.crop_size': (32, 32), 'input.eval_size': (96, 96),
    'batch_size': 8, 'eval_batch_size': 40, 'num_train_steps': 4, 'log_every_steps': 2, 'eval_every_steps': 4,
    'checkpoint_every_steps': 2, 'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.1,
    'optimizer.weight_decay': 1e-4, 'optimizer.warmup_steps': 2, 'ema_decay': 0.0, 'loss.class_weighting': 'none'}


def tiny_flags(**overrides) -> list:
  """run.py's --config.FIELD=VALUE flags for configs/unet.py giving tiny_unet_config's config."""
  fields = {**TINY_UNET, **overrides}
  fmt = lambda v: f'({v[0]},{v[1]})' if isinstance(v, tuple) else str(v)
  return [f'--config.{k}={fmt(v)}' for k, v in fields.items()]


def tiny_unet_config(data_dir: str, **overrides):
  """configs/unet.py shrunk (TINY_UNET), then `overrides` ({'optimizer.learning_rate': 0.01, ...})."""
  from configs import unet  # pylint: disable=g-import-not-at-top
  config = unet.get_config()
  config.dataset.data_dir = data_dir
  return set_fields(config, {**TINY_UNET, **overrides})


def set_fields(config, fields: dict):
  """Sets dotted fields ({'model.depth': 2, ...}) of an ml_collections config in place; returns it."""
  for key, value in fields.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config
