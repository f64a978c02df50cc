"""``ntk_diag_digits``: scikit-learn's bundled 8×8 digits as a TFDS dataset.

The 1,797 images ship inside scikit-learn (``sklearn.datasets.load_digits``),
so this builder needs no network: ``download_and_prepare`` only reads them
and writes TFRecord files under ``data_dir``.

The split is fixed: a permutation of the 1,797 rows drawn with
``numpy.random.default_rng(SPLIT_SEED)`` puts its first ``NUM_TEST = 360``
rows in ``test`` and the other 1,437 in ``train``. Each example keeps its
row number in scikit-learn's array as ``index``.
"""

import numpy as np
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TEST = 360
SPLIT_SEED = 0
MAX_PIXEL = 16  # scikit-learn's digits are integers in [0, 16].


def split_indices():
  """Rows of ``load_digits()`` in each split, each sorted ascending.

  Returns:
    ``{"train": (1437,) int array, "test": (360,) int array}``; together
    they hold every row exactly once.
  """
  perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


class NtkDiagDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8×8 handwritten digits, built offline.

  Features: ``image`` ``(8, 8, 1)`` uint8 with values in ``[0, 16]``
  (scikit-learn's values, unscaled), ``label`` ``ClassLabel(10)``, and
  ``index``, the row in ``sklearn.datasets.load_digits()``.
  Splits: ``train`` (1,437) and ``test`` (360), see :func:`split_indices`.
  """

  name = "ntk_diag_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return self.dataset_info_from_configs(
        description=(
            "The 8x8 handwritten digits bundled with scikit-learn "
            "(a copy of the UCI ML hand-written digits test set)."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": np.int32,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    digits = sk_datasets.load_digits()
    return {
        split: self._generate_examples(digits.images, digits.target, rows)
        for split, rows in split_indices().items()
    }

  def _generate_examples(self, images, labels, rows):
    for row in rows:
      row = int(row)
      yield row, {
          "image": images[row].astype(np.uint8)[..., None],
          "label": int(labels[row]),
          "index": row,
      }
