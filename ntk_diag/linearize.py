"""The linearized twin: the first-order Taylor expansion of a network in its parameters.

``f_lin(θ, x) = f(θ0, x) + J_x(θ0) (θ − θ0)`` (eq. 1 of the NTK lecture notes), evaluated with one
Jacobian-vector product per call; the Jacobian is never formed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ntk_diag import _tree
from ntk_diag import _validation

PyTree = Any


def linearize(apply_fn: Callable, params0: PyTree) -> Callable[[PyTree, Any], jax.Array]:
  """Linearized twin of ``apply_fn`` around ``params0``.

  ``apply_lin(θ, x) = f(θ0, x) + J_x(θ0)(θ − θ0)``, computed as the primal and
  tangent outputs of a single ``jax.jvp`` of ``θ ↦ apply_fn(θ, x)`` at ``θ0``
  in the direction ``θ − θ0``. Memory and cost are those of one forward-mode
  pass (about two to three forward passes), independent of the number of
  parameters ``P``. ``apply_lin`` is a pure function: it can be jitted,
  differentiated (it is linear in ``θ``, so ``jax.grad`` gives ``J_x(θ0)ᵀ``
  times the cotangent) and trained with any optax optimiser.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``, e.g. from
      :func:`ntk_diag.from_linen` or :func:`ntk_diag.from_nnx`.
    params0: pytree of floating-point parameters ``θ0`` to expand around;
      closed over as a constant.

  Returns:
    ``apply_lin(params, x)`` with the output shape of ``apply_fn``.
    ``params`` must have the tree structure of ``params0``.
  """
  _validation.check_callable("apply_fn", apply_fn)
  leaves, treedef = jax.tree.flatten(params0)
  if not leaves:
    raise ValueError(f"`params0` has no array leaves; got {params0!r}.")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params0)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          "`params0` leaves must be floating point (they are differentiated);"
          f" leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}.")
  params0 = jax.tree.map(jnp.asarray, params0)

  def apply_lin(params: PyTree, x: Any) -> jax.Array:
    if jax.tree.structure(params) != treedef:
      raise ValueError(
          "`params` must have the tree structure of `params0`: expected"
          f" {treedef}, got {jax.tree.structure(params)}.")
    delta = jax.tree.map(lambda d, p0: d.astype(p0.dtype),
                         _tree.tree_sub(params, params0), params0)
    out0, tangent = jax.jvp(lambda p: apply_fn(p, x), (params0,), (delta,))
    return out0 + tangent

  return apply_lin
