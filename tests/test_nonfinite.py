"""NaN in, NaN out: a diverged run stays visible in every diagnostic.

``docs/failure_modes.md``: NaN/Inf in parameters or outputs is reported as
NaN, never hidden behind a finite number (the ratios that guard a zero
denominator return 0 only for an exact 0, ``safe_div``'s "NaN stays NaN").
"""

import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd


def apply_fn(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
PARAMS = {"w1": jnp.full((3, 5), 0.3), "b1": jnp.zeros(5), "w2": jnp.full((5, 2), 0.2)}
# One NaN weight in the first layer: every output of every example depends on it.
NAN_PARAMS = dict(PARAMS, w1=PARAMS["w1"].at[1, 2].set(jnp.nan))


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured"])
def test_empirical_ntk_of_nan_params_is_nan(method):
  kernel = np.asarray(nd.empirical_ntk(apply_fn, NAN_PARAMS, X, method=method))
  assert kernel.shape == (4, 4, 2, 2) and np.isnan(kernel).all()
  assert np.isfinite(np.asarray(nd.empirical_ntk(apply_fn, PARAMS, X, method=method))).all()


def test_norms_and_twin_of_nan_params_are_nan():
  assert np.isnan(float(nd.jacobian_norm(apply_fn, NAN_PARAMS, X).value))
  assert np.isnan(float(nd.jacobian_norm(apply_fn, NAN_PARAMS, X, stacked=True).value))
  assert np.isnan(float(nd.hessian_norm(apply_fn, NAN_PARAMS, X).value))
  assert np.isnan(np.asarray(nd.linearize(apply_fn, PARAMS)(NAN_PARAMS, X))).all()
  assert np.isnan(np.asarray(nd.linearize(apply_fn, NAN_PARAMS)(PARAMS, X))).all()


def test_kernel_stats_propagate_nan():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((4, 4))
  kernel = (a @ a.T).astype(np.float32)
  nan_kernel = kernel.copy()
  nan_kernel[1, 2] = nan_kernel[2, 1] = np.nan
  y = rng.standard_normal(4).astype(np.float32)
  stats = nd.kernel_stats(nan_kernel, K0=kernel, y=y)
  for name in ("eig_max", "eig_min", "condition_number", "eigenvalues", "kernel_drift",
               "kernel_distance", "kernel_alignment"):
    assert np.isnan(np.asarray(stats[name])).all(), name
  # The trace reads the diagonal only, which is finite.
  assert float(stats["trace"]) == pytest.approx(float(np.trace(kernel.astype(np.float64))), rel=1e-6)
  # A NaN reference kernel or target reaches the ratios that use it.
  against_nan = nd.kernel_stats(kernel, K0=nan_kernel, y=np.where(np.arange(4) == 0, np.nan, y))
  for name in ("kernel_drift", "kernel_distance", "kernel_alignment"):
    assert np.isnan(float(against_nan[name])), name
  assert np.isfinite(float(against_nan["eig_max"]))


def test_kernel_predictor_refuses_a_nan_kernel():
  with pytest.raises(ValueError, match="NaN or infinite"):
    nd.kernel_predictor(np.full((3, 3), np.nan, np.float32), np.ones(3, np.float32))
