"""Kernel predictor: the linearized network trained by gradient flow.

In closed form for the squared loss; for any other differentiable loss by
integrating the kernel gradient flow in function space with diffrax. The
formulas, the time convention and the loss convention are stated once, in the
docstring of :func:`kernel_predictor`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jax import lax

from ntk_diag import _layout
from ntk_diag import _predictor_inputs as predictor_inputs
from ntk_diag import _validation
from ntk_diag import losses

_HIGHEST = lax.Precision.HIGHEST


def kernel_predictor(k_train_train: jax.Array, y_train: jax.Array, *,
                     learning_rate: float = 1.0, ridge: float = 0.0,
                     loss: losses.LossLike = "mse", rtol: float = 1e-5, atol: float = 1e-5,
                     max_steps: int = 16384) -> Callable[..., jax.Array]:
  """Predictions of the linearized network under gradient flow.

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

  Other losses (``loss="softmax_cross_entropy"`` or a callable, see
  :mod:`ntk_diag.losses`): the linearized network's outputs follow the kernel
  gradient flow of the SUMMED loss ``L(f) = Σ_i ℓ(f_i, y_i)``,

  * train: ``df_t(X)/dt = −η K ∇_f L(f_t(X))``,
  * test: ``f_t(x) = f0(x) − η ∫_0^t K_xX ∇_f L(f_s(X)) ds``,

  which ``predict`` integrates over ``s = η·t ∈ [0, η·t]`` (the test outputs
  ride along in the ODE state) with diffrax's adaptive ``Tsit5`` (``rtol``,
  ``atol``, at most ``max_steps`` steps). Only finite ``t``: cross-entropy
  has no ``t = ∞`` limit (logits grow without bound on separable data). The
  kernel must be the full ``(n, n, k, k)`` one (outputs are coupled through
  the loss); a 2-D kernel is accepted only for ``k = 1`` (there it is the full
  kernel). The time and loss conventions are those of the squared loss below.

  Two kernel layouts are accepted for ``loss="mse"``:

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
  ``jax.jit``) these checks are skipped. A kernel sharded across processes
  (``jax.distributed``) is gathered to each process for them: every process
  must construct the predictor, as for any computation on global arrays.

  Args:
    k_train_train: ``(n, n, k, k)`` or ``(n, n)`` kernel on the training inputs.
    y_train: training targets, ``(n, *out)`` (or ``(n,)`` for a 2-D kernel).
    learning_rate: ``η > 0`` of gradient descent on the SUM loss.
    ridge: ``λ ≥ 0``, added to the diagonal of the train kernel. It
      regularises the ``t=None`` solve of ill-conditioned kernels; it also
      damps the dynamics (``e^{−ηt(K + λI)}``), so keep ``η·t·λ ≪ 1`` to stay
      close to the unregularised flow at finite ``t``.
    loss: ``"mse"`` (closed form), ``"softmax_cross_entropy"`` (``y_train``
      one-hot ``(n, k)`` or integer labels ``(n,)``) or a callable
      ``loss(outputs, y) -> (n,)`` of per-example losses, which receives
      outputs of shape ``(n, *out)`` (``out = y_train.shape[1:]`` when
      ``prod(out) = k``, else ``(k,)``).
    rtol, atol: tolerances of the adaptive ODE solver (other losses only).
    max_steps: step budget of the ODE solver; ``predict`` raises
      ``ValueError`` when it runs out (a long, stiff flow: large ``η·t·λ_max``).

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
  losses.check_loss("loss", loss)
  if not (isinstance(loss, str) and loss == "mse"):
    _validation.check_positive_number("rtol", rtol)
    _validation.check_positive_number("atol", atol)
    _validation.check_positive_int("max_steps", max_steps)
    return _flow_predictor(k_train_train, y_train, learning_rate=learning_rate, ridge=ridge,
                           loss=loss, rtol=rtol, atol=atol, max_steps=max_steps)
  kernel = jnp.asarray(k_train_train)
  y = jnp.asarray(y_train)
  full = predictor_inputs.check_train_shapes(kernel.shape, y.shape)
  dtype = jnp.promote_types(jnp.result_type(kernel, y), jnp.float32)
  out_shape = tuple(y.shape[1:])
  num_cols = 1 if full else math.prod(out_shape)

  matrix = _layout.kernel_to_matrix(kernel.astype(dtype))
  size = matrix.shape[0]
  spectrum = predictor_inputs.check_spectrum(matrix, float(ridge), dtype)
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
    t = predictor_inputs.check_time(t)
    f0_tr = predictor_inputs.outputs("f0_train", f0_train, y.shape, dtype)
    residual = (y - f0_tr).reshape(size, num_cols)
    kx, f0_te = predictor_inputs.test_inputs(k_test_train, f0_test, kernel.shape, out_shape,
                                             dtype)

    if t is None:
      if spectrum is not None and spectrum["singular"]:
        raise ValueError(predictor_inputs.singular_message(spectrum, float(ridge)))
      if k_test_train is None:
        return f0_tr + residual.reshape(y.shape)
      chol, _ = factor("cholesky", _cholesky)
      if spectrum is not None and not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(predictor_inputs.singular_message(spectrum, float(ridge)))
      return f0_te + _solve_test(chol, residual, kx).reshape(f0_te.shape)
    evals, evecs = factor("eigh", _eigh)
    eta_t = jnp.asarray(learning_rate * t, dtype)
    if k_test_train is None:
      return f0_tr + _flow_train(evals, evecs, residual, eta_t).reshape(y.shape)
    return f0_te + _flow_test(evals, evecs, residual, eta_t, kx).reshape(f0_te.shape)

  return predict


def _flow_predictor(k_train_train, y_train, *, learning_rate, ridge, loss, rtol, atol,
                    max_steps) -> Callable[..., jax.Array]:
  """``predict`` integrating the kernel gradient flow of a non-squared loss."""
  kernel = jnp.asarray(k_train_train)
  y = jnp.asarray(y_train)
  out_shape = _flow_output_shape(kernel.shape, y, loss)
  n = kernel.shape[0]
  losses.check_targets("y_train", y, loss, (n,) + out_shape)
  targets = losses.prepare_targets(loss, y, (n,) + out_shape)
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  matrix = _layout.kernel_to_matrix(kernel.astype(dtype))
  spectrum = predictor_inputs.check_spectrum(matrix, float(ridge), dtype)
  matrix = 0.5 * (matrix + matrix.T) + ridge * jnp.eye(matrix.shape[0], dtype=dtype)
  if jnp.issubdtype(targets.dtype, jnp.floating):
    targets = targets.astype(dtype)
  options = dict(loss=loss, out_shape=out_shape, rtol=float(rtol), atol=float(atol),
                 max_steps=int(max_steps))

  def predict(t: float | jax.Array, f0_train: Any = 0.0, f0_test: Any = 0.0,
              k_test_train: jax.Array | None = None) -> jax.Array:
    if predictor_inputs.check_time(t) is None:
      raise ValueError(
          f"`t` must be finite for loss={predictor_inputs.loss_name(loss)}: its kernel"
          " gradient flow has no closed-form t = ∞ limit (cross-entropy logits grow"
          " without bound on separable data); pass the training time, e.g. the number"
          " of steps.")
    f0_tr = predictor_inputs.outputs("f0_train", f0_train, (n,) + out_shape, dtype)
    kx, f0_te = predictor_inputs.test_inputs(k_test_train, f0_test, kernel.shape, out_shape,
                                             dtype)
    span = jnp.asarray(learning_rate * t, dtype)
    f_train, f_test, ok = _solve_flow(matrix, kx, targets, f0_tr, f0_te, span, **options)
    if spectrum is not None and not predictor_inputs.concrete_bool(ok, default=True):
      raise ValueError(
          "The ODE solver of the kernel gradient flow"
          f" (loss={predictor_inputs.loss_name(loss)}) used up max_steps={max_steps}"
          f" before t = {t}: the flow is stiff over this span"
          f" (η·t·λ_max = {float(span) * spectrum['lam_max']:.3g}). Pass a larger"
          " `max_steps` to kernel_predictor, or looser rtol/atol.")
    return f_train if k_test_train is None else f_test

  return predict


@functools.partial(jax.jit, static_argnames=("loss", "out_shape", "rtol", "atol", "max_steps"))
def _solve_flow(matrix, kx, targets, f0_train, f0_test, span, *, loss, out_shape, rtol, atol,
                max_steps):
  """``(f_train, f_test, ok)`` at ``s = span`` of ``df/ds = −K ∇_f L(f)``.

  Unsuccessful solves (``ok = False``) return NaN outputs.
  """
  import diffrax  # imported on first use: ~1 s, and only this path needs it

  n = targets.shape[0]

  def gradient(f_flat):
    f = f_flat.reshape((n,) + out_shape)
    return losses.output_gradient(loss, f, targets).reshape(-1)

  def vector_field(s, state, args):
    g = gradient(state[0])
    d_train = -jnp.matmul(matrix, g, precision=_HIGHEST)
    d_test = None if state[1] is None else -jnp.matmul(args, g, precision=_HIGHEST)
    return d_train, d_test

  state0 = (f0_train.reshape(-1), None if f0_test is None else f0_test.reshape(-1))
  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=jnp.zeros_like(span), t1=span,
      dt0=None, y0=state0, args=kx, saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, throw=False)
  ok = solution.result == diffrax.RESULTS.successful
  f_train, f_test = solution.ys
  f_train = jnp.where(ok, f_train[0], jnp.nan).reshape(f0_train.shape)
  if f_test is not None:
    f_test = jnp.where(ok, f_test[0], jnp.nan).reshape(f0_test.shape)
  return f_train, f_test, ok


def _flow_output_shape(k_shape: tuple[int, ...], y: jax.Array, loss: Any) -> tuple[int, ...]:
  """Per-example output shape ``out`` of the flow; validates the kernel layout."""
  if len(k_shape) not in (2, 4) or k_shape[0] != k_shape[1] or (
      len(k_shape) == 4 and k_shape[2] != k_shape[3]):
    raise ValueError(
        "`k_train_train` must be square, 2-D (n, n) or 4-D (n, n, k, k); got shape"
        f" {tuple(k_shape)}.")
  n = k_shape[0]
  if y.ndim == 0 or y.shape[0] != n:
    raise ValueError(
        f"`y_train` must have n = {n} rows to match `k_train_train` of shape"
        f" {tuple(k_shape)}; got shape {tuple(y.shape)}.")
  k = k_shape[2] if len(k_shape) == 4 else 1
  labels = y.ndim == 1 and jnp.issubdtype(y.dtype, jnp.integer)
  out = tuple(y.shape[1:]) if math.prod(y.shape[1:]) == k and not (labels and k > 1) else (k,)
  if loss == "softmax_cross_entropy" and (len(k_shape) == 2 or k < 2):
    raise ValueError(
        "loss='softmax_cross_entropy' needs the full (n, n, k, k) kernel of k >= 2 logits"
        " (empirical_ntk's default, trace_outputs=False): the softmax couples the outputs,"
        f" so a per-output kernel does not determine the flow; got shape {tuple(k_shape)}."
        " For the kernel K ⊗ I of a per-output (n, n) kernel K pass"
        " K[:, :, None, None] * jnp.eye(k).")
  if len(k_shape) == 2 and math.prod(y.shape[1:]) != 1:
    raise ValueError(
        f"A 2-D `k_train_train` is the full kernel only for one output per example; for"
        f" `y_train` of shape {tuple(y.shape)} and loss={predictor_inputs.loss_name(loss)}"
        " pass the full (n, n, k, k) kernel (or K[:, :, None, None] * jnp.eye(k) for K ⊗ I).")
  return out


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
