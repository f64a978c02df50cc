"""Reading back what the hook wrote, with the package's own reader, writing synthetic runs,
and MetricWriter stand-ins for hooks whose events a test reads from memory or not at all."""

from tensorboard.util import tensor_util

from ntk_diag import report


def read_scalars(workdir):
  """``{tag: {step: value}}`` of the scalar tags in the event files of ``workdir``."""
  return {tag: {int(step): float(v) for step, v in zip(steps, values)}
          for tag, (steps, values) in report.read_tensors(workdir).items()
          if all(v.ndim == 0 for v in values)}


def write_scalars(logdir, series):
  """Writes ``{tag: {step: value}}`` as TF2-style scalar tensors (what clu's writer
  stores), with tensorboard's pure-Python writer: synthetic runs without TensorFlow."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.proto import summary_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter

  writer = EventFileWriter(str(logdir))
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
  steps = sorted({step for values in series.values() for step in values})
  for step in steps:
    values = [summary_pb2.Summary.Value(tag=tag, metadata=metadata,
                                        tensor=tensor_util.make_tensor_proto(float(v[step])))
              for tag, v in series.items() if step in v]
    writer.add_event(event_pb2.Event(step=step, wall_time=float(step),
                                     summary=summary_pb2.Summary(value=values)))
  writer.close()


class RecordingWriter:
  """A MetricWriter stand-in that records calls."""

  def __init__(self):
    self.scalars, self.histograms, self.images, self.flushes = [], [], [], 0

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_histograms(self, step, arrays, num_buckets=None):
    self.histograms.append((step, dict(arrays)))

  def write_images(self, step, images):
    self.images.append((step, dict(images)))

  def flush(self):
    self.flushes += 1


class NullWriter:
  """A MetricWriter stand-in that writes nothing."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    pass
