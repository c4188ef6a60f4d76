"""Checkpoints: one orbax CheckpointManager owns saving, keeping, best-by-metric and restoring.

The train state is saved as the global arrays it is (each array once,
whatever its sharding) and restored straight into the layout the caller asks
for (`abstract_state`: shapes, dtypes and shardings from `state.build`), so a
checkpoint restores onto any number of devices, any mesh, replicated or
fsdp. The manager keeps the last `keep`
checkpoints plus the one with the best validation mean IoU.

Several processes: every process calls save and restore; orbax writes each
shard once and every process reads what its devices hold, so WORKDIR must be
on a file system all hosts share (NFS, a mounted bucket). Saves are atomic:
orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete, and
the next run deletes such leftovers (a process killed mid-save).
"""

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxseg.errors import CheckpointError, ConfigError

log = logging.getLogger('jaxseg')


BEST_METRIC = 'mean_iou'
UNREADABLE_SUFFIX = '.unreadable'  # A checkpoint that failed to restore is renamed <step>.unreadable.


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler for the train state (StandardSave's format); on one host, each array is saved from one replica.

  Orbax's default for accelerators other than GPUs is replica-parallel saving:
  each of R replicas writes 1/R of every array they all hold, which spreads a
  replicated state's writing over the hosts of a pod. On one host that gains
  nothing and costs a slice per array and device, each compiled per shape at
  the first save.
  """
  handlers = {t: ocp.type_handlers.get_type_handler(t) for t in ocp.type_handlers.supported_types()}
  if jax.process_count() == 1:
    handlers[jax.Array] = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  registry = ocp.type_handlers.create_type_handler_registry(*handlers.items())
  return ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                     type_handler_registry=registry)


def has_steps(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a finished save (a folder named by its step; unfinished ones have a suffix)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class Checkpoints:
  """The checkpoints of one workdir (WORKDIR/checkpoints/<step>)."""

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._read_only = read_only
    best_fn = lambda metrics: metrics[BEST_METRIC]
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode='max', create=not read_only, read_only=read_only,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=max(1, keep)),
            checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
        ]),
        # Orbax removes unfinished (tmp) saves, e.g. after a kill -9 mid-write.
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_state_handler())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metrics: Optional[dict] = None) -> None:
    """Saves the state (global arrays; orbax copies them to the host before returning, so the next step may
    donate them) asynchronously; `metrics` with mean_iou make it a candidate for best."""
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if step in self._manager.all_steps():
      # A safety net (a resumed run starts after its newest readable step; unreadable ones are set
      # aside): orbax refuses to save over a step, and training is deterministic, so the new save
      # holds what the old one should have.
      log.warning('Replacing the checkpoint at step %d in %s.', step, self.directory)
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.PyTreeSave(state), metrics=metrics, force=True)

  def wait(self) -> None:
    """Blocks until every save in flight is on disk."""
    self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: Optional[int] = None, *, fall_back: bool = True) -> tuple[Any, int]:
    """Restores `step` (default: the latest) into `abstract_state`'s structure, shapes, dtypes and shardings.

    A checkpoint that fails to restore (corrupted, or cut short) is reported
    with a warning naming it, and with `fall_back` the next older one is tried.
    A writable manager then renames the unreadable ones to
    `<step>.unreadable` (kept for inspection), so that they neither count
    towards `keep` nor block saving that step again. With several processes,
    a step counts as restored only when every process read it, so all of
    them continue from the same step.

    Returns:
      (state as global arrays, restored step).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'no checkpoint for step {step} in {self.directory}; there are {steps}')
      steps = [s for s in steps if s <= step]
    errors, unreadable = [], []
    for s in reversed(steps):
      error = None
      try:
        # Every array is read here, inside the try: a damaged file fails now, not halfway through
        # the first training step.
        restored = jax.block_until_ready(self._manager.restore(s, args=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))))
      except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types for a damaged checkpoint.
        error = f'{type(e).__name__}: {e}'
      all_ok = _all_processes_ok(error is None)
      if error is None and not all_ok:
        error = 'another process could not read it'
      if error is None:
        self._set_aside(unreadable)
        return restored, s
      path = os.path.join(self.directory, str(s))
      log.warning('Checkpoint %s could not be restored (%s)%s', path, error,
                  '; trying the previous one.' if fall_back else '.')
      errors.append(f'{path}: {error}')
      unreadable.append(s)
      if not fall_back:
        break
    hint = ''
    if any('tree structures do not match' in e for e in errors):
      hint = ('\nThe checkpoint holds another layout of variables than this config builds (above: Source is the '
              'model here, Target the checkpoint): another model, or a checkpoint from before the change of jaxseg\'s '
              'model layer that moved the UNet-on-encoder and FCN-VGG16 decoders under params/decoder. '
              'Use the config it was trained with, or train anew in another workdir.')
    raise CheckpointError('no checkpoint could be restored:\n' + '\n'.join(errors) + hint)

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable checkpoints to <step>.unreadable (process 0), then re-lists the steps."""
    if not steps or self._read_only:
      return
    if jax.process_index() == 0:
      for s in steps:
        path = os.path.join(self.directory, str(s))
        target, n = path + UNREADABLE_SUFFIX, 1
        while os.path.exists(target):
          target, n = f'{path}{UNREADABLE_SUFFIX}-{n}', n + 1
        os.rename(path, target)
        log.warning('Moved the unreadable checkpoint %s to %s.', path, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('jaxseg_checkpoints_set_aside')
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_trained(workdir: str, abstract_state: Any, *, checkpoint: str = 'best') -> tuple[Any, int]:
  """The state of `workdir`'s best (or latest) checkpoint, in `abstract_state`'s layout (eval, predict, export).

  'best' falls back to the latest checkpoint (with a warning) when none was
  scored by an evaluation yet.

  Returns:
    (state, restored step).
  """
  workdir = os.path.abspath(workdir)
  if checkpoint not in ('best', 'latest'):
    raise ConfigError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(f'no checkpoints in {workdir}: train first (--mode=train) or pass the right --workdir')
  ckpts = Checkpoints(workdir, read_only=True)
  try:
    step = ckpts.best_step() if checkpoint == 'best' else ckpts.latest_step()
    if step is None and checkpoint == 'best':
      step = ckpts.latest_step()
      if step is not None:
        log.warning('No evaluated checkpoint in %s yet: using the latest (step %d).', ckpts.directory, step)
    if step is None:
      raise CheckpointError(f'no checkpoint in {ckpts.directory}')
    return ckpts.restore(abstract_state, step)
  finally:
    ckpts.close()
