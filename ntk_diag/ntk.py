"""Empirical neural tangent kernel: the method dispatcher.

``K[i, j, a, b] = J_{x1_i}[a] · J_{x2_j}[b]`` where ``J_x`` is the ``k × P``
Jacobian of the outputs at example ``x`` w.r.t. the flattened parameters.
With ``trace_outputs=True`` the result is ``sum_a K[i, j, a, a]`` (the sum, not
the mean, over outputs).

Methods (all exact up to float rounding; they differ in cost and memory):

* ``"jacobian"`` — per-example Jacobians (vmapped ``jacrev``), contracted leaf
  by leaf. Cost ``(n1 + n2)·k`` backward passes plus ``n1·n2·k²·P`` FLOPs for
  the contraction; memory ``(n1 + n2)·k·P``.
* ``"ntk_vp"`` — NTK-vector products: for each column ``(j, b)`` one VJP at
  ``x2_j`` then one JVP over ``x1``. Never forms a Jacobian; memory
  ``O(P + n1·activations)`` per vectorised column. Best when ``k`` is large.
* ``"structured"`` — exploits the structure of Dense/Conv layers; see
  :mod:`ntk_diag.structured`. Falls back to ``"jacobian"`` where it does not apply.
* ``"auto"`` — the cheapest by a FLOP estimate.

``batch_size`` computes the kernel in ``batch_size × batch_size`` blocks of
examples; ``None`` picks a block size that keeps the estimated peak memory
within a budget (a quarter of device memory by default).

:func:`empirical_ntk_fn` makes these choices once per input shapes and returns
the kernel function; :func:`empirical_ntk` is a one-call wrapper. The kernels
themselves are in :mod:`ntk_diag._jacobians` and :mod:`ntk_diag.structured`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _jacobians
from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import structured

PyTree = Any

METHODS = ("auto", "jacobian", "ntk_vp", "structured")


def empirical_ntk_fn(apply_fn: Callable, *, trace_outputs: bool = False, method: str = "auto",
                     batch_size: int | None = None,
                     memory_budget_bytes: int | None = None) -> Callable[..., jax.Array]:
  """The empirical NTK of ``apply_fn`` as a function ``ntk_fn(params, x1, x2=None)``.

  In the manner of neural-tangents' ``empirical_ntk_fn`` (whose ``trace_axes``
  default also traces the outputs): every choice that depends only on
  ``apply_fn`` and the input shapes — the method for ``"auto"``, the block size
  for ``batch_size=None``, the structured plan — is made on the first call with
  given shapes (parameter shapes, per-example input shape, ``n1``, ``n2``) and
  reused by later calls with the same shapes; the kernel itself runs compiled
  (``jax.jit``, one compilation per shapes). With a ``model_state`` (whose
  values change between calls) the plan is made when the kernel is compiled.
  ``ntk_fn`` may also be called inside ``jax.jit``.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; ``k = prod(out)``; with a
      model state, ``apply_fn(params, x, model_state)``.
    trace_outputs: return ``sum_a K[:, :, a, a]`` of shape ``(n1, n2)``.
    method: ``"auto"``, ``"jacobian"``, ``"ntk_vp"`` or ``"structured"``.
    batch_size: examples per block; bounds peak memory, same result.
    memory_budget_bytes: peak-memory budget used when ``batch_size`` is None.

  Returns:
    ``ntk_fn(params, x1, x2=None, model_state=None)``: ``x2=None`` means ``x1``;
    ``model_state`` (when given) is passed to ``apply_fn`` as its third
    argument and held fixed. It returns ``(n1, n2, k, k)``, or ``(n1, n2)`` if
    ``trace_outputs`` or the model output has shape ``(n,)``.
  """
  choose = _Chooser(apply_fn, trace_outputs, method, batch_size, memory_budget_bytes)

  def ntk_fn(params: PyTree, x1: PyTree, x2: PyTree | None = None,
             model_state: PyTree = None) -> jax.Array:
    n1 = _validation.leading_size("x1", x1)
    n2 = n1
    if x2 is not None:
      n2 = _validation.leading_size("x2", x2)
      _validation.check_same_features("x1", x1, "x2", x2)
    return _kernel(choose, choose(params, x1, n1, n2, model_state), params, x1, x2, model_state)

  return ntk_fn


def empirical_ntk(apply_fn: Callable, params: PyTree, x1: PyTree, x2: PyTree | None = None, *,
                  trace_outputs: bool = False, method: str = "auto",
                  batch_size: int | None = None,
                  memory_budget_bytes: int | None = None) -> jax.Array:
  """Empirical NTK of ``apply_fn`` at ``params``: ``empirical_ntk_fn(apply_fn, ...)(params, x1, x2)``.

  Each call makes the choices of :func:`empirical_ntk_fn` anew (the compiled
  kernel is reused); to evaluate a kernel repeatedly, build the function once.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; ``k = prod(out)``.
    params: pytree of trainable parameters (derivatives are taken w.r.t. these only).
    x1: batch of ``n1`` inputs (array or pytree with a leading batch axis);
      integer inputs such as token ids are fine.
    x2: batch of ``n2`` inputs with the per-example shape of ``x1``; ``None`` means ``x1``.
    trace_outputs: return ``sum_a K[:, :, a, a]`` of shape ``(n1, n2)``.
    method: ``"auto"``, ``"jacobian"``, ``"ntk_vp"`` or ``"structured"``.
    batch_size: examples per block; bounds peak memory, same result.
    memory_budget_bytes: peak-memory budget used when ``batch_size`` is None.

  Returns:
    ``(n1, n2, k, k)``, or ``(n1, n2)`` if ``trace_outputs`` or the model output
    has shape ``(n,)``.
  """
  ntk_fn = empirical_ntk_fn(apply_fn, trace_outputs=trace_outputs, method=method,
                            batch_size=batch_size, memory_budget_bytes=memory_budget_bytes)
  return ntk_fn(params, x1, x2)


def empirical_ntk_and_diagonal_fn(apply_fn: Callable, *, num_diagonal: int,
                                  trace_outputs: bool = False, method: str = "auto",
                                  batch_size: int | None = None,
                                  memory_budget_bytes: int | None = None) -> Callable:
  """:func:`empirical_ntk_fn`'s kernel of one batch together with its diagonal blocks.

  Returns ``fn(params, x, model_state=None) -> (kernel, diagonal)``: the kernel
  of ``x`` with itself and the Gram blocks ``J_{x_i} J_{x_i}ᵀ`` (``(m, k, k)``,
  the full diagonal blocks ``K[i, i]``) of its first ``m = min(num_diagonal,
  n)`` examples. With the structured method in one block (the default when it
  applies and fits) both come from the same per-example layer inputs and
  cotangents; otherwise the blocks are computed apart, as :func:`example_gram`
  does. Choices are made once per input shapes, as in :func:`empirical_ntk_fn`.
  """
  choose = _Chooser(apply_fn, trace_outputs, method, batch_size, memory_budget_bytes)

  def fn(params: PyTree, x: PyTree, model_state: PyTree = None) -> tuple[jax.Array, jax.Array]:
    n = _validation.leading_size("x", x)
    count = min(num_diagonal, n)
    choice = choose(params, x, n, n, model_state)
    if choice.joint:
      kernel, diagonal = _structured_joint(apply_fn, params, x, model_state,
                                           trace_outputs=choose.trace_outputs, count=count,
                                           plan=_StaticPlan.of(choice.plan))
      return _squeeze_scalar_output(kernel, choice.out_shape, choose.trace_outputs), diagonal
    f = _model.bind_model_state(apply_fn, model_state)
    diagonal = jax.vmap(lambda xi: example_gram(f, params, xi))(
        _model.take(x, jnp.arange(count)))
    return _kernel(choose, choice, params, x, None, model_state), diagonal

  return fn


def empirical_ntk_and_diagonal(apply_fn: Callable, params: PyTree, x: PyTree, *,
                               num_diagonal: int, trace_outputs: bool = False,
                               method: str = "auto", batch_size: int | None = None,
                               memory_budget_bytes: int | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """``empirical_ntk(apply_fn, params, x, ...)`` and the ``(num_diagonal, k, k)``
  blocks ``K[i, i]``: one call of :func:`empirical_ntk_and_diagonal_fn`.
  Traceable: for callers such as the snapshot, which need the kernel of every
  probe point and per-example Jacobian norms."""
  fn = empirical_ntk_and_diagonal_fn(apply_fn, num_diagonal=num_diagonal,
                                     trace_outputs=trace_outputs, method=method,
                                     batch_size=batch_size,
                                     memory_budget_bytes=memory_budget_bytes)
  return fn(params, x)


def example_gram(apply_fn: Callable, params: PyTree, xi: PyTree) -> jax.Array:
  """``J_x J_xᵀ`` at one example ``xi`` (no batch axis), shape ``(k, k)``.

  The diagonal block ``K[i, i]`` of the NTK, computed with the structured rules
  where they apply (no Jacobian is formed for Dense/Conv layers) and by
  Jacobian contraction otherwise.
  """
  xb = jax.tree.map(lambda a: a[None], xi)
  plan = structured.plan_or_none(apply_fn, params, xb)
  return structured.kernel_block_fn(plan, apply_fn, params, False)(xb, xb)[0, 0]


@dataclasses.dataclass(frozen=True)
class _Choice:
  """What :class:`_Chooser` decided for one set of input shapes."""
  method: str             # "jacobian", "ntk_vp" or "structured"
  batch_size: int         # examples per block
  out_shape: tuple        # per-example output shape
  joint: bool             # structured in one block: kernel and diagonal from one pass
  plan: Any = None        # the structured plan when it holds no tracers (else made per trace)


class _Chooser:
  """Validates the options of a kernel function, then chooses the method and block
  size once per input shapes (kept in ``self._choices``, this function's own)."""

  def __init__(self, apply_fn, trace_outputs, method, batch_size, memory_budget_bytes):
    _validation.check_callable("apply_fn", apply_fn)
    _validation.check_one_of("method", method, METHODS)
    _validation.check_positive_int("batch_size", batch_size, optional=True)
    _validation.check_positive_int("memory_budget_bytes", memory_budget_bytes, optional=True)
    if not isinstance(trace_outputs, (bool, np.bool_)):
      raise TypeError(f"`trace_outputs` must be a bool; got {trace_outputs!r}.")
    self.apply_fn = apply_fn
    self.trace_outputs = bool(trace_outputs)
    self.method = method
    self.batch_size = batch_size
    self.memory_budget_bytes = memory_budget_bytes
    self._choices = {}

  def __call__(self, params, x1, n1, n2, model_state) -> _Choice:
    key = (_shapes(params, 0), _shapes(x1, 1), _shapes(model_state, 0), n1, n2)
    if key not in self._choices:
      f = _model.bind_model_state(self.apply_fn, model_state)
      self._choices[key] = self._choose(f, params, x1, n1, n2, model_state)
    return self._choices[key]

  def _choose(self, f, params, x1, n1, n2, model_state) -> _Choice:
    out_shape = _model.example_output_shape(f, params, x1)
    k = _model.num_outputs(out_shape)
    num_params = _tree.tree_size(params)
    method, batch_size = self.method, self.batch_size
    plan = structured.plan_or_none(f, params, x1) if method in ("auto", "structured") else None
    if method == "auto":
      method = "structured" if plan is not None else _cheaper_generic(
          f, params, x1, n1, n2, k, num_params, self.trace_outputs)
    budget = self.memory_budget_bytes or _memory.default_budget_bytes()
    itemsize = jnp.dtype(_model.param_dtype(params)).itemsize
    fitting = None
    if method == "structured" and plan is not None:
      fitting = structured.choose_batch_size(plan, n1, n2, k, self.trace_outputs, itemsize,
                                             budget)
    joint = fitting is not None and fitting >= max(n1, n2) and (batch_size or n1) >= n1
    if fitting is None:
      fitting = _memory.jacobian_batch_size(method, n1, n2, k, num_params, itemsize, budget)
    batch_size = _memory.block_size(
        batch_size, fitting, max(n1, n2), budget,
        f"method={method!r} with P={num_params} parameters and k={k} outputs")
    if not self._reusable(plan, model_state):
      plan = None  # made again when the kernel is traced
    return _Choice(method, batch_size, out_shape, joint, plan)

  @staticmethod
  def _reusable(plan, model_state) -> bool:
    """Whether ``plan`` may serve later calls: its constants are neither a model state
    (which changes between calls) nor values of an enclosing trace."""
    return plan is not None and model_state is None and not any(
        isinstance(c, jax.core.Tracer) for c in plan.graph.consts.values())


def _kernel(choose: _Chooser, choice: _Choice, params, x1, x2, model_state) -> jax.Array:
  kernel = _ntk_jit(choose.apply_fn, params, x1, x2, model_state,
                    trace_outputs=choose.trace_outputs, method=choice.method,
                    batch_size=choice.batch_size, plan=_StaticPlan.of(choice.plan))
  return _squeeze_scalar_output(kernel, choice.out_shape, choose.trace_outputs)


def _shapes(tree: PyTree, batch_axes: int):
  """Hashable structure, shapes (less ``batch_axes`` leading axes) and dtypes of a pytree."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(a)[batch_axes:]), str(jnp.result_type(a)))
                        for a in leaves)


def _squeeze_scalar_output(kernel: jax.Array, out_shape: tuple, trace_outputs: bool) -> jax.Array:
  """``(n1, n2, 1, 1) -> (n1, n2)`` for a model whose output has shape ``(n,)``."""
  if out_shape == () and not trace_outputs:
    return kernel[:, :, 0, 0]
  return kernel


def choose_method(apply_fn: Callable, params: PyTree, x: PyTree, n1: int, n2: int, k: int,
                  num_params: int, trace_outputs: bool) -> str:
  """Cheapest exact method: ``"structured"`` where its rules apply, else
  :func:`_cheaper_generic`."""
  if structured.applies(apply_fn, params, x):
    return "structured"
  return _cheaper_generic(apply_fn, params, x, n1, n2, k, num_params, trace_outputs)


def _cheaper_generic(apply_fn: Callable, params: PyTree, x: PyTree, n1: int, n2: int, k: int,
                     num_params: int, trace_outputs: bool) -> str:
  """``"jacobian"`` or ``"ntk_vp"``, the cheaper by a FLOP estimate.

  With ``F`` the forward FLOPs of one example, a backward pass costs ``~3F``:
  ``jacobian ≈ 3F·(n1+n2)·k + 2·n1·n2·k^c·P`` (``c = 1`` traced, ``2`` full) and
  ``ntk_vp ≈ 3F·n2·k·(1 + n1)``.
  """
  flops = _forward_flops(apply_fn, params, x, num_params)
  contraction = 2.0 * n1 * n2 * (k if trace_outputs else k * k) * num_params
  jacobian_cost = 3.0 * flops * (n1 + n2) * k + contraction
  ntk_vp_cost = 3.0 * flops * n2 * k * (1 + n1)
  return "jacobian" if jacobian_cost <= ntk_vp_cost else "ntk_vp"


def _forward_flops(apply_fn: Callable, params: PyTree, x: PyTree, num_params: int) -> float:
  """FLOPs of one forward example from XLA's cost analysis; ``2P`` if unavailable."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), a.dtype), x)
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
  try:
    cost = jax.jit(apply_fn).lower(p, one).cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
  except Exception:  # cost analysis is best effort on every backend
    flops = 0.0
  return max(flops, 2.0 * num_params)


class _StaticPlan:
  """A structured plan as a static ``jax.jit`` argument. All compare equal: the plan
  is determined by what jit's cache key already holds (``apply_fn``, the shapes and
  dtypes of the arguments), so kernel functions built anew for the same model reuse
  one compilation, and a compilation uses the plan it was handed."""

  def __init__(self, plan):
    self.plan = plan

  @classmethod
  def of(cls, plan) -> _StaticPlan | None:
    return None if plan is None else cls(plan)

  def __eq__(self, other):
    return isinstance(other, _StaticPlan)

  def __hash__(self):
    return hash(_StaticPlan)


def _plan(f, params, x, plan: _StaticPlan | None):
  """The handed plan, or (``None``) the plan made now, at trace time."""
  return plan.plan if plan is not None else structured.plan_or_none(f, params, x)


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "trace_outputs", "method", "batch_size", "plan"))
def _ntk_jit(apply_fn, params, x1, x2, model_state=None, *, trace_outputs, method, batch_size,
             plan=None):
  """``x2=None`` means ``x1``; per-example Jacobians are then computed once."""
  symmetric = x2 is None
  x2 = x1 if symmetric else x2
  f = _model.bind_model_state(apply_fn, model_state)
  if method == "structured":
    block_fn = structured.kernel_block_fn(_plan(f, params, x1, plan), f, params, trace_outputs)
  else:
    block_fn = {"jacobian": _jacobians.jacobian_block, "ntk_vp": _jacobians.ntk_vp_block}[method]
    block_fn = functools.partial(block_fn, f, params, trace_outputs=trace_outputs)
  n1 = jax.tree.leaves(x1)[0].shape[0]
  n2 = jax.tree.leaves(x2)[0].shape[0]
  return _jacobians.blockwise(block_fn, x1, x2, n1, n2, batch_size,
                              share=symmetric and method in ("jacobian", "structured"))


@functools.partial(jax.jit, static_argnames=("apply_fn", "trace_outputs", "count", "plan"))
def _structured_joint(apply_fn, params, x, model_state=None, *, trace_outputs, count, plan=None):
  f = _model.bind_model_state(apply_fn, model_state)
  return structured.kernel_and_diagonal(_plan(f, params, x, plan), params, x, trace_outputs, count)
