"""jaxseg's production train step on one fixed device-resident batch: the step's own speed, input excluded.

Shared by bench_input.py and bench_loop.py (bench_train.py builds its state from a stub dataset spec instead,
with no dataset opened). Import it after JAX's device flags are set.
"""

import time

import jax
from flax import jax_utils

from jaxseg import optim, train
from jaxseg import state as state_lib


class FixedStep:
  """`train.make_train_step(...)` for `config`, with the state created and replicated as train_and_evaluate does.

  Attributes:
    state, metrics: the replicated train state and the last step's metrics (device arrays).
  """

  def __init__(self, config, spec, builder, host_batch):
    """host_batch: one numpy batch as the training pipeline yields it; placed on the devices as training does."""
    lr_fn = optim.create_learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optim.create_optimizer(config.optimizer, lr_fn)
    model = state_lib.build_model(config, spec.num_classes)
    host_state = state_lib.create_train_state(model, tx, jax.random.key(config.seed),
                                              tuple(config.input.crop_size) + (3,))
    self._p_train = train.make_train_step(config, spec, lr_fn, train.resolve_class_weights(config, spec, builder))
    self.state = state_lib.replicate(host_state)
    self.metrics = None
    self._rng = state_lib.replicate(jax.random.fold_in(jax.random.key(config.seed), 1))
    self._batch = jax.block_until_ready(next(jax_utils.prefetch_to_device(iter([host_batch]), 1)))
    self.batch_size = config.batch_size

  def step(self, batch=None) -> None:
    """Dispatches one step on `batch` (a device batch; default the fixed one) without waiting for it."""
    self.state, self.metrics = self._p_train(self.state, self._batch if batch is None else batch, self._rng)

  def wait(self) -> None:
    jax.block_until_ready((self.state, self.metrics))

  def images_per_s(self, steps: int, feed=None) -> float:
    """Runs `steps` steps (on batches from `feed`, else the fixed batch), synchronised at the two ends only."""
    self.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step(None if feed is None else next(feed))
    self.wait()
    return steps * self.batch_size / (time.perf_counter() - t0)
