"""Operator norms of the network's derivatives and the lazy-training ratio.

With ``J_x`` the ``k × P`` Jacobian of the outputs at one example and
``H_{x,a} = ∇²_θ f_a(x)`` the ``P × P`` Hessian of output ``a``:

* :func:`jacobian_norm`: ``max_i ‖J_{x_i}‖₂`` over the probe set, or with
  ``stacked=True`` the largest singular value of the stacked ``(n·k) × P``
  Jacobian (``= sqrt(λ_max)`` of the ``(n·k) × (n·k)`` NTK);
* :func:`hessian_norm`: ``max_i max_a ‖H_{x_i,a}‖₂`` (largest ``|eigenvalue|``);
* :func:`lazy_ratio`: ``κ = ‖∇²f‖ / ‖∇f‖² · ‖f(X) − y‖₂`` (eq. 3 of the NTK lecture notes, Chizat et al. 2019); the
  network trains lazily (stays close to its linearisation) when ``κ ≪ 1``.

Everything is matrix-free: Jacobian-vector and vector-Jacobian products for
``J``, forward-over-reverse Hessian-vector products for ``H``, fed to the
eigensolvers of :mod:`ntk_diag.spectral`. No ``P × P`` or ``(n·k) × P`` array
is formed. The one exception is small ``k <= GRAM_MAX_OUTPUTS``, where the
per-example norm is computed exactly from the ``k × k`` Gram matrix
``J_x J_xᵀ`` (one ``k × P`` per-example Jacobian at a time).

The public functions validate their arguments in Python, gather the solver
keywords into one :class:`SolverOptions` and call jitted cores. The cores
(:func:`jacobian_norm_core`, :func:`hessian_norm_core`,
:func:`lazy_ratio_core`) take that options object, do no validation and are
traceable, so a training loop can call them inside its own ``jax.jit``
(``options`` static). With ``return_vector=True``, feed the previous result
back as ``init`` to warm-start the solvers (start vectors, batching and the
Hessian's eigenproblems: :mod:`ntk_diag.eigenproblems`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _validation
from ntk_diag import eigenproblems
from ntk_diag import losses
from ntk_diag import ntk
from ntk_diag import spectral
from ntk_diag.eigenproblems import SolverOptions
from ntk_diag.eigenproblems import nonneg_sqrt as _sqrt

PyTree = Any

METHODS = spectral.METHODS
# Per-example Jacobian norms use the exact k × k Gram matrix up to this many outputs.
GRAM_MAX_OUTPUTS = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormEstimate:
  """An operator-norm estimate over a probe set of ``n`` examples.

  Attributes:
    value: the norm, a float scalar array (``float(est.value)`` works).
    per_example: ``(n,)`` per-example norms (for ``hessian_norm`` the max over
      outputs); ``None`` for ``jacobian_norm(..., stacked=True)``.
    iterations: largest number of solver iterations over the eigenproblems
      (int32 scalar); 0 where the exact Gram matrix was used; with a
      screened :func:`hessian_norm_core`, over the refined problems.
    converged: whether every eigenproblem (with screening: every refined
      one) reached ``tol`` (bool scalar).
    vector: top eigenvectors for warm starts, or ``None`` (see
      ``return_vector``): a params-like pytree whose leaves have shape
      ``leaf.shape`` (stacked Jacobian), ``(n, *leaf.shape)`` (per-example
      Jacobian) or ``(n, k, *leaf.shape)`` (Hessian, one per example and output).
    per_problem: ``(n, k)`` estimates of every (example, output) Hessian norm
      (``hessian_norm`` only; ``None`` otherwise); see ``init_values`` of
      :func:`hessian_norm_core`.
  """
  value: jax.Array
  per_example: jax.Array | None
  iterations: jax.Array
  converged: jax.Array
  vector: PyTree = None
  per_problem: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyReport:
  """Result of :func:`lazy_ratio`.

  Attributes:
    kappa: ``hessian_norm.value / jacobian_norm.value² · residual_norm``
      (float scalar array). It is 0 when the numerator is 0 and saturates at
      the dtype's largest finite value when the Jacobian norm is 0.
    jacobian_norm: the :class:`NormEstimate` of :func:`jacobian_norm`.
    hessian_norm: the :class:`NormEstimate` of :func:`hessian_norm`.
    residual_norm: ``‖∇_f L(f(params, x), y)‖₂`` of the summed loss over all
      ``n·k`` entries (``‖f(params, x) − y‖₂`` for mse).
  """
  kappa: jax.Array
  jacobian_norm: NormEstimate
  hessian_norm: NormEstimate
  residual_norm: jax.Array


# ----------------------------------------------------------------------------
# Public API: validation, then the jitted cores.
# ----------------------------------------------------------------------------


def jacobian_norm(apply_fn: Callable, params: PyTree, x: PyTree, *, stacked: bool = False,
                  num_iters: int = 100, tol: float = 1e-4, method: str = "power",
                  key: jax.Array | None = None, init: PyTree | None = None,
                  return_vector: bool = False,
                  batch_size: int | None = None) -> NormEstimate:
  """Spectral norm of the Jacobian of ``apply_fn`` w.r.t. ``params``.

  Default: ``value = max_i ‖J_{x_i}‖₂`` with ``per_example[i] = ‖J_{x_i}‖₂``
  (the square root of the largest eigenvalue of ``J_{x_i}ᵀ J_{x_i}``).
  For ``k <= GRAM_MAX_OUTPUTS`` outputs this is computed exactly from the
  ``k × k`` Gram matrix (``method``, ``num_iters``, ``tol`` unused); otherwise
  by an eigensolver on ``v ↦ J_xᵀ (J_x v)`` per example, vmapped.
  ``stacked=True``: ``value = σ_max`` of the stacked ``(n·k) × P`` Jacobian,
  by an eigensolver on ``v ↦ Jᵀ (J v)`` (one JVP and one VJP over the batch
  per iteration); ``per_example`` is ``None``.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; ``k = prod(out)``.
    params: pytree of trainable parameters.
    x: batch of ``n`` probe inputs (array or pytree with a leading batch axis).
    stacked: norm of the stacked Jacobian instead of the per-example maximum.
    num_iters: maximum iterations (power) or matvecs (Lanczos) per eigenproblem.
    tol: relative residual ``‖A v − θ v‖ / θ`` at which a solver stops.
    method: ``"power"`` or ``"lanczos"`` (see :mod:`ntk_diag.spectral`).
    key: PRNG key of the random start vector; default ``PRNGKey(0)``.
    init: start vector(s) instead of a random one: a params-like pytree (used
      for every eigenproblem) or a previous ``NormEstimate.vector``.
    return_vector: fill ``NormEstimate.vector`` (costs its memory).
    batch_size: eigenproblems (examples) solved simultaneously; ``None``
      picks the largest number whose vectors fit the default memory budget.

  Returns:
    A :class:`NormEstimate`.

  .. note::
    Power iteration converges at the rate ``(λ₂/λ₁)^k`` and may end with
    ``converged=False`` on clustered spectra; its estimate is a lower bound.
  """
  options = check_arguments(apply_fn, params, x, key, num_iters=num_iters, tol=tol,
                            method=method, return_vector=return_vector, batch_size=batch_size,
                            stacked=stacked)
  return _jacobian_norm_jit(apply_fn, params, x, options=options, key=key, init=init)


def hessian_norm(apply_fn: Callable, params: PyTree, x: PyTree, *, num_iters: int = 100,
                 tol: float = 1e-4, method: str = "power", key: jax.Array | None = None,
                 init: PyTree | None = None, return_vector: bool = False,
                 batch_size: int | None = None) -> NormEstimate:
  """Largest ``|eigenvalue|`` of the per-example, per-output parameter Hessians.

  ``value = max_i max_a ‖∇²_θ f_a(x_i)‖₂`` and ``per_example[i] =
  max_a ‖∇²_θ f_a(x_i)‖₂``. The ``n·k`` eigenproblems are solved in parallel
  (vmapped, in chunks of ``batch_size``) from Hessian-vector products
  (forward-over-reverse, ``jax.linearize`` of ``jax.grad``). The Hessians are
  indefinite, often with ``±λ`` pairs of equal size, on which plain power
  iteration oscillates: ``method="power"`` therefore iterates on ``H²`` (two
  Hessian-vector products per iteration) and reports ``sqrt(λ_max(H²))``;
  ``method="lanczos"`` runs on ``H`` and reports the Ritz value of largest
  magnitude.

  Args:
    apply_fn, params, x, num_iters, tol, method, key, return_vector: as in
      :func:`jacobian_norm`.
    init: a params-like pytree or a previous ``NormEstimate.vector`` (leaves
      ``(n, k, *leaf.shape)``).
    batch_size: (example, output) eigenproblems solved simultaneously; ``None``
      picks the largest number whose vectors fit the default memory budget.

  Returns:
    A :class:`NormEstimate`.
  """
  options = check_arguments(apply_fn, params, x, key, num_iters=num_iters, tol=tol,
                            method=method, return_vector=return_vector, batch_size=batch_size)
  return _hessian_norm_jit(apply_fn, params, x, options=options, key=key, init=init)


def lazy_ratio(apply_fn: Callable, params: PyTree, x: PyTree, y: jax.Array, *,
               loss: losses.LossLike = "mse", stacked: bool = False, num_iters: int = 100,
               tol: float = 1e-4, method: str = "power", key: jax.Array | None = None,
               init: LazyReport | None = None, return_vector: bool = False,
               batch_size: int | None = None) -> LazyReport:
  """The lazy-training ratio ``κ`` of Chizat et al. (2019) on a probe set.

  ``κ = ‖∇²f‖ / ‖∇f‖² · ‖∇_f L(f(params, x), y)‖₂`` with ``‖∇f‖`` from
  :func:`jacobian_norm` (``stacked`` applies to it only), ``‖∇²f‖`` from
  :func:`hessian_norm`, and the residual the output gradient of the SUMMED
  loss over all ``n·k`` entries: ``f − y`` for ``"mse"`` (the lecture's
  ``‖f − y‖``), ``softmax(f) − y`` for ``"softmax_cross_entropy"``.

  Args:
    apply_fn, params, x: as in :func:`jacobian_norm`.
    y: targets: shaped like the outputs ``(n, *out)`` (``(n,)`` and ``(n, 1)``
      interchangeable for one output); integer labels ``(n,)`` for
      cross-entropy; anything with ``n`` rows for a callable loss.
    loss: ``"mse"``, ``"softmax_cross_entropy"`` or a callable
      ``loss(outputs, y) -> (n,)`` (see :mod:`ntk_diag.losses`).
    stacked, num_iters, tol, method, return_vector, batch_size: passed to
      both norms (``stacked`` to the Jacobian norm only).
    key: PRNG key, split between the two norms; default ``PRNGKey(0)``.
    init: a previous :class:`LazyReport` computed with ``return_vector=True``;
      its vectors warm-start both norms.

  Returns:
    A :class:`LazyReport`; its ``jacobian_norm`` and ``hessian_norm`` are
    :class:`NormEstimate` objects, ``kappa`` and ``residual_norm`` scalars.
  """
  options = check_arguments(apply_fn, params, x, key, num_iters=num_iters, tol=tol,
                            method=method, return_vector=return_vector, batch_size=batch_size,
                            stacked=stacked)
  losses.check_loss("loss", loss)
  n = _validation.leading_size("x", x)
  out_shape = _model.example_output_shape(apply_fn, params, x)
  if not callable(loss):
    _validation.check_float_array("y", y)
  losses.check_targets("y", y, loss, (n,) + out_shape)
  if init is not None and not isinstance(init, LazyReport):
    raise TypeError(
        f"`init` must be a LazyReport from a previous lazy_ratio call; got {type(init).__name__}.")
  y = losses.prepare_targets(loss, y, (n,) + out_shape)
  return _lazy_ratio_jit(apply_fn, params, x, y, options=options, key=key, init=init, loss=loss)


def check_arguments(apply_fn: Callable, params: PyTree, x: PyTree, key: Any,
                  **solver_keywords) -> SolverOptions:
  """Checks a public call's arguments (before tracing); its :class:`SolverOptions`."""
  _validation.check_callable("apply_fn", apply_fn)
  options = eigenproblems.checked_options(**solver_keywords)
  if key is not None and not hasattr(key, "shape"):
    raise TypeError(f"`key` must be a PRNG key array or None; got {type(key).__name__}.")
  _validation.leading_size("x", x)
  _model.example_output_shape(apply_fn, params, x)
  return options


# ----------------------------------------------------------------------------
# Traceable cores (no validation).
# ----------------------------------------------------------------------------


def jacobian_norm_core(apply_fn: Callable, params: PyTree, x: PyTree,
                       options: SolverOptions = SolverOptions(), *,
                       key: jax.Array | None = None, init: PyTree | None = None) -> NormEstimate:
  """:func:`jacobian_norm` without argument checks; traceable (``jit``-able).

  ``options`` holds the solver keywords (``stacked`` included); ``key`` and
  ``init`` are as in :func:`jacobian_norm`.
  """
  key = _default_key(key)
  n = _num_examples(x)
  k = _model.num_outputs(_model.example_output_shape(apply_fn, params, x))
  solver = functools.partial(spectral.top_eigenpair_core, method=options.method,
                             which="largest", num_iters=options.num_iters, tol=options.tol)
  if options.stacked:
    f_batch = _model.batched(apply_fn)
    start, _ = eigenproblems.problem_inits(init, params, (), key)
    result = solver(_gram_operator(lambda p: f_batch(p, x), params), start)
    return NormEstimate(value=_sqrt(result.value), per_example=None,
                        iterations=result.iterations, converged=result.converged,
                        vector=result.vector if options.return_vector else None)

  f = _model.per_example(apply_fn)
  if k <= GRAM_MAX_OUTPUTS:
    per_bytes = 3 * k * _memory.vector_bytes(params)
    grams = eigenproblems.map_problems(lambda xi: ntk.example_gram(apply_fn, params, xi), x, n,
                                       _memory.problem_batch(options.batch_size, per_bytes, n))
    return jacobian_norm_from_grams(grams)

  shared, batched = eigenproblems.problem_inits(init, params, (n,), key)

  def iterative(args):
    xi, start = args
    result = solver(_gram_operator(lambda p: f(p, xi), params),
                    shared if start is None else start)
    return (_sqrt(result.value), result.iterations, result.converged,
            result.vector if options.return_vector else None)

  per_bytes = (_memory.solver_vectors(options.method, options.num_iters)
               * _memory.vector_bytes(params))
  values, its, conv, vectors = eigenproblems.map_problems(
      iterative, (x, batched), n,
      _memory.problem_batch(options.batch_size, per_bytes, n, solver=True))
  return NormEstimate(value=jnp.max(values), per_example=values, iterations=jnp.max(its),
                      converged=jnp.all(conv), vector=vectors)


def jacobian_norm_from_grams(grams: jax.Array) -> NormEstimate:
  """The per-example :func:`jacobian_norm` from the Gram blocks ``J_{x_i} J_{x_i}ᵀ``.

  ``per_example[i] = sqrt(λ_max(grams[i]))`` for ``grams`` of shape ``(n, k, k)``,
  e.g. the diagonal blocks of :func:`ntk_diag.ntk.empirical_ntk_and_diagonal`
  (so a caller that computes the NTK anyway gets these norms without
  recomputing the per-example derivatives).
  """
  values = _sqrt(jnp.linalg.eigvalsh(grams)[:, -1])
  return NormEstimate(value=jnp.max(values), per_example=values,
                      iterations=jnp.zeros((), jnp.int32), converged=jnp.ones((), bool),
                      vector=None)


def hessian_norm_core(apply_fn: Callable, params: PyTree, x: PyTree,
                      options: SolverOptions = SolverOptions(), *,
                      key: jax.Array | None = None, init: PyTree | None = None,
                      init_values: jax.Array | None = None) -> NormEstimate:
  """:func:`hessian_norm` without argument checks; traceable (``jit``-able).

  With ``method="power"`` on a model with Dense layers worth factoring
  (:mod:`ntk_diag.block_hessian`) the ``n·k`` eigenproblems are solved
  together, vmapped, with Hessian-vector products that keep those layers'
  blocks as low-rank factors (``batch_size`` then counts whole examples:
  ``batch_size // k`` of them, at least one, with all their outputs);
  otherwise one at a time on CPU (all together where the vectors fit
  elsewhere). Same iterates either way.

  ``options`` holds the solver keywords; ``key`` and ``init`` are as in
  :func:`hessian_norm`. By default the solver (``num_iters``, ``tol``) runs
  on every one of the ``n·k`` (example, output) eigenproblems. With
  ``options.screen_iters`` and the per-problem estimates ``init_values`` of
  a previous call (whose vectors are ``init``) it screens, then refines
  (:func:`ntk_diag.eigenproblems.screen_and_refine`); ``iterations`` and
  ``converged`` then describe the refined solves, and ``vector`` holds every
  problem's vector, so the next call warm-starts every problem. ``init_values = inf`` everywhere
  refines every problem; without ``init_values`` there is no screen.

  ``options.factored_vectors``: see
  :func:`ntk_diag.eigenproblems.factored_hessian_problems` (factored
  warm-start vectors, and a zero placeholder for the first call).
  """
  key = _default_key(key)
  n = _num_examples(x)
  k = _model.num_outputs(_model.example_output_shape(apply_fn, params, x))
  problems = eigenproblems.hessian_problems(apply_fn, params, x, n, k, options, key, init)
  if options.screen_iters is None or init_values is None:
    solved = problems.solve_all(options.num_iters, options.return_vector)
  else:
    solved = eigenproblems.screen_and_refine(problems, init_values,
                                             screen_iters=options.screen_iters,
                                             num_iters=options.num_iters)
  values = solved.values.reshape(n, k)
  return NormEstimate(value=jnp.max(values), per_example=jnp.max(values, axis=1),
                      iterations=jnp.max(solved.iterations),
                      converged=jnp.all(solved.converged),
                      vector=problems.output(solved) if options.return_vector else None,
                      per_problem=values)


def lazy_ratio_core(apply_fn: Callable, params: PyTree, x: PyTree, y: jax.Array,
                    options: SolverOptions = SolverOptions(), *,
                    key: jax.Array | None = None, init: LazyReport | None = None,
                    loss: losses.LossLike = "mse") -> LazyReport:
  """:func:`lazy_ratio` without argument checks; traceable (``jit``-able).

  ``options`` goes to both norms (``stacked`` to the Jacobian norm only);
  ``y`` is prepared for ``loss`` (:func:`ntk_diag.losses.prepare_targets`);
  ``init`` is a previous :class:`LazyReport` (or ``None``).
  """
  key_j, key_h = jax.random.split(_default_key(key))
  jac = jacobian_norm_core(apply_fn, params, x, options, key=key_j,
                           init=None if init is None else init.jacobian_norm.vector)
  hess = hessian_norm_core(apply_fn, params, x, options, key=key_h,
                           init=None if init is None else init.hessian_norm.vector)
  outputs = apply_fn(params, x)
  if not callable(loss):
    y = y.reshape(outputs.shape)
  residual_norm = losses.residual_norm(loss, outputs, y)
  return LazyReport(kappa=kappa(hess.value, jac.value, residual_norm), jacobian_norm=jac,
                    hessian_norm=hess, residual_norm=residual_norm)


def kappa(hessian_norm: jax.Array, jacobian_norm: jax.Array,
          residual_norm: jax.Array) -> jax.Array:
  """The lazy-training ratio of Chizat et al. (2019): ``κ = ‖∇²f‖ / ‖∇f‖² · ‖∇_f L‖``.

  0 when the numerator is 0; the dtype's largest finite value when only the
  Jacobian norm is 0; NaN when any input is NaN (a diverged run stays visible).
  """
  return saturating_div(hessian_norm * residual_norm, jacobian_norm ** 2)


def saturating_div(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator`` for non-negative values, finite by construction.

  0 when the numerator is 0; the dtype's largest finite value when only the
  denominator is 0 (or the ratio overflows); NaN when either input is NaN.
  """
  numerator = jnp.asarray(numerator)
  big = jnp.finfo(jnp.result_type(numerator)).max
  ratio = jnp.minimum(numerator / jnp.where(denominator > 0, denominator, 1.0), big)
  value = jnp.where(numerator == 0, 0.0, jnp.where(denominator > 0, ratio, big))
  return jnp.where(jnp.isnan(numerator) | jnp.isnan(denominator), jnp.nan, value)


_jacobian_norm_jit = jax.jit(jacobian_norm_core, static_argnames=("apply_fn", "options"))
_hessian_norm_jit = jax.jit(hessian_norm_core, static_argnames=("apply_fn", "options"))
_lazy_ratio_jit = jax.jit(lazy_ratio_core, static_argnames=("apply_fn", "options", "loss"))


# ----------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------


def _gram_operator(fn: Callable[[PyTree], jax.Array], params: PyTree) -> Callable:
  """``v ↦ J_fnᵀ (J_fn v)`` at ``params``: one JVP and its transpose."""
  _, jvp_fn = jax.linearize(fn, params)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  return lambda v: vjp_fn(jvp_fn(v))[0]


def _default_key(key: jax.Array | None) -> jax.Array:
  return jax.random.PRNGKey(0) if key is None else key


def _num_examples(x: PyTree) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])
