"""Infinite-width NNGP and NTK of a ``serial`` network, and the distance to them."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _jacobians
from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _validation
from ntk_diag.infinite import _covariance as cv
from ntk_diag.infinite import layers as _layers
from ntk_diag.kernel_stats import safe_div

# Arrays of the size of one pair's covariances alive at the peak of a layer
# (nngp, ntk, the broadcast variances, temporaries of the activation maps),
# plus ``3 · degree`` for a Tanh layer's quadrature.
_ARRAYS_PER_ENTRY = 8


def kernels(net: _layers.Serial, x1, x2=None, *, batch_size: int | None = None,
            memory_budget_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Infinite-width NNGP and NTK of ``net`` between ``x1`` and ``x2``.

  Per output, in neural-tangents' NTK parametrization: every ``Dense``/``Conv``
  computes ``W_std / sqrt(fan_in) · W x + b_std · b`` with ``W, b ~ N(0, 1)``,
  and the kernels are the limits as every width goes to infinity of
  ``nngp[i, j] = E[f(x1_i) f(x2_j)]`` and ``ntk[i, j] = ∇_θ f(x1_i) · ∇_θ f(x2_j)``
  for one output ``f`` (the limit NTK is deterministic). The input covariance
  is ``x1_i · x2_j / d`` (per position, over channels, for images). The
  computation is jitted, in the floating dtype of ``x1`` (float32 for integer
  inputs), and callable inside ``jax.jit`` with ``net`` fixed.

  Args:
    net: a network from :func:`ntk_diag.infinite.serial`.
    x1: ``(n1, d)`` vectors or ``(n1, H, W, C)`` images (NHWC).
    x2: ``(n2, ...)`` with the per-example shape of ``x1``; ``None`` means ``x1``.
    batch_size: examples per block; the kernels are computed in
      ``batch_size × batch_size`` blocks, which bounds peak memory (a
      convolutional network followed by global pooling holds ``(H·W)²``
      covariances per pair of examples). Same result.
    memory_budget_bytes: peak-memory budget used to pick ``batch_size`` when
      it is ``None`` (default: a quarter of the device's memory).

  Returns:
    ``(nngp, ntk)``, each of shape ``(n1, n2)``.
  """
  net = _check_net(net)
  _validation.check_positive_int("batch_size", batch_size, optional=True)
  _validation.check_positive_int("memory_budget_bytes", memory_budget_bytes, optional=True)
  _check_inputs("x1", x1)
  n1 = _validation.leading_size("x1", x1)
  n2 = n1
  if x2 is not None:
    _check_inputs("x2", x2)
    n2 = _validation.leading_size("x2", x2)
    if tuple(np.shape(x1)[1:]) != tuple(np.shape(x2)[1:]):
      raise ValueError(f"`x2` must have the per-example shape of `x1`: x1 has"
                       f" {tuple(np.shape(x1)[1:])}, x2 has {tuple(np.shape(x2)[1:])}.")
  example_shape = tuple(np.shape(x1)[1:])
  layout = _layers.check_network(net, example_shape)
  budget = memory_budget_bytes or _memory.default_budget_bytes()
  fitting = choose_batch_size(net, example_shape, n1, n2, _compute_dtype(x1).itemsize, budget)
  batch_size = _memory.block_size(batch_size, fitting, max(n1, n2), budget,
                                  f"this network on inputs of shape {example_shape}")
  return _kernels_jit(net, x1, x2, layout=layout, batch_size=int(batch_size))


def relative_distance(empirical: jax.Array, infinite: jax.Array) -> jax.Array:
  """``‖K_emp − K_∞‖_F / ‖K_∞‖_F`` (0 where ``K_∞ = 0``); jittable.

  Both kernels are per output: pass ``empirical_ntk(..., trace_outputs=True) / k``
  (the per-output average of the empirical NTK of a ``k``-output network) and
  the ``ntk`` of :func:`kernels`.

  Args:
    empirical: ``(n1, n2)`` empirical NTK, per output.
    infinite: ``(n1, n2)`` infinite-width NTK on the same inputs.

  Returns:
    A scalar.
  """
  for name, value in (("empirical", empirical), ("infinite", infinite)):
    _validation.check_float_array(name, value)
    if len(np.shape(value)) != 2:
      raise ValueError(f"`{name}` must be an (n1, n2) kernel; got shape {np.shape(value)}.")
  if np.shape(empirical) != np.shape(infinite):
    raise ValueError(f"Expected same shape: empirical {np.shape(empirical)} !="
                     f" infinite {np.shape(infinite)}.")
  empirical, infinite = jnp.asarray(empirical), jnp.asarray(infinite)
  return safe_div(jnp.linalg.norm(empirical - infinite), jnp.linalg.norm(infinite))


def choose_batch_size(net: _layers.Serial, example_shape: tuple[int, ...], n1: int, n2: int,
                      itemsize: int, budget_bytes: int) -> int:
  """Largest block of examples whose covariances fit ``budget_bytes``.

  A ``b × b`` block holds ``b² · E · A`` scalars, with ``E`` the entries per
  pair of examples (:func:`ntk_diag.infinite.layers.pair_entries`) and ``A``
  the arrays alive at once (``_ARRAYS_PER_ENTRY``, plus ``3 · degree`` for Tanh).
  """
  entries = _layers.pair_entries(net, example_shape)
  degree = max([layer.degree for layer in net.layers if isinstance(layer, _layers.Tanh)] or [0])
  per_pair = entries * (_ARRAYS_PER_ENTRY + 3 * degree) * itemsize
  block = math.isqrt(max(budget_bytes // per_pair, 1))
  return int(max(1, min(max(n1, n2), block)))


def _check_net(net):
  if isinstance(net, _layers.Layer):
    return _layers.serial(net)
  if not isinstance(net, _layers.Serial):
    raise TypeError(
        "`net` must be a network built with ntk_diag.infinite.serial(...) (or"
        f" ntk_diag.infinite.from_linen); got {type(net).__name__}.")
  return net


def _check_inputs(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"`{name}` must be an array of shape (n, d) or (n, H, W, C); got"
                    f" {type(x).__name__}.")
  if len(np.shape(x)) < 2:
    raise ValueError(f"`{name}` must have shape (n, d) or (n, H, W, C); got {np.shape(x)}.")
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"`{name}` must hold real numbers; got dtype {x.dtype}.")


def _compute_dtype(x) -> np.dtype:
  """The floating dtype of ``x`` (float32 for integers and half precision)."""
  return np.dtype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.jit, static_argnames=("net", "layout", "batch_size"))
def _kernels_jit(net, x1, x2, *, layout, batch_size):
  """``(nngp, ntk)``; ``x2=None`` means ``x1``, with joint covariances on the diagonal tiles."""
  dtype = _compute_dtype(x1)
  x1 = jnp.asarray(x1, dtype)
  n1 = x1.shape[0]

  def block_fn(a, b):
    cov = cv.from_inputs(a, b, layout)
    for layer in net.layers:
      cov = layer.apply(cov)
    ntk = jnp.zeros_like(cov.nngp) if cov.ntk is None else cov.ntk
    return jnp.stack([cov.nngp, ntk], axis=-1)

  if x2 is not None:
    x2 = jnp.asarray(x2, dtype)
    both = _jacobians.blockwise(block_fn, x1, x2, n1, x2.shape[0], batch_size)
  elif batch_size >= n1:
    both = block_fn(x1, None)
  else:
    # Off-diagonal tiles pair different examples; the diagonal tiles, where
    # examples meet themselves, are recomputed jointly (see ``_covariance``).
    both = _jacobians.blockwise(block_fn, x1, x1, n1, n1, batch_size, share=True)
    tiles = _model.pad_to_blocks(x1, n1, batch_size)
    diagonal = lax.map(lambda tile: block_fn(tile, None), tiles)  # (nb, b, b, 2)
    idx = jnp.minimum(jnp.arange(tiles.shape[0] * batch_size), n1 - 1).reshape(tiles.shape[:2])
    both = both.at[idx[:, :, None], idx[:, None, :]].set(diagonal)
  return both[..., 0], both[..., 1]
