"""θ0, the probe set and the NTK at θ0, checkpointed with orbax.

Layout: ``{workdir}/ntk_diag/initial`` is an orbax PyTree checkpoint holding
``{"params": {name: array}, "probe_x": ..., "probe_y": ..., "kernel0": ..., "step": ...}``
where ``name`` is the dotted key path of each parameter leaf (for example
``"Dense_0.kernel"``, or ``"layers.0.kernel.value"`` for NNX state). Arrays are
saved from host memory, so θ0 restores bitwise. Orbax writes to a temporary
directory and renames it, so a process killed mid-save leaves no partial
checkpoint behind; an existing checkpoint is never overwritten.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from ntk_diag import _tree

PyTree = Any

CHECKPOINT_SUBDIR = os.path.join("ntk_diag", "initial")


@dataclasses.dataclass(frozen=True)
class InitialState:
  """What the hook needs from the start of training."""
  params: PyTree
  probe_x: PyTree
  probe_y: np.ndarray
  kernel0: np.ndarray | None
  step: int = 0


def checkpoint_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def has_initial_state(workdir: str) -> bool:
  return os.path.isdir(checkpoint_path(workdir))


def _flat_params(params: PyTree) -> dict[str, np.ndarray]:
  leaves = jax.device_get(jax.tree.leaves(params))
  return {name: np.asarray(leaf) for name, leaf in zip(_tree.leaf_names(params), leaves)}


def _signature(flat: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
  return {name: (tuple(a.shape), str(np.dtype(a.dtype))) for name, a in flat.items()}


def save_initial_state(workdir: str, state: InitialState) -> None:
  """Writes the checkpoint; refuses to overwrite an existing one."""
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if os.path.exists(path):
    raise FileExistsError(f"An initial-state checkpoint already exists at {path}; it is never overwritten.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tree = {
      "params": _flat_params(state.params),
      "probe_x": jax.device_get(state.probe_x),
      "probe_y": np.asarray(jax.device_get(state.probe_y)),
      "step": np.asarray(state.step, np.int64),
  }
  if state.kernel0 is not None:
    tree["kernel0"] = np.asarray(jax.device_get(state.kernel0))
  ocp.PyTreeCheckpointer().save(path, tree)


def _restore_raw(workdir: str) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"No ntk_diag initial-state checkpoint under `workdir`={workdir!r} (expected {path}).")
  return ocp.PyTreeCheckpointer().restore(path)


def restore_initial_state(workdir: str, like_params: PyTree) -> InitialState:
  """Restores the checkpoint into the structure of ``like_params``.

  Raises:
    ValueError: if the saved θ0 has different parameter names, shapes or
      dtypes than ``like_params`` (a stale ``workdir`` from another model).
      The checkpoint is left untouched.
  """
  raw = _restore_raw(workdir)
  saved = {name: np.asarray(a) for name, a in raw["params"].items()}
  expected = _signature(_flat_params_shapes(like_params))
  found = _signature(saved)
  if expected != found:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    raise ValueError(
        f"`workdir`={workdir!r} holds θ0 of a different model (stale workdir): "
        f"parameters missing from the checkpoint: {missing[:5]}, unexpected: {extra[:5]}, "
        f"different shape/dtype: {[(n, found[n], expected[n]) for n in changed[:5]]}. "
        "Use a new workdir; the existing checkpoint was not modified.")
  treedef = jax.tree.structure(like_params)
  params = jax.tree.unflatten(treedef, [saved[name] for name in _tree.leaf_names(like_params)])
  kernel0 = raw.get("kernel0")
  return InitialState(params=params, probe_x=raw["probe_x"], probe_y=np.asarray(raw["probe_y"]),
                      kernel0=None if kernel0 is None else np.asarray(kernel0),
                      step=int(raw.get("step", 0)))


def _flat_params_shapes(params: PyTree) -> dict[str, Any]:
  leaves = jax.tree.leaves(params)
  return {name: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
          for name, leaf in zip(_tree.leaf_names(params), leaves)}


def load_initial_params(workdir: str, like: PyTree | None = None) -> PyTree:
  """θ0 saved by :class:`~ntk_diag.LazyTrainingHook` under ``workdir``.

  Args:
    workdir: the hook's ``workdir``.
    like: optional pytree with the structure of the parameters (e.g. the
      current ``state.params``); θ0 is returned in that structure. Without it,
      θ0 is a nested dict following the dotted parameter names.

  Returns:
    θ0 as numpy arrays, bitwise equal to what was saved.
  """
  if like is not None:
    return restore_initial_state(workdir, like).params
  flat = _restore_raw(workdir)["params"]
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    node = nested
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = np.asarray(value)
  return nested
