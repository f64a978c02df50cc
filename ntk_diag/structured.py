"""Structured NTK: kernels from layer structure instead of per-example Jacobians.

For a Dense layer ``y = A W + b`` with inputs ``A`` (``n × c``) and output
cotangents ``G_a`` (``n × o``, the VJP of network output ``a`` w.r.t. ``y``), the
layer's contribution to the kernel is

``K_W[i, j, a, b] = (A_i · A_j) (G_{i,a} · G_{j,b})``,  ``K_b = G_{i,a} · G_{j,b}``,

so no per-example Jacobian is formed (Novak et al. 2022, "Fast Finite Width
Neural Tangent Kernel", structured derivatives). A layer applied over positions
``s`` (sequences, conv patches via ``lax.conv_general_dilated_patches``, weight
sharing across calls) sums over pairs of positions,
``K[i, j, a, b] = Σ_{s,t} (A_{i,s} · A_{j,t}) (G_{i,a,s} · G_{j,b,t})``, or — when
cheaper — forms the layer's Jacobian ``Σ_s A_{i,s} ⊗ G_{i,a,s}`` first.

The model is traced to a jaxpr; ``dot_general``/``conv_general_dilated``
equations with a parameter leaf (through reshapes/transposes/casts) as one
operand are recognised, and a bias added right after such an equation is folded
in as a column of ones. Every other parameter leaf (embeddings, norms, leaves
also used elsewhere) falls back to its per-example Jacobian, obtained in the
same backward passes, so the kernel is exact for any ``apply_fn``. The cotangents
come from ``k`` VJPs per example, vmapped over examples, so examples never mix.
If the analysis fails the whole kernel falls back to the Jacobian contraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST
# Primitives that re-index a parameter without changing its values.
_VIEW_PRIMS = frozenset({"reshape", "transpose", "broadcast_in_dim", "convert_element_type",
                         "copy", "copy_p", "squeeze"})
# Call primitives whose body is inlined (same values, no custom derivative rule).
_INLINE_PRIMS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})
_ADD_PRIMS = frozenset({"add", "add_any"})


# --------------------------------------------------------------------------- graph


@dataclasses.dataclass(frozen=True)
class _Lit:
  val: Any


@dataclasses.dataclass
class _Rec:
  """One primitive application of the inlined jaxpr; atoms are int keys or `_Lit`."""
  prim: Any
  params: dict
  ins: list
  outs: list


@dataclasses.dataclass
class _Graph:
  records: list
  consts: dict          # key -> value
  param_keys: list      # key of each parameter leaf
  x_keys: list          # key of each input leaf
  out_key: Any          # key (or _Lit) of the single output
  shapes: dict          # key -> per-example shape (batch of 1)


def _trace(apply_fn: Callable, params: PyTree, x: PyTree) -> _Graph:
  """Inlined jaxpr of ``apply_fn`` on one example (batch axis of size 1)."""
  p_leaves, p_def = jax.tree.flatten(params)
  x_leaves, x_def = jax.tree.flatten(x)
  num_p = len(p_leaves)

  def flat_fn(*args):
    out = apply_fn(jax.tree.unflatten(p_def, args[:num_p]),
                   jax.tree.unflatten(x_def, args[num_p:]))
    return jnp.reshape(out, (-1,))

  specs = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in p_leaves]
  specs += [jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), jnp.result_type(a))
            for a in x_leaves]
  closed = jax.make_jaxpr(flat_fn)(*specs)

  records, consts, shapes = [], {}, {}
  counter = iter(range(1 << 62))

  def fresh(var):
    key = next(counter)
    shapes[key] = tuple(var.aval.shape)
    return key

  def inline(jaxpr, const_vals, in_atoms):
    env = {}

    def read(v):
      return _Lit(v.val) if isinstance(v, jex_core.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, const_vals):
      env[v] = key = fresh(v)
      consts[key] = val
    for v, atom in zip(jaxpr.invars, in_atoms):
      env[v] = atom
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if name in _INLINE_PRIMS and sub is not None:
        if isinstance(sub, jex_core.ClosedJaxpr):
          outs = inline(sub.jaxpr, sub.consts, ins)
        else:
          outs = inline(sub, [], ins)
      else:
        outs = [fresh(v) for v in eqn.outvars]
        records.append(_Rec(eqn.primitive, dict(eqn.params), ins, outs))
      for v, atom in zip(eqn.outvars, outs):
        env[v] = atom
    return [read(v) for v in jaxpr.outvars]

  in_keys = [fresh(v) for v in closed.jaxpr.invars]
  (out,) = inline(closed.jaxpr, closed.consts, in_keys)
  return _Graph(records, consts, in_keys[:num_p], in_keys[num_p:], out, shapes)


# ------------------------------------------------------------------------ analysis


@dataclasses.dataclass
class _Use:
  """A parameter leaf consumed as one operand of a bilinear layer equation."""
  rec: int              # record index of the dot_general / conv
  operand: int          # which operand holds the parameter view
  kind: str             # "dot" or "conv"
  index: np.ndarray     # leaf index of each element in canonical (g, c, o) layout
  bias: bool = False    # a bias leaf is folded in as a ones column


@dataclasses.dataclass
class _Group:
  leaf: int
  uses: list
  bias_leaf: int | None = None
  bias_index: np.ndarray | None = None  # bias leaf index of each output unit ``o``


@dataclasses.dataclass
class _Plan:
  graph: _Graph
  groups: list          # structured weight leaves
  fallback: list        # leaf indices handled by per-example Jacobians
  perturbed: list       # record indices whose output gets a zero perturbation


def _view_index(rec: _Rec, idx: np.ndarray) -> np.ndarray | None:
  """Apply a view primitive to an array of leaf indices (None if unsupported)."""
  name, p = rec.prim.name, rec.params
  if name == "reshape":
    if p.get("dimensions") is not None:
      return None
    return idx.reshape(p["new_sizes"])
  if name == "transpose":
    return np.transpose(idx, p["permutation"])
  if name == "broadcast_in_dim":
    shape = tuple(p["shape"])
    expanded = [1] * len(shape)
    for src, dst in enumerate(p["broadcast_dimensions"]):
      expanded[dst] = idx.shape[src]
    return np.broadcast_to(idx.reshape(expanded), shape)
  if name == "squeeze":
    return np.squeeze(idx, axis=tuple(p["dimensions"]))
  if name in ("convert_element_type", "copy", "copy_p"):
    if name == "convert_element_type" and not jnp.issubdtype(p["new_dtype"], jnp.floating):
      return None
    return idx
  return None


def _dot_layout(rec: _Rec, operand: int, shapes: dict):
  """Canonical layouts of a dot_general with the parameter at ``operand``.

  Returns ``(act_perm, act_shape, out_perm, out_shape, w_perm, w_shape)``:
  the activation is transposed by ``act_perm`` and reshaped to ``(g, s, c)``,
  the output to ``(g, s, o)`` and the parameter operand to ``(g, c, o)``.
  """
  (lc, rc), (lb, rb) = rec.params["dimension_numbers"]
  contract = (tuple(lc), tuple(rc))
  batch = (tuple(lb), tuple(rb))
  a = 1 - operand
  a_shape = shapes[rec.ins[a]]
  w_shape = shapes[rec.ins[operand]]
  a_c, w_c = contract[a], contract[operand]
  a_b, w_b = batch[a], batch[operand]
  a_f = tuple(d for d in range(len(a_shape)) if d not in a_c and d not in a_b)
  w_f = tuple(d for d in range(len(w_shape)) if d not in w_c and d not in w_b)
  g = math.prod(a_shape[d] for d in a_b)
  s = math.prod(a_shape[d] for d in a_f)
  c = math.prod(a_shape[d] for d in a_c)
  o = math.prod(w_shape[d] for d in w_f)
  nb = len(a_b)
  # Output dims: batch, lhs free, rhs free.
  if operand == 1:
    out_perm = tuple(range(nb + len(a_f) + len(w_f)))
  else:
    out_perm = (tuple(range(nb)) + tuple(range(nb + len(w_f), nb + len(w_f) + len(a_f)))
                + tuple(range(nb, nb + len(w_f))))
  return (a_b + a_f + a_c, (g, s, c), out_perm, (g, s, o), w_b + w_c + w_f, (g, c, o))


def _conv_layout(rec: _Rec, shapes: dict):
  """Canonical layouts of a conv: patches ``(g, s, c)``, output ``(g, s, o)``, kernel ``(g, c, o)``."""
  p = rec.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = p["feature_group_count"]
  out_shape = shapes[rec.outs[0]]
  w_shape = shapes[rec.ins[1]]
  s = math.prod(out_shape[d] for d in range(len(out_shape)) if d != out_spec[1])
  cout, cin = w_shape[rhs_spec[0]], w_shape[rhs_spec[1]]
  win = math.prod(w_shape[d] for d in rhs_spec[2:])
  return groups, s, cin * win, cout // groups


def _conv_kernel_index(rec: _Rec, idx: np.ndarray) -> np.ndarray:
  """Kernel leaf indices in the patch layout ``(g, cin/g · window, cout/g)``."""
  dn = rec.params["dimension_numbers"]
  groups = rec.params["feature_group_count"]
  idx = np.transpose(idx, dn.rhs_spec)  # (O, I, *spatial)
  cout = idx.shape[0]
  idx = idx.reshape((groups, cout // groups) + idx.shape[1:])
  idx = np.moveaxis(idx, 1, -1)  # (g, I, *spatial, O/g)
  return idx.reshape(groups, -1, cout // groups)


def _analyse(graph: _Graph) -> _Plan:
  """Classify every parameter leaf: structured weight, folded bias, or fallback.

  Each leaf is followed through view primitives (tracking which leaf element sits
  where as an index array). A leaf is structured when every use is a bijective
  view feeding a ``dot_general`` (either operand) or a conv kernel, all in the same
  layout; a bias leaf is folded when every use is ``add``-ed to the sole consumer
  of one such layer output and broadcast over positions. Anything else falls back.
  """
  num_leaves = len(graph.param_keys)
  # key -> (leaf, index array in that key's layout)
  views = {}
  for leaf, key in enumerate(graph.param_keys):
    views[key] = (leaf, np.arange(math.prod(graph.shapes[key])).reshape(graph.shapes[key]))
  consumers = {}
  for r, rec in enumerate(graph.records):
    for pos, atom in enumerate(rec.ins):
      if not isinstance(atom, _Lit):
        consumers.setdefault(atom, []).append((r, pos))
  bad = set()
  weight_uses = {leaf: [] for leaf in range(num_leaves)}
  # (add record, position of the other operand, leaf indices of the added view)
  bias_uses = {leaf: [] for leaf in range(num_leaves)}
  if not isinstance(graph.out_key, _Lit) and graph.out_key in views:
    bad.add(views[graph.out_key][0])

  for r, rec in enumerate(graph.records):
    name = rec.prim.name
    view_ins = [(pos, views[a]) for pos, a in enumerate(rec.ins)
                if not isinstance(a, _Lit) and a in views]
    if not view_ins:
      continue
    if name in _VIEW_PRIMS and len(rec.ins) == 1:
      leaf, idx = view_ins[0][1]
      new = _view_index(rec, idx)
      if new is None:
        bad.add(leaf)
      else:
        views[rec.outs[0]] = (leaf, new)
        if rec.outs[0] == graph.out_key:
          bad.add(leaf)
      continue
    for pos, (leaf, idx) in view_ins:
      bijective = idx.size == math.prod(graph.shapes[graph.param_keys[leaf]])
      if name == "dot_general" and bijective:
        layout = _dot_layout(rec, pos, graph.shapes)
        w_perm, w_shape = layout[4], layout[5]
        weight_uses[leaf].append(
            _Use(r, pos, "dot", np.transpose(idx, w_perm).reshape(w_shape)))
      elif (name == "conv_general_dilated" and bijective and pos == 1
            and rec.params["batch_group_count"] == 1):
        weight_uses[leaf].append(_Use(r, pos, "conv", _conv_kernel_index(rec, idx)))
      elif name in _ADD_PRIMS and len(view_ins) == 1:
        bias_uses[leaf].append((r, 1 - pos, idx))
      else:
        bad.add(leaf)

  # Records that produce layer outputs and who consumes them.
  layer_of = {}
  for leaf, uses in weight_uses.items():
    for u in uses:
      layer_of.setdefault(graph.records[u.rec].outs[0], []).append((leaf, u))

  groups = {}
  for leaf in range(num_leaves):
    uses = weight_uses[leaf]
    if leaf in bad or bias_uses[leaf] or not uses:
      continue
    if any(not np.array_equal(u.index, uses[0].index) for u in uses):
      continue
    groups[leaf] = _Group(leaf, uses)

  # Fold biases: `add(y, view(b))` right after the layer's equation.
  for leaf in range(num_leaves):
    adds = bias_uses[leaf]
    if leaf in bad or weight_uses[leaf] or not adds:
      continue
    target, pairs = None, []
    for r, other, idx in adds:
      y = graph.records[r].ins[other]
      out_key = graph.records[r].outs[0]
      owners = layer_of.get(y, []) if not isinstance(y, _Lit) else []
      if (len(owners) != 1 or len(consumers.get(y, [])) != 1 or y == graph.out_key
          or graph.shapes[y] != graph.shapes[out_key]):
        target = None
        break
      w_leaf, use = owners[0]
      if target is None:
        target = w_leaf
      if w_leaf != target or w_leaf not in groups:
        target = None
        break
      pairs.append((use, np.broadcast_to(idx, graph.shapes[out_key])))
    if target is None or len(pairs) != len(groups[target].uses):
      continue
    if {id(u) for u, _ in pairs} != {id(u) for u in groups[target].uses}:
      continue
    ref = _bias_row(graph, pairs[0][0], pairs[0][1], leaf)
    if ref is None or any(
        not np.array_equal(_bias_row(graph, u, i, leaf), ref) for u, i in pairs[1:]):
      continue
    groups[target].bias_leaf = leaf
    groups[target].bias_index = ref
    for u, _ in pairs:
      u.bias = True

  covered = set(groups)
  covered.update(g.bias_leaf for g in groups.values() if g.bias_leaf is not None)
  used = {leaf for leaf in range(num_leaves)
          if consumers.get(graph.param_keys[leaf]) or graph.param_keys[leaf] == graph.out_key}
  fallback = [leaf for leaf in range(num_leaves) if leaf in used and leaf not in covered]
  perturbed = sorted({u.rec for g in groups.values() for u in g.uses})
  return _Plan(graph, [groups[k] for k in sorted(groups)], fallback, perturbed)


def _bias_row(graph: _Graph, use: _Use, idx: np.ndarray, leaf: int) -> np.ndarray | None:
  """Leaf index per output unit ``o`` if the bias is broadcast over ``(g, s)``, else None."""
  rec = graph.records[use.rec]
  if use.kind == "dot":
    layout = _dot_layout(rec, use.operand, graph.shapes)
    out_perm, (g, s, o) = layout[2], layout[3]
    canon = np.transpose(idx, out_perm).reshape(g, s, o)
  else:
    dn = rec.params["dimension_numbers"]
    g, s, _, o = _conv_layout(rec, graph.shapes)
    canon = np.moveaxis(idx, dn.out_spec[1], -1).reshape(g, s, o)
  if g != 1 or not (canon == canon[:1, :1]).all():
    return None
  row = canon[0, 0]
  if row.size != math.prod(graph.shapes[graph.param_keys[leaf]]) or len(np.unique(row)) != row.size:
    return None
  return row


# ---------------------------------------------------------------------- evaluation


def _read(env, atom):
  return atom.val if isinstance(atom, _Lit) else env[atom]


def _layer_input(rec: _Rec, use: _Use, vals: list, shapes: dict) -> jax.Array:
  """Layer input of one example in canonical ``(g, s, c)`` layout (+ ones column)."""
  if use.kind == "dot":
    perm, shape = _dot_layout(rec, use.operand, shapes)[:2]
    a = jnp.transpose(vals[1 - use.operand], perm).reshape(shape)
  else:
    g, s, c, _ = _conv_layout(rec, shapes)
    a = jnp.swapaxes(_patches(rec, vals[0], vals[1].shape, shapes).reshape(s, g, c), 0, 1)
  if use.bias:
    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  return a


def _patches(rec: _Rec, lhs: jax.Array, rhs_shape: tuple, shapes: dict) -> jax.Array:
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


def _layer_cotangent(plan: _Plan, use: _Use, cot: jax.Array) -> jax.Array:
  """``(k, *out)`` cotangent of a layer output -> canonical ``(k, g, s, o)``."""
  rec = plan.graph.records[use.rec]
  if use.kind == "dot":
    out_perm, shape = _dot_layout(rec, use.operand, plan.graph.shapes)[2:4]
    return jnp.transpose(cot, (0,) + tuple(d + 1 for d in out_perm)).reshape((-1,) + shape)
  dn = rec.params["dimension_numbers"]
  g, s, _, o = _conv_layout(rec, plan.graph.shapes)
  cot = jnp.moveaxis(cot, dn.out_spec[1] + 1, -1).reshape(cot.shape[0], s, g, o)
  return jnp.swapaxes(cot, 1, 2)


def _layer_output(plan: _Plan, use: _Use, y: jax.Array) -> jax.Array:
  """Canonical ``(g, s, o)`` -> the layer output's own layout (inverse of :func:`_layer_cotangent`)."""
  graph = plan.graph
  rec = graph.records[use.rec]
  out_shape = graph.shapes[rec.outs[0]]
  if use.kind == "dot":
    out_perm = _dot_layout(rec, use.operand, graph.shapes)[2]
    y = y.reshape(tuple(out_shape[d] for d in out_perm))
    return jnp.transpose(y, np.argsort(out_perm))
  feature = rec.params["dimension_numbers"].out_spec[1]
  moved = tuple(d for i, d in enumerate(out_shape) if i != feature) + (out_shape[feature],)
  return jnp.moveaxis(jnp.swapaxes(y, 0, 1).reshape(moved), -1, feature)


def _use_positions(graph: _Graph, use: _Use) -> int:
  """Positions ``s`` of one use (the ``S`` axis of its canonical layouts)."""
  rec = graph.records[use.rec]
  if use.kind == "dot":
    return _dot_layout(rec, use.operand, graph.shapes)[1][1]
  return _conv_layout(rec, graph.shapes)[1]


def _permute(flat: jax.Array, index: np.ndarray) -> jax.Array:
  """``flat[index]`` for a static index array; a reshape when ``index`` is the identity."""
  if np.array_equal(index.reshape(-1), np.arange(index.size)):
    return flat.reshape(index.shape)
  return flat[index]


def _conv_by_patches(plan: _Plan, use: _Use, a: jax.Array, kernel: jax.Array) -> jax.Array:
  """A conv's output from its canonical patches ``a``: ``a W`` with ``W`` in ``(g, c, o)``."""
  w = _permute(kernel.reshape(-1), use.index)
  y = jnp.einsum("gsc,gco->gso", a[..., :w.shape[1]], w.astype(a.dtype), precision=_HIGHEST)
  return _layer_output(plan, use, y)


def _forward(plan: _Plan, param_vals: list, fb_vals: list, eps: list, x_leaves: list,
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


def _example_stats(plan: _Plan, params: PyTree, x: PyTree):
  """Per-example layer inputs, layer cotangents and fallback Jacobians of a batch."""
  param_vals = jax.tree.leaves(params)
  fb_vals = [param_vals[leaf] for leaf in plan.fallback]
  dtype = jnp.result_type(*param_vals)
  eps0 = [jnp.zeros(plan.graph.shapes[plan.graph.records[r].outs[0]], dtype)
          for r in plan.perturbed]

  def one(xi):
    xi = [a[None] for a in jax.tree.leaves(xi)]
    fn = lambda fb, eps: _forward(plan, param_vals, fb, eps, xi)
    (jac_fb, jac_eps), layer_inputs = jax.jacrev(fn, argnums=(0, 1), has_aux=True)(fb_vals, eps0)
    return jac_fb, jac_eps, layer_inputs

  jac_fb, jac_eps, layer_inputs = jax.vmap(one)(x)
  cot_of = dict(zip(plan.perturbed, jac_eps))
  a_list, g_list = [], []
  for gi, group in enumerate(plan.groups):
    a_list.append(jnp.concatenate(layer_inputs[gi], axis=2).astype(dtype))  # (n, g, S, c)
    cots = [jax.vmap(lambda c, u=u: _layer_cotangent(plan, u, c))(cot_of[u.rec])
            for u in group.uses]
    g_list.append(jnp.concatenate(cots, axis=3).astype(dtype))  # (n, k, g, S, o)
  return a_list, g_list, jac_fb


# ----------------------------------------------------------------------- assembly

# Largest `(n1, n2, k, k, g, S, S)` intermediate (elements) the Gram order may form.
_MAX_GRAM_ELEMENTS = 1 << 27


def _gram_order(n1, n2, k, g, s1, s2, c, o, trace_outputs: bool) -> bool:
  """Whether ``(A1 A2ᵀ) ⊙ (G1 G2ᵀ)`` is cheaper than contracting layer Jacobians."""
  kk = k if trace_outputs else k * k
  gram_flops = n1 * n2 * g * s1 * s2 * (c + kk * o)
  jac_flops = (n1 * s1 + n2 * s2) * k * g * c * o + n1 * n2 * kk * g * c * o
  return gram_flops <= jac_flops and n1 * n2 * kk * g * s1 * s2 <= _MAX_GRAM_ELEMENTS


def _layer_kernel(a1, g1, a2, g2, trace_outputs: bool) -> jax.Array:
  """``Σ_g Σ_{s,t} (A1[i,g,s]·A2[j,g,t]) (G1[i,a,g,s]·G2[j,b,g,t])`` in the cheaper order.

  Returns ``(n1, n2)`` if ``trace_outputs``, else ``(n1, k, n2, k)`` (axes ``i, a, j, b``:
  the natural output of the ``G1 G2ᵀ`` matmul; the caller transposes once).
  """
  n1, k, g, s1, o = g1.shape
  n2, s2, c = g2.shape[0], g2.shape[3], a1.shape[-1]
  if _gram_order(n1, n2, k, g, s1, s2, c, o, trace_outputs):
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


def _contract_fallback(jac1: list, jac2: list, trace_outputs: bool) -> jax.Array:
  """Per-example Jacobians ``(n, k, *leaf)`` -> ``(n1, n2)`` or ``(n1, k, n2, k)``."""
  spec = "iap,jap->ij" if trace_outputs else "iap,jbp->iajb"
  return sum(jnp.einsum(spec, u.reshape(u.shape[:2] + (-1,)), v.reshape(v.shape[:2] + (-1,)),
                        precision=_HIGHEST) for u, v in zip(jac1, jac2))


def _structured_block(plan: _Plan, params: PyTree, x1: PyTree, x2: PyTree,
                      trace_outputs: bool) -> jax.Array:
  stats1 = _example_stats(plan, params, x1)
  stats2 = stats1 if x2 is x1 else _example_stats(plan, params, x2)
  return _kernel_from_stats(plan, stats1, stats2, trace_outputs)


def _kernel_from_stats(plan: _Plan, stats1, stats2, trace_outputs: bool) -> jax.Array:
  (a1, g1, jf1), (a2, g2, jf2) = stats1, stats2
  parts = [_layer_kernel(*args, trace_outputs) for args in zip(a1, g1, a2, g2)]
  if plan.fallback:
    parts.append(_contract_fallback(jf1, jf2, trace_outputs))
  kernel = sum(parts[1:], parts[0])
  return kernel if trace_outputs else jnp.transpose(kernel, (0, 2, 1, 3))


def _diagonal_from_stats(plan: _Plan, stats, count: int) -> jax.Array:
  """``K[i, i]`` of the first ``count`` examples, ``(count, k, k)``: each example's
  layer terms in their cheaper order (:func:`_layer_kernel` on a block of one)."""
  first = jax.tree.map(lambda a: a[:count, None], stats)
  one = lambda stats_i: _kernel_from_stats(plan, stats_i, stats_i, False)[0, 0]
  return jax.vmap(one)(first)


def kernel_and_diagonal(apply_fn: Callable, params: PyTree, x: PyTree, trace_outputs: bool,
                        count: int) -> tuple[jax.Array, jax.Array] | None:
  """The structured kernel of ``x`` and the ``(count, k, k)`` blocks ``K[i, i]`` of its
  first ``count`` examples, from one set of per-example layer inputs and cotangents;
  None when the structured rules do not apply."""
  plan = _plan_or_none(apply_fn, params, x)
  if plan is None:
    return None
  stats = _example_stats(plan, params, x)
  return (_kernel_from_stats(plan, stats, stats, trace_outputs),
          _diagonal_from_stats(plan, stats, count))


# Plans of recent models, keyed by (apply_fn, parameter and per-example input types).
_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 8


def _cache_key(apply_fn: Callable, params: PyTree, x: PyTree):
  spec = lambda a, batch: (tuple(np.shape(a)[batch:]), str(jnp.result_type(a)))
  try:
    key = (apply_fn, jax.tree.structure(params), jax.tree.structure(x),
           tuple(spec(a, 0) for a in jax.tree.leaves(params)),
           tuple(spec(a, 1) for a in jax.tree.leaves(x)))
    hash(key)
  except TypeError:
    return None
  return key


def _plan_or_none(apply_fn: Callable, params: PyTree, x: PyTree) -> _Plan | None:
  """The structured plan of ``apply_fn``, or None if no leaf is covered or tracing fails."""
  key = _cache_key(apply_fn, params, x)
  if key is not None and key in _PLAN_CACHE:
    return _PLAN_CACHE[key]
  try:
    plan = _analyse(_trace(apply_fn, params, x))
  except Exception:  # any unsupported construct: use the generic path
    return None
  plan = plan if plan.groups else None
  cacheable = plan is None or not any(isinstance(c, jax.core.Tracer)
                                      for c in plan.graph.consts.values())
  if key is not None and cacheable:
    if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
      _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = plan
  return plan


def choose_batch_size(apply_fn: Callable, params: PyTree, x: PyTree, n1: int, n2: int,
                      k: int, trace_outputs: bool, itemsize: int, budget_bytes: int) -> int | None:
  """Largest block of examples whose estimated structured peak memory fits the budget.

  Counts, per example, the layer inputs and ``k`` cotangents of every structured
  layer, the fallback Jacobians and ``k`` cotangents of every intermediate, plus
  each layer's Gram products (per pair of examples) or Jacobians (per example),
  whichever :func:`_layer_kernel` will form, and the kernel block itself.
  Returns None when the structured rules do not apply.
  """
  plan = _plan_or_none(apply_fn, params, x)
  if plan is None:
    return None
  graph = plan.graph
  size = lambda key: math.prod(graph.shapes[key])
  per_example = k * sum(size(graph.param_keys[leaf]) for leaf in plan.fallback)
  per_example += (1 + k) * sum(size(out) for rec in graph.records for out in rec.outs)
  kk = k if trace_outputs else k * k
  dims = [_group_dims(graph, group) for group in plan.groups]
  per_example += sum(g * s * (c + k * o) for g, s, c, o in dims)

  def fits(b):
    peak = 2 * b * per_example + 2 * b * b * kk
    for g, s, c, o in dims:
      if _gram_order(b, b, k, g, s, s, c, o, trace_outputs):
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


def _group_dims(graph: _Graph, group: _Group) -> tuple[int, int, int, int]:
  """``(g, S, c, o)`` of a structured leaf, ``S`` summed over its uses."""
  s_total = 0
  for use in group.uses:
    rec = graph.records[use.rec]
    if use.kind == "dot":
      layout = _dot_layout(rec, use.operand, graph.shapes)
      (g, s, c), o = layout[1], layout[3][2]
    else:
      g, s, c, o = _conv_layout(rec, graph.shapes)
    s_total += s
  return g, s_total, c + int(bool(group.bias_leaf is not None)), o


def applies(apply_fn: Callable, params: PyTree, x: PyTree) -> bool:
  """Whether the structured rules cover any parameter of this model."""
  return _plan_or_none(apply_fn, params, x) is not None


def kernel_block_fn(apply_fn: Callable, params: PyTree, trace_outputs: bool) -> Callable:
  """``block_fn(x1, x2)`` computing the structured kernel of a block.

  Returns ``(b1, b2, k, k)``, or ``(b1, b2)`` with ``trace_outputs``.
  """
  from ntk_diag import ntk

  def block_fn(x1, x2):
    plan = _plan_or_none(apply_fn, params, x1)
    if plan is None:
      return ntk._jacobian_block(apply_fn, params, x1, x2, trace_outputs=trace_outputs)
    return _structured_block(plan, params, x1, x2, trace_outputs)

  return block_fn
