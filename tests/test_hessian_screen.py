"""Screen-then-refine Hessian norm against dense Hessians.

``hessian_norm_core(..., screen_iters=s)`` and the snapshot that uses it are
compared with ``max_{i,a} |λ|_max(∇²_θ f_a(x_i))`` from ``jax.hessian`` on the
ravelled parameters and float64 ``numpy.linalg.eigvalsh``, on a small tanh MLP
whose largest Hessian norm is at neither the first example nor the first
output (so picking the first problem, or ignoring the screen, would fail).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_diag import diag_state
from ntk_diag import norms
from ntk_diag import snapshot
from reference import dense_hessians, rel_err

SIZES = (3, 10, 10, 4)  # k = 4 outputs, P = 194
# With the snapshot's settings (20 iterations, tol=1e-3) power iteration on H²
# stops before its tolerance: measured <= 6.0e-4 relative (cold start);
# Lanczos reaches 8.2e-7 (2026-11-29).
TOL = {"power": 1e-2, "lanczos": 1e-4}
OPTIONS = dict(num_iters=20, tol=1e-3, return_vector=True)  # SnapshotConfig's defaults

_jit_core = jax.jit(norms.hessian_norm_core, static_argnames=("apply_fn", "options"))


def _core(apply_fn, params, x, *, init=None, init_values=None, **options):
  return _jit_core(apply_fn, params, x, norms.SolverOptions(**options), init=init,
                   init_values=init_values)


def apply_fn(p, x):
  for i in range(len(SIZES) - 2):
    x = jnp.tanh(x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"])
  last = p[f"l{len(SIZES) - 2}"]
  return x @ last["w"] + last["b"]


@functools.lru_cache(maxsize=None)
def problem():
  """``(params, nearby_params, x)``; example 2 has the largest inputs."""
  key = jax.random.PRNGKey(0)
  params = {}
  for i, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, key_w, key_b = jax.random.split(key, 3)
    params[f"l{i}"] = {"w": jax.random.normal(key_w, (d_in, d_out)) / np.sqrt(d_in),
                       "b": 0.1 * jax.random.normal(key_b, (d_out,))}
  scale = jnp.array([0.5, 1.0, 2.0, 1.0, 0.8])[:, None]
  x = jax.random.normal(jax.random.PRNGKey(1), (5, SIZES[0])) * scale
  nearby = jax.tree.map(lambda a: 0.97 * a, params)
  return params, nearby, x


@functools.lru_cache(maxsize=None)
def reference(which):
  """``(hessians, norms)``: dense Hessians and ``(n, k)`` largest ``|eigenvalue|``."""
  params, nearby, x = problem()
  hess = dense_hessians(apply_fn, params if which == "params" else nearby, x)
  return hess, np.abs(np.linalg.eigvalsh(hess)).max(axis=-1)


def check_against_reference(est, hess, ref, method="power"):
  tol = TOL[method]
  best = np.unravel_index(np.argmax(ref), ref.shape)
  assert best[0] != 0 and best[1] != 0  # the test's premise, on the reference alone
  assert rel_err(est.value, ref.max()) <= tol
  assert float(est.value) <= ref.max() * (1 + 1e-4)  # a lower bound
  assert np.all(np.asarray(est.per_problem) <= ref * (1 + 1e-4))
  assert np.all(np.asarray(est.per_example) <= ref.max(axis=1) * (1 + 1e-4))
  assert rel_err(est.per_example[best[0]], ref[best]) <= tol
  # The refined vector is stored at the best problem: ‖H v‖ = |λ|_max there.
  v = np.asarray(ravel_pytree(jax.tree.map(lambda a: a[best], est.vector))[0], np.float64)
  assert rel_err(np.linalg.norm(hess[best] @ v) / np.linalg.norm(v), ref.max()) <= tol


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("start", ["cold", "warm"])
def test_screened_norm_matches_dense_maximum(method, start):
  params, nearby, x = problem()
  hess, ref = reference("params")
  options = dict(OPTIONS, method=method, screen_iters=3)
  cold_values = jnp.full(ref.shape, jnp.inf)  # no ranking yet: every problem is refined
  if start == "cold":  # random start vectors
    est = _core(apply_fn, params, x, init_values=cold_values, **options)
  else:  # vectors and ranking of a previous call at nearby parameters
    previous = _core(apply_fn, nearby, x, init_values=cold_values, **options)
    est = _core(apply_fn, params, x, init=previous.vector, init_values=previous.per_problem,
                **options)
  check_against_reference(est, hess, ref, method)


def test_stale_warm_vector_of_the_top_problem_is_refined():
  # Between calls two eigenvalues of the top problem's Hessian cross: its warm
  # vector is (nearly) the eigenvector of its third eigenvalue, so 3 screening
  # iterations see that eigenvalue, below the top of other problems. It ranked
  # first last time, so it is refined anyway.
  params, nearby, x = problem()
  hess, ref = reference("params")
  best = np.unravel_index(np.argmax(ref), ref.shape)
  _, vecs = np.linalg.eigh(hess[best])
  order = np.argsort(-np.abs(np.linalg.eigvalsh(hess[best])))
  third = np.abs(np.linalg.eigvalsh(hess[best]))[order[2]]
  assert third < np.sort(ref.ravel())[-2]  # premise: the stale screen loses the ranking
  stale = vecs[:, order[2]] + 1e-3 * vecs[:, order[0]]
  unravel = ravel_pytree(params)[1]
  options = dict(OPTIONS, screen_iters=3)
  previous = _core(apply_fn, nearby, x, init_values=jnp.full(ref.shape, jnp.inf), **options)
  init = jax.tree.map(lambda a, v: a.at[best].set(v), previous.vector,
                      unravel(jnp.asarray(stale / np.linalg.norm(stale), jnp.float32)))
  est = _core(apply_fn, params, x, init=init, init_values=previous.per_problem, **options)
  check_against_reference(est, hess, ref)


def test_vmapped_problems_as_on_accelerators():
  # On CPU the problems run one at a time; batch_size = n·k vmaps them all,
  # the path taken where the vectors fit in accelerator memory.
  params, nearby, x = problem()
  hess, ref = reference("params")
  options = dict(OPTIONS, screen_iters=3, batch_size=ref.size)
  previous = _core(apply_fn, nearby, x, init_values=jnp.full(ref.shape, jnp.inf), **options)
  est = _core(apply_fn, params, x, init=previous.vector, init_values=previous.per_problem,
              **options)
  check_against_reference(est, hess, ref)


def test_vector_and_per_problem_shapes():
  params, _, x = problem()
  n, k = x.shape[0], SIZES[-1]
  est = _core(apply_fn, params, x, init_values=jnp.zeros((n, k)), screen_iters=2, **OPTIONS)
  assert est.per_problem.shape == (n, k) and est.per_example.shape == (n,)
  assert jax.tree.map(jnp.shape, est.vector) == jax.tree.map(lambda p: (n, k) + p.shape, params)


def test_snapshot_hessian_norm_cold_then_warm():
  params, nearby, x = problem()
  n_hess = 4
  spec = diag_state.SnapshotSpec(apply_fn=apply_fn, with_model_state=False,
                                 config=diag_state.SnapshotConfig(),  # screening on
                                 norm_examples=n_hess, compute_ntk=False, compute_twin=False)
  state = diag_state.initial_state(spec, nearby, None, x, jnp.zeros((x.shape[0], SIZES[-1])),
                                   step=0)
  run = snapshot.Snapshotter(spec, state, nearby, None)
  state, cold = run(state, nearby, None, 0)
  state, warm = run(state, params, None, 1)
  assert rel_err(float(cold["hessian_norm"]), reference("nearby")[1][:n_hess].max()) <= TOL["power"]
  assert rel_err(float(warm["hessian_norm"]), reference("params")[1][:n_hess].max()) <= TOL["power"]


@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), (2.5, TypeError),
                                         (True, TypeError)])
def test_config_rejects_bad_screen_iters(value, error):
  with pytest.raises(error, match="hessian_screen_iters"):
    diag_state.SnapshotConfig(hessian_screen_iters=value).validate()
