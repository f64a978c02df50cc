"""Training losses, as the diagnostics see them: per-example values and ``∇_f``.

A loss is named by ``loss=`` on :func:`ntk_diag.lazy_ratio`,
:class:`~ntk_diag.LazyTrainingHook`, :func:`ntk_diag.kernel_predictor`,
:class:`~ntk_diag.LinearizedTwin` and :func:`ntk_diag.loss_sharpness`:

* ``"mse"`` (default): ``ℓ(f_i, y_i) = ½‖f_i − y_i‖²``, summed over the
  example's outputs; ``∇_f Σ_i ℓ = f − y``.
* ``"softmax_cross_entropy"``: ``ℓ(f_i, y_i) = −Σ_a y_ia log softmax(f_i)_a``
  over the last (class) axis, summed over any other output axes; ``y`` one-hot
  (or any probabilities) of the output's shape, or integer labels of the
  output's shape without its class axis (``(n,)`` for ``(n, k)`` logits);
  ``∇_f Σ_i ℓ = softmax(f) − y``.
* a callable ``loss(outputs, y) -> (n,)`` of per-example losses
  (differentiable in ``outputs``).

The diagnostics use the SUMMED loss ``L = Σ_i ℓ(f_i, y_i)`` (its output
gradient is the residual of the lazy ratio κ); optimisers in training loops
usually take the MEAN, ``L / n``.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _validation

NAMES = ("mse", "softmax_cross_entropy")
LossLike = Union[str, Callable[[jax.Array, jax.Array], jax.Array]]


def check_loss(name: str, loss: Any) -> None:
  """``loss`` is one of :data:`NAMES` or a callable (validated before tracing)."""
  if callable(loss):
    return
  if not isinstance(loss, str):
    raise TypeError(
        f"`{name}` must be one of {NAMES} or a callable loss(outputs, y) -> (n,);"
        f" got {type(loss).__name__}.")
  _validation.check_one_of(name, loss, NAMES)


def uses_labels(loss: LossLike, y_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> bool:
  """Whether ``y`` holds integer class labels (cross-entropy, no class axis)."""
  return (loss == "softmax_cross_entropy" and len(output_shape) >= 2
          and tuple(y_shape) == tuple(output_shape[:-1]))


def check_targets(name: str, y: Any, loss: LossLike, output_shape: tuple[int, ...]) -> None:
  """``y`` fits outputs of shape ``output_shape = (n, *out)`` under ``loss``.

  For ``"mse"`` and ``"softmax_cross_entropy"`` with one-hot targets, ``y`` has
  the output's shape (``(n,)`` and ``(n, 1)`` interchangeable); cross-entropy
  also takes integer labels of shape ``output_shape[:-1]``. A callable loss
  only needs ``n`` examples.
  """
  y_shape = tuple(np.shape(y))
  if callable(loss):
    if not y_shape or y_shape[0] != output_shape[0]:
      raise ValueError(
          f"`{name}` must have {output_shape[0]} examples (leading axis) to match the model"
          f" outputs of shape {tuple(output_shape)}; got shape {y_shape}.")
    return
  if loss == "softmax_cross_entropy":
    if len(output_shape) < 2:
      raise ValueError(
          "`loss='softmax_cross_entropy'` needs outputs with a class axis, (n, ..., classes);"
          f" the model returns shape {tuple(output_shape)}.")
    if uses_labels(loss, y_shape, output_shape):
      dtype = _validation.dtype_of(y)
      if not np.issubdtype(dtype, np.integer):
        raise TypeError(
            f"`{name}` of shape {y_shape} is read as class labels for logits of shape"
            f" {tuple(output_shape)} and must be integers; got dtype {dtype}. Pass one-hot"
            f" targets of shape {tuple(output_shape)} for soft labels.")
      return
    if y_shape != tuple(output_shape):
      raise ValueError(
          f"`{name}` must be one-hot targets of the logits' shape {tuple(output_shape)} or integer"
          f" labels of shape {tuple(output_shape[:-1])} for loss='softmax_cross_entropy';"
          f" got shape {y_shape}.")
    return
  _validation.check_targets(name, y, output_shape)


def prepare_targets(loss: LossLike, y: Any, output_shape: tuple[int, ...]) -> jax.Array:
  """Targets in the layout the loss functions below expect.

  Integer labels become one-hot (float, the outputs' last axis); named-loss
  targets are reshaped to ``output_shape``; a callable loss gets ``y`` as given.
  """
  y = jnp.asarray(y)
  if callable(loss):
    return y
  if uses_labels(loss, tuple(y.shape), output_shape):
    return jax.nn.one_hot(y, output_shape[-1], dtype=jnp.float32)
  return y.reshape(output_shape)


def per_example(loss: LossLike, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``(n,)`` per-example losses; ``y`` from :func:`prepare_targets`."""
  n = outputs.shape[0]
  if callable(loss):
    values = jnp.asarray(loss(outputs, y))
    if values.shape != (n,):
      raise ValueError(
          f"A callable `loss` must return per-example losses of shape ({n},); got {values.shape}.")
    return values
  y = y.astype(outputs.dtype)
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(outputs - y).reshape(n, -1), axis=1)
  log_probs = jax.nn.log_softmax(outputs, axis=-1)
  return -jnp.sum((y * log_probs).reshape(n, -1), axis=1)


def total(loss: LossLike, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``L = Σ_i ℓ(f_i, y_i)``, the summed loss."""
  return jnp.sum(per_example(loss, outputs, y))


def mean(loss: LossLike, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``L / n``, the mean over examples (what optimisers usually minimise)."""
  return jnp.mean(per_example(loss, outputs, y))


def output_gradient(loss: LossLike, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``∇_f L`` of the summed loss, shaped like ``outputs``.

  Closed forms for the named losses (``f − y``; ``softmax(f) − y``), autodiff
  for a callable.
  """
  if loss == "mse":
    return outputs - y.astype(outputs.dtype)
  if loss == "softmax_cross_entropy":
    return jax.nn.softmax(outputs, axis=-1) - y.astype(outputs.dtype)
  return jax.grad(lambda f: total(loss, f, y))(outputs)


def residual_norm(loss: LossLike, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``‖∇_f L‖₂`` over all entries: ``‖f − y‖`` for mse (κ's residual)."""
  return jnp.linalg.norm(output_gradient(loss, outputs, y).reshape(-1))

