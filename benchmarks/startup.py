"""The hook's start-up on a ~800k-parameter CNN: θ0 checkpoint, compile, first snapshot.

    python benchmarks/startup.py [--model cnn] [--runs 2] [--groups ntk,norms,twin]

Start-up (issue 12) is the first ``hook(step, params=...)`` call of a run:
the θ0 checkpoint (orbax), the initial snapshot state, the ahead-of-time
compile of the snapshot (``snapshot.Snapshotter``) and the first snapshot at
θ0, with the hook's defaults (every group, ``norm_examples`` = 16, default
``SnapshotConfig``, the default CLU writer into a fresh workdir). Each
measurement is a fresh process (nothing compiled is shared), after the
model's parameters are built and the imports done; the split into
compile (``Snapshotter`` construction: tracing, lowering, XLA) and first
snapshot is measured by timing those two calls inside the hook call.
The model is ``snapshot_core``'s (CNN: 813,258 params, 32 probes).
Target (issue 12): ≤ 10 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_S = 10.0


def child(model: str, groups: tuple[str, ...]) -> dict:
  import time
  import warnings
  sys.path.insert(0, HERE)
  import jax
  import snapshot_core
  import ntk_diag as nd
  from ntk_diag import snapshot as snapshot_lib
  apply_fn, params0, _, _, probe_x, probe_y = snapshot_core.problem(model)
  jax.block_until_ready((params0, probe_x))
  parts = {"compile": 0.0, "first snapshot": 0.0}
  original_init, original_call = snapshot_lib.Snapshotter.__init__, snapshot_lib.Snapshotter.__call__

  def timed_init(self, *args, **kwargs):
    start = time.perf_counter()
    original_init(self, *args, **kwargs)
    parts["compile"] += time.perf_counter() - start

  def timed_call(self, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(original_call(self, *args, **kwargs))
    parts["first snapshot"] += time.perf_counter() - start
    return out

  snapshot_lib.Snapshotter.__init__, snapshot_lib.Snapshotter.__call__ = timed_init, timed_call
  flags = {f"compute_{g}": g in groups for g in ("ntk", "norms", "twin")}
  hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=tempfile.mkdtemp(
      prefix="ntk_diag_bench_startup_"), every_steps=100, strict=True, **flags)
  load = os.getloadavg()[0]
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    hook(0, params=params0)
  total = time.perf_counter() - start
  return {"startup": total, **parts, "rest": total - sum(parts.values()), "load": load,
          "load_after": os.getloadavg()[0],
          "params": sum(a.size for a in jax.tree.leaves(params0)),
          "logged": sorted(hook.last.scalars)}


def run(model: str = "cnn", runs: int = 2, groups: tuple[str, ...] = ("ntk", "norms", "twin")
        ) -> list[dict]:
  command = [sys.executable, os.path.abspath(__file__), "--child", model,
             "--groups", ",".join(groups)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  results = []
  print(f"\n## Hook start-up, {model}, groups {'+'.join(groups)} (θ0 checkpoint + compile + "
        "first snapshot; fresh process each)")
  print("| run | start-up [s] | compile [s] | first snapshot [s] | rest [s] | load |\n"
        "|---|---:|---:|---:|---:|---:|")
  for r in range(runs):
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    results.append(res)
    print(f"| {r + 1} | {res['startup']:.1f} | {res['compile']:.1f} | {res['first snapshot']:.1f} "
          f"| {res['rest']:.1f} | {res['load']:.1f} → {res['load_after']:.1f} |")
  best = min(r["startup"] for r in results)
  print(f"{results[0]['params']} params; target start-up ≤ {TARGET_S:.0f} s: best {best:.1f} s "
        f"-> {'holds' if best <= TARGET_S else 'MISSED'}; 'sharpness' logged: "
        f"{'sharpness' in results[0]['logged']}")
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--groups", default="ntk,norms,twin")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  groups = tuple(g for g in args.groups.split(",") if g)
  if args.child:
    print(json.dumps(child(args.child, groups)))
    return
  run(args.model, args.runs, groups)


if __name__ == "__main__":
  main()
