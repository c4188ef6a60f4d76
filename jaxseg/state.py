"""The train state and the one place that builds it: model, schedule, optimiser and state layout from the settings.

`build(settings, num_classes, mesh)` is what training, evaluation, inference,
export, jaxseg.api, the benchmarks and the tests all call. It returns the
abstract state (shapes, dtypes and shardings) without computing anything;
`init_state()` initialises it directly in its sharded layout, and
`checkpoint.Checkpoints.restore` fills it from a checkpoint instead.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from jaxseg import models
from jaxseg import optim
from jaxseg import sharding as sharding_lib


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and BatchNorm statistics, plus non-finite-loss bookkeeping."""
  batch_stats: Any
  skipped_updates: jnp.ndarray  # int32: updates dropped because the loss or a gradient was not finite.
  first_nonfinite_step: jnp.ndarray  # int32: step of the first such update, -1 if none.


class EmaTrainState(TrainState):
  """A TrainState that also keeps an exponential moving average of the weights (config.ema_decay > 0).

  A subclass rather than fields that are empty when EMA is off: without EMA the
  state (and its checkpoints) hold no unused arrays.

  The average covers the BatchNorm running statistics too (as timm's
  ModelEmaV2, which averages the whole state_dict, and TF's EfficientNet
  recipes do): statistics are a function of the weights that produced the
  activations, so the averaged weights are evaluated with statistics averaged
  over the same window rather than with the live ones, which follow only the
  last ~10 steps' weights (momentum 0.9) and would tie the evaluation back to
  the noise the average removes.
  """
  ema_params: Any  # Same tree, shapes and shardings as params.
  ema_batch_stats: Any  # Same tree as batch_stats ({} for models without BatchNorm).


def build_model(settings, num_classes: int) -> nn.Module:
  """The module of settings.model in the run's compute dtype; with frozen encoder BatchNorm statistics, frozen_bn.

  Frozen encoder statistics have two sides: the train step keeps
  batch_stats['encoder'] as it was, and the encoder normalises with those
  running averages in training too (its BatchNorm layers' use_running_average).
  """
  model = models.create_model(settings.model.name, settings.model.kwargs, num_classes=num_classes,
                              dtype=jnp.bfloat16 if settings.half_precision else jnp.float32)
  return model.clone(frozen_bn=True) if settings.freeze_encoder_batch_stats else model


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...], *, ema: bool = False) -> TrainState:
  """The initial state: the model initialised on one dummy image [1, *image_shape].

  With `ema`, an EmaTrainState whose averages start at the initial weights.
  """
  variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  batch_stats = variables.get('batch_stats', {})
  extra = {}
  if ema:
    # Copies: the averages are arrays of their own (the state is donated leaf by leaf).
    extra = {'ema_params': jax.tree.map(jnp.copy, variables['params']),
             'ema_batch_stats': jax.tree.map(jnp.copy, batch_stats)}
  state = (EmaTrainState if ema else TrainState).create(
      apply_fn=model.apply, params=variables['params'], batch_stats=batch_stats, tx=tx,
      skipped_updates=jnp.zeros((), jnp.int32), first_nonfinite_step=-jnp.ones((), jnp.int32), **extra)
  # A strongly typed step (TrainState.create's Python 0 would trace weakly typed): a fresh state and one
  # restored from a checkpoint then trace to the same train step, which compiles once and hits the cache.
  return state.replace(step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` makes from the settings: the model, its optimiser, and the state's layout on a mesh.

  Attributes:
    model: the Flax module.
    learning_rate_fn: the schedule (step -> learning rate).
    tx: the optax optimiser (one transformation per parameter group of the fine-tuning rules).
    mesh: the device mesh the state lives on.
    abstract_state: the TrainState as jax.ShapeDtypeStructs carrying their shardings.
    state_sharding: a NamedSharding per leaf of the state.
    dtype: the compute dtype.
    input_stats: (mean, std) per input channel, 0-255 units: how the steps normalise images.
    frozen: a bool per parameter: frozen for the whole run (the train step computes no gradient for it).
  """
  model: nn.Module
  learning_rate_fn: optax.Schedule
  tx: optax.GradientTransformation
  mesh: Mesh
  abstract_state: TrainState
  state_sharding: Any
  dtype: Any
  input_stats: tuple
  frozen: Any
  _create: Callable[[], TrainState] = dataclasses.field(repr=False)
  _weight_file: Optional[tuple[Callable[..., dict], str]] = dataclasses.field(repr=False)

  def with_schedule(self, settings) -> 'Setup':
    """This setup with the schedule (and the optimiser driven by it) of `settings.num_train_steps`: a budgeted run
    fixes its length after its first steps. The optimiser state's structure does not depend on it."""
    learning_rate_fn = optim.create_learning_rate_schedule(settings.optimizer, schedule_length(settings))
    tx = optim.create_optimizer(settings.optimizer, learning_rate_fn, settings.param_rules,
                                self.abstract_state.params)
    # The optimiser is a static field of the state: the layouts carry it too (jit matches the trees' structure).
    return dataclasses.replace(self, learning_rate_fn=learning_rate_fn, tx=tx,
                               abstract_state=self.abstract_state.replace(tx=tx),
                               state_sharding=self.state_sharding.replace(tx=tx))

  def init_state(self) -> TrainState:
    """The initial state, computed in its sharded layout (no device ever holds a replicated copy under fsdp).

    With a weight file (config.model.encoder_weights, or the whole-model config.model.weights), the variables it
    holds (and their averages under EMA) are the file's, read on the host and placed in the state's layout; a
    WeightsError names a file that does not fit.
    """
    state = jax.jit(self._create, out_shardings=self.state_sharding)()
    if not self._weight_file:
      return state
    load, path = self._weight_file
    loaded = load(self.model, {'params': state.params, 'batch_stats': state.batch_stats}, path)
    changes = {'params': loaded['params'], 'batch_stats': loaded['batch_stats']}
    if isinstance(state, EmaTrainState):
      changes.update(ema_params=loaded['params'], ema_batch_stats=loaded['batch_stats'])
    names = list(changes)
    shardings = [getattr(self.state_sharding, n) for n in names]
    # The averages start as the same trees as the weights, which hold the fresh state's own arrays where the
    # file has nothing. A put returns an array already in its layout as itself (and on a CPU places a numpy
    # array without a copy), so a leaf and its average would share a buffer and the donated train step would
    # receive it twice. The second put, of device arrays with may_alias=False, gives each leaf its own copy.
    placed = jax.device_put(jax.device_put([changes[n] for n in names], shardings), shardings, may_alias=False)
    return state.replace(**dict(zip(names, placed)))


# The schedule's length while num_train_steps is still 'auto' (a budgeted run before it has measured; inference):
# its first steps are the warm-up's, which do not depend on the length.
PROVISIONAL_STEPS = 10**9


def schedule_length(settings) -> int:
  return settings.num_train_steps if isinstance(settings.num_train_steps, int) else PROVISIONAL_STEPS


def build(settings, num_classes: int, mesh: Mesh, *, sharding: Optional[str] = None) -> Setup:
  """Model, schedule, optimiser and the state's layout for `settings` (jaxseg.settings.Settings) on `mesh`.

  Args:
    settings: the run's settings (model, optimizer, param_rules, input.crop_size, seed, sharding,
      half_precision, ema_decay: > 0 makes the state an EmaTrainState, its averages laid out as the parameters).
    num_classes: K.
    mesh: the device mesh (sharding.make_mesh()).
    sharding: overrides settings.sharding (inference restores replicated onto its own devices).
  """
  model = build_model(settings, num_classes)
  learning_rate_fn = optim.create_learning_rate_schedule(settings.optimizer, schedule_length(settings))
  image_shape = tuple(settings.input.crop_size) + (settings.model.in_channels,)
  rng = jax.random.key(settings.seed)
  params = jax.eval_shape(lambda: model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32), train=False))['params']
  optim.check_rules(settings.param_rules, params, settings.model.name)
  tx = optim.create_optimizer(settings.optimizer, learning_rate_fn, settings.param_rules, params)
  ema = settings.ema_decay > 0

  def initial_state():
    return create_train_state(model, tx, rng, image_shape, ema=ema)

  shapes = jax.eval_shape(initial_state)
  state_sharding = sharding_lib.state_shardings(shapes, mesh, sharding or settings.sharding)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, state_sharding)
  return Setup(model=model, learning_rate_fn=learning_rate_fn, tx=tx, mesh=mesh, abstract_state=abstract_state,
               state_sharding=state_sharding, dtype=model.dtype, input_stats=settings.model.input_stats,
               frozen=optim.frozen_mask(settings.param_rules, params), _create=initial_state,
               _weight_file=_weight_file(settings.model))


def _weight_file(model_settings) -> Optional[tuple[Callable[..., dict], str]]:
  """(loader, path) of the model's starting weights: config.model.weights (whole model) or encoder_weights."""
  if model_settings.weights:
    return models.load_weights, model_settings.weights
  if model_settings.encoder_weights:
    return models.load_pretrained, model_settings.encoder_weights
  return None


def check_distinct_buffers(state: TrainState) -> None:
  """Raises a RuntimeError naming the leaves of `state` whose device buffers are shared.

  The train step donates the whole state: XLA writes the new state into the
  old one's buffers, and a buffer passed twice makes it abort the process
  ("Attempt to donate the same buffer twice"). Called once before the first
  step; it reads one pointer per leaf and device, no data. (CPU devices may
  share the host memory of a numpy array placed without a copy, as orbax's
  restore does: PjRt never donates such a buffer, so that is allowed.)
  """
  owner = {}
  shared = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not isinstance(leaf, jax.Array):
      continue
    name = jax.tree_util.keystr(path)
    for shard in leaf.addressable_shards:
      try:
        pointer = shard.data.unsafe_buffer_pointer()
      except Exception:  # pylint: disable=broad-except  # A backend without raw pointers: nothing to check.
        return
      key = (shard.device.id, pointer)
      if key in owner:
        shared.add((owner[key], name))
      owner.setdefault(key, name)
  if shared:
    pairs = sorted(shared)
    raise RuntimeError(
        f'{len(pairs)} pair(s) of train-state leaves share a device buffer, which the donated train step cannot '
        'take (each leaf must own its buffer; copy one with jax.device_put(x, s, may_alias=False)): '
        + '; '.join(f'{a} and {b}' for a, b in pairs[:10]) + (' ...' if len(pairs) > 10 else ''))


def variables_of(state: TrainState, params=None) -> dict:
  """The live variables (training's): params (or `params`) and the BatchNorm statistics when there are any."""
  variables = {'params': state.params if params is None else params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def inference_variables(state: TrainState) -> dict:
  """The weights to predict with: the moving averages when the state keeps them (EmaTrainState), else the live ones.

  What evaluation (during training and --mode=eval), --mode=predict, jaxseg.api and --mode=export use.
  """
  if not isinstance(state, EmaTrainState):
    return variables_of(state)
  variables = {'params': state.ema_params}
  if state.ema_batch_stats:
    variables['batch_stats'] = state.ema_batch_stats
  return variables
