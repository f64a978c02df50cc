"""The seed's radius B = σ_min / 2γ against an SVD of the dense Jacobian and dense Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from ntk_diag import radius as radius_lib
from reference import dense_hessians
from reference import dense_jacobian

N, D, H, K = 5, 3, 12, 2


def _model():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
  params = {"w": jax.random.normal(k1, (D, H)), "v": jax.random.normal(k2, (H, K))}
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"] / np.sqrt(H)
  return apply_fn, params, jax.random.normal(k3, (N, D))


def test_radius_matches_dense_svd_and_hessians():
  apply_fn, params0, x = _model()
  jac = dense_jacobian(apply_fn, params0, x).reshape(N * K, -1)   # stacked (n·k, P), P = 60
  sigma_min = np.linalg.svd(jac, compute_uv=False)[-1]
  gamma = np.abs(np.linalg.eigvalsh(dense_hessians(apply_fn, params0, x))).max()
  assert sigma_min > 0.05  # well conditioned: float32 resolves it
  got = nd.lazy_radius(apply_fn, params0, x)
  # Measured relative errors: σ_min 5.5e-6 (float32 kernel), γ 8e-9.
  np.testing.assert_allclose(float(got.sigma_min), sigma_min, rtol=5e-4)
  np.testing.assert_allclose(float(got.hessian_norm.value), gamma, rtol=1e-6)
  np.testing.assert_allclose(float(got.radius), sigma_min / (2 * gamma), rtol=5e-4)

  flat0, unravel = ravel_pytree(params0)
  step = jnp.zeros_like(flat0).at[0].set(3.0 * float(got.radius))
  ratio = radius_lib.lazy_radius_ratio(unravel(flat0 + step), params0, got.radius)
  np.testing.assert_allclose(float(ratio), 3.0, rtol=1e-5)
  assert float(radius_lib.lazy_radius_ratio(params0, params0, got.radius)) == 0.0


def test_rank_deficient_jacobian_and_linear_model():
  apply_fn, params0, _ = _model()
  x = jax.random.normal(jax.random.PRNGKey(0), (40, D))   # n·k = 80 > P = 60: σ_min = 0
  sigma = radius_lib.jacobian_sigma_min_core(apply_fn, params0, x)
  lam_max = float(np.linalg.norm(dense_jacobian(apply_fn, params0, x).reshape(80, -1), 2)) ** 2
  # Rounding floor: sqrt(n·k·eps·λ_max), see lazy_radius's note.
  assert float(sigma) <= np.sqrt(80 * 1.2e-7 * lam_max)
  big = np.finfo(np.float32).max
  assert float(radius_lib.radius_from_norms(jnp.float32(0.0), jnp.float32(1.0))) == 0.0
  assert float(radius_lib.radius_from_norms(jnp.float32(1.0), jnp.float32(0.0))) == big
  assert float(radius_lib.lazy_radius_ratio(params0, jax.tree.map(lambda a: a + 1, params0),
                                            jnp.float32(0.0))) == big


def test_validation():
  apply_fn, params0, x = _model()
  with pytest.raises(ValueError, match="num_iters"):
    nd.lazy_radius(apply_fn, params0, x, num_iters=0)
  with pytest.raises(TypeError, match="apply_fn"):
    nd.lazy_radius(None, params0, x)
