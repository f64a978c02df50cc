"""Same shapes, new values: the second call compiles nothing.

Compilations are counted with a ``jax.monitoring`` listener on the
``backend_compile`` duration event (one per XLA compilation). Every input,
for both calls, is built before counting: eager ops in the test itself
(``jnp.ones``, ``jax.tree.map``) would compile too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd
from models import MLP

_COMPILES = []


def _listener(event, duration, **kwargs):
  if "backend_compile" in event:
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_listener)


def compiles_of(fn, *args, **kwargs):
  """Compilations triggered by ``fn(*args, **kwargs)`` (result blocked on)."""
  before = len(_COMPILES)
  jax.block_until_ready(fn(*args, **kwargs))
  return len(_COMPILES) - before


def elementwise(params, x):
  """No Dense/Conv layer: ``method="auto"`` takes the FLOP-estimate path."""
  return jnp.tanh(x * params["w"] + params["b"])


@pytest.fixture(scope="module")
def two():
  """Two sets of (params, x, y, x_test) with the same shapes, different values."""
  x = jax.random.normal(jax.random.key(0), (6, 3))
  model = MLP(hidden=(8,), out=2)
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(1), x))
  first = dict(params=params, x=x, y=jax.random.normal(jax.random.key(2), (6, 2)),
               x_test=x[:3] + 1.0)
  second = jax.tree.map(lambda a: 1.5 * a - 0.25, first)
  jax.block_until_ready((first, second))
  return apply_fn, first, second


def test_listener_counts_compilations():
  assert compiles_of(jax.jit(lambda a: a * 3.0 + 1.0), np.ones(7, np.float32)) >= 1


NTK_CASES = [
    dict(method="auto"),
    dict(method="jacobian", batch_size=4),
    dict(method="ntk_vp", trace_outputs=True),
    dict(method="structured"),
    dict(method="structured", trace_outputs=True, batch_size=4),
]


@pytest.mark.parametrize("options", NTK_CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_empirical_ntk(two, options):
  apply_fn, a, b = two
  nd.empirical_ntk(apply_fn, a["params"], a["x"], **options)
  assert compiles_of(nd.empirical_ntk, apply_fn, b["params"], b["x"], **options) == 0


def test_empirical_ntk_two_inputs(two):
  apply_fn, a, b = two
  nd.empirical_ntk(apply_fn, a["params"], a["x"], a["x_test"])
  assert compiles_of(nd.empirical_ntk, apply_fn, b["params"], b["x"], b["x_test"]) == 0


def test_empirical_ntk_auto_by_flop_estimate():
  f32 = jnp.float32  # explicit: a weakly typed array would rightly recompile
  p1 = {"w": jnp.full((3,), 0.5, f32), "b": jnp.zeros((3,), f32)}
  p2 = {"w": jnp.full((3,), -1.5, f32), "b": jnp.ones((3,), f32)}
  x1, x2 = jnp.ones((5, 3), f32), jnp.full((5, 3), 2.0, f32)
  jax.block_until_ready((p1, p2, x1, x2))
  nd.empirical_ntk(elementwise, p1, x1)
  assert compiles_of(nd.empirical_ntk, elementwise, p2, x2) == 0


NORM_CASES = [
    ("jacobian_norm", dict()),
    ("jacobian_norm", dict(stacked=True, method="lanczos")),
    ("hessian_norm", dict(method="power")),
    ("hessian_norm", dict(method="lanczos", batch_size=4)),
]


@pytest.mark.parametrize("name,options", NORM_CASES,
                         ids=lambda o: o if isinstance(o, str) else "-".join(map(str, o.values())))
def test_norms(two, name, options):
  apply_fn, a, b = two
  fn = getattr(nd, name)
  options = dict(options, num_iters=20)
  fn(apply_fn, a["params"], a["x"], **options)
  assert compiles_of(fn, apply_fn, b["params"], b["x"], **options) == 0


def test_lazy_ratio(two):
  apply_fn, a, b = two
  nd.lazy_ratio(apply_fn, a["params"], a["x"], a["y"], num_iters=20)
  assert compiles_of(nd.lazy_ratio, apply_fn, b["params"], b["x"], b["y"], num_iters=20) == 0


@pytest.fixture(scope="module")
def kernels(two):
  apply_fn, a, b = two
  out = []
  for s in (a, b):
    out.append(dict(
        k=nd.empirical_ntk(apply_fn, s["params"], s["x"]),
        k_test=nd.empirical_ntk(apply_fn, s["params"], s["x_test"], s["x"]),
        k2=nd.empirical_ntk(apply_fn, s["params"], s["x"], trace_outputs=True) / 2,
        y=s["y"], f0=0.1 * s["y"], f0_test=0.2 * s["y"][:3]))
  jax.block_until_ready(out)
  return out


def test_kernel_stats(kernels):
  a, b = kernels
  nd.kernel_stats(a["k"], K0=a["k"], y=a["y"])
  assert compiles_of(nd.kernel_stats, b["k"], K0=a["k"], y=b["y"]) == 0
  nd.kernel_stats(a["k2"], top_k=3)
  assert compiles_of(nd.kernel_stats, b["k2"], top_k=3) == 0


@pytest.mark.parametrize("layout", ["k", "k2"])
def test_kernel_predictor(kernels, layout):
  a, b = kernels

  # Test kernels are sliced outside the counted region.
  for s in (a, b):
    s.setdefault("k2_test", s["k_test"].trace(axis1=2, axis2=3) / 2)
  jax.block_until_ready((a, b))

  def run(s):
    predict = nd.kernel_predictor(s[layout], s["y"], learning_rate=0.5)
    k_test = s["k_test"] if layout == "k" else s["k2_test"]
    return (predict(t=3.0, f0_train=s["f0"]),
            predict(t=3.0, f0_train=s["f0"], f0_test=s["f0_test"], k_test_train=k_test),
            predict(f0_train=s["f0"], f0_test=s["f0_test"], k_test_train=k_test),
            predict(t=7.0, f0_train=s["f0"]))

  run(a)
  assert compiles_of(run, b) == 0
