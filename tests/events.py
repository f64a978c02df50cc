"""Reading back what the hook wrote (clu's writer stores scalars as tensors)."""

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(workdir):
  """``{tag: {step: value}}`` from the event files under ``workdir``."""
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    values = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}
    if all(v.ndim == 0 for v in values.values()):
      out[tag] = {step: float(v) for step, v in values.items()}
  return out
