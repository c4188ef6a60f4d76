"""Multi-process start-up: one JAX program across all hosts (jax.distributed)."""

import os

import logging
import jax

# Set by a launcher for clusters JAX cannot detect by itself.
ENV_COORDINATOR = 'JAXSEG_COORDINATOR'  # host:port of process 0.
ENV_NUM_PROCESSES = 'JAXSEG_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXSEG_PROCESS_ID'


log = logging.getLogger('jaxseg')

def initialize() -> None:
  """Joins the multi-process runtime when there is one; a plain single-process run otherwise.

  TPU VM pods and SLURM are detected by JAX itself (JAXSEG_DISTRIBUTED=1, or
  any cluster variable it knows); elsewhere set JAXSEG_COORDINATOR,
  JAXSEG_NUM_PROCESSES and JAXSEG_PROCESS_ID on every process.
  """
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get(ENV_COORDINATOR)
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ[ENV_NUM_PROCESSES]),
                               process_id=int(os.environ[ENV_PROCESS_ID]))
  elif os.environ.get('JAXSEG_DISTRIBUTED') == '1':
    jax.distributed.initialize()  # Auto-detected: TPU pod slices, SLURM, Open MPI, ...
  else:
    return
  log.info('Process %d of %d joined the distributed runtime.', jax.process_index(), jax.process_count())
