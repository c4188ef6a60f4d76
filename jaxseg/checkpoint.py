"""Checkpoints: one orbax CheckpointManager owns saving, keeping, best-by-metric and restoring.

The train state is saved unreplicated (one copy of every array), so a
checkpoint restores onto any number of devices. The manager keeps the last
`keep` checkpoints plus the one with the best validation mean IoU.
"""

import os
from typing import Any, Optional

import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxseg.errors import CheckpointError

log = logging.getLogger('jaxseg')


class _QuietUnscoredSaves(logging.Filter):
  """Checkpoints between evaluations have no metrics by design; orbax warns about each one."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUnscoredSaves())

BEST_METRIC = 'mean_iou'


class Checkpoints:
  """The checkpoints of one workdir (WORKDIR/checkpoints/<step>)."""

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
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
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metrics: Optional[dict] = None) -> None:
    """Saves the (unreplicated, host) state; `metrics` with mean_iou make it a candidate for best."""
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def wait(self) -> None:
    """Blocks until every save in flight is on disk."""
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: Optional[int] = None, *, fall_back: bool = True) -> tuple[Any, int]:
    """Restores `step` (default: the latest) into the structure of `target`.

    A checkpoint that fails to restore (corrupted, or cut short) is reported
    with a warning naming it, and with `fall_back` the next older one is tried.

    Returns:
      (state, restored step).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'no checkpoint for step {step} in {self.directory}; there are {steps}')
      steps = [s for s in steps if s <= step]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    errors = []
    for s in reversed(steps):
      try:
        return self._manager.restore(s, args=ocp.args.StandardRestore(abstract)), s
      except Exception as e:  # Orbax raises many types for a damaged checkpoint.
        path = os.path.join(self.directory, str(s))
        log.warning('Checkpoint %s could not be restored (%s: %s)%s', path, type(e).__name__, e,
                        '; trying the previous one.' if fall_back else '.')
        errors.append(f'{path}: {type(e).__name__}: {e}')
        if not fall_back:
          break
    raise CheckpointError('no checkpoint could be restored:\n' + '\n'.join(errors))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
