"""Every per-(example, output) Hessian eigenproblem at once, Dense weights as low-rank factors.

For output ``a`` at example ``x`` let ``H = ∇²_θ f_a(x)``. Where a layer
``z = A W`` recognised by :mod:`ntk_diag.structured` (Dense, or Conv on its
patches) holds ``W`` — ``A`` is the ``S × c`` layer input over ``S``
positions, with a ones column when a bias is folded in, ``G = ∂f_a/∂z`` the
``S × o`` output cotangent — the ``W`` block of the gradient is ``Aᵀ G``, so
the ``W`` block of ``H v`` is

``(H v)_W = Aᵀ Ġ + Ȧᵀ G``,

with ``Ȧ``, ``Ġ`` the derivatives of ``A`` and ``G`` along ``v``: rank ≤ 2S.
Where that is smaller than ``W`` (Dense layers: ``S = 1``) every product
``H v`` is kept as the factors ``left = [Aᵀ, Ȧᵀ]`` (``c × 2S``) and
``right = [Ġᵀ, Gᵀ]`` (``o × 2S``); elsewhere (convolutions) as the block
itself. Both are held in the layer's canonical ``(g, c, o)`` layout, in a
:class:`LowRankVectors`. Other parameter leaves (embeddings, norms, leaves
used elsewhere) stay dense and are differentiated as they are.

A product with ``Ẇ`` needs ``A Ẇ`` in the forward pass and ``G Ẇᵀ`` in the
backward pass: for factors ``(A left) rightᵀ`` and ``(G right) leftᵀ``,
``O(S·(c + o))`` per product and eigenproblem, with no parameter-sized vector
per eigenproblem; for a block, one matrix product each (a convolution with a
per-eigenproblem kernel, which ``vmap`` would turn into a grouped
convolution, becomes a batched matrix product on the patches).

Each product is one forward-mode derivative of one reverse pass
(forward-over-reverse), linearised once per eigenproblem: ``jax.linearize``
of ``(fb, ε, β) ↦ ∇_{fb, ε}[f_a + Σ ⟨A − sg(A), β⟩]``, where ``fb`` are the
dense leaves, ``ε`` is added to every structured layer's output ``z`` and
``β`` enters the backward pass at its input ``A``. The tangents
``(v_fb, A Ẇ, G Ẇᵀ)`` give ``(H v)_fb``, ``Ġ`` (the tangent of ``∇_ε``)
and ``Ȧ``. The ``n·k`` eigenproblems are solved together: ``vmap`` over
examples (one forward pass each), then outputs.

The solver is power iteration on ``H²``, the iterates, stopping rule and
counts of ``which="magnitude"`` in :func:`ntk_diag.spectral.top_eigenpair`:
``w = H(H v)``, ``θ = ⟨v, w⟩``, stop when ``‖w − θ v‖ ≤ tol · |θ|``, else
``v ← w / ‖w‖``; the estimate is ``sqrt(θ)``. Inner products of factored
blocks are ``Σ (L₁ᵀ L₂) ⊙ (R₁ᵀ R₂)``; the residual is formed from
differences of factor columns (see :func:`_residual_sq`), as accurate as a
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

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankVectors:
  """Parameter-space vectors with structured layers in their canonical layout.

  The vector is ``dense`` on the leaves kept as they are, ``blocks`` on the
  structured layers held as blocks and ``left @ rightᵀ`` on the factored ones
  (weight and folded bias, canonical ``(g, c, o)`` layout); zero on
  parameters the model does not use. Every field may carry leading batch
  axes (``(n, k)``: one vector per eigenproblem).

  Attributes:
    dense: one ``batch + leaf.shape`` array per dense leaf.
    blocks: one ``batch + (g, c, o)`` array per block layer.
    left: one ``batch + (g, c, 2S)`` array per factored layer: ``[Aᵀ, Ȧᵀ]``.
    right: one ``batch + (g, o, 2S)`` array per factored layer: ``[Ġᵀ, Gᵀ]``.
  """
  dense: tuple
  blocks: tuple
  left: tuple
  right: tuple


# ------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the parameter leaves are held (static)."""
  plan: Any             # structured._Plan: groups = structured layers, fallback = dense leaves
  factored: tuple       # per group: held as factors (else as a block)
  positions: tuple      # per group: S summed over its uses (factors have 2S columns)
  dims: tuple           # per group: (g, c, o), c with the bias row

  def groups(self, factored: bool) -> list:
    return [g for g, f in zip(self.plan.groups, self.factored) if f == factored]


def layout_or_none(apply_fn: Callable, params: PyTree, x: PyTree) -> Layout | None:
  """The layout of ``apply_fn``, or None when no Dense layer is worth factoring."""
  plan = structured._plan_or_none(apply_fn, params, x)
  if plan is None:
    return None
  dims = [structured._group_dims(plan.graph, group) for group in plan.groups]
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
      left=tuple(z((g, c, 2 * s)) for f, (g, c, _), s in specs if f),
      right=tuple(z((g, o, 2 * s)) for f, (g, _, o), s in specs if f))


def vector_size(layout: Layout, params: PyTree) -> int:
  """Scalars in one :class:`LowRankVectors` (one eigenproblem)."""
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
      jax.eval_shape(lambda: zeros(layout, params, ()))))


def _block(group, leaves: list) -> jax.Array:
  """Canonical ``(g, c, o)`` block (bias as the last row) of a leaf-layout vector."""
  block = structured._permute(leaves[group.leaf].reshape(-1), group.uses[0].index)
  if group.bias_leaf is not None:
    bias = structured._permute(leaves[group.bias_leaf].reshape(-1), group.bias_index)
    block = jnp.concatenate([block, jnp.broadcast_to(bias, block.shape[:1] + (1,) + bias.shape)],
                            axis=1)
  return block


def to_pytree(layout: Layout, params: PyTree, v: LowRankVectors) -> PyTree:
  """The params-like pytree of one (unbatched) :class:`LowRankVectors`."""
  leaves, treedef = jax.tree.flatten(params)
  out = [jnp.zeros_like(p) for p in leaves]
  for i, a in zip(layout.plan.fallback, v.dense):
    out[i] = a.astype(leaves[i].dtype)
  blocks = iter(v.blocks)
  factors = iter(zip(v.left, v.right))
  for group, factored in zip(layout.plan.groups, layout.factored):
    if factored:
      left, right = next(factors)
      block = jnp.einsum("gcr,gor->gco", left, right, precision=_HIGHEST)
    else:
      block = next(blocks)
    index = group.uses[0].index
    weight = structured._permute(block[:, :index.shape[1], :].reshape(-1), np.argsort(index.reshape(-1)))
    out[group.leaf] = weight.reshape(leaves[group.leaf].shape).astype(leaves[group.leaf].dtype)
    if group.bias_leaf is not None:
      bias = structured._permute(block[0, -1, :], np.argsort(group.bias_index))
      out[group.bias_leaf] = bias.reshape(leaves[group.bias_leaf].shape).astype(
          leaves[group.bias_leaf].dtype)
  return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------- vector algebra


def _gram(l1, r1, l2, r2) -> jax.Array:
  """``⟨l1 r1ᵀ, l2 r2ᵀ⟩_F`` summed over groups ``g``."""
  ll = jnp.einsum("gcr,gcq->grq", l1, l2, precision=_HIGHEST)
  rr = jnp.einsum("gor,goq->grq", r1, r2, precision=_HIGHEST)
  return jnp.sum(ll * rr)


def vdot(u: LowRankVectors, v: LowRankVectors) -> jax.Array:
  parts = [jnp.vdot(a, b) for a, b in zip(u.dense + u.blocks, v.dense + v.blocks)]
  parts += [_gram(l1, r1, l2, r2) for l1, r1, l2, r2 in zip(u.left, u.right, v.left, v.right)]
  return sum(parts[1:], parts[0])


def _halves(a: jax.Array, first, second) -> jax.Array:
  """``[first · a₁, second · a₂]`` for the two column halves ``a = [a₁, a₂]`` (no copies)."""
  pair = a.reshape(a.shape[:-1] + (2, a.shape[-1] // 2))
  weights = jnp.stack([jnp.asarray(first, a.dtype), jnp.asarray(second, a.dtype)])
  return (pair * weights[:, None]).reshape(a.shape)


def scale(s: jax.Array, v: LowRankVectors) -> LowRankVectors:
  """``s · v``: dense leaves, blocks, and the ``Ȧ`` / ``Ġ`` columns of each factor pair
  (the ``A`` / ``G`` columns of a problem's vectors stay the same arrays)."""
  return LowRankVectors(dense=tuple(s * a for a in v.dense),
                        blocks=tuple(s * a for a in v.blocks),
                        left=tuple(_halves(a, 1.0, s) for a in v.left),
                        right=tuple(_halves(a, s, 1.0) for a in v.right))


def _residual_sq(w: LowRankVectors, v: LowRankVectors, theta: jax.Array) -> jax.Array:
  """``‖w − θ v‖²`` from differences of factor columns.

  With ``w = A_w Ġ_wᵀ + Ȧ_w G_wᵀ`` (per factored layer) and ``v`` likewise,
  ``w − θ v = A_w (Ġ_w − θĠ_v)ᵀ + (Ȧ_w − θȦ_v) G_wᵀ − θ (A_v − A_w) Ġ_vᵀ
  − θ Ȧ_v (G_v − G_w)ᵀ``: when ``v`` comes from the same problem (same ``A``,
  ``G``) the last two terms vanish exactly, and no large terms cancel.
  """
  parts = [jnp.sum(jnp.square(a - theta * b))
           for a, b in zip(w.dense + w.blocks, v.dense + v.blocks)]
  for lw, rw, lv, rv in zip(w.left, w.right, v.left, v.right):
    left = jnp.concatenate([lw - _halves(lv, 0.0, theta), lv - _halves(lw, 1.0, 0.0)], -1)
    right = jnp.concatenate([rw - _halves(rv, theta, 0.0),
                             _halves(rw, 0.0, theta) - theta * rv], -1)
    parts.append(_gram(left, right, left, right))
  return sum(parts[1:], parts[0])


def _dots(v: LowRankVectors, w: LowRankVectors) -> tuple[jax.Array, jax.Array]:
  """``(⟨v, w⟩, ‖w‖²)`` with one Gram product per factored layer."""
  vw = [jnp.vdot(a, b) for a, b in zip(v.dense + v.blocks, w.dense + w.blocks)]
  ww = [jnp.vdot(b, b) for b in w.dense + w.blocks]
  for lv, rv, lw, rw in zip(v.left, v.right, w.left, w.right):
    r = lv.shape[-1]
    both_l = jnp.concatenate([lv, lw], -1)
    both_r = jnp.concatenate([rv, rw], -1)
    gram = (jnp.einsum("gcr,gcq->grq", both_l, lw, precision=_HIGHEST)
            * jnp.einsum("gor,goq->grq", both_r, rw, precision=_HIGHEST))
    vw.append(jnp.sum(gram[:, :r]))
    ww.append(jnp.sum(gram[:, r:]))
  return sum(vw[1:], vw[0]), sum(ww[1:], ww[0])


def _where(pred, u: LowRankVectors, v: LowRankVectors) -> LowRankVectors:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), u, v)


def _normalized(w: LowRankVectors, fallback: LowRankVectors) -> LowRankVectors:
  norm = jnp.sqrt(jnp.maximum(vdot(w, w), 0.0))
  return _where(norm > 0, scale(1.0 / jnp.where(norm > 0, norm, 1.0), w), fallback)


# ------------------------------------------------------------------- the problem


@dataclasses.dataclass
class _Problem:
  """One (example, output) Hessian, linearised: primal layer data and the linear map."""
  inputs: list          # per group, per use: A (g, s, c)
  cotangents: list      # per group, per use: G (g, s, o)
  grad_dense: list      # ∇ f_a on the dense leaves
  linear: Callable      # (v_fb, eps tangents, beta tangents) -> tangents of the above


def linearize(layout: Layout, param_vals: list, x_leaves: list, output: jax.Array) -> _Problem:
  """Linearise ``∇ f_output`` at one example (``x_leaves``: batch axis of size 1)."""
  plan = layout.plan
  graph = plan.graph
  dtype = jnp.result_type(*param_vals)
  fb0 = [param_vals[leaf] for leaf in plan.fallback]
  eps0 = [jnp.zeros(graph.shapes[graph.records[r].outs[0]], dtype) for r in plan.perturbed]
  beta0 = [jnp.zeros((g, structured._use_positions(graph, u), c), dtype)
           for group, (g, c, _) in zip(plan.groups, layout.dims) for u in group.uses]

  def objective(fb, eps, beta):
    out, inputs = structured._forward(plan, param_vals, fb, eps, x_leaves, conv_by_patches=True)
    flat = [a.astype(dtype) for group_inputs in inputs for a in group_inputs]
    coupling = sum(jnp.vdot(a - lax.stop_gradient(a), b) for a, b in zip(flat, beta))
    return out[output].astype(dtype) + coupling, flat

  def gradients(fb, eps, beta):
    (g_fb, g_eps), flat = jax.grad(objective, argnums=(0, 1), has_aux=True)(fb, eps, beta)
    return g_fb, g_eps, flat

  (g_fb, g_eps, flat), linear = jax.linearize(gradients, fb0, eps0, beta0)
  inputs, cotangents = _per_group(plan, flat, g_eps)
  return _Problem(inputs=inputs, cotangents=cotangents, grad_dense=g_fb, linear=linear)


def _per_group(plan, flat_inputs: list, eps_values: list):
  """Flat per-use inputs and per-record ε values -> canonical per-group lists."""
  eps_of = dict(zip(plan.perturbed, eps_values))
  inputs, cotangents, i = [], [], 0
  for group in plan.groups:
    inputs.append(flat_inputs[i:i + len(group.uses)])
    i += len(group.uses)
    cotangents.append([structured._layer_cotangent(plan, u, eps_of[u.rec][None])[0]
                       for u in group.uses])
  return inputs, cotangents


def _positions(arrays: list) -> jax.Array:
  """Uses' ``(g, s, ·)`` arrays -> ``(g, ·, S)``: positions of all uses as columns."""
  return jnp.concatenate([jnp.swapaxes(a, -1, -2) for a in arrays], axis=-1)


def _product(layout: Layout, problem: _Problem, v_dense: list,
             weights: list[Callable]) -> LowRankVectors:
  """``H v`` from the dense part of ``v`` and, per group, ``weights[i](A, G) = (A Ẇ, G Ẇᵀ)``."""
  plan = layout.plan
  eps_dot, beta_dot = {}, []
  for group, apply_w, inputs, cotangents in zip(plan.groups, weights, problem.inputs,
                                                problem.cotangents):
    for use, a, g in zip(group.uses, inputs, cotangents):
      forward, backward = apply_w(a, g)
      eps_dot[use.rec] = structured._layer_output(plan, use, forward)
      beta_dot.append(backward)
  g_fb, g_eps, flat = problem.linear(list(v_dense), [eps_dot[r] for r in plan.perturbed],
                                     beta_dot)
  inputs_dot, cotangents_dot = _per_group(plan, flat, g_eps)
  blocks, left, right = [], [], []
  for factored, a, a_dot, g, g_dot in zip(layout.factored, problem.inputs, inputs_dot,
                                          problem.cotangents, cotangents_dot):
    if factored:  # [Aᵀ, Ȧᵀ], [Ġᵀ, Gᵀ]
      left.append(jnp.concatenate([_positions(a), _positions(a_dot)], -1))
      right.append(jnp.concatenate([_positions(g_dot), _positions(g)], -1))
    else:  # Aᵀ Ġ + Ȧᵀ G, summed over positions and uses
      blocks.append(sum(jnp.einsum("gsc,gso->gco", a1, g1, precision=_HIGHEST)
                        + jnp.einsum("gsc,gso->gco", a2, g2, precision=_HIGHEST)
                        for a1, g1, a2, g2 in zip(a, g_dot, a_dot, g)))
  return LowRankVectors(dense=tuple(g_fb), blocks=tuple(blocks), left=tuple(left),
                        right=tuple(right))


def _block_weight(block):
  return lambda a, g: (jnp.einsum("gsc,gco->gso", a, block, precision=_HIGHEST),
                       jnp.einsum("gso,gco->gsc", g, block, precision=_HIGHEST))


def _factor_weight(left, right):
  def apply_w(a, g):
    forward = jnp.einsum("gsc,gcr->gsr", a, left, precision=_HIGHEST)
    backward = jnp.einsum("gso,gor->gsr", g, right, precision=_HIGHEST)
    return (jnp.einsum("gsr,gor->gso", forward, right, precision=_HIGHEST),
            jnp.einsum("gsr,gcr->gsc", backward, left, precision=_HIGHEST))
  return apply_w


def hvp(layout: Layout, problem: _Problem, v: LowRankVectors) -> LowRankVectors:
  """``H v`` for ``v`` in this layout."""
  blocks, factors = iter(v.blocks), iter(zip(v.left, v.right))
  weights = [_factor_weight(*next(factors)) if f else _block_weight(next(blocks))
             for f in layout.factored]
  return _product(layout, problem, v.dense, weights)


def hvp_dense(layout: Layout, problem: _Problem, v_leaves: list) -> LowRankVectors:
  """``H v`` for a params-like ``v`` given as its list of leaves."""
  weights = [_block_weight(_block(group, v_leaves)) for group in layout.plan.groups]
  return _product(layout, problem, [v_leaves[i] for i in layout.plan.fallback], weights)


def _dense_vdot(layout: Layout, v_leaves: list, w: LowRankVectors) -> jax.Array:
  """``⟨v, w⟩`` for a params-like ``v`` (its leaves) and ``w`` in this layout."""
  parts = [jnp.vdot(v_leaves[i], a) for i, a in zip(layout.plan.fallback, w.dense)]
  blocks, factors = iter(w.blocks), iter(zip(w.left, w.right))
  for group, factored in zip(layout.plan.groups, layout.factored):
    v_block = _block(group, v_leaves)
    if factored:
      left, right = next(factors)
      parts.append(jnp.sum(jnp.einsum("gco,gor->gcr", v_block, right, precision=_HIGHEST)
                           * left))
    else:
      parts.append(jnp.vdot(v_block, next(blocks)))
  return sum(parts[1:], parts[0])


# ------------------------------------------------------------------------ solver


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """Power iteration on ``H²`` in half steps (one Hessian-vector product each).

  ``phase`` 0 computes ``u = H v``; phase 1 computes ``w = H u`` and updates
  ``v``, ``theta``, ``residual``, ``iterations`` and ``converged`` as an
  iteration of power iteration on ``H²`` does.
  """
  v: LowRankVectors
  u: LowRankVectors
  phase: jax.Array
  theta: jax.Array
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array


def _state(v: LowRankVectors, u: LowRankVectors, phase: int, theta, residual, converged,
           iterations: int) -> State:
  return State(v=v, u=u, phase=jnp.asarray(phase, jnp.int32), theta=theta, residual=residual,
               iterations=jnp.asarray(iterations, jnp.int32), converged=converged)


def start(v0: LowRankVectors) -> State:
  """Before the first iteration from ``v0`` (normalised, as power iteration does)."""
  v = _normalized(v0, v0)
  zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(v0)))
  return _state(v, v, 0, zero, zero, jnp.zeros((), bool), 0)


def first_iteration_dense(layout: Layout, problem: _Problem, v0_leaves: list, tol: float
                          ) -> tuple[State, jax.Array]:
  """The first iteration from a params-like ``v₀`` (its leaves, unnormalised).

  ``θ = ⟨v₀, H u⟩ = ‖u‖²`` with ``u = H v₀``, and ``‖w − θ v₀‖² = ‖w‖² − 2θ²
  + θ²‖v₀‖²``. Returns the state and whether ``w = H² v₀ = 0``: power
  iteration then keeps ``v₀``, which a :class:`LowRankVectors` cannot hold,
  so ``v`` is the unit gradient there and the caller may put ``v₀`` back.
  """
  sq = sum(jnp.vdot(a, a) for a in v0_leaves)
  v0 = [a / jnp.where(sq > 0, jnp.sqrt(sq), 1.0) for a in v0_leaves]
  u = hvp_dense(layout, problem, v0)
  w = hvp(layout, problem, u)
  theta = vdot(u, u)
  w_sq = vdot(w, w)
  v0_sq = sum(jnp.vdot(a, a) for a in v0)
  residual = jnp.sqrt(jnp.maximum(w_sq - 2.0 * theta * theta + theta * theta * v0_sq, 0.0))
  gradient = _gradient(layout, problem)
  v = _normalized(w, _normalized(gradient, gradient))
  state = _state(v, w, 0, theta, residual, residual <= tol * jnp.abs(theta), 1)
  return state, w_sq == 0


def _gradient(layout: Layout, problem: _Problem) -> LowRankVectors:
  """``∇_θ f_a`` in this layout (``Ȧ = 0``, ``Ġ = G``)."""
  blocks, left, right = [], [], []
  for inputs, cotangents, factored in zip(problem.inputs, problem.cotangents, layout.factored):
    if factored:
      left.append(jnp.concatenate([_positions(inputs), jnp.zeros_like(_positions(inputs))], -1))
      right.append(jnp.concatenate([_positions(cotangents)] * 2, -1))
    else:
      blocks.append(sum(jnp.einsum("gsc,gso->gco", a, g, precision=_HIGHEST)
                        for a, g in zip(inputs, cotangents)))
  return LowRankVectors(dense=tuple(problem.grad_dense), blocks=tuple(blocks),
                        left=tuple(left), right=tuple(right))


def iterate(layout: Layout, problem: _Problem, state: State, num_iters: int,
            tol: float) -> State:
  """Half steps until ``converged`` or ``num_iters`` iterations."""

  def cond(s):
    return jnp.logical_and(~s.converged, s.iterations < num_iters)

  def body(s):
    y = hvp(layout, problem, _where(s.phase == 0, s.v, s.u))
    theta, y_sq = _dots(s.v, y)
    residual = jnp.sqrt(jnp.maximum(_residual_sq(y, s.v, theta), 0.0))
    norm = jnp.sqrt(jnp.maximum(y_sq, 0.0))
    unit = scale(1.0 / jnp.where(norm > 0, norm, 1.0), y)
    done = s.phase == 1
    keep = lambda new, old: jnp.where(done, new, old)
    return State(v=_where(done & (norm > 0), unit, s.v), u=_where(done, s.u, y),
                 phase=1 - s.phase, theta=keep(theta, s.theta),
                 residual=keep(residual, s.residual),
                 iterations=s.iterations + done.astype(jnp.int32),
                 converged=keep(residual <= tol * jnp.abs(theta), s.converged))

  return lax.while_loop(cond, body, state)


def solve(layout: Layout, params: PyTree, xi: PyTree, output: jax.Array, v0: Any, *,
          num_iters: int, tol: float):
  """One eigenproblem (unbatched; ``vmap`` it) from ``v0``: ``(θ, v, iterations, converged,
  zero)``, ``θ`` estimating ``λ_max(H²)``.

  ``v0`` is a :class:`LowRankVectors` in this layout, or the leaves of a
  params-like vector; ``zero`` flags ``H² v₀ = 0`` for the latter (see
  :func:`first_iteration_dense`).
  """
  param_vals = jax.tree.leaves(params)
  x_leaves = [a[None] for a in jax.tree.leaves(xi)]
  problem = linearize(layout, param_vals, x_leaves, output)
  if isinstance(v0, LowRankVectors):
    state, zero = start(v0), jnp.zeros((), bool)
  else:
    state, zero = first_iteration_dense(layout, problem, v0, tol)
  state = iterate(layout, problem, state, num_iters, tol)
  return state.theta, state.v, state.iterations, state.converged, zero


def bytes_per_problem(layout: Layout, params: PyTree) -> int:
  """Rough peak bytes of one eigenproblem: solver vectors and the linearisation."""
  graph = layout.plan.graph
  activations = sum(math.prod(graph.shapes[out]) for rec in graph.records for out in rec.outs)
  itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
  return itemsize * (8 * vector_size(layout, params) + 4 * activations)
