"""nd.kernel_predictor against gradient descent on the linearized twin and dense solves."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd
from models import MLP

predict_module = importlib.import_module("ntk_diag.predict")

N_TRAIN, N_TEST, K_OUT = 6, 5, 3


def _problem(features=K_OUT, seed=0):
  kx, kt, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 4)
  x_train = jax.random.normal(kx, (N_TRAIN, 4))
  x_test = jax.random.normal(kt, (N_TEST, 4))
  y_shape = (N_TRAIN,) if features == 1 else (N_TRAIN, features)
  y = jax.random.normal(ky, y_shape)
  module = MLP(hidden=(32,), out=features, squeeze=features == 1)
  apply_fn, params = nd.from_linen(module, module.init(kp, x_train))
  return dict(apply_fn=apply_fn, params=params, x_train=x_train, x_test=x_test, y=y,
              k_train=nd.empirical_ntk(apply_fn, params, x_train),
              k_test=nd.empirical_ntk(apply_fn, params, x_test, x_train),
              f0_train=apply_fn(params, x_train), f0_test=apply_fn(params, x_test))


@pytest.fixture(scope="module")
def full():
  return _problem(K_OUT)


@pytest.fixture(scope="module")
def scalar():
  return _problem(1, seed=1)


def _gradient_descent(p, learning_rate, steps):
  """``steps`` steps of full-batch GD with the SUM loss on the linearized twin."""
  apply_lin = nd.linearize(p["apply_fn"], p["params"])
  loss = lambda params: 0.5 * jnp.sum((apply_lin(params, p["x_train"]) - p["y"]) ** 2)

  @jax.jit
  def run(params):
    step = lambda _, q: jax.tree.map(lambda a, g: a - learning_rate * g, q, jax.grad(loss)(q))
    return jax.lax.fori_loop(0, steps, step, params)

  params = run(p["params"])
  return apply_lin(params, p["x_train"]), apply_lin(params, p["x_test"])


def _rel(got, want, ref):
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want - ref))


def _lam_max(p):
  from ntk_diag import _layout
  return float(jnp.linalg.eigvalsh(_layout.kernel_to_matrix(p["k_train"]))[-1])


@pytest.mark.parametrize("name", ["full", "scalar"])
def test_finite_time_matches_gradient_descent(name, request):
  p = request.getfixturevalue(name)
  assert p["k_train"].ndim == (4 if name == "full" else 2)
  lr = 0.01 / _lam_max(p)  # η·λ_max = 0.01: GD ≈ gradient flow
  steps = 300
  gd_train, gd_test = _gradient_descent(p, lr, steps)
  predict = nd.kernel_predictor(p["k_train"], p["y"], learning_rate=lr)
  train = predict(steps, p["f0_train"])
  test = predict(steps, p["f0_train"], p["f0_test"], p["k_test"])
  assert train.shape == p["y"].shape and test.shape == p["f0_test"].shape
  # GD is not the flow: with η·λ_max = 0.01 each mode is off by O(ηλ)
  # (measured 9.8e-4, 2026-11-29); the exact flow is checked against a
  # float64 matrix exponential in test_finite_time_matches_dense_expm.
  assert _rel(train, gd_train, p["f0_train"]) < 5e-3
  assert _rel(test, gd_test, p["f0_test"]) < 5e-3
  # ... and training has moved the outputs (the comparison is not vacuous).
  assert float(jnp.linalg.norm(train - p["f0_train"])) > 0.5


def _dense_interpolator(k_train, k_test, y, f0_train, f0_test):
  from ntk_diag import _layout
  kxx = np.asarray(_layout.kernel_to_matrix(k_train), np.float64)
  kx = np.asarray(_layout.kernel_to_matrix(k_test), np.float64)
  r = np.asarray(y, np.float64) - np.asarray(f0_train, np.float64)
  r = r.reshape(kxx.shape[0], -1)
  return np.asarray(f0_test, np.float64) + (kx @ np.linalg.solve(kxx, r)).reshape(
      np.shape(f0_test))


@pytest.mark.parametrize("name", ["full", "scalar"])
def test_infinite_time_matches_dense_solve(name, request):
  p = request.getfixturevalue(name)
  predict = nd.kernel_predictor(p["k_train"], p["y"])
  want = _dense_interpolator(p["k_train"], p["k_test"], p["y"], p["f0_train"], p["f0_test"])
  got = predict(None, p["f0_train"], p["f0_test"], p["k_test"])
  # K⁻¹ amplifies float32 rounding by cond(K): measured 1.3e-5 relative.
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
  np.testing.assert_allclose(predict(f0_train=p["f0_train"]), p["y"], rtol=1e-6)
  # Long finite time approaches t = ∞.
  # Eigendecomposition vs Cholesky path: measured 3.7e-5 relative.
  np.testing.assert_allclose(predict(1e7, p["f0_train"], p["f0_test"], p["k_test"]), got,
                             rtol=4e-3, atol=4e-3 * np.abs(want).max())


def test_two_dimensional_kernel_is_per_output(scalar):
  p = scalar
  y2 = jnp.stack([p["y"], -2.0 * p["y"], p["y"] + 1.0], axis=1)  # (n, 3)
  f0_tr = jnp.stack([p["f0_train"]] * 3, axis=1)
  f0_te = jnp.stack([p["f0_test"]] * 3, axis=1)
  eye = jnp.eye(3)
  k4_train = p["k_train"][:, :, None, None] * eye  # K ⊗ I: uncoupled outputs
  k4_test = p["k_test"][:, :, None, None] * eye
  lr = 0.1 / _lam_max(p)
  two_d = nd.kernel_predictor(p["k_train"], y2, learning_rate=lr)
  four_d = nd.kernel_predictor(k4_train, y2, learning_rate=lr)
  for t in (None, 5.0):
    got2 = two_d(t, f0_tr, f0_te, p["k_test"])
    got4 = four_d(t, f0_tr, f0_te, k4_test)
    assert got2.shape == got4.shape == (N_TEST, 3)
    np.testing.assert_allclose(got2, got4, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(two_d(t, f0_tr), four_d(t, f0_tr), rtol=1e-4, atol=1e-4)
    single = nd.kernel_predictor(p["k_train"], y2[:, 1], learning_rate=lr)
    np.testing.assert_allclose(got2[:, 1], single(t, f0_tr[:, 1], f0_te[:, 1], p["k_test"]),
                               rtol=1e-5, atol=1e-5)


def test_eigendecomposition_and_cholesky_are_cached(full, monkeypatch):
  calls = {"eigh": 0, "chol": 0}
  eigh, chol = predict_module._eigh, predict_module._cholesky

  def counting(name, fn):
    def wrapped(m):
      calls[name] += 1
      return fn(m)
    return wrapped

  monkeypatch.setattr(predict_module, "_eigh", counting("eigh", eigh))
  monkeypatch.setattr(predict_module, "_cholesky", counting("chol", chol))
  predict = nd.kernel_predictor(full["k_train"], full["y"], learning_rate=0.01)
  assert calls == {"eigh": 0, "chol": 0}  # lazy
  eager = predict(3.0, full["f0_train"], full["f0_test"], full["k_test"])
  predict(7.0, full["f0_train"])
  jitted = jax.jit(lambda t: predict(t, full["f0_train"], full["f0_test"], full["k_test"]))
  np.testing.assert_allclose(jitted(3.0), eager, rtol=1e-5, atol=1e-6)
  jax.vmap(lambda t: predict(t, full["f0_train"]))(jnp.array([1.0, 2.0]))
  predict(None, 0.0, 0.0, full["k_test"])
  predict(None, full["f0_train"], full["f0_test"], full["k_test"])
  assert calls == {"eigh": 1, "chol": 1}


def test_predictor_built_under_jit(scalar):
  p = scalar
  eager = nd.kernel_predictor(p["k_train"], p["y"])(2.0, 0.0, 0.0, p["k_test"])
  traced = jax.jit(lambda k, y, kx: nd.kernel_predictor(k, y)(2.0, 0.0, 0.0, kx))(
      p["k_train"], p["y"], p["k_test"])
  np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-6)


def test_singular_kernel(scalar):
  p = scalar
  x = jnp.concatenate([p["x_train"], p["x_train"][:1]])  # a duplicated point
  y = jnp.concatenate([p["y"], p["y"][:1]])
  k = nd.empirical_ntk(p["apply_fn"], p["params"], x)
  kx = nd.empirical_ntk(p["apply_fn"], p["params"], p["x_test"], x)
  predict = nd.kernel_predictor(k, y)
  with pytest.raises(ValueError, match=r"singular.*ridge="):
    predict(None, 0.0, 0.0, kx)
  with pytest.raises(ValueError, match="singular"):
    predict()
  assert bool(jnp.all(jnp.isfinite(predict(10.0, 0.0, 0.0, kx))))  # finite t is well defined
  ridged = nd.kernel_predictor(k, y, ridge=1e-3 * float(jnp.trace(k)))(None, 0.0, 0.0, kx)
  assert bool(jnp.all(jnp.isfinite(ridged)))
  with pytest.raises(ValueError, match="positive semi-definite"):
    nd.kernel_predictor(-k, y)
  with pytest.raises(ValueError, match="symmetric"):
    nd.kernel_predictor(k + jnp.triu(jnp.ones_like(k)), y)
  with pytest.raises(ValueError, match="singular"):
    nd.kernel_predictor(jnp.zeros((3, 3)), jnp.ones(3))()


def test_validation(full, scalar):
  k4, y4, kx4 = full["k_train"], full["y"], full["k_test"]
  k2, y2, kx2 = scalar["k_train"], scalar["y"], scalar["k_test"]
  bad = [
      (lambda: nd.kernel_predictor(k2[:, :4], y2), "square"),
      (lambda: nd.kernel_predictor(k2[None], y2), "2-D"),
      (lambda: nd.kernel_predictor(k2, y2[:4]), "y_train.*n = 6"),
      (lambda: nd.kernel_predictor(k4, y4[:, :2]), "k = 3"),
      (lambda: nd.kernel_predictor(k4, y4, learning_rate=0.0), "learning_rate"),
      (lambda: nd.kernel_predictor(k4, y4, ridge=-1.0), "ridge"),
      (lambda: nd.kernel_predictor(k4, y4)(-1.0), "`t`"),
      (lambda: nd.kernel_predictor(k4, y4)(1.0, y4[:3]), "f0_train"),
      (lambda: nd.kernel_predictor(k4, y4)(1.0, 0.0, full["f0_test"]), "f0_test"),
      (lambda: nd.kernel_predictor(k4, y4)(1.0, 0.0, full["f0_test"][:2], kx4), "f0_test"),
      (lambda: nd.kernel_predictor(k4, y4)(1.0, 0.0, 0.0, kx4[:, :4]), "k_test_train"),
      (lambda: nd.kernel_predictor(k4, y4)(1.0, 0.0, 0.0, kx2), "k_test_train"),
      (lambda: nd.kernel_predictor(k2, y2)(None, 0.0, 0.0, kx4), r"\(m, 6\)"),
  ]
  for fn, match in bad:
    with pytest.raises(ValueError, match=match):
      fn()
  with pytest.raises(TypeError, match="`t`"):
    nd.kernel_predictor(k2, y2)("soon")
  with pytest.raises(TypeError, match="k_train_train"):
    nd.kernel_predictor([[1.0]], [1.0])


# --------------------------------------------------------------------------
# The exact flow against float64 matrix exponentials (scipy.linalg.expm).
# --------------------------------------------------------------------------

def _expm_flow(k_train, y, f0_train, eta_t, k_test=None, f0_test=None, ridge=0.0):
  """Gradient flow of the linearized network in float64, without eigendecompositions.

  Train: ``f0 + (I − e^{−ηtK}) r``. Test: ``f0(x) + K_xX · ηt·φ(−ηtK) r`` where
  ``φ(Z) = ∫₀¹ e^{sZ} ds`` is the top-right block of ``expm([[Z, I], [0, 0]])``
  (Van Loan), so ``K⁻¹(I − e^{−ηtK}) = ηt·φ(−ηtK)`` is formed without
  inverting ``K``: it is defined for singular kernels too.
  """
  import scipy.linalg
  from ntk_diag import _layout
  kxx = np.asarray(_layout.kernel_to_matrix(jnp.asarray(k_train)), np.float64)
  size = kxx.shape[0]
  kxx = kxx + ridge * np.eye(size)
  r = (np.asarray(y, np.float64) - np.asarray(f0_train, np.float64)).reshape(size, -1)
  z = -eta_t * kxx
  if k_test is None:
    return np.asarray(f0_train, np.float64) + ((np.eye(size) - scipy.linalg.expm(z)) @ r).reshape(
        np.shape(y))
  block = np.zeros((2 * size, 2 * size))
  block[:size, :size], block[:size, size:] = z, np.eye(size)
  phi = scipy.linalg.expm(block)[:size, size:]
  kx = np.asarray(_layout.kernel_to_matrix(jnp.asarray(k_test)), np.float64)
  f0_test = np.asarray(f0_test, np.float64)
  return f0_test + (kx @ (eta_t * phi @ r)).reshape(f0_test.shape)


def _rel64(got, want, ref):
  """``‖got − want‖ / ‖want − ref‖`` in float64: error relative to how far training moved."""
  got, want, ref = (np.asarray(a, np.float64) for a in (got, want, ref))
  return float(np.linalg.norm(got - want) / np.linalg.norm(want - ref))


# float32 eigendecomposition vs float64 expm, relative to the movement of the
# predictions (2026-11-29): measured <= 1.6e-6 for η·t·λ_max <= 2 ...
FLOW_TOL = 1e-4
# ... and up to 4.0e-5 at η·t·λ_max = 30, where the modes of the smallest
# eigenvalues, whose float32 eigenvectors are least accurate, have moved too
# (1.4e-5 on a regular kernel, 4.0e-5 with a duplicated point).
LATE_FLOW_TOL = 4e-3


def _flow_tol(eta_t_lam_max):
  return FLOW_TOL if eta_t_lam_max <= 2 else LATE_FLOW_TOL


@pytest.mark.parametrize("name", ["full", "scalar"])
@pytest.mark.parametrize("eta_t", [0.3, 30.0])  # η·t·λ_max: early and late
def test_finite_time_matches_dense_expm(name, eta_t, request):
  p = request.getfixturevalue(name)
  lr = 1.0 / _lam_max(p)
  predict = nd.kernel_predictor(p["k_train"], p["y"], learning_rate=lr)
  t = eta_t / lr
  train = predict(t, p["f0_train"])
  test = predict(t, p["f0_train"], p["f0_test"], p["k_test"])
  assert _rel64(train, _expm_flow(p["k_train"], p["y"], p["f0_train"], eta_t),
                p["f0_train"]) <= _flow_tol(eta_t)
  assert _rel64(test, _expm_flow(p["k_train"], p["y"], p["f0_train"], eta_t, p["k_test"],
                                 p["f0_test"]), p["f0_test"]) <= _flow_tol(eta_t)


def test_singular_kernel_at_finite_time_matches_dense_expm(scalar):
  # Two copies of a training point with different targets: K is singular and
  # the residual has a component in its null space, which gradient flow never
  # fits (the train predictions at the copies stay apart).
  p = scalar
  x = jnp.concatenate([p["x_train"], p["x_train"][:1]])
  y = jnp.concatenate([p["y"], p["y"][:1] + 1.0])
  f0 = p["apply_fn"](p["params"], x)
  k = nd.empirical_ntk(p["apply_fn"], p["params"], x)
  kx = nd.empirical_ntk(p["apply_fn"], p["params"], p["x_test"], x)
  lr = 1.0 / _lam_max(p)
  predict = nd.kernel_predictor(k, y, learning_rate=lr)
  for eta_t in (0.3, 30.0):
    train = predict(eta_t / lr, f0)
    assert _rel64(train, _expm_flow(k, y, f0, eta_t), f0) <= _flow_tol(eta_t)
    test = predict(eta_t / lr, f0, p["f0_test"], kx)
    assert _rel64(test, _expm_flow(k, y, f0, eta_t, kx, p["f0_test"]),
                  p["f0_test"]) <= _flow_tol(eta_t)
  # The copies have equal kernel rows and equal f0: the flow moves them
  # together and never fits the difference of their targets, 1.0 (measured
  # 8.6e-5 apart: float32 eigenvectors of this ill-conditioned kernel).
  assert abs(float(train[0] - train[-1])) <= 1e-2


def test_null_space_gain_is_eta_t():
  # K_xX (K⁻¹(I − e^{−ηtK})) has the limit ηt on K's null space. An exactly
  # singular K (two zero rows, eigenvalues exactly 0) with a test-train kernel
  # that is not in K's row space, e.g. from another model, exercises it.
  rng = np.random.default_rng(3)
  a = rng.standard_normal((3, 3))
  k = np.zeros((5, 5))
  k[:3, :3] = a @ a.T
  perm = [3, 0, 4, 1, 2]
  k = k[perm][:, perm].astype(np.float32)
  kx = rng.standard_normal((4, 5)).astype(np.float32)
  y = rng.standard_normal(5).astype(np.float32)
  predict = nd.kernel_predictor(k, y, learning_rate=0.5)
  for t in (0.2, 4.0):
    got = predict(t, 0.0, 0.0, kx)
    want = _expm_flow(k, y, np.zeros(5), 0.5 * t, kx, np.zeros(4))
    assert _rel64(got, want, np.zeros(4)) <= FLOW_TOL, t
    assert _rel64(predict(t), _expm_flow(k, y, np.zeros(5), 0.5 * t), np.zeros(5)) <= FLOW_TOL


def test_ridge_matches_dense_solve_and_expm(full):
  p = full
  ridge = 0.1 * _lam_max(p)
  predict = nd.kernel_predictor(p["k_train"], p["y"], ridge=ridge, learning_rate=0.5 / _lam_max(p))
  from ntk_diag import _layout
  kxx = np.asarray(_layout.kernel_to_matrix(p["k_train"]), np.float64) + ridge * np.eye(N_TRAIN * K_OUT)
  kx = np.asarray(_layout.kernel_to_matrix(p["k_test"]), np.float64)
  r = (np.asarray(p["y"], np.float64) - np.asarray(p["f0_train"], np.float64)).reshape(-1)
  want = np.asarray(p["f0_test"], np.float64) + (kx @ np.linalg.solve(kxx, r)).reshape(N_TEST, K_OUT)
  got = predict(None, p["f0_train"], p["f0_test"], p["k_test"])
  assert _rel64(got, want, p["f0_test"]) <= FLOW_TOL
  t = 20.0
  want_t = _expm_flow(p["k_train"], p["y"], p["f0_train"], 0.5 / _lam_max(p) * t, p["k_test"],
                      p["f0_test"], ridge=ridge)
  assert _rel64(predict(t, p["f0_train"], p["f0_test"], p["k_test"]), want_t,
                p["f0_test"]) <= FLOW_TOL


# ----------------------------------------------------------------------------
# Other losses: the kernel gradient flow integrated by diffrax.
# ----------------------------------------------------------------------------

LABELS = jnp.arange(N_TRAIN) % K_OUT


def _ce_gradient_descent(p, learning_rate, steps):
  """Explicit GD with the SUMMED cross-entropy on the linearized twin."""
  apply_lin = nd.linearize(p["apply_fn"], p["params"])
  y = jax.nn.one_hot(LABELS, K_OUT)
  loss = lambda q: -jnp.sum(y * jax.nn.log_softmax(apply_lin(q, p["x_train"])))

  @jax.jit
  def run(params):
    step = lambda _, q: jax.tree.map(lambda a, g: a - learning_rate * g, q, jax.grad(loss)(q))
    return jax.lax.fori_loop(0, steps, step, params)

  params = run(p["params"])
  return apply_lin(params, p["x_train"]), apply_lin(params, p["x_test"])


def test_cross_entropy_flow_matches_gradient_descent(full):
  p = full
  lr = 0.01 / _lam_max(p)  # η·λ_max = 0.01: GD ≈ gradient flow
  steps = 1000
  gd_train, gd_test = _ce_gradient_descent(p, lr, steps)
  predict = nd.kernel_predictor(p["k_train"], LABELS, learning_rate=lr,
                                loss="softmax_cross_entropy")
  train = predict(steps, p["f0_train"])
  # `t` may be traced (jit, vmap): the test predictions go through jax.jit.
  test = jax.jit(lambda t: predict(t, p["f0_train"], p["f0_test"], p["k_test"]))(steps)
  assert train.shape == (N_TRAIN, K_OUT) and test.shape == (N_TEST, K_OUT)
  # The flow moved the logits (not vacuous) ...
  assert float(jnp.linalg.norm(train - p["f0_train"])) > 1.0
  # ... and matches GD to O(η·λ_max): measured 2.8e-4 (train) and 2.5e-4 (test).
  assert _rel(train, gd_train, p["f0_train"]) < 2e-2
  assert _rel(test, gd_test, p["f0_test"]) < 2e-2
  one_hot = nd.kernel_predictor(p["k_train"], jax.nn.one_hot(LABELS, K_OUT), learning_rate=lr,
                                loss="softmax_cross_entropy")
  np.testing.assert_allclose(one_hot(steps, p["f0_train"]), train, rtol=1e-6, atol=1e-6)


def test_squared_loss_through_the_ode_matches_closed_form(full):
  p = full
  lr = 0.5 / _lam_max(p)
  squared = lambda f, y: 0.5 * jnp.sum((f - y) ** 2, axis=-1)  # a callable: integrated
  closed = nd.kernel_predictor(p["k_train"], p["y"], learning_rate=lr)
  ode = nd.kernel_predictor(p["k_train"], p["y"], learning_rate=lr, loss=squared)
  t = 10.0  # η·t·λ_max = 5
  for args in ((p["f0_train"],), (p["f0_train"], p["f0_test"], p["k_test"])):
    want = closed(t, *args)
    got = ode(t, *args)
    # Measured 2.5e-6 (train) and 1.9e-6 (test) relative to the movement
    # (the solver's rtol = atol = 1e-5).
    assert _rel(got, want, args[-1] if len(args) == 1 else args[1]) < 3e-4


def test_flow_validation(full, scalar):
  k4, kx4 = full["k_train"], full["k_test"]
  ce = dict(loss="softmax_cross_entropy")
  with pytest.raises(ValueError, match="finite"):
    nd.kernel_predictor(k4, LABELS, **ce)(None)
  with pytest.raises(ValueError, match=r"full \(n, n, k, k\)"):
    nd.kernel_predictor(scalar["k_train"], LABELS, **ce)
  with pytest.raises(ValueError, match="y_train"):
    nd.kernel_predictor(k4, LABELS[:4], **ce)
  with pytest.raises(TypeError, match="integers"):
    nd.kernel_predictor(k4, LABELS.astype(jnp.float32), **ce)
  with pytest.raises(ValueError, match="`loss`"):
    nd.kernel_predictor(k4, LABELS, loss="hinge")
  with pytest.raises(ValueError, match="max_steps"):
    nd.kernel_predictor(k4, LABELS, max_steps=0, **ce)
  exhausted = nd.kernel_predictor(k4, LABELS, max_steps=2, **ce)
  with pytest.raises(ValueError, match="max_steps=2"):
    exhausted(1e4, 0.0, 0.0, kx4)
