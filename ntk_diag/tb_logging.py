"""Writing a snapshot through a CLU ``MetricWriter`` (TensorBoard by default).

Scalars are written as ``ntk_diag/<name>`` floats; the NTK spectrum as a
histogram, the NTK heatmap and spectrum plot as images. The writer is flushed
before returning, so nothing is lost if the process dies right after. This
module itself does not import CLU (nor TensorFlow): :mod:`ntk_diag.report`
reads the tags back with :data:`TAG_PREFIX`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
  from clu import metric_writers

# The prefix of every tag the hook writes (the one definition).
TAG_PREFIX = "ntk_diag/"


def heatmap_image(kernel: np.ndarray) -> np.ndarray:
  """``(1, N, N, 3)`` uint8 image of the kernel matrix, viridis, min–max scaled."""
  from matplotlib import colormaps
  from ntk_diag import _layout
  matrix = np.asarray(_layout.kernel_to_matrix(np.asarray(kernel)), np.float64)
  lo, hi = np.nanmin(matrix), np.nanmax(matrix)
  scaled = (matrix - lo) / (hi - lo) if np.isfinite(hi - lo) and hi > lo else np.zeros_like(matrix)
  rgb = colormaps["viridis"](np.nan_to_num(scaled))[..., :3]
  return (rgb[None] * 255).astype(np.uint8)


def spectrum_image(eigenvalues: np.ndarray) -> np.ndarray:
  """``(1, H, W, 3)`` uint8 plot of the eigenvalues (descending, log scale)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  fig = Figure(figsize=(4, 3), dpi=80)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  values = np.asarray(eigenvalues, np.float64)
  positive = values[values > 0]
  ax.semilogy(np.arange(1, positive.size + 1), positive, ".-")
  ax.set_xlabel("index")
  ax.set_ylabel("NTK eigenvalue")
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[None, ..., :3].copy()


def write_snapshot(writer: "metric_writers.MetricWriter", step: int, scalars: Mapping[str, float],
                   eigenvalues: np.ndarray | None = None, kernel: np.ndarray | None = None) -> None:
  """Writes scalars, the spectrum histogram and (if ``kernel``) images, then flushes."""
  try:
    writer.write_scalars(step, {TAG_PREFIX + name: float(value) for name, value in scalars.items()})
    if eigenvalues is not None and np.all(np.isfinite(eigenvalues)):
      writer.write_histograms(step, {TAG_PREFIX + "ntk_eigenvalues": np.asarray(eigenvalues)})
      if kernel is not None:
        writer.write_images(step, {TAG_PREFIX + "ntk_heatmap": heatmap_image(kernel),
                                   TAG_PREFIX + "ntk_spectrum": spectrum_image(eigenvalues)})
  finally:
    writer.flush()
