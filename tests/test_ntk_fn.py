"""`empirical_ntk_fn` against the dense Jacobian reference (tests/reference.py),
and its choices made once: later calls with the same shapes neither re-plan
nor re-trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd
from ntk_diag import structured
from models import MLP
from reference import assert_close_fro, dense_ntk

METHODS = ("jacobian", "ntk_vp", "structured", "auto")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _mlp():
  module = MLP(hidden=(8,), out=3)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), _normal(1, (4, 4)))
  apply_fn, params = nd.from_linen(module, variables)
  return apply_fn, params, _normal(1, (4, 4)), _normal(2, (3, 4))


@pytest.mark.parametrize("method", METHODS)
def test_kernel_fn_matches_dense_reference(method):
  apply_fn, params, x1, x2 = _mlp()
  traced = nd.empirical_ntk_fn(apply_fn, trace_outputs=True, method=method)
  assert_close_fro(traced(params, x1), dense_ntk(apply_fn, params, x1, trace_outputs=True))
  full = nd.empirical_ntk_fn(apply_fn, trace_outputs=False, method=method, batch_size=2)
  assert_close_fro(full(params, x1, x2), dense_ntk(apply_fn, params, x1, x2))


def test_kernel_fn_plans_and_traces_once(monkeypatch):
  apply_fn, params, x1, _ = _mlp()
  plans, traces = [], []
  trace = structured.graph.trace
  monkeypatch.setattr(structured.graph, "trace", lambda *a: plans.append(1) or trace(*a))

  def counted(p, x):
    traces.append(1)
    return apply_fn(p, x)

  ntk_fn = nd.empirical_ntk_fn(counted, trace_outputs=True, method="auto")
  ntk_fn(params, x1)
  assert len(plans) == 1
  first_traces = len(traces)
  # New parameter and input values of the same shapes: no new plan, no new trace.
  params2 = jax.tree.map(lambda a: 0.5 * a + 0.1, params)
  x3 = _normal(3, x1.shape)
  got = ntk_fn(params2, x3)
  assert (len(plans), len(traces)) == (1, first_traces)
  assert_close_fro(got, dense_ntk(apply_fn, params2, x3, trace_outputs=True))


def test_kernel_fn_with_model_state_follows_the_state():
  # The plan must not hold the model state of the first call as a constant.
  module = MLP(hidden=(8,), out=2)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), _normal(1, (4, 4)))
  apply_fn, params = nd.from_linen(module, variables)
  scaled = lambda p, x, state: apply_fn(p, x) * state["scale"]
  ntk_fn = nd.empirical_ntk_fn(scaled, trace_outputs=False, method="structured")
  x = _normal(1, (4, 4))
  for scale in (1.0, 3.0):
    state = {"scale": jnp.float32(scale)}
    expected = dense_ntk(lambda p, x: scaled(p, x, state), params, x)
    assert_close_fro(ntk_fn(params, x, model_state=state), expected)
