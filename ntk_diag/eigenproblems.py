"""Many eigenproblems at once: the norm estimators' options, start vectors and batching.

:mod:`ntk_diag.norms` solves one symmetric eigenproblem per example (the
per-example Jacobian norm) or per (example, output) pair (the Hessian norm,
``p = i·k + a``). What those sets of problems share lives here:

* :class:`SolverOptions`, the estimators' static options (hashable: one
  ``jit`` static argument), built once from the public keywords
  (:func:`checked_options`);
* start vectors (:func:`problem_inits`): one random params-like vector
  shared by every problem, or a previous call's vectors, one per problem;
* :func:`map_problems`: a function over the problems, vmapped in batches
  (sized by :mod:`ntk_diag._memory`);
* :class:`Problems`: the ``n·k`` Hessian eigenproblems as functions that
  solve them all or one (:func:`hessian_problems`), on dense Hessian-vector
  products or on :mod:`ntk_diag.block_hessian`'s factored ones, and
  :func:`screen_and_refine`, which solves them all briefly and the few that
  matter in full.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import block_hessian
from ntk_diag import spectral

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """Static options of the norm estimators (hashable: a ``jit`` static argument).

  Attributes:
    num_iters: maximum iterations (power) or matvecs (Lanczos) per eigenproblem.
    tol: relative residual ``‖A v − θ v‖ / θ`` at which a solver stops.
    method: ``"power"`` or ``"lanczos"`` (see :mod:`ntk_diag.spectral`).
    return_vector: fill ``NormEstimate.vector`` (costs its memory).
    batch_size: eigenproblems solved simultaneously; ``None`` sizes the
      batches to the memory budget.
    stacked: Jacobian norm only: that of the stacked Jacobian instead of the
      per-example maximum.
    screen_iters: Hessian norm only: screen with this many iterations, then
      refine (see :func:`ntk_diag.norms.hessian_norm_core`); ``None``: no screen.
    factored_vectors: Hessian norm only: return factored vectors
      (:class:`~ntk_diag.block_hessian.LowRankVectors`) where the factored
      solver runs; ``None``: when ``init`` is factored.
  """
  num_iters: int = 100
  tol: float = 1e-4
  method: str = "power"
  return_vector: bool = False
  batch_size: int | None = None
  stacked: bool = False
  screen_iters: int | None = None
  factored_vectors: bool | None = None


def checked_options(*, num_iters: Any, tol: Any, method: Any, return_vector: Any,
                    batch_size: Any, stacked: Any = False) -> SolverOptions:
  """The :class:`SolverOptions` of a public call's keywords, checked in Python
  (``ValueError``/``TypeError`` naming the argument)."""
  spectral.check_options(num_iters=num_iters, tol=tol, method=method)
  _validation.check_positive_int("batch_size", batch_size, optional=True)
  check_bool("return_vector", return_vector)
  check_bool("stacked", stacked)
  return SolverOptions(num_iters=num_iters, tol=tol, method=method,
                       return_vector=bool(return_vector), batch_size=batch_size,
                       stacked=bool(stacked))


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool; got {value!r}.")


def nonneg_sqrt(value: jax.Array) -> jax.Array:
  """``sqrt(max(value, 0))``: a norm from an eigenvalue of ``AᵀA`` or ``H²``."""
  return jnp.sqrt(jnp.maximum(value, 0.0))


# ----------------------------------------------------------------------------
# Start vectors and batching.
# ----------------------------------------------------------------------------


def problem_inits(init: PyTree | None, params: PyTree, batch_shape: tuple[int, ...],
                  key: jax.Array) -> tuple[PyTree | None, PyTree | None]:
  """``(shared, batched)`` start vectors; exactly one is not ``None``.

  ``shared`` is one params-like vector used by every eigenproblem (random,
  or ``init`` with params' shapes); ``batched`` is ``init`` with leaves of
  shape ``batch_shape + leaf.shape``.
  """
  if init is None:
    return _tree.tree_random_normal_like(key, params), None
  kind = check_init(init, params, batch_shape)
  init = jax.tree.map(lambda v, p: jnp.asarray(v, p.dtype), init, params)
  return (init, None) if kind == "shared" else (None, init)


def check_init(init: PyTree, params: PyTree, batch_shape: tuple[int, ...]) -> str:
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


def map_problems(fn: Callable, xs: PyTree, count: int, batch: int) -> Any:
  """``fn`` over the leading axis of ``xs``: vmapped, ``batch`` problems at a time."""
  if batch >= count:
    return jax.vmap(fn)(xs)
  return lax.map(fn, xs, batch_size=None if batch == 1 else batch)


# ----------------------------------------------------------------------------
# The Hessian norm's eigenproblems.
# ----------------------------------------------------------------------------


class Solved(NamedTuple):
  """Estimates of ``count`` eigenproblems.

  ``values`` ``(count,)``; ``iterations`` and ``converged`` per problem, or
  already reduced (their max, their conjunction); ``vectors`` with a leading
  ``count`` axis, or ``None``; ``kept``: where the factored solver kept a
  dense start vector (``H² v₀ = 0``), ``(n, k)``, else ``None``.
  """
  values: jax.Array
  iterations: jax.Array
  converged: jax.Array
  vectors: Any
  kept: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Problems:
  """``count`` eigenproblems, each estimating a ``|λ|_max``, and how to solve them.

  Attributes:
    count: the number of problems (``n·k``, example-major).
    solve_all: ``(iters, keep_vectors) -> Solved``: every problem from its
      start vector, at most ``iters`` iterations each; ``vectors`` is ``None``
      unless ``keep_vectors``.
    solve_one: ``(p, start, iters) -> (value, iterations, converged, vector)``:
      problem ``p`` (a traced index) from ``start``, one of ``solve_all``'s vectors.
    output: ``Solved -> NormEstimate.vector``: leaves ``(n, k, *leaf.shape)``,
      or :class:`~ntk_diag.block_hessian.LowRankVectors` with batch axes ``(n, k)``.
    traced_iters: ``solve_all`` takes a traced iteration count (power
      iteration: the count only bounds its loop).
  """
  count: int
  solve_all: Callable[[int, bool], Solved]
  solve_one: Callable[[jax.Array, Any, int], tuple]
  output: Callable[[Solved], PyTree]
  traced_iters: bool = False


def hessian_problems(apply_fn: Callable, params: PyTree, x: PyTree, n: int, k: int,
                     options: SolverOptions, key: jax.Array, init: PyTree | None) -> Problems:
  """The ``n·k`` problems ``‖∇²_θ f_a(x_i)‖₂``: factored
  (:func:`factored_hessian_problems`) with ``method="power"`` on a model with
  Dense layers worth factoring, else :func:`dense_hessian_problems`."""
  layout = block_hessian.layout_or_none(apply_fn, params, x) if options.method == "power" else None
  if layout is not None:
    return factored_hessian_problems(layout, params, x, n, k, options, key, init)
  return dense_hessian_problems(apply_fn, params, x, n, k, options, key, init)


def dense_hessian_problems(apply_fn: Callable, params: PyTree, x: PyTree, n: int, k: int,
                           options: SolverOptions, key: jax.Array,
                           init: PyTree | None) -> Problems:
  """The ``n·k`` problems on Hessian-vector products (forward-over-reverse,
  ``jax.linearize`` of ``jax.grad``); one at a time on CPU (see
  :func:`ntk_diag._memory.problem_batch`)."""
  f = _model.per_example(apply_fn)
  shared, batched = problem_inits(init, params, (n, k), key)
  if batched is not None:  # (n, k, ...) -> (n·k, ...)
    batched = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), batched)
  examples = jnp.repeat(jnp.arange(n), k)
  outputs = jnp.tile(jnp.arange(k), n)
  per_bytes = (_memory.solver_vectors(options.method, options.num_iters)
               * _memory.vector_bytes(params))
  batch = _memory.problem_batch(options.batch_size, per_bytes, n * k, solver=True)

  def solve(i, a, start, iters):
    xi = _model.take(x, i)
    grad_fn = jax.grad(lambda p: f(p, xi)[a])
    _, hvp = jax.linearize(grad_fn, params)  # forward-over-reverse
    result = spectral.top_eigenpair_core(hvp, shared if start is None else start,
                                         method=options.method, which="magnitude",
                                         num_iters=iters, tol=options.tol)
    return result.value, result.iterations, result.converged, result.vector

  def solve_all(iters, keep_vectors):
    def one(args):
      value, its, conv, vector = solve(*args, iters)
      return value, its, conv, vector if keep_vectors else None
    return Solved(*map_problems(one, (examples, outputs, batched), n * k, batch))

  def output(solved):
    return jax.tree.map(lambda a: a.reshape((n, k) + a.shape[1:]), solved.vectors)

  return Problems(count=n * k, solve_all=solve_all, output=output,
                  solve_one=lambda p, start, iters: solve(examples[p], outputs[p], start, iters),
                  traced_iters=options.method == "power")


def factored_hessian_problems(layout: block_hessian.Layout, params: PyTree, x: PyTree, n: int,
                              k: int, options: SolverOptions, key: jax.Array,
                              init: PyTree | None) -> Problems:
  """The same problems on :mod:`ntk_diag.block_hessian`'s factored products (power
  iteration on ``H²``), vmapped over examples, then outputs, in blocks of examples.

  ``options.factored_vectors=True`` (with ``return_vector``) returns the
  vectors as a :class:`~ntk_diag.block_hessian.LowRankVectors` with batch
  axes ``(n, k)`` (a few factors per Dense layer instead of ``n·k``
  parameter-sized vectors); pass it back as ``init``. ``None`` (the
  default): factored when ``init`` is a ``LowRankVectors``. A
  ``LowRankVectors`` ``init`` that is zero everywhere means "no warm start
  yet": every problem starts from random factors (drawn from ``key``), so a
  placeholder (:func:`ntk_diag.block_hessian.zeros`) keeps the compiled
  structure of the first call and the later ones the same.
  """
  shared = batched = None
  if isinstance(init, block_hessian.LowRankVectors):
    # A zero placeholder: no warm start yet, every problem starts from a random vector.
    cold = jnp.all(jnp.stack([jnp.all(a == 0) for a in jax.tree.leaves(init)]))
    batched = lax.cond(cold, lambda: _tree.tree_random_normal_like(key, init), lambda: init)
  elif init is None:
    shared = jax.tree.leaves(_tree.tree_random_normal_like(key, params))
  else:
    start, per_problem = problem_inits(init, params, (n, k), key)
    shared = None if start is None else jax.tree.leaves(start)
    batched = None if per_problem is None else jax.tree.leaves(per_problem)
  factored = (isinstance(init, block_hessian.LowRankVectors) if options.factored_vectors is None
              else options.factored_vectors)

  def run(xs, starts, iters):
    """Every problem of a block of examples: vmapped over examples, then outputs."""
    def example(xi, starts_i):
      def problem(a, v0):
        return block_hessian.solve(layout, params, xi, a, shared if v0 is None else v0,
                                   num_iters=iters, tol=options.tol)
      return jax.vmap(problem)(jnp.arange(k), starts_i)
    return jax.vmap(example)(xs, starts)

  dense_starts = batched is not None and not isinstance(batched, block_hessian.LowRankVectors)
  per_example_bytes = k * (block_hessian.bytes_per_problem(layout, params)
                           + (_memory.vector_bytes(params) if dense_starts else 0))
  block = _memory.example_block(options.batch_size, per_example_bytes, n, k)

  def solve_all(iters, keep_vectors):
    if block >= n:
      theta, vectors, its, conv, kept = run(x, batched, iters)
    else:
      tiles = lax.map(lambda args: run(*args, iters),
                      (_model.pad_to_blocks(x, n, block), _model.pad_to_blocks(batched, n, block)))
      theta, vectors, its, conv, kept = jax.tree.map(
          lambda a: a.reshape((-1,) + a.shape[2:])[:n], tiles)
    flat = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), vectors)
    return Solved(nonneg_sqrt(theta).reshape(n * k), its, conv,
                  flat if keep_vectors else None, kept)

  def solve_one(p, start, iters):
    theta, v, its, converged, _ = block_hessian.solve(
        layout, params, _model.take(x, p // k), p % k, start, num_iters=iters, tol=options.tol)
    return nonneg_sqrt(theta), its, converged, v

  def output(solved):
    vectors = jax.tree.map(lambda a: a.reshape((n, k) + a.shape[1:]), solved.vectors)
    if factored:
      return vectors
    return _dense_vectors(layout, params, vectors, solved.kept, shared,
                          batched if dense_starts else None)

  return Problems(count=n * k, solve_all=solve_all, solve_one=solve_one, output=output,
                  traced_iters=True)


def screen_and_refine(problems: Problems, init_values: jax.Array, *,
                      screen_iters: int, num_iters: int) -> Solved:
  """Screen every problem, then refine the chosen ones.

  1. screen: at most ``s = screen_iters`` iterations on every problem ``p``
     from its start vector give ``σ_p <= ‖H_p‖₂`` (a Rayleigh quotient: a
     lower bound);
  2. refine: with ``b = argmax_p σ_p`` and ``μ = init_values``, every problem
     with ``μ_p >= μ_b`` (ranked at least as high as ``b`` last time, ``b``
     included) gets the full solver (``num_iters``) from its screened vector,
     giving ``ρ_p`` (even where the screen met its tolerance: from a stale
     vector it can converge to a lower eigenvalue).

  Then ``values[p] = max(σ_p, ρ_p)`` (``σ_p`` where not refined), a lower
  bound like every estimate here. When the ranking is stable only ``b`` is
  refined, ``n·k·s + num_iters`` iterations instead of ``n·k·num_iters``.
  The previous ranking matters because ``‖H_p‖₂`` changes continuously with
  the parameters but its eigenvector need not: where two top eigenvalues of
  ``H_p`` cross between calls, the warm vector follows the one that fell,
  ``σ_p`` drops far below ``‖H_p‖₂`` and only the refinement (more
  iterations) recovers it. ``init_values = inf`` everywhere (no previous
  call) solves every problem in full: with ``problems.traced_iters`` in the
  screen's own loop, given ``num_iters`` instead of ``s`` (one solver loop
  compiled, every problem batched), else by refining each. ``iterations``
  and ``converged`` describe the problems solved in full; ``vectors`` are
  the screened ones (``n·k`` parameter-sized vectors), refined where refined.
  """
  count = problems.count
  prior = jnp.reshape(init_values, (count,))
  screen = min(screen_iters, num_iters)
  cold = jnp.all(jnp.isinf(prior)) if problems.traced_iters else jnp.zeros((), bool)
  screened = problems.solve_all(jnp.where(cold, num_iters, screen) if problems.traced_iters
                                else screen, True)
  best = jnp.argmax(screened.values)
  # `| (p == best)`: `best` is refined even where the prior holds NaN.
  chosen = ((prior >= prior[best]) | (jnp.arange(count) == best)) & ~cold
  order = jnp.argsort(~chosen, stable=True)  # the chosen problems first

  def refine(j, state):  # one chosen problem, updated in place
    values, its, conv, vectors = state
    p = order[j]
    start = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, p, keepdims=False), vectors)
    value, iterations, converged, vector = problems.solve_one(p, start, num_iters)
    vectors = jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, p, 0),
                           vectors, vector)
    return (values.at[p].max(value), jnp.maximum(its, iterations), conv & converged, vectors)

  # A loop over the chosen problems only: a second map over all of them
  # costs a copy of every vector, as much as an iteration on CPU.
  its0 = jnp.where(cold, jnp.max(screened.iterations), 0).astype(jnp.int32)
  conv0 = jnp.where(cold, jnp.all(screened.converged), True)
  values, its, conv, vectors = lax.fori_loop(
      0, jnp.sum(chosen), refine, (screened.values, its0, conv0, screened.vectors))
  return Solved(values, its, conv, vectors, screened.kept)


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
