"""examples/sharpness.py: the lazy run stays below the edge of stability, the catapult crosses it."""

import importlib.util
import os

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "sharpness.py")


def test_lazy_and_catapult(capsys):
  spec = importlib.util.spec_from_file_location("example_sharpness", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(["--width", "256", "--steps", "40"])
  lazy, catapult = results["lazy"], results["catapult"]
  # Lazy: η·sharpness = 1 at θ0 and below 2 throughout; the loss only decreases.
  assert abs(lazy["sharpness_lr"][0] - 1.0) < 1e-3
  assert max(lazy["sharpness_lr"].values()) < 2.0
  assert lazy["losses"].argmax() == 0 and lazy["losses"][-1] < 0.1 * lazy["losses"][0]
  # Catapult: starts at 3 > 2, the loss spikes, the sharpness falls below 2/η, the loss converges.
  assert abs(catapult["sharpness_lr"][0] - 3.0) < 3e-3
  assert catapult["losses"].max() > 3 * catapult["losses"][0]
  assert catapult["sharpness_lr"][40] < 2.0
  assert catapult["losses"][-1] < catapult["losses"][0]
  # ... and left the kernel regime: the NTK moved far more than in the lazy run.
  assert catapult["kernel_drift"] > 5 * lazy["kernel_drift"]
  out = capsys.readouterr().out
  assert "lazy: η = 1/λ0" in out and "catapult: η = 3/λ0" in out
