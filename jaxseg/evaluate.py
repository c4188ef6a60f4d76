"""Evaluation: the pmapped eval step, the evaluation loop, and the --mode=eval job.

Every device accumulates a confusion matrix; the psum over the pmap axis
adds them up over all devices of all hosts, and padding pixels carry the
ignore label, so each real pixel counts exactly once.
"""

import functools
import logging
import os

from flax import jax_utils
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

from jaxseg import checkpoint as checkpoint_lib
from jaxseg import config_utils
from jaxseg import losses
from jaxseg import metrics as metrics_lib
from jaxseg import optim
from jaxseg import reporting
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.errors import CheckpointError
from jaxseg import state as state_lib
from jaxseg.state import AXIS, TrainState, normalize_images, variables_of

log = logging.getLogger('jaxseg')


def make_eval_step(config, spec: datasets.DatasetSpec):
  """The pmapped evaluation step for this config."""
  return jax.pmap(functools.partial(eval_step, num_classes=spec.num_classes, ignore_label=spec.ignore_label,
                                    dtype=state_lib.compute_dtype(config)), axis_name=AXIS)


def eval_step(state: TrainState, batch: dict, *, num_classes: int, ignore_label: int, dtype) -> dict:
  """Confusion matrix and cross-entropy sums of one batch, summed over all devices."""
  images = normalize_images(batch['image'], dtype)
  labels = batch['label'].astype(jnp.int32)
  logits = state.apply_fn(variables_of(state), images, train=False)
  return lax.psum(eval_sums(logits, labels, num_classes=num_classes, ignore_label=ignore_label), AXIS)


def eval_sums(logits: jnp.ndarray, labels: jnp.ndarray, *, num_classes: int, ignore_label: int) -> dict:
  ce_sum, weight_sum = losses.cross_entropy_sums(logits, labels, ignore_label=ignore_label)
  preds = jnp.argmax(logits, axis=-1)
  return {'confusion': metrics_lib.confusion_matrix(labels, preds, num_classes, ignore_label),
          'ce_sum': ce_sum, 'weight_sum': weight_sum}


def run_evaluation(p_eval, state: TrainState, eval_ds, num_batches: int, spec: datasets.DatasetSpec) -> dict:
  """Evaluates the replicated `state` on the whole evaluation split; returns host metrics."""
  totals = None
  for batch in pipeline.as_numpy(eval_ds):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  # Every device holds the same psum'd totals: read device 0's copy.
  totals = jax.device_get(jax.tree.map(lambda x: x[0], totals))
  result = metrics_lib.metrics_from_confusion(totals['confusion'], spec.class_names)
  result['loss'] = float(totals['ce_sum'] / max(totals['weight_sum'], 1.0))
  result['confusion_matrix'] = totals['confusion'].tolist()
  del num_batches
  return result


def log_eval(writer: reporting.MetricWriter, step: int, result: dict, spec, is_primary: bool) -> None:
  scalars = {k: v for k, v in result.items() if k not in ('confusion_matrix', 'class_names')}
  writer.write(step, 'eval', scalars)
  if is_primary:
    log.info('eval at step %d | loss %.4f | mean IoU %.4f | pixel acc %.4f | mean class acc %.4f', step,
                 result['loss'], result['mean_iou'], result['pixel_accuracy'], result['mean_class_accuracy'])


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str = 'best') -> dict:
  """Restores the best (or latest) checkpoint of `workdir`, evaluates it, prints a per-class table."""
  config_utils.validate(config)
  pipeline.hide_accelerators_from_tf()
  workdir = os.path.abspath(workdir)
  is_primary = jax.process_index() == 0
  config_utils.check_batch(config, jax.device_count(), jax.process_count())
  spec, builder = datasets.open_dataset(config.dataset)
  model = state_lib.build_model(config, spec.num_classes)
  learning_rate_fn = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  state = state_lib.create_train_state(model, tx, jax.random.key(config.seed), tuple(config.input.crop_size) + (3,))
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(f'no checkpoints in {workdir}: train first (--mode=train) or pass the right --workdir')
  ckpts = checkpoint_lib.Checkpoints(workdir, read_only=True)
  step = ckpts.best_step() if checkpoint == 'best' else ckpts.latest_step()
  if step is None:
    raise CheckpointError(f'no checkpoint in {ckpts.directory}')
  state, step = ckpts.restore(state_lib.host_state_like(state), step)
  log.info('Evaluating the %s checkpoint: step %d of %s', checkpoint, step, ckpts.directory)
  state = jax_utils.replicate(state)
  p_eval = make_eval_step(config, spec)
  eval_ds, eval_batches = pipeline.eval_dataset(
      builder, spec, config.input, global_batch=config.eval_batch_size, local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), cache=False)
  result = run_evaluation(p_eval, state, eval_ds, eval_batches, spec)
  result['checkpoint_step'] = step
  writer = reporting.MetricWriter(workdir, enabled=is_primary)
  log_eval(writer, step, result, spec, is_primary)
  writer.close()
  if is_primary:
    print(f'Checkpoint step {step} ({checkpoint}): mean IoU {result["mean_iou"]:.4f}, pixel accuracy '
          f'{result["pixel_accuracy"]:.4f}, mean class accuracy {result["mean_class_accuracy"]:.4f}')
    print(reporting.format_iou_table(result['per_class_iou'], spec.class_names, result['per_class_accuracy']))
  ckpts.close()
  return result
