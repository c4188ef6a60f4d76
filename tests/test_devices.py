"""run.py's CPU start-up: the host's cores become that many JAX devices when the batches split evenly."""

import json
import os
import subprocess
import sys

import pytest

from jaxseg import distributed
from jaxseg.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('cores, batch, eval_batch, processes, expected', [
    (2, 16, 32, 1, 2),    # The default configs on a 2-core machine.
    (8, 16, 32, 1, 8),
    (6, 16, 32, 1, 4),    # 6 does not divide 16: the largest count that does.
    (4, 12, 30, 1, 3),    # Both batches must split: gcd(12, 30) = 6.
    (4, 16, 32, 2, 4),    # Each of 2 processes holds 8 examples of a batch.
    (1, 16, 32, 1, 1),
    (4, 7, 7, 1, 1),
])
def test_cpu_device_count_is_the_most_that_divide_the_batches(cores, batch, eval_batch, processes, expected):
  assert distributed.cpu_device_count(0, (batch, eval_batch), cores, processes) == expected


def test_cpu_device_count_explicit_and_bad_values():
  assert distributed.cpu_device_count(3, (16, 32), cores=2) == 3
  for bad in (-1, 1.5, 'two', True):
    with pytest.raises(ConfigError, match='config.cpu_devices'):
      distributed.cpu_device_count(bad, (16, 32), cores=2)


def _devices_after_split(env_flags, cpu_devices=0):
  """JAX's CPU device count in a fresh process after split_cpu_into_devices (XLA_FLAGS as given)."""
  code = ('import json; from jaxseg import distributed\n'
          f'distributed.split_cpu_into_devices({cpu_devices}, (16, 32))  # batch_size, eval_batch_size\n'
          'import jax, os\n'
          'print(json.dumps([jax.device_count("cpu"), os.environ.get("XLA_FLAGS", "")]))\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if env_flags is not None:
    env['XLA_FLAGS'] = env_flags
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_split_makes_one_device_per_core_unless_the_user_chose():
  cores = len(os.sched_getaffinity(0))
  count, flags = _devices_after_split(None)
  # By hand: batches 16 and 32 split evenly over d devices for d = 1, 2, 4, 8, 16; the most this host's cores allow.
  assert count == max(d for d in (1, 2, 4, 8, 16) if d <= cores)
  assert flags == ('' if count == 1 else f'--xla_force_host_platform_device_count={count}')
  # The user's XLA_FLAGS win, and other flags in it are kept.
  count, flags = _devices_after_split('--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3')
  assert count == 3 and flags.startswith('--xla_cpu_enable_fast_math=false')
  # cpu_devices=1: one device, XLA_FLAGS untouched.
  count, flags = _devices_after_split(None, cpu_devices=1)
  assert count == 1 and flags == ''
