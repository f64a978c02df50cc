"""ntk_diag.infinite against neural-tangents 0.6.5 and independent float64 numerics.

The reference kernels (``tests/data/infinite_reference.npz``) were computed by
``tests/data/make_infinite_reference.py`` with neural-tangents 0.6.5 (jax 0.4.25,
float64) in the peer venv; the networks are stored in the file as text and
rebuilt here. Measured, float32 here, ``max |K − K_NT| / max |K_NT|`` over
nngp and ntk, ``x2 = None`` and ``x2`` given: ≤ 6.5e-7 (MLPs with ReLU, Erf,
Tanh at depth 1–3; Conv SAME/VALID with global pooling or Flatten; Flatten on
images; per case in docs/infinite_width.md), ≤ 8.6e-7 with ``batch_size=2``
blocks. Tolerance 3e-5 (~50×).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import special
from scipy import stats

import ntk_diag as nd
import ntk_diag.infinite as inf
from ntk_diag.infinite import _activations

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "infinite_reference.npz")
REF = np.load(DATA)
SPECS = json.loads(str(REF["specs"]))
RTOL = 3e-5


def build(spec):
  layers = []
  for name, kwargs in spec:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    layers.append(getattr(inf, name)(**kwargs))
  return inf.serial(*layers)


def max_rel(actual, expected):
  """``max |actual − expected| / max |expected|`` in float64."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def inputs(case):
  return REF[f"{case}/x1"].astype(np.float32), REF[f"{case}/x2"].astype(np.float32)


def test_reference_covers_the_issue():
  names = set(SPECS)
  for act in ("relu", "erf", "tanh"):
    assert {f"mlp_{act}_depth{d}" for d in (1, 2, 3)} <= names
  layer_names = {layer for spec in SPECS.values() for layer, _ in spec}
  assert layer_names == {"Dense", "Conv", "Relu", "Erf", "Tanh", "GlobalAvgPool", "Flatten"}
  paddings = {kw["padding"] for spec in SPECS.values() for layer, kw in spec if layer == "Conv"}
  assert paddings == {"SAME", "VALID"}
  assert [layer for layer, _ in SPECS["conv_same_relu_gap_dense"]] == [
      "Conv", "Relu", "GlobalAvgPool", "Dense"]
  # The Tanh references are converged in their own quadrature.
  for d in (1, 2, 3):
    assert float(REF[f"mlp_tanh_depth{d}/tanh_quadrature_change"]) < 1e-6


# Cases whose (x1, x2) kernels are also checked (a second compile each).
CROSS = ("mlp_relu_depth3", "mlp_erf_depth2", "mlp_tanh_depth1", "conv_same_relu_gap_dense",
         "conv_flatten")


@pytest.mark.parametrize("case", sorted(SPECS))
def test_matches_neural_tangents(case):
  net = build(SPECS[case])
  x1, x2 = inputs(case)
  nngp, ntk = inf.kernels(net, x1)
  assert nngp.shape == ntk.shape == (len(x1), len(x1))
  assert nngp.dtype == ntk.dtype == jnp.float32
  assert max_rel(nngp, REF[f"{case}/nngp"]) < RTOL
  assert max_rel(ntk, REF[f"{case}/ntk"]) < RTOL
  if case in CROSS:
    nngp, ntk = inf.kernels(net, x1, x2)
    assert nngp.shape == (len(x1), len(x2))
    assert max_rel(nngp, REF[f"{case}/nngp_12"]) < RTOL
    assert max_rel(ntk, REF[f"{case}/ntk_12"]) < RTOL


def test_batch_size_blocks_match_neural_tangents():
  """Blocks of 2 examples (5 images: padded tiles, off-diagonal and joint diagonal tiles)."""
  case = "conv_same_relu_gap_dense"
  net = build(SPECS[case])
  x1, x2 = inputs(case)
  for got, key in zip(inf.kernels(net, x1, batch_size=2), ("nngp", "ntk")):
    assert max_rel(got, REF[f"{case}/{key}"]) < RTOL
  for got, key in zip(inf.kernels(net, x1, x2, batch_size=2), ("nngp_12", "ntk_12")):
    assert max_rel(got, REF[f"{case}/{key}"]) < RTOL


@pytest.mark.parametrize("case", ["mlp_relu_depth3", "mlp_erf_depth2", "conv_valid_same_gap"])
def test_float64_agrees_to_rounding(case):
  """float64 inputs are computed in float64: the float32 errors above are rounding.

  Measured over all cases: ≤ 6.4e-9 (ReLU; the reference's own float64 rounding
  at equal inputs, where the arc-cosine map is not Lipschitz), Erf 6e-16, Tanh
  2e-14 (the same 200-point rule). Tolerance 5e-7.
  """
  net = build(SPECS[case])
  with jax.enable_x64(True):
    for x2, suffix in ((None, ""), (REF[f"{case}/x2"], "_12")):
      nngp, ntk = inf.kernels(net, REF[f"{case}/x1"], x2)
      assert nngp.dtype == jnp.float64
      assert max_rel(nngp, REF[f"{case}/nngp{suffix}"]) < 5e-7
      assert max_rel(ntk, REF[f"{case}/ntk{suffix}"]) < 5e-7


# ----------------------------------------------------------------------------- activations


def _bivariate(c11, c22, rho):
  """Conditional law of ``v`` given ``u``: ``v = a u + s Z``."""
  c12 = rho * np.sqrt(c11 * c22)
  return c12, c12 / c11, np.sqrt(max(c22 - c12 ** 2 / c11, 0.0))


def _smooth_moments(fn, dfn, c11, c22, rho):
  """``E[fn(u) fn(v)]``, ``E[dfn(u) dfn(v)]`` by the trapezoid rule, float64 NumPy.

  ``u = sqrt(c11) z1``, ``v = a u + s z2`` with ``z1, z2`` i.i.d. N(0, 1) on a
  801 × 801 grid over [−10, 10]². For integrands analytic in a strip (erf, tanh)
  the trapezoid rule converges geometrically; at this spacing its error is
  below 1e-10 for variances up to 4 (halving the spacing changes nothing).
  """
  _, a, s = _bivariate(c11, c22, rho)
  z = np.linspace(-10, 10, 801)
  w = stats.norm.pdf(z) * (z[1] - z[0])
  u = np.sqrt(c11) * z[:, None]
  v = a * u + s * z[None, :]
  weights = w[:, None] * w[None, :]
  return float(np.sum(fn(u) * fn(v) * weights)), float(np.sum(dfn(u) * dfn(v) * weights))


def _relu_moments(c11, c22, rho):
  """ReLU moments with the inner expectation in closed form (``E[relu(m + sZ)]``)."""
  _, a, s = _bivariate(c11, c22, rho)
  su = np.sqrt(c11)

  def integrand(z, derivative):
    m = a * su * z
    if derivative:
      return stats.norm.cdf(m / s) * stats.norm.pdf(z)
    return su * z * (m * stats.norm.cdf(m / s) + s * stats.norm.pdf(m / s)) * stats.norm.pdf(z)

  return tuple(integrate.quad(integrand, 0, 12, args=(d,), epsabs=1e-13, epsrel=1e-12)[0]
               for d in (False, True))


PAIRS = [(1.0, 1.0, 0.0), (0.7, 1.9, 0.5), (2.5, 1.2, -0.8), (3.0, 3.5, 0.97), (1.5, 0.4, -0.3)]


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_activation_moments_match_quadrature(name):
  """Closed forms / Gauss–Hermite (float32) against scipy's adaptive quadrature (float64).

  Measured largest absolute error over these pairs: relu 1.3e-7, erf 1.2e-7, tanh 1.6e-7.
  The reference is independent of the code: scipy's adaptive quadrature with
  the inner expectation in closed form for ReLU, the trapezoid rule for erf/tanh.
  """
  c11, c22, rho = (np.array(v) for v in zip(*PAIRS))
  c12 = rho * np.sqrt(c11 * c22)
  moments = {"relu": _activations.relu, "erf": _activations.erf,
             "tanh": _activations.tanh(inf.Tanh().degree)}[name]
  value, deriv = moments(*(jnp.asarray(v, jnp.float32) for v in (c12, c11, c22)))
  for i, (a, b, r) in enumerate(PAIRS):
    if name == "relu":
      expected = _relu_moments(a, b, r)
    elif name == "erf":
      expected = _smooth_moments(special.erf, lambda t: 2 / np.sqrt(np.pi) * np.exp(-t * t),
                                 a, b, r)
    else:
      expected = _smooth_moments(np.tanh, lambda t: 1 - np.tanh(t) ** 2, a, b, r)
    np.testing.assert_allclose([value[i], deriv[i]], expected, rtol=0, atol=1e-5)


def test_activation_moments_on_the_diagonal():
  """``ρ = 1`` (an input with itself): the variance formulas and the limits of the pair ones."""
  c = jnp.asarray([0.3, 1.0, 4.0], jnp.float32)
  value, deriv = _activations.relu(c, c, c)
  np.testing.assert_allclose(value, c / 2, rtol=1e-6)
  np.testing.assert_allclose(deriv, 0.5, rtol=1e-6)
  np.testing.assert_allclose(_activations.relu_diag(c), c / 2, rtol=1e-6)
  value, _ = _activations.erf(c, c, c)
  expected = 2 / np.pi * np.arcsin(2 * np.asarray(c, np.float64) / (1 + 2 * np.asarray(c, np.float64)))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(_activations.erf_diag(c), expected, rtol=1e-6)
  for ci, got in zip(np.asarray(c, np.float64), _activations.tanh_diag(inf.Tanh().degree)(c)):
    expected = integrate.quad(lambda z: np.tanh(np.sqrt(ci) * z) ** 2 * stats.norm.pdf(z), -12, 12,
                              epsabs=1e-13)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- wide finite networks


def _wide_distance(module, infinite_net, x, seed=0):
  params = module.init(jax.random.PRNGKey(seed), x[:1])["params"]
  apply_fn = lambda p, xs: module.apply({"params": p}, xs)  # noqa: E731
  k = nd.empirical_ntk(apply_fn, params, x, trace_outputs=True)
  return float(inf.relative_distance(k, inf.kernels(infinite_net, x)[1]))


def test_wide_mlp_ntk_is_close_to_the_limit():
  """A width-4096 NTKDense MLP's empirical NTK (no neural-tangents involved).

  Measured relative Frobenius distance 0.035 (seeds 0–7: 0.012–0.040; the
  fluctuations are O(width^-1/2)). Bound 0.1: loose on purpose, yet a wrong
  convention is far outside it (a readout W_std off by √2 gives 0.49).
  """
  module = nn.Sequential([inf.NTKDense(4096, W_std=1.3, b_std=0.2), nn.relu,
                          inf.NTKDense(1, W_std=0.9, b_std=0.1)])
  x = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
  assert _wide_distance(module, inf.from_linen(module), x) < 0.1


def test_wide_conv_ntk_is_close_to_the_limit():
  """NTKConv (SAME) -> ReLU -> global_avg_pool -> NTKDense with 1024 channels.

  Measured relative Frobenius distance 0.015 (seeds 0–3: 0.015–0.035); bound 0.1
  as above. Checks NTKConv's parametrization, zero padding and the pooled
  spatial covariance independently of neural-tangents.
  """
  module = nn.Sequential([inf.NTKConv(1024, (3, 3), padding="SAME", W_std=1.4, b_std=0.3),
                          nn.relu, inf.global_avg_pool, inf.NTKDense(1, W_std=1.1)])
  x = np.random.default_rng(2).standard_normal((4, 5, 5, 2)).astype(np.float32)
  assert _wide_distance(module, inf.from_linen(module), x) < 0.1


# ----------------------------------------------------------------------------- from_linen


def test_from_linen_maps_each_layer():
  module = nn.Sequential([
      inf.NTKConv(8, (3, 2), padding="VALID", W_std=1.5, b_std=0.1), nn.relu,
      nn.Sequential([inf.NTKConv(8, (2, 2), W_std=1.2), jnp.tanh]),
      inf.flatten, inf.NTKDense(16, W_std=2.0, b_std=0.5), jax.scipy.special.erf,
      inf.NTKDense(3)])
  expected = inf.serial(
      inf.Conv((3, 2), padding="VALID", W_std=1.5, b_std=0.1), inf.Relu(),
      inf.Conv((2, 2), padding="SAME", W_std=1.2), inf.Tanh(),
      inf.Flatten(), inf.Dense(W_std=2.0, b_std=0.5), inf.Erf(), inf.Dense())
  assert inf.from_linen(module) == expected
  gap = nn.Sequential([inf.NTKConv(4), jax.nn.relu, inf.global_avg_pool, inf.NTKDense(1)])
  assert inf.from_linen(gap).layers[2] == inf.GlobalAvgPool()


def test_ntk_layers_forward():
  """NTKDense / NTKConv compute ``W_std / sqrt(fan_in) · x W + b_std · b`` (dense reference)."""
  x = np.random.default_rng(3).standard_normal((2, 4, 4, 3)).astype(np.float32)
  conv = inf.NTKConv(5, (3, 3), padding="VALID", W_std=1.7, b_std=0.4)
  variables = conv.init(jax.random.PRNGKey(0), x)
  w, b = (np.asarray(variables["params"][k], np.float64) for k in ("kernel", "bias"))
  patches = np.stack([x[:, i:i + 2, j:j + 2, :] for i in range(3) for j in range(3)], axis=3)
  expected = 1.7 / np.sqrt(27) * np.einsum("nhwkc,kco->nhwo", patches.astype(np.float64),
                                           w.reshape(9, 3, 5)) + 0.4 * b
  np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  dense = inf.NTKDense(7, W_std=0.8)
  variables = dense.init(jax.random.PRNGKey(1), x[:, 0, 0])
  assert set(variables["params"]) == {"kernel"}  # no bias when b_std == 0
  expected = 0.8 / np.sqrt(3) * x[:, 0, 0].astype(np.float64) @ np.asarray(
      variables["params"]["kernel"], np.float64)
  np.testing.assert_allclose(dense.apply(variables, x[:, 0, 0]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module, match", [
    (nn.Dense(3), "nn.Sequential"),
    (nn.Sequential([nn.Dense(3)]), r"module.layers\[0\] \(Dense\).*NTKDense"),
    (nn.Sequential([inf.NTKConv(3), nn.Conv(3, (3, 3))]), r"layers\[1\] \(Conv\).*NTKConv"),
    (nn.Sequential([inf.NTKDense(3), nn.gelu]), r"layers\[1\]"),
    (nn.Sequential([inf.NTKDense(3), nn.Sequential([lambda x: 2 * x])]),
     r"module.layers\[1\].layers\[0\]"),
    (nn.Sequential([inf.NTKDense(3), nn.relu, inf.NTKConv(3, 3)]),
     r"layers\[2\] \(NTKConv\).*filter_shape"),
])
def test_from_linen_rejects_what_has_no_limit(module, match):
  with pytest.raises(TypeError, match=match):
    inf.from_linen(module)


# ----------------------------------------------------------------------------- API


def test_jittable_and_float32():
  case = "mlp_erf_depth2"
  net = build(SPECS[case])
  x1, _ = inputs(case)
  ntk_fn = jax.jit(lambda x: inf.kernels(net, x)[1])
  assert ntk_fn(x1).dtype == jnp.float32
  assert max_rel(ntk_fn(x1), REF[f"{case}/ntk"]) < RTOL
  # Integer inputs are computed in float32.
  xi = np.arange(12, dtype=np.int32).reshape(3, 4)
  nngp, _ = inf.kernels(inf.serial(inf.Dense()), xi)
  np.testing.assert_allclose(nngp, xi.astype(np.float64) @ xi.T / 4, rtol=1e-6)
  assert nngp.dtype == jnp.float32


def test_relative_distance():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((2, 5, 5)).astype(np.float32)
  expected = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))
  np.testing.assert_allclose(inf.relative_distance(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(inf.relative_distance)(a, b), expected, rtol=1e-6)
  assert float(inf.relative_distance(a, np.zeros_like(a))) == 0.0
  with pytest.raises(ValueError, match="same shape"):
    inf.relative_distance(a, b[:4])
  with pytest.raises(ValueError, match="empirical"):
    inf.relative_distance(a[None], b[None])


VEC = np.zeros((3, 4), np.float32)
IMG = np.zeros((3, 5, 5, 2), np.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: inf.kernels(inf.serial(inf.Relu(), inf.Dense()), VEC), ValueError,
     r"layer 0 \(Relu\).*Dense or Conv"),
    (lambda: inf.kernels(inf.serial(inf.Dense(), inf.Conv((3, 3))), VEC), ValueError,
     r"layer 1 \(Conv\).*spatial"),
    (lambda: inf.kernels(inf.serial(inf.Dense(), inf.GlobalAvgPool()), VEC), ValueError,
     r"layer 1 \(GlobalAvgPool\)"),
    (lambda: inf.kernels(inf.serial(inf.Conv((3, 3)), inf.Relu()), IMG), ValueError,
     "Flatten"),
    (lambda: inf.kernels(inf.serial(inf.Conv((6, 3), padding="VALID"), inf.Flatten()), IMG),
     ValueError, "larger"),
    (lambda: inf.kernels(inf.serial(inf.Conv((3,)), inf.Flatten()), IMG), ValueError, "axes"),
    (lambda: inf.kernels(inf.serial(inf.Flatten(), inf.Relu()), IMG), ValueError, "Relu"),
    (lambda: inf.kernels(inf.serial(inf.Dense()), VEC, np.zeros((2, 5))), ValueError, "x2"),
    (lambda: inf.kernels(inf.serial(inf.Dense()), VEC[0]), ValueError, "x1"),
    (lambda: inf.kernels(inf.serial(inf.Dense()), [[1.0]]), TypeError, "x1"),
    (lambda: inf.kernels(inf.serial(inf.Dense()), VEC, batch_size=0), ValueError, "batch_size"),
    (lambda: inf.kernels(inf.serial(inf.Dense()), VEC, batch_size=2, memory_budget_bytes=1),
     ValueError, "batch_size"),
    (lambda: inf.kernels("net", VEC), TypeError, "serial"),
    (lambda: inf.serial(inf.Dense, inf.Relu()), TypeError, "instantiate"),
    (lambda: inf.serial(nn.relu), TypeError, "layer 0"),
    (lambda: inf.serial(), ValueError, "at least one"),
    (lambda: inf.Conv(3), TypeError, "filter_shape"),
    (lambda: inf.Conv((3, 0)), ValueError, "filter_shape"),
    (lambda: inf.Conv((3, 3), padding="same"), ValueError, "padding"),
    (lambda: inf.Dense(W_std=-1.0), ValueError, "W_std"),
    (lambda: inf.Dense(b_std="0"), TypeError, "b_std"),
    (lambda: inf.Tanh(degree=0), ValueError, "degree"),
])
def test_bad_input_is_rejected_before_tracing(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_nested_serial_and_single_layer():
  block = inf.serial(inf.Dense(1.5, 0.1), inf.Relu())
  net = inf.serial(block, block, inf.Dense())
  assert len(net) == 5
  x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
  nngp, ntk = inf.kernels(inf.Dense(W_std=2.0, b_std=0.5), x)  # one layer is a network
  expected = 4.0 * x.astype(np.float64) @ x.T / 4 + 0.25
  np.testing.assert_allclose(nngp, expected, rtol=1e-5)
  np.testing.assert_allclose(ntk, expected, rtol=1e-5)  # ntk = nngp for one affine layer
