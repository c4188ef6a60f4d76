"""Shared test helpers."""

import contextlib
import logging
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DeprecationWarnings attributed to these modules fail the tests (pytest, via conftest) and the worker
# processes (make_deprecations_errors): jaxseg must run on the APIs jax, flax, optax and orbax maintain.
DEPRECATION_MODULES = r'(jax|flax|optax|orbax|jaxseg|tests|configs)(\.|$)'
# Deprecations a dependency's own code triggers (it warns at import, whatever jaxseg does), as (message, module):
# orbax-checkpoint 0.12.8 annotates with jax.sharding.SingleDeviceSharding, which jax 0.12.1 deprecates.
DEPENDENCY_DEPRECATIONS = ((r'jax\.sharding\.SingleDeviceSharding is deprecated', r'orbax\.'),)

# XLA:CPU's LLVM back end at -O1 instead of -O2 in every test process: the suite's small models spend most
# of their time compiling, and this cuts test_sharding.py from 52 s to 32 s. The programs (HLO, fusion) are
# the ones jaxseg runs; the 6-step tiny run logs the same losses as at -O2. Not -O0: with jax 0.10.2 it
# miscompiles the train step (a NaN loss at step 3 of the tiny UNet). Benchmarks never time with it.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=1'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}'


# CI (.ci/run) installs PyTorch and sets this: the PyTorch checks must then run, never skip.
REQUIRE_TORCH = os.environ.get('JAXSEG_REQUIRE_TORCH') == '1'


def import_torch_or_skip(name: str = 'torch'):
  """`name` (torch, or a module that needs it); a skip without PyTorch, a failure when REQUIRE_TORCH."""
  if REQUIRE_TORCH:
    return __import__(name)
  import pytest  # pylint: disable=g-import-not-at-top
  return pytest.importorskip(name)


def make_deprecations_errors() -> None:
  """In a worker process: DeprecationWarnings from DEPRECATION_MODULES raise."""
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.filterwarnings('error', category=DeprecationWarning, module=DEPRECATION_MODULES)
  for message, module in DEPENDENCY_DEPRECATIONS:
    warnings.filterwarnings('ignore', message=message, category=DeprecationWarning, module=module)


@contextlib.contextmanager
def jaxseg_log_records():
  """The jaxseg logger's records (INFO and above) while the block runs. A handler of its own, not pytest's caplog:
  run.py's console logging (reporting.setup_console_logging) stops jaxseg's records reaching the root logger."""
  records = []
  handler = logging.Handler(logging.INFO)
  handler.emit = records.append
  logger = logging.getLogger('jaxseg')
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield records
  finally:
    logger.setLevel(level)
    logger.removeHandler(handler)


def load_checkpoint(workdir, step=None):
  """The raw saved train state (nested dict of numpy arrays) of WORKDIR's latest (or given) checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(str(workdir), 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  step = steps[-1] if step is None else step
  path = os.path.join(directory, str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  # Numpy targets of the saved shapes: read whatever device layout wrote the arrays, on any device count.
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, 'item_metadata', metadata)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
  return checkpointer.restore(path, target), step


def max_abs_diff(tree_a, tree_b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b)
  return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(leaves_a, leaves_b))


def best_checkpoint_logits_fn(config, workdir):
  """uint8 images [N, H, W, 3] -> float32 logits [N, H, W, K] of WORKDIR's best checkpoint.

  An independent path: the raw arrays as orbax reads them (no jaxseg restore), applied with the bare
  Flax module (no Predictor).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxseg import checkpoint, models, settings, state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxseg.data import datasets  # pylint: disable=g-import-not-at-top
  ckpts = checkpoint.Checkpoints(str(workdir), read_only=True)
  best = ckpts.best_step()
  ckpts.close()
  raw, _ = load_checkpoint(workdir, step=best)
  variables = {'params': raw['params'], 'batch_stats': raw['batch_stats']}
  model = state_lib.build_model(settings.from_config(config), datasets.resolve_spec(config.dataset).num_classes)
  fn = jax.jit(lambda x: model.apply(variables, models.normalize_images(x, jnp.float32), train=False))
  return lambda images: np.asarray(fn(np.asarray(images)))

def save_state_dict(state_dict, path):
  """torch.save for .pth, safetensors for .safetensors (the two formats a user downloads)."""
  import torch  # pylint: disable=g-import-not-at-top
  path = str(path)
  if path.endswith('.safetensors'):
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  else:
    torch.save(state_dict, path)
  return path
