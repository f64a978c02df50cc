"""Parameters as ``.npz`` files keyed by dotted leaf names (for the command line).

The key of each leaf is its dotted key path (``"Dense_0.kernel"``), the
names the θ0 checkpoint uses (:mod:`ntk_diag.checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ntk_diag import _tree

PyTree = Any


def save_params(path: str | os.PathLike, params: PyTree) -> None:
  """Writes ``params`` to ``path`` (``.npz``), one array per leaf."""
  leaves = jax.device_get(jax.tree.leaves(params))
  np.savez(path, **{name: np.asarray(leaf) for name, leaf in zip(_tree.leaf_names(params), leaves)})


def load_params(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
  """Reads a file of :func:`save_params`.

  With ``like`` (a pytree of the model's parameters) the arrays are returned
  in its structure, after checking names and shapes (``ValueError``
  otherwise); without, as nested dicts following the dotted names.
  """
  with np.load(os.fspath(path)) as data:
    flat = {name: data[name] for name in data.files}
  if like is not None:
    names = _tree.leaf_names(like)
    shapes = {name: np.shape(leaf) for name, leaf in zip(names, jax.tree.leaves(like))}
    found = {name: a.shape for name, a in flat.items()}
    if shapes != found:
      raise ValueError(
          f"{os.fspath(path)!r} does not hold parameters of this model: expected"
          f" {sorted(shapes.items())[:5]}..., found {sorted(found.items())[:5]}...")
    return jax.tree.unflatten(jax.tree.structure(like), [flat[name] for name in names])
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    node = nested
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return nested
