"""The optimiser: SGD (the papers' recipes) or AdamW, a learning-rate schedule, and parameter-group rules.

Fine-tuning is an ordered list of rules on the parameter path (as big_vision's
optax config does): each `ParamRule` says, for the parameters whose path
('encoder/layer1_0/conv1/kernel') its pattern matches, the learning-rate
multiplier, whether (or for how many updates) they are frozen, and whether
weight decay applies. Each property is taken from the first matching rule
that sets it; unset ones default to multiplier 1, not frozen, decayed. The
default rules (jaxseg/settings.py) are the encoder's (config.finetune) and no
decay on biases and normalisation scales; layer-wise decay is one rule per
block. Parameters with the same resolved properties form a group, and
`optax.multi_transform` gives each group its own transformation.
"""

import dataclasses
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxseg.errors import ConfigError

SCHEDULES = ('constant', 'cosine', 'poly')
OPTIMIZERS = ('sgd', 'adamw')
FROZEN = -1  # ParamRule.frozen_steps: frozen for the whole run.


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """config.optimizer, checked (jaxseg/settings.py)."""
  name: str
  learning_rate: float
  schedule: str
  warmup_steps: int
  end_learning_rate: float
  poly_power: float
  momentum: float
  nesterov: bool
  b1: float
  b2: float
  eps: float
  weight_decay: float


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """One fine-tuning rule: what applies to the parameters whose path `pattern` matches (re.search).

  Attributes:
    pattern: a regular expression on the '/'-joined parameter path.
    lr_multiplier: the group's learning rate is this x the schedule's; None: from a later rule (default 1).
    frozen_steps: FROZEN: never updated (no gradient computed); N > 0: not updated during the first N optimiser
      updates, then trained with a fresh optimiser state; 0: not frozen; None: from a later rule (default 0).
    weight_decay: whether weight decay applies; None: from a later rule (default True).
    required: a rule the user asked for: it must match at least one parameter (a typo would change nothing).
    origin: where the rule comes from, for messages (e.g. 'config.finetune.param_rules[0]').
  """
  pattern: str
  lr_multiplier: Optional[float] = None
  frozen_steps: Optional[int] = None
  weight_decay: Optional[bool] = None
  required: bool = False
  origin: str = dataclasses.field(default='', compare=False)


# Biases and normalisation scales (Flax names them 'bias' and 'scale') are left undecayed.
NO_DECAY_RULE = ParamRule(r'(^|/)(bias|scale)$', weight_decay=False)


@dataclasses.dataclass(frozen=True)
class Group:
  """The resolved properties of one parameter group, and which rules they came from."""
  lr_multiplier: float
  frozen_steps: int
  weight_decay: bool
  label: str  # The positions of the rules that match: a run may change the rules' values and resume.


def path_of(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def resolve(rules: tuple[ParamRule, ...], path: str) -> Group:
  """The group of the parameter at `path`: each property from the first matching rule that sets it."""
  values, matched = {}, []
  for i, rule in enumerate(rules):
    if re.search(rule.pattern, path):
      matched.append(str(i))
      for field in ('lr_multiplier', 'frozen_steps', 'weight_decay'):
        if field not in values and getattr(rule, field) is not None:
          values[field] = getattr(rule, field)
  # The same matching rules give the same values, whatever they are: the label depends on the patterns only.
  label = 'rules_' + '_'.join(matched) if matched else 'no_rule'
  return Group(values.get('lr_multiplier', 1.0), values.get('frozen_steps', 0), values.get('weight_decay', True),
               label)


def groups(rules: tuple[ParamRule, ...], params: Any) -> Any:
  """The tree of `params` with each leaf's Group."""
  return jax.tree_util.tree_map_with_path(lambda p, _: resolve(rules, path_of(p)), params)


def _is_group(x) -> bool:
  return isinstance(x, Group)


def check_rules(rules: tuple[ParamRule, ...], params: Any, model_name: str) -> None:
  """ConfigError for a required rule that matches no parameter of the model (names the pattern and the model)."""
  paths = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for rule in rules:
    if rule.required and not any(re.search(rule.pattern, p) for p in paths):
      raise ConfigError(f'{rule.origin or "a fine-tuning rule"}: the pattern {rule.pattern!r} matches no parameter of '
                        f'model {model_name!r} (its parameter paths look like {", ".join(paths[:3])})')


def frozen_mask(rules: tuple[ParamRule, ...], params: Any) -> Any:
  """True for the parameters frozen for the whole run (the train step computes no gradient for them)."""
  return jax.tree.map(lambda g: g.frozen_steps == FROZEN, groups(rules, params), is_leaf=_is_group)


def create_learning_rate_schedule(opt: OptimizerSettings, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant, cosine or poly decay to `end_learning_rate`."""
  base_lr, warmup, end_lr = opt.learning_rate, opt.warmup_steps, opt.end_learning_rate
  decay_steps = max(1, num_train_steps - warmup)
  if opt.schedule == 'constant':
    main = optax.constant_schedule(base_lr)
  elif opt.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr / base_lr)
  else:  # 'poly', DeepLab's and mmsegmentation's: lr * (1 - t/T)^power.
    main = optax.polynomial_schedule(base_lr, end_lr, opt.poly_power, decay_steps)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def _direction(opt: OptimizerSettings, weight_decay: bool) -> optax.GradientTransformation:
  """The optimiser at learning rate 1: the update direction, which the group's learning rate then scales.

  'sgd': SGD with momentum (Nesterov optional); weight decay is L2 added to
  the gradient (as PyTorch's SGD). 'adamw': Adam with decoupled weight decay
  (Loshchilov & Hutter): -lr * (adam_step + weight_decay * param), so the decay
  follows the schedule but not the gradients' scale (optax.adamw).
  """
  decay = opt.weight_decay if weight_decay else 0.0
  if opt.name == 'sgd':
    return optax.chain(optax.add_decayed_weights(decay),
                       optax.sgd(1.0, momentum=opt.momentum or None, nesterov=opt.nesterov))
  return optax.adamw(1.0, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=decay)


class GroupState(NamedTuple):
  """The optimiser state of one parameter group."""
  count: jax.Array  # int32: optimiser updates so far, frozen ones included: the schedule's step.
  inner_state: optax.OptState  # The optimiser's own state (momentum, Adam moments); untouched while frozen.


def _group_transform(opt: OptimizerSettings, schedule: optax.Schedule, group: Group) -> optax.GradientTransformation:
  """The group's update: lr_multiplier x schedule(count) x the direction, gated by freezing.

  The learning rate is the optimiser's last factor, so this is the update of
  the optimiser built on the scaled schedule. While frozen the update is zero
  and the state is left as it was (no weight decay, no momentum or Adam
  moments gathered); unfrozen at update N, the group starts as PyTorch
  parameters whose requires_grad is turned on then do: fresh momentum and Adam
  bias correction, at the schedule's learning rate of step N. The state has the
  same layout frozen or not, so a run may change its freezing when it resumes.
  """
  inner = _direction(opt, group.weight_decay)

  def init(params):
    return GroupState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(updates, state, params=None):
    count = state.count
    if group.frozen_steps == FROZEN:
      return jax.tree.map(jnp.zeros_like, updates), GroupState(count + 1, state.inner_state)
    direction, inner_state = inner.update(updates, state.inner_state, params)
    lr = group.lr_multiplier * schedule(count)
    new_updates = jax.tree.map(lambda d: jnp.asarray(lr, d.dtype) * d, direction)
    if group.frozen_steps > 0:
      active = count >= group.frozen_steps
      new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
      inner_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), inner_state, state.inner_state)
    return new_updates, GroupState(count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def create_optimizer(opt: OptimizerSettings, schedule: optax.Schedule, rules: tuple[ParamRule, ...],
                     params: Any) -> optax.GradientTransformation:
  """The optimiser of `opt` driven by `schedule`, one transformation per parameter group of `rules` on `params`.

  `params` (arrays or shapes) fixes the groups: the state holds one GroupState per group present.
  """
  tree = groups(rules, params)
  present = {g.label: g for g in jax.tree.leaves(tree, is_leaf=_is_group)}
  labels = jax.tree.map(lambda g: g.label, tree, is_leaf=_is_group)
  return optax.multi_transform({label: _group_transform(opt, schedule, g) for label, g in present.items()}, labels)
