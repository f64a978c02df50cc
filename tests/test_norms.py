"""Operator norms and the lazy ratio against dense references.

References (tests/reference.py) ravel the parameters and use ``jax.jacrev`` /
``jax.hessian`` with float64 NumPy ``svd`` / ``eigvalsh``. With default
arguments both methods must reach the solvers' own tolerance, ``tol=1e-4``
relative error (measured <= 4.0e-6, the largest on the linen MLP's Hessian,
where power iteration on H² stops unconverged at ``num_iters=100``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntk_diag as nd
from models import MLP
from ntk_diag import norms
from reference import dense_hessians, dense_jacobian, rel_err

# The estimators' default `tol`: a converged solve has a Ritz value within
# tol·|θ| of an eigenvalue. Measured <= 4.0e-6 over every case below.
TOL = {"power": 1e-4, "lanczos": 1e-4}
# Exact paths (k × k Gram, closed forms) in float32: measured <= 1.1e-7.
EXACT_TOL = 1e-5


def seed_network(width, dim=3, activation=jnp.tanh, seed=0):
  """``f(x) = d^{-1/2} Σ_i β_i σ(w_iᵀ x)`` with N(0, 1) parameters."""
  kw, kb = jax.random.split(jax.random.PRNGKey(seed))
  params = {"w": jax.random.normal(kw, (width, dim)), "beta": jax.random.normal(kb, (width,))}

  def apply_fn(p, x):
    return activation(x @ p["w"].T) @ p["beta"] / jnp.sqrt(width)

  return apply_fn, params


class WideHead(nnx.Module):
  """70 outputs: above GRAM_MAX_OUTPUTS, so per-example norms are matrix-free."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(2, 4, rngs=rngs)
    self.head = nnx.Linear(4, 70, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


@functools.lru_cache(maxsize=None)
def model(name):
  x = jax.random.normal(jax.random.PRNGKey(42), (4, 3))
  if name == "seed":
    apply_fn, params = seed_network(48)
  elif name == "linen":
    module = MLP(hidden=(12, 12), out=3)
    apply_fn, params = nd.from_linen(module, module.init(jax.random.PRNGKey(1), x))
  else:
    apply_fn, params = nd.from_nnx(WideHead(nnx.Rngs(2)))
    x = x[:2, :2]
  return apply_fn, params, x


@functools.lru_cache(maxsize=None)
def reference(name):
  """``(per-example ‖J_i‖, σ_max(J), per-example max_a ‖H_ia‖)`` in float64."""
  apply_fn, params, x = model(name)
  jac = dense_jacobian(apply_fn, params, x)  # (n, k, P)
  per_example = np.linalg.svd(jac, compute_uv=False)[:, 0]
  stacked = np.linalg.svd(jac.reshape(-1, jac.shape[-1]), compute_uv=False)[0]
  hess = dense_hessians(apply_fn, params, x)
  hess_norm = np.array([max(_max_abs_eig(h) for h in per_output) for per_output in hess])
  return per_example, stacked, hess_norm


def _max_abs_eig(h):
  """Largest |eigenvalue|; all-zero rows/columns (zero eigenvalues) are dropped first."""
  live = np.any(h != 0, axis=1)
  return float(np.abs(np.linalg.eigvalsh(h[live][:, live])).max()) if live.any() else 0.0


# Each case is one compiled lazy_ratio: stacked Jacobian norm + Hessian norm.
CASES = [("seed", "power"), ("seed", "lanczos"), ("linen", "power"), ("nnx", "lanczos")]


@pytest.mark.parametrize("name,method", CASES)
def test_stacked_and_hessian_norms_match_dense_reference(name, method):
  apply_fn, params, x = model(name)
  _, ref_stacked, ref_hess = reference(name)
  y = jnp.linspace(-1.0, 1.0, apply_fn(params, x).size).reshape(apply_fn(params, x).shape)
  report = nd.lazy_ratio(apply_fn, params, x, y, method=method, stacked=True)
  stacked, hess = report.jacobian_norm, report.hessian_norm
  assert stacked.per_example is None
  assert rel_err(stacked.value, ref_stacked) <= TOL[method]
  assert rel_err(hess.value, ref_hess.max()) <= TOL[method]
  assert rel_err(hess.per_example, ref_hess) <= TOL[method]
  # kappa = ‖∇²f‖ / ‖∇f‖² · ‖f(X) − y‖ (seed eq. 3), residual over all n·k entries.
  residual = np.linalg.norm(np.asarray(apply_fn(params, x), np.float64) - np.asarray(y))
  assert rel_err(report.residual_norm, residual) <= 1e-6  # measured 1.5e-8
  assert rel_err(report.kappa, ref_hess.max() / ref_stacked ** 2 * residual) <= 3 * TOL[method]


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_per_example_matrix_free_matches_dense_reference(method):
  apply_fn, params, x = model("nnx")  # k = 70 > GRAM_MAX_OUTPUTS
  ref = reference("nnx")[0]
  est = nd.jacobian_norm(apply_fn, params, x, method=method)
  assert est.per_example.shape == (x.shape[0],)
  assert rel_err(est.per_example, ref) <= TOL[method]
  assert rel_err(est.value, ref.max()) <= TOL[method]


@pytest.mark.parametrize("name", ["seed", "linen"])
def test_per_example_gram_path_is_exact(name):
  apply_fn, params, x = model(name)
  est = nd.jacobian_norm(apply_fn, params, x)
  assert int(est.iterations) == 0 and bool(est.converged) and est.vector is None
  assert rel_err(est.per_example, reference(name)[0]) <= EXACT_TOL


def test_jacobian_norm_from_ntk_diagonal_blocks():
  apply_fn, params, x = model("linen")
  _, grams = nd.ntk.empirical_ntk_and_diagonal(apply_fn, params, x, num_diagonal=3,
                                               trace_outputs=True)
  est = norms.jacobian_norm_from_grams(grams)
  assert rel_err(est.per_example, reference("linen")[0][:3]) <= 1e-5


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_hessian_plus_minus_pairs(method):
  # Linear activation: each neuron's Hessian block is [[0, x], [xᵀ, 0]] / sqrt(d),
  # so the spectrum is exactly ±‖x‖/sqrt(d) (d times each) and zeros.
  width = 32
  apply_fn, params = seed_network(width, activation=lambda z: z)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 3))
  est = nd.hessian_norm(apply_fn, params, x, method=method)
  expected = np.linalg.norm(np.asarray(x, np.float64), axis=1) / np.sqrt(width)
  assert bool(est.converged)
  assert rel_err(est.per_example, expected) <= EXACT_TOL  # measured 9.6e-8
  assert rel_err(est.value, expected.max()) <= EXACT_TOL


def test_reports_are_frozen_pytrees():
  est = norms.NormEstimate(value=jnp.ones(()), per_example=None, iterations=jnp.zeros((), int),
                           converged=jnp.ones((), bool))
  report = norms.LazyReport(kappa=jnp.ones(()), jacobian_norm=est, hessian_norm=est,
                            residual_norm=jnp.ones(()))
  doubled = jax.tree.map(lambda a: 2 * a, report)
  assert float(doubled.jacobian_norm.value) == 2.0 and doubled.jacobian_norm.per_example is None
  with pytest.raises(AttributeError):
    report.kappa = 0.0


def test_core_under_jit_with_warm_start():
  apply_fn, params, x = model("seed")
  y = jnp.zeros(x.shape[0])

  @jax.jit
  def diagnose(params, previous):
    return norms.lazy_ratio_core(apply_fn, params, x, y, norms.SolverOptions(return_vector=True),
                                 init=previous, key=jax.random.key(1))

  first = diagnose(params, None)
  assert first.jacobian_norm.vector is None  # exact Gram path: nothing to warm-start
  assert jax.tree.map(jnp.shape, first.hessian_norm.vector) == {
      "w": (4, 1, 48, 3), "beta": (4, 1, 48)}
  again = diagnose(params, first)
  per_example, _, hess = reference("seed")
  residual = np.linalg.norm(np.asarray(apply_fn(params, x), np.float64))
  for report in (first, again):  # κ with the per-example Jacobian norm, y = 0
    assert rel_err(report.kappa, hess.max() / per_example.max() ** 2 * residual) <= 3 * TOL["power"]
  assert int(again.hessian_norm.iterations) < int(first.hessian_norm.iterations)


def test_memory_large_model_runs_matrix_free():
  # P = 4000 * 5000 = 2e7: a P×P float32 array would take 1.6 PB.
  d_in, d_out = 4000, 5000
  key_w, key_x = jax.random.split(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(key_w, (d_in, d_out)) / np.sqrt(d_in)}

  def apply_fn(p, x):
    return jnp.tanh(x @ p["w"]).sum(-1, keepdims=True) / np.sqrt(d_out)

  x = jax.random.normal(key_x, (2, d_in))
  # Closed forms: ∇_W f(x) = x ⊗ s / sqrt(d_out) with s = 1 − tanh²(xW), and
  # ∇²_W f(x) = blockdiag_j(tanh''(z_j) x xᵀ) / sqrt(d_out).
  x64, z = np.asarray(x, np.float64), np.asarray(x @ params["w"], np.float64)
  s = 1 - np.tanh(z) ** 2
  grads_norm = np.linalg.norm(x64, axis=1) * np.linalg.norm(s, axis=1) / np.sqrt(d_out)
  gram = (x64 @ x64.T) * (s @ s.T) / d_out
  hess_norm = (np.abs(-2 * np.tanh(z) * s).max(axis=1) * np.sum(x64 ** 2, axis=1)
               / np.sqrt(d_out))

  per = nd.jacobian_norm(apply_fn, params, x)  # exact k × k Gram path
  assert rel_err(per.per_example, grads_norm) <= EXACT_TOL  # measured 3.4e-8
  # The stacked Gram operator has rank n·k = 2: Lanczos is exact after 2 steps.
  stacked = nd.jacobian_norm(apply_fn, params, x, stacked=True, num_iters=3, method="lanczos")
  assert rel_err(stacked.value, np.sqrt(np.linalg.eigvalsh(gram)[-1])) <= EXACT_TOL  # 2.2e-8
  hess = nd.hessian_norm(apply_fn, params, x, num_iters=2)
  assert 0 < float(hess.value) <= hess_norm.max() * (1 + 1e-4)  # a lower bound


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_iters": 0}, ValueError, "num_iters"),
    ({"num_iters": 2.5}, TypeError, "num_iters"),
    ({"tol": 0.0}, ValueError, "tol"),
    ({"method": "arnoldi"}, ValueError, "method"),
    ({"stacked": "yes"}, TypeError, "stacked"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"init": {"w": jnp.ones((2, 2)), "beta": jnp.ones(2)}}, ValueError, "init"),
])
def test_validation_errors(kwargs, error, match):
  apply_fn, params, x = model("seed")
  with pytest.raises(error, match=match):
    nd.jacobian_norm(apply_fn, params, x, stacked=kwargs.pop("stacked", True), **kwargs)


def test_validation_errors_lazy_ratio():
  apply_fn, params, x = model("seed")
  with pytest.raises(ValueError, match="y"):
    nd.lazy_ratio(apply_fn, params, x, jnp.zeros((x.shape[0], 2)))
  with pytest.raises(TypeError, match="init"):
    nd.lazy_ratio(apply_fn, params, x, jnp.zeros(x.shape[0]), init={"a": 1})
  with pytest.raises(ValueError, match="num_iters"):
    nd.hessian_norm(apply_fn, params, x, num_iters=-1)
  with pytest.raises(TypeError, match="apply_fn"):
    nd.hessian_norm(None, params, x)


# --------------------------------------------------------------------------
# κ's documented edge cases: 0 when the numerator is 0, the dtype's largest
# finite value when only ‖J‖ is 0, NaN when any input is NaN.
# --------------------------------------------------------------------------

def _quadratic(p, x):
  """``f(x) = (wᵀx)²``: ``∇f = 2(wᵀx)x`` and ``∇²f = 2xxᵀ``, so at ``w = 0`` the
  Jacobian vanishes while the Hessian does not."""
  return (x @ p["w"]) ** 2


# Small integers: outputs and residuals are exact in float32.
X_INT = jnp.asarray([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 3.0, 1.0], [2.0, -1.0, 1.0, 0.0]])
W_INT = jnp.asarray([1.0, -1.0, 2.0, 0.0])
ZERO = {"w": jnp.zeros(4)}


def test_kappa_saturates_when_the_jacobian_norm_is_zero():
  report = nd.lazy_ratio(_quadratic, ZERO, X_INT, jnp.ones(3))
  assert float(report.jacobian_norm.value) == 0.0
  # ‖2 x xᵀ‖ = 2‖x‖², largest for x = (0, 1, 3, 1): 22.
  assert rel_err(report.hessian_norm.value, 22.0) <= TOL["power"]
  assert float(report.residual_norm) == pytest.approx(np.sqrt(3.0), rel=1e-6)
  assert float(report.kappa) == np.finfo(np.float32).max


def test_kappa_is_zero_when_the_numerator_is_zero():
  y = (np.asarray(X_INT) @ np.asarray(W_INT)) ** 2  # f(x) exactly: residual 0
  report = nd.lazy_ratio(_quadratic, {"w": W_INT}, X_INT, y)
  assert float(report.residual_norm) == 0.0
  assert float(report.jacobian_norm.value) > 0 and float(report.hessian_norm.value) > 0
  assert float(report.kappa) == 0.0
  # Zero numerator and zero Jacobian norm: 0 wins over saturation.
  at_zero = nd.lazy_ratio(_quadratic, ZERO, X_INT, jnp.zeros(3))
  assert float(at_zero.jacobian_norm.value) == 0.0 and float(at_zero.residual_norm) == 0.0
  assert float(at_zero.kappa) == 0.0
  # A model linear in its parameters has ∇²f = 0.
  linear = nd.lazy_ratio(lambda p, x: x @ p["w"], {"w": W_INT}, X_INT, jnp.ones(3))
  assert float(linear.hessian_norm.value) == 0.0 and float(linear.residual_norm) > 0
  assert float(linear.kappa) == 0.0


def test_kappa_is_nan_when_an_input_is_nan():
  nan_w = {"w": W_INT.at[0].set(jnp.nan)}
  assert np.isnan(float(nd.lazy_ratio(_quadratic, nan_w, X_INT, jnp.ones(3)).kappa))
  nan_y = jnp.asarray([jnp.nan, 1.0, 1.0])
  assert np.isnan(float(nd.lazy_ratio(_quadratic, {"w": W_INT}, X_INT, nan_y).kappa))
  # NaN residual with ‖J‖ = 0: NaN, not the saturated value.
  assert np.isnan(float(nd.lazy_ratio(_quadratic, ZERO, X_INT, nan_y).kappa))
