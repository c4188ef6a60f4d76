"""Device start-up: CPU cores as devices, and one JAX program across all hosts (jax.distributed).

Call `split_cpu_into_devices(cpu_devices, batch_sizes)` and then `initialize()` once per process
before anything touches a JAX device (run.py does).

`initialize()`:
Three ways in:
  * TPU VM pod slices, SLURM and Open MPI: JAXSEG_DISTRIBUTED=1, and JAX
    detects the coordinator, the process count and this process's id.
  * Anything else: JAXSEG_COORDINATOR=host:port (process 0's address),
    JAXSEG_NUM_PROCESSES and JAXSEG_PROCESS_ID on every process.
  * Neither: a plain single-process run (all local devices, nothing to do).
"""

import logging
import math
import os

import jax

from jaxseg.errors import ConfigError

# Set by a launcher for clusters JAX cannot detect by itself.
ENV_COORDINATOR = 'JAXSEG_COORDINATOR'  # host:port of process 0.
ENV_NUM_PROCESSES = 'JAXSEG_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXSEG_PROCESS_ID'
ENV_AUTO = 'JAXSEG_DISTRIBUTED'  # '1': let JAX detect the cluster.

CPU_DEVICE_FLAG = '--xla_force_host_platform_device_count'

log = logging.getLogger('jaxseg')


def cpu_device_count(requested, batch_sizes: tuple[int, ...], cores: int, processes: int = 1) -> int:
  """How many devices the CPU backend exposes: `requested` (config.cpu_devices), or for 0 the most that fit.

  'The most that fit' is the largest count <= `cores` that divides the
  per-process share of both batch_size and eval_batch_size, so the batches
  split evenly (e.g. 2 on a 2-core machine with batch 16).
  """
  if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
    raise ConfigError(f'config.cpu_devices must be an integer >= 0 (0: one per core), got {requested!r}')
  if requested:
    return requested
  per_process = math.gcd(*(int(b) for b in batch_sizes)) // max(1, processes)
  return max([d for d in range(1, max(1, cores) + 1) if per_process % d == 0] or [1])


def split_cpu_into_devices(cpu_devices, batch_sizes: tuple[int, ...]) -> None:
  """Lets the CPU backend expose several devices, one per core, so a CPU-only run uses every core.

  XLA:CPU runs most of a small network's convolutions on one thread; the
  step sharded over several devices runs each device's share on its own
  thread, so a CPU-only run uses every core. The math is unchanged: the global batch is split and
  BatchNorm statistics, gradients and the loss are over the global batch.
  Only the CPU backend is affected: on GPU/TPU hosts the accelerators stay
  the devices. Does nothing when XLA_FLAGS already sets the count; XLA reads
  the flag when JAX's backends start, so it must run before the first JAX
  computation.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_DEVICE_FLAG in flags:
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  count = cpu_device_count(cpu_devices, batch_sizes, cores, int(os.environ.get(ENV_NUM_PROCESSES, '1') or 1))
  if count > 1:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_DEVICE_FLAG}={count}'.strip()


def _int_env(name: str) -> int:
  value = os.environ.get(name)
  if value is None:
    raise ConfigError(f'{ENV_COORDINATOR} is set, so {name} must be set too (on every process)')
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'{name}={value!r} is not an integer') from None


def initialize() -> None:
  """Joins the multi-process runtime when there is one; a plain single-process run otherwise.

  Raises:
    ConfigError: the JAXSEG_* variables are incomplete or inconsistent.
  """
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get(ENV_COORDINATOR)
  if coordinator:
    num_processes, process_id = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get(ENV_AUTO) == '1':
    jax.distributed.initialize()  # Auto-detected: TPU pod slices, SLURM, Open MPI, ...
  else:
    return
  log.info('Process %d of %d joined the distributed runtime (%d local devices).', jax.process_index(),
           jax.process_count(), jax.local_device_count())
