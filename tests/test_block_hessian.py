"""Low-rank Hessian-vector products and the block solver against dense Hessians.

References: ``jax.hessian`` on the ravelled parameters (tests/reference.py),
products and eigenvalues in float64 NumPy.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_diag import block_hessian
from ntk_diag import norms
from reference import dense_hessians, rel_err


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(12)(x))
    x = jnp.tanh(nn.Dense(12, use_bias=False)(x))
    return nn.Dense(3)(x)


class Sequence(nn.Module):
  """A Dense layer over 2 positions (rank 4 factors) and weights used twice."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], 2, 8)
    h = jnp.tanh(nn.Dense(24)(h))  # over positions
    shared = nn.Dense(24)
    h = jnp.tanh(shared(jnp.tanh(shared(h))))  # the same weights twice
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


def with_unused(p, x):
  """A raw function with a leaf it never reads and a leaf that stays dense."""
  h = jnp.sin(x @ p["w"]) * p["scale"]
  return h @ p["v"]


def _linen(module, shape, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  variables = module.init(jax.random.PRNGKey(seed), x)
  return (lambda p, xx: module.apply({"params": p}, xx)), variables["params"], x


MODELS = {
    "mlp": lambda: _linen(MLP(), (3, 5)),
    "sequence": lambda: _linen(Sequence(), (2, 16)),
    "raw": lambda: (with_unused, {
        "w": jnp.asarray(np.random.default_rng(1).standard_normal((4, 9)), jnp.float32) / 2,
        "scale": jnp.float32(1.3) * jnp.ones((9,)),
        "unused": jnp.ones((5,)),
        "v": jnp.asarray(np.random.default_rng(2).standard_normal((9, 2)), jnp.float32)},
        jnp.asarray(np.random.default_rng(3).standard_normal((2, 4)), jnp.float32)),
}


@functools.lru_cache(maxsize=None)
def model(name):
  return MODELS[name]()


@functools.partial(jax.jit, static_argnums=(0,))
def _products(name, v):
  """``(H v, H (H v))`` of every (example, output), dense ``(n, k, P)``, from a dense ``v``."""
  apply_fn, params, x = model(name)
  layout = block_hessian.layout_or_none(apply_fn, params, x)
  k = apply_fn(params, x).reshape(x.shape[0], -1).shape[1]

  def one(xi, a):
    problem = block_hessian.linearize(layout, jax.tree.leaves(params), [xi[None]], a)
    hv = block_hessian.hvp(layout, problem, jax.tree.leaves(v))
    hhv = block_hessian.hvp(layout, problem, hv)
    flat = lambda w: ravel_pytree(block_hessian.to_pytree(layout, params, w))[0]
    return flat(hv), flat(hhv)

  return jax.vmap(lambda xi: jax.vmap(lambda a: one(xi, a))(jnp.arange(k)))(x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_products_match_dense_hessian(name):
  apply_fn, params, x = model(name)
  layout = block_hessian.layout_or_none(apply_fn, params, x)
  assert layout is not None and layout.plan.groups  # the premise: something is factored
  if name == "sequence":  # S = 2 positions; 2 uses × 2 positions; the head
    assert sorted(s for s, f in zip(layout.positions, layout.factored) if f) == [1, 2, 4]
  flat, unravel = ravel_pytree(params)
  v = np.random.default_rng(7).standard_normal(flat.shape).astype(np.float32)
  hess = dense_hessians(apply_fn, params, x)  # (n, k, P, P)
  hv, hhv = _products(name, unravel(jnp.asarray(v)))
  expected = np.einsum("ikpq,q->ikp", hess, v.astype(np.float64))
  expected2 = np.einsum("ikpq,ikq->ikp", hess, np.asarray(hv, np.float64))
  for got, want in ((hv, expected), (hhv, expected2)):
    err = np.linalg.norm(np.asarray(got, np.float64) - want, axis=-1)
    assert np.max(err / np.linalg.norm(want, axis=-1)) <= 1e-5  # measured ≤ 3e-7


def _top_abs_eig(name):
  apply_fn, params, x = model(name)
  return np.abs(np.linalg.eigvalsh(dense_hessians(apply_fn, params, x))).max(axis=-1)


_jit_core = jax.jit(norms.hessian_norm_core, static_argnames=("apply_fn", "options"))


def _core(apply_fn, params, x, *, init=None, init_values=None, **options):
  return _jit_core(apply_fn, params, x, norms.SolverOptions(**options), init=init,
                   init_values=init_values)


@pytest.mark.parametrize("name", ["mlp", "raw"])
def test_factored_warm_starts_match_dense_reference(name):
  apply_fn, params, x = model(name)
  ref = _top_abs_eig(name)
  n, k = ref.shape
  layout = block_hessian.layout_or_none(apply_fn, params, x)
  options = dict(num_iters=200, tol=1e-6, return_vector=True, factored_vectors=True)
  placeholder = block_hessian.zeros(layout, params, (n, k))
  first = _core(apply_fn, params, x, init=placeholder, **options)  # random factors
  assert isinstance(first.vector, block_hessian.LowRankVectors)
  assert jax.tree.map(jnp.shape, first.vector) == jax.tree.map(jnp.shape, placeholder)
  assert rel_err(first.per_problem, ref) <= 1e-3
  moved = jax.tree.map(lambda a: 1.02 * a, params)
  moved_ref = np.abs(np.linalg.eigvalsh(dense_hessians(apply_fn, moved, x))).max(axis=-1)
  again = _core(apply_fn, moved, x, init=first.vector, init_values=first.per_problem,
                screen_iters=3, **options)
  assert rel_err(again.value, moved_ref.max()) <= 1e-3
  assert float(again.value) <= moved_ref.max() * (1 + 1e-4)  # a lower bound
