"""Wall-time overhead of `LazyTrainingHook` with an overhead budget on a training loop.

    python benchmarks/hook_overhead.py [--quick] [--repeats N] [--groups ntk,norms,twin]
        [--max-overhead 0.05]

MLP 784-512-512-10 (669,706 params), SGD (lr 0.05), batch 128, softmax
cross-entropy on synthetic data (Gaussian inputs, labels of a random linear
teacher), 256 probe points. The hook runs with its defaults (every group,
``norm_examples`` = 16, default ``SnapshotConfig``, the default CLU writer into
a temporary workdir, images every 10th snapshot), ``every_steps=100`` and
``max_overhead=0.05``: it defers a due snapshot while (time in snapshots after
the first) / (wall time since the first snapshot ended) would exceed 5 %.

Measured, all in one process:

1. the loop: segments of ``steps`` training steps without the hook and with
   it, interleaved (``repeats`` of each). The hooked run is one continuous
   run over its segments: its start-up (θ0 checkpoint, compile, first
   snapshot) happens once before timing and is reported apart, and its clock
   (``clock=``) is paused while the baseline segments run, so its budget sees
   only its own wall time. Reported: total hooked time / total baseline time
   (the target: ≤ 1.06× with snapshots still taken), the steps at which
   snapshots were taken, the cadence they settle at (median of the last
   three gaps: the first snapshot after the start-up waits until the cold
   start-up snapshot's cost fits the budget, then due snapshots catch up)
   and the last logged ``ntk_diag/overhead``;
2. one snapshot (the compiled ``Snapshotter`` call, as the hook makes it)
   next to one training step, interleaved medians: the cadence a 5 % budget
   allows is about snapshot / (0.05 × step) steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402

WIDTHS = (784, 512, 512, 10)
BATCH = 128
PROBES = 256
EVERY = 100
ALL_GROUPS = ("ntk", "norms", "twin")
TARGET_RATIO = 1.06


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


class PausableClock:
  """``time.monotonic`` minus the time spent paused (the baseline segments)."""

  def __init__(self):
    self._paused_total, self._paused_at = 0.0, None

  def __call__(self) -> float:
    return time.monotonic() - self._paused_total

  def pause(self) -> None:
    self._paused_at = time.monotonic()

  def resume(self) -> None:
    self._paused_total += time.monotonic() - self._paused_at
    self._paused_at = None


def run(quick: bool = False, repeats: int = 5, groups: tuple[str, ...] = ALL_GROUPS,
        max_overhead: float = 0.05, steps: int | None = None) -> dict:
  steps = steps or (500 if quick else 4000)
  apply_fn, params0, pool, labels, probe_x, probe_y = _problem()
  num_params = sum(a.size for a in jax.tree.leaves(params0))
  opt, train_step = _timing.sgd_classifier_step(apply_fn, pool, labels, BATCH)
  train_step = jax.jit(train_step)
  flags = {f"compute_{g}": g in groups for g in ALL_GROUPS}

  clock = PausableClock()
  workdir = tempfile.mkdtemp(prefix="ntk_diag_bench_hook_")
  hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=workdir, every_steps=EVERY,
                             max_overhead=max_overhead, strict=True, clock=clock, **flags)
  taken, overheads = [], []
  state = {"hooked": (jax.tree.map(jnp.array, params0), None), "step": 0}
  state["hooked"] = (state["hooked"][0], opt.init(state["hooked"][0]))

  def segment(hooked: bool):
    if hooked:
      params, opt_state = state["hooked"]
      first = state["step"]
    else:  # the same steps from θ0, without the hook
      params = jax.tree.map(jnp.array, params0)
      opt_state, first = opt.init(params), 1
    jax.block_until_ready(params)
    start = time.perf_counter()
    for step in range(first, first + steps):
      if hooked and hook(step, params=params):
        taken.append(step)
        overheads.append(hook.last.scalars.get("overhead"))
      params, opt_state = train_step(params, opt_state, jnp.int32(step))
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    if hooked:
      state["hooked"], state["step"] = (params, opt_state), first + steps
    return elapsed

  segment(False)  # compile the training step
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hook(0, params=state["hooked"][0])  # θ0 checkpoint, compile, first snapshot
  startup = time.perf_counter() - start
  taken.append(0)
  overheads.append(hook.last.scalars.get("overhead"))
  state["step"] = 1

  load_before = os.getloadavg()[0]
  base, hooked = [], []
  for _ in range(repeats):
    clock.pause()
    base.append(segment(False))
    clock.resume()
    hooked.append(segment(True))
  ratio = sum(hooked) / sum(base)
  t_step = statistics.median(base) / steps
  # The first gap after the start-up waits until the start-up snapshot's
  # (cold) cost fits the budget; snapshots then catch up at every due step
  # until the budget binds: the cadence is read from the last three gaps.
  gaps = np.diff(taken)
  cadence = float(np.median(gaps[-3:])) if len(gaps) >= 4 else float("nan")

  # 2. One snapshot as the hook makes it, next to a training step.
  run_state = hook._run
  params1 = jax.tree.map(lambda a: a * 1.01, params0)
  opt_state = opt.init(params1)
  snapshot_state = run_state.state
  calls = {
      "one snapshot (compiled Snapshotter call)": lambda: run_state.snapshotter(
          snapshot_state, params1, None, 10**6),
      "one training step": lambda: train_step(params1, opt_state, jnp.int32(0)),
  }
  timed = {k: v["median"] for k, v in _timing.time_interleaved(calls, repeats=repeats).items()}
  t_snap = timed["one snapshot (compiled Snapshotter call)"]

  print(f"\n## Hook with max_overhead={max_overhead}: MLP {'-'.join(map(str, WIDTHS))} "
        f"({num_params} params), batch {BATCH}, SGD, {PROBES} probe points, every_steps={EVERY}, "
        f"groups {'+'.join(groups)}; {_timing.machine()}, OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f}")
  print("| quantity | value |\n|---|---:|")
  print(f"| training step (no hook, median) | {1e3 * t_step:.2f} ms |")
  print(f"| {repeats} × {steps} steps without hook | {sum(base):.2f} s "
        f"({', '.join(f'{t:.2f}' for t in base)}) |")
  print(f"| {repeats} × {steps} steps with hook | {sum(hooked):.2f} s "
        f"({', '.join(f'{t:.2f}' for t in hooked)}) |")
  print(f"| **wall ratio with / without** (target ≤ {TARGET_RATIO}×) | **{ratio:.3f}×** "
        f"({'holds' if ratio <= TARGET_RATIO and len(taken) > 1 else 'MISSED'}) |")
  print(f"| snapshots taken after the start-up one | {len(taken) - 1} |")
  print(f"| settled cadence (median of the last three gaps) | every {cadence:.0f} steps |")
  print(f"| last logged ntk_diag/overhead | {overheads[-1]} |")
  print(f"| start-up (θ0 checkpoint, compile, first snapshot), once | {startup:.1f} s |")
  print(f"| one snapshot (compiled Snapshotter call) | {1e3 * t_snap:.1f} ms = "
        f"{t_snap / timed['one training step']:.0f} training steps |")
  print(f"| cadence a {max_overhead:.0%} budget allows: snapshot / ({max_overhead} × step) | "
        f"every {t_snap / (max_overhead * timed['one training step']):.0f} steps |")
  print(f"snapshot steps: {taken}; gaps: {gaps.tolist()}")
  return {"ratio": ratio, "taken": taken, "cadence": cadence, "startup": startup,
          "t_step": t_step, "t_snapshot": t_snap, "overheads": overheads}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--groups", default=",".join(ALL_GROUPS),
                      help="hook groups to enable (default: all, the hook's default)")
  parser.add_argument("--max-overhead", type=float, default=0.05)
  parser.add_argument("--steps", type=int, default=None, help="steps per segment (default 4000)")
  args = parser.parse_args()
  groups = tuple(g for g in args.groups.split(",") if g)
  unknown = set(groups) - set(ALL_GROUPS)
  if unknown:
    parser.error(f"unknown groups {sorted(unknown)}; choose from {ALL_GROUPS}")
  run(quick=args.quick, repeats=args.repeats, groups=groups, max_overhead=args.max_overhead,
      steps=args.steps)


if __name__ == "__main__":
  main()
