"""Sharpness: the top eigenvalue of the Hessian of the training loss.

``sharpness = λ_max(∇²_θ L̄(θ))`` with ``L̄ = (1/n) Σ_i ℓ(f(θ, x_i), y_i)`` the
MEAN loss over the probe set (:mod:`ntk_diag.losses`), the loss an optimiser
usually minimises. Gradient descent with step ``η`` on a quadratic is stable
iff ``η · sharpness < 2``. In the kernel regime the Hessian is nearly constant
and a stable step keeps ``η · sharpness < 2`` throughout; runs that reach 2
— a catapult (Lewkowycz et al. 2020) or the edge of stability (Cohen et al.
2021) — change their curvature, which the kernel regime cannot do.

The loss Hessian is indefinite away from a minimum, and its most negative
eigenvalue may be larger in magnitude than the top one, so power iteration
(which finds the eigenvalue of largest magnitude) is the wrong solver. We run
restarted Lanczos (:func:`ntk_diag.spectral.lanczos`) with ``which="largest"``,
which selects the algebraically largest Ritz value, on Hessian-vector
products (forward-over-reverse); the Hessian is never formed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import losses
from ntk_diag import spectral
from ntk_diag.norms import NormEstimate

PyTree = Any


def loss_sharpness(apply_fn: Callable, params: PyTree, x: PyTree, y: Any, *,
                   loss: losses.LossLike = "mse", num_iters: int = 100, tol: float = 1e-4,
                   key: jax.Array | None = None, init: PyTree | None = None,
                   krylov_dim: int | None = None,
                   return_vector: bool = False) -> NormEstimate:
  """Largest (algebraic) eigenvalue of the Hessian of the mean probe loss.

  ``value = λ_max(∇²_θ (1/n) Σ_i ℓ(f(θ, x_i), y_i))``, by restarted Lanczos
  on Hessian-vector products (each costs about two passes of forward and
  backward over the probe batch). Edge of stability: gradient descent with
  learning rate ``η`` on this loss is stable near ``θ`` when
  ``η · value < 2``.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``.
    params: pytree of trainable parameters.
    x: batch of ``n`` probe inputs.
    y: targets (see :mod:`ntk_diag.losses`; integer labels for cross-entropy).
    loss: ``"mse"`` (``½‖f − y‖²`` per example), ``"softmax_cross_entropy"``
      or a callable ``loss(outputs, y) -> (n,)``.
    num_iters: maximum number of Hessian-vector products.
    tol: stop when the Ritz residual ``‖H v − θ v‖ <= tol · |θ|``.
    key: PRNG key of the random start vector; default ``PRNGKey(0)``.
    init: a params-like start vector instead, e.g. a previous result's
      ``vector`` (warm start).
    krylov_dim: Lanczos basis size (memory: ``krylov_dim + 1``
      parameter-sized vectors); default ``min(num_iters, 32)``.
    return_vector: fill ``NormEstimate.vector`` with the top eigenvector.

  Returns:
    A :class:`~ntk_diag.NormEstimate` with ``value`` the sharpness (may be
    negative, e.g. at a maximum), ``per_example=None``.

  .. note::
    Like every Lanczos estimate, ``value`` is a Ritz value: a lower bound of
    ``λ_max`` that is exact at convergence (``converged``).
  """
  _validation.check_callable("apply_fn", apply_fn)
  spectral.check_options(num_iters=num_iters, tol=tol, method="lanczos",
                         krylov_dim=krylov_dim)
  losses.check_loss("loss", loss)
  if key is not None and not hasattr(key, "shape"):
    raise TypeError(f"`key` must be a PRNG key array or None; got {type(key).__name__}.")
  if not isinstance(return_vector, bool):
    raise TypeError(f"`return_vector` must be a bool; got {return_vector!r}.")
  n = _validation.leading_size("x", x)
  out_shape = _model.example_output_shape(apply_fn, params, x)
  losses.check_targets("y", y, loss, (n,) + out_shape)
  if init is not None and jax.tree.structure(init) != jax.tree.structure(params):
    raise ValueError(
        "`init` must have the pytree structure of `params` (e.g. a previous result's"
        f" vector); got {jax.tree.structure(init)} vs {jax.tree.structure(params)}.")
  y_prepared = losses.prepare_targets(loss, y, (n,) + out_shape)
  result = _loss_sharpness_jit(apply_fn, params, x, y_prepared, loss=loss, num_iters=num_iters,
                               tol=tol, key=key, init=init, krylov_dim=krylov_dim)
  return result if return_vector else NormEstimate(
      value=result.value, per_example=None, iterations=result.iterations,
      converged=result.converged)


def loss_sharpness_core(apply_fn: Callable, params: PyTree, x: PyTree, y: jax.Array, *,
                        loss: losses.LossLike = "mse", num_iters: int = 100, tol: float = 1e-4,
                        key: jax.Array | None = None, init: PyTree | None = None,
                        krylov_dim: int | None = None,
                        screen_iters: int | None = None) -> NormEstimate:
  """:func:`loss_sharpness` without validation; traceable (``jit``-able).

  ``y`` must already be in the loss's layout (:func:`ntk_diag.losses.prepare_targets`).
  ``init`` (a params-like pytree, e.g. the previous result's ``vector``)
  takes precedence over ``key``. The result's ``vector`` is always filled,
  for the next warm start.

  ``screen_iters = s``: a screen for warm starts. The first Lanczos cycle
  stops after ``s`` steps; only when its Ritz residual is above
  ``tol · |θ|`` does restarted Lanczos (basis ``krylov_dim``) continue from
  its Ritz vector, within the same ``num_iters`` budget. The stopping rule
  and the quantity are those of the plain run. From a start close to the top
  eigenvector (the previous snapshot's) the run ends within the screen.
  """
  estimate, _, _ = loss_sharpness_solve(apply_fn, params, x, y, loss=loss,
                                        num_iters=num_iters, tol=tol, key=key, init=init,
                                        krylov_dim=krylov_dim, screen_iters=screen_iters,
                                        basis=None)
  return estimate


def loss_sharpness_solve(apply_fn: Callable, params: PyTree, x: PyTree, y: jax.Array, *,
                         basis: PyTree | None, loss: losses.LossLike = "mse",
                         num_iters: int = 100, tol: float = 1e-4,
                         key: jax.Array | None = None, init: PyTree | None = None,
                         krylov_dim: int | None = None, screen_iters: int | None = None
                         ) -> tuple[NormEstimate, PyTree, jax.Array]:
  """:func:`loss_sharpness_core`, and what a caller of it every snapshot may keep.

  ``basis``: the Krylov basis storage, :func:`ntk_diag._lanczos.zero_basis`
  of ``(params, num_iters, krylov_dim)`` at first, then the previous call's
  (``None``: zeros made here). Returns ``(estimate, basis, outputs)``: the
  storage after the solve (donated to the next call, no basis is allocated
  per solve; see :mod:`ntk_diag._lanczos`) and ``apply_fn(params, x)``,
  which the linearisation computes anyway.
  """

  def mean_loss(p):
    outputs = apply_fn(p, x)
    return losses.mean(loss, outputs, y), outputs

  # Forward-over-reverse; the outputs come out of the primal pass.
  _, hvp, outputs = jax.linearize(jax.grad(mean_loss, has_aux=True), params, has_aux=True)
  if init is None:
    init = _tree.tree_random_normal_like(jax.random.PRNGKey(0) if key is None else key, params)
  else:
    init = jax.tree.map(lambda v, p: jnp.asarray(v, p.dtype), init, params)
  result = spectral.top_eigenpair_core(hvp, init, method="lanczos", which="largest",
                                       num_iters=num_iters, tol=tol, krylov_dim=krylov_dim,
                                       screen_dim=screen_iters, basis=basis)
  estimate = NormEstimate(value=result.value, per_example=None, iterations=result.iterations,
                          converged=result.converged, vector=result.vector)
  return estimate, result.basis, outputs


_loss_sharpness_jit = jax.jit(loss_sharpness_core,
                              static_argnames=("apply_fn", "loss", "num_iters", "tol", "krylov_dim",
                                               "screen_iters"))
