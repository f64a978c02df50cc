"""Pytree arithmetic: the one place where parameter-space vectors are combined.

Parameters stay in the user's pytree layout (Flax dicts, ``nnx.State``);
nothing here ravels them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Euclidean inner product ``<a, b>`` summed over all leaves."""
  parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(parts, jnp.zeros((), jnp.result_type(*parts) if parts else jnp.float32))


def tree_sq_norm(a: PyTree) -> jax.Array:
  """Squared Euclidean norm ``||a||^2`` over all leaves."""
  return tree_vdot(a, a)


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm ``||a||`` over all leaves."""
  return jnp.sqrt(tree_sq_norm(a))


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(scalar: jax.Array | float, a: PyTree) -> PyTree:
  return jax.tree.map(lambda x: (scalar * x).astype(x.dtype), a)


def tree_axpy(scalar: jax.Array | float, x: PyTree, y: PyTree) -> PyTree:
  """``scalar * x + y``."""
  return jax.tree.map(lambda u, v: (scalar * u + v).astype(v.dtype), x, y)


def tree_size(a: PyTree) -> int:
  """Number of scalars in ``a`` (the parameter count ``P``)."""
  return sum(int(x.size) for x in jax.tree.leaves(a))


def tree_random_normal_like(key: jax.Array, a: PyTree) -> PyTree:
  """Standard normal pytree with the structure, shapes and dtypes of ``a``.

  One draw of ``P`` normals split into the leaves (a single PRNG call compiles
  much faster than one per leaf).
  """
  leaves, treedef = jax.tree.flatten(a)
  if not leaves:
    return a
  sizes = [int(x.size) for x in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.result_type(*leaves))
  offsets = [0]
  for size in sizes:
    offsets.append(offsets[-1] + size)
  return jax.tree.unflatten(treedef, [
      flat[start:stop].reshape(x.shape).astype(x.dtype)
      for x, start, stop in zip(leaves, offsets[:-1], offsets[1:])])


def tree_normalize(a: PyTree) -> tuple[PyTree, jax.Array]:
  """``(a / ||a||, ||a||)``; a zero vector is returned unchanged."""
  norm = tree_norm(a)
  safe = jnp.where(norm > 0, norm, 1.0)
  return tree_scale(1.0 / safe, a), norm


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_names(tree: PyTree) -> list[str]:
  """Dotted key paths of the leaves of ``tree``, in flattening order
  (``"Dense_0.kernel"``; ``"layers.0.kernel.value"`` for NNX state)."""
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [".".join(_key_name(e) for e in path) for path, _ in paths]
