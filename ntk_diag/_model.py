"""Views of ``apply_fn(params, x)`` used by every diagnostic.

A model maps a batch ``x`` (array or pytree with a leading batch axis of size
``n``) to outputs of shape ``(n, *out)``; ntk_diag treats the ``k = prod(out)``
outputs per example as a flat vector, in row-major order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def example_output_shape(apply_fn: Callable, params: PyTree, x: PyTree) -> tuple[int, ...]:
  """Per-example output shape ``out`` (traces ``apply_fn`` abstractly, no FLOPs)."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(np.shape(a)[1:]), a.dtype), x)
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
  out = jax.eval_shape(apply_fn, p, one)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
        "`apply_fn` must return a single array of shape (n, ...); got a pytree "
        f"{jax.tree.structure(out)}.")
  if len(out.shape) == 0 or out.shape[0] != 1:
    raise ValueError(
        "`apply_fn` must return outputs with a leading batch axis: for a batch of 1 "
        f"it returned shape {out.shape}.")
  return tuple(out.shape[1:])


def num_outputs(out_shape: tuple[int, ...]) -> int:
  return int(math.prod(out_shape))


def per_example(apply_fn: Callable) -> Callable[[PyTree, PyTree], jax.Array]:
  """``f(params, x_i) -> (k,)`` on a single example (no batch axis)."""
  def f(params: PyTree, xi: PyTree) -> jax.Array:
    xb = jax.tree.map(lambda a: a[None], xi)
    return apply_fn(params, xb).reshape(-1)
  return f


def batched(apply_fn: Callable) -> Callable[[PyTree, PyTree], jax.Array]:
  """``f(params, x) -> (n, k)``."""
  def f(params: PyTree, x: PyTree) -> jax.Array:
    out = apply_fn(params, x)
    return out.reshape(out.shape[0], -1)
  return f


def take(x: PyTree, idx: jax.Array) -> PyTree:
  """Examples ``x[idx]`` of a batch pytree."""
  return jax.tree.map(lambda a: jnp.asarray(a)[idx], x)


def pad_to_blocks(x: PyTree, n: int, block: int) -> PyTree:
  """Batch padded (by repeating the last example) and reshaped to ``(n_blocks, block, ...)``."""
  n_blocks = -(-n // block)
  idx = jnp.minimum(jnp.arange(n_blocks * block), n - 1)
  return jax.tree.map(
      lambda a: jnp.asarray(a)[idx].reshape((n_blocks, block) + tuple(np.shape(a)[1:])), x)


def param_dtype(params: PyTree) -> jnp.dtype:
  leaves = jax.tree.leaves(params)
  return jnp.result_type(*leaves) if leaves else jnp.float32


def bind_model_state(apply_fn: Callable, model_state: Any) -> Callable[[PyTree, PyTree], jax.Array]:
  """``apply_fn(params, x, model_state)`` as a function of ``(params, x)``;
  ``apply_fn`` itself when ``model_state`` is None."""
  if model_state is None:
    return apply_fn
  return lambda params, x: apply_fn(params, x, model_state)
