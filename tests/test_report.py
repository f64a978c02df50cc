"""`ntk-diag report` / `python -m ntk_diag report` on real event files."""

import os
import subprocess
import sys

import pytest

from ntk_diag import cli
from tiny_run import write_tiny_runs

VENV_BIN = os.path.dirname(sys.executable)
IMAGES = ("kappa", "kernel_drift", "twin_gap", "weight_change", "ntk_spectrum")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  write_tiny_runs(str(root))
  return root


def test_module_report_writes_plots_and_summary(run_dir, tmp_path):
  out = tmp_path / "report"
  proc = subprocess.run([sys.executable, "-m", "ntk_diag", "report", str(run_dir), "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert str(out / "report.md") in proc.stdout
  for name in IMAGES:
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  summary = (out / "report.md").read_text()
  for run in ("run_a", "run_b"):
    assert f"| {run} | kappa |" in summary
    assert f"| {run} | twin_gap |" in summary
  for name in IMAGES:
    assert f"]({name}.png)" in summary


def test_default_out_is_inside_run_dir(run_dir, capsys):
  assert cli.main(["report", str(run_dir / "run_a")]) == 0
  assert (run_dir / "run_a" / "report" / "report.md").is_file()
  assert (run_dir / "run_a" / "report" / "kappa.png").is_file()
  # A RUN_DIR that is itself the run is named after the directory, not ".".
  assert "| run_a | kappa |" in (run_dir / "run_a" / "report" / "report.md").read_text()


def test_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["report", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert "RUN_DIR" in text and "--out" in text


def test_console_script_rejects_bad_run_dir(tmp_path):
  script = os.path.join(VENV_BIN, "ntk-diag")
  if not os.path.exists(script):
    pytest.skip("ntk-diag console script not installed (declared in setup.cfg)")
  missing = tmp_path / "missing"
  proc = subprocess.run([script, "report", str(missing)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "not a directory" in proc.stderr and str(missing) in proc.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  assert cli.main(["report", str(empty)]) == 2


def test_console_script_is_declared():
  import configparser
  setup_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg")
  config = configparser.ConfigParser()
  config.read(setup_cfg)
  assert "ntk-diag = ntk_diag.cli:main" in config["options.entry_points"]["console_scripts"]
