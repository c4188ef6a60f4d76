"""The train state and the one place that builds it: model, schedule, optimiser and state layout from the config.

`build(config, num_classes, mesh)` is what training, evaluation, inference,
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
from jaxseg.data import augment


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and BatchNorm statistics, plus non-finite-loss bookkeeping."""
  batch_stats: Any
  skipped_updates: jnp.ndarray  # int32: updates dropped because the loss or a gradient was not finite.
  first_nonfinite_step: jnp.ndarray  # int32: step of the first such update, -1 if none.


def compute_dtype(config) -> Any:
  return jnp.bfloat16 if config.half_precision else jnp.float32


def build_model(config, num_classes: int) -> nn.Module:
  return models.create_model(config.model, num_classes=num_classes, dtype=compute_dtype(config))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...]) -> TrainState:
  """The initial state: the model initialised on one dummy image [1, *image_shape]."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                            batch_stats=variables.get('batch_stats', {}), tx=tx,
                            skipped_updates=jnp.zeros((), jnp.int32),
                            first_nonfinite_step=-jnp.ones((), jnp.int32))
  # A strongly typed step (TrainState.create's Python 0 would trace weakly typed): a fresh state and one
  # restored from a checkpoint then trace to the same train step, which compiles once and hits the cache.
  return state.replace(step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` makes from a config: the model, its optimiser, and the state's layout on a mesh.

  Attributes:
    model: the Flax module.
    learning_rate_fn: the schedule (step -> learning rate).
    tx: the optax optimiser.
    mesh: the device mesh the state lives on.
    abstract_state: the TrainState as jax.ShapeDtypeStructs carrying their shardings.
    state_sharding: a NamedSharding per leaf of the state.
    dtype: the compute dtype.
  """
  model: nn.Module
  learning_rate_fn: optax.Schedule
  tx: optax.GradientTransformation
  mesh: Mesh
  abstract_state: TrainState
  state_sharding: Any
  dtype: Any
  _create: Callable[[], TrainState] = dataclasses.field(repr=False)

  def init_state(self) -> TrainState:
    """The initial state, computed in its sharded layout (no device ever holds a replicated copy under fsdp)."""
    return jax.jit(self._create, out_shardings=self.state_sharding)()


def build(config, num_classes: int, mesh: Mesh, *, sharding: Optional[str] = None) -> Setup:
  """Model, schedule, optimiser and the state's layout for `config` on `mesh`.

  Args:
    config: the experiment config (model, optimizer, input.crop_size, seed, sharding, half_precision).
    num_classes: K.
    mesh: the device mesh (sharding.make_mesh()).
    sharding: overrides config.sharding (inference restores replicated onto its own devices).
  """
  model = build_model(config, num_classes)
  learning_rate_fn = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  image_shape = tuple(config.input.crop_size) + (3,)
  seed = int(config.seed)

  def initial_state():
    return create_train_state(model, tx, jax.random.key(seed), image_shape)

  shapes = jax.eval_shape(initial_state)
  state_sharding = sharding_lib.state_shardings(shapes, mesh, sharding or config.get('sharding', 'replicated'))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, state_sharding)
  return Setup(model=model, learning_rate_fn=learning_rate_fn, tx=tx, mesh=mesh, abstract_state=abstract_state,
               state_sharding=state_sharding, dtype=compute_dtype(config), _create=initial_state)


def normalize_images(images: jnp.ndarray, dtype) -> jnp.ndarray:
  """uint8 [.., H, W, 3] -> normalised float, on the device (see data/augment.py for the statistics)."""
  mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(augment.IMAGENET_STD, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def variables_of(state: TrainState, params=None) -> dict:
  variables = {'params': state.params if params is None else params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables
