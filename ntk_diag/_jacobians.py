"""Per-example Jacobians and the generic NTK blocks built from them.

The layer below :mod:`ntk_diag.structured` and :mod:`ntk_diag.ntk`: it knows
nothing of layer structure. ``K[i, j, a, b] = J_{x1_i}[a] · J_{x2_j}[b]`` with
``J_x`` the ``k × P`` Jacobian of the outputs at example ``x``.

* :func:`jacobian_block` — per-example Jacobians (vmapped ``jacrev``),
  contracted leaf by leaf (:func:`contract_jacobians`).
* :func:`ntk_vp_block` — NTK-vector products, one VJP then one JVP per column;
  no Jacobian is formed.
* :func:`blockwise` — any such block function tiled over ``block × block``
  examples, one tile at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from ntk_diag import _model

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST


def per_example_jacobians(apply_fn: Callable, params: PyTree, x: PyTree) -> PyTree:
  """Jacobians ``d f(x_i) / d params``, leaves of shape ``(n, k, *leaf.shape)``."""
  f = _model.per_example(apply_fn)
  return jax.vmap(jax.jacrev(f), in_axes=(None, 0))(params, x)


def contract_jacobians(jac1: PyTree, jac2: PyTree, trace_outputs: bool, *,
                       output_axes: str = "ijab") -> jax.Array:
  """``sum_p J1[i, a, p] J2[j, b, p]`` summed over all leaves.

  ``jac1``/``jac2`` are pytrees (or lists) of per-example Jacobians
  ``(n, k, *leaf)``. Returns ``(n1, n2)`` if ``trace_outputs`` (the sum over
  ``a = b``), else ``(n1, n2, k, k)`` (``output_axes="ijab"``) or
  ``(n1, k, n2, k)`` (``output_axes="iajb"``, the layout the structured layer
  terms are summed in).
  """
  spec = "iap,jap->ij" if trace_outputs else f"iap,jbp->{output_axes}"

  def leaf(j1, j2):
    j1 = j1.reshape(j1.shape[0], j1.shape[1], -1)
    j2 = j2.reshape(j2.shape[0], j2.shape[1], -1)
    return jnp.einsum(spec, j1, j2, precision=_HIGHEST)

  return sum(jax.tree.leaves(jax.tree.map(leaf, jac1, jac2)))


def jacobian_block(apply_fn, params, x1, x2, *, trace_outputs):
  """Kernel block by Jacobian contraction; ``x2 is x1`` computes the Jacobians once."""
  jac1 = per_example_jacobians(apply_fn, params, x1)
  jac2 = jac1 if x2 is x1 else per_example_jacobians(apply_fn, params, x2)
  return contract_jacobians(jac1, jac2, trace_outputs)


def ntk_vp_block(apply_fn, params, x1, x2, *, trace_outputs):
  """Columns ``K[:, j, :, b] = J_{x1} (J_{x2_j}[b])ᵀ`` by a VJP then a JVP."""
  f = _model.per_example(apply_fn)
  f_batch = _model.batched(apply_fn)
  k = jax.eval_shape(f, params, jax.tree.map(lambda a: a[0], x2)).shape[0]
  eye = jnp.eye(k, dtype=_model.param_dtype(params))

  def column(xj, b):
    _, vjp = jax.vjp(lambda p: f(p, xj), params)
    (tangent,) = vjp(eye[b])
    _, col = jax.jvp(lambda p: f_batch(p, x1), (params,), (tangent,))
    return col[:, b] if trace_outputs else col  # (n1,) or (n1, k)

  def per_example_columns(xj):
    cols = jax.vmap(lambda b: column(xj, b))(jnp.arange(k))  # (k, n1[, k])
    return cols.sum(0) if trace_outputs else jnp.moveaxis(cols, 0, -1)  # (n1[, k, k])

  cols = lax.map(per_example_columns, x2)  # (n2, n1[, k, k])
  return jnp.swapaxes(cols, 0, 1)


def blockwise(block_fn: Callable, x1: PyTree, x2: PyTree, n1: int, n2: int, block: int,
              share: bool = False) -> jax.Array:
  """Assemble ``block_fn(x1_block, x2_block)`` over ``block × block`` tiles.

  ``block_fn`` maps batches of ``b1`` and ``b2`` examples to an array whose
  first two axes are ``(b1, b2)``. Tiles are computed sequentially
  (``lax.map``), so peak memory is that of one tile. ``share``: ``x2`` is
  ``x1``, so its tiles are reused.
  """
  if block >= n1 and block >= n2:
    return block_fn(x1, x2)
  b1, b2 = min(block, n1), min(block, n2)
  tiles1 = _model.pad_to_blocks(x1, n1, b1)
  tiles2 = tiles1 if (share and b1 == b2) else _model.pad_to_blocks(x2, n2, b2)
  rows = lax.map(lambda t1: lax.map(lambda t2: block_fn(t1, t2), tiles2), tiles1)
  # (nb1, nb2, b1, b2, ...) -> (nb1*b1, nb2*b2, ...)
  rows = jnp.swapaxes(rows, 1, 2)
  shape = rows.shape
  rows = rows.reshape((shape[0] * shape[1], shape[2] * shape[3]) + shape[4:])
  return rows[:n1, :n2]
