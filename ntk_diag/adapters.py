"""Turn Flax models into ``apply_fn(params, x)`` plus trainable ``params``.

Every diagnostic in ntk_diag differentiates ``apply_fn`` with respect to its
first argument only; the adapters close over everything that must be held
fixed (BatchNorm statistics, NNX non-``Param`` state).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

PyTree = Any
ApplyFn = Callable[[PyTree, Any], jax.Array]


def from_linen(module: Any, variables: Mapping[str, Any], **apply_kwargs: Any
               ) -> tuple[ApplyFn, PyTree]:
  """Adapter for a ``flax.linen`` module.

  Args:
    module: the ``nn.Module``.
    variables: the full variable dict from ``module.init``; must hold ``"params"``.
    **apply_kwargs: passed to ``module.apply`` on every call, e.g. ``train=False``
      so that BatchNorm uses its running statistics.

  Returns:
    ``(apply_fn, params)`` with ``params = variables["params"]`` and
    ``apply_fn(params, x) = module.apply({"params": params, **rest}, x, **apply_kwargs)``,
    where ``rest`` (e.g. ``batch_stats``) is held fixed.
  """
  if not hasattr(module, "apply"):
    raise TypeError(f"`module` must be a flax.linen Module; got {type(module).__name__}.")
  if not isinstance(variables, Mapping):
    raise TypeError(f"`variables` must be the dict returned by module.init; got {type(variables).__name__}.")
  if "params" not in variables:
    raise ValueError(
        f"`variables` must contain a 'params' collection; got collections {sorted(variables)}.")
  params = variables["params"]
  fixed = {name: value for name, value in variables.items() if name != "params"}

  def apply_fn(params: PyTree, x: Any) -> jax.Array:
    return module.apply({"params": params, **fixed}, x, **apply_kwargs)

  return apply_fn, params


def from_nnx(model: Any, **call_kwargs: Any) -> tuple[ApplyFn, PyTree]:
  """Adapter for a ``flax.nnx`` module.

  Trainable ``nnx.Param`` state becomes ``params``; all other state
  (BatchNorm statistics, RNG counters, ...) is held fixed at its current value,
  and the caller's ``model`` is never mutated. Call ``model.eval()`` first if
  the model has train/eval behaviour (Dropout, BatchNorm).

  Returns:
    ``(apply_fn, params)`` with ``apply_fn(params, x) = merge(params, rest)(x, **call_kwargs)``.
  """
  from flax import nnx  # local: keeps `import ntk_diag` light

  if not isinstance(model, nnx.Module):
    raise TypeError(f"`model` must be an nnx.Module; got {type(model).__name__}.")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # The split states hold `model`'s own Variable objects. Snapshot them, and
  # merge into fresh copies on every call, so that neither a stateful call
  # (e.g. BatchNorm in train mode, which would also raise a TraceContextError
  # under jit) nor later in-place training of `model` reaches across.
  params, rest = jax.tree.map(lambda leaf: leaf, (params, rest))

  def apply_fn(params: PyTree, x: Any) -> jax.Array:
    return nnx.merge(graphdef, params, rest, copy=True)(x, **call_kwargs)

  return apply_fn, params
