"""What JAX's persistent compilation cache saves on a snapshot's start-up.

    python benchmarks/compile_cache.py [--model cnn] [--runs 2]

Start-up here is what the hook pays once per run before its first snapshot
returns: the initial snapshot state, the ahead-of-time compile of the
snapshot (``snapshot.Snapshotter``) and the first snapshot at θ0 (the θ0
checkpoint, a disk write, is not included). Each measurement is a fresh
process (nothing in memory is shared):

* ``off`` — no persistent cache (the default);
* ``cold`` — the cache enabled on an empty directory (compiles, then writes);
* ``warm`` — the same directory again (reads instead of compiling).

The snapshot is ``snapshot_core``'s (the ``Snapshotter`` as the hook runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def child(model: str, cache_dir: str | None) -> dict:
  import time
  start = time.perf_counter()
  import jax
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  sys.path.insert(0, HERE)
  import snapshot_core
  from ntk_diag import diag_state
  imported = time.perf_counter()
  apply_fn, params0, _, _, probe_x, probe_y = snapshot_core.problem(model)
  jax.block_until_ready((params0, probe_x))
  built = time.perf_counter()
  snapshot_core.snapshotter(apply_fn, params0, probe_x, probe_y, diag_state.SnapshotConfig())
  done = time.perf_counter()
  return {"import": imported - start, "model": built - imported, "startup": done - built,
          "load": os.getloadavg()[0]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--runs", type=int, default=2, help="rounds of off / cold / warm")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.cache_dir)))
    return

  def run(cache_dir):
    command = [sys.executable, os.path.abspath(__file__), "--child", args.model]
    if cache_dir:
      command += ["--cache-dir", cache_dir]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

  print(f"## Persistent compilation cache, {args.model} snapshot start-up "
        "(initial state + compile + first snapshot), fresh process each")
  print("| round | off [s] | cold cache [s] | warm cache [s] | load |\n|---|---:|---:|---:|---:|")
  for r in range(args.runs):
    cache = tempfile.mkdtemp(prefix="ntk_diag_jax_cache_")
    try:
      off, cold, warm = run(None), run(cache), run(cache)
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    finally:
      shutil.rmtree(cache, ignore_errors=True)
    print(f"| {r + 1} | {off['startup']:.1f} | {cold['startup']:.1f} | {warm['startup']:.1f} "
          f"| {off['load']:.1f} / {cold['load']:.1f} / {warm['load']:.1f} |")
    print(f"cache size {size / 2**20:.1f} MiB; imports {off['import']:.1f} s, model "
          f"{off['model']:.1f} s (not in start-up)")


if __name__ == "__main__":
  main()
