"""empirical_ntk rejects bad arguments in Python, naming them, before tracing."""

import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd

PARAMS = {"w": jnp.ones((4, 2), jnp.float32)}
X = jnp.ones((5, 4), jnp.float32)


class CountingModel:
  """``apply_fn`` that records every call, traced or not."""

  def __init__(self):
    self.calls = 0

  def __call__(self, params, x):
    self.calls += 1
    return x @ params["w"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="bogus"), ValueError, "method"),
    (dict(method="Jacobian"), ValueError, "method"),
    (dict(method=None), ValueError, "method"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-3), ValueError, "batch_size"),
    (dict(batch_size=2.0), TypeError, "batch_size"),
    (dict(batch_size="4"), TypeError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(trace_outputs="yes"), TypeError, "trace_outputs"),
    (dict(x2=jnp.ones((3, 5), jnp.float32)), ValueError, "x2"),
    (dict(x2=jnp.ones((3, 4, 1), jnp.float32)), ValueError, "x2"),
    (dict(x2=jnp.ones((0, 4), jnp.float32)), ValueError, "x2"),
    (dict(x2={"a": jnp.ones((3, 4), jnp.float32)}), ValueError, "x2"),
])
def test_bad_arguments_raise_before_tracing(kwargs, error, match):
  apply_fn = CountingModel()
  x2 = kwargs.pop("x2", None)
  with pytest.raises(error, match=match):
    nd.empirical_ntk(apply_fn, PARAMS, X, x2, **kwargs)
  assert apply_fn.calls == 0


@pytest.mark.parametrize("x1", [
    jnp.ones((0, 4), jnp.float32),  # no examples
    {},  # no leaves
    jnp.float32(1.0),  # no batch axis
    {"a": jnp.ones((5, 4)), "b": jnp.ones((3, 4))},  # ragged batch
])
def test_bad_x1_raises_before_tracing(x1):
  apply_fn = CountingModel()
  with pytest.raises(ValueError, match="x1"):
    nd.empirical_ntk(apply_fn, PARAMS, x1)
  assert apply_fn.calls == 0


def test_apply_fn_not_callable():
  with pytest.raises(TypeError, match="apply_fn"):
    nd.empirical_ntk(PARAMS, PARAMS, X)


def test_apply_fn_without_batch_axis_or_returning_pytree():
  with pytest.raises(ValueError, match="apply_fn"):
    nd.empirical_ntk(lambda p, x: (x @ p["w"]).sum(), PARAMS, X)
  with pytest.raises(TypeError, match="apply_fn"):
    nd.empirical_ntk(lambda p, x: {"y": x @ p["w"]}, PARAMS, X)


def test_valid_edge_values_are_accepted():
  apply_fn = CountingModel()
  kernel = nd.empirical_ntk(apply_fn, PARAMS, X, batch_size=np.int64(2), trace_outputs=np.bool_(True),
                            method="jacobian")
  assert kernel.shape == (5, 5)
  # A single example and a cross batch of a different size are fine.
  assert nd.empirical_ntk(apply_fn, PARAMS, X[:1], X[:2]).shape == (1, 2, 2, 2)
