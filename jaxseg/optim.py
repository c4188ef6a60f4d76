"""Optimiser and learning-rate schedule from the config: SGD (the papers' recipes) or AdamW, and the encoder's
own transformation (learning-rate multiplier, freezing) for models with a pretrained encoder (config.finetune)."""

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxseg import finetune
from jaxseg.errors import ConfigError

SCHEDULES = ('constant', 'cosine', 'poly')
OPTIMIZERS = ('sgd', 'adamw')


def create_learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant, cosine or poly decay to `end_learning_rate`."""
  base_lr = opt_config.learning_rate
  warmup = int(opt_config.warmup_steps)
  end_lr = opt_config.get('end_learning_rate', 0.0)
  decay_steps = max(1, num_train_steps - warmup)
  name = opt_config.schedule
  if name == 'constant':
    main = optax.constant_schedule(base_lr)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr / base_lr if base_lr else 0.0)
  elif name == 'poly':
    # The "poly" policy of DeepLab/mmsegmentation: lr * (1 - t/T)^power.
    main = optax.polynomial_schedule(base_lr, end_lr, opt_config.get('poly_power', 0.9), decay_steps)
  else:
    raise ConfigError(f'config.optimizer.schedule={name!r}; choose one of {SCHEDULES}')
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def _kernels(params):
  """The weight-decay mask: kernels (ndim > 1) only; biases and normalisation scales are left undecayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _number(opt_config, field: str, default: float, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> float:
  """config.optimizer.<field> (default when absent) as a float, checked to lie in [low, high] (or open ends)."""
  value = opt_config.get(field, default)
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok:
    value = float(value)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    raise ConfigError(f'config.optimizer.{field} must be a number in {interval}, got {value!r}')
  return value


def _optimizer(opt_config, learning_rate) -> optax.GradientTransformation:
  """The optimiser `config.optimizer.name` names, driven by `learning_rate` (a schedule or a number).

  'sgd' (the papers' recipes): SGD with momentum (Nesterov optional); weight
  decay is L2 added to the gradient (as in PyTorch's SGD).

  'adamw': Adam (`b1`, `b2`, `eps`) with decoupled weight decay (Loshchilov &
  Hutter): the update is -lr * (adam_step + weight_decay * param), so the decay
  follows the schedule but not the gradients' scale (optax.adamw).

  Both decay kernels only: biases and normalisation scales are left undecayed.
  In both the learning rate is the last factor of the update (optax's
  scale_by_learning_rate ends the chain), which the encoder's transformation
  (`_encoder_optimizer`) relies on.
  """
  name = opt_config.name
  if name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=_kernels),
        optax.sgd(learning_rate, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov),
    )
  if name == 'adamw':
    inf = float('inf')
    return optax.adamw(learning_rate,
                       b1=_number(opt_config, 'b1', 0.9, 0.0, 1.0, high_open=True),
                       b2=_number(opt_config, 'b2', 0.999, 0.0, 1.0, high_open=True),
                       eps=_number(opt_config, 'eps', 1e-8, 0.0, inf, low_open=True, high_open=True),
                       weight_decay=_number(opt_config, 'weight_decay', 1e-4, 0.0, inf, high_open=True),
                       mask=_kernels)
  raise ConfigError(f'config.optimizer.name={name!r}; choose one of {OPTIMIZERS}')


class EncoderState(NamedTuple):
  """The optimiser state of a pretrained encoder's parameters (see `_encoder_optimizer`)."""
  count: jax.Array  # int32: optimiser updates so far, frozen ones included: the schedule's step.
  inner_state: optax.OptState  # The optimiser's own state (momentum, Adam moments); untouched while frozen.


def _encoder_optimizer(opt_config, schedule, ft: finetune.FineTune) -> optax.GradientTransformation:
  """The encoder's transformation: the same optimiser at `ft.encoder_lr_multiplier` x the schedule, gated by freezing.

  The optimiser runs at learning rate 1 and its update is then scaled by
  multiplier x schedule(count), `count` being the updates so far (the step the
  rest of the network's schedule is at): the same update as the optimiser
  built on the scaled schedule, since the learning rate is its last factor.

  While frozen (always with `freeze_encoder`, for the first
  `freeze_encoder_steps` updates otherwise) the update is exactly zero and the
  optimiser's state is left as it was: no weight decay, no momentum or Adam
  moments gathered from the frozen steps. Unfrozen at update N, the encoder
  starts as PyTorch parameters whose requires_grad is turned on then do: fresh
  momentum and Adam bias correction, at the schedule's learning rate of step N.
  The state has the same layout frozen or not, so a checkpoint of a frozen
  stage resumes into an unfrozen one (and back).
  """
  inner = _optimizer(opt_config, 1.0)
  multiplier = ft.encoder_lr_multiplier

  def init(params):
    return EncoderState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(updates, state, params=None):
    count = state.count
    if ft.freeze_encoder:
      return jax.tree.map(jnp.zeros_like, updates), EncoderState(count + 1, state.inner_state)
    direction, inner_state = inner.update(updates, state.inner_state, params)
    lr = multiplier * (schedule(count) if callable(schedule) else schedule)
    new_updates = jax.tree.map(lambda d: jnp.asarray(lr, d.dtype) * d, direction)
    if ft.freeze_encoder_steps > 0:
      active = count >= ft.freeze_encoder_steps
      new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
      inner_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), inner_state, state.inner_state)
    return new_updates, EncoderState(count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def create_optimizer(opt_config, schedule: optax.Schedule,
                     ft: Optional[finetune.FineTune] = None) -> optax.GradientTransformation:
  """The optimiser of config.optimizer driven by `schedule`, with the fine-tuning controls `ft` (config.finetune).

  For a parameter tree without an encoder (params['encoder']) it is exactly
  `_optimizer(opt_config, schedule)`, state included: the layout of the
  models trained before fine-tuning existed, whose checkpoints restore. A tree
  with an encoder is partitioned (optax.partition): the encoder gets
  `_encoder_optimizer`, the rest the plain optimiser; always, whatever `ft`
  says, so the state's layout depends on the model only and a run may change
  the controls when it resumes (e.g. train the head with the encoder frozen,
  then go on with everything unfrozen from that checkpoint).
  """
  ft = ft or finetune.FineTune()
  base = _optimizer(opt_config, schedule)
  split = optax.partition({finetune.ENCODER_LABEL: _encoder_optimizer(opt_config, schedule, ft),
                           finetune.REST_LABEL: base}, finetune.labels)

  def init(params):
    return (split if finetune.has_encoder(params) else base).init(params)

  def update(updates, state, params=None):
    return (split if finetune.has_encoder(updates) else base).update(updates, state, params)

  return optax.GradientTransformation(init, update)


def check_config(opt_config, num_train_steps: int) -> None:
  """Raises ConfigError naming the field for an optimiser or schedule that cannot be built (no computation)."""
  _optimizer(opt_config, create_learning_rate_schedule(opt_config, num_train_steps))
