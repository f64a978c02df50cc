"""`ntk-diag compare` and `ntk-diag report --params`: files in, the table of nd.compare out."""

import json
import textwrap

import jax
import numpy as np
import optax
import pytest

import ntk_diag as nd
from events import write_scalars
from ntk_diag import checkpoint
from ntk_diag import cli
from ntk_diag import params_io

MODEL = textwrap.dedent("""
    import jax, jax.numpy as jnp

    def make(width=8, seed=0):
      k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
      params = {"hidden": {"w": jax.random.normal(k1, (4, width))},
                "out": {"w": jax.random.normal(k2, (width, 3))}}
      apply_fn = lambda p, x: jnp.tanh(x @ p["hidden"]["w"] / 2.0) @ p["out"]["w"] / width ** 0.5
      return apply_fn, params
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return _setup(tmp_path_factory.mktemp("cli_compare"))


def _setup(tmp_path):
  (tmp_path / "model.py").write_text(MODEL)
  namespace = {}
  exec(MODEL, namespace)
  apply_fn, params0 = namespace["make"](width=16)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y = np.argmax(x[:, :3], axis=1).astype(np.int32)
  data = dict(x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
  np.savez(tmp_path / "data.npz", **data)
  workdir = tmp_path / "run"
  checkpoint.save_initial_state(str(workdir), checkpoint.InitialState(
      params=params0, probe_x=data["x_train"], probe_y=data["y_train"], kernel0=None))
  tx = optax.sgd(0.5)
  twin = nd.LinearizedTwin(apply_fn, params0, tx, loss="softmax_cross_entropy")
  twin_state = twin.init()
  grad = jax.jit(jax.grad(lambda p: nd.losses.mean(
      "softmax_cross_entropy", apply_fn(p, data["x_train"]), jax.nn.one_hot(data["y_train"], 3))))
  params, opt_state = params0, tx.init(params0)
  for _ in range(20):
    updates, opt_state = tx.update(grad(params), opt_state)
    params = optax.apply_updates(params, updates)
    twin_state = twin.step(twin_state, data["x_train"], data["y_train"])
  params_io.save_params(tmp_path / "params.npz", params)
  params_io.save_params(tmp_path / "twin.npz", twin_state.params)
  write_scalars(workdir, {"ntk_diag/twin_gap": {0: 0.0, 20: 0.01},
                          "ntk_diag/kernel_drift": {0: 0.0, 20: 0.02}})
  expected = nd.compare(apply_fn, params0, params, data["x_train"], data["y_train"],
                        data["x_test"], data["y_test"], loss="softmax_cross_entropy",
                        twin_params=twin_state.params, learning_rate=0.5, steps=20)
  args = ["--model", f"{tmp_path / 'model.py'}:make", "--model-kwargs", json.dumps({"width": 16}),
          "--params", str(tmp_path / "params.npz"), "--twin-params", str(tmp_path / "twin.npz"),
          "--data", str(tmp_path / "data.npz"), "--loss", "softmax_cross_entropy",
          "--learning-rate", "0.5", "--steps", "20"]
  return workdir, args, expected


def test_compare_and_report(setup, tmp_path, capsys):
  workdir, args, expected = setup
  out = tmp_path / "table.md"
  assert cli.main(["compare", str(workdir), *args, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert expected.table() in printed
  assert out.read_text() == expected.to_markdown()
  assert "| kernel predictor (t = 20) |" in out.read_text()

  assert cli.main(["report", str(workdir), *args]) == 0
  text = (workdir / "report" / "report.md").read_text()
  assert "## Comparison with the kernel regime: run" in text
  assert expected.to_markdown() in text
  assert "- **run**: lazy: " in text


def test_errors(setup, tmp_path, capsys):
  workdir, args, _ = setup
  no_model = [a for a in args if not a.startswith("--model") and "model.py" not in a
              and a != json.dumps({"width": 16})]
  assert cli.main(["compare", str(workdir), *no_model]) == 2
  assert "--model" in capsys.readouterr().err
  wrong_width = [json.dumps({"width": 8}) if a == json.dumps({"width": 16}) else a for a in args]
  assert cli.main(["compare", str(workdir), *wrong_width]) == 2
  assert "does not hold parameters of this model" in capsys.readouterr().err
  assert cli.main(["compare", str(tmp_path / "elsewhere"), *args]) == 2
  assert "No ntk_diag initial-state checkpoint" in capsys.readouterr().err
