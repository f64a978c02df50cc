"""Restarted Lanczos with full reorthogonalisation: the internals of :mod:`ntk_diag.spectral`.

:func:`lanczos_core` is :func:`ntk_diag.spectral.lanczos` without validation,
on a matvec callable over pytrees. A cycle builds an orthonormal Krylov basis
``V`` (reorthogonalised twice per step) and the tridiagonal ``T = Vᵀ A V``;
the Ritz value of ``T`` selected by ``which`` estimates the eigenvalue, with
residual ``β_j |y_j|``, and the next cycle restarts from the selected Ritz
vector. The plain run holds its basis as one ``(m + 1, P)`` array (vectors
ravelled at the operator boundary); the screened run (``screen_dim``) holds
it per pytree leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

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
  """
  value: jax.Array
  vector: PyTree
  iterations: jax.Array
  converged: jax.Array
  residual: jax.Array


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


def _lanczos_cycle_init(v0: jax.Array, m: int) -> tuple:
  basis = jnp.zeros((m + 1,) + v0.shape, v0.dtype).at[0].set(v0)
  zeros = jnp.zeros((m,), v0.dtype)
  zero = jnp.zeros((), v0.dtype)
  # (basis, alpha, beta, j, done, theta, residual)
  return basis, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero, zero


def _lanczos_cond_fun(state: tuple, m: int, budget: jax.Array) -> jax.Array:
  _, _, _, j, done, _, _ = state
  return jnp.logical_and(~done, jnp.logical_and(j < m, j < budget))


def _lanczos_body_fun(state: tuple, matvec: Callable, tol: float, which: str) -> tuple:
  """One Lanczos step on flat vectors; ``basis`` rows beyond ``j`` are zero."""
  basis, alpha, beta, j, _, _, _ = state
  v = basis[j]
  beta_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
  w = matvec(v)
  a = _dot(v, w)
  w = w - a * v - beta_prev * basis[jnp.maximum(j - 1, 0)]
  # Full reorthogonalisation against the basis, twice ("twice is enough").
  w = lax.fori_loop(0, 2, lambda _, u: u - _dot(_dot(basis, u), basis), w)
  b = jnp.linalg.norm(w)
  alpha, beta, done, theta, residual, breakdown = _lanczos_ritz(alpha, beta, j, a, b, tol, which)
  v_next = jnp.where(breakdown, 0.0, w / jnp.where(breakdown, 1.0, b)).astype(w.dtype)
  return basis.at[j + 1].set(v_next), alpha, beta, j + 1, done, theta, residual


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


def _tree_cycle(matvec: Callable, v0: list, treedef: Any, *, rows: int, m: int,
                 budget: jax.Array, tol: float, which: str) -> tuple:
  """At most ``rows - 1`` Lanczos steps from the unit leaves ``v0``, on pytrees.

  The same step as :func:`_lanczos_body_fun`, with the basis held per leaf
  (``(rows, *leaf)``) and the current vector carried as a loop variable, so
  the operator sees its own pytree (ravelling vectors at every product costs
  more than the product itself on CPU at a few steps). Returns
  ``(vector, restart, theta, residual, j, done)`` as :func:`_lanczos_finish`,
  vectors as leaf lists.
  """
  tree_matvec = lambda u: jax.tree.leaves(matvec(jax.tree.unflatten(treedef, u)))
  rows_dot = lambda basis, u: sum(
      jnp.tensordot(b, a, axes=a.ndim, precision=_HIGHEST) for b, a in zip(basis, u))
  combine = lambda c, basis: [jnp.tensordot(c, b, axes=1, precision=_HIGHEST) for b in basis]

  def body(state):
    basis, v, alpha, beta, j, _, _, _ = state
    beta_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
    w = tree_matvec(v)
    a = _tree_dot(v, w)
    w = [x - a * y - beta_prev * lax.dynamic_index_in_dim(z, jnp.maximum(j - 1, 0),
                                                           keepdims=False)
         for x, y, z in zip(w, v, basis)]
    w = lax.fori_loop(0, 2, lambda _, u: [x - y for x, y in zip(
        u, combine(rows_dot(basis, u), basis))], w)
    b = jnp.sqrt(_tree_dot(w, w))
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
  basis = [jnp.zeros((rows,) + a.shape, a.dtype).at[0].set(a) for a in v0]
  zeros, zero = jnp.zeros((m,), dtype), jnp.zeros((), dtype)
  state = (basis, v0, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero, zero)
  basis, _, alpha, beta, j, done, theta, residual = lax.while_loop(cond, body, state)
  thetas, vecs = jnp.linalg.eigh(_tridiagonal(alpha, beta, j, which))
  # The last row never enters a Ritz vector: a zero coefficient (no copy of the others).
  coeffs = lambda y: jnp.concatenate([y[:rows - 1], jnp.zeros((1,), y.dtype)])
  vector = _tree_unit(combine(coeffs(vecs[:, _select(thetas, which)]), basis), v0)
  restart = vector
  if which == "magnitude":  # keep both ends of the spectrum alive
    ends = vecs[:, jnp.argmax(thetas)] + vecs[:, jnp.argmin(thetas)]
    restart = _tree_unit(combine(coeffs(ends), basis), vector)
  return vector, restart, theta, residual, j, done


def _tree_dot(u: list, w: list) -> jax.Array:
  return sum(_dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(u, w))


def _tree_unit(v: list, fallback: list) -> list:
  norm = jnp.sqrt(_tree_dot(v, v))
  return [jnp.where(norm > 0, a / jnp.where(norm > 0, norm, 1.0), f) for a, f in zip(v, fallback)]


def _normalize(v: jax.Array, fallback: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(v)
  return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), fallback)


def _lanczos_cycle(matvec, v0, *, m, budget, tol, which):
  """One Lanczos run of at most ``min(m, budget)`` steps from unit ``v0``."""
  state = lax.while_loop(lambda st: _lanczos_cond_fun(st, m, budget),
                         lambda st: _lanczos_body_fun(st, matvec, tol, which),
                         _lanczos_cycle_init(v0, m))
  return _lanczos_finish(state, v0, which)


def _lanczos_finish(state: tuple, v0: jax.Array, which: str) -> tuple:
  """``(vector, restart, theta, residual, j, done)`` of a cycle's final state."""
  basis, alpha, beta, j, done, theta, residual = state
  thetas, vecs = jnp.linalg.eigh(_tridiagonal(alpha, beta, j, which))
  # Combinations of the first rows, as products with the whole basis and a
  # zero last coefficient: slicing `basis[:rows - 1]` would copy them.
  rows = basis.shape[0]
  combine = lambda coeffs: _dot(
      jnp.concatenate([coeffs[:rows - 1], jnp.zeros((1,), coeffs.dtype)]), basis)
  vector = _normalize(combine(vecs[:, _select(thetas, which)]), v0)
  restart = vector
  if which == "magnitude":  # keep both ends of the spectrum alive
    ends = vecs[:, jnp.argmax(thetas)] + vecs[:, jnp.argmin(thetas)]
    restart = _normalize(combine(ends), vector)
  return vector, restart, theta, residual, j, done


def lanczos_core(matvec, init, *, num_iters, tol, krylov_dim=None, which="largest",
                 screen_dim=None) -> EigResult:
  """:func:`ntk_diag.spectral.lanczos` without validation, on a matvec callable.

  ``screen_dim``: at most ``screen_dim`` first steps with a small basis,
  continued from their Ritz vector (restarted, full basis, same budget and
  stopping rule) only when they have not converged; ``None`` (or at least the
  basis size): no screen.
  """
  # The Krylov basis is one `(m + 1, P)` array: vectors are ravelled at the
  # operator boundary only, so reorthogonalisation is one matrix product (and
  # compiles far faster than per-leaf products); the operator sees pytrees.
  flat_init, unravel = ravel_pytree(init)
  flat_matvec = lambda u: ravel_pytree(matvec(unravel(u)))[0]
  m = max(1, min(krylov_dim or min(num_iters, DEFAULT_KRYLOV_DIM), flat_init.shape[0]))
  run = lambda start, budget: _flat_lanczos(flat_matvec, start, num_iters=budget, tol=tol,
                                            krylov_dim=m, which=which)
  if screen_dim is None or screen_dim >= min(m, num_iters):
    result = run(flat_init, num_iters)
    return dataclasses.replace(result, vector=unravel(result.vector))
  # Screen: the first steps with a small basis; restarted Lanczos with the
  # full one from their Ritz vector only when they have not converged. Both
  # on pytrees: ravelling vectors at every product costs more than a product
  # on CPU (the flat basis above compiles faster, for the plain run).
  leaves, treedef = jax.tree.flatten(init)
  v0 = _tree_unit(leaves, leaves)
  cycle = lambda start, rows, budget: _tree_cycle(
      matvec, start, treedef, rows=rows, m=m, budget=budget, tol=tol, which=which)
  vector, restart, theta, residual, j, done = cycle(v0, screen_dim + 1, num_iters)
  zero = jnp.zeros((), theta.dtype)

  def refine():
    def body(state):
      start, _, _, _, it, _ = state
      vector, restart, theta, residual, steps, done = cycle(start, m + 1, num_iters - it)
      return restart, vector, theta, residual, it + steps, done

    state = (restart, vector, zero, zero, j, jnp.zeros((), bool))
    _, vector_r, theta_r, residual_r, it, converged = lax.while_loop(
        lambda st: jnp.logical_and(~st[5], st[4] < num_iters), body, state)
    return vector_r, theta_r, residual_r, it, converged

  vector, theta, residual, j, done = lax.cond(
      done | (j >= num_iters), lambda: (vector, theta, residual, j, done), refine)
  return EigResult(value=theta, vector=jax.tree.unflatten(treedef, vector), iterations=j,
                   converged=done, residual=residual)


def _flat_lanczos(matvec, init, *, num_iters, tol, krylov_dim, which) -> EigResult:
  m = max(1, min(krylov_dim or min(num_iters, DEFAULT_KRYLOV_DIM), init.shape[0]))
  v0 = _normalize(init, init)
  zero = jnp.zeros((), v0.dtype)

  def cond_fun(state):
    _, _, _, _, it, converged = state
    return jnp.logical_and(~converged, it < num_iters)

  def body_fun(state):
    start, _, _, _, it, _ = state
    vector, restart, theta, residual, steps, done = _lanczos_cycle(
        matvec, start, m=m, budget=num_iters - it, tol=tol, which=which)
    return restart, vector, theta, residual, it + steps, done

  init_state = (v0, v0, zero, zero, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  _, vector, theta, residual, it, converged = lax.while_loop(cond_fun, body_fun, init_state)
  return EigResult(value=theta, vector=vector, iterations=it, converged=converged,
                   residual=residual)
