"""Where a steady snapshot's time goes, by group (issue 15: "profile by group").

    python benchmarks/snapshot_groups.py [mlp|cnn]

The snapshot is compiled as the hook compiles it (``snapshot.CPU_COMPILER_OPTIONS``),
plus XLA:CPU's per-op trace events; each event is mapped to the op's name scope
(``jax.named_scope`` in :func:`ntk_diag.snapshot.snapshot`: ``ntk``,
``kernel_stats``, ``hessian_norm``, ``sigma_min``, ``sharpness``, ``twin``;
``other``: the probe outputs, residual, weight change) and summed. The state is
that after the first snapshot at θ0, the parameters θ0 · 1.01 (as in
``snapshot_core``); three snapshots are traced and averaged. Loop and
conditional ops are left out (their bodies are counted), so the groups sum
to a little less than the wall time.
"""
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import jax  # noqa: E402
import numpy as np  # noqa: E402

import snapshot_core  # noqa: E402
from ntk_diag import diag_state  # noqa: E402
from ntk_diag import snapshot as snapshot_lib  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "mlp"
apply_fn, params0, _, _, probe_x, probe_y = snapshot_core.problem(model)
cfg = diag_state.SnapshotConfig()
spec = diag_state.SnapshotSpec(apply_fn=apply_fn, with_model_state=False, config=cfg, norm_examples=16)
layout = diag_state.hessian_layout(spec, params0, None, probe_x)
spec = dataclasses.replace(spec, warm_start=diag_state.warm_start_fits(params0, 16, 10, cfg.warm_start_bytes, layout=layout))
state = diag_state.initial_state(spec, params0, None, probe_x, np.asarray(probe_y), step=0)
fn = jax.jit(functools.partial(snapshot_lib._snapshot_entry, spec))
basis = snapshot_lib.sharpness_basis(spec, params0)  # as the Snapshotter hands it
args = (state, params0, None, np.asarray(0, np.int32), params0, np.asarray(False), basis)
opts = dict(snapshot_lib.CPU_COMPILER_OPTIONS, xla_cpu_enable_xprof_traceme=True)
comp = fn.lower(*args).compile(compiler_options=opts)
s1, _, basis = jax.block_until_ready(comp(*args))
params1 = jax.tree.map(lambda a: a * 1.01, params0)
args2 = (s1, params1, None, np.asarray(1, np.int32), params0, np.asarray(False), basis)
for _ in range(2): jax.block_until_ready(comp(*args2))
scope = {}
for l in comp.as_text().splitlines():
  m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*op_name=\"([^\"]+)\"", l)
  if m: scope[m.group(1)] = m.group(2)
def group(op):
  for key in ("sharpness", "hessian_norm", "ntk", "twin", "kernel_stats", "sigma_min", "jacobian"):
    if f"/{key}/" in op or op.endswith(f"/{key}"): return key
  return "other"
trace_dir = tempfile.mkdtemp(prefix="ntk_diag_groups_")
jax.profiler.start_trace(trace_dir)
t = time.perf_counter()
for _ in range(3): jax.block_until_ready(comp(*args2))
wall = (time.perf_counter() - t) / 3
jax.profiler.stop_trace()
ev = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]))["traceEvents"]
tot = collections.Counter(); unk = collections.Counter()
for e in ev:
  if e.get("ph") != "X" or e["name"] not in scope: continue
  if e["name"].startswith(("while", "conditional", "call")): continue
  tot[group(scope[e["name"]])] += e.get("dur", 0) / 3
  if group(scope[e["name"]]) == "other": unk[scope[e["name"]][:90]] += e.get("dur", 0) / 3
print(f"load {os.getloadavg()[0]:.1f}; {model}: wall {wall*1e3:.1f} ms per snapshot; op time by group (ms):", {k: round(v / 1e3, 1) for k, v in tot.most_common()})
for k, v in unk.most_common(8): print(f"   other {v/1e3:6.1f} ms  {k}")
