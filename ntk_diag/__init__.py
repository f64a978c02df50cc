"""ntk_diag: is your Flax network training in the lazy (kernel) regime?

Pure math (no TensorFlow): ``empirical_ntk``, ``empirical_ntk_fn``, ``kernel_stats``,
``jacobian_norm``, ``hessian_norm``, ``lazy_ratio``, ``linearize``,
``kernel_predictor``, ``LinearizedTwin``, ``compare``, ``lazy_radius``,
``loss_sharpness``. The training-loop hook (``LazyTrainingHook``) logs
through CLU, which imports TensorFlow; it is loaded on first access.
"""

from ntk_diag.adapters import from_linen
from ntk_diag.adapters import from_nnx
from ntk_diag.checkpoint import load_initial_model_state
from ntk_diag.checkpoint import load_initial_params
from ntk_diag.compare import Comparison
from ntk_diag.compare import PredictorRow
from ntk_diag.compare import compare
from ntk_diag.compare import kernel_learning_rate
from ntk_diag.diag_state import SnapshotConfig
from ntk_diag.kernel_stats import kernel_stats
from ntk_diag.linearize import linearize
from ntk_diag.norms import LazyReport
from ntk_diag.norms import NormEstimate
from ntk_diag.norms import hessian_norm
from ntk_diag.norms import jacobian_norm
from ntk_diag.norms import lazy_ratio
from ntk_diag.ntk import empirical_ntk
from ntk_diag.ntk import empirical_ntk_fn
from ntk_diag.predict import kernel_predictor
from ntk_diag.radius import LazyRadius
from ntk_diag.radius import lazy_radius
from ntk_diag.sharpness import loss_sharpness
from ntk_diag.twin import LinearizedTwin
from ntk_diag.twin import TwinState

__version__ = "0.1.0"

__all__ = (
    "Comparison",
    "LazyRadius",
    "LazyReport",
    "LazyTrainingHook",
    "LinearizedTwin",
    "NormEstimate",
    "PredictorRow",
    "SnapshotConfig",
    "TwinState",
    "compare",
    "empirical_ntk",
    "empirical_ntk_fn",
    "from_linen",
    "from_nnx",
    "hessian_norm",
    "jacobian_norm",
    "kernel_learning_rate",
    "kernel_predictor",
    "kernel_stats",
    "lazy_radius",
    "lazy_ratio",
    "linearize",
    "load_initial_model_state",
    "load_initial_params",
    "loss_sharpness",
)


def __getattr__(name):
  # The hook subclasses clu.periodic_actions.PeriodicAction, which imports
  # TensorFlow; import it only when asked for.
  if name == "LazyTrainingHook":
    from ntk_diag.hooks import LazyTrainingHook
    return LazyTrainingHook
  raise AttributeError(f"module 'ntk_diag' has no attribute {name!r}")
