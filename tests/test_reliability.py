"""Bad input, numerical faults, restarts: clear errors, nothing lost, training never harmed."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_diag as nd
from models import MLP
from events import RecordingWriter, read_scalars
from ntk_diag.diag_state import SnapshotConfig


def _setup(width=16, n=6):
  x = jax.random.normal(jax.random.key(0), (n, 3))
  y = jnp.ones((n, 2))
  model = MLP(hidden=(width,), out=2)
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


def test_wrong_target_shape_raises_at_the_first_call(tmp_path):
  apply_fn, params, x, _ = _setup()
  hook = nd.LazyTrainingHook(apply_fn, x, jnp.ones((6, 3)), workdir=str(tmp_path), every_steps=1)
  with pytest.raises(ValueError, match=r"probe_y.*\(6, 2\).*\(6, 3\)"):
    hook(0, params=params)
  assert not os.path.exists(os.path.join(str(tmp_path), "ntk_diag"))  # nothing written
  labels = nd.LazyTrainingHook(apply_fn, x, jnp.ones((6,)), workdir=str(tmp_path), every_steps=1,
                               loss="softmax_cross_entropy")
  with pytest.raises(TypeError, match=r"probe_y.*labels.*integers"):
    labels(0, params=params)
  with pytest.raises(ValueError, match="loss"):
    nd.LazyTrainingHook(apply_fn, x, jnp.ones((6, 2)), workdir=str(tmp_path), loss="hinge")


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x)))


class KeywordNet(nn.Module):
  @nn.compact
  def __call__(self, *, inputs):
    return nn.Dense(2)(inputs)


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))


def _failing_apply_fns():
  x = jnp.ones((6, 3))
  dropout, keyword, bn = DropoutNet(), KeywordNet(), BNNet()
  v_drop = dropout.init(jax.random.key(0), x, train=False)
  v_key = keyword.init(jax.random.key(0), inputs=x)
  v_bn = bn.init(jax.random.key(0), x, train=False)
  return [
      # train mode by default: Dropout wants an rng
      ("rngs", lambda p, xx: dropout.apply({"params": p}, xx), v_drop["params"], None),
      # positional input to a keyword-only module
      ("keyword", lambda p, xx: keyword.apply({"params": p}, xx), v_key["params"], None),
      # BatchNorm in train mode without `mutable`
      ("train=False", lambda p, xx: bn.apply({"params": p, **v_bn}, xx), v_bn["params"], None),
      # model_state given, but apply_fn takes two arguments
      (r"apply_fn\(params, x, model_state\)", lambda p, xx: bn.apply({"params": p}, xx, train=False),
       v_bn["params"], {"batch_stats": v_bn["batch_stats"]}),
  ]


@pytest.mark.parametrize("case", range(4))
def test_failing_apply_fn_raises_at_first_call_with_a_hint(tmp_path, case):
  hint, apply_fn, params, model_state = _failing_apply_fns()[case]
  x, y = jnp.ones((6, 3)), jnp.ones((6, 2))
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1)
  with pytest.raises((TypeError, ValueError), match=r"cannot evaluate the model.*" + hint):
    hook(0, params=params, model_state=model_state)


@pytest.mark.parametrize("step", [jnp.asarray(0), jnp.asarray(0, jnp.uint8), np.int64(0), 0])
def test_integer_scalar_steps(tmp_path, step):
  apply_fn, params, x, y = _setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=2,
                             compute_norms=False, compute_ntk=False)
  assert hook(step, params=params)
  assert not hook(jnp.asarray(1), params=params)
  assert hook.last.step == 0 and isinstance(hook.last.step, int)


def test_bad_step_raises_at_start_then_only_warns(tmp_path):
  apply_fn, params, x, y = _setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1,
                             compute_norms=False, compute_ntk=False)
  with pytest.raises(TypeError, match="step"):
    hook(0.5, params=params)
  with pytest.raises(TypeError, match="step"):
    hook(jnp.zeros((2,), jnp.int32), params=params)
  assert hook(0, params=params)
  with pytest.warns(RuntimeWarning, match="step"):
    assert not hook(1.5, params=params)
  assert hook(2, params=params)


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
def _first_run(workdir, width=16, seed=1):
  apply_fn, params, x, y = _setup(width=width)
  params = jax.tree.map(lambda a: a + 0.01 * (seed - 1), params)
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=workdir, every_steps=1, compute_ntk=False,
                             compute_norms=False)
  hook(0, params=params)
  hook(1, params=params)
  return os.path.join(workdir, "ntk_diag")


def test_stale_workdir_is_refused_and_left_untouched(tmp_path):
  ckpt = _first_run(str(tmp_path))
  before = _dir_bytes(ckpt)
  apply_fn2, params2, x, y = _setup(width=24)  # the model changed, the workdir was reused
  for strict in (True, False):
    hook = nd.LazyTrainingHook(apply_fn2, x, y, workdir=str(tmp_path), every_steps=1, strict=strict)
    with pytest.raises(ValueError, match="workdir.*different model.*delete"):
      hook(0, params=params2)
  assert _dir_bytes(ckpt) == before


def test_workdir_of_another_run_is_refused_resume_is_not(tmp_path):
  ckpt = _first_run(str(tmp_path))
  before = _dir_bytes(ckpt)
  apply_fn, params, x, y = _setup()
  new_seed = jax.tree.map(lambda a: a + 0.5, params)  # same model, another initialisation
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1)
  with pytest.raises(ValueError, match=r"another run.*saved at step 0.*starts at step 0.*delete"):
    hook(0, params=new_seed)
  assert _dir_bytes(ckpt) == before
  # The same run starting again from θ0 reuses it; a resume (step > 0) restores θ0.
  again = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1,
                              compute_ntk=False, compute_norms=False)
  assert again(0, params=params)
  resumed = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1,
                                compute_ntk=False, compute_norms=False)
  assert resumed(5, params=new_seed)
  jax.tree.map(np.testing.assert_array_equal, resumed.initial_params, jax.device_get(params))
  assert resumed.last.scalars["weight_change"] > 0
  assert _dir_bytes(ckpt) == before


def test_corrupted_checkpoint_is_named_and_left_untouched(tmp_path):
  ckpt = _first_run(str(tmp_path))
  for root, _, files in os.walk(ckpt):  # truncate every data file
    for name in files:
      if "manifest" in name or name.startswith("d") or name.endswith(".ocdbt"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(f.name) // 3, 1))
  before = _dir_bytes(ckpt)
  apply_fn, params, x, y = _setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1)
  with pytest.raises(ValueError, match=r"cannot be read.*truncated or corrupted.*delete .*ntk_diag/initial"):
    hook(3, params=params)
  assert _dir_bytes(ckpt) == before


def test_orbax_info_logging_is_quiet(tmp_path, caplog):
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)  # absl.app's default
  try:
    with caplog.at_level("INFO"):
      _first_run(str(tmp_path))
  finally:
    absl_logging.set_verbosity(verbosity)
  assert not [r for r in caplog.records if "orbax" in r.pathname and r.levelno < 30]


# ---------------------------------------------------------- numerical faults
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
  hook = nd.LazyTrainingHook(flaky, x, y, workdir=str(tmp_path), writer=writer, every_steps=1,
                             compute_norms=False)
  hook(0, params=params)
  original = hook._run.snapshotter
  hook._run.snapshotter = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
  with pytest.warns(RuntimeWarning, match="boom"):
    assert hook(1, params=params)
  hook._run.snapshotter = original
  hook(2, params=params)
  by_step = dict(writer.scalars)
  assert by_step[1] == {"ntk_diag/failed": 1.0}
  assert by_step[2]["ntk_diag/failed"] == 1.0 and "ntk_diag/kernel_drift" in by_step[2]

  strict = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path / "strict"), writer=writer,
                               every_steps=1, strict=True, compute_norms=False)
  strict(0, params=params)
  strict._run.snapshotter = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
  with pytest.raises(RuntimeError, match="boom"):
    strict(1, params=params)


def test_broken_writer_never_reaches_the_training_loop(tmp_path):
  apply_fn, params, x, y = _setup()

  class BrokenWriter(RecordingWriter):
    def write_scalars(self, step, scalars):
      raise OSError("disk full")

  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=BrokenWriter(), every_steps=1,
                             compute_norms=False)
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
    hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=sys.argv[1], every_steps=1, compute_norms=False)
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
  assert set(seen) <= set(logged["ntk_diag/kernel_drift"])
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
