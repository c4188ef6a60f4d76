"""Training: the jitted train step and the training job.

`train_and_evaluate(config, workdir)` is the whole training job; run.py,
notebooks and tests call it the same way. The loop reads top to bottom in
labelled sections. Device arrays are fetched to the host only at log,
evaluation and checkpoint steps, never inside a plain training step.
"""

import contextlib
import dataclasses
import functools
import logging
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import evaluate
from jaxseg import losses
from jaxseg import reporting
from jaxseg import sharding
from jaxseg import startup
from jaxseg import state as state_lib
from jaxseg import time_budget
from jaxseg.data import datasets
from jaxseg.data import pipeline
from jaxseg.models import AUXILIARY, ENCODER, normalize_images
from jaxseg.settings import AUTO, Settings
from jaxseg.state import TrainState, variables_of

log = logging.getLogger('jaxseg')


# ---------------------------------------------------------------------------
# The train step: one jit program over the mesh, on global arrays.
# ---------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, *, input_stats: tuple, ignore_label: int,
               class_weights: Optional[tuple[float, ...]], dtype, learning_rate_fn: Callable,
               dropout_seed: int, frozen: Any = None, gathered_params: Any = None, param_sharding: Any = None,
               ema_decay: float = 0.0, freeze_encoder_batch_stats: bool = False,
               auxiliary_weight: float = 0.0, loss_terms: tuple = (('cross_entropy', 1.0),),
               loss_params: losses.LossParams = losses.LossParams(), multilabel: bool = False,
               whole_batch: Any = None) -> tuple[TrainState, dict]:
  """One optimiser step on the global batch (images uint8 [B, H, W, C], labels uint8 [B, H, W], or [B, H, W, K]
  of 0 / 1 / ignore_label with `multilabel`).

  Written as single-device code on global arrays: the loss (`loss_terms`, losses.combined_loss) is over the
  non-ignored pixels of the whole batch (a cross-entropy's mean, Dice's sums, Lovász's sorted errors), BatchNorm
  statistics are over the whole batch, and XLA's partitioner adds the cross-device sums. `whole_batch` (a
  replicated sharding) is where a loss term that sorts the whole batch (Lovász) computes: see losses.term_loss. Under FSDP (`gathered_params`/`param_sharding` set) the parameters are
  gathered for the forward and backward passes and the gradients
  reduce-scattered back to the parameters' shards. With `ema_decay` > 0 (an
  EmaTrainState) the moving averages follow the updated weights (`update_ema`).

  Fine-tuning: no gradient flows into the parameters `frozen` marks (a bool
  per parameter: frozen for the whole run by the optimiser's rules, which is
  what keeps them fixed; their gradient is zero, so XLA drops its computation);
  with `freeze_encoder_batch_stats` batch_stats['encoder'] stays as it was.

  `auxiliary_weight` > 0: the model's auxiliary head's logits (sown into the 'auxiliary' collection) add their
  cross-entropy (class-weighted, binary per class with `multilabel`), times the weight, to the loss (transformers' UperNet: loss + 0.4 * auxiliary loss).
  """
  images = normalize_images(batch['image'], dtype, *input_stats)
  labels = batch['label'].astype(jnp.int32)
  # Dropout masks differ per step; the global array's random bits do not depend on the device count.
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), 1), state.step)
  params = state.params
  if gathered_params is not None:
    params = jax.lax.with_sharding_constraint(params, gathered_params)

  gather = None if whole_batch is None else (lambda a: jax.lax.with_sharding_constraint(a, whole_batch))

  def loss_fn(params):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    mutable = (['batch_stats'] if state.batch_stats else []) + ([AUXILIARY] if auxiliary_weight else [])
    out = state.apply_fn(variables_of(state, params), images, train=True, mutable=mutable or False,
                         rngs={'dropout': rng})
    logits, new_vars = out if mutable else (out, {})

    def loss_of(logits, terms):
      return losses.combined_loss(logits, labels, terms, multilabel=multilabel, ignore_label=ignore_label,
                                  class_weights=class_weights, params=loss_params, gather=gather)

    loss = loss_of(logits, loss_terms)
    if auxiliary_weight:
      (aux_logits,) = new_vars[AUXILIARY]['logits']
      new_vars = {k: v for k, v in new_vars.items() if k != AUXILIARY}
      loss = loss + auxiliary_weight * loss_of(aux_logits, (('cross_entropy', 1.0),))
    return loss, new_vars

  (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if param_sharding is not None:
    grads = jax.lax.with_sharding_constraint(grads, param_sharding)
  new_batch_stats = new_vars.get('batch_stats', state.batch_stats)
  # The encoder normalises with its running statistics (frozen_bn): keep them (an encoder without BatchNorm, as
  # VGG16's, has none).
  if freeze_encoder_batch_stats and ENCODER in state.batch_stats:
    new_batch_stats = {**new_batch_stats, ENCODER: state.batch_stats[ENCODER]}
  new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)

  # A non-finite loss or gradient never reaches the parameters: the update is
  # dropped and the step recorded; the host stops ('stop') or counts ('skip')
  # at the next log step, so no step waits on the host to check.
  finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  keep_old = lambda new, old: jnp.where(finite, new, old)
  new_state = new_state.replace(
      params=jax.tree.map(keep_old, new_state.params, state.params),
      opt_state=jax.tree.map(keep_old, new_state.opt_state, state.opt_state),
      batch_stats=jax.tree.map(keep_old, new_state.batch_stats, state.batch_stats),
      skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                     state.first_nonfinite_step))
  if ema_decay:
    new_state = update_ema(new_state, state.step, ema_decay, keep=finite)
  metrics = {'loss': loss, 'learning_rate': learning_rate_fn(state.step)}
  return new_state, metrics


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """The decay of the EMA update at 0-based update `step`: min(ema_decay, (1 + step) / (10 + step)).

  The warm-up of TF's ExponentialMovingAverage(num_updates=...): early on the
  average follows the weights closely (0.1 at the first update, 0.5 at the
  9th, 0.9 at the 81st), so it does not drag the random initialisation into
  evaluations of a short run; after ~10 / (1 - ema_decay) updates it is the
  plain ema_decay.
  """
  t = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


def update_ema(state: state_lib.EmaTrainState, step: jax.Array, ema_decay: float, *,
               keep: jax.Array) -> state_lib.EmaTrainState:
  """ema = d * ema + (1 - d) * new for the parameters and the BatchNorm statistics, d = ema_decay_at(step).

  Elementwise on arrays laid out as the parameters (FSDP: on the shards, no
  collective). `keep` False (a dropped non-finite update) leaves the averages as
  they were.
  """
  d = ema_decay_at(step, ema_decay)
  average = lambda ema, new: jnp.where(keep, d * ema + (1.0 - d) * new, ema).astype(ema.dtype)
  return state.replace(ema_params=jax.tree.map(average, state.ema_params, state.params),
                       ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, state.batch_stats))


def make_train_step(settings: Settings, spec: datasets.DatasetSpec, setup: state_lib.Setup,
                    class_weights: Optional[tuple[float, ...]]):
  """The jitted train step of these settings: (state, global batch) -> (state, metrics); the state is donated.

  The state keeps its layout (out_shardings = in_shardings), so the step
  compiles once and donation updates it in place; metrics are replicated
  scalars, fetched by the host only at log steps.
  """
  fsdp = settings.sharding == 'fsdp'
  params_sharding = setup.state_sharding.params
  any_frozen = any(jax.tree.leaves(setup.frozen))
  step = functools.partial(
      train_step, input_stats=setup.input_stats, ignore_label=spec.ignore_label, class_weights=class_weights,
      loss_terms=settings.loss.terms, loss_params=settings.loss.params, multilabel=spec.multilabel,
      whole_batch=sharding.replicated(setup.mesh),
      dtype=setup.dtype, learning_rate_fn=setup.learning_rate_fn,
      dropout_seed=settings.seed, ema_decay=settings.ema_decay, frozen=setup.frozen if any_frozen else None,
      freeze_encoder_batch_stats=settings.freeze_encoder_batch_stats,
      auxiliary_weight=getattr(setup.model, 'auxiliary_loss_weight', 0.0),
      gathered_params=jax.tree.map(lambda _: sharding.replicated(setup.mesh), params_sharding) if fsdp else None,
      param_sharding=params_sharding if fsdp else None)
  batch = sharding.batch_sharding(setup.mesh)
  return jax.jit(step, in_shardings=(setup.state_sharding, {'image': batch, 'label': batch}),
                 out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)), donate_argnums=(0,))


# ---------------------------------------------------------------------------
# Pre-emption.
# ---------------------------------------------------------------------------


class PreemptionWatcher:
  """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then exit).

  One process: a Python signal handler sets the flag. Several processes: the
  signal may reach only some of them, so JAX's distributed runtime (started
  by jaxseg.distributed) catches it and `reached_preemption_sync_point` makes
  every process stop at the same step, the next one all of them can reach;
  the loop must call `reached` at every step on every process.
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._multi = jax.process_count() > 1
    self._sync = self._multi and jax.distributed.is_initialized()

  def __enter__(self):
    if self._multi and not self._sync:
      # E.g. a TPU pod slice started without JAXSEG_DISTRIBUTED=1: no runtime to agree on a step.
      log.warning('Several processes without jax.distributed: SIGTERM will not save a checkpoint. Set '
                  'JAXSEG_DISTRIBUTED=1 (or the JAXSEG_COORDINATOR variables) to get pre-emption checkpoints.')
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread (e.g. some notebook runners): no handler.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint at the current step, then exiting.')
    self._flag = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (call it after every step, on every process)."""
    if not self._sync:
      return self._flag
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # The preemption service is off (jax_enable_preemption_service=False).
      log.warning('No pre-emption checkpoints: %s', e)
      self._sync = False
      return False

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  """The loss (or a gradient) became NaN or infinite."""


# ---------------------------------------------------------------------------
# The training job.
# ---------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, start_time: Optional[float] = None) -> dict:
  """Trains (resuming from WORKDIR/checkpoints when there are any), evaluates, checkpoints.

  Every process of a multi-process run calls this with the same arguments.
  SIGTERM (a pre-emption notice) makes it save a checkpoint at the current
  step and return normally; a later call resumes from that step exactly.

  Args:
    config: the experiment config (see configs/default.py).
    workdir: where checkpoints, logs and metrics go (shared by all hosts).
    start_time: when the job started (time.time()), what config.time_budget counts from; default: now. run.py
      passes the start of its process.

  Returns:
    The last evaluation's metrics ({} when pre-empted before any evaluation).
  """
  start_time = time.time() if start_time is None else start_time
  # ---- Start-up: settings, workdir, data, recipe, model, state (restored or fresh). ----
  run = startup.open_run(config, workdir, mode='train')
  settings, spec, builder, setup, mesh = run.settings, run.spec, run.builder, run.setup, run.setup.mesh
  workdir = run.workdir
  is_primary = jax.process_index() == 0
  log.info('Devices: %d in all, %d local (%s); processes: %d; state %s; workdir: %s', jax.device_count(),
           jax.local_device_count(), jax.devices()[0].platform, jax.process_count(), settings.sharding, run.workdir)

  # ---- Steps. ----
  run_class_weights = run.class_weights
  train_step_fn = make_train_step(settings, spec, setup, run_class_weights)
  evaluator = evaluate.Evaluator(spec, setup, settings.inference_options(processes=jax.process_count()))

  with contextlib.ExitStack() as closing:
    # Closed on the way out, also after an error: closing the checkpoints finishes the saves in flight
    # (an async save cut off when the process exits leaves only a tmp dir).
    ckpts = closing.enter_context(contextlib.closing(run.checkpoints))
    writer = closing.enter_context(contextlib.closing(reporting.MetricWriter(run.workdir, enabled=is_primary)))
    state, start_step = run.state, run.step
    del run  # The loop owns the state from here (the step donates it).

    # ---- Data. ----
    train_ds = pipeline.train_dataset(
        builder, spec, settings.input, global_batch=settings.batch_size, seed=settings.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    eval_data = pipeline.eval_dataset(
        builder, spec, settings.input, global_batch=settings.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), cache=settings.dataset.get('cache', True))
    train_iter = sharding.prefetch(pipeline.as_numpy(train_ds), mesh, settings.input.prefetch_to_device)

    # ---- Train loop. ----
    # A budgeted run (num_train_steps='auto') first trains to `measured_at`, timing its steps, then fixes the length.
    measuring = settings.num_train_steps == AUTO
    timed_from, measured_at = time_budget.measure_steps(
        start_step, warmup_steps=settings.optimizer.warmup_steps, eval_every=settings.eval_every_steps,
        checkpoint_every=settings.checkpoint_every_steps)
    total = measured_at if measuring else settings.num_train_steps
    progress = reporting.Progress(total, start_step, settings.batch_size, enabled=is_primary)
    pending_metrics = []  # Device arrays of the steps since the last log: fetched together.
    skipped = 0  # Updates with a non-finite loss dropped so far (as last logged).
    eval_metrics = {}
    step = start_step
    marks = {start_step: time.perf_counter()}  # Budgeted: when steps ended (the first one compiled), for timing.
    measured = None  # Budgeted, once the schedule is fixed: what this machine measured (the deadline's costs).
    with PreemptionWatcher() as preemption:
      while step < total:
        batch = next(train_iter)
        state, step_metrics = train_step_fn(state, batch)
        pending_metrics.append(step_metrics)
        step += 1
        if measuring and step in (start_step + 1, timed_from, measured_at):
          jax.block_until_ready(step_metrics)
          marks[step] = time.perf_counter()
        is_last = step == total and not measuring

        if measuring and step == measured_at:
          # ---- Time budget: what the first steps cost fixes the schedule's length. ----
          step_s = (marks[measured_at] - marks[timed_from]) / (measured_at - timed_from)
          pause_start = time.perf_counter()
          settings, setup, state, measured = fix_schedule(
              config, settings, setup, state, step, start_time=start_time, step_s=step_s,
              compile_s=max(marks[start_step + 1] - marks[start_step] - step_s, 0.0),
              evaluate_once=lambda: evaluator.run(state, eval_data), checkpoints=ckpts, workdir=workdir)
          train_step_fn = make_train_step(settings, spec, setup, run_class_weights)
          total = settings.num_train_steps
          progress.total = total
          progress.exclude(time.perf_counter() - pause_start)
          measuring = False
          is_last = step == total

        if step % settings.log_every_steps == 0 or is_last:
          fetched = jax.device_get(pending_metrics)
          pending_metrics = []
          skipped = check_finite(state, settings.on_nonfinite_loss, skipped)
          loss = float(np.mean([m['loss'] for m in fetched if np.isfinite(m['loss'])] or [np.nan]))
          lr = float(fetched[-1]['learning_rate'])
          images_per_sec = progress.update(step, loss, lr)
          if measured is not None and not is_last and out_of_time(
              time.time() - start_time, settings.time_budget_s, step, total, measured,
              recent_step_s=settings.batch_size / images_per_sec, check_every=settings.log_every_steps,
              eval_every=settings.eval_every_steps, checkpoint_every=settings.checkpoint_every_steps):
            log.warning('Time budget %s: stopping at step %d of %d, with its final evaluation and checkpoint: '
                        'this machine now runs slower than measured (%.3g s a step against %.3g). Run the same '
                        'command again to finish the schedule.', config.time_budget, step, total,
                        settings.batch_size / images_per_sec, measured.step_s)
            total = progress.total = step
            is_last = True
          writer.write(step, 'train', {'loss': loss, 'learning_rate': lr, 'images_per_sec': images_per_sec})

        pause_start = time.perf_counter()
        evaluated = False
        if step % settings.eval_every_steps == 0 or is_last:
          eval_metrics, examples = evaluator.run(state, eval_data)
          evaluated = True
          reporting.log_eval(writer, step, eval_metrics, spec, examples=examples)

        # Every process calls this at every step (multi-process: a sync point all agree on).
        preempted = preemption.reached(step)
        if step % settings.checkpoint_every_steps == 0 or is_last or evaluated or preempted:
          skipped = check_finite(state, settings.on_nonfinite_loss, skipped)
          ckpts.save(step, state, metrics=eval_metrics if evaluated else None)
        if evaluated or ckpts.latest_step() == step:
          progress.exclude(time.perf_counter() - pause_start)
        if preempted:
          ckpts.wait()
          log.warning('Pre-empted (SIGTERM): checkpoint at step %d of %d saved in %s; exiting cleanly. Run '
                      'the same command again to resume.', step, total, ckpts.directory)
          break
  return eval_metrics


def fix_schedule(config: ml_collections.ConfigDict, settings: Settings, setup: state_lib.Setup, state: TrainState,
                 step: int, *, start_time: float, step_s: float, compile_s: float,
                 evaluate_once: Callable[[], Any], checkpoints, workdir: str
                 ) -> tuple[Settings, state_lib.Setup, TrainState, time_budget.Measurement]:
  """A budgeted run at its measuring step: times an evaluation and a checkpoint, chooses num_train_steps
  (time_budget.plan; process 0's choice, for every process), logs it, saves it in WORKDIR/config.json and returns
  the settings, setup and state on the schedule of that length (the train step is then compiled again), and what
  was measured."""
  evaluate_once()  # Compiles the evaluation: the second one is timed.
  started = time.perf_counter()
  evaluate_once()
  eval_s = time.perf_counter() - started
  started = time.perf_counter()
  checkpoints.save(step, state)  # Also the point a run stopped from here on resumes from.
  checkpoints.wait()
  checkpoint_s = time.perf_counter() - started
  measured = time_budget.Measurement(elapsed_s=time.time() - start_time, step_s=step_s, compile_s=compile_s,
                                     eval_s=eval_s, checkpoint_s=checkpoint_s)
  plan = time_budget.plan(settings.time_budget_s, step, measured, eval_every=settings.eval_every_steps,
                          checkpoint_every=settings.checkpoint_every_steps,
                          warmup_steps=settings.optimizer.warmup_steps)
  num_train_steps = plan.num_train_steps
  if jax.process_count() > 1:  # Machines differ a little: every process takes process 0's count.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    num_train_steps = int(multihost_utils.broadcast_one_to_all(np.int64(num_train_steps)))
  settings = dataclasses.replace(settings, num_train_steps=num_train_steps)
  if jax.process_index() == 0:
    log.info('Time budget %s: num_train_steps=%d: %s.', config.time_budget, num_train_steps, plan.reason)
    startup.write_config(workdir, config, settings)
  setup = setup.with_schedule(settings)
  return settings, setup, state.replace(tx=setup.tx), measured


def out_of_time(*args, **kwargs) -> bool:
  """time_budget.out_of_time, decided by process 0 for every process (their clocks differ a little)."""
  stop = time_budget.out_of_time(*args, **kwargs)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    stop = bool(multihost_utils.broadcast_one_to_all(np.bool_(stop)))
  return stop


def check_finite(state: TrainState, policy: str, reported: int = 0) -> int:
  """Stops with a message naming the step of the first non-finite loss (policy 'stop'), or logs skips ('skip').

  Args:
    state: the train state (its counters are replicated scalars).
    policy: config.on_nonfinite_loss.
    reported: the count of skipped updates already logged: 'skip' warns only when it grows.

  Returns:
    The number of updates skipped so far.
  """
  skipped = int(jax.device_get(state.skipped_updates))
  if skipped == reported:
    return skipped
  first = int(jax.device_get(state.first_nonfinite_step))
  if policy == 'stop':
    raise NonFiniteLossError(
        f'The loss or a gradient became NaN or infinite at step {first + 1} (update dropped; parameters are '
        f'from step {first}). Lower config.optimizer.learning_rate, check the data, or set '
        f"config.on_nonfinite_loss='skip' to skip such updates.")
  log.warning('%d update(s) with a non-finite loss skipped so far (first at step %d).', skipped, first + 1)
  return skipped
