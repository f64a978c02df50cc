"""LazyTrainingHook in real training loops, checked against the functional API."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import ntk_diag as nd
from events import read_scalars
from ntk_diag.snapshot import SnapshotConfig

CONTRACT_TAGS = ("kappa", "jacobian_norm", "hessian_norm", "residual_norm", "kernel_drift",
                 "kernel_distance", "kernel_alignment", "weight_change", "twin_gap")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(32)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(3)(x)


def _data(n=12, d=5, k=3):
  x = jax.random.normal(jax.random.key(0), (n, d))
  y = jax.nn.one_hot(jnp.arange(n) % k, k)
  return x, y


def _linen_setup():
  x, y = _data()
  model = MLP()
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(1), x))
  return apply_fn, params, x, y


def _train_linen(apply_fn, params, x, y, hook, steps, start=0, lr=0.05):
  state = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.sgd(lr))

  @jax.jit
  def train_step(state):
    grads = jax.grad(lambda p: 0.5 * jnp.sum((apply_fn(p, x) - y) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  saved = {}
  for step in range(start, start + steps):
    if hook(step, params=state.params):
      saved[step] = jax.device_get(state.params)
    state = train_step(state)
  return state, saved


CONFIG = SnapshotConfig(num_iters=60, tol=1e-5, hessian_examples=None, ntk_trace_outputs=False)


def test_linen_loop_logs_contract_tags_matching_functional_api(tmp_path):
  apply_fn, params, x, y = _linen_setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=5, config=CONFIG)
  _, saved = _train_linen(apply_fn, params, x, y, hook, steps=11)
  assert sorted(saved) == [0, 5, 10]
  logged = read_scalars(tmp_path)
  for tag in CONTRACT_TAGS:
    values = logged["ntk_diag/" + tag]
    assert sorted(values) == [0, 5, 10], tag
    assert all(np.isfinite(v) for v in values.values()), tag
  theta0 = nd.load_initial_params(str(tmp_path), like=params)
  for step, p in saved.items():
    report = nd.lazy_ratio(apply_fn, p, x, y, method="lanczos")
    assert logged["ntk_diag/kappa"][step] == pytest.approx(float(report.kappa), rel=0.05)
    assert logged["ntk_diag/residual_norm"][step] == pytest.approx(float(report.residual_norm), rel=1e-4)
    diff = jax.flatten_util.ravel_pytree(jax.tree.map(jnp.subtract, p, theta0))[0]
    ref = float(jnp.linalg.norm(diff) / jnp.linalg.norm(jax.flatten_util.ravel_pytree(theta0)[0]))
    assert logged["ntk_diag/weight_change"][step] == pytest.approx(ref, abs=1e-3)
    K, K0 = nd.empirical_ntk(apply_fn, p, x), nd.empirical_ntk(apply_fn, theta0, x)
    drift = float(np.linalg.norm(np.asarray(K - K0)) / np.linalg.norm(np.asarray(K0)))
    assert logged["ntk_diag/kernel_drift"][step] == pytest.approx(drift, rel=1e-3, abs=1e-6)
    f, f0 = apply_fn(p, x), apply_fn(theta0, x)
    f_lin = nd.linearize(apply_fn, theta0)(p, x)
    gap = float(jnp.linalg.norm(f - f_lin) / jnp.linalg.norm(f - f0)) if step else 0.0
    assert logged["ntk_diag/twin_gap"][step] == pytest.approx(gap, rel=1e-2, abs=1e-6)
  assert logged["ntk_diag/twin_gap"][0] == 0.0
  assert logged["ntk_diag/weight_change"][0] == 0.0
  assert hook.last.step == 10
  assert hook.last.scalars["kappa"] == pytest.approx(logged["ntk_diag/kappa"][10])


def test_nnx_loop_with_model_argument(tmp_path):
  x, y = _data()

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.tanh(self.l1(x)))

  model = Net(nnx.Rngs(0))
  apply_fn, params = nd.from_nnx(model)
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=4, config=CONFIG)
  for step in range(9):
    if hook(step, model=model):
      last_params = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))  # a copy: training updates in place
    train_step(model, optimizer)
  logged = read_scalars(tmp_path)
  assert sorted(logged["ntk_diag/kappa"]) == [0, 4, 8]
  report = nd.lazy_ratio(apply_fn, last_params, x, y, method="lanczos")
  assert logged["ntk_diag/kappa"][8] == pytest.approx(float(report.kappa), rel=0.05)
  theta0 = nd.load_initial_params(str(tmp_path), like=params)
  jax.tree.map(np.testing.assert_array_equal, theta0, jax.device_get(params))


def test_restart_restores_theta0_and_measures_from_it(tmp_path):
  apply_fn, params, x, y = _linen_setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=5, config=CONFIG)
  state, _ = _train_linen(apply_fn, params, x, y, hook, steps=6)
  theta0_bytes = [np.asarray(a).tobytes() for a in jax.tree.leaves(jax.device_get(params))]

  # A "restarted" process: new hook on the same workdir, different current params.
  moved = jax.tree.map(lambda a: a + 0.1, state.params)
  hook2 = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=5, config=CONFIG)
  assert hook2(10, params=moved)
  restored = nd.load_initial_params(str(tmp_path), like=params)
  assert [np.asarray(a).tobytes() for a in jax.tree.leaves(restored)] == theta0_bytes
  assert [np.asarray(a).tobytes() for a in jax.tree.leaves(hook2.initial_params)] == theta0_bytes
  flat0 = jax.flatten_util.ravel_pytree(params)[0]
  ref = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(moved)[0] - flat0) / jnp.linalg.norm(flat0))
  assert hook2.last.scalars["weight_change"] == pytest.approx(ref, abs=1e-3)
  assert read_scalars(tmp_path)["ntk_diag/weight_change"][10] == pytest.approx(ref, abs=1e-3)
  # The first snapshot after the restart measures kernel velocity from θ0 (step 0).
  scalars = hook2.last.scalars
  assert scalars["kernel_velocity"] == pytest.approx(scalars["kernel_drift"] / 10, rel=1e-3)


def test_no_recompilation_after_first_snapshot(tmp_path):
  apply_fn, params, x, y = _linen_setup()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=1, log_images=False)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
  variants = [jax.tree.map(lambda a: a * (1 + 0.01 * step), params) for step in range(1, 4)]
  hook(0, params=params)
  compiles.clear()
  for step, p in enumerate(variants, start=1):
    assert hook(step, params=p)
  assert compiles == []


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


def test_custom_writer_gets_histograms_images_and_flush(tmp_path):
  apply_fn, params, x, y = _linen_setup()
  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=writer, every_steps=2)
  for step in range(3):
    hook(step, params=params)
  assert [s for s, _ in writer.scalars] == [0, 2]
  assert writer.flushes == 2
  eig = writer.histograms[0][1]["ntk_diag/ntk_eigenvalues"]
  ref = np.linalg.eigvalsh(np.asarray(nd.empirical_ntk(apply_fn, params, x, trace_outputs=True)))
  np.testing.assert_allclose(np.sort(eig), np.sort(ref), rtol=1e-3, atol=1e-3 * ref.max())
  image = writer.images[0][1]["ntk_diag/ntk_heatmap"]
  assert image.shape == (1, 12, 12, 3) and image.dtype == np.uint8
  assert writer.images[0][1]["ntk_diag/ntk_spectrum"].ndim == 4
  assert [s for s, _ in writer.images] == [0]  # images_every=10 snapshots by default


def test_on_steps_and_group_switches(tmp_path):
  apply_fn, params, x, y = _linen_setup()
  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=writer, on_steps=[1],
                             compute_norms=False, compute_ntk=False, log_images=False)
  assert not hook(0, params=params)
  assert hook(1, params=params)
  tags = writer.scalars[0][1]
  assert "ntk_diag/kappa" not in tags and "ntk_diag/kernel_drift" not in tags
  assert tags["ntk_diag/twin_gap"] == 0.0
