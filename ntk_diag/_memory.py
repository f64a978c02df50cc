"""Memory budget: how many bytes one diagnostic may hold at its peak."""

from __future__ import annotations

import os

import jax

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
