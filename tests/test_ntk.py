"""empirical_ntk against a dense Jacobian reference (tests/reference.py).

Every method must agree with ``einsum('iap,jbp->ijab', J1, J2)`` built from
``jax.jacrev`` on ravelled parameters to a relative Frobenius error of 1e-5
(``reference.NTK_TOL``; measured <= 1.8e-7) in float32, for full and traced
kernels, symmetric and cross, blocked or not.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntk_diag as nd
from models import MLP
from reference import assert_close_fro, dense_jacobian, dense_ntk, ntk_from_jacobians

METHODS = ("jacobian", "ntk_vp", "structured", "auto")
N1, N2 = 5, 3


# --------------------------------------------------------------------------
# Models: each builder returns (apply_fn, params, x1, x2) with x2 != x1.
# --------------------------------------------------------------------------

class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):  # (n, 6, 6, 2)
    x = nn.gelu(nn.Conv(4, (3, 3))(x))
    x = nn.Conv(3, (3, 3), strides=(2, 2), padding="VALID")(x)
    x = nn.tanh(x).reshape(x.shape[0], -1)
    return nn.Dense(2)(x)


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.0)(x)
    x = nn.tanh(x)
    return nn.Dense(2)(x)


class Scalar(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))[:, 0]  # (n,)


class EmbedNet(nn.Module):

  @nn.compact
  def __call__(self, tokens):  # (n, L) int32
    h = nn.Embed(num_embeddings=11, features=6)(tokens).mean(axis=1)
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(h)))


class DictInput(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.concatenate([nn.Dense(4)(x["a"]), x["b"] * nn.Dense(2)(x["b"])], axis=-1)
    return nn.Dense(2)(nn.tanh(h))


class MultiAxisOutput(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(6)(nn.tanh(nn.Dense(8)(x))).reshape(x.shape[0], 2, 3)


class SharedLayers(nn.Module):
  """One Dense applied twice (tied weights), a residual, LayerNorm, and a Dense
  over a sequence axis: layer-structure rules must sum every use of a kernel."""

  @nn.compact
  def __call__(self, x):  # (n, 3, 4)
    tied = nn.Dense(4)
    h = x + tied(nn.LayerNorm()(x))
    h = tied(nn.tanh(h))
    return nn.DenseGeneral(2, axis=(-2, -1))(h)


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.bn(self.l1(x))))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _linen(module, x1, x2, **kwargs):
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x1)
  apply_fn, params = nd.from_linen(module, variables, **kwargs)
  return apply_fn, params, x1, x2


def build_mlp():
  return _linen(MLP(hidden=(16, 8), out=3), _normal(1, (N1, 4)), _normal(2, (N2, 4)))


def build_conv():
  return _linen(ConvNet(), _normal(1, (N1, 6, 6, 2)), _normal(2, (N2, 6, 6, 2)))


def build_batchnorm():
  module = BNNet()
  x1, x2 = _normal(1, (N1, 4)), _normal(2, (N2, 4))
  variables = jax.jit(functools.partial(module.init, train=False))(jax.random.PRNGKey(0), x1)
  # One train-mode step makes the running statistics non-trivial.
  _, updates = jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))(
      variables, 3.0 * _normal(3, (16, 4)) + 1.0)
  variables = {"params": variables["params"], **updates}
  assert not np.allclose(variables["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  apply_fn, params = nd.from_linen(module, variables, train=False)
  return apply_fn, params, x1, x2


def build_scalar():
  return _linen(Scalar(), _normal(1, (N1, 4)), _normal(2, (N2, 4)))


def build_embed():
  tok = lambda seed, n: jnp.asarray(np.random.default_rng(seed).integers(0, 11, (n, 5)), jnp.int32)
  return _linen(EmbedNet(), tok(1, N1), tok(2, N2))


def build_dict_input():
  x = lambda s, n: {"a": _normal(s, (n, 3)), "b": _normal(s + 10, (n, 2))}
  return _linen(DictInput(), x(1, N1), x(2, N2))


def build_multi_axis():
  return _linen(MultiAxisOutput(), _normal(1, (N1, 4)), _normal(2, (N2, 4)))


def build_shared_layers():
  return _linen(SharedLayers(), _normal(1, (N1, 3, 4)), _normal(2, (N2, 3, 4)))


def build_nnx():
  model = NNXNet(nnx.Rngs(0))
  model(3.0 * _normal(3, (16, 4)) + 1.0)  # train mode: updates running stats
  model.eval()
  apply_fn, params = nd.from_nnx(model)
  return apply_fn, params, _normal(1, (N1, 4)), _normal(2, (N2, 4))


BUILDERS = {
    "mlp": build_mlp,
    "conv": build_conv,
    "batchnorm": build_batchnorm,
    "scalar": build_scalar,
    "embed": build_embed,
    "dict_input": build_dict_input,
    "multi_axis": build_multi_axis,
    "nnx": build_nnx,
    "shared_layers": build_shared_layers,
}


@functools.lru_cache(maxsize=None)
def model(name):
  """Built once per session so compiled kernels are reused across tests."""
  return BUILDERS[name]()


@functools.lru_cache(maxsize=None)
def jacobians(name):
  """Dense reference Jacobians ``(J1, J2)`` of x1 and x2, one jacrev per model."""
  apply_fn, params, x1, x2 = model(name)
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
  jac = dense_jacobian(apply_fn, params, both)
  return jac[:N1], jac[N1:]


def reference(name, cross, trace_outputs):
  j1, j2 = jacobians(name)
  return ntk_from_jacobians(j1, j2 if cross else j1, trace_outputs=trace_outputs)


def _expected_shape(name, n1, n2, trace_outputs):
  apply_fn, params, x1, _ = model(name)
  out = jax.eval_shape(apply_fn, params, x1).shape[1:]
  if trace_outputs or out == ():
    return (n1, n2)
  k = int(np.prod(out))
  return (n1, n2, k, k)


# --------------------------------------------------------------------------
# Agreement with the dense reference.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_symmetric_kernel(name, method):
  apply_fn, params, x1, _ = model(name)
  kernel = nd.empirical_ntk(apply_fn, params, x1, method=method)
  assert kernel.shape == _expected_shape(name, N1, N1, False)
  assert kernel.dtype == jnp.float32
  ref = reference(name, False, False)
  if ref.ndim == 4 and kernel.ndim == 2:  # scalar output: k = 1
    ref = ref[:, :, 0, 0]
  assert_close_fro(kernel, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_traced_cross_kernel(name, method):
  apply_fn, params, x1, x2 = model(name)
  kernel = nd.empirical_ntk(apply_fn, params, x1, x2, trace_outputs=True, method=method)
  assert kernel.shape == (N1, N2)
  assert_close_fro(kernel, reference(name, True, True))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "scalar"])
def test_full_cross_kernel(name, method):
  apply_fn, params, x1, x2 = model(name)
  kernel = nd.empirical_ntk(apply_fn, params, x1, x2, method=method)
  assert kernel.shape == _expected_shape(name, N1, N2, False)
  ref = reference(name, True, False)
  if kernel.ndim == 2:
    ref = ref[:, :, 0, 0]
  assert_close_fro(kernel, ref)


@pytest.mark.parametrize("method", METHODS)
def test_traced_symmetric_kernel_is_sum_not_mean(method):
  apply_fn, params, x1, _ = model("mlp")
  traced = nd.empirical_ntk(apply_fn, params, x1, trace_outputs=True, method=method)
  ref_full = reference("mlp", False, False)
  assert_close_fro(traced, np.einsum("ijaa->ij", ref_full))
  # Symmetric PSD with a positive diagonal.
  traced = np.asarray(traced, np.float64)
  np.testing.assert_allclose(traced, traced.T, rtol=1e-5, atol=1e-5 * np.abs(traced).max())
  assert np.linalg.eigvalsh(0.5 * (traced + traced.T)).min() > -1e-4 * np.trace(traced)


def test_scalar_output_model_shapes():
  apply_fn, params, x1, x2 = model("scalar")
  assert apply_fn(params, x1).shape == (N1,)
  full = nd.empirical_ntk(apply_fn, params, x1, x2)
  traced = nd.empirical_ntk(apply_fn, params, x1, x2, trace_outputs=True)
  assert full.shape == traced.shape == (N1, N2)
  np.testing.assert_allclose(full, traced, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------
# Blocking: batch_size never changes the result.
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _blocking_case():
  apply_fn, params, _, _ = model("mlp")
  x1, x2 = _normal(11, (7, 4)), _normal(12, (5, 4))  # 3 divides neither 7 nor 5
  jac = dense_jacobian(apply_fn, params, jnp.concatenate([x1, x2]))
  return apply_fn, params, x1, x2, jac[:7], jac[7:]


@pytest.mark.parametrize("trace_outputs", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_batch_size_blocks_give_identical_kernel(method, trace_outputs):
  apply_fn, params, x1, x2, j1, j2 = _blocking_case()
  ref = ntk_from_jacobians(j1, j2, trace_outputs=trace_outputs)
  whole = nd.empirical_ntk(apply_fn, params, x1, x2, trace_outputs=trace_outputs,
                           method=method, batch_size=7)
  blocked = nd.empirical_ntk(apply_fn, params, x1, x2, trace_outputs=trace_outputs,
                             method=method, batch_size=3)
  assert blocked.shape == whole.shape == ref.shape
  np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  assert_close_fro(blocked, ref)


def test_batch_size_between_n2_and_n1():
  apply_fn, params, _, _ = model("mlp")
  x1, x2 = _normal(11, (7, 4)), _normal(12, (2, 4))
  ref = dense_ntk(apply_fn, params, x1, x2)
  assert_close_fro(nd.empirical_ntk(apply_fn, params, x1, x2, method="jacobian", batch_size=4), ref)
  assert_close_fro(nd.empirical_ntk(apply_fn, params, x2, x1, method="jacobian", batch_size=4),
                   ref.transpose(1, 0, 3, 2))


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_symmetric_and_pytree_input(method):
  apply_fn, params, x1, _ = model("dict_input")
  x = jax.tree.map(lambda a: jnp.concatenate([a, a[:2] * 0.5]), x1)  # n = 7
  ref = dense_ntk(apply_fn, params, x)
  blocked = nd.empirical_ntk(apply_fn, params, x, method=method, batch_size=3)
  assert blocked.shape == ref.shape
  assert_close_fro(blocked, ref)


def test_memory_budget_picks_blocks_with_same_result():
  apply_fn, params, _, _ = model("mlp")
  x1 = _normal(11, (7, 4))
  ref = dense_ntk(apply_fn, params, x1)
  # A budget of a few per-example Jacobians forces blocking.
  kernel = nd.empirical_ntk(apply_fn, params, x1, method="jacobian", memory_budget_bytes=4096)
  assert_close_fro(kernel, ref)


# --------------------------------------------------------------------------
# Plain apply_fn (no adapter) and held-fixed state.
# --------------------------------------------------------------------------

def test_plain_function_without_adapter():
  def apply_fn(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"]

  params = {"w1": _normal(1, (4, 6)), "b1": _normal(2, (6,)), "w2": _normal(3, (6, 2))}
  x1, x2 = _normal(4, (N1, 4)), _normal(5, (N2, 4))
  ref = dense_ntk(apply_fn, params, x1, x2)
  for method in METHODS:
    assert_close_fro(nd.empirical_ntk(apply_fn, params, x1, x2, method=method), ref)


def test_linear_model_kernel_is_gram_matrix():
  # f(W, x) = x W for W of shape (d, k): K[i, j, a, b] = <x_i, x_j> δ_ab.
  apply_fn = lambda w, x: x @ w
  w = _normal(1, (4, 3))
  x1, x2 = _normal(2, (N1, 4)), _normal(3, (N2, 4))
  gram = np.asarray(x1, np.float64) @ np.asarray(x2, np.float64).T
  expected = np.einsum("ij,ab->ijab", gram, np.eye(3))
  for method in METHODS:
    assert_close_fro(nd.empirical_ntk(apply_fn, w, x1, x2, method=method), expected)
    assert_close_fro(nd.empirical_ntk(apply_fn, w, x1, x2, trace_outputs=True, method=method),
                     3 * gram)
