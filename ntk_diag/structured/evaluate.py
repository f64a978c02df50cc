"""Evaluation for the structured NTK: the traced graph run on one example.

:func:`forward` replays the records with the fallback leaves and zero output
perturbations of the structured layers as arguments, and returns each layer
use's input in canonical ``(g, s, c)`` layout; :func:`example_stats` differentiates
it (``k`` VJPs per example, vmapped over examples, so examples never mix) for
the per-example layer inputs ``A``, layer cotangents ``G`` and fallback Jacobians;
:func:`model_by_patches` is the model replayed the same way, convolutions as
products on their patches, for the operators of solver loops.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag.structured.graph import Graph, Lit, Rec
from ntk_diag.structured.plan import Plan, Use, conv_layout, dot_layout, has_conv, plan_or_none

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST


def _read(env, atom):
  return atom.val if isinstance(atom, Lit) else env[atom]


def _layer_input(rec: Rec, use: Use, vals: list, shapes: dict) -> jax.Array:
  """Layer input of one example in canonical ``(g, s, c)`` layout (+ ones column)."""
  if use.kind == "dot":
    layout = dot_layout(rec, use.operand, shapes)
    perm, shape = layout.act_perm, layout.act_shape
    a = jnp.transpose(vals[1 - use.operand], perm).reshape(shape)
  else:
    g, s, c, _ = conv_layout(rec, shapes)
    a = jnp.swapaxes(_patches(rec, vals[0], vals[1].shape, shapes).reshape(s, g, c), 0, 1)
  if use.bias:
    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  return a


def _patches(rec: Rec, lhs: jax.Array, rhs_shape: tuple, shapes: dict) -> jax.Array:
  """``(s, C·window)`` patches of a conv's input, positions in the output's axis order and
  features channel-major (as ``lax.conv_general_dilated_patches``), by strided slices: no
  arithmetic, so the patches and their transpose cost memory moves only."""
  p = rec.params
  dn = p["dimension_numbers"]
  nsp = len(dn.lhs_spec) - 2
  x = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  zero = jnp.zeros((), x.dtype)
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], p["lhs_dilation"])]
  x = lax.pad(x, zero, config + [(0, 0, 0)])
  out_shape = shapes[rec.outs[0]]
  out_sp = [out_shape[d] for d in dn.out_spec[2:]]
  window = [rhs_shape[d] for d in dn.rhs_spec[2:]]
  slices = []
  for offset in np.ndindex(*window):
    start = [0] + [o * d for o, d in zip(offset, p["rhs_dilation"])] + [0]
    limit = ([x.shape[0]] + [st + (n - 1) * stride + 1 for st, n, stride in
                             zip(start[1:-1], out_sp, p["window_strides"])] + [x.shape[-1]])
    slices.append(lax.slice(x, start, limit, [1] + list(p["window_strides"]) + [1]))
  patches = jnp.stack(slices, axis=-1)  # (N, *out spatial, C, window)
  patches = patches.reshape(patches.shape[:-2] + (-1,))
  # (N, *spatial) in the output array's axis order (the feature axis left out).
  source = {dn.out_spec[0]: 0, **{d: 1 + i for i, d in enumerate(dn.out_spec[2:])}}
  order = [source[d] for d in range(nsp + 2) if d != dn.out_spec[1]]
  return jnp.transpose(patches, order + [nsp + 1]).reshape(-1, patches.shape[-1])


def layer_cotangent(plan: Plan, use: Use, cot: jax.Array) -> jax.Array:
  """``(k, *out)`` cotangent of a layer output -> canonical ``(k, g, s, o)``."""
  rec = plan.graph.records[use.rec]
  if use.kind == "dot":
    layout = dot_layout(rec, use.operand, plan.graph.shapes)
    out_perm, shape = layout.out_perm, layout.out_shape
    return jnp.transpose(cot, (0,) + tuple(d + 1 for d in out_perm)).reshape((-1,) + shape)
  dn = rec.params["dimension_numbers"]
  g, s, _, o = conv_layout(rec, plan.graph.shapes)
  cot = jnp.moveaxis(cot, dn.out_spec[1] + 1, -1).reshape(cot.shape[0], s, g, o)
  return jnp.swapaxes(cot, 1, 2)


def layer_output(plan: Plan, use: Use, y: jax.Array) -> jax.Array:
  """Canonical ``(g, s, o)`` -> the layer output's own layout (inverse of :func:`layer_cotangent`)."""
  graph = plan.graph
  rec = graph.records[use.rec]
  out_shape = graph.shapes[rec.outs[0]]
  if use.kind == "dot":
    out_perm = dot_layout(rec, use.operand, graph.shapes).out_perm
    y = y.reshape(tuple(out_shape[d] for d in out_perm))
    return jnp.transpose(y, np.argsort(out_perm))
  feature = rec.params["dimension_numbers"].out_spec[1]
  moved = tuple(d for i, d in enumerate(out_shape) if i != feature) + (out_shape[feature],)
  return jnp.moveaxis(jnp.swapaxes(y, 0, 1).reshape(moved), -1, feature)


def use_positions(graph: Graph, use: Use) -> int:
  """Positions ``s`` of one use (the ``S`` axis of its canonical layouts)."""
  rec = graph.records[use.rec]
  if use.kind == "dot":
    return dot_layout(rec, use.operand, graph.shapes).act_shape[1]
  return conv_layout(rec, graph.shapes)[1]


def permute(flat: jax.Array, index: np.ndarray) -> jax.Array:
  """``flat[index]`` for a static index array; a reshape when ``index`` is the identity."""
  if np.array_equal(index.reshape(-1), np.arange(index.size)):
    return flat.reshape(index.shape)
  return flat[index]


def _conv_by_patches(plan: Plan, use: Use, a: jax.Array, kernel: jax.Array) -> jax.Array:
  """A conv's output from its canonical patches ``a``: ``a W`` with ``W`` in ``(g, c, o)``."""
  w = permute(kernel.reshape(-1), use.index)
  y = jnp.einsum("gsc,gco->gso", a[..., :w.shape[1]], w.astype(a.dtype), precision=_HIGHEST)
  return layer_output(plan, use, y)


def forward(plan: Plan, param_vals: list, fb_vals: list, eps: list, x_leaves: list,
             conv_by_patches: bool = False):
  """One example through the graph: ``(outputs (k,), layer inputs per use)``.

  ``conv_by_patches``: structured convs are evaluated as matrix products on
  their patches (which are formed anyway), so their derivatives are matrix
  products too (no transposed or per-example-kernel convolutions).
  """
  graph = plan.graph
  env = dict(graph.consts)
  vals = list(param_vals)
  for leaf, v in zip(plan.fallback, fb_vals):
    vals[leaf] = v
  env.update(zip(graph.param_keys, vals))
  env.update(zip(graph.x_keys, x_leaves))
  eps_of = dict(zip(plan.perturbed, eps))
  uses_of = {}
  for gi, group in enumerate(plan.groups):
    for ui, use in enumerate(group.uses):
      uses_of.setdefault(use.rec, []).append((gi, ui, use))
  inputs = {}
  for r, rec in enumerate(graph.records):
    ins = [_read(env, a) for a in rec.ins]
    for gi, ui, use in uses_of.get(r, ()):
      inputs[(gi, ui)] = _layer_input(rec, use, ins, graph.shapes)
    conv = [(gi, ui, u) for gi, ui, u in uses_of.get(r, ()) if u.kind == "conv"]
    if conv_by_patches and conv:
      gi, ui, use = conv[0]
      out = _conv_by_patches(plan, use, inputs[(gi, ui)], ins[1]).astype(
          jnp.result_type(*ins))
    else:
      out = rec.prim.bind(*ins, **rec.prim.get_bind_params(rec.params))
    outs = out if rec.prim.multiple_results else [out]
    if r in eps_of:
      outs = [outs[0] + eps_of[r].astype(outs[0].dtype)]
    env.update(zip(rec.outs, outs))
  layer_inputs = [[inputs[(gi, ui)] for ui in range(len(g.uses))]
                  for gi, g in enumerate(plan.groups)]
  return jnp.reshape(_read(env, graph.out_key), (-1,)), layer_inputs


def forward_arguments(plan: Plan, params: PyTree) -> tuple[list, list, list]:
  """``(param_vals, fb_vals, eps)`` for :func:`forward` at ``params``: every leaf, the
  fallback leaves, and zero perturbations of the perturbed records' outputs."""
  param_vals = jax.tree.leaves(params)
  dtype = jnp.result_type(*param_vals)
  eps = [jnp.zeros(plan.graph.shapes[plan.graph.records[r].outs[0]], dtype)
         for r in plan.perturbed]
  return param_vals, [param_vals[leaf] for leaf in plan.fallback], eps


def example_stats(plan: Plan, params: PyTree, x: PyTree):
  """Per-example layer inputs, layer cotangents and fallback Jacobians of a batch."""
  param_vals, fb_vals, eps0 = forward_arguments(plan, params)
  dtype = jnp.result_type(*param_vals)

  def one(xi):
    xi = [a[None] for a in jax.tree.leaves(xi)]
    fn = lambda fb, eps: forward(plan, param_vals, fb, eps, xi)
    (jac_fb, jac_eps), layer_inputs = jax.jacrev(fn, argnums=(0, 1), has_aux=True)(fb_vals, eps0)
    return jac_fb, jac_eps, layer_inputs

  jac_fb, jac_eps, layer_inputs = jax.vmap(one)(x)
  cot_of = dict(zip(plan.perturbed, jac_eps))
  a_list, g_list = [], []
  for gi, group in enumerate(plan.groups):
    a_list.append(jnp.concatenate(layer_inputs[gi], axis=2).astype(dtype))  # (n, g, S, c)
    cots = [jax.vmap(lambda c, u=u: layer_cotangent(plan, u, c))(cot_of[u.rec])
            for u in group.uses]
    g_list.append(jnp.concatenate(cots, axis=3).astype(dtype))  # (n, k, g, S, o)
  return a_list, g_list, jac_fb


def apply_by_patches(plan: Plan, params: PyTree, x: PyTree, out_shape: tuple) -> jax.Array:
  """The model's outputs ``(n, *out_shape)`` on a batch, replayed from ``plan``'s graph one
  example at a time (vmapped) with the structured convolutions as products on their patches.

  Same values as the model; its derivatives are matrix products, where those of a
  convolution are transposed convolutions, which XLA:CPU runs about 10x slower inside a
  loop body than at the top level (80 vs 7 ms per Hessian-vector product of the
  benchmark CNN, measured).
  """
  param_vals, fb_vals, eps = forward_arguments(plan, params)

  def one(xi):
    out, _ = forward(plan, param_vals, fb_vals, eps, [a[None] for a in jax.tree.leaves(xi)],
                     conv_by_patches=True)
    return out.reshape(out_shape)

  return jax.vmap(one)(x)


def model_by_patches(apply_fn: Callable, params: PyTree, x: PyTree) -> Callable:
  """``apply_fn`` as :func:`apply_by_patches` evaluates it, for batches shaped like ``x``;
  ``apply_fn`` itself when it has no structured convolution (or cannot be traced).

  For operators applied inside solver loops (Hessian-vector products, JVPs);
  the model must act on each example alone, as everywhere in this package.
  """
  plan = plan_or_none(apply_fn, params, x)
  if not has_conv(plan):
    return apply_fn
  out_shape = tuple(jax.eval_shape(apply_fn, params, x).shape[1:])
  return lambda p, xb: apply_by_patches(plan, p, xb, out_shape)
