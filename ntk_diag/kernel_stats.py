"""Summary statistics of an NTK snapshot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ntk_diag import _layout
from ntk_diag import _validation


def kernel_stats(kernel: jax.Array, *, K0: jax.Array | None = None, y: jax.Array | None = None,
                 top_k: int = 10) -> dict[str, jax.Array]:
  """Spectrum, drift and alignment of a kernel.

  A 4-D kernel ``(n, n, k, k)`` is first reduced to the ``(n·k, n·k)`` matrix
  ``M`` (see :mod:`ntk_diag._layout`); a 2-D kernel is used as is. Let ``N``
  be its size and ``λ`` its eigenvalues (of the symmetrised matrix).

  Returns a dict of scalar arrays (``float()`` works on each):
    ``trace``; ``eig_max``; ``eig_min``; ``condition_number =
    λ_max / max(λ_min, eps·λ_max)`` (``eps`` the dtype's machine epsilon, so it
    stays finite for singular kernels); ``eigenvalues``: the ``min(top_k, N)``
    largest, descending. With ``K0``: ``kernel_drift = ‖M − M0‖_F / ‖M0‖_F`` and
    ``kernel_distance = 1 − ⟨M, M0⟩_F / (‖M‖_F ‖M0‖_F)``. With ``y`` (reshaped to
    ``(N, -1)``, i.e. ``(n,)``/``(n, k)`` for a 2-D kernel and ``(n, k)`` flattened
    for a 4-D one): ``kernel_alignment = ⟨M_c, Y_c Y_cᵀ⟩_F / (‖M_c‖_F ‖Y_c Y_cᵀ‖_F)``
    with ``M_c = HMH``, ``Y_c = HY``, ``H = I − 11ᵀ/N``. Ratios with a zero
    denominator are reported as 0.
  """
  _validation.check_float_array("K", kernel)
  _validation.check_positive_int("top_k", top_k)
  matrix = _layout.kernel_to_matrix(jnp.asarray(kernel))
  if matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"`K` must be square after reduction to (n·k, n·k); got {matrix.shape}.")
  size = matrix.shape[0]
  if K0 is not None:
    _validation.check_float_array("K0", K0)
    if tuple(K0.shape) != tuple(kernel.shape):
      raise ValueError(f"`K0` must have the shape of `K` {tuple(kernel.shape)}; got {tuple(K0.shape)}.")
  if y is not None:
    y = jnp.asarray(y)
    if y.size % size or y.shape[0] != kernel.shape[0]:
      raise ValueError(
          f"`y` must have {kernel.shape[0]} examples"
          f" matching `K` of shape {tuple(kernel.shape)}; got y of shape {tuple(y.shape)}.")
  matrix0 = None if K0 is None else _layout.kernel_to_matrix(jnp.asarray(K0))
  targets = None if y is None else y.reshape(size, -1)
  return _stats(matrix, matrix0, targets, top_k=min(top_k, size))


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, 0 where ``den == 0``; NaN stays NaN."""
  return jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))


def center(matrix: jax.Array) -> jax.Array:
  """``H M H`` with ``H = I − 11ᵀ/N``, without forming ``H``."""
  matrix = matrix - matrix.mean(axis=0, keepdims=True)
  return matrix - matrix.mean(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames="top_k")
def _stats(matrix, matrix0, targets, *, top_k):
  matrix = 0.5 * (matrix + matrix.T)
  eigenvalues = jnp.linalg.eigvalsh(matrix)  # ascending
  eig_max, eig_min = eigenvalues[-1], eigenvalues[0]
  eps = jnp.finfo(matrix.dtype).eps
  floor = jnp.maximum(eps * jnp.abs(eig_max), jnp.finfo(matrix.dtype).tiny)
  out = {
      "trace": jnp.trace(matrix),
      "eig_max": eig_max,
      "eig_min": eig_min,
      "condition_number": jnp.abs(eig_max) / jnp.maximum(eig_min, floor),
      "eigenvalues": eigenvalues[::-1][:top_k],
  }
  if matrix0 is not None:
    norm = jnp.linalg.norm(matrix)
    norm0 = jnp.linalg.norm(matrix0)
    out["kernel_drift"] = safe_div(jnp.linalg.norm(matrix - matrix0), norm0)
    cosine = safe_div(jnp.vdot(matrix, matrix0), norm * norm0)
    out["kernel_distance"] = jnp.where(norm * norm0 == 0, 0.0, jnp.clip(1.0 - cosine, 0.0, 2.0))
  if targets is not None:
    centered = center(matrix)
    y_centered = targets - targets.mean(axis=0, keepdims=True)
    target_kernel = y_centered @ y_centered.T
    out["kernel_alignment"] = safe_div(
        jnp.vdot(centered, target_kernel),
        jnp.linalg.norm(centered) * jnp.linalg.norm(target_kernel))
  return out
