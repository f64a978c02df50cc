"""Extreme eigenvalues of symmetric linear operators on pytrees.

An operator is a callable ``matvec(v) -> A v`` mapping a pytree to a pytree of
the same structure (e.g. a Jacobian-Gram or Hessian-vector product on Flax
params), or a dense square array. The operator always sees the pytree layout;
power iteration combines vectors with :mod:`ntk_diag._tree`, Lanczos stores
its Krylov basis as one ``(m + 1, P)`` array (ravelled at the operator boundary).

Two solvers, both driven by ``lax.while_loop`` (they compile as one loop and
may be ``jit``-ed, ``vmap``-ed or nested in other transformations):

* :func:`power_iteration` — one matvec and ``O(P)`` memory per iteration;
  converges at the rate ``(λ₂/λ₁)^k`` of the two largest eigenvalues.
* :func:`lanczos` — Lanczos with full reorthogonalisation and explicit
  restarts from the wanted Ritz vector; holds a Krylov basis of
  ``krylov_dim + 1`` vectors. Much faster on clustered spectra and finds both
  ends of an indefinite spectrum at once.

:func:`top_eigenpair` dispatches between them and handles ``which``:
``"largest"`` (the largest eigenvalue, e.g. of a PSD Gram operator) or
``"magnitude"`` (the largest ``|λ|`` of an indefinite operator such as a
Hessian). Convergence is declared when the relative residual
``‖A v − θ v‖ ≤ tol · |θ|``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from ntk_diag import _tree
from ntk_diag import _validation

PyTree = Any
Operator = Callable[[PyTree], PyTree]

METHODS = ("power", "lanczos")
WHICH = ("largest", "magnitude")
# Krylov basis size of `lanczos` when `krylov_dim` is None (capped by `num_iters`).
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


def as_operator(operator: Any) -> Operator:
  """A matvec callable from a callable or a dense square array."""
  if callable(operator):
    return operator
  shape = getattr(operator, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] != shape[1]:
    raise TypeError(
        "`operator` must be a matvec callable on pytrees or a square 2-D array;"
        f" got {type(operator).__name__} with shape {shape}.")
  matrix = jnp.asarray(operator)
  return lambda v: jnp.dot(matrix, v, precision=_HIGHEST)


def check_options(*, num_iters: Any, tol: Any, method: str = "power",
                  which: str = "largest", krylov_dim: Any = None) -> None:
  """Validates solver options in Python (before tracing)."""
  _validation.check_positive_int("num_iters", num_iters)
  _validation.check_positive_number("tol", tol)
  _validation.check_one_of("method", method, METHODS)
  _validation.check_one_of("which", which, WHICH)
  _validation.check_positive_int("krylov_dim", krylov_dim, optional=True)


def top_eigenpair(operator: Any, init: PyTree, *, method: str = "power",
                  which: str = "largest", num_iters: int = 100, tol: float = 1e-4,
                  krylov_dim: int | None = None) -> EigResult:
  """Extreme eigenpair of a symmetric operator.

  Args:
    operator: ``matvec(v) -> A v`` on pytrees, or a dense ``(P, P)`` array;
      ``A`` must be symmetric.
    init: starting vector (any nonzero pytree of the operator's input
      structure), e.g. a random vector or a previous ``EigResult.vector``.
    method: ``"power"`` or ``"lanczos"``.
    which: ``"largest"`` returns ``λ_max(A)``; ``"magnitude"`` returns
      ``max |λ(A)| >= 0``. Power iteration then runs on ``A²`` (two matvecs per
      iteration) because on spectra with ``±λ`` pairs of equal size the plain
      iteration oscillates and its Rayleigh quotient does not converge.
    num_iters: maximum number of iterations (power) or matvecs (Lanczos).
    tol: relative residual at which to stop.
    krylov_dim: Lanczos basis size, default ``min(num_iters, DEFAULT_KRYLOV_DIM)``.

  Returns:
    An :class:`EigResult`.
  """
  check_options(num_iters=num_iters, tol=tol, method=method, which=which,
                krylov_dim=krylov_dim)
  return _top_eigenpair(as_operator(operator), init, method=method, which=which,
                        num_iters=num_iters, tol=tol, krylov_dim=krylov_dim)


def _top_eigenpair(matvec, init, *, method, which, num_iters, tol, krylov_dim=None,
                   screen_dim=None):
  """:func:`top_eigenpair` without validation (for callers that validated);
  ``screen_dim``: see :func:`_lanczos` (Lanczos only)."""
  if method == "lanczos":
    result = _lanczos(matvec, init, num_iters=num_iters, tol=tol,
                      krylov_dim=krylov_dim, which=which, screen_dim=screen_dim)
    if which == "magnitude":
      result = dataclasses.replace(result, value=jnp.abs(result.value))
    return result
  if which == "magnitude":
    result = _power_iteration(lambda v: matvec(matvec(v)), init,
                              num_iters=num_iters, tol=tol)
    return dataclasses.replace(result, value=jnp.sqrt(jnp.maximum(result.value, 0.0)))
  return _power_iteration(matvec, init, num_iters=num_iters, tol=tol)


# ----------------------------------------------------------------------------
# Power iteration.
# ----------------------------------------------------------------------------


def power_iteration(operator: Any, init: PyTree, *, num_iters: int = 100,
                    tol: float = 1e-4) -> EigResult:
  """Dominant eigenpair of a symmetric operator by power iteration.

  Iterates ``v ← A v / ‖A v‖`` and reports the Rayleigh quotient
  ``θ = ⟨v, A v⟩`` of the last iterate.

  .. note::
    Converges to the eigenvalue of largest magnitude when it is unique. When
    ``λ`` and ``−λ`` are both dominant the iterate oscillates between two
    directions and ``θ`` does not converge; use
    ``top_eigenpair(..., which="magnitude")``, which iterates on ``A²``.

  Args:
    operator: ``matvec(v) -> A v`` on pytrees, or a dense square array.
    init: nonzero starting vector.
    num_iters: maximum number of iterations (matvecs).
    tol: stop when ``‖A v − θ v‖ <= tol · |θ|``.

  Returns:
    An :class:`EigResult`; ``vector`` is the normalised last product ``A v``.
  """
  check_options(num_iters=num_iters, tol=tol)
  return _power_iteration(as_operator(operator), init, num_iters=num_iters, tol=tol)


def _power_init(init: PyTree) -> tuple:
  v, _ = _tree.tree_normalize(init)
  dtype = jnp.result_type(*jax.tree.leaves(v))
  zero = jnp.zeros((), dtype)
  # (v, theta, residual, iterations, converged)
  return v, zero, zero, jnp.zeros((), jnp.int32), jnp.zeros((), bool)


def _power_cond_fun(state: tuple, num_iters: int) -> jax.Array:
  _, _, _, it, converged = state
  return jnp.logical_and(~converged, it < num_iters)


def _power_body_fun(state: tuple, matvec: Operator, tol: float) -> tuple:
  v, _, _, it, _ = state
  w = matvec(v)
  theta = _tree.tree_vdot(v, w)
  residual = _tree.tree_norm(_tree.tree_axpy(-theta, v, w))
  converged = residual <= tol * jnp.abs(theta)
  w_unit, w_norm = _tree.tree_normalize(w)
  # A zero product (v in the null space) keeps v: theta = 0 is then exact.
  v_next = jax.tree.map(lambda a, b: jnp.where(w_norm > 0, a, b), w_unit, v)
  return v_next, theta, residual, it + 1, converged


def _power_iteration(matvec, init, *, num_iters, tol) -> EigResult:
  v, theta, residual, it, converged = lax.while_loop(
      lambda s: _power_cond_fun(s, num_iters),
      lambda s: _power_body_fun(s, matvec, tol),
      _power_init(init))
  return EigResult(value=theta, vector=v, iterations=it, converged=converged,
                   residual=residual)


# ----------------------------------------------------------------------------
# Lanczos with full reorthogonalisation and explicit restarts.
# ----------------------------------------------------------------------------


def lanczos(operator: Any, init: PyTree, *, num_iters: int = 100, tol: float = 1e-4,
            krylov_dim: int | None = None, which: str = "largest") -> EigResult:
  """Extreme eigenpair of a symmetric operator by restarted Lanczos.

  Builds an orthonormal Krylov basis ``V`` (fully reorthogonalised, twice per
  step) and the tridiagonal ``T = Vᵀ A V``; the Ritz value of ``T`` selected by
  ``which`` estimates the eigenvalue, with residual ``β_j |y_j|``. After
  ``krylov_dim`` steps the basis is discarded and the process restarts from
  the selected Ritz vector (for ``which="magnitude"``, from the sum of the
  Ritz vectors at both ends of the spectrum), until ``num_iters`` matvecs.

  Args:
    operator: ``matvec(v) -> A v`` on pytrees, or a dense square array.
    init: nonzero starting vector.
    num_iters: maximum number of matvecs over all restarts.
    tol: stop when the Ritz residual ``<= tol · |θ|``.
    krylov_dim: basis size; memory is ``krylov_dim + 1`` vectors. Default
      ``min(num_iters, DEFAULT_KRYLOV_DIM)``, capped at the dimension ``P``.
    which: ``"largest"`` (algebraically largest ``θ``) or ``"magnitude"``
      (largest ``|θ|``; the signed value is returned).

  Returns:
    An :class:`EigResult`.
  """
  check_options(num_iters=num_iters, tol=tol, which=which, krylov_dim=krylov_dim)
  return _lanczos(as_operator(operator), init, num_iters=num_iters, tol=tol,
                  krylov_dim=krylov_dim, which=which)


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


def _lanczos(matvec, init, *, num_iters, tol, krylov_dim=None, which="largest",
             screen_dim=None) -> EigResult:
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
