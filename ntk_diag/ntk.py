"""Empirical neural tangent kernel.

``K[i, j, a, b] = J_{x1_i}[a] · J_{x2_j}[b]`` where ``J_x`` is the ``k × P``
Jacobian of the outputs at example ``x`` w.r.t. the flattened parameters.
With ``trace_outputs=True`` the result is ``sum_a K[i, j, a, a]`` (the sum, not
the mean, over outputs).

Methods (all exact up to float rounding; they differ in cost and memory):

* ``"jacobian"`` — per-example Jacobians (vmapped ``jacrev``), contracted leaf
  by leaf. Cost ``(n1 + n2)·k`` backward passes plus ``n1·n2·k²·P`` FLOPs for
  the contraction; memory ``(n1 + n2)·k·P``.
* ``"ntk_vp"`` — NTK-vector products: for each column ``(j, b)`` one VJP at
  ``x2_j`` then one JVP over ``x1``. Never forms a Jacobian; memory
  ``O(P + n1·activations)`` per vectorised column. Best when ``k`` is large.
* ``"structured"`` — exploits the structure of Dense/Conv layers; see
  :mod:`ntk_diag.structured`. Falls back to ``"jacobian"`` where it does not apply.
* ``"auto"`` — the cheapest by a FLOP estimate.

``batch_size`` computes the kernel in ``batch_size × batch_size`` blocks of
examples; ``None`` picks a block size that keeps the estimated peak memory
within a budget (a quarter of device memory by default).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation

PyTree = Any

METHODS = ("auto", "jacobian", "ntk_vp", "structured")
_HIGHEST = lax.Precision.HIGHEST


def empirical_ntk(apply_fn: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                  trace_outputs: bool = False, method: str = "auto",
                  batch_size: int | None = None,
                  memory_budget_bytes: int | None = None) -> jax.Array:
  """Empirical NTK of ``apply_fn`` at ``params``.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; ``k = prod(out)``.
    params: pytree of trainable parameters (derivatives are taken w.r.t. these only).
    x1: batch of ``n1`` inputs (array or pytree with a leading batch axis);
      integer inputs such as token ids are fine.
    x2: batch of ``n2`` inputs with the per-example shape of ``x1``; ``None`` means ``x1``.
    trace_outputs: return ``sum_a K[:, :, a, a]`` of shape ``(n1, n2)``.
    method: ``"auto"``, ``"jacobian"``, ``"ntk_vp"`` or ``"structured"``.
    batch_size: examples per block; bounds peak memory, same result.
    memory_budget_bytes: peak-memory budget used when ``batch_size`` is None.

  Returns:
    ``(n1, n2, k, k)``, or ``(n1, n2)`` if ``trace_outputs`` or the model output
    has shape ``(n,)``.
  """
  _validation.check_callable("apply_fn", apply_fn)
  _validation.check_one_of("method", method, METHODS)
  _validation.check_positive_int("batch_size", batch_size, optional=True)
  _validation.check_positive_int("memory_budget_bytes", memory_budget_bytes, optional=True)
  if not isinstance(trace_outputs, (bool, np.bool_)):
    raise TypeError(f"`trace_outputs` must be a bool; got {trace_outputs!r}.")
  n1 = _validation.leading_size("x1", x1)
  n2 = n1
  if x2 is not None:
    n2 = _validation.leading_size("x2", x2)
    _validation.check_same_features("x1", x1, "x2", x2)
  out_shape = _model.example_output_shape(apply_fn, params, x1)
  k = _model.num_outputs(out_shape)
  num_params = _tree.tree_size(params)
  if method == "auto":
    method = choose_method(apply_fn, params, x1, n1, n2, k, num_params, bool(trace_outputs))
  budget = memory_budget_bytes or _memory.default_budget_bytes()
  itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
  fitting = None
  if method == "structured":
    from ntk_diag import structured  # local: structured imports this module
    fitting = structured.choose_batch_size(apply_fn, params, x1, n1, n2, k,
                                           bool(trace_outputs), itemsize, budget)
  if fitting is None:
    fitting = choose_batch_size(method, n1, n2, k, num_params, itemsize, budget)
  if batch_size is None:
    batch_size = fitting
  elif min(batch_size, max(n1, n2)) > fitting:
    # Refuse before XLA tries (and the OS kills the process).
    raise ValueError(
        f"`batch_size`={batch_size} exceeds the memory budget of {budget / 2**30:.2f} GiB for "
        f"method={method!r} with P={num_params} parameters and k={k} outputs; "
        f"batch_size={fitting} fits (or pass a larger memory_budget_bytes).")
  kernel = _ntk_jit(apply_fn, params, x1, x2, trace_outputs=bool(trace_outputs),
                    method=method, batch_size=batch_size)
  if out_shape == () and not trace_outputs:
    kernel = kernel[:, :, 0, 0]
  return kernel


def empirical_ntk_and_diagonal(apply_fn: Callable, params: PyTree, x: PyTree, *,
                               num_diagonal: int, trace_outputs: bool = False,
                               method: str = "auto", batch_size: int | None = None,
                               memory_budget_bytes: int | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """``empirical_ntk(apply_fn, params, x, ...)`` and the Gram blocks ``J_{x_i} J_{x_i}ᵀ``
  (``(num_diagonal, k, k)``, the full diagonal blocks ``K[i, i]``) of the first
  ``num_diagonal`` examples.

  With the structured method in one block (the default when it applies and
  fits) both come from the same per-example layer inputs and cotangents;
  otherwise the blocks are computed apart, as :func:`example_gram` does.
  Traceable (no validation): for callers such as the hook's snapshot, which
  needs the kernel of every probe point and per-example Jacobian norms.
  """
  n = _validation.leading_size("x", x)
  out_shape = _model.example_output_shape(apply_fn, params, x)
  k = _model.num_outputs(out_shape)
  num_diagonal = min(num_diagonal, n)
  if method in ("auto", "structured") and (batch_size or n) >= n:
    from ntk_diag import structured  # local: structured imports this module
    itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
    budget = memory_budget_bytes or _memory.default_budget_bytes()
    fitting = structured.choose_batch_size(apply_fn, params, x, n, n, k, bool(trace_outputs),
                                           itemsize, budget)
    structured_wanted = method == "structured" or choose_method(
        apply_fn, params, x, n, n, k, _tree.tree_size(params), bool(trace_outputs)) == "structured"
    if fitting is not None and fitting >= n and structured_wanted:
      kernel, diagonal = _structured_joint(apply_fn, params, x, trace_outputs=bool(trace_outputs),
                                           count=num_diagonal)
      if out_shape == () and not trace_outputs:
        kernel = kernel[:, :, 0, 0]
      return kernel, diagonal
  kernel = empirical_ntk(apply_fn, params, x, trace_outputs=trace_outputs, method=method,
                         batch_size=batch_size, memory_budget_bytes=memory_budget_bytes)
  diagonal = jax.vmap(lambda xi: example_gram(apply_fn, params, xi))(
      _model.take(x, jnp.arange(num_diagonal)))
  return kernel, diagonal


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "count"))
def _structured_joint(apply_fn, params, x, *, trace_outputs, count):
  from ntk_diag import structured
  return structured.kernel_and_diagonal(apply_fn, params, x, trace_outputs, count)


def choose_method(apply_fn: Callable, params: PyTree, x: PyTree, n1: int, n2: int, k: int,
                  num_params: int, trace_outputs: bool) -> str:
  """Cheapest exact method by a FLOP estimate.

  With ``F`` the forward FLOPs of one example, a backward pass costs ``~3F``:
  ``jacobian ≈ 3F·(n1+n2)·k + 2·n1·n2·k^c·P`` (``c = 1`` traced, ``2`` full) and
  ``ntk_vp ≈ 3F·n2·k·(1 + n1)``.
  """
  from ntk_diag import structured  # local: structured imports this module

  if structured.applies(apply_fn, params, x):
    return "structured"
  flops = _forward_flops(apply_fn, params, x, num_params)
  contraction = 2.0 * n1 * n2 * (k if trace_outputs else k * k) * num_params
  jacobian_cost = 3.0 * flops * (n1 + n2) * k + contraction
  ntk_vp_cost = 3.0 * flops * n2 * k * (1 + n1)
  return "jacobian" if jacobian_cost <= ntk_vp_cost else "ntk_vp"


def _forward_flops(apply_fn: Callable, params: PyTree, x: PyTree, num_params: int) -> float:
  """FLOPs of one forward example from XLA's cost analysis; ``2P`` if unavailable."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), a.dtype), x)
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
  try:
    cost = jax.jit(apply_fn).lower(p, one).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
  except Exception:  # cost analysis is best effort on every backend
    flops = 0.0
  return max(flops, 2.0 * num_params)


def choose_batch_size(method: str, n1: int, n2: int, k: int, num_params: int,
                      itemsize: int, budget_bytes: int) -> int:
  """Largest block of examples whose estimated peak memory fits ``budget_bytes``.

  ``"jacobian"`` holds two blocks of per-example Jacobians, ``2·b·k·P`` scalars
  (also the estimate for ``"structured"`` when its own,
  :func:`ntk_diag.structured.choose_batch_size`, does not apply); ``"ntk_vp"``
  holds ``O(P)`` per column and needs no blocking beyond the kernel itself.
  """
  n = max(n1, n2)
  if method == "ntk_vp":
    return n
  per_example = 2 * k * num_params * itemsize
  return int(max(1, min(n, budget_bytes // max(per_example, 1))))


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "trace_outputs", "method", "batch_size"))
def _ntk_jit(apply_fn, params, x1, x2, *, trace_outputs, method, batch_size):
  """``x2=None`` means ``x1``; per-example Jacobians are then computed once."""
  symmetric = x2 is None
  x2 = x1 if symmetric else x2
  if method == "structured":
    from ntk_diag import structured
    block_fn = structured.kernel_block_fn(apply_fn, params, trace_outputs)
  else:
    block_fn = {"jacobian": _jacobian_block, "ntk_vp": _ntk_vp_block}[method]
    block_fn = functools.partial(block_fn, apply_fn, params, trace_outputs=trace_outputs)
  n1 = jax.tree.leaves(x1)[0].shape[0]
  n2 = jax.tree.leaves(x2)[0].shape[0]
  return blockwise(block_fn, x1, x2, n1, n2, batch_size,
                   share=symmetric and method in ("jacobian", "structured"))


def blockwise(block_fn: Callable, x1: PyTree, x2: PyTree, n1: int, n2: int, block: int,
              share: bool = False) -> jax.Array:
  """Assemble ``block_fn(x1_block, x2_block)`` over ``block × block`` tiles.

  ``block_fn`` maps batches of ``b1`` and ``b2`` examples to an array whose
  first two axes are ``(b1, b2)``. Tiles are computed sequentially
  (``lax.map``), so peak memory is that of one tile.
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


def per_example_jacobians(apply_fn: Callable, params: PyTree, x: PyTree) -> PyTree:
  """Jacobians ``d f(x_i) / d params``, leaves of shape ``(n, k, *leaf.shape)``."""
  f = _model.per_example(apply_fn)
  return jax.vmap(jax.jacrev(f), in_axes=(None, 0))(params, x)


def example_gram(apply_fn: Callable, params: PyTree, xi: PyTree) -> jax.Array:
  """``J_x J_xᵀ`` at one example ``xi`` (no batch axis), shape ``(k, k)``.

  The diagonal block ``K[i, i]`` of the NTK, computed with the structured rules
  where they apply (no Jacobian is formed for Dense/Conv layers) and by
  Jacobian contraction otherwise.
  """
  from ntk_diag import structured  # local: structured imports this module
  xb = jax.tree.map(lambda a: a[None], xi)
  return structured.kernel_block_fn(apply_fn, params, False)(xb, xb)[0, 0]


def contract_jacobians(jac1: PyTree, jac2: PyTree, trace_outputs: bool) -> jax.Array:
  """``sum_p J1[i, a, p] J2[j, b, p]`` over all leaves -> ``(n1, n2, k, k)`` or ``(n1, n2)``."""
  spec = "iap,jap->ij" if trace_outputs else "iap,jbp->ijab"

  def leaf(j1, j2):
    j1 = j1.reshape(j1.shape[0], j1.shape[1], -1)
    j2 = j2.reshape(j2.shape[0], j2.shape[1], -1)
    return jnp.einsum(spec, j1, j2, precision=_HIGHEST)

  return sum(jax.tree.leaves(jax.tree.map(leaf, jac1, jac2)))


def _jacobian_block(apply_fn, params, x1, x2, *, trace_outputs):
  jac1 = per_example_jacobians(apply_fn, params, x1)
  jac2 = jac1 if x2 is x1 else per_example_jacobians(apply_fn, params, x2)
  return contract_jacobians(jac1, jac2, trace_outputs)


def _ntk_vp_block(apply_fn, params, x1, x2, *, trace_outputs):
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
