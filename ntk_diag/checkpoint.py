"""θ0, its model state, the probe set and the NTK at θ0, checkpointed with orbax.

Layout: ``{workdir}/ntk_diag/initial`` is an orbax PyTree checkpoint holding
``{"params": {name: array}, "model_state": {name: array}, "probe_x": ...,
"probe_y": ..., "kernel0": ..., "step": ...}`` where ``name`` is the dotted key
path of each leaf (for example ``"Dense_0.kernel"``, ``"batch_stats.bn.mean"``
or ``"layers.0.kernel.value"`` for NNX state); ``model_state`` and ``kernel0``
are present only when the run has them. Arrays are saved from host memory, so
θ0 restores bitwise. Orbax writes to a temporary directory and renames it, so a
process killed mid-save leaves no partial checkpoint behind; an existing
checkpoint is never overwritten, and one that cannot be read is reported, not
touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import Any, Iterator

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
  model_state: PyTree = None


def checkpoint_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def has_initial_state(workdir: str) -> bool:
  return os.path.isdir(checkpoint_path(workdir))


def flat_leaves(tree: PyTree) -> dict[str, np.ndarray]:
  """``{dotted name: host array}`` of the leaves of ``tree``."""
  leaves = jax.device_get(jax.tree.leaves(tree))
  return {name: np.asarray(leaf) for name, leaf in zip(_tree.leaf_names(tree), leaves)}


def _signature(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  return {name: (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
          for name, leaf in zip(_tree.leaf_names(tree), jax.tree.leaves(tree))}


# --------------------------------------------------------------------- logging


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO/DEBUG records while ntk_diag saves or restores θ0."""
  active = 0
  lock = threading.Lock()

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.active and record.levelno < logging.WARNING
                and "orbax" in (record.pathname or ""))


_FILTER = _QuietOrbax()


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Orbax logs a dozen INFO lines per save through absl (shown at absl's default
  verbosity, e.g. under ``absl.app``); keep them out of the user's log."""
  logger = logging.getLogger("absl")
  with _QuietOrbax.lock:
    if not _QuietOrbax.active:
      logger.addFilter(_FILTER)
    _QuietOrbax.active += 1
  try:
    yield
  finally:
    with _QuietOrbax.lock:
      _QuietOrbax.active -= 1
      if not _QuietOrbax.active:
        logger.removeFilter(_FILTER)


# ------------------------------------------------------------------ save/restore


def save_initial_state(workdir: str, state: InitialState) -> None:
  """Writes the checkpoint; refuses to overwrite an existing one."""
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if os.path.exists(path):
    raise FileExistsError(f"An initial-state checkpoint already exists at {path}; it is never overwritten.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tree = {
      "params": flat_leaves(state.params),
      "probe_x": jax.device_get(state.probe_x),
      "probe_y": np.asarray(jax.device_get(state.probe_y)),
      "step": np.asarray(state.step, np.int64),
  }
  if state.model_state is not None and jax.tree.leaves(state.model_state):
    tree["model_state"] = flat_leaves(state.model_state)
  if state.kernel0 is not None:
    tree["kernel0"] = np.asarray(jax.device_get(state.kernel0))
  with _quiet_orbax():
    ocp.PyTreeCheckpointer().save(path, tree)


def _restore_raw(workdir: str) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"No ntk_diag initial-state checkpoint under `workdir`={workdir!r} (expected {path}).")
  try:
    with _quiet_orbax():
      raw = ocp.PyTreeCheckpointer().restore(path)
    if not isinstance(raw, dict) or "params" not in raw or "probe_x" not in raw:
      raise ValueError(f"unexpected contents {sorted(raw) if isinstance(raw, dict) else type(raw)}")
  except Exception as error:
    raise ValueError(
        f"The θ0 checkpoint under `workdir`={workdir!r} ({path}) cannot be read; it is truncated or"
        f" corrupted ({type(error).__name__}: {str(error)[:300]}). It was left untouched. To start"
        f" fresh, delete {path} or pass a new workdir.") from error
  return raw


def _check_matches(workdir: str, what: str, saved: dict[str, np.ndarray], like: PyTree) -> None:
  expected = _signature(like)
  found = {name: (tuple(a.shape), str(a.dtype)) for name, a in saved.items()}
  if expected == found:
    return
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  changed = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
  raise ValueError(
      f"`workdir`={workdir!r} holds θ0 of a different model (stale workdir): {what} missing from"
      f" the checkpoint: {missing[:5]}, unexpected: {extra[:5]}, different shape/dtype:"
      f" {[(n, found[n], expected[n]) for n in changed[:5]]}. Use a new workdir, or delete"
      f" {checkpoint_path(workdir)} to start fresh; the existing checkpoint was not modified.")


def _unflatten(saved: dict[str, np.ndarray], like: PyTree) -> PyTree:
  treedef = jax.tree.structure(like)
  return jax.tree.unflatten(treedef, [saved[name] for name in _tree.leaf_names(like)])


def restore_initial_state(workdir: str, like_params: PyTree,
                          like_model_state: PyTree = None, *,
                          with_model_state: bool = True) -> InitialState:
  """Restores the checkpoint into the structure of ``like_params`` (and
  ``like_model_state``).

  Raises:
    ValueError: the checkpoint cannot be read (truncated, corrupted); its θ0
      has different names, shapes or dtypes than ``like_params`` (a stale
      ``workdir`` from another model); or, with ``with_model_state``, its model
      state does not fit ``like_model_state`` (``None``: the run has none).
      The checkpoint is left untouched.
  """
  raw = _restore_raw(workdir)
  saved = {name: np.asarray(a) for name, a in raw["params"].items()}
  _check_matches(workdir, "parameters", saved, like_params)
  model_state = None
  if with_model_state:
    like = like_model_state if like_model_state is not None else {}
    saved_state = {name: np.asarray(a) for name, a in raw.get("model_state", {}).items()}
    _check_matches(workdir, "model-state variables", saved_state, like)
    model_state = _unflatten(saved_state, like_model_state) if like_model_state is not None else None
  kernel0 = raw.get("kernel0")
  return InitialState(params=_unflatten(saved, like_params), probe_x=raw["probe_x"],
                      probe_y=np.asarray(raw["probe_y"]),
                      kernel0=None if kernel0 is None else np.asarray(kernel0),
                      step=int(raw.get("step", 0)), model_state=model_state)


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
    return restore_initial_state(workdir, like, with_model_state=False).params
  return _nested(_restore_raw(workdir)["params"])


def load_initial_model_state(workdir: str, like: PyTree | None = None) -> PyTree:
  """θ0's model state (e.g. ``{"batch_stats": ...}``), or ``None`` if the run had none."""
  raw = _restore_raw(workdir)
  if "model_state" not in raw:
    return None
  if like is not None:
    return _unflatten({n: np.asarray(a) for n, a in raw["model_state"].items()}, like)
  return _nested(raw["model_state"])


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    node = nested
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = np.asarray(value)
  return nested
