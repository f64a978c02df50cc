"""Peak memory of `empirical_ntk(batch_size=None)` on a ~10⁷-parameter model.

    python benchmarks/memory.py                       # MLP 1024-3000-2000-10, 1024 points
    python benchmarks/memory.py --n 256 --cases structured-traced

Each case runs in a fresh subprocess (so peaks do not mix), which reports its
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), wall time (compile
included), the block size ``empirical_ntk`` chose and the memory budget it used.
Not a test: it takes a minute or two per case on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {  # name -> (method, trace_outputs)
    "structured-full": ("structured", False),
    "structured-traced": ("structured", True),
    "auto-full": ("auto", False),
}


def child(widths, n, method, traced):
  import resource

  import jax
  import numpy as np

  sys.path.insert(0, HERE)
  import _timing
  import ntk_diag as nd
  from ntk_diag import _memory, ntk

  x_np, layers = _timing.mlp_arrays(widths=widths, n=n, seed=0)
  apply_fn, params = nd.from_linen(_timing.flax_mlp(widths), {"params": _timing.flax_params(layers)})
  x = jax.numpy.asarray(x_np)
  del x_np, layers
  num_params = sum(a.size for a in jax.tree.leaves(params))
  chosen = {}
  original = ntk._ntk_jit

  def spy(*args, **kwargs):  # records the block size empirical_ntk chose
    chosen.update(method=kwargs["method"], batch_size=kwargs["batch_size"])
    return original(*args, **kwargs)

  ntk._ntk_jit = spy
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  kernel = nd.empirical_ntk(apply_fn, params, x, method=method, trace_outputs=traced)
  kernel.block_until_ready()
  wall = time.perf_counter() - start
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({
      "params": int(num_params), "n": n, "method": method, "resolved_method": chosen.get("method"),
      "traced": traced, "shape": list(kernel.shape), "batch_size": chosen.get("batch_size"),
      "budget_gib": _memory.default_budget_bytes() / 2**30,
      "kernel_gib": kernel.size * kernel.dtype.itemsize / 2**30,
      "finite": bool(np.isfinite(np.asarray(kernel)).all()),
      "wall_s": wall, "rss_before_setup_gib": rss_before / 2**20, "peak_rss_gib": peak_kib / 2**20}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="1024,3000,2000,10")
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--cases", default="structured-traced,structured-full")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  widths = tuple(int(w) for w in args.widths.split(","))
  if args.child:
    method, traced = CASES[args.child]
    child(widths, args.n, method, traced)
    return
  total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  print(f"## Memory: MLP {'-'.join(map(str, widths))}, n={args.n}, machine RAM {total_gib:.1f} GiB")
  print("| case | params | kernel | block size | budget | kernel size | peak RSS | wall (incl. compile) | ok |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---|")
  for case in args.cases.split(","):
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--widths", args.widths,
                           "--n", str(args.n)], capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
      print(f"| {case} | | | | | | | | FAILED rc={proc.returncode}: "
            f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''} |")
      continue
    r = json.loads(lines[-1])
    print(f"| {case} ({r['resolved_method']}) | {r['params']:,} | {tuple(r['shape'])} | "
          f"{r['batch_size']} | {r['budget_gib']:.1f} GiB | {r['kernel_gib']:.2f} GiB | "
          f"{r['peak_rss_gib']:.2f} GiB | {r['wall_s']:.1f} s | "
          f"{'yes' if r['finite'] and r['peak_rss_gib'] < total_gib else 'NO'} |", flush=True)


if __name__ == "__main__":
  main()
