"""The offline digits builder: counts, values, determinism, no network."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

tfds = pytest.importorskip("tensorflow_datasets")
from ntk_diag import datasets  # pylint: disable=g-import-not-at-top
from ntk_diag.datasets import digits as digits_lib  # pylint: disable=g-import-not-at-top


def _no_network(*args, **kwargs):
  raise OSError(f"network access attempted in a test: {args!r}")


@pytest.fixture(scope="module")
def offline():
  """Any attempt to open a connection or resolve a name raises."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket.socket, "connect_ex", _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, offline):
  del offline
  path = tmp_path_factory.mktemp("tfds")
  datasets.load_numpy("digits", split="train", data_dir=str(path))  # builds
  return str(path)


@pytest.fixture(scope="module")
def sk_digits():
  return sk_datasets.load_digits()


def test_split_indices_partition_all_rows():
  idx = digits_lib.split_indices()
  assert len(idx["train"]) == 1437 and len(idx["test"]) == 360
  both = np.concatenate([idx["train"], idx["test"]])
  np.testing.assert_array_equal(np.sort(both), np.arange(1797))
  again = digits_lib.split_indices()
  for split in ("train", "test"):
    np.testing.assert_array_equal(idx[split], again[split])


def test_builder_counts_no_dropped_rows(data_dir, offline):
  builder = datasets.NtkDiagDigits(data_dir=data_dir)
  splits = builder.info.splits
  assert splits["train"].num_examples == 1437
  assert splits["test"].num_examples == 360
  for split, expected in (("train", 1437), ("test", 360)):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    assert data["image"].shape == (expected, 8, 8, 1)
    assert data["image"].dtype == np.uint8
    # Every row is read back, once.
    np.testing.assert_array_equal(
        np.sort(data["index"]), digits_lib.split_indices()[split]
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_numpy_matches_sklearn_rows(data_dir, offline, sk_digits, split):
  x, y = datasets.load_numpy("digits", split=split, data_dir=data_dir)
  rows = digits_lib.split_indices()[split]
  assert x.dtype == np.float32 and y.dtype == np.int32
  assert x.shape == (len(rows), 64) and y.shape == (len(rows),)
  assert 0.0 <= x.min() and x.max() <= 1.0
  assert set(np.unique(y)) <= set(range(10))
  # Documented scaling: x = sklearn value / 16, which is exact in float32.
  np.testing.assert_array_equal(x * 16, sk_digits.data[rows])
  np.testing.assert_array_equal(y, sk_digits.target[rows])


def test_load_numpy_unflattened_and_alias(data_dir, offline):
  x_img, y_img = datasets.load_numpy(
      "ntk_diag_digits", split="test", data_dir=data_dir, flatten=False
  )
  x, y = datasets.load_numpy("digits", split="test", data_dir=data_dir)
  assert x_img.shape == (360, 8, 8, 1)
  np.testing.assert_array_equal(x_img.reshape(360, -1), x)
  np.testing.assert_array_equal(y_img, y)


def test_rebuild_is_deterministic(data_dir, offline, tmp_path):
  x1, y1 = datasets.load_numpy("digits", split="test", data_dir=data_dir)
  x2, y2 = datasets.load_numpy("digits", split="test", data_dir=str(tmp_path))
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)


def test_import_ntk_diag_does_not_import_tensorflow():
  code = (
      "import sys, ntk_diag\n"
      "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
      "assert not bad, bad\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, env=env,
      check=False,
  )
  assert result.returncode == 0, result.stderr
