"""The single place where kernel layouts are converted.

A full kernel ``K`` of shape ``(n1, n2, k, k)`` is the block matrix whose
entry ``((i, a), (j, b))`` is ``K[i, j, a, b]``; row index ``i·k + a``, the
same row-major order as ``y.reshape(-1)`` for targets ``y`` of shape ``(n, k)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """``(n1, n2, k, k) -> (n1·k, n2·k)``; a 2-D kernel is returned unchanged."""
  if kernel.ndim == 2:
    return kernel
  if kernel.ndim != 4:
    raise ValueError(f"`kernel` must be 2-D (n1, n2) or 4-D (n1, n2, k, k); got shape {kernel.shape}.")
  n1, n2, k1, k2 = kernel.shape
  return jnp.transpose(kernel, (0, 2, 1, 3)).reshape(n1 * k1, n2 * k2)


def matrix_size(kernel: jax.Array) -> int:
  """Side ``n·k`` of the matrix a square kernel is reduced to."""
  return kernel.shape[0] * (kernel.shape[2] if kernel.ndim == 4 else 1)
