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
``‖A v − θ v‖ ≤ tol · |θ|``; :func:`top_eigenpair_core` is it without
validation, for the package's solvers that validated their options. The
Lanczos cycles live in :mod:`ntk_diag._lanczos`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from ntk_diag import _lanczos
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag._lanczos import DEFAULT_KRYLOV_DIM  # noqa: F401 (re-exported)
from ntk_diag._lanczos import EigResult

PyTree = Any
Operator = Callable[[PyTree], PyTree]

METHODS = ("power", "lanczos")
WHICH = ("largest", "magnitude")


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
  return lambda v: jnp.dot(matrix, v, precision=lax.Precision.HIGHEST)


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
  return top_eigenpair_core(as_operator(operator), init, method=method, which=which,
                            num_iters=num_iters, tol=tol, krylov_dim=krylov_dim)


def top_eigenpair_core(matvec, init, *, method, which, num_iters, tol, krylov_dim=None,
                       screen_dim=None, basis=None) -> EigResult:
  """:func:`top_eigenpair` without validation (for callers that validated);
  ``screen_dim``, ``basis``: see :func:`ntk_diag._lanczos.lanczos_core` (Lanczos only)."""
  if method == "lanczos":
    result = _lanczos.lanczos_core(matvec, init, num_iters=num_iters, tol=tol,
                                   krylov_dim=krylov_dim, which=which, screen_dim=screen_dim,
                                   basis=basis)
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
  return _lanczos.lanczos_core(as_operator(operator), init, num_iters=num_iters, tol=tol,
                               krylov_dim=krylov_dim, which=which)

