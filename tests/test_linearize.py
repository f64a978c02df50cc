"""nd.linearize: f_lin(θ0) = f(θ0) and f_lin(θ0 + δ) = f(θ0) + J δ (dense Jacobian reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from models import MLP
from models import NNXMLP


def _raw_model():
  """A plain apply_fn over a dict of params; scalar output (n,)."""
  key1, key2 = jax.random.split(jax.random.PRNGKey(3))
  params = {"w": jax.random.normal(key1, (4, 8)), "beta": jax.random.normal(key2, (8,))}

  def apply_fn(p, x):
    return jnp.tanh(x @ p["w"]) @ p["beta"] / jnp.sqrt(8.0)

  return apply_fn, params


def _model(kind):
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
  if kind == "linen":
    module = MLP(hidden=(16,), out=3)
    apply_fn, params = nd.from_linen(module, module.init(jax.random.PRNGKey(1), x))
  elif kind == "nnx":
    apply_fn, params = nd.from_nnx(NNXMLP(4, 16, 2, rngs=nnx.Rngs(2)))
  else:
    apply_fn, params = _raw_model()
  return apply_fn, params, x


def _dense_twin(apply_fn, params0, params, x):
  """f(θ0) + J (θ − θ0) in float64, J from jacrev on the ravelled parameters."""
  flat0, unravel = ravel_pytree(params0)
  flat, _ = ravel_pytree(params)
  f = lambda p: apply_fn(unravel(p), x)
  jac = np.asarray(jax.jacrev(lambda p: f(p).reshape(-1))(flat0), np.float64)
  delta = np.asarray(flat, np.float64) - np.asarray(flat0, np.float64)
  f0 = np.asarray(f(flat0), np.float64)
  return f0 + (jac @ delta).reshape(f0.shape)


@pytest.mark.parametrize("kind", ["linen", "nnx", "raw"])
@pytest.mark.parametrize("jit", [False, True])
def test_matches_dense_jacobian(kind, jit):
  apply_fn, params0, x = _model(kind)
  apply_lin = nd.linearize(apply_fn, params0)
  if jit:
    apply_lin = jax.jit(apply_lin)
  np.testing.assert_allclose(apply_lin(params0, x), apply_fn(params0, x), rtol=1e-6, atol=1e-6)

  leaves, treedef = jax.tree.flatten(params0)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  delta = jax.tree.unflatten(
      treedef, [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  params = jax.tree.map(jnp.add, params0, delta)
  got = apply_lin(params, x)
  want = _dense_twin(apply_fn, params0, params, x)
  assert got.shape == apply_fn(params0, x).shape
  # Measured: max |error| 2.4e-7 on outputs of size ~2 (2026-11-29).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The twin is not the network away from θ0.
  assert float(jnp.max(jnp.abs(got - apply_fn(params, x)))) > 1e-3


def test_linear_in_params_and_differentiable():
  apply_fn, params0, x = _model("raw")
  apply_lin = nd.linearize(apply_fn, params0)
  grad = jax.grad(lambda p: apply_lin(p, x).sum())
  g0 = ravel_pytree(grad(params0))[0]
  g1 = ravel_pytree(grad(jax.tree.map(lambda a: a + 1.0, params0)))[0]
  np.testing.assert_allclose(g0, g1, rtol=1e-5, atol=1e-6)  # J_x(θ0)ᵀ 1, independent of θ


def test_validation():
  apply_fn, params0, x = _model("raw")
  with pytest.raises(TypeError, match="apply_fn"):
    nd.linearize(params0, params0)
  with pytest.raises(ValueError, match="params0"):
    nd.linearize(apply_fn, {})
  with pytest.raises(TypeError, match="floating"):
    nd.linearize(apply_fn, {"w": jnp.ones((4, 8), jnp.int32), "beta": params0["beta"]})
  apply_lin = nd.linearize(apply_fn, params0)
  with pytest.raises(ValueError, match="tree structure"):
    apply_lin({"w": params0["w"]}, x)
