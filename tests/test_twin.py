"""nd.LinearizedTwin against the linear model trained by hand in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from ntk_diag import twin as twin_lib
from reference import dense_jacobian

N, D, H, K = 12, 4, 16, 3


def _model():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": jax.random.normal(k1, (D, H)), "b": 0.1 * jax.random.normal(k2, (H,)),
            "v": jax.random.normal(k3, (H, K))}

  def apply_fn(p, x, scale=1.0):
    return scale * jnp.tanh(x @ p["w"] / np.sqrt(D) + p["b"]) @ p["v"] / np.sqrt(H)

  x = jax.random.normal(jax.random.PRNGKey(1), (N, D))
  labels = jnp.arange(N) % K
  return apply_fn, params, x, labels


def _softmax(f):
  e = np.exp(f - f.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _numpy_twin(jac, f0, flat0, y, batches, lr, momentum, loss):
  """SGD(+momentum, optax's trace) on the linear model, float64, mean batch loss."""
  theta, trace = flat0.copy(), np.zeros_like(flat0)
  for idx in batches:
    j = jac[idx]                                   # (B, k, P)
    f = f0[idx] + j @ (theta - flat0)              # (B, k)
    g = (f - y[idx]) if loss == "mse" else (_softmax(f) - y[idx])
    grad = np.einsum("bkp,bk->p", j, g) / len(idx)
    trace = grad + momentum * trace
    theta = theta - lr * trace
  return theta


@pytest.mark.parametrize("loss,momentum,batch", [
    ("mse", 0.0, N),                      # full-batch gradient descent
    ("softmax_cross_entropy", 0.9, 4),    # minibatch SGD with momentum, integer labels
])
def test_matches_dense_linear_model(loss, momentum, batch):
  apply_fn, params0, x, labels = _model()
  y_onehot = np.eye(K)[np.asarray(labels)]
  y = labels if loss == "softmax_cross_entropy" else jnp.asarray(y_onehot, jnp.float32)
  lr = 0.5
  tx = optax.sgd(lr, momentum=momentum or None)
  twin = nd.LinearizedTwin(apply_fn, params0, tx, loss=loss)
  state = twin.init()
  rng = np.random.default_rng(0)
  batches = [rng.permutation(N)[:batch] for _ in range(15)]
  for idx in batches:
    state = twin.step(state, x[idx], y[idx])
  assert int(state.step) == len(batches)

  jac = dense_jacobian(apply_fn, params0, x)           # (N, K, P) at θ0
  flat0, unravel = ravel_pytree(params0)
  f0 = np.asarray(apply_fn(params0, x), np.float64)
  want = _numpy_twin(jac, f0, np.asarray(flat0, np.float64), y_onehot, batches, lr, momentum, loss)
  got = np.asarray(ravel_pytree(state.params)[0], np.float64)
  moved = np.linalg.norm(want - flat0)
  assert moved > 0.1  # training moved the twin: the comparison is not vacuous
  # float32 steps vs float64: measured 5.2e-7 (mse) and 2.0e-7 (ce).
  assert np.linalg.norm(got - want) / moved < 5e-5
  f_want = f0 + (jac @ (want - np.asarray(flat0))).reshape(N, K)
  np.testing.assert_allclose(twin.apply(state.params, x), f_want, rtol=1e-4, atol=1e-4)


def test_model_state_is_bound():
  apply_fn, params0, x, labels = _model()
  tx = optax.adam(0.05)
  with_state = nd.LinearizedTwin(apply_fn, params0, tx, model_state=3.0)
  bound = nd.LinearizedTwin(lambda p, x: apply_fn(p, x, 3.0), params0, tx)
  y = jnp.ones((N, K))
  s1, s2 = with_state.init(), bound.init()
  for _ in range(3):
    s1, s2 = with_state.step(s1, x, y), bound.step(s2, x, y)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(with_state.apply(params0, x), 3.0 * apply_fn(params0, x), rtol=1e-5, atol=1e-6)


def test_twin_distances_match_numpy():
  apply_fn, params0, x, _ = _model()
  leaves, treedef = jax.tree.flatten(params0)
  keys = jax.random.split(jax.random.PRNGKey(5), 2 * len(leaves))
  shift = lambda ks, s: jax.tree.unflatten(
      treedef, [a + s * jax.random.normal(k, a.shape) for k, a in zip(ks, leaves)])
  params, twin_params = shift(keys[:len(leaves)], 0.3), shift(keys[len(leaves):], 0.3)
  got = jax.jit(lambda p, q: twin_lib.twin_distances(apply_fn, params0, p, q, x))(
      params, twin_params)
  jac = dense_jacobian(apply_fn, params0, x)
  flat0 = np.asarray(ravel_pytree(params0)[0], np.float64)
  flat, flat_twin = (np.asarray(ravel_pytree(p)[0], np.float64) for p in (params, twin_params))
  f0 = np.asarray(apply_fn(params0, x), np.float64)
  f = np.asarray(apply_fn(params, x), np.float64)
  f_twin = f0 + (jac @ (flat_twin - flat0)).reshape(N, K)
  np.testing.assert_allclose(got["twin_distance"],
                             np.linalg.norm(f - f_twin) / np.linalg.norm(f - f0), rtol=1e-4)
  np.testing.assert_allclose(got["twin_param_distance"],
                             np.linalg.norm(flat - flat_twin) / np.linalg.norm(flat - flat0),
                             rtol=1e-5)
  zero = twin_lib.twin_distances(apply_fn, params0, params0, params0, x)
  assert float(zero["twin_distance"]) == 0.0 and float(zero["twin_param_distance"]) == 0.0


def test_validation():
  apply_fn, params0, x, labels = _model()
  with pytest.raises(TypeError, match="`tx`"):
    nd.LinearizedTwin(apply_fn, params0, 0.1)
  with pytest.raises(ValueError, match="`loss`"):
    nd.LinearizedTwin(apply_fn, params0, optax.sgd(0.1), loss="hinge")
  with pytest.raises(TypeError, match="apply_fn"):
    nd.LinearizedTwin(None, params0, optax.sgd(0.1))
  twin = nd.LinearizedTwin(apply_fn, params0, optax.sgd(0.1), loss="softmax_cross_entropy")
  state = twin.init()
  with pytest.raises(ValueError, match="`y`"):
    twin.step(state, x, labels[:5])
  with pytest.raises(TypeError, match="integers"):
    twin.step(state, x, labels.astype(jnp.float32))
  with pytest.raises(TypeError, match="TwinState"):
    twin.step(state.params, x, labels)
