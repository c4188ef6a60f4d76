"""Multi-process start-up: one JAX program across all hosts (jax.distributed).

Call `initialize()` once per process before anything touches a JAX device.
Three ways in:
  * TPU VM pod slices, SLURM and Open MPI: JAXSEG_DISTRIBUTED=1, and JAX
    detects the coordinator, the process count and this process's id.
  * Anything else: JAXSEG_COORDINATOR=host:port (process 0's address),
    JAXSEG_NUM_PROCESSES and JAXSEG_PROCESS_ID on every process.
  * Neither: a plain single-process run (all local devices, nothing to do).
"""

import logging
import os

import jax

from jaxseg.errors import ConfigError

# Set by a launcher for clusters JAX cannot detect by itself.
ENV_COORDINATOR = 'JAXSEG_COORDINATOR'  # host:port of process 0.
ENV_NUM_PROCESSES = 'JAXSEG_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXSEG_PROCESS_ID'
ENV_AUTO = 'JAXSEG_DISTRIBUTED'  # '1': let JAX detect the cluster.

log = logging.getLogger('jaxseg')


def enable_cpu_collectives() -> None:
  """Lets CPU devices of different processes talk (gloo over TCP).

  Without a cross-process collectives implementation the CPU backend of a
  multi-process run has no way to psum across hosts. jax 0.10 defaults to
  gloo; older versions default to none, so it is set here unless the user
  chose one (e.g. 'mpi'). It only matters to the CPU client, which reads it
  when the backend initialises, i.e. after jax.distributed.initialize.
  """
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:  # A JAX without the option: nothing to set.
    return
  if current in (None, '', 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


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
    enable_cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get(ENV_AUTO) == '1':
    enable_cpu_collectives()
    jax.distributed.initialize()  # Auto-detected: TPU pod slices, SLURM, Open MPI, ...
  else:
    return
  log.info('Process %d of %d joined the distributed runtime (%d local devices).', jax.process_index(),
           jax.process_count(), jax.local_device_count())
