"""`make bench`: ntk_diag's performance ratios, measured side by side in one run.

    python benchmarks/run.py                 # everything (~10 min on 2 CPU cores)
    python benchmarks/run.py --quick         # short run: n=64 NTK, fewer iterations/steps
    python benchmarks/run.py --only ntk      # one section: ntk, norms, core, startup, hook

Sections:

* ``ntk`` — ``empirical_ntk`` methods ``structured`` / ``jacobian`` / ``ntk_vp``
  on MLP 64-512-512-10 (301k params), 256 points, full ``(256, 256, 10, 10)``
  and traced kernels; interleaved medians (:mod:`_timing`). If
  ``benchmarks/peer_results.json`` exists (``make bench-peer``) the
  neural-tangents times are shown beside them, and ``K[:8, :8]`` is cross-checked.
  Targets: structured ≤ 1.0× NT implementation 3, ≥ 20× faster than the
  ``vmap(jacrev)`` contraction.
* ``norms`` — power vs Lanczos accuracy vs matvec count (:mod:`norms_accuracy`).
* ``core`` — a snapshot next to its core, the traced NTK, piece by piece, for
  the MLP 784-512-512-10 on 256 probes and a ~800k-parameter CNN on 32
  probes (:mod:`snapshot_core`). Targets: MLP snapshot ≤ 3× the traced NTK;
  CNN snapshot ≤ 0.5 s or ≤ 10 training steps of batch 64.
* ``startup`` — the hook's start-up (θ0 checkpoint, compile, first snapshot)
  on the ~800k-parameter CNN with 32 probes, a fresh process per run
  (:mod:`startup`); target ≤ 10 s.
* ``hook`` — ``LazyTrainingHook`` with ``max_overhead=0.05`` at
  ``every_steps=100`` on the MLP 784-512-512-10 training loop, the hook's
  defaults otherwise: wall time with / without the hook, the snapshots taken
  and the cadence they settle at (:mod:`hook_overhead`); target ≤ 1.06× wall
  with snapshots still taken.

Numbers from a shared machine are noisy; see benchmarks/README.md for recorded runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_FILE = os.path.join(HERE, "peer_results.json")
PEER_NAMES = {"structured": "nt_structured", "jacobian": "nt_jacobian", "ntk_vp": "nt_ntk_vp"}


def load_peer(n: int) -> dict | None:
  if not os.path.exists(PEER_FILE):
    return None
  with open(PEER_FILE) as f:
    peer = json.load(f)
  if peer.get("n") != n or tuple(peer.get("widths", ())) != _timing.NTK_WIDTHS:
    print(f"  (peer_results.json is for n={peer.get('n')}, widths={peer.get('widths')}: "
          "not comparable, peer column omitted)")
    return None
  return peer


def bench_ntk(quick: bool, repeats: int, methods=("structured", "jacobian", "ntk_vp")) -> dict:
  n = 64 if quick else _timing.NTK_POINTS
  x_np, layers = _timing.mlp_arrays(n=n)
  apply_fn, params = nd.from_linen(_timing.flax_mlp(), {"params": _timing.flax_params(layers)})
  x = jax.numpy.asarray(x_np)
  num_params = sum(a.size for a in jax.tree.leaves(params))
  print(f"\n## NTK: MLP {'-'.join(map(str, _timing.NTK_WIDTHS))} ({num_params} params), "
        f"n={n}; {_timing.machine()}")
  peer = load_peer(n)
  if peer:
    print(f"  peer: neural-tangents run of {peer['date']} ({peer['machine']}); "
          "NT medians are from that run, not interleaved with this one")
  rows = {}
  for traced in (False, True):
    label = "traced" if traced else "full"
    fns = {m: (lambda m=m: nd.empirical_ntk(apply_fn, params, x, method=m, trace_outputs=traced,
                                            batch_size=n))
           for m in methods}
    slow_cap = 1 if quick else 2
    timed = _timing.time_interleaved(fns, repeats=repeats,
                                     max_repeats={"jacobian": slow_cap, "ntk_vp": slow_cap},
                                     max_seconds=60.0)
    ref_name = "jacobian" if "jacobian" in timed else methods[0]
    ref = np.asarray(timed[ref_name]["result"])
    t_s = timed["structured"]["median"]
    print(f"\n### {label} kernel {tuple(ref.shape)}")
    header = f"| method | ntk_diag [s] | runs | ntk_diag / structured | rel.err vs {ref_name} |"
    sep = "|---|---:|---:|---:|---:|"
    if peer:
      header += " NT [s] | ntk_diag / NT (same method) | structured / NT impl. 3 |"
      sep += "---:|---:|---:|"
    print(header)
    print(sep)
    for m, entry in timed.items():
      kernel = np.asarray(entry["result"])
      err = np.linalg.norm(kernel - ref) / np.linalg.norm(ref)
      line = (f"| {m} | {entry['median']:.4f} | {len(entry['times'])} | "
              f"{entry['median'] / t_s:.1f}× | {err:.1e} |")
      rows[(label, m)] = entry["median"]
      if peer:
        p = peer["kernels"][label][PEER_NAMES[m]]
        vs3 = t_s / peer["kernels"][label]["nt_structured"]["median_s"]
        line += (f" {p['median_s']:.4f} | {entry['median'] / p['median_s']:.2f}× | "
                 f"{f'{vs3:.2f}×' if m == 'structured' else '—'} |")
      print(line)
    if peer:
      p = peer["kernels"][label]["nt_structured"]
      b = _timing.CROSS_CHECK_BLOCK
      ours = np.asarray(timed["structured"]["result"])[:b, :b]
      theirs = np.asarray(p["block"])
      print(f"cross-check vs NT (K[:{b},:{b}], NT traced ×k): rel.err "
            f"{np.linalg.norm(ours - theirs) / np.linalg.norm(theirs):.1e}; "
            f"‖K‖_F ours {np.linalg.norm(ref):.6g}, NT {p['fro_norm']:.6g}")
    if "jacobian" in timed:
      speedup = timed["jacobian"]["median"] / t_s
      print(f"targets: structured ≥ 20× faster than jacobian: {speedup:.1f}× -> "
            f"{'holds' if speedup >= 20 else 'MISSED'}", end="")
    else:
      print("targets: (jacobian not run)", end="")
    if peer:
      ratio = t_s / peer["kernels"][label]["nt_structured"]["median_s"]
      print(f"; structured ≤ 1.0× NT impl. 3: {ratio:.2f}× -> "
            f"{'holds' if ratio <= 1.0 else 'MISSED'}")
    else:
      print("; NT comparison: run `make bench-peer` first")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="short run")
  parser.add_argument("--only", default="ntk,norms,core,startup,hook",
                      help="comma-separated sections")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
  parser.add_argument("--hook-groups", default="ntk,norms,twin",
                      help="hook groups enabled in the hook section (default: all, the hook's "
                           "default); e.g. ntk,twin")
  parser.add_argument("--methods", default="structured,jacobian,ntk_vp",
                      help="NTK methods (structured first)")
  args = parser.parse_args()
  sections = args.only.split(",")
  repeats = args.repeats or (3 if args.quick else 7)
  print(f"# ntk_diag benchmarks ({'quick' if args.quick else 'full'}), {_timing.machine()}")
  if "ntk" in sections:
    bench_ntk(args.quick, repeats, tuple(args.methods.split(",")))
  if "norms" in sections:
    import norms_accuracy
    norms_accuracy.run(quick=args.quick)
  if "core" in sections:
    import snapshot_core
    for name in snapshot_core.MODELS:
      snapshot_core.run(name, repeats=3 if args.quick else 5)
  if "startup" in sections:
    import startup
    startup.run("cnn", runs=1 if args.quick else 2)
  if "hook" in sections:
    import hook_overhead
    hook_overhead.run(quick=args.quick, repeats=3 if args.quick else 5,
                      groups=tuple(g for g in args.hook_groups.split(",") if g))


if __name__ == "__main__":
  main()
