"""Where the hook's arrays live, and bringing them to the host, on one or many processes.

In a multi-process run (``jax.distributed.initialize``) a ``jax.Array`` may
span devices of other processes ("global"): it cannot be fetched with
``jax.device_get`` unless it is fully replicated, nor copied through host
memory. The helpers here place host values on a sharding without a host
round trip of device data, copy device arrays on device, compare trees in
``jit`` and gather to the host with a collective where needed. On one
process they reduce to ``jax.device_put`` / ``jax.device_get``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import SingleDeviceSharding

PyTree = Any


def is_global(leaf: Any) -> bool:
  """Whether ``leaf`` is a ``jax.Array`` spanning devices of other processes."""
  return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def _is_committed(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and leaf.committed


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The fully replicated sharding over the devices of ``sharding``."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  if sharding.is_fully_replicated:
    return sharding
  devices = np.asarray(sharding._device_assignment)  # pylint: disable=protected-access
  return NamedSharding(Mesh(devices, ("devices",)), PartitionSpec())


def reference_sharding(*trees: PyTree) -> jax.sharding.Sharding:
  """Replicated sharding over the devices of the first committed array of ``trees``.

  Host values and uncommitted arrays (which ``jax.jit`` may move) go there,
  so they never conflict with the devices of committed arguments; without
  any committed array, this process's first device.
  """
  for leaf in jax.tree.leaves(trees):
    if _is_committed(leaf):
      return replicated(leaf.sharding)
  return SingleDeviceSharding(jax.local_devices()[0])


def sharding_or(leaf: Any, default: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """``leaf``'s sharding if it is a committed ``jax.Array``, else ``default``."""
  return leaf.sharding if _is_committed(leaf) else default


def with_batch_axes(sharding: jax.sharding.Sharding, num_axes: int,
                    default: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of ``(b_1, ..., b_num_axes, *shape)`` stacks of arrays sharded
  as ``sharding``: leading axes unsharded (``default`` if that cannot be said)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*((None,) * num_axes), *sharding.spec))
  return sharding if sharding.is_fully_replicated else default


def put(tree: PyTree, shardings: PyTree, *, copy: bool = False) -> PyTree:
  """``tree``'s leaves (host values or arrays) on ``shardings`` (``None``: left
  as is); with ``copy``, private copies (device data is copied on device, bitwise).

  Host values (and uncommitted arrays, which are local) bound for devices of
  other processes are assembled from this process's slices, as every process
  holds the same value: ``jax.device_put`` would first compare them across
  processes, a collective per leaf (and NaN never compares equal).
  """
  return jax.tree.map(lambda leaf, s: _put(leaf, s, copy), tree, shardings)


def _put(leaf: Any, sharding: jax.sharding.Sharding | None, copy: bool) -> Any:
  if sharding is None:  # an argument the compiled function does not use
    return leaf
  if _is_committed(leaf) or sharding.is_fully_addressable:
    return jax.device_put(leaf, sharding, may_alias=False if copy else None)
  host = np.asarray(jax.device_get(leaf))
  host = np.array(host, jax.dtypes.canonicalize_dtype(host.dtype), copy=copy or None)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def trees_equal(a: PyTree, b: PyTree) -> bool:
  """Bitwise equality of two trees of arrays of the same structure.

  Compared on the host when every leaf is fetchable, else in ``jit`` (a
  replicated boolean; every process must call it).
  """
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(leaves_a) != len(leaves_b):
    return False
  if not any(is_global(leaf) for leaf in leaves_a + leaves_b):
    host_a, host_b = jax.device_get((leaves_a, leaves_b))
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(host_a, host_b))
  if any(np.shape(u) != np.shape(v) for u, v in zip(leaves_a, leaves_b)):
    return False
  equal = jax.jit(lambda xs, ys: jnp.all(jnp.stack(
      [jnp.array_equal(x, y) for x, y in zip(xs, ys)])))(leaves_a, leaves_b)
  return bool(to_host(equal))


def to_host(tree: PyTree) -> PyTree:
  """``tree`` as numpy arrays on every process.

  Arrays spanning other processes' devices that are not fully replicated are
  gathered with ``multihost_utils.process_allgather``, a collective: every
  process must call this with the same tree.
  """
  def fetch(leaf):
    if is_global(leaf) and not leaf.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
  return jax.tree.map(fetch, tree)


def host_unless_global(tree: PyTree) -> PyTree:
  """``tree`` on the host, except arrays spanning several processes' devices."""
  return jax.tree.map(lambda a: a if is_global(a) else np.asarray(jax.device_get(a)), tree)
