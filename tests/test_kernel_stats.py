"""kernel_stats on hand-computable kernels and against NumPy formulas."""

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
  np.testing.assert_allclose(top3, expected[:3], rtol=1e-4)
  assert np.all(np.diff(top3) <= 0)
  every = np.asarray(nd.kernel_stats(matrix, top_k=100)["eigenvalues"])
  assert every.shape == (6,)
  np.testing.assert_allclose(every, expected, rtol=1e-4, atol=1e-4 * expected[0])


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
  assert float(stats["kernel_distance"]) == pytest.approx(distance, rel=1e-3, abs=1e-6)


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
  assert float(stats["kernel_alignment"]) == pytest.approx(_np_alignment(matrix, y), rel=1e-4)


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
  np.testing.assert_allclose(stats["eigenvalues"], eigs[:5], rtol=1e-4)
  assert float(stats["trace"]) == pytest.approx(np.trace(matrix.astype(np.float64)), rel=1e-5)
  assert float(stats["kernel_alignment"]) == pytest.approx(_np_alignment(matrix, y.reshape(-1)),
                                                           rel=1e-4)
  for name in ("trace", "eig_max", "eig_min", "kernel_drift", "kernel_distance",
               "kernel_alignment"):
    assert float(stats[name]) == pytest.approx(float(ref[name]), rel=1e-4, abs=1e-6), name
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
