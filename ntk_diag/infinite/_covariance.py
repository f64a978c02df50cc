"""The covariances an infinite-width network propagates, and their layouts.

For inputs ``x1`` (``n1`` examples) and ``x2`` (``n2``) the state after a layer is

* ``nngp[i, j, ...]`` — covariance of the layer's (pre-)activations at ``x1_i``
  and ``x2_j``, per channel (all channels are i.i.d. in the limit);
* ``ntk[i, j, ...]``  — the NTK of those outputs (``None`` before the first
  layer with parameters);
* ``var1[i, ...]``, ``var2[j, ...]`` — the same covariance of ``x1_i`` (``x2_j``)
  with itself, which the activations need.

Spatial axes ``S = (S_0, …, S_{s-1})`` (NHWC inputs) are held in one of three
layouts:

* ``"flat"``: no spatial axes (vectors, or after ``Flatten``/``GlobalAvgPool``);
* ``"diagonal"``: ``nngp[i, j, p]`` for equal positions ``p = p'`` only,
  shape ``(n1, n2, *S)``. Convolutions, activations and ``Flatten`` only ever
  read these entries, so a network without global pooling needs no more;
* ``"full"``: ``nngp[i, j, p_0, p'_0, p_1, p'_1, …]`` for every pair of
  positions (axes interleaved), shape ``(n1, n2, S_0, S_0, S_1, S_1, …)``:
  what ``GlobalAvgPool`` averages.

``var1``/``var2`` have the layout of ``nngp`` without the second batch axis.

*Joint* covariances (``var1 = var2 = None``) are those of one set of examples
with itself: the variances are then read off the batch diagonal of ``nngp``
itself, so an example paired with itself sees bit-identical ``c12 = c11 = c22``
at every layer (rounding differences between separately propagated arrays,
e.g. where XLA fuses a multiply-add, would otherwise move the ReLU NTK
diagonal by ~1e-4 relative per layer: the arc-cosine map is not Lipschitz at
equal inputs).
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from jax import lax

FLAT = "flat"
DIAGONAL = "diagonal"
FULL = "full"


@dataclasses.dataclass(frozen=True)
class Covariances:
  nngp: jax.Array
  ntk: jax.Array | None
  var1: jax.Array | None  # None: joint, read off nngp's batch diagonal
  var2: jax.Array | None
  layout: str
  num_spatial: int

  @property
  def joint(self) -> bool:
    return self.var1 is None

  def variances(self) -> tuple[jax.Array, jax.Array]:
    """``(var1, var2)``, read off the batch diagonal of ``nngp`` when joint."""
    if self.joint:
      var = _batch_diagonal(self.nngp)
      return var, var
    return self.var1, self.var2


def from_inputs(x1: jax.Array, x2: jax.Array | None, layout: str) -> Covariances:
  """Input covariances ``Σ_c x1[i, p, c] x2[j, p', c] / C`` (the mean over channels).

  ``x2=None``: the joint covariances of ``x1`` with itself.
  """
  num_spatial = x1.ndim - 2
  channels = x1.shape[-1]
  letters = iter(string.ascii_letters.replace("i", "").replace("j", "").replace("c", ""))
  pos1 = [next(letters) for _ in range(num_spatial)]
  pos2 = [next(letters) for _ in range(num_spatial)] if layout == FULL else pos1
  out = "".join(a + b for a, b in zip(pos1, pos2)) if layout == FULL else "".join(pos1)
  spec = f"i{''.join(pos1)}c,j{''.join(pos2)}c->ij{out}"

  def gram(a, b):
    return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST) / channels

  def self_variance(a):
    spec_self = spec.replace("j", "i", 1).replace("->ij", "->i")
    return jnp.einsum(spec_self, a, a, precision=lax.Precision.HIGHEST) / channels

  if x2 is None:
    return Covariances(nngp=gram(x1, x1), ntk=None, var1=None, var2=None, layout=layout,
                       num_spatial=num_spatial)
  return Covariances(nngp=gram(x1, x2), ntk=None, var1=self_variance(x1),
                     var2=self_variance(x2), layout=layout, num_spatial=num_spatial)


def _batch_diagonal(a: jax.Array) -> jax.Array:
  """``a[i, i, ...]`` of an ``(n, n, ...)`` array, shape ``(n, ...)``."""
  return jnp.moveaxis(jnp.diagonal(a, axis1=0, axis2=1), -1, 0)


def position_variances(var: jax.Array, cov: Covariances) -> jax.Array:
  """Variance at each position, ``(n, *S)``, from a ``var1``/``var2`` array."""
  if cov.layout != FULL:
    return var
  for _ in range(cov.num_spatial):
    var = jnp.diagonal(var, axis1=1, axis2=2)  # the pair (p_d, p'_d) -> trailing p_d
  return var


def _interleave(d: jax.Array, batch_ndim: int, first: bool) -> jax.Array:
  """``(*B, S_0, S_1, …)`` -> ``(*B, S_0, 1, S_1, 1, …)`` (``first``) or ``(*B, 1, S_0, …)``."""
  shape = list(d.shape[:batch_ndim])
  for size in d.shape[batch_ndim:]:
    shape += [size, 1] if first else [1, size]
  return d.reshape(shape)


def activation_arguments(cov: Covariances):
  """``(c12, c11, c22)`` for ``nngp`` and for ``var1``/``var2`` (broadcastable).

  ``nngp[i, j, p, p']`` pairs ``var1[i, p]`` with ``var2[j, p']``;
  ``var1[i, p, p']`` (full layout) pairs ``var1[i, p]`` with ``var1[i, p']``.
  Returns three triples ``(nngp_args, var1_args, var2_args)``; the var
  triples are ``None`` for joint covariances (nothing to update) and where
  the diagonal-only formula applies (all entries are variances,
  ``c12 = c11 = c22``).
  """
  var1, var2 = cov.variances()
  d1 = position_variances(var1, cov)
  d2 = position_variances(var2, cov)
  if cov.layout != FULL:
    return (cov.nngp, d1[:, None], d2[None]), None, None
  nngp_args = (cov.nngp, _interleave(d1[:, None], 2, True), _interleave(d2[None], 2, False))
  if cov.joint:
    return nngp_args, None, None
  var1_args = (var1, _interleave(d1, 1, True), _interleave(d1, 1, False))
  var2_args = (var2, _interleave(d2, 1, True), _interleave(d2, 1, False))
  return nngp_args, var1_args, var2_args


def _same_padding(size: int) -> tuple[int, int]:
  """``lax``'s ``"SAME"`` padding at stride 1: ``(f − 1) // 2`` before, the rest after."""
  low = (size - 1) // 2
  return low, size - 1 - low


def window_mean(a: jax.Array, batch_ndim: int, cov: Covariances,
                filter_shape: tuple[int, ...], padding: str) -> jax.Array:
  """The covariance of a convolution's outputs, up to ``W_std²`` and ``b_std²``.

  ``out[p, p'] = Σ_{δ ∈ window} a[p + δ, p' + δ] / |window|`` (the same offset
  ``δ`` at both positions: the two outputs share the filter), zero outside the
  image for ``"SAME"``; the window size counts padded taps too, as a finite
  network with ``fan_in = C · |window|`` does. The window is a product of
  intervals, so the sum runs one spatial axis (or axis pair) at a time.
  """
  pair = cov.layout == FULL
  for d, size in enumerate(filter_shape):
    axes = (batch_ndim + 2 * d, batch_ndim + 2 * d + 1) if pair else (batch_ndim + d,)
    if padding == "SAME":
      widths = [(0, 0)] * a.ndim
      for axis in axes:
        widths[axis] = _same_padding(size)
      a = jnp.pad(a, widths)
    length = a.shape[axes[0]] - size + 1
    total = None
    for offset in range(size):
      part = a
      for axis in axes:
        part = lax.slice_in_dim(part, offset, offset + length, axis=axis)
      total = part if total is None else total + part
    a = total
  return a / math.prod(filter_shape)


def spatial_mean(a: jax.Array, batch_ndim: int) -> jax.Array:
  """Mean over every axis after the batch axes (global average pooling)."""
  return jnp.mean(a, axis=tuple(range(batch_ndim, a.ndim)))


def spatial_trace_mean(a: jax.Array, batch_ndim: int, cov: Covariances) -> jax.Array:
  """Mean over equal positions ``p = p'`` (flattening before a dense layer)."""
  if cov.layout == FULL:
    for _ in range(cov.num_spatial):
      a = jnp.diagonal(a, axis1=batch_ndim, axis2=batch_ndim + 1)
  return spatial_mean(a, batch_ndim)
