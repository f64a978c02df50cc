"""θ0, its model state, the probe set and the NTK at θ0, checkpointed with orbax.

Layout: ``{workdir}/ntk_diag/initial`` is an orbax PyTree checkpoint holding
``{"params": {name: array}, "model_state": {name: array}, "probe_x": ...,
"probe_y": ..., "kernel0": ..., "step": ...}`` where ``name`` is the dotted key
path of each leaf (for example ``"Dense_0.kernel"``, ``"batch_stats.bn.mean"``
or ``"layers.0.kernel.value"`` for NNX state); ``model_state`` and ``kernel0``
are present only when the run has them. Arrays each process can fetch are
saved from host memory; arrays spanning several processes' devices (a
multi-process run, ``jax.distributed.initialize``) are saved as ``jax.Array``s
with orbax's multi-process support, every process writing its own shards, so
every process must call the save and the restore, on a ``workdir`` they all
share. Either way θ0 restores bitwise, as numpy arrays, or as global arrays
of the sharding of the ``like`` tree's leaves that span several processes.
Orbax writes to a temporary directory and renames it, so a process killed
mid-save leaves no partial checkpoint behind; an existing checkpoint is never
overwritten, and one that cannot be read is reported, not touched.
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

from ntk_diag import _placement
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


def _savable(leaf: Any) -> Any:
  """A global array as is (orbax writes each process's shards), anything else on the host."""
  return leaf if _placement.is_global(leaf) else np.asarray(jax.device_get(leaf))


def flat_leaves(tree: PyTree) -> dict[str, Any]:
  """``{dotted name: leaf}`` of ``tree``, as saved: host arrays, or global arrays as is."""
  return {name: _savable(leaf) for name, leaf in zip(_tree.leaf_names(tree), jax.tree.leaves(tree))}


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
  """Writes the checkpoint; refuses to overwrite an existing one.

  In a multi-process run every process must call it (orbax synchronises them).
  """
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if os.path.exists(path):
    raise FileExistsError(f"An initial-state checkpoint already exists at {path}; it is never overwritten.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tree = {
      "params": flat_leaves(state.params),
      "probe_x": jax.tree.map(_savable, state.probe_x),
      "probe_y": _savable(state.probe_y),
      "step": np.asarray(state.step, np.int64),
  }
  if state.model_state is not None and jax.tree.leaves(state.model_state):
    tree["model_state"] = flat_leaves(state.model_state)
  if state.kernel0 is not None:
    tree["kernel0"] = _savable(state.kernel0)
  with _quiet_orbax():
    ocp.PyTreeCheckpointer().save(path, tree)


def _unreadable(workdir: str, error: Exception) -> ValueError:
  path = checkpoint_path(workdir)
  return ValueError(
      f"The θ0 checkpoint under `workdir`={workdir!r} ({path}) cannot be read; it is truncated or"
      f" corrupted ({type(error).__name__}: {str(error)[:300]}). It was left untouched. To start"
      f" fresh, delete {path} or pass a new workdir.")


def _metadata(workdir: str) -> dict[str, Any]:
  """The saved tree's array metadata (names, shapes, dtypes), without reading the data."""
  import orbax.checkpoint as ocp

  path = checkpoint_path(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"No ntk_diag initial-state checkpoint under `workdir`={workdir!r} (expected {path}).")
  try:
    with _quiet_orbax():
      metadata = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    if not isinstance(metadata, dict) or "params" not in metadata or "probe_x" not in metadata:
      raise ValueError("unexpected contents "
                       f"{sorted(metadata) if isinstance(metadata, dict) else type(metadata)}")
  except Exception as error:
    raise _unreadable(workdir, error) from error
  return metadata


def _restore_raw(workdir: str, like: dict[str, PyTree] | None = None,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
  """The saved tree, as numpy arrays except where ``like`` asks for global arrays.

  ``like`` mirrors the saved tree (``{"params": {name: leaf}, "probe_x": ...}``,
  any part may be missing): a saved leaf whose ``like`` leaf spans several
  processes' devices, with the same shape, is restored as a global array of
  that sharding (each process reads its own shards).
  """
  import orbax.checkpoint as ocp

  metadata = _metadata(workdir) if metadata is None else metadata
  targets = {}
  if like is not None:
    paths = jax.tree_util.tree_flatten_with_path(like)[0]
    targets = {jax.tree_util.keystr(path): leaf for path, leaf in paths if _placement.is_global(leaf)}

  def restore_args(path, meta):
    target = targets.get(jax.tree_util.keystr(path))
    if target is None or tuple(target.shape) != tuple(meta.shape):
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=target.sharding, global_shape=tuple(meta.shape),
                                dtype=meta.dtype)

  try:
    with _quiet_orbax():
      return ocp.PyTreeCheckpointer().restore(
          checkpoint_path(workdir),
          restore_args=jax.tree_util.tree_map_with_path(restore_args, metadata))
  except Exception as error:
    raise _unreadable(workdir, error) from error


def _check_matches(workdir: str, what: str, saved: dict[str, Any], like: PyTree) -> None:
  """``saved`` (name -> array or array metadata) has ``like``'s names, shapes and dtypes."""
  expected = _signature(like)
  found = {name: (tuple(a.shape), str(np.dtype(a.dtype))) for name, a in saved.items()}
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


def _unflatten(saved: dict[str, Any], like: PyTree) -> PyTree:
  treedef = jax.tree.structure(like)
  return jax.tree.unflatten(treedef, [saved[name] for name in _tree.leaf_names(like)])


def _by_name(tree: PyTree) -> dict[str, Any]:
  return dict(zip(_tree.leaf_names(tree), jax.tree.leaves(tree)))


def restore_initial_state(workdir: str, like_params: PyTree,
                          like_model_state: PyTree = None, *,
                          with_model_state: bool = True,
                          like_probe_x: PyTree = None) -> InitialState:
  """Restores the checkpoint into the structure of ``like_params`` (and
  ``like_model_state``).

  Names, shapes and dtypes are checked against the checkpoint's metadata
  before any data is read. Leaves of ``like_params``, ``like_model_state`` and
  ``like_probe_x`` that span several processes' devices are restored as
  global arrays of their sharding (every process must call this); every
  other leaf as a numpy array.

  Raises:
    ValueError: the checkpoint cannot be read (truncated, corrupted); its θ0
      has different names, shapes or dtypes than ``like_params`` (a stale
      ``workdir`` from another model); or, with ``with_model_state``, its model
      state does not fit ``like_model_state`` (``None``: the run has none).
      The checkpoint is left untouched.
  """
  metadata = _metadata(workdir)
  _check_matches(workdir, "parameters", metadata["params"], like_params)
  like_state = like_model_state if like_model_state is not None else {}
  if with_model_state:
    _check_matches(workdir, "model-state variables", metadata.get("model_state", {}), like_state)
  like = {"params": _by_name(like_params), "model_state": _by_name(like_state)}
  if like_probe_x is not None:
    like["probe_x"] = like_probe_x
  raw = _restore_raw(workdir, like, metadata)
  model_state = None
  if with_model_state and like_model_state is not None:
    model_state = _unflatten(raw.get("model_state", {}), like_model_state)
  kernel0 = raw.get("kernel0")
  return InitialState(params=_unflatten(raw["params"], like_params), probe_x=raw["probe_x"],
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
    θ0 as numpy arrays, bitwise equal to what was saved; in a multi-process
    run, leaves of ``like`` that span several processes' devices come back as
    global arrays of their sharding (every process must call this).
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
