"""examples/theorem1.py at small widths: the net approaches its NTK predictor as width grows."""

import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "theorem1.py")


@pytest.fixture(scope="module")
def theorem1():
  spec = importlib.util.spec_from_file_location("theorem1_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gap_shrinks_with_width(theorem1, tmp_path, capsys):
  out = tmp_path / "theorem1.png"
  result = theorem1.main(["--widths", "256", "1024", "4096", "--steps", "300",
                          "--seeds", "1", "--out", str(out)])
  gaps = [row["gap_ntk"] for row in result["rows"]]
  assert result["slope_ntk"] < -0.25, gaps
  assert result["slope_twin"] < -0.25
  assert gaps[-1] < 0.05
  assert all(row["gap_gd_flow"] < 1e-2 for row in result["rows"])  # GD ≈ gradient flow
  assert out.stat().st_size > 0
  assert "log-log slope" in capsys.readouterr().out
