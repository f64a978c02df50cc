"""Kernel assembly and batch sizing for the structured NTK.

Each structured layer contributes ``Σ_g Σ_{s,t} (A1[i,g,s]·A2[j,g,t])
(G1[i,a,g,s]·G2[j,b,g,t])`` (:func:`layer_kernel`, in the cheaper of the Gram
and the layer-Jacobian order); the fallback leaves add their Jacobian
contraction.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from ntk_diag import _jacobians
from ntk_diag.structured import evaluate
from ntk_diag.structured import plan as plan_lib
from ntk_diag.structured.plan import Plan

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST
# Largest `(n1, n2, k, k, g, S, S)` intermediate (elements) the Gram order may form.
_MAX_GRAM_ELEMENTS = 1 << 27


def gram_order(n1, n2, k, g, s1, s2, c, o, trace_outputs: bool) -> bool:
  """Whether ``(A1 A2ᵀ) ⊙ (G1 G2ᵀ)`` is cheaper than contracting layer Jacobians."""
  kk = k if trace_outputs else k * k
  gram_flops = n1 * n2 * g * s1 * s2 * (c + kk * o)
  jac_flops = (n1 * s1 + n2 * s2) * k * g * c * o + n1 * n2 * kk * g * c * o
  return gram_flops <= jac_flops and n1 * n2 * kk * g * s1 * s2 <= _MAX_GRAM_ELEMENTS


def layer_kernel(a1, g1, a2, g2, trace_outputs: bool) -> jax.Array:
  """``Σ_g Σ_{s,t} (A1[i,g,s]·A2[j,g,t]) (G1[i,a,g,s]·G2[j,b,g,t])`` in the cheaper order.

  Returns ``(n1, n2)`` if ``trace_outputs``, else ``(n1, k, n2, k)`` (axes ``i, a, j, b``:
  the natural output of the ``G1 G2ᵀ`` matmul; the caller transposes once).
  """
  n1, k, g, s1, o = g1.shape
  n2, s2, c = g2.shape[0], g2.shape[3], a1.shape[-1]
  if gram_order(n1, n2, k, g, s1, s2, c, o, trace_outputs):
    if g * s1 * s2 == 1:  # Dense on vectors: two matmuls and a Hadamard product
      aa = jnp.matmul(a1[:, 0, 0], a2[:, 0, 0].T, precision=_HIGHEST)
      if trace_outputs:
        gg = jnp.matmul(g1.reshape(n1, k * o), g2.reshape(n2, k * o).T, precision=_HIGHEST)
        return aa * gg
      gg = jnp.matmul(g1.reshape(n1 * k, o), g2.reshape(n2 * k, o).T, precision=_HIGHEST)
      return gg.reshape(n1, k, n2, k) * aa[:, None, :, None]
    aa = jnp.einsum("igsc,jgtc->ijgst", a1, a2, precision=_HIGHEST)
    if trace_outputs:
      gg = jnp.einsum("iagso,jagto->ijgst", g1, g2, precision=_HIGHEST)
      return jnp.sum(aa * gg, axis=(2, 3, 4))
    gg = jnp.einsum("iagso,jbgto->iajbgst", g1, g2, precision=_HIGHEST)
    return jnp.einsum("ijgst,iajbgst->iajb", aa, gg, precision=_HIGHEST)
  j1 = jnp.einsum("igsc,iagso->iagco", a1, g1, precision=_HIGHEST)
  j2 = j1 if a2 is a1 and g2 is g1 else jnp.einsum("igsc,iagso->iagco", a2, g2,
                                                    precision=_HIGHEST)
  spec = "iagco,jagco->ij" if trace_outputs else "iagco,jbgco->iajb"
  return jnp.einsum(spec, j1, j2, precision=_HIGHEST)


def _structured_block(plan: Plan, params: PyTree, x1: PyTree, x2: PyTree,
                      trace_outputs: bool) -> jax.Array:
  stats1 = evaluate.example_stats(plan, params, x1)
  stats2 = stats1 if x2 is x1 else evaluate.example_stats(plan, params, x2)
  return _kernel_from_stats(plan, stats1, stats2, trace_outputs)


def _kernel_from_stats(plan: Plan, stats1, stats2, trace_outputs: bool) -> jax.Array:
  (a1, g1, jf1), (a2, g2, jf2) = stats1, stats2
  parts = [layer_kernel(*args, trace_outputs) for args in zip(a1, g1, a2, g2)]
  if plan.fallback:
    parts.append(_jacobians.contract_jacobians(jf1, jf2, trace_outputs, output_axes="iajb"))
  kernel = sum(parts[1:], parts[0])
  return kernel if trace_outputs else jnp.transpose(kernel, (0, 2, 1, 3))


def _diagonal_from_stats(plan: Plan, stats, count: int) -> jax.Array:
  """``K[i, i]`` of the first ``count`` examples, ``(count, k, k)``: each example's
  layer terms in their cheaper order (:func:`layer_kernel` on a block of one)."""
  first = jax.tree.map(lambda a: a[:count, None], stats)
  one = lambda stats_i: _kernel_from_stats(plan, stats_i, stats_i, False)[0, 0]
  return jax.vmap(one)(first)


def kernel_and_diagonal(plan: Plan, params: PyTree, x: PyTree, trace_outputs: bool,
                        count: int) -> tuple[jax.Array, jax.Array]:
  """The structured kernel of ``x`` and the ``(count, k, k)`` blocks ``K[i, i]`` of its
  first ``count`` examples, from one set of per-example layer inputs and cotangents."""
  stats = evaluate.example_stats(plan, params, x)
  return (_kernel_from_stats(plan, stats, stats, trace_outputs),
          _diagonal_from_stats(plan, stats, count))


def kernel_block_fn(plan: Plan | None, apply_fn: Callable, params: PyTree,
                    trace_outputs: bool) -> Callable:
  """``block_fn(x1, x2)`` computing the structured kernel of a block by ``plan``
  (by Jacobian contraction when ``plan`` is None).

  Returns ``(b1, b2, k, k)``, or ``(b1, b2)`` with ``trace_outputs``.
  """
  def block_fn(x1, x2):
    if plan is None:
      return _jacobians.jacobian_block(apply_fn, params, x1, x2, trace_outputs=trace_outputs)
    return _structured_block(plan, params, x1, x2, trace_outputs)

  return block_fn


def choose_batch_size(plan: Plan, n1: int, n2: int, k: int, trace_outputs: bool,
                      itemsize: int, budget_bytes: int) -> int:
  """Largest block of examples whose estimated structured peak memory fits the budget.

  Counts, per example, the layer inputs and ``k`` cotangents of every structured
  layer, the fallback Jacobians and ``k`` cotangents of every intermediate, plus
  each layer's Gram products (per pair of examples) or Jacobians (per example),
  whichever :func:`layer_kernel` will form, and the kernel block itself.
  """
  graph = plan.graph
  size = lambda key: math.prod(graph.shapes[key])
  per_example = k * sum(size(graph.param_keys[leaf]) for leaf in plan.fallback)
  per_example += (1 + k) * sum(size(out) for rec in graph.records for out in rec.outs)
  kk = k if trace_outputs else k * k
  dims = [plan_lib.group_dims(graph, group) for group in plan.groups]
  per_example += sum(g * s * (c + k * o) for g, s, c, o in dims)

  def fits(b):
    peak = 2 * b * per_example + 2 * b * b * kk
    for g, s, c, o in dims:
      if gram_order(b, b, k, g, s, s, c, o, trace_outputs):
        peak += b * b * (kk + 1) * g * s * s
      else:
        peak += 2 * b * k * g * c * o
    return peak * itemsize <= budget_bytes

  n = max(n1, n2)
  if fits(n):
    return n
  lo, hi = 1, n  # fits(lo) assumed; the smallest block is always allowed
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo
