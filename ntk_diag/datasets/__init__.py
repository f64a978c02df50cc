"""Datasets for the examples: an offline TFDS builder and a NumPy loader.

This subpackage imports TensorFlow Datasets (and, when reading data,
TensorFlow); ``import ntk_diag`` does not import it.
"""

from ntk_diag.datasets.digits import NtkDiagDigits
from ntk_diag.datasets.load import DEFAULT_DATA_DIR
from ntk_diag.datasets.load import load_numpy

__all__ = (
    "DEFAULT_DATA_DIR",
    "NtkDiagDigits",
    "load_numpy",
)
