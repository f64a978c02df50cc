"""Kernel predictor: the linearized network trained by gradient flow, in closed form.

The formulas, the time convention and the loss convention are stated once, in
the docstring of :func:`kernel_predictor`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from jax import lax

from ntk_diag import _layout
from ntk_diag import _validation

_HIGHEST = lax.Precision.HIGHEST


def kernel_predictor(k_train_train: jax.Array, y_train: jax.Array, *,
                     learning_rate: float = 1.0, ridge: float = 0.0) -> Callable[..., jax.Array]:
  """Closed-form predictions of the linearized network under gradient flow.

  For the linearized network ``f_lin(θ, x) = f(θ0, x) + J_x(θ0)(θ − θ0)`` and
  the SUM-of-squares loss ``L(θ) = ½‖f(X) − y‖²`` over all training entries,
  gradient flow ``dθ/dt = −η ∇L(θ)`` gives, with ``K = K_XX`` the NTK at ``θ0``,

  * train: ``f_t(X) = f0(X) + (I − e^{−η t K})(y − f0(X))``,
  * test: ``f_t(x) = f0(x) + K_xX K⁻¹ (I − e^{−η t K})(y − f0(X))``,

  with ``K + ridge·I`` in place of ``K``; ``t = ∞`` gives the interpolator
  ``f0(x) + K_xX K⁻¹ (y − f0(X))``.

  Time: ``η·t`` is learning rate × steps. ``s`` steps of full-batch gradient
  descent with step ``η`` on the sum loss correspond to ``learning_rate=η``,
  ``t=s``; the match is close when ``η·λ_max(K) ≪ 1`` (GD scales each
  eigenmode by ``(1 − ηλ)^s``, the flow by ``e^{−ηλs}``).

  Loss convention: a MEAN loss ``½·mean((f − y)²)`` over ``N`` entries (e.g.
  ``optax.l2_loss(f, y).mean()`` up to its factor) has ``1/N`` times the
  gradient of the sum loss, so pass ``learning_rate = lr / N``.

  Two kernel layouts are accepted:

  * full: ``k_train_train`` of shape ``(n, n, k, k)`` (``empirical_ntk``'s
    default), with ``y_train`` of shape ``(n, *out)``, ``prod(out) = k``. The
    kernel is used as an ``(n·k, n·k)`` matrix and ``y`` is flattened
    row-major, so outputs are coupled through ``K``.
  * 2-D: ``k_train_train`` of shape ``(n, n)``, with ``y_train`` of shape
    ``(n,)`` or ``(n, *out)``; the same kernel is applied to every output
    independently. For a kernel from ``empirical_ntk(..., trace_outputs=True)``
    pass ``K / k`` (the per-output average).

  At construction the kernel is checked in float64 on the host: it must be
  finite, symmetric and positive semi-definite (eigenvalues ``≥ −tol``,
  ``tol = N·eps·λ_max`` with ``N`` the matrix size and ``eps`` the machine
  epsilon of the kernel's dtype), else ``ValueError``. A kernel that is PSD
  but singular (``λ_min ≤ tol``, e.g. duplicated training points) is fine at
  finite ``t``; ``predict(t=None)`` then raises ``ValueError`` suggesting a
  ``ridge``. When ``kernel_predictor`` is itself traced (called inside
  ``jax.jit``) these checks are skipped.

  Args:
    k_train_train: ``(n, n, k, k)`` or ``(n, n)`` kernel on the training inputs.
    y_train: training targets, ``(n, *out)`` (or ``(n,)`` for a 2-D kernel).
    learning_rate: ``η > 0`` of gradient descent on the SUM loss.
    ridge: ``λ ≥ 0``, added to the diagonal of the train kernel. It
      regularises the ``t=None`` solve of ill-conditioned kernels; it also
      damps the dynamics (``e^{−ηt(K + λI)}``), so keep ``η·t·λ ≪ 1`` to stay
      close to the unregularised flow at finite ``t``.

  Returns:
    The function ``predict(t=None, f0_train=0., f0_test=0., k_test_train=None)``
    with arguments

    * ``t``, the training time ``≥ 0``; ``None`` (or ``inf``) means
      ``t = ∞``. It may be a traced scalar (``jax.jit``, ``jax.vmap``).
    * ``f0_train``, the network outputs at ``θ0`` on the training inputs, a
      scalar or an array of ``y_train``'s shape.
    * ``f0_test``, the network outputs at ``θ0`` on the test inputs, a scalar
      or ``(m, *out)``; only used with ``k_test_train``.
    * ``k_test_train``, the ``(m, n, k, k)`` (full) or ``(m, n)`` (2-D) kernel
      between test and training inputs, in the layout of ``k_train_train``.

    ``predict`` returns ``f_t(X)`` of ``y_train``'s shape when
    ``k_test_train`` is None (at ``t = None`` that is ``y_train`` itself), else
    ``f_t(x)`` of shape ``(m, *out)``. Finite ``t`` uses one
    eigendecomposition of ``K + λI``, ``t = None`` one Cholesky factorisation;
    each is computed on first use and reused by later calls.
  """
  _validation.check_float_array("k_train_train", k_train_train)
  _validation.check_float_array("y_train", y_train)
  _validation.check_positive_number("learning_rate", learning_rate)
  _validation.check_nonnegative_number("ridge", ridge)
  kernel = jnp.asarray(k_train_train)
  y = jnp.asarray(y_train)
  full = _check_train_shapes(kernel.shape, y.shape)
  dtype = jnp.promote_types(jnp.result_type(kernel, y), jnp.float32)
  n = kernel.shape[0]
  out_shape = tuple(y.shape[1:])
  num_cols = 1 if full else math.prod(out_shape)

  matrix = _layout.kernel_to_matrix(kernel.astype(dtype))
  size = matrix.shape[0]
  spectrum = _check_spectrum(matrix, float(ridge), dtype)
  matrix = 0.5 * (matrix + matrix.T) + ridge * jnp.eye(size, dtype=dtype)
  y = y.astype(dtype)
  cache = {}

  def factor(name: str, fn: Callable[[jax.Array], Any]) -> Any:
    """``fn(matrix)``, computed once and cached when ``matrix`` is concrete."""
    if spectrum is None:  # kernel_predictor is being traced: nothing to cache
      return fn(matrix)
    if name not in cache:
      with jax.ensure_compile_time_eval():
        cache[name] = fn(matrix)
    return cache[name]

  def predict(t: float | jax.Array | None = None, f0_train: Any = 0.0,
              f0_test: Any = 0.0, k_test_train: jax.Array | None = None) -> jax.Array:
    t = _check_time(t)
    f0_tr = _outputs("f0_train", f0_train, y.shape, dtype)
    residual = (y - f0_tr).reshape(size, num_cols)
    if k_test_train is None:
      if np.ndim(f0_test) != 0:
        raise ValueError(
            "`f0_test` was given but `k_test_train` is None: pass the test-train"
            " kernel to get test predictions.")
    else:
      kx = _test_matrix(k_test_train, kernel.shape, dtype)
      m = kx.shape[0] // (size // n)
      f0_te = _outputs("f0_test", f0_test, (m,) + out_shape, dtype)

    if t is None:
      if spectrum is not None and spectrum["singular"]:
        raise ValueError(_singular_message(spectrum, float(ridge)))
      if k_test_train is None:
        return f0_tr + residual.reshape(y.shape)
      chol, _ = factor("cholesky", _cholesky)
      if spectrum is not None and not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(_singular_message(spectrum, float(ridge)))
      return f0_te + _solve_test(chol, residual, kx).reshape(f0_te.shape)
    evals, evecs = factor("eigh", _eigh)
    eta_t = jnp.asarray(learning_rate * t, dtype)
    if k_test_train is None:
      return f0_tr + _flow_train(evals, evecs, residual, eta_t).reshape(y.shape)
    return f0_te + _flow_test(evals, evecs, residual, eta_t, kx).reshape(f0_te.shape)

  return predict


def _eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  evals, evecs = jnp.linalg.eigh(matrix)
  return jnp.maximum(evals, 0.0), evecs  # PSD up to rounding (checked on the host)


def _cholesky(matrix: jax.Array) -> tuple[jax.Array, bool]:
  return jax.scipy.linalg.cho_factor(matrix, lower=True)


@jax.jit
def _flow_train(evals: jax.Array, evecs: jax.Array, residual: jax.Array,
                eta_t: jax.Array) -> jax.Array:
  """``(I − e^{−ηtK}) r`` from ``K = V diag(λ) Vᵀ``; ``r`` of shape ``(N, c)``."""
  coef = jnp.matmul(evecs.T, residual, precision=_HIGHEST)
  decay = -jnp.expm1(-eta_t * evals)  # 1 − e^{−ηtλ}, accurate for small ηtλ
  return jnp.matmul(evecs, decay[:, None] * coef, precision=_HIGHEST)


@jax.jit
def _flow_test(evals: jax.Array, evecs: jax.Array, residual: jax.Array, eta_t: jax.Array,
               kx: jax.Array) -> jax.Array:
  """``K_xX K⁻¹ (I − e^{−ηtK}) r``; the gain ``(1 − e^{−ηtλ})/λ`` is ``ηt`` at ``λ = 0``."""
  coef = jnp.matmul(evecs.T, residual, precision=_HIGHEST)
  positive = evals > 0
  decay = -jnp.expm1(-eta_t * evals)
  gain = jnp.where(positive, decay / jnp.where(positive, evals, 1.0), eta_t)
  alpha = jnp.matmul(evecs, gain[:, None] * coef, precision=_HIGHEST)
  return jnp.matmul(kx, alpha, precision=_HIGHEST)


@jax.jit
def _solve_test(chol: jax.Array, residual: jax.Array, kx: jax.Array) -> jax.Array:
  """``K_xX K⁻¹ r`` from the lower Cholesky factor of ``K``."""
  alpha = jax.scipy.linalg.cho_solve((chol, True), residual)
  return jnp.matmul(kx, alpha, precision=_HIGHEST)


def _check_train_shapes(k_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> bool:
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


def _test_matrix(k_test_train: Any, train_shape: tuple[int, ...],
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


def _outputs(name: str, value: Any, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  """A scalar or an array of ``shape`` (``(n,)`` and ``(n, 1)`` interchangeable)."""
  if np.ndim(value) == 0:
    return jnp.full(shape, value, dtype)
  _validation.check_targets(name, value, shape)
  return jnp.asarray(value, dtype).reshape(shape)


def _check_time(t: Any) -> Any:
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


def _check_spectrum(matrix: jax.Array, ridge: float, dtype: jnp.dtype) -> dict | None:
  """Host-side float64 checks of ``matrix + ridge·I``; None when traced."""
  try:
    host = np.asarray(matrix, dtype=np.float64)
  except jax.errors.TracerArrayConversionError:
    return None
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
        f" ridge >= {_suggest_ridge(info, ridge) - lam_min:.1g}.")
  return info


def _suggest_ridge(info: dict, ridge: float) -> float:
  """``sqrt(eps)·λ_max``: condition number ≲ 1/sqrt(eps) keeps half the digits."""
  return max(math.sqrt(info["eps"]) * info["lam_max"], 10 * ridge, 1e-6)


def _singular_message(info: dict, ridge: float) -> str:
  return (
      f"`k_train_train`{' + ridge·I' if ridge else ''} is singular to {info['dtype']}"
      f" precision: its smallest eigenvalue {info['lam_min']:.3g} is below the"
      f" tolerance {info['tol']:.3g} (= N·eps·λ_max, λ_max = {info['lam_max']:.3g}),"
      " so t=None (the K⁻¹ interpolator) is undefined. Pass a ridge to"
      f" kernel_predictor, e.g. ridge={_suggest_ridge(info, ridge):.1g}, or use a finite t.")
