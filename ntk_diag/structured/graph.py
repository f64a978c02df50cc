"""Tracing for the structured NTK: ``apply_fn`` on one example as a flat list of records.

Calls without a custom derivative rule (``jit``, ``pjit``, ``remat``...) are
inlined, so the records hold only primitive applications; every intermediate
is an integer key with its per-example shape (batch axis of size 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

PyTree = Any

# Call primitives whose body is inlined (same values, no custom derivative rule).
_INLINE_PRIMS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand of a record."""
  val: Any


@dataclasses.dataclass
class Rec:
  """One primitive application of the inlined jaxpr; atoms are int keys or :class:`Lit`."""
  prim: Any
  params: dict
  ins: list
  outs: list


@dataclasses.dataclass
class Graph:
  records: list
  consts: dict          # key -> value
  param_keys: list      # key of each parameter leaf
  x_keys: list          # key of each input leaf
  out_key: Any          # key (or Lit) of the single output
  shapes: dict          # key -> per-example shape (batch of 1)


def _flat_apply(apply_fn, p_def, x_def, num_p, *leaves):
  """``apply_fn`` on flat parameter and input leaves, outputs flattened."""
  out = apply_fn(jax.tree.unflatten(p_def, leaves[:num_p]),
                 jax.tree.unflatten(x_def, leaves[num_p:]))
  return jnp.reshape(out, (-1,))


# Traced through jit so that JAX's own tracing cache (keyed on `apply_fn` and the
# shapes) answers a model traced before: the one-call `empirical_ntk` re-plans cheaply.
_flat_apply_jit = jax.jit(_flat_apply, static_argnums=(0, 1, 2, 3))


def trace(apply_fn: Callable, params: PyTree, x: PyTree) -> Graph:
  """Inlined jaxpr of ``apply_fn`` on one example (batch axis of size 1)."""
  p_leaves, p_def = jax.tree.flatten(params)
  x_leaves, x_def = jax.tree.flatten(x)
  num_p = len(p_leaves)
  specs = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in p_leaves]
  specs += [jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), jnp.result_type(a))
            for a in x_leaves]
  closed = _flat_apply_jit.trace(apply_fn, p_def, x_def, num_p, *specs).jaxpr
  if len(closed.jaxpr.invars) != len(specs):
    # `apply_fn` closes over values of an enclosing trace, which jit passes as extra
    # arguments: trace it directly, so that they are constants of the graph.
    closed = jax.make_jaxpr(functools.partial(_flat_apply, apply_fn, p_def, x_def, num_p))(*specs)

  records, consts, shapes = [], {}, {}
  counter = iter(range(1 << 62))

  def fresh(var):
    key = next(counter)
    shapes[key] = tuple(var.aval.shape)
    return key

  def inline(jaxpr, const_vals, in_atoms):
    env = {}

    def read(v):
      return Lit(v.val) if isinstance(v, jex_core.Literal) else env[v]

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
        records.append(Rec(eqn.primitive, dict(eqn.params), ins, outs))
      for v, atom in zip(eqn.outvars, outs):
        env[v] = atom
    return [read(v) for v in jaxpr.outvars]

  in_keys = [fresh(v) for v in closed.jaxpr.invars]
  (out,) = inline(closed.jaxpr, closed.consts, in_keys)
  return Graph(records, consts, in_keys[:num_p], in_keys[num_p:], out, shapes)
