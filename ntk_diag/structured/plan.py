"""The structured plan: which parameter leaves are Dense/Conv weights, folded biases, or fallbacks.

:func:`analyse` runs three passes over a :class:`~ntk_diag.structured.graph.Graph`:

1. view propagation (:func:`_propagate_views`): each parameter leaf is followed
   through view primitives, tracking which leaf element sits where as an index
   array, and each use of a view is classified (bilinear layer operand, added
   bias, or unsupported);
2. weight groups (:func:`_weight_groups`): a leaf is structured when every use
   is a bijective view feeding a ``dot_general`` (either operand) or a conv
   kernel, all in the same layout;
3. bias folding (:func:`_fold_biases`): a leaf is folded into a group as a
   column of ones when every use is ``add``-ed to the sole consumer of one of
   the group's layer outputs and broadcast over positions.

Anything else falls back to per-example Jacobians. Each layer use has the
canonical layouts activation ``(g, s, c)``, output ``(g, s, o)`` and weight
``(g, c, o)`` (``g`` batch/feature groups, ``s`` positions).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from ntk_diag.structured import graph as graph_lib
from ntk_diag.structured.graph import Graph, Lit, Rec

PyTree = Any

# Primitives that re-index a parameter without changing its values.
_VIEW_PRIMS = frozenset({"reshape", "transpose", "broadcast_in_dim", "convert_element_type",
                         "copy", "copy_p", "squeeze"})
_ADD_PRIMS = frozenset({"add", "add_any"})


@dataclasses.dataclass
class Use:
  """A parameter leaf consumed as one operand of a bilinear layer equation."""
  rec: int              # record index of the dot_general / conv
  operand: int          # which operand holds the parameter view
  kind: str             # "dot" or "conv"
  index: np.ndarray     # leaf index of each element in canonical (g, c, o) layout
  bias: bool = False    # a bias leaf is folded in as a ones column


@dataclasses.dataclass
class Group:
  leaf: int
  uses: list
  bias_leaf: int | None = None
  bias_index: np.ndarray | None = None  # bias leaf index of each output unit ``o``


@dataclasses.dataclass
class Plan:
  graph: Graph
  groups: list          # structured weight leaves
  fallback: list        # leaf indices handled by per-example Jacobians
  perturbed: list       # record indices whose output gets a zero perturbation


class DotLayout(NamedTuple):
  """Canonical layouts of a ``dot_general`` with a parameter operand.

  The activation is transposed by ``act_perm`` and reshaped to ``act_shape =
  (g, s, c)``, the output by ``out_perm`` to ``out_shape = (g, s, o)`` and the
  parameter operand by ``weight_perm`` to ``weight_shape = (g, c, o)``.
  """
  act_perm: tuple
  act_shape: tuple
  out_perm: tuple
  out_shape: tuple
  weight_perm: tuple
  weight_shape: tuple


def plan_or_none(apply_fn: Callable, params: PyTree, x: PyTree) -> Plan | None:
  """The structured plan of ``apply_fn``, or None if no leaf is covered or tracing fails."""
  try:
    plan = analyse(graph_lib.trace(apply_fn, params, x))
  except Exception:  # any unsupported construct: use the generic path
    return None
  return plan if plan.groups else None


def view_index(rec: Rec, idx: np.ndarray) -> np.ndarray | None:
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


def dot_layout(rec: Rec, operand: int, shapes: dict) -> DotLayout:
  """Canonical layouts of a dot_general with the parameter at ``operand``."""
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
  return DotLayout(a_b + a_f + a_c, (g, s, c), out_perm, (g, s, o), w_b + w_c + w_f, (g, c, o))


def conv_layout(rec: Rec, shapes: dict):
  """Canonical sizes of a conv, ``(g, s, c, o)``: patches ``(g, s, c)``, output ``(g, s, o)``,
  kernel ``(g, c, o)``."""
  p = rec.params
  dn = p["dimension_numbers"]
  rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
  groups = p["feature_group_count"]
  out_shape = shapes[rec.outs[0]]
  w_shape = shapes[rec.ins[1]]
  s = math.prod(out_shape[d] for d in range(len(out_shape)) if d != out_spec[1])
  cout, cin = w_shape[rhs_spec[0]], w_shape[rhs_spec[1]]
  win = math.prod(w_shape[d] for d in rhs_spec[2:])
  return groups, s, cin * win, cout // groups


def _conv_kernel_index(rec: Rec, idx: np.ndarray) -> np.ndarray:
  """Kernel leaf indices in the patch layout ``(g, cin/g · window, cout/g)``."""
  dn = rec.params["dimension_numbers"]
  groups = rec.params["feature_group_count"]
  idx = np.transpose(idx, dn.rhs_spec)  # (O, I, *spatial)
  cout = idx.shape[0]
  idx = idx.reshape((groups, cout // groups) + idx.shape[1:])
  idx = np.moveaxis(idx, 1, -1)  # (g, I, *spatial, O/g)
  return idx.reshape(groups, -1, cout // groups)


@dataclasses.dataclass
class _LeafUses:
  """What view propagation found, per parameter leaf."""
  weight: dict          # leaf -> [Use] as a bilinear layer operand
  bias: dict            # leaf -> [(add record, position of the other operand, view indices)]
  bad: set              # leaves with an unsupported use
  consumers: dict       # key -> [(record, operand position)]


def analyse(graph: Graph) -> Plan:
  """Classify every parameter leaf: structured weight, folded bias, or fallback."""
  num_leaves = len(graph.param_keys)
  uses = _propagate_views(graph)
  groups = _weight_groups(uses, num_leaves)
  _fold_biases(graph, uses, groups, num_leaves)
  covered = set(groups)
  covered.update(g.bias_leaf for g in groups.values() if g.bias_leaf is not None)
  used = {leaf for leaf in range(num_leaves)
          if uses.consumers.get(graph.param_keys[leaf]) or graph.param_keys[leaf] == graph.out_key}
  fallback = [leaf for leaf in range(num_leaves) if leaf in used and leaf not in covered]
  perturbed = sorted({u.rec for g in groups.values() for u in g.uses})
  return Plan(graph, [groups[k] for k in sorted(groups)], fallback, perturbed)


def _propagate_views(graph: Graph) -> _LeafUses:
  """Pass 1: follow each leaf through view primitives and classify every use of a view."""
  num_leaves = len(graph.param_keys)
  # key -> (leaf, index array in that key's layout)
  views = {}
  for leaf, key in enumerate(graph.param_keys):
    views[key] = (leaf, np.arange(math.prod(graph.shapes[key])).reshape(graph.shapes[key]))
  consumers = {}
  for r, rec in enumerate(graph.records):
    for pos, atom in enumerate(rec.ins):
      if not isinstance(atom, Lit):
        consumers.setdefault(atom, []).append((r, pos))
  uses = _LeafUses({leaf: [] for leaf in range(num_leaves)},
                   {leaf: [] for leaf in range(num_leaves)}, set(), consumers)
  if not isinstance(graph.out_key, Lit) and graph.out_key in views:
    uses.bad.add(views[graph.out_key][0])

  for r, rec in enumerate(graph.records):
    name = rec.prim.name
    view_ins = [(pos, views[a]) for pos, a in enumerate(rec.ins)
                if not isinstance(a, Lit) and a in views]
    if not view_ins:
      continue
    if name in _VIEW_PRIMS and len(rec.ins) == 1:
      leaf, idx = view_ins[0][1]
      new = view_index(rec, idx)
      if new is None:
        uses.bad.add(leaf)
      else:
        views[rec.outs[0]] = (leaf, new)
        if rec.outs[0] == graph.out_key:
          uses.bad.add(leaf)
      continue
    for pos, (leaf, idx) in view_ins:
      bijective = idx.size == math.prod(graph.shapes[graph.param_keys[leaf]])
      if name == "dot_general" and bijective:
        layout = dot_layout(rec, pos, graph.shapes)
        uses.weight[leaf].append(Use(
            r, pos, "dot", np.transpose(idx, layout.weight_perm).reshape(layout.weight_shape)))
      elif (name == "conv_general_dilated" and bijective and pos == 1
            and rec.params["batch_group_count"] == 1):
        uses.weight[leaf].append(Use(r, pos, "conv", _conv_kernel_index(rec, idx)))
      elif name in _ADD_PRIMS and len(view_ins) == 1:
        uses.bias[leaf].append((r, 1 - pos, idx))
      else:
        uses.bad.add(leaf)
  return uses


def _weight_groups(uses: _LeafUses, num_leaves: int) -> dict:
  """Pass 2: leaf -> :class:`Group` for the leaves used only as layer weights, in one layout."""
  groups = {}
  for leaf in range(num_leaves):
    weight_uses = uses.weight[leaf]
    if leaf in uses.bad or uses.bias[leaf] or not weight_uses:
      continue
    if any(not np.array_equal(u.index, weight_uses[0].index) for u in weight_uses):
      continue
    groups[leaf] = Group(leaf, weight_uses)
  return groups


def _fold_biases(graph: Graph, uses: _LeafUses, groups: dict, num_leaves: int) -> None:
  """Pass 3: fold ``add(y, view(b))`` right after a group's layer equations into the group."""
  # Records that produce layer outputs and who consumes them.
  layer_of = {}
  for leaf, weight_uses in uses.weight.items():
    for u in weight_uses:
      layer_of.setdefault(graph.records[u.rec].outs[0], []).append((leaf, u))

  for leaf in range(num_leaves):
    adds = uses.bias[leaf]
    if leaf in uses.bad or uses.weight[leaf] or not adds:
      continue
    target, pairs = None, []
    for r, other, idx in adds:
      y = graph.records[r].ins[other]
      out_key = graph.records[r].outs[0]
      owners = layer_of.get(y, []) if not isinstance(y, Lit) else []
      if (len(owners) != 1 or len(uses.consumers.get(y, [])) != 1 or y == graph.out_key
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


def _bias_row(graph: Graph, use: Use, idx: np.ndarray, leaf: int) -> np.ndarray | None:
  """Leaf index per output unit ``o`` if the bias is broadcast over ``(g, s)``, else None."""
  rec = graph.records[use.rec]
  if use.kind == "dot":
    layout = dot_layout(rec, use.operand, graph.shapes)
    g, s, o = layout.out_shape
    canon = np.transpose(idx, layout.out_perm).reshape(g, s, o)
  else:
    dn = rec.params["dimension_numbers"]
    g, s, _, o = conv_layout(rec, graph.shapes)
    canon = np.moveaxis(idx, dn.out_spec[1], -1).reshape(g, s, o)
  if g != 1 or not (canon == canon[:1, :1]).all():
    return None
  row = canon[0, 0]
  if row.size != math.prod(graph.shapes[graph.param_keys[leaf]]) or len(np.unique(row)) != row.size:
    return None
  return row


def group_dims(graph: Graph, group: Group) -> tuple[int, int, int, int]:
  """``(g, S, c, o)`` of a structured leaf, ``S`` summed over its uses."""
  s_total = 0
  for use in group.uses:
    rec = graph.records[use.rec]
    if use.kind == "dot":
      layout = dot_layout(rec, use.operand, graph.shapes)
      (g, s, c), o = layout.act_shape, layout.out_shape[2]
    else:
      g, s, c, o = conv_layout(rec, graph.shapes)
    s_total += s
  return g, s_total, c + int(bool(group.bias_leaf is not None)), o


def has_conv(plan: Plan | None) -> bool:
  """Whether ``plan`` holds a structured convolution."""
  return plan is not None and any(u.kind == "conv" for g in plan.groups for u in g.uses)


def applies(apply_fn: Callable, params: PyTree, x: PyTree) -> bool:
  """Whether the structured rules cover any parameter of this model."""
  return plan_or_none(apply_fn, params, x) is not None
