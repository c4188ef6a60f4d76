"""The device mesh and how arrays are laid out on it: replicated or FSDP-sharded state, batch-sharded data.

Every step (train, eval, inference) is one `jax.jit` program over a
`Mesh` of every device of every process with one axis, DATA_AXIS. The train
state is a tree of global arrays, replicated by default
(`config.sharding='replicated'`) or, with `config.sharding='fsdp'`, each large
array split over the data axis along a dimension that divides (ZeRO-3 /
FSDP: per-device state memory falls with the device count; the step gathers
the parameters and reduce-scatters the gradients). Batches are global arrays
split on their batch dimension, assembled from each process's local batch.

There are no hand-written collectives: the loss over the global batch,
cross-device BatchNorm statistics and the global Dice loss are ordinary
array code on global arrays, and XLA's SPMD partitioner inserts the
all-reduces. A model that needs per-device code would use `jax.shard_map`.
"""

import collections
import itertools
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jaxseg.errors import ConfigError

DATA_AXIS = 'data'
SHARDINGS = ('replicated', 'fsdp')
# FSDP leaves arrays smaller than this replicated: biases, BatchNorm scales and statistics, counters.
# Splitting them saves nothing and costs a collective each.
FSDP_MIN_SIZE = 2**14


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A one-axis mesh (DATA_AXIS) over `devices`: default every device of every process, in jax.devices() order."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split along the leading (batch) dimension over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """The largest dimension of `shape` that `num_shards` divides, split over the data axis; P() when none or small."""
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, mode: str) -> Any:
  """A NamedSharding per leaf of `abstract_state` (shapes only) for `mode` ('replicated' or 'fsdp')."""
  if mode not in SHARDINGS:
    raise ConfigError(f'config.sharding={mode!r}; choose one of {SHARDINGS}')
  n = mesh.shape[DATA_AXIS]
  if mode == 'replicated':
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch {name: [local_batch, ...]} -> global arrays split on the batch axis.

  Each process passes its own consecutive share; the global batch is the
  processes' shares in process order.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def prefetch(batches: Iterable[dict], mesh: Mesh, size: int) -> Iterator[dict]:
  """Global device batches, `size` of them transferred ahead of the one being consumed (device_put is async)."""
  queue = collections.deque()
  batches = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(global_batch(batch, mesh))

  enqueue(max(1, size))
  while queue:
    yield queue.popleft()
    enqueue(1)


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process fed, in order, as numpy."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # Several local devices may hold the same rows (a second mesh axis).
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def fetch_replicated(tree: Any, mesh: Mesh) -> Any:
  """The full value of every leaf as host numpy, on every process (a gather for sharded leaves).

  Every process must call it (the gather is a collective over the mesh).
  """
  gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), gathered)


def tree_bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of global arrays (its shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard_shape = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * x.dtype.itemsize
  return total
