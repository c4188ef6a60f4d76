"""Optimiser and learning-rate schedule from the config."""

import jax
import optax

from jaxseg.errors import ConfigError

SCHEDULES = ('constant', 'cosine', 'poly')


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


def create_optimizer(opt_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (Nesterov optional) and decoupled-from-norm weight decay.

  Weight decay is L2 added to the gradient (as in PyTorch's SGD) and applies
  to kernels only: biases and normalisation scales are left undecayed.
  """
  if opt_config.name != 'sgd':
    raise ConfigError(f"config.optimizer.name={opt_config.name!r}; only 'sgd' is supported")
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov),
  )
