"""A real TensorBoard server lists the hook's scalars under the scalars plugin.

clu's writer stores scalars as tensor summaries carrying the scalars-plugin
metadata; this checks that TensorBoard (its default loader) shows them as
scalars, i.e. as charts, not only as raw tensors.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tiny_run import write_tiny_run

HOST = "127.0.0.1"
DEADLINE_S = 60.0


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def _get_json(url, timeout=5.0):
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return json.loads(response.read().decode())


def _poll_scalar_tags(base, run, proc):
  """``/data/plugin/scalars/tags`` once ``run`` has its ``ntk_diag/`` tags (or the deadline)."""
  deadline = time.monotonic() + DEADLINE_S
  last = None
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      break
    try:
      last = _get_json(f"{base}/data/plugin/scalars/tags")
      if any(tag.startswith("ntk_diag/") for tag in last.get(run, {})):
        return last
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
      pass
    time.sleep(1.0)
  return last


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tb")
  write_tiny_run(os.path.join(root, "tiny"))
  return root


def test_tensorboard_serves_ntk_diag_scalars(logdir, tmp_path):
  port = _free_port()
  log = open(tmp_path / "tensorboard.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST,
       "--port", str(port), "--reload_interval", "1"],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    base = f"http://{HOST}:{port}"
    tags = _poll_scalar_tags(base, "tiny", proc)
    log.seek(0)
    assert tags is not None, f"TensorBoard never answered; its log:\n{log.read()[-3000:]}"
    scalar_tags = set(tags.get("tiny", {}))
    for tag in ("ntk_diag/kappa", "ntk_diag/kernel_drift", "ntk_diag/twin_gap",
                "ntk_diag/weight_change"):
      assert tag in scalar_tags, (tag, tags)
    # The values behind the chart: one point per snapshot (steps 0, 3, 6).
    series = _get_json(f"{base}/data/plugin/scalars/scalars?run=tiny&tag=ntk_diag/kappa")
    assert [point[1] for point in series] == [0, 3, 6]
    assert all(point[2] > 0 for point in series)
    # The spectrum is a histogram, the heatmap an image: not scalars.
    assert "ntk_diag/ntk_eigenvalues" not in scalar_tags
    assert "ntk_diag/ntk_eigenvalues" in _get_json(f"{base}/data/plugin/histograms/tags").get("tiny", {})
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
