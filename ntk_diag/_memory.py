"""Memory budget: how many bytes one diagnostic may hold at its peak, and what fits in it.

The budget (:func:`default_budget_bytes`) and the formulas that size work to
it: bytes of a parameter-sized vector, vectors an eigensolver holds, how
many eigenproblems (or examples of them) are solved at once, and whether the
snapshot's warm-start vectors fit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import spectral

PyTree = Any

# Fraction of the device's memory one diagnostic may use by default.
DEFAULT_MEMORY_FRACTION = 0.25
# Floor used when the device does not report its memory.
FALLBACK_BUDGET_BYTES = 2 * 2**30


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """Total memory of ``device`` (host RAM for CPU), or ``None`` if unknown."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pragma: no cover - backend dependent
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
      return None
  return None


def default_budget_bytes() -> int:
  """``DEFAULT_MEMORY_FRACTION`` of device memory, or ``FALLBACK_BUDGET_BYTES``."""
  total = device_memory_bytes()
  if total is None:
    return FALLBACK_BUDGET_BYTES
  return int(total * DEFAULT_MEMORY_FRACTION)


def vector_bytes(params: PyTree) -> int:
  """Bytes of one parameter-sized vector (``params``' size at their dtype)."""
  return _tree.tree_size(params) * jnp.dtype(_model.param_dtype(params)).itemsize


def solver_vectors(method: str, num_iters: int) -> int:
  """Parameter-sized vectors one eigenproblem holds (solver state + products)."""
  if method == "lanczos":
    return min(num_iters, spectral.DEFAULT_KRYLOV_DIM) + 6
  return 6


def problem_batch(batch_size: int | None, per_problem_bytes: int, count: int,
                  solver: bool = False) -> int:
  """Eigenproblems solved simultaneously.

  ``batch_size`` if given; otherwise as many as fit the memory budget, except
  that iterative solvers run one problem at a time on CPU: there the
  single-example matvecs are memory-bound, and vectorising them (which also
  turns each solver's early exit into a masked step for all) is measured
  slower than running them in sequence.
  """
  if batch_size is not None:
    return min(batch_size, count)
  if solver and jax.default_backend() == "cpu":
    return 1
  budget = default_budget_bytes()
  return int(max(1, min(count, budget // max(per_problem_bytes, 1))))


def example_block(batch_size: int | None, per_example_bytes: int, n: int, k: int) -> int:
  """Examples whose ``k`` eigenproblems each are solved together: ``batch_size // k``
  (at least one) if given, else as many as fit the memory budget; at most ``n``."""
  if batch_size is not None:
    block = max(1, batch_size // k)
  else:
    block = default_budget_bytes() // max(per_example_bytes, 1)
  return int(max(1, min(n, block)))


def warm_start_fits(theta0: PyTree, norm_examples: int, k: int, budget_bytes: int, *,
                    jacobian_vectors: bool, hessian_vector_bytes: int | None = None) -> bool:
  """Whether a snapshot's warm-start vectors fit ``budget_bytes``: ``norm_examples · k``
  Hessian-norm vectors of ``hessian_vector_bytes`` each (default parameter-sized; less
  when factored), then ``norm_examples`` more when ``jacobian_vectors`` (an iterative
  per-example Jacobian norm) and one (sharpness), each parameter-sized."""
  per_vector = vector_bytes(theta0)
  per_hessian = per_vector if hessian_vector_bytes is None else hessian_vector_bytes
  dense = (norm_examples if jacobian_vectors else 0) + 1
  return norm_examples * k * per_hessian + dense * per_vector <= budget_bytes


def block_size(batch_size: int | None, fitting: int, n: int, budget_bytes: int, what: str) -> int:
  """The block of examples to use: ``fitting`` (the largest that fits the budget) when
  ``batch_size`` is None, else ``batch_size`` if its block fits. Refuses before XLA
  tries (and the OS kills the process): ``what`` names the computation in the error."""
  if batch_size is None:
    return fitting
  if min(batch_size, n) > fitting:
    raise ValueError(
        f"`batch_size`={batch_size} exceeds the memory budget of {budget_bytes / 2**30:.2f} GiB"
        f" for {what}; batch_size={fitting} fits (or pass a larger memory_budget_bytes).")
  return batch_size


def jacobian_batch_size(method: str, n1: int, n2: int, k: int, num_params: int,
                        itemsize: int, budget_bytes: int) -> int:
  """Largest block of examples whose estimated peak memory fits ``budget_bytes``.

  ``"jacobian"`` holds two blocks of per-example Jacobians, ``2·b·k·P`` scalars
  (also the estimate for ``"structured"`` when its own,
  :func:`ntk_diag.structured.choose_batch_size`, does not apply); ``"ntk_vp"``
  holds ``O(P)`` per column and needs no blocking beyond the kernel itself.
  """
  n = max(n1, n2)
  if method == "ntk_vp":
    return n
  per_example = 2 * k * num_params * itemsize
  return int(max(1, min(n, budget_bytes // max(per_example, 1))))
