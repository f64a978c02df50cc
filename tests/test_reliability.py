"""Bad input, numerical faults, restarts: clear errors, nothing lost, training never harmed."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_diag as nd
from events import read_scalars
from ntk_diag.snapshot import SnapshotConfig


class MLP(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.tanh(nn.Dense(self.width)(x)))


def _setup(width=16, n=6):
  x = jax.random.normal(jax.random.key(0), (n, 3))
  y = jnp.ones((n, 2))
  model = MLP(width)
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(1), x))
  return apply_fn, params, x, y


def _dir_bytes(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(every_steps=0), "every_steps"),
    (dict(every_steps=-3), "every_steps"),
    (dict(every_secs=0.0), "every_secs"),
    (dict(every_steps=2.5), "every_steps"),
    (dict(config=SnapshotConfig(num_iters=0)), "num_iters"),
    (dict(config=SnapshotConfig(ntk_batch_size=-1)), "ntk_batch_size"),
    (dict(config=SnapshotConfig(ntk_method="fast")), "ntk_method"),
    (dict(config=SnapshotConfig(norm_method="svd")), "norm_method"),
])
def test_hook_rejects_bad_options(tmp_path, kwargs, match):
  apply_fn, _, x, y = _setup()
  with pytest.raises((ValueError, TypeError), match=match):
    nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), **kwargs)


def test_hook_rejects_probe_length_mismatch_and_empty(tmp_path):
  apply_fn, _, x, y = _setup()
  with pytest.raises(ValueError, match=r"probe_x.*probe_y.*6 and 5"):
    nd.LazyTrainingHook(apply_fn, x, y[:5], workdir=str(tmp_path))
  with pytest.raises(ValueError, match="probe_x.*empty"):
    nd.LazyTrainingHook(apply_fn, x[:0], y[:0], workdir=str(tmp_path))


def test_wrong_target_shape_disables_hook_without_crashing(tmp_path):
  apply_fn, params, x, _ = _setup()
  hook = nd.LazyTrainingHook(apply_fn, x, jnp.ones((6, 3)), workdir=str(tmp_path), every_steps=1)
  with pytest.warns(RuntimeWarning, match=r"probe_y.*\(6, 2\).*\(6, 3\)"):
    assert not hook(0, params=params)
  assert hook.disabled
  assert not hook(1, params=params)
  strict = nd.LazyTrainingHook(apply_fn, x, jnp.ones((6, 3)), workdir=str(tmp_path / "s"),
                               every_steps=1, strict=True)
  with pytest.raises(ValueError, match="probe_y"):
    strict(0, params=params)


@pytest.mark.parametrize("call, match", [
    (lambda f, p, x: nd.empirical_ntk(f, p, x, method="svd"), "method"),
    (lambda f, p, x: nd.empirical_ntk(f, p, x, batch_size=0), "batch_size"),
    (lambda f, p, x: nd.empirical_ntk(f, p, x, jnp.ones((2, 4))), "x2"),
    (lambda f, p, x: nd.empirical_ntk(f, p, x[:0]), "x1"),
    (lambda f, p, x: nd.jacobian_norm(f, p, x, num_iters=0), "num_iters"),
    (lambda f, p, x: nd.hessian_norm(f, p, x, method="eig"), "method"),
    (lambda f, p, x: nd.lazy_ratio(f, p, x, jnp.ones((5, 2))), "y"),
    (lambda f, p, x: nd.lazy_ratio(f, p, x, jnp.ones((6, 3))), "y"),
    (lambda f, p, x: nd.kernel_predictor(jnp.eye(6), jnp.ones((5, 2))), "y_train"),
    (lambda f, p, x: nd.kernel_predictor(jnp.zeros((6, 6)), jnp.ones((6, 2)))(), "ridge"),
])
def test_functional_api_errors_name_the_argument(call, match):
  apply_fn, params, x, _ = _setup()
  with pytest.raises((ValueError, TypeError), match=match):
    call(apply_fn, params, x)


# -------------------------------------------------------------- stale workdir
def test_stale_workdir_is_refused_and_left_untouched(tmp_path):
  apply_fn, params, x, y = _setup(width=16)
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1)
  hook(0, params=params)
  ckpt = os.path.join(str(tmp_path), "ntk_diag")
  before = _dir_bytes(ckpt)
  apply_fn2, params2, _, _ = _setup(width=24)  # the model changed, the workdir was reused
  strict = nd.LazyTrainingHook(apply_fn2, x, y, workdir=str(tmp_path), every_steps=1, strict=True)
  with pytest.raises(ValueError, match="workdir.*different model"):
    strict(0, params=params2)
  lenient = nd.LazyTrainingHook(apply_fn2, x, y, workdir=str(tmp_path), every_steps=1)
  with pytest.warns(RuntimeWarning, match="stale workdir"):
    assert not lenient(0, params=params2)
  assert _dir_bytes(ckpt) == before


# ---------------------------------------------------------- numerical faults
class RecordingWriter:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_images(self, step, images):
    pass

  def flush(self):
    pass


def test_nonfinite_params_are_logged_not_raised_and_recover(tmp_path):
  apply_fn, params, x, y = _setup()
  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=writer, every_steps=1)
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
  hook(0, params=params)
  with pytest.warns(RuntimeWarning, match="non-finite"):
    hook(1, params=bad)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once only
    hook(2, params=bad)
  hook(3, params=params)
  by_step = dict(writer.scalars)
  assert by_step[1]["ntk_diag/nonfinite"] == 1.0
  assert np.isnan(by_step[1]["ntk_diag/kappa"]) and np.isnan(by_step[1]["ntk_diag/residual_norm"])
  assert by_step[3]["ntk_diag/nonfinite"] == 0.0
  assert all(np.isfinite(v) for v in by_step[3].values())
  assert by_step[3]["ntk_diag/weight_change"] == 0.0


def test_exception_in_snapshot_is_counted_or_raised_when_strict(tmp_path):
  apply_fn, params, x, y = _setup()
  calls = {"n": 0}

  def flaky(p, xx):
    calls["n"] += 1
    return apply_fn(p, xx)

  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(flaky, x, y, workdir=str(tmp_path), writer=writer, every_steps=1)
  hook(0, params=params)
  original = hook._engine.run
  hook._engine.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
  with pytest.warns(RuntimeWarning, match="boom"):
    assert hook(1, params=params)
  hook._engine.run = original
  hook(2, params=params)
  by_step = dict(writer.scalars)
  assert by_step[1] == {"ntk_diag/failed": 1.0}
  assert by_step[2]["ntk_diag/failed"] == 1.0 and "ntk_diag/kappa" in by_step[2]

  strict = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path / "strict"), writer=writer,
                               every_steps=1, strict=True)
  strict(0, params=params)
  strict._engine.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
  with pytest.raises(RuntimeError, match="boom"):
    strict(1, params=params)


def test_broken_writer_never_reaches_the_training_loop(tmp_path):
  apply_fn, params, x, y = _setup()

  class BrokenWriter(RecordingWriter):
    def write_scalars(self, step, scalars):
      raise OSError("disk full")

  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=BrokenWriter(), every_steps=1)
  with pytest.warns(RuntimeWarning, match="disk full"):
    hook(0, params=params)
  assert hook.last is not None  # results stay available in Python


# -------------------------------------------------------------- nothing lost
KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from flax import linen as nn
    import ntk_diag as nd
    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(2)(nn.tanh(nn.Dense(16)(x)))
    x = jax.random.normal(jax.random.key(0), (6, 3)); y = jnp.ones((6, 2))
    model = MLP(); apply_fn, params = nd.from_linen(model, model.init(jax.random.key(1), x))
    start = int(sys.argv[2])
    params = jax.tree.map(lambda a: a + 0.01 * start, params)
    hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=sys.argv[1], every_steps=1)
    for step in range(start, start + 10**6):
      if hook(step, params=params):
        print("snapshot", step, flush=True)
      params = jax.tree.map(lambda a: a * 1.0001, params)
""")


def test_killed_run_leaves_readable_events_and_intact_theta0(tmp_path):
  workdir = str(tmp_path / "run")
  script = tmp_path / "train.py"
  script.write_text(KILL_SCRIPT)
  proc = subprocess.Popen([sys.executable, str(script), workdir, "0"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(int(line.split()[1]))
    if len(seen) >= 3:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  logged = read_scalars(workdir)
  assert set(seen) <= set(logged["ntk_diag/kappa"])
  theta0 = nd.load_initial_params(workdir)
  # Resume from a later step: θ0 is restored (bitwise), not replaced.
  before = _dir_bytes(os.path.join(workdir, "ntk_diag"))
  resumed = subprocess.Popen([sys.executable, str(script), workdir, "100"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  for line in resumed.stdout:
    if int(line.split()[1]) >= 101:
      break
  resumed.send_signal(signal.SIGKILL)
  resumed.wait()
  assert _dir_bytes(os.path.join(workdir, "ntk_diag")) == before
  jax.tree.map(np.testing.assert_array_equal, nd.load_initial_params(workdir), theta0)
  logged = read_scalars(workdir)
  assert 100 in logged["ntk_diag/weight_change"] and logged["ntk_diag/weight_change"][100] > 0


# -------------------------------------------------------------- memory faults
def test_kernel_over_memory_budget_is_blocked_or_refused():
  apply_fn, params, x, _ = _setup(width=64, n=40)
  budget = 200_000  # bytes: far below the (40+40)·2·P·4 bytes of two Jacobian blocks
  auto = nd.empirical_ntk(apply_fn, params, x, method="jacobian", memory_budget_bytes=budget)
  ref = nd.empirical_ntk(apply_fn, params, x, method="jacobian", batch_size=40)
  np.testing.assert_allclose(np.asarray(auto), np.asarray(ref), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"batch_size.*fits"):
    nd.empirical_ntk(apply_fn, params, x, method="jacobian", batch_size=40, memory_budget_bytes=budget)
