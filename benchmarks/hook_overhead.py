"""Wall-time overhead of `LazyTrainingHook` on a training loop.

    python benchmarks/hook_overhead.py [--quick]

MLP 784-512-512-10 (669k params), SGD (lr 0.05), batch 128, softmax
cross-entropy on synthetic data (Gaussian inputs, labels of a random linear
teacher). One snapshot per 100 steps on 256 probe points, default
:class:`ntk_diag.snapshot.SnapshotConfig`, default CLU writer into a temporary
workdir (TensorBoard events and images included).

Measured: segments of ``steps`` training steps without the hook and with it
(one snapshot per 100 steps), interleaved, medians; the hook is started
(θ0 checkpoint, K0, compile) once before timing and that start-up is reported
separately. Also the cost of one snapshot by diagnostic group (NTK, norms,
twin), to tell where the time goes.
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
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402
from ntk_diag import snapshot as snapshot_lib  # noqa: E402

WIDTHS = (784, 512, 512, 10)
BATCH = 128
PROBES = 256
EVERY = 100


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


def run(quick: bool = False, repeats: int = 5, compute_norms: bool = True) -> dict:
  steps = 200 if quick else 400
  apply_fn, params0, pool, labels, probe_x, probe_y = _problem()
  num_params = sum(a.size for a in jax.tree.leaves(params0))
  opt = optax.sgd(0.05)

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
                             compute_norms=compute_norms, strict=True)
  segment(None, 0)  # compile the training step
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hook(0, params=params0)  # θ0 checkpoint, K0, snapshot compile, first snapshot
  startup = time.perf_counter() - start
  base, with_hook = [], []
  next_step = 1
  for _ in range(repeats):
    base.append(segment(None, next_step))
    with_hook.append(segment(hook, next_step))
    next_step += steps
  t_base, t_hook = statistics.median(base), statistics.median(with_hook)
  overhead = (t_hook - t_base) / t_base
  snapshots = steps // EVERY

  # Where a snapshot's time goes: one engine per group, timed interleaved.
  engines = {}
  variants = [("all", snapshot_lib.Groups(norms=compute_norms)),
              ("ntk only", snapshot_lib.Groups(ntk=True, norms=False, twin=False)),
              ("twin only", snapshot_lib.Groups(ntk=False, norms=False, twin=True))]
  if compute_norms:
    variants.append(("norms only", snapshot_lib.Groups(ntk=False, norms=True, twin=False)))
  for name, groups in variants:
    engines[name] = snapshot_lib.SnapshotEngine(apply_fn, params0, probe_x, probe_y, kernel0=None,
                                                groups=groups, config=snapshot_lib.SnapshotConfig())
  params1 = jax.tree.map(lambda a: a * 1.01, params0)
  parts = _timing.time_interleaved(
      {name: (lambda e=e: e.run(params1, 100).scalars) for name, e in engines.items()},
      repeats=repeats)
  t_step = t_base / steps

  print(f"\n## Hook overhead: MLP {'-'.join(map(str, WIDTHS))} ({num_params} params), batch {BATCH}, "
        f"SGD, {PROBES} probe points, snapshot every {EVERY} steps, default SnapshotConfig"
        f"{'' if compute_norms else ', compute_norms=False'}")
  print(f"| quantity | value |\n|---|---:|")
  print(f"| training step (no hook) | {1e3 * t_step:.1f} ms |")
  print(f"| {steps} steps without hook (median of {repeats}) | {t_base:.3f} s |")
  print(f"| {steps} steps with hook, {snapshots} snapshots (median of {repeats}) | {t_hook:.3f} s |")
  print(f"| **overhead** (target ≤ 5 %) | **{100 * overhead:.1f} %** "
        f"({'holds' if overhead <= 0.05 else 'MISSED'}) |")
  print(f"| per snapshot incl. writing (from the loop) | {(t_hook - t_base) / snapshots:.3f} s |")
  print(f"| hook start-up (θ0 checkpoint, K0, compile), once | {startup:.1f} s |")
  for name, entry in parts.items():
    print(f"| snapshot compute, {name} | {entry['median']:.3f} s |")
  budget = 0.05 * EVERY * t_step
  print(f"A ≤ 5 % overhead at one snapshot per {EVERY} steps needs a snapshot (incl. writing) "
        f"≤ {budget:.3f} s on this machine.")
  return {"overhead": overhead, "t_base": t_base, "t_hook": t_hook, "startup": startup,
          "parts": {k: v["median"] for k, v in parts.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-norms", action="store_true",
                      help="hook with compute_norms=False (NTK and twin only)")
  args = parser.parse_args()
  run(quick=args.quick, repeats=args.repeats, compute_norms=not args.no_norms)


if __name__ == "__main__":
  main()
