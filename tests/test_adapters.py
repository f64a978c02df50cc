"""from_linen / from_nnx: what is trainable, what is held fixed, bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntk_diag as nd
from reference import assert_close_fro, dense_ntk


def _x(seed, n=6, d=3):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True, scale: float = 1.0):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Dense(5)(x))
    return scale * nn.Dense(2)(nn.tanh(x))


def _bn_variables():
  module = BNNet()
  variables = module.init(jax.random.PRNGKey(0), _x(0), train=False)
  _, updates = module.apply(variables, 2.0 * _x(1, n=32) + 1.0, train=True,
                            mutable=["batch_stats"])
  return module, {"params": variables["params"], **updates}


def test_from_linen_holds_batch_stats_fixed_and_passes_kwargs():
  module, variables = _bn_variables()
  stats = variables["batch_stats"]["BatchNorm_0"]
  assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)
  apply_fn, params = nd.from_linen(module, variables, train=False, scale=3.0)
  assert params is variables["params"]
  assert "batch_stats" not in params
  x = _x(2)
  expected = module.apply(variables, x, train=False, scale=3.0)
  np.testing.assert_allclose(apply_fn(params, x), expected, rtol=1e-6)
  # Inference mode: each example's output depends only on that example.
  np.testing.assert_allclose(apply_fn(params, x[:1]), expected[:1], rtol=1e-5, atol=1e-6)
  # New params are used, the statistics are not touched.
  params2 = jax.tree.map(lambda p: 1.5 * p, params)
  np.testing.assert_allclose(
      apply_fn(params2, x),
      module.apply({"params": params2, "batch_stats": variables["batch_stats"]}, x,
                   train=False, scale=3.0), rtol=1e-6)


def test_from_linen_kernel_only_over_params():
  module, variables = _bn_variables()
  apply_fn, params = nd.from_linen(module, variables, train=False)
  x = _x(3, n=4)
  kernel = nd.empirical_ntk(apply_fn, params, x, method="jacobian")
  # Reference: differentiate the raw module w.r.t. "params" only.
  raw = lambda p, xb: module.apply({**variables, "params": p}, xb, train=False)
  assert_close_fro(kernel, dense_ntk(raw, variables["params"], x))


def test_from_linen_module_without_extra_collections():
  module = nn.Dense(2)
  variables = module.init(jax.random.PRNGKey(0), _x(0))
  apply_fn, params = nd.from_linen(module, variables)
  np.testing.assert_allclose(apply_fn(params, _x(1)), module.apply(variables, _x(1)))


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, momentum=0.0, rngs=rngs)
    self.l2 = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.bn(self.l1(x))))


def _nnx_model():
  model = NNXNet(nnx.Rngs(0))
  model(2.0 * _x(1, n=32) + 1.0)  # train mode: non-trivial running statistics
  model.eval()
  return model


def _snapshot(model):
  return jax.tree.map(np.array, nnx.state(model))


def test_from_nnx_params_are_params_only_and_model_untouched():
  model = _nnx_model()
  before = _snapshot(model)
  apply_fn, params = nd.from_nnx(model)
  leaves = jax.tree.leaves(params)
  num_params = sum(int(np.size(p)) for p in leaves)
  assert num_params == (3 * 5 + 5) + (5 * 2 + 2) + 2 * 5  # Linear, Linear, BN scale/bias
  x = _x(2)
  np.testing.assert_allclose(apply_fn(params, x), model(x), rtol=1e-6)
  params2 = jax.tree.map(lambda p: 0.5 * p, params)
  out2 = apply_fn(params2, x)
  assert not np.allclose(out2, model(x))
  nd.empirical_ntk(apply_fn, params2, x, method="ntk_vp")
  after = _snapshot(model)
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_from_nnx_holds_non_param_state_fixed_even_in_train_mode():
  model = NNXNet(nnx.Rngs(0))  # left in train mode on purpose
  before = _snapshot(model)
  apply_fn, params = nd.from_nnx(model)
  apply_fn(params, 5.0 + _x(4))  # would update batch statistics on `model` if it leaked
  jax.tree.map(np.testing.assert_array_equal, before, _snapshot(model))


def test_from_nnx_snapshot_ignores_later_model_updates():
  model = _nnx_model()  # eval mode, running statistics in use
  apply_fn, params = nd.from_nnx(model)
  x = _x(6)
  out = np.asarray(apply_fn(params, x))
  model.train()
  model(10.0 + _x(7, n=16))  # the caller keeps training the model in place
  np.testing.assert_allclose(apply_fn(params, x), out, rtol=1e-6)


def test_from_nnx_train_mode_model_under_jit():
  model = NNXNet(nnx.Rngs(0))  # train mode: every call updates batch statistics
  apply_fn, params = nd.from_nnx(model)
  x = _x(6)
  # A stateful call must not try to write tracers into `model`.
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x), apply_fn(params, x),
                             rtol=1e-5, atol=1e-6)


def test_from_nnx_kernel_matches_reference():
  model = _nnx_model()
  apply_fn, params = nd.from_nnx(model)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  raw = lambda p, xb: nnx.merge(graphdef, p, rest)(xb)
  x = _x(5, n=4)
  assert_close_fro(nd.empirical_ntk(apply_fn, params, x, method="jacobian"),
                   dense_ntk(raw, params, x))


def test_from_linen_bad_inputs():
  module = nn.Dense(2)
  variables = module.init(jax.random.PRNGKey(0), _x(0))
  with pytest.raises(ValueError, match="params"):
    nd.from_linen(module, {"batch_stats": {}})
  with pytest.raises(TypeError, match="module"):
    nd.from_linen(object(), variables)
  with pytest.raises(TypeError, match="variables"):
    nd.from_linen(module, [variables["params"]])


def test_from_nnx_bad_inputs():
  with pytest.raises(TypeError, match="model"):
    nd.from_nnx(nn.Dense(2))
  with pytest.raises(TypeError, match="model"):
    nd.from_nnx(lambda x: x)
