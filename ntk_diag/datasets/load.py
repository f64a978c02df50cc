"""NumPy arrays from TFDS datasets, the offline digits included."""

import os

import numpy as np
import tensorflow_datasets as tfds

from ntk_diag.datasets import digits as digits_lib

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "ntk_diag", "tfds")

_DIGITS_NAMES = ("digits", digits_lib.NtkDiagDigits.name)


def load_numpy(name="digits", *, split="train", data_dir=None, flatten=True):
  """Loads a whole TFDS split as NumPy arrays ``(x, y)``.

  ``name="digits"`` (or ``"ntk_diag_digits"``) builds
  :class:`~ntk_diag.datasets.digits.NtkDiagDigits` from the copy bundled
  with scikit-learn on first use (no network) and reads it back; its rows
  come sorted by their row in ``sklearn.datasets.load_digits()``. Any other
  name goes to ``tfds.load(name, split=split, data_dir=data_dir)``, which
  downloads the data if it is not already in ``data_dir`` (e.g.
  ``"mnist"``, ``"cifar10"``; the dataset must have ``image`` and ``label``
  features).

  Args:
    name: ``"digits"`` or any TFDS dataset name.
    split: a TFDS split, e.g. ``"train"``, ``"test"`` or ``"train[:10%]"``.
    data_dir: where TFDS datasets are stored; defaults to
      ``~/.cache/ntk_diag/tfds``.
    flatten: if true, each image is flattened to one row.

  Returns:
    ``x`` float32 scaled to ``[0, 1]`` — ``(n, h·w·c)`` when ``flatten``,
    else ``(n, h, w, c)``; digits are divided by 16 (their maximum), other
    uint8 images by 255 — and ``y`` int32 labels of shape ``(n,)``.
  """
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  if name in _DIGITS_NAMES:
    builder = digits_lib.NtkDiagDigits(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    order = np.argsort(data["index"], kind="stable")
    images, labels = data["image"][order], data["label"][order]
    scale = digits_lib.MAX_PIXEL
  else:
    data = tfds.as_numpy(
        tfds.load(name, split=split, data_dir=data_dir, batch_size=-1)
    )
    images, labels = data["image"], data["label"]
    if images.dtype != np.uint8:
      raise ValueError(
          f"Expected uint8 images in dataset {name!r}, got {images.dtype}."
      )
    scale = 255
  x = images.astype(np.float32) / np.float32(scale)
  if flatten:
    x = x.reshape(x.shape[0], -1)
  return x, labels.astype(np.int32)
