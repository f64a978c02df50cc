"""Argument checks, run in Python before any tracing.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong value) with a message that names the argument and states
expected vs actual. Nothing here uses ``assert``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import jax
import numpy as np


def check_callable(name: str, value: Any) -> None:
  if not callable(value):
    raise TypeError(
        f"`{name}` must be callable as {name}(params, x); got {type(value).__name__}.")


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f"`{name}` must be a positive int{' or None' if optional else ''};"
        f" got {value!r} of type {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"`{name}` must be a positive int; got {value}.")


def check_positive_number(name: str, value: Any, *, optional: bool = False) -> None:
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"`{name}` must be a positive number{' or None' if optional else ''};"
        f" got {value!r} of type {type(value).__name__}.")
  if not value > 0:
    raise ValueError(f"`{name}` must be > 0; got {value}.")


def check_nonnegative_number(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a number >= 0; got {value!r}.")
  if not value >= 0:
    raise ValueError(f"`{name}` must be >= 0; got {value}.")


def check_one_of(name: str, value: Any, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def leading_size(name: str, x: Any) -> int:
  """Number of examples ``n`` in a batch (array or pytree of arrays)."""
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"`{name}` is empty: expected a batch of examples, got {x!r}.")
  sizes = set()
  for leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"`{name}` must have a leading batch axis; got a scalar of shape ().")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(
        f"All leaves of `{name}` must have the same leading (batch) size; got {sorted(sizes)}.")
  (n,) = sizes
  if n == 0:
    raise ValueError(f"`{name}` is empty: it has 0 examples (shape[0] == 0).")
  return int(n)


def dtype_of(value: Any) -> np.dtype:
  """The dtype of an array or array-like, without reading the data (an array
  spanning other processes' devices cannot be read)."""
  return np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def example_signature(x: Any) -> Any:
  """Per-example shapes and dtypes of a batch (the batch axis removed)."""
  return jax.tree.map(lambda leaf: (tuple(np.shape(leaf)[1:]), dtype_of(leaf)), x)


def check_same_features(name1: str, x1: Any, name2: str, x2: Any) -> None:
  s1, s2 = example_signature(x1), example_signature(x2)
  if jax.tree.structure(x1) != jax.tree.structure(x2) or s1 != s2:
    raise ValueError(
        f"`{name2}` must have the same per-example shape and dtype as `{name1}`:"
        f" {name1} has {s1}, {name2} has {s2}.")


def check_same_length(name1: str, n1: int, name2: str, n2: int) -> None:
  if n1 != n2:
    raise ValueError(
        f"`{name1}` and `{name2}` must have the same number of examples;"
        f" got {n1} and {n2}.")


def check_targets(name: str, y: Any, output_shape: tuple[int, ...]) -> None:
  """``y`` must have the model's output shape (``(n,)`` and ``(n, 1)`` are interchangeable)."""
  y_shape = tuple(np.shape(y))
  same = y_shape == tuple(output_shape)
  squeezable = int(np.prod(y_shape)) == int(np.prod(output_shape)) and (
      [d for d in y_shape if d != 1] == [d for d in output_shape if d != 1])
  if not (same or squeezable):
    raise ValueError(
        f"`{name}` must match the model output shape {tuple(output_shape)}; got {y_shape}.")


def check_float_array(name: str, value: Any) -> None:
  if not hasattr(value, "shape"):
    raise TypeError(f"`{name}` must be an array; got {type(value).__name__}.")
