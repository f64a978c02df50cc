"""What a training loop hands the hook, made uniform, and the hints of a failed start.

Steps may be Python ints or integer scalar arrays (``TrainState.step``); the
model comes as ``params`` (+ ``model_state``) or as an ``nnx.Module``; params
may be pmap replicas (``flax.jax_utils.replicate``).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import numpy as np

from ntk_diag import checkpoint

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CallInputs:
  """The model of one call: trainable ``params``, ``model_state`` (or ``None``)
  and the lockstep twin's ``twin_params`` (or ``None``)."""
  params: PyTree
  model_state: PyTree
  twin_params: PyTree

  def unreplicated(self, replicated: bool) -> "CallInputs":
    """The first pmap replica of each tree when ``replicated``."""
    return CallInputs(*(unreplicate(tree, replicated)[0]
                        for tree in (self.params, self.model_state, self.twin_params)))


def call_inputs(params: PyTree, model: Any, model_state: PyTree, twin_params: PyTree) -> CallInputs:
  """The :class:`CallInputs` of one call (read from ``model`` for NNX)."""
  if (params is None) == (model is None):
    raise TypeError("Pass exactly one of `params=` (a params pytree) or `model=` (an nnx.Module).")
  if model is not None:
    from ntk_diag import adapters
    if model_state is not None:
      raise TypeError("With `model=` the model state is read from the model: drop `model_state=`.")
    _, params, model_state, _ = adapters.nnx_split(model)
  return CallInputs(params=params, model_state=model_state, twin_params=twin_params)


def as_step(step: Any) -> int:
  """A Python int from an int or an integer scalar array (``TrainState.step``)."""
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"`step` must be an integer; got {step!r}.")
  if isinstance(step, numbers.Integral):
    return int(step)
  dtype = getattr(step, "dtype", None)
  if dtype is not None and np.ndim(step) == 0 and np.issubdtype(np.dtype(dtype), np.integer):
    return int(step)
  raise TypeError(
      f"`step` must be an integer scalar (a Python int or an integer array of shape ());"
      f" got {type(step).__name__} {getattr(step, 'shape', '')} {dtype or ''}.")


def is_pmap_replicated(tree: PyTree) -> bool:
  """Whether every leaf is a pmap replica stack: one ``(1, ...)`` shard per local device."""
  count = jax.local_device_count()
  leaves = jax.tree.leaves(tree)
  if count < 2 or not leaves:
    return False
  for leaf in leaves:
    if (not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable or leaf.ndim == 0
        or leaf.shape[0] != count):
      return False
    shards = leaf.addressable_shards
    if len(shards) != count or any(shard.data.shape[0] != 1 for shard in shards):
      return False
  return True


def unreplicate(tree: PyTree, replicated: bool | None = None) -> tuple[PyTree, bool]:
  """``(tree, replicated)`` with pmap replicas reduced to the first one.

  ``replicated=None`` detects it (at start-up); later calls pass the start-up answer.
  """
  if tree is None:
    return None, bool(replicated)
  if replicated is None:
    replicated = is_pmap_replicated(tree)
  if replicated:
    tree = jax.tree.map(lambda a: a.addressable_shards[0].data.reshape(a.shape[1:]), tree)
  return tree, replicated


def has_checkpoint(workdir: str, step: int) -> bool:
  """Whether ``workdir`` holds θ0: on several processes, process 0's answer,
  after checking that every process starts at ``step`` and sees the same workdir."""
  found = checkpoint.has_initial_state(workdir)
  if jax.process_count() == 1:
    return found
  from jax.experimental import multihost_utils
  seen = np.asarray(multihost_utils.process_allgather(np.asarray([step, found], np.int32)))
  if np.any(seen[:, 0] != seen[0, 0]):
    raise ValueError(
        f"Every process must call the hook at every step with the same `step`; its first call "
        f"was at steps {seen[:, 0].tolist()} on processes 0..{len(seen) - 1}.")
  if np.any(seen[:, 1] != seen[0, 1]):
    raise ValueError(
        f"`workdir`={workdir!r} must be one directory shared by every process (a shared "
        f"filesystem): the θ0 checkpoint {checkpoint.checkpoint_path(workdir)} is visible to "
        f"processes {np.flatnonzero(seen[:, 1]).tolist()} only.")
  return bool(seen[0, 1])


def startup_error(error: Exception, with_model_state: bool) -> Exception:
  """The error of an ``apply_fn`` that fails at start-up, with what to change."""
  call = "apply_fn(params, probe_x" + (", model_state)" if with_model_state else ")")
  text = f"{type(error).__name__}: {error}"
  hints = []
  lowered = text.lower()
  if "rng" in lowered or "dropout" in lowered or "prng" in lowered:
    hints.append("the model asks for `rngs` (random numbers, e.g. for Dropout): the hook "
                 "evaluates it deterministically, without rngs; build apply_fn with "
                 "nd.from_linen(model, variables, train=False) or nd.from_nnx(model) (eval "
                 "mode), or pass deterministic=True")
  if "mutable" in lowered or "batch_stats" in lowered:
    hints.append("the model updates its statistics: apply it in inference mode, e.g. "
                 "nd.from_linen(model, variables, train=False), and pass "
                 "model_state={'batch_stats': state.batch_stats} to the hook")
  if "argument" in lowered or "keyword" in lowered:
    hints.append("the model may take its input as a keyword, e.g. apply_fn = "
                 "lambda params, x: model.apply({'params': params}, inputs=x, train=False) "
                 "(nd.from_linen does this for a keyword-only `inputs`)")
  if with_model_state and ("positional" in lowered or "argument" in lowered):
    hints.append("with `model_state=` the hook calls apply_fn(params, x, model_state): "
                 "nd.from_linen and nd.from_nnx build such an apply_fn")
  if not hints:
    hints.append("the hook calls it in inference mode with only params"
                 + (" and model_state" if with_model_state else "") +
                 ": build apply_fn with nd.from_linen(model, variables, train=False) or "
                 "nd.from_nnx(model)")
  message = f"The hook cannot evaluate the model: {call} raised {text}. To fix: " + "; ".join(hints) + "."
  return (TypeError if isinstance(error, TypeError) else ValueError)(message)
