"""nd.loss_sharpness against jax.hessian + eigvalsh of the dense mean-loss Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from ntk_diag import losses
from ntk_diag import sharpness

D, H, K, N = 3, 8, 2, 6


def _problem(seed):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {"w": jax.random.normal(k1, (D, H)), "v": jax.random.normal(k2, (H, K))}
  apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"] / np.sqrt(H)
  x = jax.random.normal(k3, (N, D))
  return apply_fn, params, x, 5.0 * jax.random.normal(k4, (N, K))


def _dense_spectrum(apply_fn, params, x, y, loss):
  """Eigenvalues of the dense Hessian of the mean loss (jax.hessian, float64 eigvalsh)."""
  flat, unravel = ravel_pytree(params)
  y = losses.prepare_targets(loss, y, (N, K))
  mean_loss = lambda q: losses.mean(loss, apply_fn(unravel(q), x), y)
  return np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(mean_loss))(flat), np.float64))


def test_largest_algebraic_eigenvalue_of_an_indefinite_hessian():
  apply_fn, params, x, y = _problem(seed=2)
  spectrum = _dense_spectrum(apply_fn, params, x, y, "mse")
  # The most negative eigenvalue dominates in magnitude (-12.6 vs 2.70):
  # an estimator of the largest |λ| would return 12.6.
  assert -spectrum[0] > 3 * spectrum[-1] > 0
  est = nd.loss_sharpness(apply_fn, params, x, y)
  assert bool(est.converged) and est.per_example is None and est.vector is None
  # Measured relative error 2e-7.
  np.testing.assert_allclose(float(est.value), spectrum[-1], rtol=1e-4)


def test_cross_entropy_labels_and_one_hot():
  apply_fn, params, x, _ = _problem(seed=3)
  labels = jnp.arange(N) % K
  spectrum = _dense_spectrum(apply_fn, params, x, labels, "softmax_cross_entropy")
  by_labels = nd.loss_sharpness(apply_fn, params, x, labels, loss="softmax_cross_entropy")
  by_one_hot = nd.loss_sharpness(apply_fn, params, x, jax.nn.one_hot(labels, K),
                                 loss="softmax_cross_entropy")
  # Measured relative error 1e-7.
  np.testing.assert_allclose(float(by_labels.value), spectrum[-1], rtol=1e-4)
  np.testing.assert_allclose(float(by_one_hot.value), spectrum[-1], rtol=1e-4)


def test_core_under_jit_with_warm_start():
  apply_fn, params, x, y = _problem(seed=2)
  spectrum = _dense_spectrum(apply_fn, params, x, y, "mse")
  core = jax.jit(lambda p, init: sharpness.loss_sharpness_core(
      apply_fn, p, x, y, num_iters=100, tol=1e-5, init=init, krylov_dim=8))
  cold = core(params, jax.tree.map(jnp.ones_like, params))
  warm = core(params, cold.vector)
  np.testing.assert_allclose(float(cold.value), spectrum[-1], rtol=1e-4)
  np.testing.assert_allclose(float(warm.value), spectrum[-1], rtol=1e-4)
  assert int(warm.iterations) < int(cold.iterations)


def test_screened_core_continues_when_the_screen_has_not_converged():
  # A screen of 3 steps, then restarted Lanczos (basis of 8): from a poor start
  # the run continues past the screen; from the previous eigenvector it ends within it.
  apply_fn, params, x, y = _problem(seed=2)
  spectrum = _dense_spectrum(apply_fn, params, x, y, "mse")
  core = jax.jit(lambda p, init, screen: sharpness.loss_sharpness_core(
      apply_fn, p, x, y, num_iters=100, tol=1e-5, init=init, krylov_dim=8, screen_iters=screen),
      static_argnums=2)
  start = jax.tree.map(jnp.ones_like, params)
  cold, plain = core(params, start, 3), core(params, start, None)
  warm = core(params, cold.vector, 3)
  assert int(cold.iterations) > 3 and int(warm.iterations) <= 3
  assert bool(cold.converged) and bool(warm.converged) and bool(plain.converged)
  # Measured relative errors 2e-7.
  np.testing.assert_allclose(float(cold.value), spectrum[-1], rtol=1e-4)
  np.testing.assert_allclose(float(plain.value), spectrum[-1], rtol=1e-4)
  np.testing.assert_allclose(float(warm.value), spectrum[-1], rtol=1e-4)


def test_validation():
  apply_fn, params, x, y = _problem(seed=0)
  with pytest.raises(ValueError, match="`y`"):
    nd.loss_sharpness(apply_fn, params, x, y[:3])
  with pytest.raises(ValueError, match="`loss`"):
    nd.loss_sharpness(apply_fn, params, x, y, loss="l1")
  with pytest.raises(ValueError, match="num_iters"):
    nd.loss_sharpness(apply_fn, params, x, y, num_iters=0)
  with pytest.raises(ValueError, match="`init`"):
    nd.loss_sharpness(apply_fn, params, x, y, init={"w": params["w"]})
  with pytest.raises(TypeError, match="apply_fn"):
    nd.loss_sharpness("f", params, x, y)


@pytest.mark.parametrize("value,error", [(0, ValueError), (2.5, TypeError)])
def test_snapshot_config_rejects_bad_sharpness_screen(value, error):
  from ntk_diag.diag_state import SnapshotConfig
  with pytest.raises(error, match="sharpness_screen_iters"):
    SnapshotConfig(sharpness_screen_iters=value).validate()


def test_snapshotter_keeps_the_basis_and_drops_it_after_a_nonfinite_snapshot():
  # The compiled snapshot keeps the sharpness's Krylov basis storage between
  # calls (donated); after a NaN snapshot its rows hold NaN and must not reach
  # the next solve (0 · NaN in the masked combinations).
  from ntk_diag import diag_state
  from ntk_diag import snapshot
  apply_fn, params, x, y = _problem(seed=4)
  spec = diag_state.SnapshotSpec(apply_fn=apply_fn, with_model_state=False,
                                 config=diag_state.SnapshotConfig(num_iters=60, tol=1e-5),
                                 norm_examples=2, compute_ntk=False, compute_twin=False,
                                 warm_start=True)
  state = diag_state.initial_state(spec, params, None, x, np.asarray(y), step=0)
  run = snapshot.Snapshotter(spec, state, params, None)
  moved = jax.tree.map(lambda a: 1.1 * a, params)
  nan = dict(params, w=params["w"].at[0, 0].set(jnp.nan))
  values = []
  for step, p in enumerate([params, moved, nan, params, moved]):
    state, metrics = run(state, p, None, step)
    values.append(float(metrics["sharpness"]))
  assert run._basis is not None  # kept between calls
  assert np.isnan(values[2])
  for value, p in zip(values[:2] + values[3:], [params, moved, params, moved]):
    expected = _dense_spectrum(apply_fn, p, x, y, "mse")[-1]
    assert abs(value / expected - 1) <= 1e-4  # tol 1e-5; measured <= 1.6e-7
