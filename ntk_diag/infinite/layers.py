"""Layers of an infinite-width network and what each does to the covariances.

Each layer is a frozen (hashable) dataclass: ``serial(*layers)`` is a static
argument of the jitted kernel computation. The maps follow neural-tangents'
``stax`` in the NTK parametrization: a ``Dense``/``Conv`` layer computes
``y = W_std / sqrt(fan_in) · W x + b_std · b`` with ``W, b ~ N(0, 1)`` and
``fan_in`` the input channels (times the filter size), and has no width: its
width is the limit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

from ntk_diag import _validation
from ntk_diag.infinite import _activations
from ntk_diag.infinite import _covariance as cv

PADDINGS = ("SAME", "VALID")
# Default Gauss–Hermite points per axis for Tanh. Largest error of either
# moment relative to its largest value, against 300 points in float64, over
# correlations in [-1, 1]: 1e-10 at variance 2, 2e-8 at 3, 5e-7 at 4, 2e-5 at 6
# (the NTK factor E[tanh'(u) tanh'(v)] is the slow one; 128 points: 5e-8, 3e-6,
# 3e-5, 4e-4).
TANH_DEGREE = 200


@dataclasses.dataclass(frozen=True)
class _Signature:
  """What validation tracks through the network: spatial shape (``()`` when flat)
  and whether the current (pre-)activations are Gaussian in the limit."""
  spatial: tuple[int, ...]
  gaussian: bool


class Layer:
  """Base class: ``signature`` checks the input in Python, ``apply`` maps covariances."""

  def signature(self, sig: _Signature, where: str) -> _Signature:
    raise NotImplementedError

  def apply(self, cov: cv.Covariances) -> cv.Covariances:
    raise NotImplementedError


def _std(name: str, value) -> float:
  _validation.check_nonnegative_number(name, value)
  return float(value)


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
  """Fully connected layer on the last (channel) axis, NTK parametrization.

  ``nngp' = W_std² nngp + b_std²`` and ``ntk' = W_std² ntk + nngp'``. On
  images it acts per position, like ``flax.linen.Dense`` on NHWC inputs.
  """
  W_std: float = 1.0  # pylint: disable=invalid-name
  b_std: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "W_std", _std("W_std", self.W_std))
    object.__setattr__(self, "b_std", _std("b_std", self.b_std))

  def signature(self, sig, where):
    return dataclasses.replace(sig, gaussian=True)

  def apply(self, cov):
    return _affine(cov, self.W_std, self.b_std, lambda a, batch_ndim: a)


@dataclasses.dataclass(frozen=True)
class Conv(Layer):
  """Convolution over the spatial axes of NHWC inputs (stride 1), NTK parametrization.

  ``nngp'[p, p'] = W_std² · mean_{δ ∈ window} nngp[p + δ, p' + δ] + b_std²``
  (zero padding for ``"SAME"``), ``ntk'`` the same map of ``ntk`` plus ``nngp'``.
  ``fan_in = C · prod(filter_shape)``.
  """
  filter_shape: tuple[int, ...]
  padding: str = "SAME"
  W_std: float = 1.0  # pylint: disable=invalid-name
  b_std: float = 0.0

  def __post_init__(self):
    shape = self.filter_shape
    if isinstance(shape, numbers.Integral) or not hasattr(shape, "__iter__"):
      raise TypeError(f"`filter_shape` must be a tuple of positive ints, e.g. (3, 3); got {shape!r}.")
    shape = tuple(shape)
    if not shape:
      raise ValueError("`filter_shape` must have one entry per spatial axis; got ().")
    for size in shape:
      _validation.check_positive_int("filter_shape", size)
    object.__setattr__(self, "filter_shape", tuple(int(s) for s in shape))
    _validation.check_one_of("padding", self.padding, PADDINGS)
    object.__setattr__(self, "W_std", _std("W_std", self.W_std))
    object.__setattr__(self, "b_std", _std("b_std", self.b_std))

  def signature(self, sig, where):
    if not sig.spatial:
      raise ValueError(
          f"{where}: Conv needs inputs with spatial axes (n, H, W, C); its input here is"
          " flat (n, d). Apply Conv before Flatten/GlobalAvgPool, to NHWC inputs.")
    if len(self.filter_shape) != len(sig.spatial):
      raise ValueError(
          f"{where}: Conv `filter_shape` {self.filter_shape} has {len(self.filter_shape)} axes"
          f" but its input has {len(sig.spatial)} spatial axes {sig.spatial}.")
    spatial = sig.spatial
    if self.padding == "VALID":
      if any(f > s for f, s in zip(self.filter_shape, sig.spatial)):
        raise ValueError(
            f"{where}: Conv `filter_shape` {self.filter_shape} is larger than its input's spatial"
            f" shape {sig.spatial} with padding='VALID'.")
      spatial = tuple(s - f + 1 for f, s in zip(self.filter_shape, sig.spatial))
    return _Signature(spatial=spatial, gaussian=True)

  def apply(self, cov):
    return _affine(cov, self.W_std, self.b_std, lambda a, batch_ndim: cv.window_mean(
        a, batch_ndim, cov, self.filter_shape, self.padding))


def _affine(cov: cv.Covariances, w_std: float, b_std: float,
            linear: Callable) -> cv.Covariances:
  """``nngp' = W² L(nngp) + b²``, ``ntk' = W² L(ntk) + nngp'`` for a linear map ``L``."""
  w2, b2 = w_std ** 2, b_std ** 2

  def affine(a, batch_ndim):
    return None if a is None else w2 * linear(a, batch_ndim) + b2

  nngp = affine(cov.nngp, 2)
  ntk = nngp if cov.ntk is None else w2 * linear(cov.ntk, 2) + nngp
  return dataclasses.replace(cov, nngp=nngp, ntk=ntk, var1=affine(cov.var1, 1),
                             var2=affine(cov.var2, 1))


class _Activation(Layer):
  """Elementwise nonlinearity: ``nngp' = E[σ(u)σ(v)]``, ``ntk' = ntk · E[σ'(u)σ'(v)]``."""

  def moments(self) -> Callable:
    raise NotImplementedError

  def diagonal_moment(self) -> Callable:
    raise NotImplementedError

  def signature(self, sig, where):
    if not sig.gaussian:
      raise ValueError(
          f"{where}: {type(self).__name__} must follow a Dense or Conv layer (its input must be"
          " Gaussian in the infinite-width limit); put a Dense/Conv before it.")
    return dataclasses.replace(sig, gaussian=False)

  def apply(self, cov):
    moments = self.moments()
    nngp_args, var1_args, var2_args = cv.activation_arguments(cov)
    nngp, dot = moments(*nngp_args)
    if cov.joint:
      var1 = var2 = None
    elif var1_args is None:
      diagonal = self.diagonal_moment()
      var1, var2 = diagonal(cov.var1), diagonal(cov.var2)
    else:
      var1, var2 = moments(*var1_args)[0], moments(*var2_args)[0]
    ntk = None if cov.ntk is None else cov.ntk * dot
    return dataclasses.replace(cov, nngp=nngp, ntk=ntk, var1=var1, var2=var2)


@dataclasses.dataclass(frozen=True)
class Relu(_Activation):
  """ReLU, by the arc-cosine kernels of order 1 (NNGP) and 0 (NTK factor)."""

  def moments(self):
    return _activations.relu

  def diagonal_moment(self):
    return _activations.relu_diag


@dataclasses.dataclass(frozen=True)
class Erf(_Activation):
  """``erf``, by the arcsine kernel and its closed-form derivative counterpart."""

  def moments(self):
    return _activations.erf

  def diagonal_moment(self):
    return _activations.erf_diag


@dataclasses.dataclass(frozen=True)
class Tanh(_Activation):
  """``tanh``, by ``degree × degree`` Gauss–Hermite quadrature (no closed form).

  Error of the default ``degree`` (relative to the largest value): 5e-7 for
  pre-activation variances up to 4, 2e-5 at 6; raise it for larger variances.
  The cost is ``degree²`` evaluations per kernel entry; with variances ≤ 1,
  ``degree=64`` is within 1e-7 and 10× cheaper.
  """
  degree: int = TANH_DEGREE

  def __post_init__(self):
    _validation.check_positive_int("degree", self.degree)
    object.__setattr__(self, "degree", int(self.degree))

  def moments(self):
    return _activations.tanh(self.degree)

  def diagonal_moment(self):
    return _activations.tanh_diag(self.degree)


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
  """Mean over the spatial axes: ``nngp' = mean_{p, p'} nngp[p, p']`` (needs every pair)."""

  def signature(self, sig, where):
    if not sig.spatial:
      raise ValueError(f"{where}: GlobalAvgPool needs inputs with spatial axes (n, H, W, C);"
                       " its input here is flat (n, d).")
    return _Signature(spatial=(), gaussian=sig.gaussian)

  def apply(self, cov):
    def pool(a, batch_ndim):
      return cv.spatial_mean(a, batch_ndim)
    return _flatten_layout(cov, pool)


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
  """Row-major flattening of ``(n, *S, C)`` to ``(n, prod(S)·C)``.

  A following ``Dense`` divides by ``fan_in = prod(S)·C``, so its input
  covariance is the mean over equal positions, ``mean_p nngp[p, p]``. The
  identity on flat inputs.
  """

  def signature(self, sig, where):
    return _Signature(spatial=(), gaussian=False)

  def apply(self, cov):
    if cov.layout == cv.FLAT:
      return cov

    def flatten(a, batch_ndim):
      return cv.spatial_trace_mean(a, batch_ndim, cov)
    return _flatten_layout(cov, flatten)


def _flatten_layout(cov: cv.Covariances, reduce: Callable) -> cv.Covariances:
  def apply(a, batch_ndim):
    return None if a is None else reduce(a, batch_ndim)
  return cv.Covariances(nngp=apply(cov.nngp, 2), ntk=apply(cov.ntk, 2), var1=apply(cov.var1, 1),
                        var2=apply(cov.var2, 1), layout=cv.FLAT, num_spatial=0)


@dataclasses.dataclass(frozen=True)
class Serial:
  """A network: its layers applied in order. Build it with :func:`serial`."""
  layers: tuple[Layer, ...]

  def __len__(self) -> int:
    return len(self.layers)


def serial(*layers: Layer | Serial) -> Serial:
  """Compose layers (nested ``serial`` networks are inlined).

  Args:
    *layers: ``Dense``, ``Conv``, ``Relu``, ``Erf``, ``Tanh``, ``GlobalAvgPool``,
      ``Flatten`` instances, or networks from ``serial``.

  Returns:
    The network, a hashable ``Serial`` to pass to :func:`kernels`.
  """
  flat = []
  for i, layer in enumerate(layers):
    if isinstance(layer, Serial):
      flat.extend(layer.layers)
    elif isinstance(layer, Layer):
      flat.append(layer)
    elif isinstance(layer, type) and issubclass(layer, Layer):
      raise TypeError(f"layer {i} of serial is the class {layer.__name__}; instantiate it:"
                      f" {layer.__name__}().")
    else:
      raise TypeError(
          f"layer {i} of serial must be an ntk_diag.infinite layer (Dense, Conv, Relu, Erf, Tanh,"
          f" GlobalAvgPool, Flatten) or a serial network; got {layer!r}.")
  if not flat:
    raise ValueError("serial needs at least one layer.")
  return Serial(tuple(flat))


def check_network(net: Serial, example_shape: tuple[int, ...]) -> str:
  """Walk the network over one example's shape; return the covariance layout it needs.

  Raises ``ValueError`` naming the first layer that cannot take its input, or
  if the network does not end flat (images need ``Flatten`` or ``GlobalAvgPool``).
  """
  spatial = tuple(example_shape[:-1])
  sig = _Signature(spatial=spatial, gaussian=False)
  for i, layer in enumerate(net.layers):
    sig = layer.signature(sig, f"layer {i} ({type(layer).__name__})")
  if sig.spatial:
    raise ValueError(
        f"The network's output still has spatial axes {sig.spatial}; end it with Flatten() or"
        " GlobalAvgPool() (and a Dense readout) to get (n1, n2) kernels.")
  if not spatial:
    return cv.FLAT
  # Global pooling averages every pair of positions; everything else reads
  # equal positions only.
  if any(isinstance(layer, GlobalAvgPool) for layer in net.layers):
    return cv.FULL
  return cv.DIAGONAL


def pair_entries(net: Serial, example_shape: tuple[int, ...]) -> int:
  """Largest number of kernel entries per pair of examples (``prod(S)²`` full, ``prod(S)`` diagonal)."""
  layout = check_network(net, example_shape)
  size = math.prod(example_shape[:-1]) if len(example_shape) > 1 else 1
  return {cv.FLAT: 1, cv.DIAGONAL: size, cv.FULL: size * size}[layout]
