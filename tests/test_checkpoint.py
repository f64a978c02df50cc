"""The θ0 checkpoint: a bitwise round trip of params, probe set, K0 and the step of θ0.

The step matters: a resumed hook measures the kernel velocity of its first
snapshot from it (``docs/failure_modes.md``).
"""

import numpy as np
import pytest

import ntk_diag as nd
from ntk_diag import checkpoint


def _state(step, width=4):
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": rng.standard_normal((3, width)).astype(np.float32),
                        "bias": rng.standard_normal(width).astype(np.float32)},
            "head": {"kernel": rng.standard_normal((width, 2)).astype(np.float32)}}
  return checkpoint.InitialState(
      params=params, probe_x=rng.standard_normal((5, 3)).astype(np.float32),
      probe_y=rng.standard_normal((5, 2)).astype(np.float32),
      kernel0=rng.standard_normal((5, 5)).astype(np.float32), step=step)


def test_round_trip_is_bitwise_and_keeps_the_step(tmp_path):
  workdir = str(tmp_path)
  state = _state(step=7)
  checkpoint.save_initial_state(workdir, state)
  restored = checkpoint.restore_initial_state(workdir, state.params)
  assert restored.step == 7
  for got, want in ((restored.probe_x, state.probe_x), (restored.probe_y, state.probe_y),
                    (restored.kernel0, state.kernel0)):
    assert np.asarray(got).tobytes() == want.tobytes()
  nested = nd.load_initial_params(workdir)  # dotted names back to a nested dict
  for layer, leaves in state.params.items():
    for name, value in leaves.items():
      assert np.asarray(restored.params[layer][name]).tobytes() == value.tobytes()
      assert np.asarray(nested[layer][name]).tobytes() == value.tobytes()
  with pytest.raises(FileExistsError):  # never overwritten
    checkpoint.save_initial_state(workdir, _state(step=9))
  with pytest.raises(ValueError, match="different model"):
    checkpoint.restore_initial_state(workdir, _state(step=7, width=6).params)
  assert checkpoint.restore_initial_state(workdir, state.params).step == 7
