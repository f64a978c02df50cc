"""LazyTrainingHook: every logged scalar against float64 dense references.

Each snapshot's scalars are recomputed here from dense Jacobians
(``jax.jacrev`` on ravelled parameters) and dense Hessians (``jax.hessian``)
of the same parameters, in float64 NumPy (``tests/reference.py``); nothing is
compared with the package's own functions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

import ntk_diag as nd
from events import RecordingWriter, read_scalars
from ntk_diag import snapshot as snapshot_lib
from ntk_diag.diag_state import SnapshotConfig
from reference import dense_hessians
from reference import dense_jacobian
from reference import hessian_spectral_norms
from reference import kernel_scalars
from reference import loss_gradient

CONTRACT_TAGS = ("kappa", "jacobian_norm", "hessian_norm", "residual_norm", "kernel_drift",
                 "kernel_distance", "kernel_alignment", "weight_change", "twin_gap")
# Lanczos to 1e-6: the norm tags are exact to float32 rounding.
EXACT = SnapshotConfig(norm_method="lanczos", num_iters=80, tol=1e-6)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(12, name="hidden")(x))
    return nn.Dense(3, name="head")(x)


def _problem(n=8, d=5, k=3, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, d))
  y = jax.nn.one_hot(jnp.arange(n) % k, k)
  model = MLP()
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(seed + 1), x))
  return apply_fn, params, x, y


LEARNING_RATE = 0.2


def _train(apply_fn, params, x, y, hook, steps, *, twin_of=None, lr=LEARNING_RATE):
  """SGD on the summed squared loss; ``saved[step] = (params, twin_params)`` at snapshots."""
  grad = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((apply_fn(p, x) - y) ** 2)))
  saved = {}
  for step in range(steps):
    twin = None if twin_of is None else twin_of(params)
    if hook(step, params=params, twin_params=twin):
      saved[step] = jax.device_get((params, twin))
    params = jax.tree.map(lambda p, g: p - lr * g, params, grad(params))
  return saved


def reference_scalars(apply_fn, params, theta0, x, y, *, m, prev, twin=None):
  """Every scalar of one snapshot, float64, from dense derivatives (mse loss).

  ``prev = (kernel, step delta)`` of the previous snapshot (kernel ``None``: this one).
  """
  flat, unravel = ravel_pytree(params)
  flat0 = ravel_pytree(theta0)[0]
  flat, flat0 = np.asarray(flat, np.float64), np.asarray(flat0, np.float64)
  jac, jac0 = dense_jacobian(apply_fn, params, x), dense_jacobian(apply_fn, theta0, x)
  kernel = np.einsum("iap,jap->ij", jac, jac)
  kernel0 = np.einsum("iap,jap->ij", jac0, jac0)
  out = kernel_scalars(kernel, kernel0, y)
  prev_kernel, delta = prev
  prev_kernel = kernel if prev_kernel is None else prev_kernel
  out["kernel_velocity"] = np.linalg.norm(kernel - prev_kernel) / (np.linalg.norm(kernel0) * delta)
  f = np.asarray(apply_fn(params, x), np.float64)
  f0 = np.asarray(apply_fn(theta0, x), np.float64)
  out["residual_norm"] = np.linalg.norm(loss_gradient("mse", f[:m], y[:m]))
  out["jacobian_norm"] = max(np.linalg.svd(jac[i], compute_uv=False)[0] for i in range(m))
  hessians = dense_hessians(apply_fn, params, x[:m])  # (m, k, P, P)
  out["hessian_norm"] = hessian_spectral_norms(hessians).max()
  # Hessian of the mean loss ½‖f − y‖² over all n points: Gauss–Newton + residual term.
  n = f.shape[0]
  residual = f - np.asarray(y, np.float64)
  loss_hessian = (np.einsum("iap,iaq->pq", jac, jac)
                  + np.einsum("ia,iapq->pq", residual, dense_hessians(apply_fn, params, x))) / n
  out["sharpness"] = np.linalg.eigvalsh(loss_hessian)[-1]
  out["sharpness_lr"] = LEARNING_RATE * out["sharpness"]
  out["kappa"] = out["hessian_norm"] * out["residual_norm"] / out["jacobian_norm"] ** 2
  sigma_min = np.linalg.svd(jac0[:m].reshape(-1, jac0.shape[-1]), compute_uv=False)[-1]
  hessian0 = hessian_spectral_norms(dense_hessians(apply_fn, theta0, x[:m])).max()
  out["lazy_radius"] = sigma_min / (2 * hessian0)
  moved = np.linalg.norm(flat - flat0)
  out["lazy_radius_ratio"] = moved / out["lazy_radius"]
  out["weight_change"] = moved / np.linalg.norm(flat0)
  for layer in params:
    a = np.asarray(ravel_pytree(params[layer])[0], np.float64)
    b = np.asarray(ravel_pytree(theta0[layer])[0], np.float64)
    out[f"weight_change/{layer}"] = np.linalg.norm(a - b) / np.linalg.norm(b)
  linear = lambda q: f0 + np.einsum("iap,p->ia", jac0, q - flat0)
  function_moved = np.linalg.norm(f - f0)
  out["twin_gap"] = np.linalg.norm(f - linear(flat)) / function_moved if function_moved else 0.0
  if twin is not None and moved:
    flat_twin = np.asarray(ravel_pytree(twin)[0], np.float64)
    out["twin_distance"] = np.linalg.norm(f - linear(flat_twin)) / function_moved
    out["twin_param_distance"] = np.linalg.norm(flat - flat_twin) / moved
  return out, kernel


# Measured worst relative errors (float32 snapshot vs float64 reference, this
# test, 2026-11-29) in the comments; bounds are ~100× those.
TOLERANCES = {
    "ntk_trace": 1e-5,             # 8.9e-8
    "ntk_eig_max": 1e-5,           # 4.4e-8
    "kernel_drift": 1e-5,          # 8.7e-8
    "kernel_velocity": 1e-5,       # 1.3e-7
    "kernel_alignment": 1e-5,      # 9.8e-8
    "residual_norm": 5e-6,         # 3.7e-8
    "jacobian_norm": 1e-6,         # 1.3e-8
    "hessian_norm": 5e-5,          # 3.8e-7 (Lanczos, tol 1e-6)
    "sharpness": 5e-5,             # 2.7e-7 (Lanczos, tol 1e-6)
    "sharpness_lr": 5e-5,          # 2.5e-7
    "kappa": 5e-5,                 # 3.8e-7
    "lazy_radius": 5e-5,           # 4.0e-7
    "lazy_radius_ratio": 5e-5,     # 4.3e-7
    "weight_change": 2e-5,         # 2.3e-7
    "twin_gap": 1e-5,              # 1.3e-7
    "twin_distance": 1e-5,         # 1.0e-7
    "twin_param_distance": 1e-6,   # 1.1e-8
}


def _check(logged, expected, step):
  for name, value in expected.items():
    if name == "eigenvalues":
      continue
    tol = TOLERANCES.get(name.split("/")[0], 1e-5)
    if name == "ntk_eig_min":  # rounding relative to λ_max: 1.6e-8 measured
      assert abs(logged[name] - value) <= 1e-6 * expected["ntk_eig_max"], (step, name)
    elif name == "ntk_condition_number":  # λ_max / λ_min amplifies λ_min's rounding: 1.5e-6
      assert logged[name] == pytest.approx(value, rel=1e-4), (step, name)
    elif name == "kernel_distance":  # 1 − cosine of nearby kernels, absolute: 7.0e-8
      assert abs(logged[name] - value) <= 2e-6, (step, name)
    else:
      assert logged[name] == pytest.approx(value, rel=tol, abs=1e-7), (step, name, logged[name], value)


def test_every_logged_scalar_at_uneven_steps_matches_dense_float64(tmp_path):
  apply_fn, params, x, y = _problem()
  m = 4  # the norm tags use the first 4 of 8 probe points
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), on_steps=[0, 3, 10, 11],
                             norm_examples=m, config=EXACT, strict=True,
                             learning_rate=LEARNING_RATE)
  # A twin a little behind the network: (θ0 + θ)/2.
  saved = _train(apply_fn, params, x, y, hook, 12,
                 twin_of=lambda p: jax.tree.map(lambda a, b: 0.5 * (a + b), p, params))
  assert sorted(saved) == [0, 3, 10, 11]
  logged = read_scalars(tmp_path)
  theta0 = nd.load_initial_params(str(tmp_path), like=params)
  jax.tree.map(np.testing.assert_array_equal, theta0, jax.device_get(params))
  expected_tags = set()
  prev_kernel, prev_step = None, 0
  for step, (p, twin) in sorted(saved.items()):
    expected, kernel = reference_scalars(
        apply_fn, p, theta0, x, y, m=m, twin=twin,
        prev=(prev_kernel, max(step - prev_step, 1)))
    at_step = {tag[len("ntk_diag/"):]: values[step] for tag, values in logged.items()
               if step in values}
    if step == 0:
      expected["twin_distance"] = expected["twin_param_distance"] = 0.0
      expected["kernel_velocity"] = 0.0
    _check(at_step, expected, step)
    assert at_step["nonfinite"] == 0.0 and at_step["failed"] == 0.0
    expected_tags |= set(expected) - {"eigenvalues"}
    prev_kernel, prev_step = kernel, step
  # Nothing logged without a reference, and every contract tag is there.
  assert {t[len("ntk_diag/"):] for t in logged} == expected_tags | {"nonfinite", "failed"}
  assert set(CONTRACT_TAGS) <= expected_tags
  np.testing.assert_allclose(hook.last.eigenvalues, expected["eigenvalues"],
                             rtol=0, atol=1e-5 * expected["ntk_eig_max"])
  assert hook.last.step == 11


def test_without_the_sharpness_every_other_scalar_matches_dense_float64(tmp_path):
  apply_fn, params, x, y = _problem()
  m = 4
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), on_steps=[0, 3],
                             norm_examples=m, config=EXACT, strict=True,
                             learning_rate=LEARNING_RATE, compute_sharpness=False)
  saved = _train(apply_fn, params, x, y, hook, 4)
  logged = read_scalars(tmp_path)
  prev_kernel = None
  for step, (p, _) in sorted(saved.items()):
    expected, prev_kernel = reference_scalars(apply_fn, p, params, x, y, m=m,
                                              prev=(prev_kernel, max(step, 1)))
    del expected["sharpness"], expected["sharpness_lr"]
    if step == 0:
      expected["kernel_velocity"] = 0.0
    at_step = {tag[len("ntk_diag/"):]: values[step] for tag, values in logged.items()
               if step in values}
    _check(at_step, expected, step)
    assert set(at_step) == set(expected) - {"eigenvalues"} | {"nonfinite", "failed"}


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (3, 3))(x))
    return nn.Dense(2)(h.reshape(h.shape[0], -1))


def test_cnn_snapshot_matches_dense_float64(tmp_path):
  # The solvers' loops run the CNN with its convolutions as products on
  # patches (structured.model_by_patches): the sharpness, and every other
  # scalar, still match the float64 Hessians of the model itself.
  x = jax.random.normal(jax.random.key(3), (6, 5, 5, 1))
  y = jax.nn.one_hot(jnp.arange(6) % 2, 2)
  model = TinyCNN()
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(4), x))
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), on_steps=[0, 3],
                             norm_examples=3, config=EXACT, strict=True, compute_twin=False,
                             learning_rate=LEARNING_RATE)
  saved = _train(apply_fn, params, x, y, hook, 4)
  logged = read_scalars(tmp_path)
  theta0 = nd.load_initial_params(str(tmp_path), like=params)
  prev_kernel, prev_step = None, 0
  for step, (p, _) in sorted(saved.items()):
    expected, kernel = reference_scalars(apply_fn, p, theta0, x, y, m=3,
                                         prev=(prev_kernel, max(step - prev_step, 1)))
    for name in ("twin_gap", "kernel_velocity") if step == 0 else ("twin_gap",):
      expected.pop(name)
    at_step = {tag[len("ntk_diag/"):]: values[step] for tag, values in logged.items()
               if step in values}
    _check(at_step, expected, step)
    prev_kernel, prev_step = kernel, step
  assert sorted(saved) == [0, 3]


def test_screened_default_norms_within_two_percent_of_dense(tmp_path):
  # The defaults: power iteration, 20 iterations at tol 1e-3, a screened
  # Hessian, norms over the first 16 of 20 probe points.
  apply_fn, params, x, y = _problem(n=20)
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=6, strict=True)
  saved = _train(apply_fn, params, x, y, hook, 13)
  theta0 = nd.load_initial_params(str(tmp_path), like=params)
  logged = read_scalars(tmp_path)
  for step, (p, _) in saved.items():
    expected, _ = reference_scalars(apply_fn, p, theta0, x, y, m=16, prev=(None, 1))
    for name in ("jacobian_norm", "hessian_norm", "residual_norm", "kappa", "lazy_radius"):
      assert logged["ntk_diag/" + name][step] == pytest.approx(expected[name], rel=0.02), (step, name)


def test_twin_tags_only_with_twin_params(tmp_path):
  apply_fn, params, x, y = _problem()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=2,
                             compute_norms=False, log_images=False)
  _train(apply_fn, params, x, y, hook, 3)
  logged = read_scalars(tmp_path)
  assert "ntk_diag/twin_gap" in logged and "ntk_diag/twin_distance" not in logged
  assert "ntk_diag/kappa" not in logged and "ntk_diag/lazy_radius" not in logged


def test_custom_writer_gets_histograms_images_and_flush(tmp_path):
  apply_fn, params, x, y = _problem()
  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=writer, every_steps=2,
                             compute_norms=False)
  for step in range(3):
    hook(step, params=params)
  assert [s for s, _ in writer.scalars] == [0, 2]
  assert writer.flushes == 2
  jac = dense_jacobian(apply_fn, params, x)
  kernel = np.einsum("iap,jap->ij", jac, jac)
  eig = writer.histograms[0][1]["ntk_diag/ntk_eigenvalues"]
  np.testing.assert_allclose(eig, np.linalg.eigvalsh(kernel)[::-1], rtol=0,
                             atol=1e-5 * np.abs(kernel).max())
  image = writer.images[0][1]["ntk_diag/ntk_heatmap"]
  assert image.shape == (1, 8, 8, 3) and image.dtype == np.uint8
  assert writer.images[0][1]["ntk_diag/ntk_spectrum"].ndim == 4
  assert [s for s, _ in writer.images] == [0]  # images_every=10 snapshots by default


def test_overhead_budget_defers_snapshots_with_a_fake_clock(tmp_path, monkeypatch):
  apply_fn, params, x, y = _problem()
  clock = {"t": 0.0}
  original = snapshot_lib.Snapshotter.__call__

  def slow_snapshot(self, *args, **kwargs):  # every snapshot "takes" 1 s
    clock["t"] += 1.0
    return original(self, *args, **kwargs)

  monkeypatch.setattr(snapshot_lib.Snapshotter, "__call__", slow_snapshot)
  writer = RecordingWriter()
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), writer=writer,
                             every_steps=10, max_overhead=0.05, compute_norms=False,
                             log_images=False, clock=lambda: clock["t"])
  taken = []
  for step in range(2001):
    if hook(step, params=params):
      taken.append(step)
    clock["t"] += 0.1  # a training step
  overheads = [s["ntk_diag/overhead"] for _, s in writer.scalars]
  # 200 s of training at ≤ 5 % leaves time for ~10 snapshots of 1 s, not the 200 due.
  assert taken[0] == 0 and 8 <= len(taken) <= 12, taken
  assert max(overheads) <= 0.05 + 1e-9 and overheads[-1] > 0.045, overheads
  # A deferred snapshot is taken at the first step where it fits, whatever its remainder.
  assert any(step % 10 for step in taken)


def test_kernel_distance_infinite_against_neural_tangents(tmp_path):
  # The width-64 network whose limit neural-tangents computed in tests/data
  # (case mlp_relu_depth2: Dense(1.5, 0.2), Relu, Dense(1.5, 0.2), Relu, Dense(1, 0.1)).
  import os
  import ntk_diag.infinite as inf
  data = np.load(os.path.join(os.path.dirname(__file__), "data", "infinite_reference.npz"))
  x = jnp.asarray(data["mlp_relu_depth2/x1"], jnp.float32)
  limit = np.asarray(data["mlp_relu_depth2/ntk"], np.float64)
  model = nn.Sequential([inf.NTKDense(64, W_std=1.5, b_std=0.2), nn.relu,
                         inf.NTKDense(64, W_std=1.5, b_std=0.2), nn.relu,
                         inf.NTKDense(2, W_std=1.0, b_std=0.1)])
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(3), x))
  net = inf.from_linen(model)
  y = jnp.zeros((x.shape[0], 2))
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=2, infinite=net,
                             compute_norms=False, log_images=False, strict=True)
  saved = _train(apply_fn, params, x, y + 1.0, hook, 3, lr=0.05)
  logged = read_scalars(tmp_path)["ntk_diag/kernel_distance_infinite"]
  for step, (p, _) in saved.items():
    jac = dense_jacobian(apply_fn, p, x)
    per_output = np.einsum("iap,jap->ij", jac, jac) / 2
    expected = np.linalg.norm(per_output - limit) / np.linalg.norm(limit)
    assert 0.02 < expected < 0.5  # width 64: near the limit, not at it
    assert logged[step] == pytest.approx(expected, rel=1e-5), step  # 1.4e-7 measured
  with pytest.raises(TypeError, match="infinite"):
    nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), infinite=model)
