"""Independent dense references used by the tests (one place).

The NTK is rebuilt from a dense Jacobian on ravelled parameters
(``jax.flatten_util.ravel_pytree`` + ``jax.jacrev``), in float64 NumPy for the
contraction, and Hessians come from ``jax.hessian`` on the same ravelled
parameters, so the library is never compared only against itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def dense_jacobian(apply_fn, params, x) -> np.ndarray:
  """``(n, k, P)`` Jacobian of the outputs w.r.t. the ravelled parameters."""
  flat, unravel = ravel_pytree(params)
  n = jax.tree.leaves(x)[0].shape[0]

  def f(flat_params):
    return apply_fn(unravel(flat_params), x).reshape(n, -1)

  jac = jax.jit(jax.jacrev(f))(flat)  # (n, k, P)
  return np.asarray(jac, dtype=np.float64)


def dense_hessians(apply_fn, params, x) -> np.ndarray:
  """``(n, k, P, P)`` float64 Hessians of every output at every example."""
  flat, unravel = ravel_pytree(params)

  def one(flat_params, xi):
    return apply_fn(unravel(flat_params), jax.tree.map(lambda a: a[None], xi)).reshape(-1)

  return np.asarray(jax.jit(jax.vmap(jax.hessian(one), (None, 0)))(flat, x), np.float64)


def ntk_from_jacobians(j1, j2, *, trace_outputs=False) -> np.ndarray:
  """``einsum('iap,jbp->ijab')`` (or ``'iap,jap->ij'`` when traced) in float64."""
  if trace_outputs:
    return np.einsum("iap,jap->ij", j1, j2)
  return np.einsum("iap,jbp->ijab", j1, j2)


def dense_ntk(apply_fn, params, x1, x2=None, *, trace_outputs=False) -> np.ndarray:
  """``K_ref[i, j, a, b] = J1[i, a] · J2[j, b]`` (or its output trace), float64.

  The Jacobian of ``x1`` and ``x2`` stacked is taken in one ``jacrev``.
  """
  if x2 is None:
    jac = dense_jacobian(apply_fn, params, x1)
    return ntk_from_jacobians(jac, jac, trace_outputs=trace_outputs)
  n1 = jax.tree.leaves(x1)[0].shape[0]
  both = jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), x1, x2)
  jac = dense_jacobian(apply_fn, params, both)
  return ntk_from_jacobians(jac[:n1], jac[n1:], trace_outputs=trace_outputs)


def rel_fro_error(actual, expected) -> float:
  """``‖actual − expected‖_F / ‖expected‖_F`` in float64."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(f"shape mismatch: {actual.shape} != {expected.shape}")
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def rel_err(actual, expected) -> float:
  """Largest elementwise ``|actual − expected| / |expected|`` in float64."""
  actual = np.asarray(actual, dtype=np.float64)
  return float(np.max(np.abs(actual - expected) / np.abs(expected)))


# Relative Frobenius error allowed for a float32 NTK against the float64 dense
# reference: measured <= 1.8e-7 over every method, model and layout of
# tests/test_ntk.py and tests/test_structured.py (2026-11-29), so ~50x margin.
NTK_TOL = 1e-5


def assert_close_fro(actual, expected, tol=NTK_TOL):
  err = rel_fro_error(actual, expected)
  assert err <= tol, f"relative Frobenius error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------- the hook


def hessian_spectral_norms(hessians) -> np.ndarray:
  """``(n, k)`` largest ``|eigenvalue|`` of each dense Hessian (float64)."""
  return np.abs(np.linalg.eigvalsh(hessians)).max(axis=-1)


def loss_gradient(loss, outputs, y) -> np.ndarray:
  """``∇_f`` of the summed loss in float64: ``f − y`` or ``softmax(f) − y`` (y one-hot)."""
  outputs = np.asarray(outputs, np.float64)
  y = np.asarray(y, np.float64).reshape(outputs.shape)
  if loss == "mse":
    return outputs - y
  shifted = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True) - y


def kernel_scalars(kernel, kernel0, y) -> dict:
  """The NTK-group scalars of a 2-D kernel in float64 (formulas of docs/metrics.md)."""
  kernel = np.asarray(kernel, np.float64)
  kernel0 = np.asarray(kernel0, np.float64)
  evals = np.linalg.eigvalsh(0.5 * (kernel + kernel.T))
  eps = np.finfo(np.float32).eps
  norm, norm0 = np.linalg.norm(kernel), np.linalg.norm(kernel0)
  n = kernel.shape[0]
  center = np.eye(n) - np.ones((n, n)) / n
  yc = center @ np.asarray(y, np.float64).reshape(n, -1)
  kc = center @ kernel @ center
  target = yc @ yc.T
  return {
      "ntk_trace": np.trace(kernel),
      "ntk_eig_max": evals[-1],
      "ntk_eig_min": evals[0],
      "ntk_condition_number": abs(evals[-1]) / max(evals[0], eps * abs(evals[-1])),
      "kernel_drift": np.linalg.norm(kernel - kernel0) / norm0,
      "kernel_distance": 1.0 - np.sum(kernel * kernel0) / (norm * norm0),
      "kernel_alignment": np.sum(kc * target) / (np.linalg.norm(kc) * np.linalg.norm(target)),
      "eigenvalues": evals[::-1],
  }
