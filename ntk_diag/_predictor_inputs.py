"""The kernel predictor's inputs checked and brought to one layout, before any tracing.

Kernel and target shapes, the time ``t``, initial outputs, and the spectrum
check that names a singular kernel and suggests a ridge.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _layout
from ntk_diag import _placement
from ntk_diag import _validation


def loss_name(loss: Any) -> str:
  return repr(loss) if isinstance(loss, str) else getattr(loss, "__name__", "<callable>")


def concrete_bool(value: jax.Array, *, default: bool) -> bool:
  """``bool(value)``, or ``default`` when ``value`` is traced."""
  try:
    return bool(value)
  except jax.errors.ConcretizationTypeError:
    return default


def check_train_shapes(k_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> bool:
  """Validates ``k_train_train`` against ``y_train``; returns whether it is full (4-D)."""
  if len(k_shape) not in (2, 4):
    raise ValueError(
        "`k_train_train` must be 2-D (n, n) or 4-D (n, n, k, k); got shape"
        f" {tuple(k_shape)}.")
  if k_shape[0] != k_shape[1] or (len(k_shape) == 4 and k_shape[2] != k_shape[3]):
    raise ValueError(
        "`k_train_train` must be square, (n, n) or (n, n, k, k); got shape"
        f" {tuple(k_shape)}.")
  n = k_shape[0]
  if len(y_shape) == 0 or y_shape[0] != n:
    raise ValueError(
        f"`y_train` must have n = {n} rows to match `k_train_train` of shape"
        f" {tuple(k_shape)}; got shape {tuple(y_shape)}.")
  if len(k_shape) == 4:
    k = k_shape[2]
    if math.prod(y_shape[1:]) != k:
      raise ValueError(
          f"`y_train` must have k = {k} outputs per example to match `k_train_train`"
          f" of shape {tuple(k_shape)}: expected ({n}, {k}); got {tuple(y_shape)}.")
    return True
  return False


def test_matrix(k_test_train: Any, train_shape: tuple[int, ...],
                 dtype: jnp.dtype) -> jax.Array:
  """``k_test_train`` as an ``(m·k, n·k)`` (full) or ``(m, n)`` (2-D) matrix."""
  _validation.check_float_array("k_test_train", k_test_train)
  shape = tuple(k_test_train.shape)
  expected = "(m, " + ", ".join(str(d) for d in train_shape[1:]) + ")"
  if len(shape) != len(train_shape) or shape[1:] != tuple(train_shape[1:]):
    raise ValueError(
        f"`k_test_train` must have shape {expected} to match `k_train_train` of"
        f" shape {tuple(train_shape)}; got {shape}.")
  if shape[0] == 0:
    raise ValueError("`k_test_train` has no test examples (m = 0).")
  return _layout.kernel_to_matrix(jnp.asarray(k_test_train, dtype))


def test_inputs(k_test_train: Any, f0_test: Any, train_shape: tuple[int, ...],
                out_shape: tuple[int, ...], dtype: jnp.dtype
                ) -> tuple[jax.Array | None, jax.Array | None]:
  """``(kx, f0_test)``: the test-train kernel as a matrix and the test outputs at θ0
  of shape ``(m,) + out_shape``, or ``(None, None)`` without a test kernel."""
  if k_test_train is None:
    if np.ndim(f0_test) != 0:
      raise ValueError(
          "`f0_test` was given but `k_test_train` is None: pass the test-train"
          " kernel to get test predictions.")
    return None, None
  kx = test_matrix(k_test_train, train_shape, dtype)
  m = np.shape(k_test_train)[0]
  return kx, outputs("f0_test", f0_test, (m,) + out_shape, dtype)


def outputs(name: str, value: Any, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  """A scalar or an array of ``shape`` (``(n,)`` and ``(n, 1)`` interchangeable)."""
  if np.ndim(value) == 0:
    return jnp.full(shape, value, dtype)
  _validation.check_targets(name, value, shape)
  return jnp.asarray(value, dtype).reshape(shape)


def check_time(t: Any) -> Any:
  """``None`` for ``t=None`` or ``inf``; ``t`` otherwise (validated when concrete)."""
  if t is None:
    return None
  is_scalar_array = hasattr(t, "shape") and np.ndim(t) == 0
  if isinstance(t, bool) or not (isinstance(t, numbers.Real) or is_scalar_array):
    raise TypeError(f"`t` must be a number >= 0 or None; got {t!r}.")
  try:
    value = float(t)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return t  # traced: validated by the caller's construction
  if math.isnan(value) or value < 0:
    raise ValueError(f"`t` must be >= 0 (or None for t = ∞); got {value}.")
  return None if math.isinf(value) else t


def check_spectrum(matrix: jax.Array, ridge: float, dtype: jnp.dtype) -> dict | None:
  """Host-side float64 checks of ``matrix + ridge·I``; None when traced.

  A matrix sharded across processes is gathered to every process first (a
  collective: every process constructs the predictor).
  """
  if isinstance(matrix, jax.core.Tracer):
    return None
  host = np.asarray(_placement.to_host(matrix), dtype=np.float64)
  if not np.all(np.isfinite(host)):
    raise ValueError("`k_train_train` contains NaN or infinite entries.")
  eps = float(jnp.finfo(dtype).eps)
  scale = float(np.max(np.abs(host))) if host.size else 0.0
  asym = float(np.max(np.abs(host - host.T))) if host.size else 0.0
  if asym > math.sqrt(eps) * scale:
    raise ValueError(
        "`k_train_train` must be symmetric (as an (N, N) matrix); its largest"
        f" asymmetry |K - Kᵀ| is {asym:.3g} for entries up to {scale:.3g}.")
  host = 0.5 * (host + host.T) + ridge * np.eye(host.shape[0])
  evals = np.linalg.eigvalsh(host)
  lam_min, lam_max = float(evals[0]), float(np.max(np.abs(evals)))
  tol = host.shape[0] * eps * lam_max
  info = dict(lam_min=lam_min, lam_max=lam_max, tol=tol, eps=eps,
              singular=lam_min <= tol, dtype=jnp.dtype(dtype).name)
  if lam_min < -tol:
    raise ValueError(
        f"`k_train_train`{' + ridge·I' if ridge else ''} is not positive semi-definite:"
        f" its smallest eigenvalue is {lam_min:.3g} (largest {lam_max:.3g}, rounding"
        f" tolerance {tol:.3g}). An NTK is a Gram matrix; check it was computed on the"
        " training inputs (empirical_ntk(apply_fn, params, x_train)), or pass"
        f" ridge >= {suggest_ridge(info, ridge) - lam_min:.1g}.")
  return info


def suggest_ridge(info: dict, ridge: float) -> float:
  """``sqrt(eps)·λ_max``: condition number ≲ 1/sqrt(eps) keeps half the digits."""
  return max(math.sqrt(info["eps"]) * info["lam_max"], 10 * ridge, 1e-6)


def singular_message(info: dict, ridge: float) -> str:
  return (
      f"`k_train_train`{' + ridge·I' if ridge else ''} is singular to {info['dtype']}"
      f" precision: its smallest eigenvalue {info['lam_min']:.3g} is below the"
      f" tolerance {info['tol']:.3g} (= N·eps·λ_max, λ_max = {info['lam_max']:.3g}),"
      " so t=None (the K⁻¹ interpolator) is undefined. Pass a ridge to"
      f" kernel_predictor, e.g. ridge={suggest_ridge(info, ridge):.1g}, or use a finite t.")
