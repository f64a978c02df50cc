"""Eigensolvers on dense arrays and pytree operators, against ``numpy.linalg.eigh``.

A converged solve has a Ritz value within ``tol·|θ|`` of an eigenvalue, so
eigenvalues are checked at the solvers' ``tol`` (default 1e-4; measured
errors <= 2.3e-7 on every problem here), eigenvectors by their residual
``‖A v − λ v‖ <= 2·tol·λ`` (measured 8.5e-5·λ: the stopping criterion itself).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_diag import spectral


def random_symmetric(n, seed, psd=True):
  a = np.random.default_rng(seed).normal(size=(n, n))
  return (a @ a.T / n if psd else (a + a.T) / 2).astype(np.float32)


def start(n, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=n).astype(np.float32))


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("as_callable", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_largest_eigenvalue_of_psd_matrix(method, as_callable, jit):
  matrix = random_symmetric(60, seed=0)
  expected = np.linalg.eigvalsh(matrix.astype(np.float64))[-1]
  operator = (lambda v: jnp.asarray(matrix) @ v) if as_callable else jnp.asarray(matrix)
  solve = lambda v0: spectral.top_eigenpair(operator, v0, method=method)
  result = (jax.jit(solve) if jit else solve)(start(60))
  tol = 1e-4  # the default `tol`
  assert bool(result.converged)
  assert abs(float(result.value) / expected - 1) <= tol
  vec = np.asarray(result.vector, np.float64)
  assert abs(np.linalg.norm(vec) - 1) <= 1e-6  # measured 2.8e-8
  assert np.linalg.norm(matrix @ vec - expected * vec) <= 2 * tol * expected
  if method == "lanczos":
    assert bool(result.converged) and float(result.residual) <= 1e-4 * expected


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_pytree_operator_matches_dense(method):
  # A symmetric operator on {"a": (3,), "b": (2, 2)} that couples the leaves.
  template = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  _, unravel = ravel_pytree(template)
  dense = jnp.asarray(random_symmetric(7, seed=3, psd=False))

  def matvec(tree):
    return unravel(dense @ ravel_pytree(tree)[0])

  init = jax.tree.map(jnp.ones_like, template)
  result = spectral.top_eigenpair(matvec, init, method=method, which="magnitude")
  assert jax.tree.structure(result.vector) == jax.tree.structure(template)
  expected = np.abs(np.linalg.eigvalsh(np.asarray(dense, np.float64))).max()
  assert bool(result.converged)
  assert abs(float(result.value) / expected - 1) <= 1e-4  # default tol; measured 7.3e-8


def plus_minus(values):
  return jnp.diag(jnp.asarray(values, jnp.float32))


def test_plain_power_iteration_oscillates_on_plus_minus_pair():
  # ±3 dominate with equal magnitude: the Rayleigh quotient never settles.
  operator = plus_minus([3.0, -3.0] + list(np.linspace(0.1, 1.0, 20)))
  result = spectral.power_iteration(operator, start(22))
  assert not bool(result.converged)
  assert abs(float(result.value)) < 2.9


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("top", [(3.0, -3.0), (3.0, -3.3), (-3.3, 3.0)])
def test_magnitude_converges_on_indefinite_spectra(method, top):
  operator = plus_minus(list(top) + list(np.linspace(-1.0, 1.0, 20)))
  result = spectral.top_eigenpair(operator, start(22), method=method, which="magnitude")
  expected = max(abs(t) for t in top)
  assert bool(result.converged)
  assert abs(float(result.value) / expected - 1) <= 1e-4  # default tol; measured 2.3e-7


def test_lanczos_largest_on_negative_definite_and_breakdown():
  matrix = -random_symmetric(30, seed=4) - jnp.eye(30)
  expected = np.linalg.eigvalsh(np.asarray(matrix, np.float64))[-1]
  result = spectral.lanczos(matrix, start(30), num_iters=30)
  assert abs(float(result.value) / expected - 1) <= 1e-4
  # Dimension 3 < krylov_dim: an invariant subspace after 3 steps, exact.
  small = spectral.lanczos(jnp.diag(jnp.array([1.0, 5.0, 2.0])), start(3))
  assert bool(small.converged) and int(small.iterations) <= 3
  assert abs(float(small.value) - 5.0) <= 1e-5


def test_warm_start_from_eigenvector_stops_at_once():
  matrix = random_symmetric(40, seed=5)
  first = spectral.top_eigenpair(matrix, start(40), method="lanczos")
  again = spectral.top_eigenpair(matrix, first.vector, method="power")
  assert int(again.iterations) <= 2 and bool(again.converged)
  assert abs(float(again.value) / float(first.value) - 1) <= 1e-4


@pytest.mark.parametrize("which", ["largest", "magnitude"])
def test_lanczos_on_a_kept_basis_with_stale_rows(which):
  # The basis storage handed in (and handed back) holds finite junk: rows a
  # cycle has not written must not count. A small basis forces restarts.
  from ntk_diag import _lanczos
  matrix = random_symmetric(50, seed=7, psd=False)
  eigenvalues = np.linalg.eigvalsh(matrix.astype(np.float64))
  expected = eigenvalues[-1] if which == "largest" else np.abs(eigenvalues).max()
  matvec = lambda v: {"w": jnp.asarray(matrix) @ v["w"]}
  init = {"w": start(50)}
  junk = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(7, 50)).astype(np.float32))}
  solve = jax.jit(lambda v0, basis: _lanczos.lanczos_core(
      matvec, v0, num_iters=300, tol=1e-5, krylov_dim=6, which=which, basis=basis))
  fresh = solve(init, None)
  kept = solve(init, junk)
  again = solve(init, kept.basis)  # the storage a solve leaves behind
  assert kept.basis["w"].shape == (7, 50) and bool(kept.converged)
  for result in (fresh, kept, again):
    value = abs(float(result.value)) if which == "magnitude" else float(result.value)
    assert abs(value / expected - 1) <= 1e-4  # tol 1e-5; measured <= 2e-7
  # Same steps from the same start: the junk changes nothing (up to rounding).
  assert int(kept.iterations) == int(fresh.iterations) == int(again.iterations)
  np.testing.assert_allclose(kept.vector["w"], fresh.vector["w"], atol=1e-5)


def test_vmap_over_operators():
  diags = jnp.array([[1.0, 4.0, 2.0], [7.0, 1.0, 3.0]])
  solve = lambda d, v0: spectral.top_eigenpair(lambda v: d * v, v0, num_iters=500).value
  values = jax.vmap(solve, (0, None))(diags, jnp.ones(3))
  np.testing.assert_allclose(values, [4.0, 7.0], rtol=1e-4)  # default tol; measured 0


def test_loop_pieces_at_module_level():
  state = spectral._power_init(jnp.array([1.0, 0.0]))
  assert bool(spectral._power_cond_fun(state, num_iters=3))
  state = spectral._power_body_fun(state, lambda v: 2.0 * v, tol=1e-4)
  _, theta, residual, it, converged = state
  assert float(theta) == 2.0 and float(residual) == 0.0 and int(it) == 1
  assert not bool(spectral._power_cond_fun(state, num_iters=3))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_iters": 0}, ValueError, "num_iters"),
    ({"num_iters": 1.5}, TypeError, "num_iters"),
    ({"tol": 0.0}, ValueError, "tol"),
    ({"tol": "small"}, TypeError, "tol"),
    ({"method": "arnoldi"}, ValueError, "method"),
    ({"which": "smallest"}, ValueError, "which"),
    ({"krylov_dim": 0}, ValueError, "krylov_dim"),
])
def test_validation(kwargs, error, match):
  with pytest.raises(error, match=match):
    spectral.top_eigenpair(jnp.eye(2), jnp.ones(2), **kwargs)


def test_operator_must_be_callable_or_square():
  with pytest.raises(TypeError, match="operator"):
    spectral.power_iteration(jnp.ones((2, 3)), jnp.ones(3))
