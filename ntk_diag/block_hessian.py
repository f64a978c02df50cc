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
``v ← w / ‖w‖``; the estimate is ``sqrt(θ)``. After the first product every
vector of a problem shares its ``A`` and ``G``, so the loop keeps only
``(Ȧ, Ġ)`` (a :class:`_Frame` vector); inner products are sums of small
Gram matrices (``S × S``) of those rows with ``A`` and ``G``, and the
residual is formed from ``Ȧ_w − θȦ_v`` and ``Ġ_w − θĠ_v``: as accurate as a
dense difference. At the first iteration (start vector ``v₀`` from
elsewhere) ``θ = ⟨v₀, H u⟩ = ‖u‖²`` with ``u = H v₀``, and the residual is
``‖w‖² − 2θ² + θ²‖v₀‖²``.
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
  plan: Any             # structured._Plan: groups = structured layers, fallback = dense leaves
  factored: tuple       # per group: held as factors (else as a block)
  positions: tuple      # per group: S summed over its uses (factors have 2S rows)
  dims: tuple           # per group: (g, c, o), c with the bias row


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
      left=tuple(z((g, 2 * s, c)) for f, (g, c, _), s in specs if f),
      right=tuple(z((g, 2 * s, o)) for f, (g, _, o), s in specs if f))


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
  blocks, factors = iter(v.blocks), iter(zip(v.left, v.right))
  for group, factored in zip(layout.plan.groups, layout.factored):
    block = _mm("grc,gro->gco", *next(factors)) if factored else next(blocks)
    index = group.uses[0].index
    weight = structured._permute(block[:, :index.shape[1], :].reshape(-1),
                                 np.argsort(index.reshape(-1)))
    out[group.leaf] = weight.reshape(leaves[group.leaf].shape).astype(leaves[group.leaf].dtype)
    if group.bias_leaf is not None:
      bias = structured._permute(block[0, -1, :], np.argsort(group.bias_index))
      out[group.bias_leaf] = bias.reshape(leaves[group.bias_leaf].shape).astype(
          leaves[group.bias_leaf].dtype)
  return jax.tree.unflatten(treedef, out)


def _sq_norm(v: LowRankVectors) -> jax.Array:
  parts = [jnp.vdot(a, a) for a in v.dense + v.blocks]
  parts += [jnp.sum(_mm("grc,gqc->grq", l, l) * _mm("gro,gqo->grq", r, r))
            for l, r in zip(v.left, v.right)]
  return sum(parts[1:], parts[0])


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
    cotangents.append([structured._layer_cotangent(plan, u, eps_of[u.rec][None])[0]
                       for u in group.uses])
  return inputs, cotangents


# ------------------------------------------------ vectors of one problem's frame


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Frame:
  """A vector ``A Ġᵀ + Ȧ Gᵀ`` per factored group with this problem's ``A``, ``G``
  (rows ``adot`` ``(g, S, c)``, ``gdot`` ``(g, S, o)``), plus dense leaves and blocks."""
  dense: tuple
  blocks: tuple
  adot: tuple
  gdot: tuple


def _frame_map(f, *frames: _Frame) -> _Frame:
  return jax.tree.map(f, *frames)


def _factored(layout: Layout, per_group: list) -> list:
  """The entries of the factored groups."""
  return [x for x, f in zip(per_group, layout.factored) if f]


def _injections(layout: Layout, problem: _Problem, v: _Frame) -> tuple[list, list]:
  """Per use of every group: ``A_u Ẇ`` and ``G_u Ẇᵀ`` for ``v`` in this problem's frame."""
  forward, backward = [], []
  blocks, frames = iter(v.blocks), iter(zip(v.adot, v.gdot))
  for i, factored in enumerate(layout.factored):
    if factored:  # Ẇ = aᵀ ġ + ȧᵀ g
      adot, gdot = next(frames)
      a_w, g_w = _mm("gsc,gtc->gst", adot, problem.a[i]), _mm("gso,gto->gst", gdot, problem.g[i])
      start = 0
      for a_u, g_u in zip(problem.inputs[i], problem.cotangents[i]):
        rows = slice(start, start + a_u.shape[1])
        start += a_u.shape[1]
        forward.append(_mm("gst,gto->gso", problem.aa[i][:, rows], gdot)
                       + _mm("gts,gto->gso", a_w[:, :, rows], problem.g[i]))
        backward.append(_mm("gts,gtc->gsc", g_w[:, :, rows], problem.a[i])
                        + _mm("gst,gtc->gsc", problem.gg[i][:, rows], adot))
    else:
      block = next(blocks)
      for a_u, g_u in zip(problem.inputs[i], problem.cotangents[i]):
        forward.append(_mm("gsc,gco->gso", a_u, block))
        backward.append(_mm("gso,gco->gsc", g_u, block))
  return forward, backward


def _external_injections(layout: Layout, problem: _Problem, v0: Any) -> tuple[list, list, list]:
  """``(dense tangent, A_u Ẇ, G_u Ẇᵀ)`` of a start vector: a :class:`LowRankVectors`
  (factors of another problem or call) or the leaves of a params-like vector."""
  forward, backward = [], []
  if isinstance(v0, LowRankVectors):
    dense = list(v0.dense)
    blocks, factors = iter(v0.blocks), iter(zip(v0.left, v0.right))
    weights = [next(factors) if f else next(blocks) for f in layout.factored]
  else:
    dense = [v0[i] for i in layout.plan.fallback]
    weights = [_block(group, v0) for group in layout.plan.groups]
  for weight, inputs, cotangents in zip(weights, problem.inputs, problem.cotangents):
    for a_u, g_u in zip(inputs, cotangents):
      if isinstance(weight, tuple):  # Ẇ = leftᵀ right
        left, right = weight
        forward.append(_mm("gsr,gro->gso", _mm("gsc,grc->gsr", a_u, left), right))
        backward.append(_mm("gsr,grc->gsc", _mm("gso,gro->gsr", g_u, right), left))
      else:
        forward.append(_mm("gsc,gco->gso", a_u, weight))
        backward.append(_mm("gso,gco->gsc", g_u, weight))
  return dense, forward, backward


def _product(layout: Layout, problem: _Problem, dense: list, forward: list,
             backward: list) -> _Frame:
  """``H v`` from ``v``'s dense part and its injections ``A_u Ẇ``, ``G_u Ẇᵀ``."""
  plan = layout.plan
  uses = [u for group in plan.groups for u in group.uses]
  eps_dot = {u.rec: structured._layer_output(plan, u, y) for u, y in zip(uses, forward)}
  g_fb, g_eps, flat = problem.linear(list(dense), [eps_dot[r] for r in plan.perturbed],
                                     list(backward))
  inputs_dot, cotangents_dot = _per_group(plan, flat, g_eps)
  blocks, adot, gdot = [], [], []
  for i, factored in enumerate(layout.factored):
    if factored:
      adot.append(jnp.concatenate(inputs_dot[i], axis=-2))
      gdot.append(jnp.concatenate(cotangents_dot[i], axis=-2))
    else:  # Aᵀ Ġ + Ȧᵀ G, summed over positions and uses
      blocks.append(sum(_mm("gsc,gso->gco", a, gd) + _mm("gsc,gso->gco", ad, g)
                        for a, gd, ad, g in zip(problem.inputs[i], cotangents_dot[i],
                                                inputs_dot[i], problem.cotangents[i])))
  return _Frame(dense=tuple(g_fb), blocks=tuple(blocks), adot=tuple(adot), gdot=tuple(gdot))


def hvp(layout: Layout, problem: _Problem, v: _Frame) -> _Frame:
  """``H v`` for ``v`` in this problem's frame."""
  forward, backward = _injections(layout, problem, v)
  return _product(layout, problem, v.dense, forward, backward)


def hvp_external(layout: Layout, problem: _Problem, v0: Any) -> _Frame:
  """``H v₀`` for a :class:`LowRankVectors` or the leaves of a params-like vector."""
  return _product(layout, problem, *_external_injections(layout, problem, v0))


def _frame_dots(layout: Layout, problem: _Problem, v: _Frame, w: _Frame, theta=None):
  """``⟨v, w⟩`` and ``‖w‖²``; with ``theta``, ``‖w − θ v‖²`` from the row differences.

  Per factored group, ``⟨A Ġ_vᵀ + Ȧ_v Gᵀ, A Ġ_wᵀ + Ȧ_w Gᵀ⟩`` is a sum of Gram
  products: one ``(rows × rows)`` Gram matrix of ``[A; Ȧ_v; Ȧ_w]`` and one of
  ``[G; Ġ_v; Ġ_w]``.
  """
  if theta is not None:  # ‖A Δġᵀ + Δȧ Gᵀ‖² with Δ = w − θ v, elementwise
    diff = _frame_map(lambda a, b: a - theta * b, w, v)
    parts = [jnp.vdot(a, a) for a in diff.dense + diff.blocks]
    for a, g, aa, gg, adot, gdot in zip(*(_factored(layout, x) for x in (
        problem.a, problem.g, problem.aa, problem.gg)), diff.adot, diff.gdot):
      parts.append(jnp.sum(aa * _mm("gso,gto->gst", gdot, gdot))
                   + 2.0 * jnp.sum(_mm("gsc,gtc->gst", a, adot) * _mm("gso,gto->gst", gdot, g))
                   + jnp.sum(_mm("gsc,gtc->gst", adot, adot) * gg))
    return sum(parts[1:], parts[0])
  vw = [jnp.vdot(a, b) for a, b in zip(v.dense + v.blocks, w.dense + w.blocks)]
  ww = [jnp.vdot(b, b) for b in w.dense + w.blocks]
  for a, g, adot_v, gdot_v, adot_w, gdot_w in zip(
      _factored(layout, problem.a), _factored(layout, problem.g), v.adot, v.gdot, w.adot, w.gdot):
    s = a.shape[1]
    rows_c = jnp.concatenate([a, adot_v, adot_w], axis=1)
    rows_o = jnp.concatenate([g, gdot_v, gdot_w], axis=1)
    cc = _mm("gsc,gtc->gst", rows_c, rows_c)
    oo = _mm("gso,gto->gst", rows_o, rows_o)
    block = lambda m, i, j: m[:, i * s:(i + 1) * s, j * s:(j + 1) * s]
    # v = A Ġ_vᵀ + Ȧ_v Gᵀ (rows 0, 1), w = A Ġ_wᵀ + Ȧ_w Gᵀ (rows 0, 2).
    vw.append(jnp.sum(block(cc, 0, 0) * block(oo, 1, 2)) + jnp.sum(block(cc, 0, 2) * block(oo, 1, 0))
              + jnp.sum(block(cc, 1, 0) * block(oo, 0, 2)) + jnp.sum(block(cc, 1, 2) * block(oo, 0, 0)))
    ww.append(jnp.sum(block(cc, 0, 0) * block(oo, 2, 2)) + 2.0 * jnp.sum(block(cc, 0, 2) * block(oo, 2, 0))
              + jnp.sum(block(cc, 2, 2) * block(oo, 0, 0)))
  return sum(vw[1:], vw[0]), sum(ww[1:], ww[0])


def to_low_rank(layout: Layout, problem: _Problem, v: _Frame) -> LowRankVectors:
  """The :class:`LowRankVectors` of a vector in this problem's frame."""
  return LowRankVectors(
      dense=v.dense, blocks=v.blocks,
      left=tuple(jnp.concatenate([a, adot], axis=1)
                 for a, adot in zip(_factored(layout, problem.a), v.adot)),
      right=tuple(jnp.concatenate([gdot, g], axis=1)
                  for g, gdot in zip(_factored(layout, problem.g), v.gdot)))


def _gradient(layout: Layout, problem: _Problem) -> LowRankVectors:
  """``∇_θ f_a`` (``Ȧ = 0``, ``Ġ = G``)."""
  blocks = [sum(_mm("gsc,gso->gco", a, g) for a, g in zip(inputs, cotangents))
            for inputs, cotangents, f in zip(problem.inputs, problem.cotangents, layout.factored)
            if not f]
  return LowRankVectors(
      dense=tuple(problem.grad_dense), blocks=tuple(blocks),
      left=tuple(jnp.concatenate([a, jnp.zeros_like(a)], axis=1)
                 for a in _factored(layout, problem.a)),
      right=tuple(jnp.concatenate([g, g], axis=1) for g in _factored(layout, problem.g)))


# ------------------------------------------------------------------------ solver


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
  """Power iteration on ``H²`` in half steps (one Hessian-vector product each).

  ``phase`` 0 computes ``u = H v`` (at the very first half step ``H v₀``, from
  the start's precomputed injections); phase 1 computes ``w = H u`` and
  updates ``v``, ``theta``, ``residual``, ``iterations`` and ``converged`` as
  an iteration of power iteration on ``H²`` does.
  """
  v: _Frame
  u: _Frame
  phase: jax.Array
  theta: jax.Array
  residual: jax.Array
  iterations: jax.Array
  converged: jax.Array
  y_sq: jax.Array       # ‖·‖² of the last product (at phase 1: ‖u‖²)
  w_sq: jax.Array       # ‖w‖² of the last iteration


def _scale_low_rank(s: jax.Array, v: LowRankVectors) -> LowRankVectors:
  """``s · v``, scaling the ``Ȧ`` and ``Ġ`` rows (``A``, ``G`` rows stay as they are)."""
  def halves(a, first, second):
    r = a.shape[-2] // 2
    return jnp.concatenate([first * a[..., :r, :], second * a[..., r:, :]], axis=-2)
  return LowRankVectors(dense=tuple(s * a for a in v.dense), blocks=tuple(s * a for a in v.blocks),
                        left=tuple(halves(a, 1.0, s) for a in v.left),
                        right=tuple(halves(a, s, 1.0) for a in v.right))


def _start_scalars(layout: Layout, problem: _Problem, v0: LowRankVectors, w: _Frame):
  """``(⟨v₀, w⟩, ‖w − θ v₀‖²)`` for a factored start ``v₀`` (any problem's frame).

  Per factored group, with ``w``'s rows ``A, Ȧ, Ġ, G`` and ``v₀``'s ``A', Ȧ', Ġ', G'``:
  ``w − θ v₀ = A (Ġ − θĠ')ᵀ + (Ȧ − θȦ') Gᵀ − θ (A' − A) Ġ'ᵀ − θ Ȧ' (G' − G)ᵀ``,
  differences taken elementwise, so no large terms cancel.
  """
  w_rows = to_low_rank(layout, problem, w)
  vw = [jnp.vdot(a, b) for a, b in zip(v0.dense + v0.blocks, w.dense + w.blocks)]
  for l0, r0, l1, r1 in zip(v0.left, v0.right, w_rows.left, w_rows.right):
    vw.append(jnp.sum(_mm("grc,gqc->grq", l0, l1) * _mm("gro,gqo->grq", r0, r1)))
  theta = sum(vw[1:], vw[0])
  res = [jnp.sum(jnp.square(b - theta * a)) for a, b in zip(v0.dense + v0.blocks,
                                                           w.dense + w.blocks)]
  for l0, r0, l1, r1 in zip(v0.left, v0.right, w_rows.left, w_rows.right):
    s = l0.shape[-2] // 2
    (a0, ad0), (gd0, g0) = (l0[:, :s], l0[:, s:]), (r0[:, :s], r0[:, s:])
    (a1, ad1), (gd1, g1) = (l1[:, :s], l1[:, s:]), (r1[:, :s], r1[:, s:])
    left = jnp.concatenate([a1, ad1 - theta * ad0, a0 - a1, ad0], axis=1)
    right = jnp.concatenate([gd1 - theta * gd0, g1, -theta * gd0, -theta * (g0 - g1)], axis=1)
    res.append(jnp.sum(_mm("grc,gqc->grq", left, left) * _mm("gro,gqo->grq", right, right)))
  return theta, sum(res[1:], res[0])


def iterate(layout: Layout, problem: _Problem, v0: Any, num_iters: int, tol: float) -> State:
  """Power iteration on ``H²`` from ``v0`` (normalised first, as power iteration does).

  The first half step applies ``H`` to ``v₀`` through its precomputed
  injections; the first iteration's ``θ`` and residual compare with ``v₀``:
  exactly (:func:`_start_scalars`) for a :class:`LowRankVectors`, and for a
  params-like ``v₀`` as ``θ = ‖u‖²``, ``‖w‖² − 2θ² + θ²‖v₀‖²`` (which loses
  accuracy only when the start is already converged to ``√ε``).
  """
  factored = isinstance(v0, LowRankVectors)
  sq = _sq_norm(v0) if factored else sum(jnp.vdot(a, a) for a in v0)
  inv = 1.0 / jnp.where(sq > 0, jnp.sqrt(sq), 1.0)
  if factored:
    v0 = _scale_low_rank(inv, v0)
    start_dense, start_fwd, start_bwd = _external_injections(layout, problem, v0)
  else:
    v0 = [a * inv for a in v0]
    start_dense, start_fwd, start_bwd = _external_injections(layout, problem, v0)
  v0_sq = sq * inv * inv
  zero_frame = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: hvp_external(layout, problem, v0)))
  zero = jnp.zeros((), v0_sq.dtype)

  def cond(s):
    return jnp.logical_and(~s.converged, s.iterations < num_iters)

  def body(s):
    first = s.iterations == 0
    z = _frame_map(lambda a, b: jnp.where(s.phase == 0, a, b), s.v, s.u)
    forward, backward = _injections(layout, problem, z)
    at_start = first & (s.phase == 0)
    pick = lambda a, b: jnp.where(at_start, a, b)
    y = _product(layout, problem, jax.tree.map(pick, start_dense, list(z.dense)),
                 jax.tree.map(pick, start_fwd, forward), jax.tree.map(pick, start_bwd, backward))
    vw, y_sq = _frame_dots(layout, problem, s.v, y)
    if factored:
      theta_0, residual_sq_0 = _start_scalars(layout, problem, v0, y)
    else:  # ⟨v₀, H u⟩ = ‖u‖²
      theta_0 = s.y_sq
      residual_sq_0 = y_sq - 2.0 * theta_0 * theta_0 + theta_0 * theta_0 * v0_sq
    theta = jnp.where(first, theta_0, vw)
    residual_sq = jnp.where(first, residual_sq_0, _frame_dots(layout, problem, s.v, y, theta))
    residual = jnp.sqrt(jnp.maximum(residual_sq, 0.0))
    norm = jnp.sqrt(jnp.maximum(y_sq, 0.0))
    step = (s.phase == 1) & (norm > 0)
    unit = 1.0 / jnp.where(norm > 0, norm, 1.0)
    done = s.phase == 1
    keep = lambda new, old: jnp.where(done, new, old)
    return State(v=_frame_map(lambda a, b: jnp.where(step, a * unit, b), y, s.v),
                 u=_frame_map(lambda a, b: jnp.where(done, a, b), s.u, y),
                 phase=1 - s.phase, theta=keep(theta, s.theta),
                 residual=keep(residual, s.residual),
                 iterations=s.iterations + done.astype(jnp.int32),
                 converged=keep(residual <= tol * jnp.abs(theta), s.converged),
                 y_sq=y_sq, w_sq=keep(y_sq, s.w_sq))

  init = State(v=zero_frame, u=zero_frame, phase=jnp.zeros((), jnp.int32), theta=zero,
               residual=zero, iterations=jnp.zeros((), jnp.int32),
               converged=jnp.zeros((), bool), y_sq=zero, w_sq=zero)
  return lax.while_loop(cond, body, init)


def solve(layout: Layout, params: PyTree, xi: PyTree, output: jax.Array, v0: Any, *,
          num_iters: int, tol: float):
  """One eigenproblem (unbatched; ``vmap`` it) from ``v0``: ``(θ, v, iterations,
  converged, kept)``, ``θ`` estimating ``λ_max(H²)``, ``v`` a :class:`LowRankVectors`.

  ``v0`` is a :class:`LowRankVectors` or the leaves of a params-like vector.
  ``kept`` flags ``H² v₀ = 0``: power iteration then keeps ``v₀``; ``v`` is
  ``v₀`` for a ``LowRankVectors`` and the unit gradient otherwise (a caller
  with dense vectors puts ``v₀`` back).
  """
  param_vals = jax.tree.leaves(params)
  x_leaves = [a[None] for a in jax.tree.leaves(xi)]
  problem = linearize(layout, param_vals, x_leaves, output)
  state = iterate(layout, problem, v0, num_iters, tol)
  kept = (state.iterations == 1) & (state.w_sq == 0)
  v = to_low_rank(layout, problem, state.v)
  if isinstance(v0, LowRankVectors):
    fallback = v0
  else:
    gradient = _gradient(layout, problem)
    fallback = jax.tree.map(lambda a: a / jnp.sqrt(jnp.maximum(_sq_norm(gradient), 1e-30)),
                            gradient)
  v = jax.tree.map(lambda a, b: jnp.where(kept, a, b), fallback, v)
  return state.theta, v, state.iterations, state.converged, kept


def bytes_per_problem(layout: Layout, params: PyTree) -> int:
  """Rough peak bytes of one eigenproblem: solver vectors and the linearisation."""
  graph = layout.plan.graph
  activations = sum(math.prod(graph.shapes[out]) for rec in graph.records for out in rec.outs)
  itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
  return itemsize * (8 * vector_size(layout, params) + 4 * activations)
