"""Every per-(example, output) Hessian eigenproblem at once, Dense weights as low-rank factors.

For output ``a`` at example ``x`` let ``H = ∇²_θ f_a(x)``. Where a layer
``z = A W`` recognised by :mod:`ntk_diag.structured` (Dense, or Conv on its
patches) holds ``W`` — ``A`` is the ``S × c`` layer input over ``S``
positions, with a ones column when a bias is folded in, ``G = ∂f_a/∂z`` the
``S × o`` output cotangent — the ``W`` block of the gradient is ``Aᵀ G``, so
the ``W`` block of ``H v`` is

``(H v)_W = Aᵀ Ġ + Ȧᵀ G``,

with ``Ȧ``, ``Ġ`` the derivatives of ``A`` and ``G`` along ``v``: rank ≤ 2S.
Where that is smaller than ``W`` (Dense layers: ``S = 1``) a vector is kept
as factors, rows ``left = [A; Ȧ]`` (``2S × c``) and ``right = [Ġ; G]``
(``2S × o``); elsewhere (convolutions) as the block itself; both in the
layer's canonical ``(g, c, o)`` layout (:class:`LowRankVectors`). Other
parameter leaves (embeddings, norms, leaves used elsewhere) stay dense and
are differentiated as they are.

A product with ``Ẇ`` needs ``A Ẇ`` in the forward pass and ``G Ẇᵀ`` in the
backward pass: for factors ``(A leftᵀ) right`` and ``(G rightᵀ) left``,
``O(S·(c + o))`` per product and eigenproblem, and no parameter-sized
vector per eigenproblem; for a block, one matrix product each (a
convolution with a per-eigenproblem kernel, which ``vmap`` would turn into a
grouped convolution, becomes a batched matrix product on the patches).

Each product is one forward-mode derivative of one reverse pass
(forward-over-reverse), linearised once per eigenproblem: ``jax.linearize``
of ``(fb, ε, β) ↦ ∇_{fb, ε}[f_a + Σ ⟨A − sg(A), β⟩]``, where ``fb`` are the
dense leaves, ``ε`` is added to every structured layer's output ``z`` and
``β`` enters the backward pass at its input ``A``. The tangents
``(v_fb, A Ẇ, G Ẇᵀ)`` give ``(H v)_fb``, ``Ġ`` (the tangent of ``∇_ε``) and
``Ȧ``. The ``n·k`` eigenproblems are solved together: ``vmap`` over
examples (one forward pass each), then outputs.

The solver is power iteration on ``H²``, the iterates, stopping rule and
counts of ``which="magnitude"`` in :func:`ntk_diag.spectral.top_eigenpair`:
``w = H(H v)``, ``θ = ⟨v, w⟩``, stop when ``‖w − θ v‖ ≤ tol · |θ|``, else
``v ← w / ‖w‖``; the estimate is ``sqrt(θ)``. Inner products of factored
blocks are ``Σ (L₁ L₂ᵀ) ⊙ (R₁ R₂ᵀ)`` (small Gram matrices of contiguous
rows); a unit vector is scaled in its ``Ȧ``, ``Ġ`` rows only, so all vectors
of one problem share its ``A``, ``G`` rows and the residual, formed from
elementwise differences of rows (:func:`_residual_sq`), is as accurate as a
dense difference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _model
from ntk_diag import structured
from ntk_diag.structured import evaluate as structured_eval
from ntk_diag.structured import plan as structured_plan

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST


def _mm(spec: str, *operands) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankVectors:
  """Parameter-space vectors with structured layers in their canonical layout.

  The vector is ``dense`` on the leaves kept as they are, ``blocks`` on the
  structured layers held as blocks and ``leftᵀ right`` on the factored ones
  (weight and folded bias, canonical ``(g, c, o)`` layout); zero on
  parameters the model does not use. Every field may carry leading batch
  axes (``(n, k)``: one vector per eigenproblem).

  Attributes:
    dense: one ``batch + leaf.shape`` array per dense leaf.
    blocks: one ``batch + (g, c, o)`` array per block layer.
    left: one ``batch + (g, 2S, c)`` array per factored layer: rows ``[A; Ȧ]``.
    right: one ``batch + (g, 2S, o)`` array per factored layer: rows ``[Ġ; G]``.
  """
  dense: tuple
  blocks: tuple
  left: tuple
  right: tuple


# ------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the parameter leaves are held (static)."""
  plan: Any             # structured.Plan: groups = structured layers, fallback = dense leaves
  factored: tuple       # per group: held as factors (else as a block)
  positions: tuple      # per group: S summed over its uses (factors have 2S rows)
  dims: tuple           # per group: (g, c, o), c with the bias row


def layout_or_none(apply_fn: Callable, params: PyTree, x: PyTree) -> Layout | None:
  """The layout of ``apply_fn``, or None when no Dense layer is worth factoring."""
  plan = structured.plan_or_none(apply_fn, params, x)
  if plan is None:
    return None
  dims = [structured_plan.group_dims(plan.graph, group) for group in plan.groups]
  # Factors 2S·(c + o) per group smaller than the block c·o.
  factored = tuple(all(u.kind == "dot" for u in group.uses) and 2 * s * (c + o) < c * o
                   for group, (_, s, c, o) in zip(plan.groups, dims))
  if not any(factored):
    return None
  return Layout(plan=plan, factored=factored, positions=tuple(d[1] for d in dims),
                dims=tuple((g, c, o) for g, _, c, o in dims))


def zeros(layout: Layout, params: PyTree, batch_shape: tuple[int, ...]) -> LowRankVectors:
  """Zero vectors with leading ``batch_shape`` (e.g. a warm-start placeholder)."""
  leaves = jax.tree.leaves(params)
  dtype = _model.param_dtype(params)
  z = lambda shape: jnp.zeros(batch_shape + shape, dtype)
  specs = list(zip(layout.factored, layout.dims, layout.positions))
  return LowRankVectors(
      dense=tuple(jnp.zeros(batch_shape + leaves[i].shape, leaves[i].dtype)
                  for i in layout.plan.fallback),
      blocks=tuple(z(d) for f, d, _ in specs if not f),
      left=tuple(z((g, 2 * s, c)) for f, (g, c, _), s in specs if f),
      right=tuple(z((g, 2 * s, o)) for f, (g, _, o), s in specs if f))


def vector_size(layout: Layout, params: PyTree) -> int:
  """Scalars in one :class:`LowRankVectors` (one eigenproblem)."""
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
      jax.eval_shape(lambda: zeros(layout, params, ()))))


def _block(group, leaves: list) -> jax.Array:
  """Canonical ``(g, c, o)`` block (bias as the last row) of a leaf-layout vector."""
  block = structured_eval.permute(leaves[group.leaf].reshape(-1), group.uses[0].index)
  if group.bias_leaf is not None:
    bias = structured_eval.permute(leaves[group.bias_leaf].reshape(-1), group.bias_index)
    block = jnp.concatenate([block, jnp.broadcast_to(bias, block.shape[:1] + (1,) + bias.shape)],
                            axis=1)
  return block


def to_pytree(layout: Layout, params: PyTree, v: LowRankVectors) -> PyTree:
  """The params-like pytree of one (unbatched) :class:`LowRankVectors`."""
  leaves, treedef = jax.tree.flatten(params)
  out = [jnp.zeros_like(p) for p in leaves]
  for i, a in zip(layout.plan.fallback, v.dense):
    out[i] = a.astype(leaves[i].dtype)
  blocks, factors = iter(v.blocks), iter(zip(v.left, v.right))
  for group, factored in zip(layout.plan.groups, layout.factored):
    block = _mm("grc,gro->gco", *next(factors)) if factored else next(blocks)
    index = group.uses[0].index
    weight = structured_eval.permute(block[:, :index.shape[1], :].reshape(-1),
                                 np.argsort(index.reshape(-1)))
    out[group.leaf] = weight.reshape(leaves[group.leaf].shape).astype(leaves[group.leaf].dtype)
    if group.bias_leaf is not None:
      bias = structured_eval.permute(block[0, -1, :], np.argsort(group.bias_index))
      out[group.bias_leaf] = bias.reshape(leaves[group.bias_leaf].shape).astype(
          leaves[group.bias_leaf].dtype)
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------- the problem


@dataclasses.dataclass
class _Problem:
  """One (example, output) Hessian, linearised.

  Per group, the uses' layer inputs ``A`` (``(g, s, c)`` each) and output
  cotangents ``G`` (``(g, s, o)``), their rows of all uses stacked (``a``,
  ``g``: ``(g, S, ·)``) and Gram matrices ``aa = a aᵀ``, ``gg = g gᵀ``; the
  gradient on the dense leaves; the linear map of the tangents.
  """
  inputs: list
  cotangents: list
  a: list
  g: list
  aa: list
  gg: list
  grad_dense: list
  linear: Callable


def linearize(layout: Layout, param_vals: list, x_leaves: list, output: jax.Array) -> _Problem:
  """Linearise ``∇ f_output`` at one example (``x_leaves``: batch axis of size 1)."""
  plan = layout.plan
  graph = plan.graph
  dtype = jnp.result_type(*param_vals)
  _, fb0, eps0 = structured_eval.forward_arguments(plan, param_vals)
  beta0 = [jnp.zeros((g, structured_eval.use_positions(graph, u), c), dtype)
           for group, (g, c, _) in zip(plan.groups, layout.dims) for u in group.uses]

  def objective(fb, eps, beta):
    out, inputs = structured_eval.forward(plan, param_vals, fb, eps, x_leaves, conv_by_patches=True)
    flat = [a.astype(dtype) for group_inputs in inputs for a in group_inputs]
    coupling = sum(jnp.vdot(a - lax.stop_gradient(a), b) for a, b in zip(flat, beta))
    return out[output].astype(dtype) + coupling, flat

  def gradients(fb, eps, beta):
    (g_fb, g_eps), flat = jax.grad(objective, argnums=(0, 1), has_aux=True)(fb, eps, beta)
    return g_fb, g_eps, flat

  (g_fb, g_eps, flat), linear = jax.linearize(gradients, fb0, eps0, beta0)
  inputs, cotangents = _per_group(plan, flat, g_eps)
  a = [jnp.concatenate(x, axis=-2) for x in inputs]
  g = [jnp.concatenate(x, axis=-2) for x in cotangents]
  return _Problem(inputs=inputs, cotangents=cotangents, a=a, g=g,
                  aa=[_mm("gsc,gtc->gst", x, x) for x in a],
                  gg=[_mm("gso,gto->gst", x, x) for x in g], grad_dense=g_fb, linear=linear)


def _per_group(plan, flat_inputs: list, eps_values: list):
  """Flat per-use inputs and per-record ε values -> canonical per-group lists."""
  eps_of = dict(zip(plan.perturbed, eps_values))
  inputs, cotangents, i = [], [], 0
  for group in plan.groups:
    inputs.append(flat_inputs[i:i + len(group.uses)])
    i += len(group.uses)
    cotangents.append([structured_eval.layer_cotangent(plan, u, eps_of[u.rec][None])[0]
                       for u in group.uses])
  return inputs, cotangents


# ------------------------------------------------------------------- products


def _injections(layout: Layout, problem: _Problem, v: Any) -> tuple[list, list, list]:
  """``(dense part, A_u Ẇ, G_u Ẇᵀ)`` of ``v`` for every use ``u`` of every group.

  ``v`` is a :class:`LowRankVectors` (``Ẇ = leftᵀ right`` on factored groups:
  ``(A_u leftᵀ) right`` and ``(G_u rightᵀ) left``) or the leaves of a
  params-like vector.
  """
  forward, backward = [], []
  if isinstance(v, LowRankVectors):
    dense = list(v.dense)
    blocks, factors = iter(v.blocks), iter(zip(v.left, v.right))
    weights = [next(factors) if f else next(blocks) for f in layout.factored]
  else:
    dense = [v[i] for i in layout.plan.fallback]
    weights = [_block(group, v) for group in layout.plan.groups]
  for weight, inputs, cotangents in zip(weights, problem.inputs, problem.cotangents):
    for a_u, g_u in zip(inputs, cotangents):
      if isinstance(weight, tuple):
        left, right = weight
        forward.append(_mm("gsr,gro->gso", _mm("gsc,grc->gsr", a_u, left), right))
        backward.append(_mm("gsr,grc->gsc", _mm("gso,gro->gsr", g_u, right), left))
      else:
        forward.append(_mm("gsc,gco->gso", a_u, weight))
        backward.append(_mm("gso,gco->gsc", g_u, weight))
  return dense, forward, backward


def hvp(layout: Layout, problem: _Problem, v: Any) -> LowRankVectors:
  """``H v`` for a :class:`LowRankVectors` or the leaves of a params-like ``v``."""
  plan = layout.plan
  dense, forward, backward = _injections(layout, problem, v)
  uses = [u for group in plan.groups for u in group.uses]
  eps_dot = {u.rec: structured_eval.layer_output(plan, u, y) for u, y in zip(uses, forward)}
  g_fb, g_eps, flat = problem.linear(dense, [eps_dot[r] for r in plan.perturbed], backward)
  inputs_dot, cotangents_dot = _per_group(plan, flat, g_eps)
  blocks, left, right = [], [], []
  for i, factored in enumerate(layout.factored):
    if factored:  # rows [A; Ȧ] and [Ġ; G]
      left.append(jnp.concatenate([problem.a[i]] + inputs_dot[i], axis=-2))
      right.append(jnp.concatenate(cotangents_dot[i] + [problem.g[i]], axis=-2))
    else:  # Aᵀ Ġ + Ȧᵀ G, summed over positions and uses
      blocks.append(sum(_mm("gsc,gso->gco", a, gd) + _mm("gsc,gso->gco", ad, g)
                        for a, gd, ad, g in zip(problem.inputs[i], cotangents_dot[i],
                                                inputs_dot[i], problem.cotangents[i])))
  return LowRankVectors(dense=tuple(g_fb), blocks=tuple(blocks), left=tuple(left),
                        right=tuple(right))


def _gradient(layout: Layout, problem: _Problem) -> LowRankVectors:
  """``∇_θ f_a`` (rows ``[A; 0]`` and ``[G; G]``)."""
  blocks = [sum(_mm("gsc,gso->gco", a, g) for a, g in zip(inputs, cotangents))
            for inputs, cotangents, f in zip(problem.inputs, problem.cotangents, layout.factored)
            if not f]
  pick = lambda per_group: [x for x, f in zip(per_group, layout.factored) if f]
  return LowRankVectors(
      dense=tuple(problem.grad_dense), blocks=tuple(blocks),
      left=tuple(jnp.concatenate([a, jnp.zeros_like(a)], axis=-2) for a in pick(problem.a)),
      right=tuple(jnp.concatenate([g, g], axis=-2) for g in pick(problem.g)))


# -------------------------------------------------------------- vector algebra


def vdot(v: LowRankVectors, w: LowRankVectors) -> jax.Array:
  """``⟨v, w⟩``: ``Σ (left_v left_wᵀ) ⊙ (right_v right_wᵀ)`` on factored groups."""
  parts = [jnp.vdot(a, b) for a, b in zip(v.dense + v.blocks, w.dense + w.blocks)]
  parts += [jnp.sum(_mm("grc,gqc->grq", l1, l2) * _mm("gro,gqo->grq", r1, r2))
            for l1, r1, l2, r2 in zip(v.left, v.right, w.left, w.right)]
  return sum(parts[1:], parts[0])


def _scale(s: jax.Array, v: LowRankVectors) -> LowRankVectors:
  """``s · v``, scaling the ``Ȧ`` and ``Ġ`` rows (``A``, ``G`` rows stay as they are)."""
  def halves(a, first, second):
    r = a.shape[-2] // 2
    return jnp.concatenate([first * a[..., :r, :], second * a[..., r:, :]], axis=-2)
  return LowRankVectors(dense=tuple(s * a for a in v.dense), blocks=tuple(s * a for a in v.blocks),
                        left=tuple(halves(a, 1.0, s) for a in v.left),
                        right=tuple(halves(a, s, 1.0) for a in v.right))


def _residual_sq(w: LowRankVectors, v: LowRankVectors, theta: jax.Array) -> jax.Array:
  """``‖w − θ v‖²`` from elementwise differences.

  Per factored group, with ``w``'s rows ``A, Ȧ, Ġ, G`` and ``v``'s ``A', Ȧ', Ġ', G'``:
  ``w − θ v = A (Ġ − θĠ')ᵀ + (Ȧ − θȦ') Gᵀ − θ (A' − A) Ġ'ᵀ − θ Ȧ' (G' − G)ᵀ``.
  Vectors of one problem share ``A`` and ``G`` exactly (the last two terms
  vanish), so near convergence no large terms cancel.
  """
  parts = [jnp.sum(jnp.square(b - theta * a)) for a, b in zip(v.dense + v.blocks,
                                                             w.dense + w.blocks)]
  for l0, r0, l1, r1 in zip(v.left, v.right, w.left, w.right):
    s = l0.shape[-2] // 2
    (a0, ad0), (gd0, g0) = (l0[:, :s], l0[:, s:]), (r0[:, :s], r0[:, s:])
    (a1, ad1), (gd1, g1) = (l1[:, :s], l1[:, s:]), (r1[:, :s], r1[:, s:])
    left = jnp.concatenate([a1, ad1 - theta * ad0, a0 - a1, ad0], axis=-2)
    right = jnp.concatenate([gd1 - theta * gd0, g1, -theta * gd0, -theta * (g0 - g1)], axis=-2)
    parts.append(jnp.sum(_mm("grc,gqc->grq", left, left) * _mm("gro,gqo->grq", right, right)))
  return sum(parts[1:], parts[0])


def _where(pred: jax.Array, u: LowRankVectors, v: LowRankVectors) -> LowRankVectors:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), u, v)


def _unit(v: LowRankVectors, fallback: LowRankVectors) -> LowRankVectors:
  norm = jnp.sqrt(jnp.maximum(vdot(v, v), 0.0))
  return _where(norm > 0, _scale(1.0 / jnp.where(norm > 0, norm, 1.0), v), fallback)


# ------------------------------------------------------------------------ solver


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """Power iteration on ``H²``: the iterate ``v`` and the last iteration's ``θ``,
  residual, count, convergence and ``‖w‖²`` (``w = H(H v)``)."""
  v: LowRankVectors
  theta: jax.Array
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array
  w_sq: jax.Array


def _state(v, theta, residual, iterations, converged, w_sq) -> State:
  return State(v=v, theta=theta, residual=residual,
               iterations=jnp.asarray(iterations, jnp.int32), converged=converged, w_sq=w_sq)


def start(v0: LowRankVectors) -> State:
  """Before the first iteration from ``v₀`` (normalised, as power iteration does)."""
  zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(v0)))
  return _state(_unit(v0, v0), zero, zero, 0, jnp.zeros((), bool), zero)


def first_iteration_dense(layout: Layout, problem: _Problem, v0_leaves: list,
                          tol: float) -> State:
  """The first iteration from a params-like ``v₀`` (its leaves).

  ``θ = ⟨v₀, H u⟩ = ‖u‖²`` with ``u = H v₀`` and ``‖w − θ v₀‖² = ‖w‖² − 2θ² +
  θ²‖v₀‖²`` (accurate unless ``v₀`` is converged to ``√ε``). Where ``w = 0``
  power iteration keeps ``v₀``, which a :class:`LowRankVectors` cannot hold:
  ``v`` is then the unit gradient (``w_sq = 0`` flags it).
  """
  sq = sum(jnp.vdot(a, a) for a in v0_leaves)
  v0 = [a / jnp.where(sq > 0, jnp.sqrt(sq), 1.0) for a in v0_leaves]
  u = hvp(layout, problem, v0)
  w = hvp(layout, problem, u)
  theta, w_sq = vdot(u, u), vdot(w, w)
  v0_sq = sum(jnp.vdot(a, a) for a in v0)
  residual = jnp.sqrt(jnp.maximum(w_sq - 2.0 * theta * theta + theta * theta * v0_sq, 0.0))
  gradient = _gradient(layout, problem)
  v = _unit(w, _unit(gradient, gradient))
  return _state(v, theta, residual, 1, residual <= tol * jnp.abs(theta), w_sq)


def iterate(layout: Layout, problem: _Problem, state: State, num_iters: int,
            tol: float) -> State:
  """Iterations (two products each) from ``state`` until ``converged`` or ``num_iters``."""

  def cond(s):
    return jnp.logical_and(~s.converged, s.iterations < num_iters)

  def body(s):
    w = hvp(layout, problem, hvp(layout, problem, s.v))
    theta, w_sq = vdot(s.v, w), vdot(w, w)
    residual = jnp.sqrt(jnp.maximum(_residual_sq(w, s.v, theta), 0.0))
    norm = jnp.sqrt(jnp.maximum(w_sq, 0.0))
    unit = _scale(1.0 / jnp.where(norm > 0, norm, 1.0), w)
    return State(v=_where(norm > 0, unit, s.v), theta=theta, residual=residual,
                 iterations=s.iterations + 1,
                 converged=residual <= tol * jnp.abs(theta), w_sq=w_sq)

  return lax.while_loop(cond, body, state)


def solve(layout: Layout, params: PyTree, xi: PyTree, output: jax.Array, v0: Any, *,
          num_iters: int, tol: float):
  """One eigenproblem (unbatched; ``vmap`` it) from ``v0``: ``(θ, v, iterations,
  converged, kept)``, ``θ`` estimating ``λ_max(H²)``, ``v`` a :class:`LowRankVectors`.

  ``v0`` is a :class:`LowRankVectors` or the leaves of a params-like vector.
  ``kept`` flags ``H² v₀ = 0`` for the latter: power iteration then keeps
  ``v₀``, and ``v`` is the unit gradient (a caller keeping params-like
  vectors puts ``v₀`` back).
  """
  param_vals = jax.tree.leaves(params)
  x_leaves = [a[None] for a in jax.tree.leaves(xi)]
  problem = linearize(layout, param_vals, x_leaves, output)
  if isinstance(v0, LowRankVectors):
    state, kept = start(v0), jnp.zeros((), bool)
  else:
    state = first_iteration_dense(layout, problem, v0, tol)
    kept = state.w_sq == 0
  state = iterate(layout, problem, state, num_iters, tol)
  return state.theta, state.v, state.iterations, state.converged, kept


def bytes_per_problem(layout: Layout, params: PyTree) -> int:
  """Rough peak bytes of one eigenproblem: solver vectors and the linearisation."""
  graph = layout.plan.graph
  activations = sum(math.prod(graph.shapes[out]) for rec in graph.records for out in rec.outs)
  itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
  return itemsize * (8 * vector_size(layout, params) + 4 * activations)
