"""A snapshot next to its core: the pieces of one snapshot, timed side by side.

    python benchmarks/snapshot_core.py [--model mlp,cnn] [--repeats N]

Models (both built from NumPy seeds):

* ``mlp`` — MLP 784-512-512-10 (669,706 params), 256 probe points, training
  step at batch 128 (the hook benchmark's problem).
* ``cnn`` — Linen CNN on 28×28×1 inputs: Conv(16, 3×3) → relu → avg-pool 2 →
  Conv(32, 3×3) → relu → avg-pool 2 → Dense(512) → relu → Dense(10)
  (813,258 params), 32 probe points, training step at batch 64.

Pieces, each jitted alone with every input an argument (nothing constant-folded),
timed interleaved in one process (:mod:`_timing`), with the compile time of each
(``jax.jit(fn).lower(...).compile()``) measured separately:

* the core: the output-traced ``empirical_ntk`` of all probe points;
* the full compiled snapshot as the hook runs it (``snapshot.Snapshotter``,
  default ``SnapshotConfig``, ``norm_examples`` = 16: factored Hessian warm
  starts, per-example Jacobian norms from the NTK pass's Gram blocks, the
  sharpness warm-started and screened), after its first snapshot at θ0; its
  start-up (initial state + compile + first snapshot at θ0) is timed apart;
* the same snapshot without the sharpness (``compute_sharpness=False``, as
  ``LazyTrainingHook(..., compute_sharpness=False)`` builds it): the snapshot
  issue 15's target was set on, before the sharpness joined the norm group;
* ``jacobian_norm_core``, per example, on the first ``NORM_EXAMPLES`` (16) probes;
* ``hessian_norm_core`` on the same 16 probes × 10 outputs (power, ≤ 20
  iterations, tol 1e-3 as in ``SnapshotConfig``): cold (random start, every
  problem solved in full), and warm + screened (``hessian_screen_iters``
  iterations on every problem from the previous call's vectors, then the
  refinement) with factored vectors, as the snapshot does after its first call;
* one SGD training step (the unit of the CNN target).

Targets (issue 15): MLP snapshot ≤ 3× the traced NTK; CNN snapshot ≤ 0.5 s or
≤ 10 training steps of batch 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's ntk_diag, not an installed one
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402
from ntk_diag import block_hessian  # noqa: E402
from ntk_diag import diag_state  # noqa: E402
from ntk_diag import norms as norms_lib  # noqa: E402
from ntk_diag import ntk as ntk_lib  # noqa: E402
from ntk_diag import snapshot as snapshot_lib  # noqa: E402
from ntk_diag import structured  # noqa: E402

NORM_EXAMPLES = 16
MODELS = {  # name -> (probe points, training batch)
    "mlp": (256, 128),
    "cnn": (32, 64),
}
CORE = "traced empirical_ntk, all probes (the core)"
SNAPSHOT = "full snapshot (Snapshotter, as the hook runs it)"
NO_SHARPNESS = "snapshot without the sharpness (compute_sharpness=False)"
TRAIN = "train step"


def cnn_module():
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
      x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
      x = nn.relu(nn.Dense(512)(x.reshape(x.shape[0], -1)))
      return nn.Dense(10)(x)

  return CNN()


def problem(name: str, seed: int = 0):
  """``(apply_fn, params, pool_x, pool_labels, probe_x, probe_y)``."""
  rng = np.random.RandomState(seed)
  n_probe, _ = MODELS[name]
  if name == "mlp":
    module = _timing.flax_mlp((784, 512, 512, 10))
    pool = rng.standard_normal((4096, 784)).astype(np.float32)
  else:
    module = cnn_module()
    pool = rng.standard_normal((4096, 28, 28, 1)).astype(np.float32)
  teacher = rng.standard_normal((int(np.prod(pool.shape[1:])), 10)).astype(np.float32)
  labels = np.argmax(pool.reshape(len(pool), -1) @ teacher, axis=1)
  variables = module.init(jax.random.PRNGKey(seed), pool[:1])
  apply_fn, params = nd.from_linen(module, variables)
  probe_x = jnp.asarray(pool[:n_probe])
  probe_y = jax.nn.one_hot(labels[:n_probe], 10)
  return apply_fn, params, jnp.asarray(pool), jnp.asarray(labels), probe_x, probe_y


def snapshotter(apply_fn, params0, probe_x, probe_y, cfg, compute_sharpness=True):
  """``(Snapshotter, state after the first snapshot at θ0)``, built as the hook does."""
  k = int(np.prod(probe_y.shape[1:]))
  spec = diag_state.SnapshotSpec(apply_fn=apply_fn, with_model_state=False, config=cfg,
                                 norm_examples=NORM_EXAMPLES,
                                 compute_sharpness=compute_sharpness)
  layout = diag_state.hessian_layout(spec, params0, None, probe_x)
  warm = diag_state.warm_start_fits(params0, NORM_EXAMPLES, k, cfg.warm_start_bytes,
                                    layout=layout)
  spec = dataclasses.replace(spec, warm_start=warm)
  state = diag_state.initial_state(spec, params0, None, probe_x, np.asarray(probe_y), step=0)
  snap = snapshot_lib.Snapshotter(spec, state, params0, None)
  state, _ = jax.block_until_ready(snap(state, params0, None, 0))
  return snap, state


def _compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


def run(name: str, repeats: int = 5) -> dict:
  apply_fn, params0, pool, labels, probe_x, probe_y = problem(name)
  n_probe, batch = MODELS[name]
  num_params = sum(a.size for a in jax.tree.leaves(params0))
  params1 = jax.tree.map(lambda a: a * 1.01, params0)
  cfg = diag_state.SnapshotConfig()
  x_norm = probe_x[:NORM_EXAMPLES]
  k = 10
  solver = norms_lib.SolverOptions(num_iters=cfg.num_iters, tol=cfg.tol, method=cfg.norm_method)
  screened = dataclasses.replace(solver, return_vector=True,
                                 screen_iters=cfg.hessian_screen_iters)

  def ntk_fn(p, x):
    return ntk_lib.empirical_ntk(apply_fn, p, x, trace_outputs=True)

  def jac_fn(p, x):
    return norms_lib.jacobian_norm_core(apply_fn, p, x, solver).value

  def hess_cold_fn(p, x, key):
    return norms_lib.hessian_norm_core(apply_fn, p, x, solver, key=key).value

  def hess_screened_fn(p, x, init, values):
    return norms_lib.hessian_norm_core(apply_fn, p, x, screened, init=init, init_values=values)

  from ntk_diag import sharpness as sharpness_lib

  def sharpness_fn(p, x, y, init, screen):
    # The model as the snapshot's loops see it; with the screen, its Krylov basis.
    model = structured.model_by_patches(apply_fn, p, x)
    return sharpness_lib.loss_sharpness_core(
        model, p, x, y, num_iters=cfg.num_iters, tol=cfg.tol, init=init, screen_iters=screen,
        krylov_dim=None if screen is None else cfg.sharpness_krylov_dim)

  opt, train_step = _timing.sgd_classifier_step(apply_fn, pool, labels, batch)

  key = jax.random.PRNGKey(3)
  inf_values = jnp.full((NORM_EXAMPLES, k), jnp.inf)
  layout = block_hessian.layout_or_none(apply_fn, params0, x_norm)
  if layout is not None:
    placeholder = block_hessian.zeros(layout, params0, (NORM_EXAMPLES, k))
  else:  # no Dense layer to factor: dense vectors, as the hook keeps them
    placeholder = jax.tree.map(lambda p: jax.random.normal(key, (NORM_EXAMPLES, k) + p.shape),
                               params0)
  opt_state = opt.init(params1)
  step = jnp.int32(0)

  compile_s = {
      "traced NTK": _compile_seconds(ntk_fn, params1, probe_x),
      "jacobian_norm_core": _compile_seconds(jac_fn, params1, x_norm),
      "hessian_norm_core, cold": _compile_seconds(hess_cold_fn, params1, x_norm, key),
      "hessian_norm_core, screened": _compile_seconds(
          hess_screened_fn, params1, x_norm, placeholder, inf_values),
      "train step": _compile_seconds(train_step, params1, opt_state, step),
  }
  ntk_j, jac_j, cold_j = jax.jit(ntk_fn), jax.jit(jac_fn), jax.jit(hess_cold_fn)
  screened_j, train_j = jax.jit(hess_screened_fn), jax.jit(train_step)
  previous = screened_j(params0, x_norm, placeholder, inf_values)  # "the previous snapshot"

  start = time.perf_counter()
  snap, snap_state = snapshotter(apply_fn, params0, probe_x, probe_y, cfg)
  compile_s[f"{SNAPSHOT}: initial state + compile + first snapshot at θ0"] = (
      time.perf_counter() - start)

  snap_ns, snap_ns_state = snapshotter(apply_fn, params0, probe_x, probe_y, cfg,
                                       compute_sharpness=False)

  sharp_j = jax.jit(sharpness_fn, static_argnums=4)
  sharp_prev = sharp_j(params0, probe_x, probe_y, None, None)
  sharp_warm = sharp_j(params1, probe_x, probe_y, sharp_prev.vector, cfg.sharpness_screen_iters)
  compile_s["loss_sharpness_core, screened"] = _compile_seconds(
      lambda p, x, y, v: sharpness_fn(p, x, y, v, cfg.sharpness_screen_iters),
      params1, probe_x, probe_y, sharp_prev.vector)

  pieces = {
      CORE: lambda: ntk_j(params1, probe_x),
      SNAPSHOT: lambda: snap(snap_state, params1, None, 1),
      NO_SHARPNESS: lambda: snap_ns(snap_ns_state, params1, None, 1),
      f"jacobian_norm_core per example, {NORM_EXAMPLES} probes": lambda: jac_j(params1, x_norm),
      f"hessian_norm_core {NORM_EXAMPLES}×{k}, cold (full solve)":
          lambda: cold_j(params1, x_norm, key),
      f"hessian_norm_core {NORM_EXAMPLES}×{k}, warm + screened ({cfg.hessian_screen_iters} it.)"
      + (", factored vectors" if layout is not None else ", dense vectors"):
          lambda: screened_j(params1, x_norm, previous.vector, previous.per_problem).value,
      f"loss_sharpness_core, all probes, warm (Lanczos ≤ {cfg.num_iters}, "
      f"{int(sharp_warm.iterations)} products), no screen":
          lambda: sharp_j(params1, probe_x, probe_y, sharp_prev.vector, None).value,
      f"loss_sharpness_core, same, screened ({cfg.sharpness_screen_iters} steps), as the snapshot":
          lambda: sharp_j(params1, probe_x, probe_y, sharp_prev.vector,
                          cfg.sharpness_screen_iters).value,
      TRAIN: lambda: train_j(params1, opt_state, step),
  }
  slow = {f"hessian_norm_core {NORM_EXAMPLES}×{k}, cold (full solve)": 3}
  load = os.getloadavg()[0]
  timed = _timing.time_interleaved(pieces, repeats=repeats, max_repeats=slow)
  times = {label: entry["median"] for label, entry in timed.items()}
  core, step_s, t_snap = times[CORE], times[TRAIN], times[SNAPSHOT]

  print(f"\n## {name}: {num_params} params, {n_probe} probes, norms on {NORM_EXAMPLES}; "
        f"train batch {batch}; {_timing.machine()}, load {load:.1f} → {os.getloadavg()[0]:.1f}")
  print("| piece | median | runs | × core | × train step |\n|---|---:|---:|---:|---:|")
  for label, t in times.items():
    print(f"| {label} | {1e3 * t:.1f} ms | {len(timed[label]['times'])} | {t / core:.2f}× "
          f"| {t / step_s:.1f} |")
  print(f"snapshot warm-started across snapshots: {snap.spec.warm_start}")
  print("| compile | seconds |\n|---|---:|")
  for label, t in compile_s.items():
    print(f"| {label} | {t:.2f} |")
  if name == "mlp":
    print(f"target snapshot ≤ 3× traced NTK: {t_snap / core:.2f}× -> "
          f"{'holds' if t_snap <= 3 * core else 'MISSED'}; without the sharpness "
          f"{times[NO_SHARPNESS] / core:.2f}×, the sharpness's share "
          f"{(t_snap - times[NO_SHARPNESS]) / core:.2f}× the core")
  else:
    print(f"target snapshot ≤ 0.5 s or ≤ 10 train steps: {t_snap:.3f} s "
          f"= {t_snap / step_s:.1f} steps -> "
          f"{'holds' if t_snap <= 0.5 or t_snap <= 10 * step_s else 'MISSED'}")
  return {"times": times, "compile": compile_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mlp,cnn")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  for name in args.model.split(","):
    run(name, args.repeats)


if __name__ == "__main__":
  main()
