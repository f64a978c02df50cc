"""Verdicts per run: thresholds on synthetic event files, through `ntk-diag report`."""

import math

from events import write_scalars
from ntk_diag import cli
from ntk_diag import verdict


def _series(**last):
  """Step 0 at rest, then the given values at step 100."""
  return {f"ntk_diag/{name}": {0: 0.0, 100: value} for name, value in last.items()}


def test_thresholds():
  cases = [
      (dict(twin_gap=0.02, kernel_drift=0.05, lazy_radius_ratio=0.5), "lazy", "< 1"),
      (dict(twin_gap=0.02, kernel_drift=0.05, lazy_radius_ratio=40.0), "lazy", "no longer applies"),
      (dict(twin_gap=0.02, kernel_drift=0.3), "drifting", "between 0.1 and 0.5"),
      (dict(twin_gap=0.9, kernel_drift=0.05, lazy_radius_ratio=0.5), "feature learning", "above 0.5"),
      (dict(lazy_radius_ratio=0.5), "lazy", "proof alone"),
      (dict(lazy_radius_ratio=3.0), "undetermined", "≥ 1"),
      (dict(kappa=0.1), "undetermined", "neither"),
      (dict(twin_gap=math.nan, kernel_drift=0.6), "feature learning", "kernel_drift = 0.6"),
  ]
  for last, label, phrase in cases:
    got = verdict.run_verdict(last)
    assert got.label == label, (last, got)
    assert phrase in got.sentence, (last, got.sentence)
    assert got.sentence.startswith(label) and got.sentence.endswith(".")
  # Thresholds are inclusive on the lazy side.
  assert verdict.run_verdict(dict(twin_gap=0.1, kernel_drift=0.1)).label == "lazy"
  assert verdict.run_verdict(dict(twin_gap=0.5)).label == "drifting"


def test_report_states_a_verdict_per_run(tmp_path):
  runs = {
      "lazy": _series(twin_gap=0.03, kernel_drift=0.01, lazy_radius_ratio=0.2, kappa=0.01),
      "drifting": _series(twin_gap=0.2, kernel_drift=0.15, kappa=0.3),   # an older run: no ratio
      "rich": _series(twin_gap=0.8, kernel_drift=1.5, lazy_radius_ratio=90.0, kappa=2.0),
  }
  for name, series in runs.items():
    write_scalars(tmp_path / name, series)
  assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
  text = (tmp_path / "out" / "report.md").read_text()
  assert "- **lazy**: lazy: " in text
  assert "- **drifting**: drifting: " in text
  assert "- **rich**: feature learning: " in text
  assert (tmp_path / "out" / "lazy_radius_ratio.png").is_file()
  assert "| rich | lazy_radius_ratio | 0 (step 0) | 90 (step 100) |" in text
