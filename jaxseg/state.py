"""The train state and the model it holds: building, initialising, moving to and from the host."""

from typing import Any, Optional

from flax import jax_utils
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg import models
from jaxseg.data import augment

AXIS = 'batch'  # The pmap axis: one entry per device of every host.


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and BatchNorm statistics, plus non-finite-loss bookkeeping."""
  batch_stats: Any
  skipped_updates: jnp.ndarray  # int32: updates dropped because the loss or a gradient was not finite.
  first_nonfinite_step: jnp.ndarray  # int32: step of the first such update, -1 if none.


def compute_dtype(config) -> Any:
  return jnp.bfloat16 if config.half_precision else jnp.float32


def build_model(config, num_classes: int, *, axis_name: Optional[str] = AXIS):
  return models.create_model(config.model, num_classes=num_classes, dtype=compute_dtype(config),
                             axis_name=axis_name)


def initial_variables(model, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
  """Initialises the model on one dummy image (on the host, jitted)."""
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False))
  return dict(init(rng))


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...]) -> TrainState:
  variables = initial_variables(model, rng, image_shape)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx,
                           skipped_updates=jnp.zeros((), jnp.int32),
                           first_nonfinite_step=-jnp.ones((), jnp.int32))


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


def replicate(tree: Any, devices: Optional[list] = None) -> Any:
  """One copy of every array on each local device, laid out as the pmapped steps return them.

  `flax.jax_utils.replicate` places arrays on a mesh whose axis has another
  name than the pmap axis, so the first step's output would not match its
  input and the step would compile a second time.
  """
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Typed PRNG keys: replicate their raw data and wrap it again on the devices.
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding)

  return jax.tree.map(put, tree)


def host_state(state: TrainState) -> TrainState:
  """Replicated device state -> one host (numpy) copy."""
  return jax.device_get(jax_utils.unreplicate(state))


def host_state_like(state: TrainState) -> TrainState:
  """The unreplicated host structure a checkpoint restores into."""
  return jax.device_get(state)


