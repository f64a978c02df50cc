"""Turn Flax models into ``apply_fn(params, x, model_state=None)`` plus trainable ``params``.

Every diagnostic in ntk_diag differentiates ``apply_fn`` with respect to its
first argument only. Everything else the model reads (BatchNorm statistics,
NNX non-``Param`` state) is its *model state*: fixed at the values the adapter
was built with, or passed as the optional third argument, which is how the
hook evaluates the model of the current step (``hook(step, params=...,
model_state=...)``, or ``hook(step, model=...)`` for NNX).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax

PyTree = Any
ApplyFn = Callable[..., jax.Array]


def _input_keyword(module: Any) -> str | None:
  """Name of the input of ``module.__call__`` when it is keyword-only
  (``def __call__(self, *, inputs, train)``, as in Flax's nlp_seq example)."""
  try:
    signature = inspect.signature(type(module).__call__)
  except (TypeError, ValueError):
    return None
  parameters = list(signature.parameters.values())[1:]  # drop `self`
  if not parameters or parameters[0].kind != inspect.Parameter.KEYWORD_ONLY:
    return None
  if any(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    inspect.Parameter.VAR_POSITIONAL) for p in parameters):
    return None
  return parameters[0].name


def from_linen(module: Any, variables: Mapping[str, Any], **apply_kwargs: Any
               ) -> tuple[ApplyFn, PyTree]:
  """Adapter for a ``flax.linen`` module.

  Args:
    module: the ``nn.Module``.
    variables: the full variable dict from ``module.init``; must hold ``"params"``.
    **apply_kwargs: passed to ``module.apply`` on every call, e.g. ``train=False``
      so that BatchNorm uses its running statistics and Dropout is off. A
      module whose ``__call__`` takes its input as a keyword-only argument
      (``def __call__(self, *, inputs, train)``) gets ``x`` under that name.

  Returns:
    ``(apply_fn, params)`` with ``params = variables["params"]`` and
    ``apply_fn(params, x, model_state=None) = module.apply({"params": params,
    **rest}, x, **apply_kwargs)``: ``rest`` holds the other collections of
    ``variables`` (e.g. ``batch_stats``), replaced by those in
    ``model_state`` (e.g. ``{"batch_stats": state.batch_stats}``) when given.
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
  keyword = _input_keyword(module)

  def apply_fn(params: PyTree, x: Any, model_state: Mapping[str, Any] | None = None) -> jax.Array:
    collections = fixed if model_state is None else {**fixed, **model_state}
    if keyword is not None:
      return module.apply({"params": params, **collections}, **{keyword: x}, **apply_kwargs)
    return module.apply({"params": params, **collections}, x, **apply_kwargs)

  return apply_fn, params


def nnx_split(model: Any) -> tuple[Any, PyTree, PyTree, PyTree]:
  """``(graphdef, params, model_state, rng_state)`` of an ``nnx.Module``.

  ``params`` is its ``nnx.Param`` state, ``rng_state`` its RNG streams (unused
  in eval mode, so held fixed) and ``model_state`` everything else (BatchNorm
  statistics, ...). The states are copies: training the model in place later
  does not reach them.
  """
  from flax import nnx  # local: keeps `import ntk_diag` light

  if not isinstance(model, nnx.Module):
    raise TypeError(f"`model` must be an nnx.Module; got {type(model).__name__}.")
  graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
  # The split states hold `model`'s own Variable objects: snapshot them.
  params, model_state, rng_state = jax.tree.map(lambda leaf: leaf, (params, model_state, rng_state))
  return graphdef, params, model_state, rng_state


def from_nnx(model: Any, **call_kwargs: Any) -> tuple[ApplyFn, PyTree]:
  """Adapter for a ``flax.nnx`` module, evaluated in eval mode.

  Trainable ``nnx.Param`` state becomes ``params``; the other state (BatchNorm
  statistics, ...) is the model state, held at its current value unless
  passed as the third argument; RNG streams are held fixed. Every call merges
  the state into a fresh copy of the model and switches that copy to eval
  mode (``deterministic=True``, ``use_running_average=True``: Dropout off,
  BatchNorm on its running averages), so it needs no ``rngs`` and works
  whatever mode the training loop holds ``model`` in; ``model`` itself is
  never mutated.

  Args:
    model: the ``nnx.Module``.
    **call_kwargs: passed to ``model(x, **call_kwargs)``, e.g. ``rngs=None``
      for a ``__call__`` whose ``rngs`` argument has no default.

  Returns:
    ``(apply_fn, params)`` with ``apply_fn(params, x, model_state=None)``.
  """
  from flax import nnx

  graphdef, params, model_state0, rng_state = nnx_split(model)

  def apply_fn(params: PyTree, x: Any, model_state: PyTree | None = None) -> jax.Array:
    state = model_state0 if model_state is None else model_state
    copy = nnx.merge(graphdef, params, rng_state, state, copy=True)
    copy.eval()
    return copy(x, **call_kwargs)

  return apply_fn, params
