"""`method="structured"` against the dense ravel_pytree/jacrev reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from models import MLP
from ntk_diag import structured
from reference import assert_close_fro, dense_ntk

# ------------------------------------------------------------------------ models


class CNN(nn.Module):
  padding: str = "SAME"
  strides: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding=self.padding, strides=self.strides)(x))
    x = nn.Conv(4, (2, 2), padding=self.padding, feature_group_count=self.groups)(x)
    x = jnp.tanh(x).reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


class EmbedDense(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(7, 4)(tokens)  # (n, L, 4)
    h = jnp.tanh(nn.Dense(5)(h))  # Dense over a sequence: positions summed
    return nn.Dense(2)(h.mean(axis=1))


class NormResidual(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(5)(x)
    h = nn.LayerNorm()(h)
    h = h + nn.Dense(5)(jax.nn.gelu(h))  # residual
    return nn.Dense(2)(h)


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4)
    h = jnp.tanh(dense(x))
    h = jnp.tanh(dense(h))  # the same weights twice
    return nn.Dense(3)(h)


class Heads(nn.Module):
  """Per-head weights: a parameter with a dot_general batch dimension."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (2, 4, 3))
    h = jnp.tanh(jnp.einsum("nhi,hio->nho", x.reshape(x.shape[0], 2, 4), w))
    return nn.Dense(2)(h.reshape(h.shape[0], -1))


class ConvMix(nn.Module):
  """1-D transposed and dilated convs, DenseGeneral over two axes, BatchNorm (inference)."""

  @nn.compact
  def __call__(self, x):
    h = nn.ConvTranspose(3, (3,), strides=(2,))(x)
    h = nn.Conv(3, (3,), kernel_dilation=(2,), padding="CIRCULAR")(jnp.tanh(h))
    h = nn.DenseGeneral((2, 2), axis=(-2, -1))(h)
    h = nn.BatchNorm(use_running_average=True)(h)
    return nn.Dense(2)(h.reshape(h.shape[0], -1))


def _linen(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  return nd.from_linen(module, variables)


def _inputs(shape, seed=1):
  # NumPy draws: jax.random.normal compiles once per shape, which dominates test time.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


CASES = {
    "mlp": lambda: (*_linen(MLP(hidden=(6, 5), out=3), _inputs((5, 4))), _inputs((3, 4), 2)),
    "mlp_no_bias": lambda: (*_linen(MLP(hidden=(6, 5), out=3, use_bias=False), _inputs((5, 4))),
                            _inputs((3, 4), 2)),
    "cnn_same": lambda: (*_linen(CNN(), _inputs((3, 5, 5, 2))), _inputs((2, 5, 5, 2), 2)),
    "cnn_valid_strided_grouped": lambda: (
        *_linen(CNN("VALID", 2, 2), _inputs((3, 7, 7, 2))), _inputs((2, 7, 7, 2), 2)),
    "conv_mix": lambda: (*_linen(ConvMix(), _inputs((3, 6, 2))), _inputs((2, 6, 2), 2)),
    "embed_dense": lambda: (
        *_linen(EmbedDense(), jnp.zeros((4, 3), jnp.int32)),
        jnp.asarray(np.random.default_rng(3).integers(0, 7, (3, 3)), jnp.int32)),
    "norm_residual": lambda: (*_linen(NormResidual(), _inputs((4, 3))), _inputs((3, 3), 2)),
    "shared": lambda: (*_linen(Shared(), _inputs((4, 4))), _inputs((3, 4), 2)),
    "heads": lambda: (*_linen(Heads(), _inputs((4, 8))), _inputs((3, 8), 2)),
}


@functools.lru_cache(maxsize=None)  # one init per model across parametrisations
def _case(name):
  apply_fn, params, x2 = CASES[name]()
  if name == "embed_dense":
    x1 = jnp.asarray(np.random.default_rng(4).integers(0, 7, (4, 3)), jnp.int32)
  else:
    x1 = _inputs((4,) + x2.shape[1:], 5)
  return apply_fn, params, x1, x2


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("trace_outputs", [False, True])
def test_matches_dense_reference(name, trace_outputs):
  apply_fn, params, x1, x2 = _case(name)
  assert structured.applies(apply_fn, params, x1)
  for other in (None, x2):
    got = nd.empirical_ntk(apply_fn, params, x1, other, trace_outputs=trace_outputs,
                           method="structured")
    assert_close_fro(got, dense_ntk(apply_fn, params, x1, other, trace_outputs=trace_outputs))


@pytest.mark.parametrize("trace_outputs", [False, True])
def test_blocks_match_unblocked(trace_outputs):
  apply_fn, params, x1, x2 = _case("cnn_same")
  x1 = jnp.concatenate([x1, x1[:1] * 0.5])
  expected = dense_ntk(apply_fn, params, x1, x2, trace_outputs=trace_outputs)
  got = nd.empirical_ntk(apply_fn, params, x1, x2, trace_outputs=trace_outputs,
                         method="structured", batch_size=2)
  assert_close_fro(got, expected)


def test_nnx_linear():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 6, rngs=rngs)
      self.l2 = nnx.Linear(6, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  apply_fn, params = nd.from_nnx(Net(nnx.Rngs(0)))
  x = _inputs((5, 4))
  assert structured.applies(apply_fn, params, x)
  assert_close_fro(nd.empirical_ntk(apply_fn, params, x, method="structured"),
                   dense_ntk(apply_fn, params, x))


def test_raw_function_with_reused_and_unrecognised_leaves():
  # `w` is used by a matmul and elementwise: it falls back. `u @ u` uses one leaf
  # in two layouts (lhs and rhs): it falls back too. `v` stays structured.
  def apply_fn(p, x):
    h = jnp.sin(x @ p["w"]) * p["w"].sum()
    h = h @ (p["u"] @ p["u"])
    return jnp.tanh(h) @ p["v"]

  params = {"w": _inputs((3, 4), 0), "u": _inputs((4, 4), 1) / 2, "v": _inputs((4, 2), 2)}
  x = _inputs((4, 3))
  plan = structured.plan.analyse(structured.graph.trace(apply_fn, params, x))
  leaves = list(jax.tree_util.tree_flatten_with_path(params)[0])
  names = [path[0].key for path, _ in leaves]
  assert [names[g.leaf] for g in plan.groups] == ["v"]
  assert sorted(names[i] for i in plan.fallback) == ["u", "w"]
  for trace_outputs in (False, True):
    assert_close_fro(nd.empirical_ntk(apply_fn, params, x, method="structured",
                                      trace_outputs=trace_outputs),
                     dense_ntk(apply_fn, params, x, trace_outputs=trace_outputs))


def test_scalar_output_and_auto_choice():
  apply_fn, params = _linen(MLP(hidden=(5,), out=1), _inputs((3, 4)))
  x = _inputs((4, 4))
  f = lambda p, x: apply_fn(p, x)[:, 0]
  got = nd.empirical_ntk(f, params, x, method="structured")
  assert got.shape == (4, 4)
  assert_close_fro(got, dense_ntk(f, params, x, trace_outputs=True))
  assert nd.ntk.choose_method(f, params, x, 4, 4, 1, 31, False) == "structured"


def test_no_structure_falls_back_to_jacobian():
  apply_fn = lambda p, x: jnp.sin(x * p["a"]).sum(-1, keepdims=True)
  params = {"a": jnp.arange(3.0)}
  x = _inputs((4, 3))
  assert not structured.applies(apply_fn, params, x)
  np.testing.assert_allclose(
      nd.empirical_ntk(apply_fn, params, x, method="structured"),
      nd.empirical_ntk(apply_fn, params, x, method="jacobian"), rtol=1e-5)


@pytest.mark.parametrize("gram_order", [True, False], ids=["gram", "jacobian"])
def test_layer_kernel_orders_agree(gram_order, monkeypatch):
  # A layer over 5 positions in 2 groups. Its sizes alone pick the Jacobian
  # order, so each order is forced: (A1 A2ᵀ) ⊙ (G1 G2ᵀ) summed over every
  # pair of positions (s, t), or the layer Jacobians Σ_s A_s ⊗ G_s contracted.
  a1, a2 = _inputs((3, 2, 5, 4), 0), _inputs((2, 2, 5, 4), 1)
  g1, g2 = _inputs((3, 3, 2, 5, 6), 2), _inputs((2, 3, 2, 5, 6), 3)
  n1, k, g, s, o = g1.shape
  assert not structured.kernel.gram_order(n1, 2, k, g, s, s, 4, o, False)  # the premise
  monkeypatch.setattr(structured.kernel, "gram_order", lambda *args: gram_order)
  expected = [np.einsum(spec, *(np.asarray(a, np.float64) for a in (a1, a2, g1, g2)))
              for spec in ("igsc,jgtc,iagso,jbgto->iajb", "igsc,jgtc,iagso,jagto->ij")]
  for trace_outputs in (False, True):
    got = jax.jit(functools.partial(structured.kernel.layer_kernel, trace_outputs=trace_outputs))(
        a1, g1, a2, g2)
    assert_close_fro(got, expected[trace_outputs])


def test_memory_budget_blocks_structured_kernel():
  apply_fn, params, x1, x2 = _case("mlp")
  k = 3
  plan = structured.plan_or_none(apply_fn, params, x1)
  full = structured.choose_batch_size(plan, 4, 3, k, False, 4, 1 << 30)
  small = structured.choose_batch_size(plan, 4, 3, k, False, 4, 6000)
  assert full == 4 and 1 <= small < 4
  got = nd.empirical_ntk(apply_fn, params, x1, x2, method="structured",
                         memory_budget_bytes=6000)
  assert_close_fro(got, dense_ntk(apply_fn, params, x1, x2))


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_kernel_and_diagonal_blocks(method):
  # One pass gives the traced kernel and the full blocks K[i, i] of the first
  # examples (the structured path), or two passes (any other method).
  apply_fn, params, x1, _ = _case("cnn_same")
  kernel, diagonal = nd.ntk.empirical_ntk_and_diagonal(apply_fn, params, x1, num_diagonal=3,
                                                       trace_outputs=True, method=method)
  assert_close_fro(kernel, dense_ntk(apply_fn, params, x1, trace_outputs=True))
  full = dense_ntk(apply_fn, params, x1)
  assert_close_fro(diagonal, np.stack([full[i, i] for i in range(3)]))


@pytest.mark.parametrize("module,shape", [
    (CNN(), (3, 6, 6, 2)),
    (CNN(padding="VALID", strides=2, groups=2), (3, 7, 7, 2)),
    (ConvMix(), (3, 5, 2)),
])
def test_model_by_patches_has_the_values_and_hessian_of_the_model(module, shape):
  # Reference: jax.hessian of a scalar of the model's own outputs, on the ravelled
  # parameters (convolutions and their transposes as XLA runs them).
  x = _inputs(shape)
  apply_fn, params = _linen(module, x)
  patched = structured.model_by_patches(apply_fn, params, x)
  assert patched is not apply_fn
  np.testing.assert_allclose(patched(params, x), apply_fn(params, x), rtol=1e-5, atol=1e-5)
  flat, unravel = ravel_pytree(params)
  scalar = lambda f: lambda q: jnp.sum(jnp.sin(f(unravel(q), x)))
  expected = np.asarray(jax.hessian(scalar(apply_fn))(flat))
  actual = np.asarray(jax.hessian(scalar(patched))(flat))
  assert np.linalg.norm(actual - expected) <= 1e-5 * np.linalg.norm(expected)


def test_model_by_patches_leaves_models_without_convolutions_alone():
  x = _inputs((3, 4))
  apply_fn, params = _linen(MLP(), x)
  assert structured.model_by_patches(apply_fn, params, x) is apply_fn
