"""kernel_stats on hand-computable kernels and against NumPy formulas.

Tolerances are ~100x the measured float32 error (2026-11-29): eigenvalues,
traces, drift, distance and alignment of well-conditioned kernels agree with
float64 NumPy to <= 3.5e-7 relative; the smallest eigenvalue of a random
8 x 8 Wishart matrix (and so its condition number) to 2.2e-5.
"""

import numpy as np
import pytest

import ntk_diag as nd


def _psd(seed, size, rank=None):
  a = np.random.default_rng(seed).standard_normal((size, rank or size))
  return (a @ a.T).astype(np.float32)


def _np_alignment(matrix, y):
  """Centered kernel-target alignment in float64, H formed explicitly."""
  matrix = np.asarray(matrix, np.float64)
  y = np.asarray(y, np.float64).reshape(matrix.shape[0], -1)
  h = np.eye(matrix.shape[0]) - np.ones_like(matrix) / matrix.shape[0]
  kc = h @ matrix @ h
  yc = h @ y
  t = yc @ yc.T
  return np.sum(kc * t) / (np.linalg.norm(kc) * np.linalg.norm(t))


def test_diagonal_kernel_spectrum():
  stats = nd.kernel_stats(np.diag([4.0, 1.0, 0.5, 2.0]).astype(np.float32), top_k=3)
  assert float(stats["trace"]) == pytest.approx(7.5, rel=1e-6)
  assert float(stats["eig_max"]) == pytest.approx(4.0, rel=1e-6)
  assert float(stats["eig_min"]) == pytest.approx(0.5, rel=1e-6)
  assert float(stats["condition_number"]) == pytest.approx(8.0, rel=1e-5)
  np.testing.assert_allclose(stats["eigenvalues"], [4.0, 2.0, 1.0], rtol=1e-6)


def test_top_k_descending_and_capped_at_size():
  matrix = _psd(0, 6)
  expected = np.sort(np.linalg.eigvalsh(matrix.astype(np.float64)))[::-1]
  top3 = np.asarray(nd.kernel_stats(matrix, top_k=3)["eigenvalues"])
  np.testing.assert_allclose(top3, expected[:3], rtol=1e-5)
  assert np.all(np.diff(top3) <= 0)
  every = np.asarray(nd.kernel_stats(matrix, top_k=100)["eigenvalues"])
  assert every.shape == (6,)
  np.testing.assert_allclose(every, expected, rtol=1e-5, atol=1e-5 * expected[0])


def test_random_psd_against_numpy():
  matrix = _psd(1, 8)
  eigs = np.linalg.eigvalsh(matrix.astype(np.float64))
  stats = nd.kernel_stats(matrix)
  assert float(stats["trace"]) == pytest.approx(np.trace(matrix.astype(np.float64)), rel=1e-5)
  assert float(stats["eig_max"]) == pytest.approx(eigs[-1], rel=1e-5)
  assert float(stats["eig_min"]) == pytest.approx(eigs[0], rel=1e-3)
  assert float(stats["condition_number"]) == pytest.approx(eigs[-1] / eigs[0], rel=1e-3)


@pytest.mark.parametrize("c", [0.5, 1.0, 1.7])
def test_scaled_kernel_drift_and_zero_distance(c):
  k0 = _psd(2, 6)
  stats = nd.kernel_stats(np.float32(c) * k0, K0=k0)
  assert float(stats["kernel_drift"]) == pytest.approx(abs(c - 1.0), abs=1e-6)
  assert float(stats["kernel_distance"]) == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_kernels_have_distance_one():
  k = np.diag([1.0, 0.0, 3.0, 0.0]).astype(np.float32)
  k0 = np.diag([0.0, 2.0, 0.0, 0.0]).astype(np.float32)
  stats = nd.kernel_stats(k, K0=k0)
  assert float(stats["kernel_distance"]) == pytest.approx(1.0, abs=1e-6)
  # ‖K − K0‖ / ‖K0‖ = sqrt(1 + 4 + 9) / 2.
  assert float(stats["kernel_drift"]) == pytest.approx(np.sqrt(14.0) / 2.0, rel=1e-6)


def test_drift_and_distance_against_numpy():
  k, k0 = _psd(3, 7), _psd(4, 7)
  k64, k064 = k.astype(np.float64), k0.astype(np.float64)
  stats = nd.kernel_stats(k, K0=k0)
  drift = np.linalg.norm(k64 - k064) / np.linalg.norm(k064)
  distance = 1 - np.sum(k64 * k064) / (np.linalg.norm(k64) * np.linalg.norm(k064))
  assert float(stats["kernel_drift"]) == pytest.approx(drift, rel=1e-5)
  assert float(stats["kernel_distance"]) == pytest.approx(distance, rel=1e-5)


@pytest.mark.parametrize("y_shape", [(6,), (6, 2)])
def test_alignment_of_target_kernel_is_one(y_shape):
  y = np.random.default_rng(5).standard_normal(y_shape).astype(np.float32) + 3.0
  y2 = y.reshape(6, -1)
  stats = nd.kernel_stats(y2 @ y2.T, y=y)  # uncentered y yᵀ: aligned after centering
  assert float(stats["kernel_alignment"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("y_shape", [(8,), (8, 3)])
def test_alignment_against_numpy(y_shape):
  matrix = _psd(6, 8, rank=3)
  y = np.random.default_rng(7).standard_normal(y_shape).astype(np.float32)
  stats = nd.kernel_stats(matrix, y=y)
  assert float(stats["kernel_alignment"]) == pytest.approx(_np_alignment(matrix, y), rel=1e-5)


def test_four_d_kernel_reduced_to_nk_by_nk():
  n, k = 4, 3
  matrix = _psd(8, n * k)
  # (i·k + a, j·k + b) -> (i, j, a, b)
  kernel = matrix.reshape(n, k, n, k).transpose(0, 2, 1, 3)
  kernel0 = _psd(9, n * k).reshape(n, k, n, k).transpose(0, 2, 1, 3)
  matrix0 = kernel0.transpose(0, 2, 1, 3).reshape(n * k, n * k)
  y = np.random.default_rng(10).standard_normal((n, k)).astype(np.float32)
  stats = nd.kernel_stats(kernel, K0=kernel0, y=y, top_k=5)
  ref = nd.kernel_stats(matrix, K0=matrix0, y=y.reshape(-1), top_k=5)
  eigs = np.sort(np.linalg.eigvalsh(matrix.astype(np.float64)))[::-1]
  np.testing.assert_allclose(stats["eigenvalues"], eigs[:5], rtol=1e-5)
  assert float(stats["trace"]) == pytest.approx(np.trace(matrix.astype(np.float64)), rel=1e-5)
  assert float(stats["kernel_alignment"]) == pytest.approx(_np_alignment(matrix, y.reshape(-1)),
                                                           rel=1e-5)
  for name in ("trace", "eig_max", "eig_min", "kernel_drift", "kernel_distance",
               "kernel_alignment"):
    assert float(stats[name]) == pytest.approx(float(ref[name]), rel=1e-6, abs=1e-7), name
  # A 4-D kernel whose reduction is not symmetric would expose a wrong transpose.
  eye_blocks = np.zeros((2, 2, 2, 2), np.float32)
  eye_blocks[0, 1, 0, 1] = 1.0  # entry ((0, 0), (1, 1)) = row 0, column 3
  eye_blocks[1, 0, 1, 0] = 1.0  # its transpose: row 3, column 0
  assert float(nd.kernel_stats(eye_blocks)["eig_max"]) == pytest.approx(1.0, rel=1e-6)
  assert float(nd.kernel_stats(eye_blocks)["eig_min"]) == pytest.approx(-1.0, rel=1e-6)


def test_zero_denominators_give_finite_values():
  zeros = np.zeros((4, 4), np.float32)
  stats = nd.kernel_stats(zeros, K0=zeros, y=np.ones(4, np.float32))  # Y_c = 0
  for name, value in stats.items():
    assert np.all(np.isfinite(np.asarray(value))), name
  singular = nd.kernel_stats(_psd(11, 5, rank=2))
  assert np.isfinite(float(singular["condition_number"]))
  assert float(singular["condition_number"]) > 1e3


def test_values_are_float_convertible():
  stats = nd.kernel_stats(_psd(12, 3), K0=_psd(13, 3), y=np.arange(3.0, dtype=np.float32))
  for name in ("trace", "eig_max", "eig_min", "condition_number", "kernel_drift",
               "kernel_distance", "kernel_alignment"):
    assert isinstance(float(stats[name]), float)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="K"):
    nd.kernel_stats(np.ones((3, 4), np.float32))
  with pytest.raises(ValueError, match="K0"):
    nd.kernel_stats(np.eye(3, dtype=np.float32), K0=np.eye(4, dtype=np.float32))
  with pytest.raises(ValueError, match="y"):
    nd.kernel_stats(np.eye(3, dtype=np.float32), y=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="top_k"):
    nd.kernel_stats(np.eye(3, dtype=np.float32), top_k=0)


# --------------------------------------------------------------------------
# Rank-deficient kernels (more examples than parameters, duplicated points).
# --------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)


def test_exactly_singular_spectrum_and_condition_floor():
  # Exact zero eigenvalues: condition_number = λ_max / (eps·λ_max) = 1/eps.
  stats = nd.kernel_stats(np.diag([4.0, 0.0, 2.0, 0.0]).astype(np.float32), top_k=4)
  np.testing.assert_array_equal(stats["eigenvalues"], [4.0, 2.0, 0.0, 0.0])
  assert float(stats["eig_min"]) == 0.0
  assert float(stats["condition_number"]) == pytest.approx(1.0 / EPS32, rel=1e-6)
  # The zero kernel: λ_max = 0 too, condition number 0 (not NaN).
  assert float(nd.kernel_stats(np.zeros((3, 3), np.float32))["condition_number"]) == 0.0


def test_rank_deficient_4d_kernel_against_float64():
  # Linear model f(W, x) = x W, x in R², k = 3 outputs, n = 5 examples:
  # K[i, j, a, b] = <x_i, x_j> δ_ab has rank 2·3 = 6 out of N = 15.
  rng = np.random.default_rng(14)
  x, x0 = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
  y = rng.standard_normal((5, 3))
  kernel = np.einsum("ij,ab->ijab", x @ x.T, np.eye(3)).astype(np.float32)
  kernel0 = np.einsum("ij,ab->ijab", x0 @ x0.T, np.eye(3)).astype(np.float32)
  matrix = kernel.astype(np.float64).transpose(0, 2, 1, 3).reshape(15, 15)
  matrix0 = kernel0.astype(np.float64).transpose(0, 2, 1, 3).reshape(15, 15)
  eigs = np.linalg.eigvalsh(matrix)[::-1]
  stats = nd.kernel_stats(kernel, K0=kernel0, y=y.astype(np.float32), top_k=15)
  # Nine eigenvalues are 0 up to float32 rounding, bounded by N·eps·λ_max = 1.8e-6·λ_max
  # (measured 1.7e-7·λ_max); the six others to 1e-5 relative (measured 2.9e-7).
  zero_tol = 15 * EPS32 * eigs[0]
  np.testing.assert_allclose(stats["eigenvalues"], eigs, rtol=1e-5, atol=zero_tol)
  assert np.count_nonzero(np.abs(np.asarray(stats["eigenvalues"])) > zero_tol) == 6
  assert abs(float(stats["eig_min"])) <= zero_tol
  # λ_min is rounding noise: the condition number is capped at 1/eps, still large.
  assert 1.0 / (15 * EPS32) <= float(stats["condition_number"]) <= (1 + 1e-6) / EPS32
  assert float(stats["trace"]) == pytest.approx(np.trace(matrix), rel=1e-6)
  drift = np.linalg.norm(matrix - matrix0) / np.linalg.norm(matrix0)
  distance = 1 - np.sum(matrix * matrix0) / (np.linalg.norm(matrix) * np.linalg.norm(matrix0))
  assert float(stats["kernel_drift"]) == pytest.approx(drift, rel=1e-5)
  assert float(stats["kernel_distance"]) == pytest.approx(distance, rel=1e-5)
  assert float(stats["kernel_alignment"]) == pytest.approx(_np_alignment(matrix, y.reshape(-1)),
                                                           rel=1e-5)
