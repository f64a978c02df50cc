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

The public functions validate their arguments in Python and call jitted
cores. The cores (:func:`jacobian_norm_core`, :func:`hessian_norm_core`,
:func:`lazy_ratio_core`) do no validation and are traceable, so a training
loop can call them inside its own ``jax.jit``. Pass ``return_vector=True``
and feed the previous result back as ``init`` to warm-start the solvers.
"""

from __future__ import annotations

import dataclasses
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
from ntk_diag import block_hessian
from ntk_diag import losses
from ntk_diag import ntk
from ntk_diag import spectral

PyTree = Any

METHODS = spectral.METHODS
# Per-example Jacobian norms use the exact k × k Gram matrix up to this many outputs.
GRAM_MAX_OUTPUTS = 64
_STATIC = ("apply_fn", "loss", "stacked", "num_iters", "tol", "method", "return_vector", "batch_size")


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
  _check_common(apply_fn, params, x, num_iters=num_iters, tol=tol, method=method, key=key,
                return_vector=return_vector, batch_size=batch_size)
  _check_bool("stacked", stacked)
  return _jacobian_norm_jit(apply_fn, params, x, key=key, init=init, stacked=bool(stacked),
                            num_iters=num_iters, tol=tol, method=method,
                            return_vector=bool(return_vector), batch_size=batch_size)


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
  _check_common(apply_fn, params, x, num_iters=num_iters, tol=tol, method=method, key=key,
                return_vector=return_vector, batch_size=batch_size)
  return _hessian_norm_jit(apply_fn, params, x, key=key, init=init, num_iters=num_iters,
                           tol=tol, method=method, return_vector=bool(return_vector),
                           batch_size=batch_size)


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
  _check_common(apply_fn, params, x, num_iters=num_iters, tol=tol, method=method, key=key,
                return_vector=return_vector, batch_size=batch_size)
  _check_bool("stacked", stacked)
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
  return _lazy_ratio_jit(apply_fn, params, x, y, key=key, init=init, loss=loss,
                         stacked=bool(stacked), num_iters=num_iters, tol=tol, method=method,
                         return_vector=bool(return_vector), batch_size=batch_size)


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {value!r}.")


def _check_common(apply_fn, params, x, *, num_iters, tol, method, key, return_vector,
                  batch_size) -> None:
  _validation.check_callable("apply_fn", apply_fn)
  spectral.check_options(num_iters=num_iters, tol=tol, method=method)
  _validation.check_positive_int("batch_size", batch_size, optional=True)
  _check_bool("return_vector", return_vector)
  if key is not None and not hasattr(key, "shape"):
    raise TypeError(f"`key` must be a PRNG key array or None; got {type(key).__name__}.")
  _validation.leading_size("x", x)
  _model.example_output_shape(apply_fn, params, x)


# ----------------------------------------------------------------------------
# Traceable cores (no validation).
# ----------------------------------------------------------------------------


def jacobian_norm_core(apply_fn: Callable, params: PyTree, x: PyTree, *,
                       key: jax.Array | None = None, init: PyTree | None = None,
                       stacked: bool = False, num_iters: int = 100, tol: float = 1e-4,
                       method: str = "power", return_vector: bool = False,
                       batch_size: int | None = None) -> NormEstimate:
  """:func:`jacobian_norm` without argument checks; traceable (``jit``-able)."""
  key = _default_key(key)
  n = _num_examples(x)
  k = _model.num_outputs(_model.example_output_shape(apply_fn, params, x))
  solver = functools.partial(spectral._top_eigenpair, method=method, which="largest",
                             num_iters=num_iters, tol=tol)
  if stacked:
    f_batch = _model.batched(apply_fn)
    start = _start_vectors(init, params, (), key)
    result = solver(_gram_operator(lambda p: f_batch(p, x), params), start)
    return NormEstimate(value=_sqrt(result.value), per_example=None,
                        iterations=result.iterations, converged=result.converged,
                        vector=result.vector if return_vector else None)

  f = _model.per_example(apply_fn)
  if k <= GRAM_MAX_OUTPUTS:
    per_bytes = 3 * k * _vector_bytes(params)
    grams = _map_problems(lambda xi: ntk.example_gram(apply_fn, params, xi), x, n,
                          _batch(batch_size, per_bytes, n))
    return jacobian_norm_from_grams(grams)

  shared, batched = _problem_inits(init, params, (n,), key)

  def iterative(args):
    xi, start = args
    result = solver(_gram_operator(lambda p: f(p, xi), params),
                    shared if start is None else start)
    return (_sqrt(result.value), result.iterations, result.converged,
            result.vector if return_vector else None)

  per_bytes = _solver_vectors(method, num_iters) * _vector_bytes(params)
  values, its, conv, vectors = _map_problems(
      iterative, (x, batched), n, _batch(batch_size, per_bytes, n, solver=True))
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


def hessian_norm_core(apply_fn: Callable, params: PyTree, x: PyTree, *,
                      key: jax.Array | None = None, init: PyTree | None = None,
                      num_iters: int = 100, tol: float = 1e-4, method: str = "power",
                      return_vector: bool = False, batch_size: int | None = None,
                      screen_iters: int | None = None,
                      init_values: jax.Array | None = None,
                      factored_vectors: bool | None = None) -> NormEstimate:
  """:func:`hessian_norm` without argument checks; traceable (``jit``-able).

  With ``method="power"`` on a model with Dense layers worth factoring
  (:mod:`ntk_diag.block_hessian`) the ``n·k`` eigenproblems are solved
  together, vmapped, with Hessian-vector products that keep those layers'
  blocks as low-rank factors (``batch_size`` then counts whole examples:
  ``batch_size // k`` of them, at least one, with all their outputs);
  otherwise one at a time on CPU (all together where the vectors fit
  elsewhere). Same iterates either way.

  By default the solver (``num_iters``, ``tol``) runs on every one of the
  ``n·k`` (example, output) eigenproblems. With ``screen_iters=s`` and the
  per-problem estimates ``init_values = μ`` of a previous call (whose
  vectors are ``init``) it screens, then refines:

  1. screen: at most ``s`` iterations on every problem ``p`` from its start
     vector give ``σ_p <= ‖H_p‖₂`` (a Rayleigh quotient: a lower bound);
  2. refine: with ``b = argmax_p σ_p``, every problem with ``μ_p >= μ_b``
     (ranked at least as high as ``b`` last time, ``b`` included) gets the
     full solver from its screened vector, giving ``ρ_p``.

  Then ``per_problem[p] = max(σ_p, ρ_p)`` (``σ_p`` where not refined) and
  ``value = max_p per_problem[p]``, a lower bound like every estimate here.
  When the ranking is stable only ``b`` is refined, ``n·k·s + num_iters``
  iterations instead of ``n·k·num_iters``. The previous ranking matters
  because ``‖H_p‖₂`` changes continuously with the parameters but its
  eigenvector need not: where two top eigenvalues of ``H_p`` cross between
  calls, the warm vector follows the one that fell, ``σ_p`` drops far below
  ``‖H_p‖₂`` and only the refinement (more iterations) recovers it.
  ``iterations`` and ``converged`` describe the refined solves. The screened
  vectors are kept (``n·k`` parameter-sized vectors); ``vector`` holds them,
  refined where refined, so the next call warm-starts every problem.
  ``init_values = inf`` everywhere refines every problem; without
  ``init_values`` there is no screen (every problem is solved in full).

  ``factored_vectors=True`` (with ``return_vector``) returns ``vector`` as a
  :class:`ntk_diag.block_hessian.LowRankVectors` with batch axes ``(n, k)``
  where the factored solver runs (a few factors per Dense layer instead of
  ``n·k`` parameter-sized vectors); pass it back as ``init``. ``None`` (the
  default): factored when ``init`` is a ``LowRankVectors``. A
  ``LowRankVectors`` ``init`` that is zero everywhere means "no warm start
  yet": every problem starts from random factors (drawn from ``key``), so a
  placeholder (:func:`ntk_diag.block_hessian.zeros`) keeps the compiled
  structure of the first call and the later ones the same.
  """
  key = _default_key(key)
  n = _num_examples(x)
  k = _model.num_outputs(_model.example_output_shape(apply_fn, params, x))
  layout = block_hessian.layout_or_none(apply_fn, params, x) if method == "power" else None
  if factored_vectors is None:
    factored_vectors = isinstance(init, block_hessian.LowRankVectors)
  if layout is not None:
    return _hessian_norm_low_rank(
        layout, params, x, n, k, key=key, init=init, num_iters=num_iters, tol=tol,
        return_vector=return_vector, factored_vectors=factored_vectors, batch_size=batch_size,
        screen_iters=screen_iters, init_values=init_values)
  f = _model.per_example(apply_fn)
  shared, batched = _problem_inits(init, params, (n, k), key)
  if batched is not None:  # (n, k, ...) -> (n·k, ...)
    batched = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), batched)
  examples = jnp.repeat(jnp.arange(n), k)
  outputs = jnp.tile(jnp.arange(k), n)
  per_bytes = _solver_vectors(method, num_iters) * _vector_bytes(params)
  batch = _batch(batch_size, per_bytes, n * k, solver=True)

  def solve(i, a, start, iters):
    xi = _model.take(x, i)
    grad_fn = jax.grad(lambda p: f(p, xi)[a])
    _, hvp = jax.linearize(grad_fn, params)  # forward-over-reverse
    return spectral._top_eigenpair(hvp, shared if start is None else start, method=method,
                                   which="magnitude", num_iters=iters, tol=tol)

  def full(args):
    result = solve(*args, num_iters)
    return (result.value, result.iterations, result.converged,
            result.vector if return_vector else None)

  def screen(args):
    result = solve(*args, min(screen_iters, num_iters))
    return result.value, result.vector

  if screen_iters is None or init_values is None:
    values, its, conv, vectors = _map_problems(full, (examples, outputs, batched), n * k, batch)
  else:
    screened, vectors = _map_problems(screen, (examples, outputs, batched), n * k, batch)
    prior = jnp.reshape(init_values, (n * k,))
    best = jnp.argmax(screened)
    # `| (p == best)`: `best` is refined even where the prior holds NaN.
    chosen = (prior >= prior[best]) | (jnp.arange(n * k) == best)
    order = jnp.argsort(~chosen, stable=True)  # the chosen problems first

    def refine(j, state):  # one chosen problem, updated in place
      values, its, conv, vectors = state
      p = order[j]
      start = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, p, keepdims=False), vectors)
      result = solve(examples[p], outputs[p], start, num_iters)
      vectors = jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, p, 0),
                             vectors, result.vector)
      return (values.at[p].max(result.value), jnp.maximum(its, result.iterations),
              conv & result.converged, vectors)

    # A loop over the chosen problems only: a second map over all of them
    # costs a copy of every vector, as much as an iteration on CPU.
    values, its, conv, vectors = lax.fori_loop(
        0, jnp.sum(chosen), refine,
        (screened, jnp.zeros((), jnp.int32), jnp.ones((), bool), vectors))
    vectors = vectors if return_vector else None
  values = values.reshape(n, k)
  if vectors is not None:
    vectors = jax.tree.map(lambda a: a.reshape((n, k) + a.shape[1:]), vectors)
  return NormEstimate(value=jnp.max(values), per_example=jnp.max(values, axis=1),
                      iterations=jnp.max(its), converged=jnp.all(conv), vector=vectors,
                      per_problem=values)


def _hessian_norm_low_rank(layout, params, x, n, k, *, key, init, num_iters, tol,
                           return_vector, factored_vectors, batch_size, screen_iters,
                           init_values) -> NormEstimate:
  """:func:`hessian_norm_core` by :mod:`ntk_diag.block_hessian` (power iteration on ``H²``)."""
  shared = batched = None
  if isinstance(init, block_hessian.LowRankVectors):
    # A zero placeholder: no warm start yet, every problem starts from a random vector.
    cold = jnp.all(jnp.stack([jnp.all(a == 0) for a in jax.tree.leaves(init)]))
    batched = lax.cond(cold, lambda: _tree.tree_random_normal_like(key, init), lambda: init)
  elif init is None:
    shared = jax.tree.leaves(_tree.tree_random_normal_like(key, params))
  else:
    start, per_problem = _problem_inits(init, params, (n, k), key)
    shared = None if start is None else jax.tree.leaves(start)
    batched = None if per_problem is None else jax.tree.leaves(per_problem)

  def run(xs, starts, iters):
    """Every problem of a block of examples: vmapped over examples, then outputs."""
    def example(xi, starts_i):
      def problem(a, v0):
        return block_hessian.solve(layout, params, xi, a, shared if v0 is None else v0,
                                   num_iters=iters, tol=tol)
      return jax.vmap(problem)(jnp.arange(k), starts_i)
    return jax.vmap(example)(xs, starts)

  dense_starts = batched is not None and not isinstance(batched, block_hessian.LowRankVectors)
  per_example_bytes = k * (block_hessian.bytes_per_problem(layout, params)
                           + (_vector_bytes(params) if dense_starts else 0))
  if batch_size is not None:
    block = max(1, batch_size // k)
  else:
    block = _memory.default_budget_bytes() // max(per_example_bytes, 1)
  block = int(max(1, min(n, block)))

  def run_all(iters):
    if block >= n:
      return run(x, batched, iters)
    tiles = lax.map(lambda args: run(*args, iters),
                    (_model.pad_to_blocks(x, n, block), _model.pad_to_blocks(batched, n, block)))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:n], tiles)

  if screen_iters is None or init_values is None:
    theta, vectors, its, conv, zero = run_all(num_iters)
    values = _sqrt(theta).reshape(n * k)
  else:
    theta, vectors, _, _, zero = run_all(min(screen_iters, num_iters))
    screened = _sqrt(theta).reshape(n * k)
    prior = jnp.reshape(init_values, (n * k,))
    best = jnp.argmax(screened)
    # `| (p == best)`: `best` is refined even where the prior holds NaN.
    chosen = (prior >= prior[best]) | (jnp.arange(n * k) == best)
    order = jnp.argsort(~chosen, stable=True)  # the chosen problems first
    flat = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), vectors)

    def refine(j, state):  # one chosen problem, from its screened vector
      values, its, conv, flat = state
      p = order[j]
      start = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, p, keepdims=False), flat)
      theta_p, v, it, converged, _ = block_hessian.solve(
          layout, params, _model.take(x, p // k), p % k, start, num_iters=num_iters, tol=tol)
      flat = jax.tree.map(lambda a, b: lax.dynamic_update_index_in_dim(a, b, p, 0), flat, v)
      return (values.at[p].max(_sqrt(theta_p)), jnp.maximum(its, it), conv & converged, flat)

    values, its, conv, flat = lax.fori_loop(
        0, jnp.sum(chosen), refine,
        (screened, jnp.zeros((), jnp.int32), jnp.ones((), bool), flat))
    vectors = jax.tree.map(lambda a: a.reshape((n, k) + a.shape[1:]), flat)
  values = values.reshape(n, k)
  vector = None
  if return_vector:
    vector = vectors if factored_vectors else _dense_vectors(
        layout, params, vectors, zero, shared, None if not dense_starts else batched)
  return NormEstimate(value=jnp.max(values), per_example=jnp.max(values, axis=1),
                      iterations=jnp.max(its), converged=jnp.all(conv), vector=vector,
                      per_problem=values)


def _dense_vectors(layout, params, vectors, zero, shared, batched) -> PyTree:
  """``(n, k, *leaf)`` params-like vectors. Where ``H² v₀ = 0`` power iteration keeps
  its unit start ``v₀`` (``shared`` leaves, or ``batched`` ones of shape ``(n, k, *leaf)``)."""
  dense = jax.vmap(jax.vmap(lambda v: block_hessian.to_pytree(layout, params, v)))(vectors)
  start = shared if batched is None else batched
  if start is None:
    return dense
  lead = () if batched is None else zero.shape
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(a), axis=tuple(range(len(lead), a.ndim)))
                      for a in start))
  safe = jnp.where(norm > 0, norm, 1.0)
  unit = jax.tree.unflatten(jax.tree.structure(params), [
      a / safe.reshape(lead + (1,) * (a.ndim - len(lead))) for a in start])
  return jax.tree.map(
      lambda d, u: jnp.where(zero.reshape(zero.shape + (1,) * (d.ndim - 2)), u.astype(d.dtype), d),
      dense, unit)


def lazy_ratio_core(apply_fn: Callable, params: PyTree, x: PyTree, y: jax.Array, *,
                    key: jax.Array | None = None, init: LazyReport | None = None,
                    loss: losses.LossLike = "mse", stacked: bool = False,
                    num_iters: int = 100, tol: float = 1e-4, method: str = "power",
                    return_vector: bool = False, batch_size: int | None = None) -> LazyReport:
  """:func:`lazy_ratio` without argument checks; traceable (``jit``-able).

  ``y`` is prepared for ``loss`` (:func:`ntk_diag.losses.prepare_targets`);
  ``init`` is a previous :class:`LazyReport` (or ``None``).
  """
  key_j, key_h = jax.random.split(_default_key(key))
  options = dict(num_iters=num_iters, tol=tol, method=method, return_vector=return_vector,
                 batch_size=batch_size)
  jac = jacobian_norm_core(apply_fn, params, x, key=key_j, stacked=stacked,
                           init=None if init is None else init.jacobian_norm.vector, **options)
  hess = hessian_norm_core(apply_fn, params, x, key=key_h,
                           init=None if init is None else init.hessian_norm.vector, **options)
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


_jacobian_norm_jit = jax.jit(jacobian_norm_core, static_argnames=tuple(
    name for name in _STATIC if name != "loss"))
_hessian_norm_jit = jax.jit(hessian_norm_core, static_argnames=tuple(
    name for name in _STATIC if name not in ("stacked", "loss")))
_lazy_ratio_jit = jax.jit(lazy_ratio_core, static_argnames=_STATIC)


# ----------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------


def _gram_operator(fn: Callable[[PyTree], jax.Array], params: PyTree) -> Callable:
  """``v ↦ J_fnᵀ (J_fn v)`` at ``params``: one JVP and its transpose."""
  _, jvp_fn = jax.linearize(fn, params)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  return lambda v: vjp_fn(jvp_fn(v))[0]


def _sqrt(value: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(value, 0.0))


def _default_key(key: jax.Array | None) -> jax.Array:
  return jax.random.PRNGKey(0) if key is None else key


def _num_examples(x: PyTree) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])


def _vector_bytes(params: PyTree) -> int:
  return _tree.tree_size(params) * jnp.dtype(_model.param_dtype(params)).itemsize


def _solver_vectors(method: str, num_iters: int) -> int:
  """Parameter-sized vectors one eigenproblem holds (solver state + products)."""
  if method == "lanczos":
    return min(num_iters, spectral.DEFAULT_KRYLOV_DIM) + 6
  return 6


def _batch(batch_size: int | None, per_problem_bytes: int, count: int,
           solver: bool = False) -> int:
  """Eigenproblems solved simultaneously.

  ``batch_size`` if given; otherwise as many as fit the memory budget, except
  that iterative solvers run one problem at a time on CPU: there the
  single-example matvecs are memory-bound, and vectorising them (which also
  turns each solver's early exit into a masked step for all) is measured
  slower than running them in sequence.
  """
  if batch_size is not None:
    return min(batch_size, count)
  if solver and jax.default_backend() == "cpu":
    return 1
  budget = _memory.default_budget_bytes()
  return int(max(1, min(count, budget // max(per_problem_bytes, 1))))


def _map_problems(fn: Callable, xs: PyTree, count: int, batch: int) -> Any:
  """``fn`` over the leading axis of ``xs``: vmapped, ``batch`` problems at a time."""
  if batch >= count:
    return jax.vmap(fn)(xs)
  return lax.map(fn, xs, batch_size=None if batch == 1 else batch)


def _start_vectors(init: PyTree | None, params: PyTree, batch_shape: tuple[int, ...],
                   key: jax.Array) -> PyTree:
  """A random params-like vector, or ``init`` checked against params."""
  if init is None:
    return _tree.tree_random_normal_like(key, params)
  _check_init(init, params, batch_shape)
  return jax.tree.map(lambda v, p: jnp.asarray(v, p.dtype), init, params)


def _problem_inits(init: PyTree | None, params: PyTree, batch_shape: tuple[int, ...],
                   key: jax.Array) -> tuple[PyTree | None, PyTree | None]:
  """``(shared, batched)`` start vectors; exactly one is not ``None``.

  ``shared`` is one params-like vector used by every eigenproblem (random,
  or ``init`` with params' shapes); ``batched`` is ``init`` with leaves of
  shape ``batch_shape + leaf.shape``.
  """
  if init is None:
    return _tree.tree_random_normal_like(key, params), None
  kind = _check_init(init, params, batch_shape)
  init = jax.tree.map(lambda v, p: jnp.asarray(v, p.dtype), init, params)
  return (init, None) if kind == "shared" else (None, init)


def _check_init(init: PyTree, params: PyTree, batch_shape: tuple[int, ...]) -> str:
  """``"shared"`` or ``"batched"``; raises ``ValueError`` for anything else."""
  if jax.tree.structure(init) != jax.tree.structure(params):
    raise ValueError(
        "`init` must have the pytree structure of `params` (or of a previous"
        f" NormEstimate.vector); got {jax.tree.structure(init)} vs {jax.tree.structure(params)}.")
  shapes = [(tuple(np.shape(v)), tuple(np.shape(p)))
            for v, p in zip(jax.tree.leaves(init), jax.tree.leaves(params))]
  if all(v == p for v, p in shapes):
    return "shared"
  if batch_shape and all(v == tuple(batch_shape) + p for v, p in shapes):
    return "batched"
  raise ValueError(
      "`init` leaves must have the shapes of `params` or, with a leading"
      f" {tuple(batch_shape)} batch, those of a previous NormEstimate.vector;"
      f" got {[v for v, _ in shapes]} for params {[p for _, p in shapes]}.")
