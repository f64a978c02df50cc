"""Infinite-width NNGP and NTK kernels (``import ntk_diag.infinite as inf``).

``inf.kernels(inf.serial(inf.Dense(), inf.Relu(), inf.Dense()), x)`` returns the
``(nngp, ntk)`` of the network's infinite-width limit in the NTK
parametrization of neural-tangents' ``stax``; ``inf.from_linen`` builds the
network from an ``nn.Sequential`` of ``inf.NTKDense``/``inf.NTKConv`` layers and
activations, and ``inf.relative_distance`` measures how far an empirical NTK is
from the limit.
"""

from ntk_diag.infinite.limit import kernels
from ntk_diag.infinite.limit import relative_distance
from ntk_diag.infinite.layers import Conv
from ntk_diag.infinite.layers import Dense
from ntk_diag.infinite.layers import Erf
from ntk_diag.infinite.layers import Flatten
from ntk_diag.infinite.layers import GlobalAvgPool
from ntk_diag.infinite.layers import Relu
from ntk_diag.infinite.layers import Serial
from ntk_diag.infinite.layers import Tanh
from ntk_diag.infinite.layers import serial
from ntk_diag.infinite.linen import NTKConv
from ntk_diag.infinite.linen import NTKDense
from ntk_diag.infinite.linen import flatten
from ntk_diag.infinite.linen import from_linen
from ntk_diag.infinite.linen import global_avg_pool

__all__ = (
    "Conv",
    "Dense",
    "Erf",
    "Flatten",
    "GlobalAvgPool",
    "NTKConv",
    "NTKDense",
    "Relu",
    "Serial",
    "Tanh",
    "flatten",
    "from_linen",
    "global_avg_pool",
    "kernels",
    "relative_distance",
    "serial",
)
