"""Finite Flax networks in the NTK parametrization, and their infinite-width twins.

``NTKDense``/``NTKConv`` are the finite layers whose width limit ``Dense``/``Conv``
describe: parameters ``N(0, 1)``, forward ``W_std / sqrt(fan_in) · x W +
b_std · b``. :func:`from_linen` maps an ``nn.Sequential`` of such layers,
activations and pooling helpers to the matching :func:`~ntk_diag.infinite.serial`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ntk_diag.infinite import layers as _layers

_normal = nn.initializers.normal(stddev=1.0)


class NTKDense(nn.Module):
  """Dense layer in the NTK parametrization: ``y = W_std / sqrt(d) · x W + b_std · b``.

  ``W`` (``(d, features)``, param ``"kernel"``) and ``b`` (``(features,)``,
  param ``"bias"``, absent when ``b_std == 0``) are ``N(0, 1)``; ``d`` is the
  size of the last axis of ``x``. Its infinite-width limit is
  ``ntk_diag.infinite.Dense(W_std, b_std)``.
  """
  features: int
  W_std: float = 1.0  # pylint: disable=invalid-name
  b_std: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _normal, (fan_in, self.features), jnp.float32)
    # Scale the input, not the weights: the structured empirical NTK then
    # recognises `x @ kernel` as a dense layer.
    y = (x * (self.W_std / math.sqrt(fan_in))) @ kernel
    if self.b_std != 0:
      y = y + self.b_std * self.param("bias", _normal, (self.features,), jnp.float32)
    return y


class NTKConv(nn.Module):
  """Convolution (NHWC, stride 1) in the NTK parametrization.

  ``y = W_std / sqrt(C · prod(kernel_size)) · conv(x, W) + b_std · b`` with
  ``W`` (``(*kernel_size, C, features)``) and ``b`` (``(features,)``, absent
  when ``b_std == 0``) ``N(0, 1)``; ``padding`` is ``"SAME"`` or ``"VALID"``.
  Its infinite-width limit is ``ntk_diag.infinite.Conv(kernel_size, padding, W_std, b_std)``.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: str = "SAME"
  W_std: float = 1.0  # pylint: disable=invalid-name
  b_std: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not isinstance(self.kernel_size, Sequence):
      raise TypeError(f"`kernel_size` must be a sequence of ints, one per spatial axis, e.g."
                      f" (3, 3); got {self.kernel_size!r}.")
    kernel_size = tuple(self.kernel_size)
    channels = x.shape[-1]
    fan_in = channels * math.prod(kernel_size)
    kernel = self.param("kernel", _normal, kernel_size + (channels, self.features), jnp.float32)
    spatial = "".join("HWDXYZ"[:len(kernel_size)])
    dims = lax.conv_dimension_numbers(
        x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    y = lax.conv_general_dilated(x * (self.W_std / math.sqrt(fan_in)), kernel,
                                 (1,) * len(kernel_size), self.padding, dimension_numbers=dims)
    if self.b_std != 0:
      y = y + self.b_std * self.param("bias", _normal, (self.features,), jnp.float32)
    return y


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of ``(n, *S, C)`` -> ``(n, C)`` (``GlobalAvgPool``)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def flatten(x: jax.Array) -> jax.Array:
  """``(n, ...)`` -> ``(n, -1)``, row-major (``Flatten``)."""
  return x.reshape(x.shape[0], -1)


def _functions() -> list[tuple[Callable, Callable[[], _layers.Layer]]]:
  erfs = [jax.scipy.special.erf, lax.erf]
  return ([(f, _layers.Relu) for f in (nn.relu, jax.nn.relu)]
          + [(f, _layers.Tanh) for f in (jnp.tanh, nn.tanh, jax.nn.tanh)]
          + [(f, _layers.Erf) for f in erfs]
          + [(global_avg_pool, _layers.GlobalAvgPool), (flatten, _layers.Flatten)])


SUPPORTED = ("ntk_diag.infinite.NTKDense, ntk_diag.infinite.NTKConv, nn.relu/jax.nn.relu,"
             " jnp.tanh/nn.tanh, jax.scipy.special.erf, ntk_diag.infinite.global_avg_pool,"
             " ntk_diag.infinite.flatten, and nested nn.Sequential")


def from_linen(module: Any) -> _layers.Serial:
  """The infinite-width network of a finite ``nn.Sequential`` in the NTK parametrization.

  Layer by layer: ``NTKDense(features, W_std, b_std)`` -> ``Dense(W_std, b_std)``,
  ``NTKConv(features, kernel_size, padding, W_std, b_std)`` -> ``Conv(kernel_size,
  padding, W_std, b_std)``, ``nn.relu`` -> ``Relu()``, ``jnp.tanh``/``nn.tanh`` ->
  ``Tanh()``, ``jax.scipy.special.erf`` -> ``Erf()``, ``global_avg_pool`` ->
  ``GlobalAvgPool()``, ``flatten`` -> ``Flatten()``; nested ``nn.Sequential``
  are inlined. The widths (``features``) do not enter the limit.

  Args:
    module: an ``nn.Sequential`` (no variables needed).

  Returns:
    The equivalent :func:`~ntk_diag.infinite.serial` network.

  Raises:
    TypeError: ``module`` is not an ``nn.Sequential``, or one of its layers has
      no infinite-width counterpart (the message names the layer). Flax's
      ``nn.Dense``/``nn.Conv`` use the standard parametrization, whose limit
      differs; use ``NTKDense``/``NTKConv``.
  """
  if not isinstance(module, nn.Sequential):
    raise TypeError(
        "`module` must be a flax.linen.Sequential of NTK-parametrized layers and activations"
        f" ({SUPPORTED}); got {type(module).__name__}.")
  return _layers.serial(*_convert(module, "module"))


def _convert(module: nn.Sequential, where: str) -> list[_layers.Layer]:
  out = []
  for i, layer in enumerate(module.layers):
    name = f"{where}.layers[{i}]"
    if isinstance(layer, nn.Sequential):
      out.extend(_convert(layer, name))
    elif isinstance(layer, (NTKDense, NTKConv)):
      try:
        if isinstance(layer, NTKDense):
          out.append(_layers.Dense(W_std=layer.W_std, b_std=layer.b_std))
        else:
          out.append(_layers.Conv(layer.kernel_size, padding=layer.padding,
                                  W_std=layer.W_std, b_std=layer.b_std))
      except (TypeError, ValueError) as e:
        raise type(e)(f"{name} ({type(layer).__name__}): {e}") from e
    else:
      out.append(_convert_function(layer, name))
  return out


def _convert_function(layer: Any, name: str) -> _layers.Layer:
  for fn, make in _functions():
    if layer is fn:
      return make()
  hint = ""
  if isinstance(layer, (nn.Dense, nn.Conv, nn.DenseGeneral)):
    hint = (f" Flax's {type(layer).__name__} uses the standard parametrization; use"
            f" ntk_diag.infinite.{'NTKConv' if isinstance(layer, nn.Conv) else 'NTKDense'}.")
  label = type(layer).__name__ if isinstance(layer, nn.Module) else repr(layer)
  raise TypeError(f"{name} ({label}) has no infinite-width counterpart.{hint}"
                  f" Supported: {SUPPORTED}.")
