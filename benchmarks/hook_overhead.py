"""Wall-time overhead of `LazyTrainingHook` on a training loop, and where a snapshot's time goes.

    python benchmarks/hook_overhead.py [--quick] [--repeats N] [--groups ntk,norms,twin]

MLP 784-512-512-10 (669k params), SGD (lr 0.05), batch 128, softmax
cross-entropy on synthetic data (Gaussian inputs, labels of a random linear
teacher). One snapshot per 100 steps on 256 probe points, the hook's defaults
(all groups: NTK, norms, twin; default :class:`ntk_diag.snapshot.SnapshotConfig`;
default CLU writer into a temporary workdir, TensorBoard events, images every
10th snapshot). ``--groups`` switches groups off (e.g. ``--groups ntk,twin``).

Measured, all in one process:

1. loop: segments of ``steps`` training steps without the hook and with it
   (one snapshot per 100 steps), interleaved, medians; the hook is started
   (θ0 checkpoint, K0, compile) once before timing and reported separately.
2. one snapshot, three ways (interleaved medians): the compiled snapshot
   function alone (``block_until_ready``, no transfer), ``SnapshotEngine.run``
   (+ host transfer, ``float()`` of the scalars), and the full hook call
   (+ writing and flushing the CLU writer; no images), plus the writer alone
   without and with the images.
3. snapshot cost by group (``SnapshotEngine.run`` with one group on).
4. profile of the pieces of a snapshot, each jitted alone: traced structured
   NTK, ``kernel_stats`` (eigvalsh 256×256), ``jacobian_norm`` from the NTK
   diagonal blocks, ``hessian_norm`` (power, first 4 probes × 10 outputs,
   ≤ 20 iterations, warm-started; every problem solved in full, and screened
   then refined as the hook does), twin JVP, forward pass.
5. overhead at every_steps = 100, 500, 1000 **computed** from the measured
   per-snapshot cost in the loop and the measured step time (not a loop run
   per interval).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402
from ntk_diag import norms as norms_lib  # noqa: E402
from ntk_diag import ntk as ntk_lib  # noqa: E402
from ntk_diag import snapshot as snapshot_lib  # noqa: E402
from ntk_diag import tb_logging  # noqa: E402
from ntk_diag.kernel_stats import kernel_stats  # noqa: E402
from ntk_diag.linearize import linearize  # noqa: E402

WIDTHS = (784, 512, 512, 10)
BATCH = 128
PROBES = 256
EVERY = 100
EVERY_TABLE = (100, 500, 1000)
ALL_GROUPS = ("ntk", "norms", "twin")


def _problem(seed=0):
  rng = np.random.RandomState(seed)
  pool = rng.standard_normal((8192, WIDTHS[0])).astype(np.float32)
  teacher = rng.standard_normal((WIDTHS[0], WIDTHS[-1])).astype(np.float32)
  labels = np.argmax(pool @ teacher, axis=1)
  model = _timing.flax_mlp(WIDTHS)
  variables = model.init(jax.random.PRNGKey(seed), pool[:1])
  apply_fn, params = nd.from_linen(model, variables)
  probe_x = jnp.asarray(pool[:PROBES])
  probe_y = jax.nn.one_hot(labels[:PROBES], WIDTHS[-1])
  return apply_fn, params, jnp.asarray(pool), jnp.asarray(labels), probe_x, probe_y


def _ms(seconds: float) -> str:
  return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def profile_pieces(apply_fn, params0, params1, probe_x, probe_y, repeats: int) -> dict:
  """The pieces of one snapshot with the default SnapshotConfig, each jitted alone
  (probe inputs passed as arguments, so nothing is constant-folded)."""
  cfg = snapshot_lib.SnapshotConfig()
  n_hess = cfg.hessian_examples
  ntk_fn = jax.jit(lambda p, x: ntk_lib.empirical_ntk(
      apply_fn, p, x, trace_outputs=cfg.ntk_trace_outputs, method=cfg.ntk_method,
      batch_size=cfg.ntk_batch_size))
  k0, kt = ntk_fn(params0, probe_x), ntk_fn(params1, probe_x)
  stats_fn = jax.jit(lambda k, k0, y: kernel_stats(k, K0=k0, y=y, top_k=k.shape[0]))
  eig_fn = jax.jit(jnp.linalg.eigvalsh)
  solver = norms_lib.SolverOptions(num_iters=cfg.num_iters, tol=cfg.tol, method=cfg.norm_method)
  warm = dataclasses.replace(solver, return_vector=True)
  screened = dataclasses.replace(warm, screen_iters=cfg.hessian_screen_iters)
  jac_fn = jax.jit(lambda p, x: norms_lib.jacobian_norm_core(apply_fn, p, x, solver).value)
  hess_fn = jax.jit(lambda p, x, init: norms_lib.hessian_norm_core(apply_fn, p, x, warm,
                                                                   init=init))
  screened_fn = jax.jit(lambda p, x, init, values: norms_lib.hessian_norm_core(
      apply_fn, p, x, screened, init=init, init_values=values))
  x_hess = probe_x[:n_hess]
  _, cold, cold_values = snapshot_lib.SnapshotEngine(
      apply_fn, params0, probe_x, probe_y, kernel0=None,
      groups=snapshot_lib.Groups(ntk=False, twin=False), config=cfg)._warm
  # Warm start as in the hook: the vectors (and, screened, the per-problem
  # values) of the previous snapshot, here at θ0.
  warm = hess_fn(params0, x_hess, cold).vector
  previous = screened_fn(params0, x_hess, cold, cold_values)
  hess_warm = hess_fn(params1, x_hess, warm)
  hess_screened = screened_fn(params1, x_hess, previous.vector, previous.per_problem)
  twin_fn = jax.jit(lambda p, p0, x: linearize(apply_fn, p0)(p, x))
  fwd_fn = jax.jit(apply_fn)
  y2 = probe_y.reshape(PROBES, -1)
  pieces = {
      "NTK, traced structured (256×256)": lambda: ntk_fn(params1, probe_x),
      "kernel_stats (eigvalsh 256×256, drift, alignment)": lambda: stats_fn(kt, k0, y2),
      "  of which eigvalsh 256×256 alone": lambda: eig_fn(kt),
      "jacobian_norm, 256 probes (10×10 NTK diagonal blocks)": lambda: jac_fn(params1, probe_x),
      f"hessian_norm, {n_hess} probes × 10 outputs, power ≤ {cfg.num_iters} it., warm":
          lambda: hess_fn(params1, x_hess, warm).value,
      f"hessian_norm, same, cold (random start)": lambda: hess_fn(params1, x_hess, cold).value,
      f"hessian_norm screened ({cfg.hessian_screen_iters} it.) + refined, warm (the hook's default)":
          lambda: screened_fn(params1, x_hess, previous.vector, previous.per_problem).value,
      f"hessian_norm screened, cold (every problem refined: the hook's first snapshot)":
          lambda: screened_fn(params1, x_hess, cold, cold_values).value,
      "twin (JVP at θ0, 256 probes)": lambda: twin_fn(params1, params0, probe_x),
      "forward pass, 256 probes": lambda: fwd_fn(params1, probe_x),
  }
  timed = _timing.time_interleaved(pieces, repeats=repeats)
  return {"times": {k: v["median"] for k, v in timed.items()},
          "hess_iterations": int(hess_warm.iterations), "hess_converged": bool(hess_warm.converged),
          "hess_full": float(hess_warm.value), "hess_screened": float(hess_screened.value)}


def run(quick: bool = False, repeats: int = 5, groups: tuple[str, ...] = ALL_GROUPS,
        profile: bool = True) -> dict:
  steps = 200 if quick else 400
  apply_fn, params0, pool, labels, probe_x, probe_y = _problem()
  num_params = sum(a.size for a in jax.tree.leaves(params0))
  opt = optax.sgd(0.05)
  flags = {g: g in groups for g in ALL_GROUPS}

  @jax.jit
  def train_step(params, opt_state, i):
    idx = (i * BATCH + jnp.arange(BATCH)) % pool.shape[0]
    xb, yb = pool[idx], labels[idx]

    def loss_fn(p):
      logits = apply_fn(p, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def segment(hook, first_step):
    params = jax.tree.map(jnp.array, params0)
    opt_state = opt.init(params)
    jax.block_until_ready(params)
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
      if hook is not None:
        hook(step, params=params)
      params, opt_state = train_step(params, opt_state, jnp.int32(step))
    jax.block_until_ready(params)
    return time.perf_counter() - start

  workdir = tempfile.mkdtemp(prefix="ntk_diag_bench_hook_")
  hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=workdir, every_steps=EVERY,
                             compute_ntk=flags["ntk"], compute_norms=flags["norms"],
                             compute_twin=flags["twin"], strict=True)
  segment(None, 0)  # compile the training step
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hook(0, params=params0)  # θ0 checkpoint, K0, snapshot compile, first snapshot
  startup = time.perf_counter() - start

  # 1. The loop, with and without the hook, interleaved.
  base, with_hook = [], []
  next_step = 1
  for _ in range(repeats):
    base.append(segment(None, next_step))
    with_hook.append(segment(hook, next_step))
    next_step += steps
  t_base, t_hook = statistics.median(base), statistics.median(with_hook)
  overhead = (t_hook - t_base) / t_base
  snapshots = steps // EVERY
  t_step = t_base / steps
  per_snapshot_loop = (t_hook - t_base) / snapshots

  # 2. One snapshot: compiled function alone / + host transfer / + writer (full hook call).
  engine = hook._engine
  params1 = jax.tree.map(lambda a: a * 1.01, params0)

  def compiled_only():
    return engine._compute(params1, engine.theta0, engine.f0, engine.kernel0, engine._prev_kernel,
                           jnp.float32(1.0), engine.probe_x, engine.probe_y, engine._warm)

  hook_steps = iter(range(10**9, 2 * 10**9, EVERY))

  def full_hook_call():  # scalars + histogram, no images (images: 1 snapshot in 10)
    # What a triggered `hook(step, params=...)` runs, minus clu's step bookkeeping
    # (which insists on consecutive steps): engine.run + tb_logging.write_snapshot.
    hook._snapshots = 1
    hook._params = params1
    try:
      hook._apply(next(hook_steps), time.time())
    finally:
      hook._params = None
    return hook.last.scalars

  result = engine.run(params1, 10**9)
  writer_steps = iter(range(2 * 10**9, 3 * 10**9))
  kernel_np = np.asarray(result.kernel)
  calls = {
      "compiled snapshot alone": compiled_only,
      "+ host transfer (SnapshotEngine.run)": lambda: engine.run(params1, 10**9).scalars,
      "+ writer: full hook call, no images": full_hook_call,
      "writer alone: scalars + histogram + flush": lambda: tb_logging.write_snapshot(
          hook._writer, next(writer_steps), result.scalars, result.eigenvalues, None),
      "writer alone: + heatmap & spectrum images": lambda: tb_logging.write_snapshot(
          hook._writer, next(writer_steps), result.scalars, result.eigenvalues, kernel_np),
  }
  if not flags["ntk"]:
    del calls["writer alone: + heatmap & spectrum images"]
  calls_t = _timing.time_interleaved(calls, repeats=repeats)
  calls_t = {k: v["median"] for k, v in calls_t.items()}
  image_cost = calls_t.get("writer alone: + heatmap & spectrum images", 0.0) - \
      calls_t["writer alone: scalars + histogram + flush"]
  per_snapshot_avg = calls_t["+ writer: full hook call, no images"] + max(image_cost, 0.0) / 10

  # 3. Snapshot cost by group.
  variants = [("all enabled groups", snapshot_lib.Groups(**flags))]
  variants += [(f"{g} only", snapshot_lib.Groups(**{h: h == g for h in ALL_GROUPS}))
               for g in ALL_GROUPS if flags[g]]
  engines = {name: snapshot_lib.SnapshotEngine(apply_fn, params0, probe_x, probe_y,
                                               kernel0=None, groups=g,
                                               config=snapshot_lib.SnapshotConfig())
             for name, g in variants}
  parts = _timing.time_interleaved(
      {name: (lambda e=e: e.run(params1, 100).scalars) for name, e in engines.items()},
      repeats=repeats)

  # 4. Pieces.
  prof = profile_pieces(apply_fn, params0, params1, probe_x, probe_y, repeats) if profile else None

  blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
  print(f"\n## Hook overhead: MLP {'-'.join(map(str, WIDTHS))} ({num_params} params), batch {BATCH}, "
        f"SGD, {PROBES} probe points, snapshot every {EVERY} steps, default SnapshotConfig, "
        f"groups {'+'.join(g for g in ALL_GROUPS if flags[g])}; {_timing.machine()}, "
        f"OPENBLAS_NUM_THREADS={blas}")
  print("\n### Loop (interleaved medians)\n| quantity | value |\n|---|---:|")
  print(f"| training step (no hook) | {1e3 * t_step:.2f} ms |")
  print(f"| {steps} steps without hook (median of {repeats}) | {t_base:.3f} s "
        f"({', '.join(f'{t:.2f}' for t in base)}) |")
  print(f"| {steps} steps with hook, {snapshots} snapshots (median of {repeats}) | {t_hook:.3f} s "
        f"({', '.join(f'{t:.2f}' for t in with_hook)}) |")
  print(f"| **overhead, every {EVERY} steps** (target ≤ 5 %) | **{100 * overhead:.1f} %** "
        f"({'holds' if overhead <= 0.05 else 'MISSED'}) |")
  print(f"| per snapshot in the loop, incl. writing | {_ms(per_snapshot_loop)} |")
  print(f"| hook start-up (θ0 checkpoint, K0, compile, first snapshot), once | {startup:.1f} s |")
  print("\n### One snapshot (interleaved medians)\n| call | time |\n|---|---:|")
  for name, t in calls_t.items():
    print(f"| {name} | {_ms(t)} |")
  print(f"| hook call averaged over the image schedule (1 in 10 with images) | {_ms(per_snapshot_avg)} |")
  print("\n### Snapshot by group (`SnapshotEngine.run`, incl. host transfer)\n| groups | time |\n|---|---:|")
  for name, entry in parts.items():
    print(f"| {name} | {_ms(entry['median'])} |")
  if prof:
    print("\n### Pieces, each jitted alone\n| piece | time |\n|---|---:|")
    for name, t in prof["times"].items():
      print(f"| {name} | {_ms(t)} |")
    print(f"hessian_norm warm start: {prof['hess_iterations']} iterations (max over the "
          f"eigenproblems), converged={prof['hess_converged']}; value full "
          f"{prof['hess_full']:.5g}, screened {prof['hess_screened']:.5g} (relative difference "
          f"{prof['hess_screened'] / prof['hess_full'] - 1:+.1e})")
  print("\n### Overhead vs every_steps — COMPUTED, not measured per interval: "
        "per-snapshot cost / (every_steps × step time)")
  print("| every_steps | from loop per-snapshot cost | from hook-call cost (images 1 in 10) |")
  print("|---:|---:|---:|")
  computed = {}
  for every in EVERY_TABLE:
    a = per_snapshot_loop / (every * t_step)
    b = per_snapshot_avg / (every * t_step)
    computed[every] = (a, b)
    print(f"| {every} | {100 * a:.1f} % | {100 * b:.1f} % |")
  budget = 0.05 * EVERY * t_step
  need = per_snapshot_loop / (0.05 * t_step)
  print(f"≤ 5 % at every {EVERY} steps needs a snapshot (incl. writing) ≤ {_ms(budget)} here; "
        f"with the measured {_ms(per_snapshot_loop)} per snapshot, ≤ 5 % needs every_steps ≥ "
        f"{int(np.ceil(need))}.")
  return {"overhead": overhead, "t_base": t_base, "t_hook": t_hook, "t_step": t_step,
          "startup": startup, "per_snapshot_loop": per_snapshot_loop, "calls": calls_t,
          "parts": {k: v["median"] for k, v in parts.items()}, "profile": prof,
          "computed": computed}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--groups", default=",".join(ALL_GROUPS),
                      help="hook groups to enable (default: all, the hook's default)")
  parser.add_argument("--no-profile", action="store_true", help="skip the per-piece profile")
  args = parser.parse_args()
  groups = tuple(g for g in args.groups.split(",") if g)
  unknown = set(groups) - set(ALL_GROUPS)
  if unknown:
    parser.error(f"unknown groups {sorted(unknown)}; choose from {ALL_GROUPS}")
  run(quick=args.quick, repeats=args.repeats, groups=groups, profile=not args.no_profile)


if __name__ == "__main__":
  main()
