"""The lecture's radius ``B = σ_min / 2γ`` of provably lazy training.

The lecture's proof strategy (section 2, after Chizat et al. 2019) studies
gradient flow while ``‖θ − θ0‖ ≤ B`` with

* ``σ_min = σ_min(J_X(θ0))``, the smallest singular value of the stacked
  ``(n·k) × P`` Jacobian of the probe outputs at ``θ0``, i.e.
  ``sqrt(λ_min(K0))`` of the full ``(n·k) × (n·k)`` NTK (0 when
  ``n·k > P``: the kernel is then singular);
* ``γ = ‖∇²f(θ0)‖``, the Hessian operator norm (:func:`ntk_diag.hessian_norm`).

Inside that ball the Jacobian's smallest singular value stays above
``σ_min / 2`` (``‖J(θ) − J(θ0)‖ ≤ γ‖θ − θ0‖ ≤ σ_min / 2``), so the loss
decays exponentially and the network stays close to its linearization: while
``lazy_radius_ratio = ‖θ − θ0‖ / B < 1`` the run is provably lazy. Past 1 the
guarantee lapses; it is a sufficient condition, and a run may stay close to
its twin well beyond it (watch ``twin_gap`` and ``kernel_drift`` then).

The functions ending in ``_core`` and the two formulas are traceable and do
no validation (the hook calls them inside its jitted snapshot).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntk_diag import _layout
from ntk_diag import _tree
from ntk_diag import norms
from ntk_diag import ntk

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyRadius:
  """The lecture's radius at ``θ0`` and its two ingredients.

  Attributes:
    radius: ``B = σ_min / (2γ)`` (float scalar); the dtype's largest finite
      value when ``γ = 0`` (a linear model), 0 when ``σ_min = 0``.
    sigma_min: ``σ_min(J_X(θ0)) = sqrt(λ_min(K0))``.
    hessian_norm: the :class:`~ntk_diag.NormEstimate` of ``γ = ‖∇²f(θ0)‖``.
  """
  radius: jax.Array
  sigma_min: jax.Array
  hessian_norm: norms.NormEstimate


def lazy_radius(apply_fn: Callable, params0: PyTree, x: PyTree, *, num_iters: int = 100,
                tol: float = 1e-4, method: str = "power",
                key: jax.Array | None = None) -> LazyRadius:
  """The lecture's radius ``B = σ_min(J_X(θ0)) / (2‖∇²f(θ0)‖)`` on a probe set.

  ``σ_min`` is the square root of the smallest eigenvalue of the full
  ``(n·k) × (n·k)`` empirical NTK at ``θ0`` (so this forms that kernel:
  keep ``n·k`` to a few thousand); ``‖∇²f(θ0)‖`` is :func:`ntk_diag.hessian_norm`
  on the same points. Compare ``‖θ − θ0‖`` with ``radius``
  (:func:`lazy_radius_ratio`): below 1 the training is provably lazy.

  .. note::
    The kernel is float32: eigenvalues below about ``n·k·eps·λ_max`` are
    rounding noise, so a ``σ_min`` below ``sqrt(n·k·eps·λ_max)`` means
    "numerically 0" (``eps ≈ 1.2e-7``).

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``.
    params0: ``θ0``.
    x: the probe inputs ``X``.
    num_iters, tol, method, key: options of :func:`ntk_diag.hessian_norm`.

  Returns:
    A :class:`LazyRadius`.
  """
  options = norms.check_arguments(apply_fn, params0, x, key, num_iters=num_iters, tol=tol,
                                  method=method, return_vector=False, batch_size=None)
  return _lazy_radius_jit(apply_fn, params0, x, options, key=key)


def jacobian_sigma_min_core(apply_fn: Callable, params: PyTree, x: PyTree, *,
                            ntk_method: str = "auto",
                            batch_size: int | None = None) -> jax.Array:
  """``σ_min`` of the stacked Jacobian, ``sqrt(max(λ_min(K), 0))`` of the full
  NTK on ``x`` as an ``(n·k) × (n·k)`` matrix; traceable."""
  kernel = ntk.empirical_ntk(apply_fn, params, x, method=ntk_method, batch_size=batch_size)
  eig_min = jnp.linalg.eigvalsh(_layout.kernel_to_matrix(kernel))[0]
  return jnp.sqrt(jnp.maximum(eig_min, 0.0))


def radius_from_norms(sigma_min: jax.Array, hessian_norm: jax.Array) -> jax.Array:
  """``B = σ_min / (2γ)``: 0 when ``σ_min = 0``, the dtype's largest finite
  value when only ``γ = 0``, NaN when either is NaN."""
  return norms.saturating_div(sigma_min, 2.0 * hessian_norm)


def lazy_radius_ratio(params: PyTree, params0: PyTree, radius: jax.Array) -> jax.Array:
  """``‖θ − θ0‖ / B``: 0 at ``θ0``, the dtype's largest finite value when
  ``B = 0`` and ``θ ≠ θ0`` (always finite for finite inputs)."""
  return norms.saturating_div(_tree.tree_norm(_tree.tree_sub(params, params0)), radius)


def lazy_radius_core(apply_fn: Callable, params0: PyTree, x: PyTree,
                     options: norms.SolverOptions = norms.SolverOptions(), *,
                     key: jax.Array | None = None, ntk_method: str = "auto",
                     batch_size: int | None = None) -> LazyRadius:
  """:func:`lazy_radius` without validation; traceable (``jit``-able). ``options``
  are the Hessian norm's; ``ntk_method`` and ``batch_size`` the NTK's."""
  sigma_min = jacobian_sigma_min_core(apply_fn, params0, x, ntk_method=ntk_method,
                                      batch_size=batch_size)
  hess = norms.hessian_norm_core(apply_fn, params0, x, options, key=key)
  return LazyRadius(radius=radius_from_norms(sigma_min, hess.value), sigma_min=sigma_min,
                    hessian_norm=hess)


_lazy_radius_jit = jax.jit(lazy_radius_core, static_argnames=(
    "apply_fn", "options", "ntk_method", "batch_size"))
