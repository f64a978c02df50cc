"""The examples run end to end at tiny sizes and log the hook's tags.

(`width_scaling.py` and `theorem1.py` have their own tests.)
"""

import importlib.util
import math
import os
import sys

from events import read_scalars

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TAGS = ("kappa", "jacobian_norm", "hessian_norm", "residual_norm", "kernel_drift",
        "kernel_distance", "kernel_alignment", "weight_change", "twin_gap")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax dataclasses resolve string annotations through it
  spec.loader.exec_module(module)
  return module


def _assert_logged(workdir, steps):
  logged = read_scalars(workdir)
  for tag in TAGS:
    values = logged["ntk_diag/" + tag]
    assert sorted(values) == sorted(steps), (tag, sorted(values))
    assert all(math.isfinite(v) for v in values.values()), tag
  return logged


def test_digits_mlp(tmp_path, capsys):
  workdir = tmp_path / "digits"
  results = _load("digits_mlp").main(["--workdir", str(workdir), "--widths", "16", "64", "--steps", "20",
                                      "--num-train", "32", "--every-steps", "10", "--probe-size", "16"])
  out = capsys.readouterr().out
  assert set(results) == {16, 64}
  names = ["network", "linearized twin", "kernel predictor (t = 20)", "kernel interpolator (t = ∞)"]
  for width in (16, 64):
    comparison = results[width]["comparison"]
    assert [row.name for row in comparison.rows] == names
    for row in comparison.rows:
      values = [row.test_loss, row.accuracy] + ([] if row.name == "network" else
                                                 [row.agreement, row.distance])
      assert all(math.isfinite(v) for v in values), row
    # The printed table is the one-call comparison's.
    assert comparison.table() in out
    _assert_logged(workdir / f"width_{width}", [0, 10, 20])
    assert (workdir / f"width_{width}" / "twin_params.npz").is_file()
  assert "width 16: " in out and "width 64: " in out and "kappa" in out
  assert "ntk-diag compare " in out


def test_nnx_mlp(tmp_path, capsys):
  workdir = tmp_path / "nnx"
  last = _load("nnx_mlp").main(["--workdir", str(workdir), "--steps", "20", "--width", "32",
                                "--num-train", "64", "--probe-size", "16", "--every-steps", "10"])
  out = capsys.readouterr().out
  assert last.step == 20
  for name in ("kappa", "kernel_drift", "weight_change"):
    assert name in out and math.isfinite(last.scalars[name])
  assert last.scalars["weight_change"] > 0
  _assert_logged(workdir, [0, 10, 20])


def test_clu_loop_trains_checkpoints_and_resumes(tmp_path, capsys):
  clu_loop = _load("clu_loop")
  workdir = tmp_path / "clu"
  args = ["--workdir", str(workdir), "--width", "32", "--num-train", "128", "--probe-size", "16",
          "--log-every", "5", "--ntk-every", "10", "--checkpoint-every", "10"]
  first = clu_loop.main(args + ["--steps", "20"])
  assert first["initial_step"] == 0 and int(first["state"].step) == 20
  theta0 = first["hook"].initial_params

  second = clu_loop.main(args + ["--steps", "30"])
  assert "Resumed from step 20." in capsys.readouterr().out
  assert second["initial_step"] == 20 and int(second["state"].step) == 30
  # The resumed hook measures from the original θ0, restored from the workdir.
  import jax
  import numpy as np
  for a, b in zip(jax.tree.leaves(theta0), jax.tree.leaves(second["hook"].initial_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "30"]

  logged = _assert_logged(workdir, [0, 10, 20, 30])
  assert logged["ntk_diag/weight_change"][30] > logged["ntk_diag/weight_change"][20] > 0
  assert {5, 10, 15, 20, 25, 30} <= set(logged["train_loss"])


def test_resnet_batchnorm(tmp_path, capsys):
  workdir = tmp_path / "resnet"
  out = _load("resnet_batchnorm").main(["--workdir", str(workdir), "--epochs", "1", "--batch-size",
                                        "16", "--num-train", "64", "--filters", "4", "--blocks", "1",
                                        "--probe-size", "8", "--every-steps", "2"])
  assert int(out["state"].step) == 4 and out["hook"].last.step == 4
  _assert_logged(workdir, [0, 2, 4])
  assert "kappa" in capsys.readouterr().out


def test_nnx_batchnorm_dropout(tmp_path, capsys):
  workdir = tmp_path / "nnx_bn"
  out = _load("nnx_batchnorm_dropout").main(["--workdir", str(workdir), "--steps", "4",
                                             "--batch-size", "16", "--channels", "4", "--hidden",
                                             "16", "--num-train", "64", "--probe-size", "8",
                                             "--every-steps", "2"])
  assert out["model"].dropout.deterministic is False  # still in train mode
  _assert_logged(workdir, [0, 2, 4])
  assert "kappa" in capsys.readouterr().out
