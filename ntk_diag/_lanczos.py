"""Restarted Lanczos with full reorthogonalisation: the internals of :mod:`ntk_diag.spectral`.

:func:`lanczos_core` is :func:`ntk_diag.spectral.lanczos` without validation,
on a matvec callable over pytrees. A cycle builds an orthonormal Krylov basis
``V`` (reorthogonalised twice per step) and the tridiagonal ``T = Vᵀ A V``;
the Ritz value of ``T`` selected by ``which`` estimates the eigenvalue, with
residual ``β_j |y_j|``, and the next cycle restarts from the selected Ritz
vector. One cycle (compiled once per run) serves every cycle, the screen
(``screen_dim``: a short first cycle) included; the basis is held per pytree
leaf as ``(m + 1, *leaf)`` arrays, so a small ``m`` keeps short (warm) runs
cheap: every step reads the whole basis.

The basis storage is allocated once per solve and reused by every cycle:
rows a cycle has not written yet (left by an earlier cycle) are masked out
of its products, so any finite values will do. A caller that solves
repeatedly may keep it (``basis`` in, ``EigResult.basis`` out) and donate
it to the next call: no fresh (m + 1)-vector buffer per solve, which on CPU
is mostly page faults (the 669k-parameter MLP's 9-row basis: ~12 ms of a
38 ms warm sharpness run, measured).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

# Krylov basis size of `lanczos_core` when `krylov_dim` is None (capped by `num_iters`).
DEFAULT_KRYLOV_DIM = 32
_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EigResult:
  """An eigenpair estimate.

  Attributes:
    value: eigenvalue estimate (scalar).
    vector: unit-norm eigenvector estimate, a pytree like the operator's input;
      pass it back as ``init`` to warm-start the next solve.
    iterations: matrix-vector products performed (int32 scalar; for
      ``power_iteration`` on ``which="magnitude"`` one iteration is two products).
    converged: whether ``residual <= tol * |value|`` was reached (or, for
      Lanczos, an invariant subspace was found) within ``num_iters``.
    residual: ``‖B v − θ v‖`` of the operator ``B`` actually iterated (``A``,
      or ``A²`` for power iteration with ``which="magnitude"``).
    basis: Lanczos given a ``basis`` only: the basis storage after the solve
      (``(m + 1, *leaf)`` leaves), to hand to the next solve as its
      ``basis``; ``None`` otherwise.
  """
  value: jax.Array
  vector: PyTree
  iterations: jax.Array
  converged: jax.Array
  residual: jax.Array
  basis: PyTree = None


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.dot(a, b, precision=_HIGHEST)


def _select(thetas: jax.Array, which: str) -> jax.Array:
  return jnp.argmax(jnp.abs(thetas) if which == "magnitude" else thetas)


def _tridiagonal(alpha: jax.Array, beta: jax.Array, j: jax.Array, which: str) -> jax.Array:
  """``T_j`` in the top-left ``j × j`` block of an ``m × m`` matrix.

  The decoupled padding block is diagonal. For ``which="largest"`` its entries
  lie strictly below the Gershgorin bound of ``T_j`` so they are never
  selected; for ``"magnitude"`` they are 0, which wins only if ``T_j = 0``.
  """
  m = alpha.shape[0]
  idx = jnp.arange(m)
  filled = idx < j
  off = jnp.where(idx[:-1] + 1 < j, beta[:-1], 0.0)
  pad = jnp.zeros((), alpha.dtype)
  if which == "largest":
    abs_off = jnp.abs(off)
    radius = jnp.concatenate([abs_off, jnp.zeros((1,), alpha.dtype)]) + jnp.concatenate(
        [jnp.zeros((1,), alpha.dtype), abs_off])
    lower = jnp.min(jnp.where(filled, alpha - radius, jnp.inf))
    scale = jnp.max(jnp.where(filled, jnp.abs(alpha) + radius, 0.0))
    pad = lower - 0.5 * scale - jnp.finfo(alpha.dtype).tiny
  diag = jnp.where(filled, alpha, pad)
  return jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _lanczos_ritz(alpha, beta, j, a, b, tol, which) -> tuple:
  """Step ``j``'s coefficients ``a = α_j``, ``b = β_j`` into the tridiagonal, and its
  selected Ritz value, residual ``b |y_j|``, stop and breakdown flags."""
  alpha = alpha.at[j].set(a)
  beta = beta.at[j].set(b)
  thetas, vecs = jnp.linalg.eigh(_tridiagonal(alpha, beta, j + 1, which))
  idx = _select(thetas, which)
  theta = thetas[idx]
  residual = b * jnp.abs(vecs[j, idx])
  eps = jnp.finfo(alpha.dtype).eps
  breakdown = b <= 100 * eps * jnp.max(jnp.abs(thetas))  # invariant subspace
  done = jnp.logical_or(residual <= tol * jnp.abs(theta), breakdown)
  return alpha, beta, done, theta, residual, breakdown


def _cycle(matvec: Callable, basis: list, v0: list, *, m: int, budget: jax.Array, tol: float,
           which: str) -> tuple:
  """At most ``min(m, budget)`` Lanczos steps from the unit vector ``v0``, then its Ritz vectors.

  Vectors are lists of arrays (the leaves of a pytree) and ``matvec`` maps
  such a list to one; ``basis`` is the storage, per leaf an ``(m + 1, *leaf)``
  array of finite values: row 0 becomes ``v0``, row ``r`` the ``r``-th
  Lanczos vector, and rows beyond those written are masked out (zero
  coefficients). Every new vector is reorthogonalised against the basis twice
  ("twice is enough"). Returns ``(basis, vector, restart, theta, residual, j,
  done)``: the storage, the selected Ritz vector, the vector to restart from,
  its Ritz value and residual ``β_j |y_j|``, the steps taken and whether the
  stopping rule (or a breakdown) was met.
  """
  rows = m + 1
  row = jnp.arange(rows)
  # ⟨basis_r, u⟩ for the rows r ≤ j written by this cycle, 0 for the others.
  rows_dot = lambda basis, u, j: jnp.where(row <= j, sum(
      jnp.tensordot(b, a, axes=a.ndim, precision=_HIGHEST) for b, a in zip(basis, u)), 0.0)
  combine = lambda c, basis: [jnp.tensordot(c, b, axes=1, precision=_HIGHEST) for b in basis]

  def body(state):
    basis, v, alpha, beta, j, _, _, _ = state
    beta_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
    w = matvec(v)
    a = _dot_leaves(v, w)
    w = [x - a * y - beta_prev * lax.dynamic_index_in_dim(z, jnp.maximum(j - 1, 0),
                                                           keepdims=False)
         for x, y, z in zip(w, v, basis)]
    w = lax.fori_loop(0, 2, lambda _, u: [x - y for x, y in zip(
        u, combine(rows_dot(basis, u, j), basis))], w)
    b = jnp.sqrt(_dot_leaves(w, w))
    alpha, beta, done, theta, residual, breakdown = _lanczos_ritz(alpha, beta, j, a, b, tol,
                                                                  which)
    v_next = [jnp.where(breakdown, 0.0, x / jnp.where(breakdown, 1.0, b)).astype(x.dtype)
              for x in w]
    basis = [lax.dynamic_update_index_in_dim(z, x, j + 1, 0) for z, x in zip(basis, v_next)]
    return basis, v_next, alpha, beta, j + 1, done, theta, residual

  def cond(state):
    _, _, _, _, j, done, _, _ = state
    return jnp.logical_and(~done, jnp.logical_and(j < rows - 1, j < budget))

  dtype = v0[0].dtype
  basis = [lax.dynamic_update_index_in_dim(b, a, 0, 0) for b, a in zip(basis, v0)]
  zeros, zero = jnp.zeros((m,), dtype), jnp.zeros((), dtype)
  state = (basis, v0, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero, zero)
  basis, _, alpha, beta, j, done, theta, residual = lax.while_loop(cond, body, state)
  thetas, vecs = jnp.linalg.eigh(_tridiagonal(alpha, beta, j, which))
  # Combinations of the j rows written, as products with the whole basis and
  # zero coefficients elsewhere: slicing the basis would copy it.
  coeffs = lambda y: jnp.where(row < j, jnp.concatenate([y, jnp.zeros((1,), y.dtype)]), 0.0)
  vector = _unit(combine(coeffs(vecs[:, _select(thetas, which)]), basis), v0)
  restart = vector
  if which == "magnitude":  # keep both ends of the spectrum alive
    ends = vecs[:, jnp.argmax(thetas)] + vecs[:, jnp.argmin(thetas)]
    restart = _unit(combine(coeffs(ends), basis), vector)
  return basis, vector, restart, theta, residual, j, done


def _dot_leaves(u: list, w: list) -> jax.Array:
  return sum(_dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(u, w))


def _unit(v: list, fallback: list) -> list:
  norm = jnp.sqrt(_dot_leaves(v, v))
  return [jnp.where(norm > 0, a / jnp.where(norm > 0, norm, 1.0), f) for a, f in zip(v, fallback)]


def _restarted(cycle: Callable, basis: list, v0: list, num_iters: int,
               first_budget: int | None) -> tuple:
  """Cycles restarted from ``v0`` until one converges or ``num_iters`` products are
  used: ``(basis, vector, theta, residual, steps, converged)``. ``first_budget``
  caps the first cycle (the screen); the later ones get what is left of
  ``num_iters``. Every cycle writes into the same ``basis`` storage."""
  zero = jnp.zeros((), v0[0].dtype)
  first = num_iters if first_budget is None else min(first_budget, num_iters)

  def body(state):
    basis, start, _, _, _, it, _ = state
    budget = jnp.where(it == 0, first, num_iters - it)
    basis, vector, restart, theta, residual, taken, done = cycle(basis, start, budget)
    return basis, restart, vector, theta, residual, it + taken, done

  state = (basis, v0, v0, zero, zero, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  basis, _, vector, theta, residual, it, converged = lax.while_loop(
      lambda st: jnp.logical_and(~st[6], st[5] < num_iters), body, state)
  return basis, vector, theta, residual, it, converged


def krylov_dim_of(init: PyTree, num_iters: int, krylov_dim: int | None) -> int:
  """The basis size ``m`` :func:`lanczos_core` uses: ``krylov_dim`` (default
  ``min(num_iters, DEFAULT_KRYLOV_DIM)``), at most the vectors' size."""
  size = sum(a.size for a in jax.tree.leaves(init))
  return max(1, min(krylov_dim or min(num_iters, DEFAULT_KRYLOV_DIM), size))


def zero_basis(init: PyTree, num_iters: int, krylov_dim: int | None) -> PyTree:
  """Zero basis storage for :func:`lanczos_core`'s ``basis``: ``init``'s structure,
  leaves ``(m + 1, *leaf.shape)`` (NumPy, to be placed by the caller)."""
  rows = krylov_dim_of(init, num_iters, krylov_dim) + 1
  return jax.tree.map(lambda a: np.zeros((rows,) + np.shape(a), a.dtype), init)


def lanczos_core(matvec, init, *, num_iters, tol, krylov_dim=None, which="largest",
                 screen_dim=None, basis=None) -> EigResult:
  """:func:`ntk_diag.spectral.lanczos` without validation, on a matvec callable.

  Vectors stay pytrees of ``init``'s leaves (ravelling them at the operator
  boundary makes XLA:CPU compute the products' weight gradients in a layout
  that runs 4-40x slower: 285 vs 7 ms per Hessian-vector product of the
  benchmark CNN, measured). ``screen_dim``: a first cycle of at most
  ``screen_dim`` steps, restarted (same basis, budget and stopping rule)
  from its Ritz vector only when it has not converged; ``None``: none.
  ``basis``: the basis storage, e.g. :func:`zero_basis` or the previous
  solve's ``EigResult.basis`` (any finite values: rows not yet written by a
  cycle are masked); ``None``: zeros made here, and not returned
  (``EigResult.basis`` is then ``None``: no (m + 1)-vector array outlives the solve).
  """
  m = krylov_dim_of(init, num_iters, krylov_dim)
  first = None if screen_dim is None or screen_dim >= min(m, num_iters) else screen_dim
  leaves, treedef = jax.tree.flatten(init)
  keep = basis is not None
  if keep:
    basis = [jnp.asarray(b, a.dtype) for b, a in zip(treedef.flatten_up_to(basis), leaves)]
  else:
    basis = [jnp.zeros((m + 1,) + a.shape, a.dtype) for a in leaves]
  tree_matvec = lambda u: jax.tree.leaves(matvec(jax.tree.unflatten(treedef, u)))
  cycle = lambda basis, start, budget: _cycle(tree_matvec, basis, start, m=m, budget=budget,
                                              tol=tol, which=which)
  basis, vector, theta, residual, j, done = _restarted(cycle, basis, _unit(leaves, leaves),
                                                       num_iters, first)
  return EigResult(value=theta, vector=jax.tree.unflatten(treedef, vector), iterations=j,
                   converged=done, residual=residual,
                   basis=jax.tree.unflatten(treedef, basis) if keep else None)
