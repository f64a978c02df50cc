"""Gaussian expectations of activations: the two maps an activation layer needs.

For ``(u, v) ~ N(0, [[c11, c12], [c12, c22]])`` each activation ``σ`` gives

* ``E[σ(u) σ(v)]``   — the next NNGP entry,
* ``E[σ'(u) σ'(v)]`` — the factor that multiplies the NTK entry,

as pure elementwise functions of ``(c12, c11, c22)`` (broadcasting arrays), plus
``E[σ(u)²]`` for ``u ~ N(0, c)`` (a variance that is known to sit on the diagonal).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _sqrt_pos(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(x, 0.0))


def relu(c12, c11, c22):
  """Arc-cosine kernels of order 1 and 0 (Cho & Saul 2009).

  With ``θ = arccos(c12 / sqrt(c11 c22))``:
  ``E[relu(u) relu(v)] = (sqrt(c11 c22 − c12²) + (π − θ) c12) / (2π)`` and
  ``E[1{u > 0} 1{v > 0}] = (π − θ) / (2π)``. ``θ`` is computed as
  ``atan2(sqrt(c11 c22 − c12²), c12)`` (``π/2`` where both vanish), as in
  neural-tangents, with ``c11 c22 − c12² = (s − c12)(s + c12)``,
  ``s = sqrt(c11 c22)``: exactly 0 for an input paired with itself. The map is
  not Lipschitz there (``θ ≈ sqrt(2(1 − ρ))``), so a rounding residue of
  ``c11 c22 − c12²`` would shift the NTK diagonal by ~1e-4 per layer.
  """
  s = jnp.sqrt(c11 * c22)
  root = _sqrt_pos((s - c12) * (s + c12))
  theta = jnp.where((root == 0) & (c12 == 0), jnp.pi / 2, jnp.arctan2(root, c12))
  dot = (jnp.pi - theta) / (2 * jnp.pi)
  return root / (2 * jnp.pi) + dot * c12, dot


def relu_diag(c):
  """``E[relu(u)²] = c / 2``."""
  return 0.5 * c


def erf(c12, c11, c22):
  """Arcsine kernel (Williams 1997) and its derivative counterpart.

  ``E[erf(u) erf(v)] = (2/π) arcsin(2 c12 / sqrt((1 + 2c11)(1 + 2c22)))`` and
  ``E[erf'(u) erf'(v)] = (4/π) / sqrt((1 + 2c11)(1 + 2c22) − 4 c12²)``.
  """
  root = _sqrt_pos((1 + 2 * c11) * (1 + 2 * c22) - 4 * c12 * c12)
  return (2 / jnp.pi) * jnp.arctan2(2 * c12, root), (4 / jnp.pi) / root


def erf_diag(c):
  """``E[erf(u)²] = (2/π) arcsin(2c / (1 + 2c))``."""
  return (2 / jnp.pi) * jnp.arctan2(c, jnp.sqrt(c + 0.25))


@functools.lru_cache(maxsize=None)
def hermite_rule(degree: int) -> tuple[np.ndarray, np.ndarray]:
  """Gauss–Hermite nodes and weights for ``∫ e^{−z²} g(z) dz``, float64."""
  return np.polynomial.hermite.hermgauss(degree)


def _tanh_prime(x):
  return 1.0 - jnp.tanh(x) ** 2


def gauss_hermite(fn, dfn, degree: int):
  """``(c12, c11, c22) -> (E[fn(u) fn(v)], E[dfn(u) dfn(v)])`` by quadrature.

  A ``degree × degree`` tensor-product Gauss–Hermite rule on the Cholesky
  factor: ``u = sqrt(2 c11) z_a``, ``v = c12 sqrt(2 / c11) z_a +
  sqrt(2 (c22 − c12² / c11)) z_b``, weights ``w_a w_b / π``. The outer sum runs
  in a ``lax.scan`` over ``a``, so memory is ``degree`` times the kernel's.
  """
  nodes, weights = hermite_rule(degree)

  def moments(c12, c11, c22):
    c12, c11, c22 = jnp.broadcast_arrays(c12, c11, c22)
    dtype = c12.dtype
    z = jnp.asarray(nodes, dtype)
    w_inner = jnp.asarray(weights / np.pi, dtype)
    safe_c11 = jnp.where(c11 > 0, c11, 1.0)
    scale_u = _sqrt_pos(2 * c11)
    slope_v = jnp.where(c11 > 0, c12 * jnp.sqrt(2 / safe_c11), 0.0)
    scale_v = _sqrt_pos(2 * (c22 - c12 * c12 / safe_c11))
    v_rest = scale_v[..., None] * z  # (..., degree): the z_b part of v

    def body(carry, node):
      za, wa = node
      u = scale_u * za
      v = slope_v[..., None] * za + v_rest
      value = fn(u) * jnp.tensordot(fn(v), w_inner, axes=1)
      deriv = dfn(u) * jnp.tensordot(dfn(v), w_inner, axes=1)
      return (carry[0] + wa * value, carry[1] + wa * deriv), None

    zero = jnp.zeros_like(c12)
    (value, deriv), _ = lax.scan(body, (zero, zero), (z, jnp.asarray(weights, dtype)))
    return value, deriv

  return moments


def gauss_hermite_diag(fn, degree: int):
  """``c -> E[fn(u)²]``, ``u ~ N(0, c)``, by one-dimensional quadrature."""
  nodes, weights = hermite_rule(degree)

  def moment(c):
    z = jnp.asarray(nodes, c.dtype)
    w = jnp.asarray(weights / np.sqrt(np.pi), c.dtype)
    return jnp.tensordot(fn(_sqrt_pos(2 * c)[..., None] * z) ** 2, w, axes=1)

  return moment


def tanh(degree: int):
  """``tanh`` moments by Gauss–Hermite quadrature (no closed form exists)."""
  return gauss_hermite(jnp.tanh, _tanh_prime, degree)


def tanh_diag(degree: int):
  return gauss_hermite_diag(jnp.tanh, degree)
