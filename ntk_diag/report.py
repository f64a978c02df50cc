"""Offline report of a run: plots and a Markdown summary from the event files.

Reads what :class:`~ntk_diag.LazyTrainingHook` wrote (clu's TensorBoard writer
stores scalars and histograms as tensors) from every run directory under
``RUN_DIR`` and writes ``report.md`` plus PNG plots into ``--out``: first and
last values of every metric, a verdict per run (:mod:`ntk_diag.verdict`) and,
when given, the comparison with the kernel regime (:func:`ntk_diag.compare`).
"""

from __future__ import annotations

import dataclasses
import os

from typing import Any, Mapping

import numpy as np

from ntk_diag import verdict

from ntk_diag.tb_logging import TAG_PREFIX
PLOTTED = ("kappa", "kernel_drift", "twin_gap", "weight_change")
# Plotted when some run logged them (newer hook tags, optional groups).
PLOTTED_IF_LOGGED = ("twin_distance", "lazy_radius_ratio", "sharpness_lr")
SUMMARISED = ("kappa", "jacobian_norm", "hessian_norm", "residual_norm", "kernel_drift",
              "kernel_distance", "kernel_alignment", "weight_change", "twin_gap",
              "twin_distance", "twin_param_distance", "lazy_radius", "lazy_radius_ratio",
              "sharpness", "sharpness_lr")


@dataclasses.dataclass
class RunData:
  name: str
  scalars: dict[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values)
  spectrum: tuple[int, np.ndarray] | None             # (step, histogram buckets (b, 3))


def find_runs(root: str) -> list[str]:
  """Directories under ``root`` (itself included) that hold event files."""
  runs = []
  for directory, _, files in os.walk(root):
    if any(name.startswith("events.out.tfevents") for name in files):
      runs.append(directory)
  return sorted(runs)


def read_tensors(directory: str) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
  """``{tag: (steps, values)}`` of every tensor summary in ``directory``'s event
  files (clu's TensorBoard writer stores scalars and histograms as tensors)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  acc = event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags().get("tensors", []):
    events = acc.Tensors(tag)
    out[tag] = (np.array([e.step for e in events]),
                [tensor_util.make_ndarray(e.tensor_proto) for e in events])
  return out


def read_run(directory: str, root: str) -> RunData:
  scalars, spectrum = {}, None
  for tag, (steps, values) in read_tensors(directory).items():
    if not tag.startswith(TAG_PREFIX):
      continue
    name = tag[len(TAG_PREFIX):]
    if name == "ntk_eigenvalues":
      spectrum = (int(steps[-1]), np.asarray(values[-1]))
    elif all(np.ndim(v) == 0 for v in values):
      scalars[name] = (steps, np.array(values, dtype=np.float64))
  return RunData(name=run_name(directory, root), scalars=scalars, spectrum=spectrum)


def run_name(directory: str, root: str) -> str:
  """``directory`` relative to ``root``; the root itself is named after its last component."""
  name = os.path.relpath(directory, root)
  return os.path.basename(os.path.abspath(root)) or name if name == os.curdir else name


def plot_scalars(runs: list[RunData], out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  paths = []
  logged = [name for name in PLOTTED_IF_LOGGED if any(name in run.scalars for run in runs)]
  for name in PLOTTED + tuple(logged):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run in runs:
      if name in run.scalars:
        steps, values = run.scalars[name]
        ax.plot(steps, values, ".-", label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(name)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_spectrum(runs: list[RunData], out_dir: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for run in runs:
    if run.spectrum is None:
      continue
    step, buckets = run.spectrum
    if buckets.ndim == 2 and buckets.shape[1] == 3:
      centers = 0.5 * (buckets[:, 0] + buckets[:, 1])
      ax.step(centers, buckets[:, 2], where="mid", label=f"{run.name} (step {step})")
  ax.set_xlabel("NTK eigenvalue")
  ax.set_ylabel("count")
  ax.set_title("NTK spectrum at the last snapshot")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize="small")
  fig.tight_layout()
  path = os.path.join(out_dir, "ntk_spectrum.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_verdict(run: RunData) -> verdict.Verdict:
  """The verdict of :func:`ntk_diag.verdict.run_verdict` on the run's last values."""
  return verdict.run_verdict({name: float(values[-1]) for name, (_, values) in run.scalars.items()})


def summary_markdown(runs: list[RunData], images: list[str], out_dir: str,
                     comparisons: Mapping[str, Any] | None = None) -> str:
  lines = ["# ntk_diag report", "", "## Verdict", ""]
  for run in runs:
    lines.append(f"- **{run.name}**: {run_verdict(run).sentence}")
  lines += ["", f"Thresholds: lazy when twin_gap and kernel_drift are both ≤ {verdict.LAZY_MAX},"
            f" feature learning when either exceeds {verdict.FEATURE_LEARNING_MIN}, drifting in"
            " between; lazy_radius_ratio < 1 means the lecture's proof covers the run.", ""]
  for name, comparison in (comparisons or {}).items():
    lines += [f"## Comparison with the kernel regime: {name}", "", comparison.to_markdown()]
  lines += ["## Metrics", "", "Values at the first and last snapshot of each run.", "",
            "| run | metric | first | last |", "|---|---|---|---|"]
  for run in runs:
    for name in SUMMARISED:
      if name in run.scalars:
        steps, values = run.scalars[name]
        lines.append(f"| {run.name} | {name} | {values[0]:.4g} (step {steps[0]}) "
                     f"| {values[-1]:.4g} (step {steps[-1]}) |")
  lines += ["", "κ ≪ 1 with small kernel drift and twin gap means the run is in the lazy (kernel) regime.", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in images]
  return "\n".join(lines) + "\n"


def write_report(run_dir: str, out_dir: str | None = None, *, comparison: Any = None) -> str:
  """Writes plots and ``report.md`` for every run under ``run_dir``; returns the Markdown path.

  ``comparison``: a :class:`~ntk_diag.Comparison` (e.g. from
  :func:`ntk_diag.compare`) or ``{title: Comparison}``, shown as tables.
  """
  if not os.path.isdir(run_dir):
    raise ValueError(f"`run_dir` {run_dir!r} is not a directory.")
  directories = find_runs(run_dir)
  if not directories:
    raise ValueError(f"No TensorBoard event files under `run_dir` {run_dir!r}.")
  out_dir = out_dir or os.path.join(run_dir, "report")
  os.makedirs(out_dir, exist_ok=True)
  runs = [read_run(d, run_dir) for d in directories]
  images = plot_scalars(runs, out_dir) + [plot_spectrum(runs, out_dir)]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(summary_markdown(runs, images, out_dir, _titled(comparison, run_dir)))
  return path


def _titled(comparison: Any, run_dir: str) -> dict[str, Any]:
  if comparison is None:
    return {}
  if isinstance(comparison, Mapping):
    return dict(comparison)
  if not hasattr(comparison, "to_markdown"):
    raise TypeError(
        "`comparison` must be a Comparison from ntk_diag.compare or a {title: Comparison}"
        f" dict; got {type(comparison).__name__}.")
  return {os.path.basename(os.path.abspath(run_dir)): comparison}
