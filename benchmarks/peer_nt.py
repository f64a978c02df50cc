"""neural-tangents reference timings on the NTK benchmark problem (run in `.venv-peer`).

    make bench-peer                         # creates .venv-peer, runs this script
    .venv-peer/bin/python benchmarks/peer_nt.py [--quick]

Times ``neural_tangents.empirical_ntk_fn`` implementations 1
(JACOBIAN_CONTRACTION), 2 (NTK_VECTOR_PRODUCTS) and 3 (STRUCTURED_DERIVATIVES)
on the MLP 64-512-512-10 of :mod:`_timing` (same weights and inputs as
``benchmarks/run.py``, built from NumPy), full ``(n, n, 10, 10)`` and traced
kernels, ``vmap_axes=0``, each call ``jax.jit``-ed. Writes
``benchmarks/peer_results.json`` with the medians and ``K[:8, :8]`` of each
kernel for a cross-check. NT's ``trace_axes=(-1,)`` is the MEAN over outputs;
the saved traced block is multiplied by ``k`` to match ntk_diag's SUM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

IMPLEMENTATIONS = {1: "nt_jacobian", 2: "nt_ntk_vp", 3: "nt_structured"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="n=64, fewer repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--impls", default="1,2,3",
                      help="implementations to time; others are kept from an existing --out file")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "peer_results.json"))
  args = parser.parse_args()
  import neural_tangents as nt

  n = 64 if args.quick else _timing.NTK_POINTS
  repeats = args.repeats or (3 if args.quick else 5)
  x_np, layers = _timing.mlp_arrays(n=n)
  model = _timing.flax_mlp()
  params = _timing.flax_params(layers)
  x = jax.numpy.asarray(x_np)
  apply_fn = lambda p, xs: model.apply({"params": p}, xs)
  k = _timing.NTK_WIDTHS[-1]
  b = _timing.CROSS_CHECK_BLOCK
  print(f"neural-tangents {nt.__version__ if hasattr(nt, '__version__') else '?'}; "
        f"{_timing.machine()}; MLP {_timing.NTK_WIDTHS}, n={n}", flush=True)

  impls = {i: IMPLEMENTATIONS[i] for i in map(int, args.impls.split(","))}
  results = {"kernels": {}}
  if len(impls) < len(IMPLEMENTATIONS) and os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
    if results.get("n") != n:
      results = {"kernels": {}}
  results.update({"date": datetime.date.today().isoformat(), "machine": _timing.machine(),
                  "n": n, "widths": list(_timing.NTK_WIDTHS), "repeats": repeats})
  for traced in (False, True):
    label = "traced" if traced else "full"
    fns = {}
    for impl, name in impls.items():
      ntk_fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,) if traced else (),
                                   vmap_axes=0, implementation=impl)
      jitted = jax.jit(lambda p, xs, f=ntk_fn: f(xs, None, p))
      fns[name] = lambda f=jitted: f(params, x)
    # The slow baselines take tens of seconds per call at n=256: cap their runs.
    timed = _timing.time_interleaved(
        fns, repeats=repeats, max_repeats={"nt_jacobian": 2, "nt_ntk_vp": 2},
        max_seconds=60.0)
    for name, entry in timed.items():
      kernel = np.asarray(entry["result"])
      if traced:
        kernel = kernel * k  # NT's traced kernel is the mean over outputs; ours the sum
      results["kernels"].setdefault(label, {})[name] = {
          "median_s": entry["median"], "times_s": entry["times"], "compile_s": entry["compile"],
          "shape": list(kernel.shape), "fro_norm": float(np.linalg.norm(kernel)),
          "block": kernel[:b, :b].tolist()}
      print(f"{label:6s} {name:14s} {entry['median']:9.4f} s  (runs {len(entry['times'])}, "
            f"compile {entry['compile']:.1f} s)", flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
