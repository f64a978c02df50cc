#!/usr/bin/env bash
# The benchmark sections that matter on an accelerator, in one short run:
# NTK methods (`ntk`), a snapshot next to its core for the MLP and the CNN
# (`core`), and the hook's overhead on a training loop (`hook`).
#
#   bash benchmarks/device.sh            # full sizes (a few minutes on a GPU)
#   bash benchmarks/device.sh --quick    # n=64 NTK, fewer repeats and steps
#
# Run from anywhere, with a Python whose jax sees the GPU/TPU (PYTHON=...
# to choose it; default: the repository's .venv, else `python`). Output is
# printed and kept in benchmarks/device-<backend>-<date>.log; copy the tables
# into benchmarks/README.md with the device and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

# Allocate GPU memory on demand (JAX preallocates 75 % otherwise): the memory
# estimates and the runs then see what they use, not the pool.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=3

backend=$("$PY" -c 'import jax; print(jax.default_backend())') || exit 1
if [ "$backend" = "cpu" ]; then
  echo "jax sees no accelerator (backend=cpu): use \`make bench\` on CPU" >&2
  exit 1
fi
log="benchmarks/device-${backend}-$(date +%Y%m%d-%H%M).log"
{
  "$PY" -c 'import jax; print("devices:", jax.devices(), "jax", jax.__version__)'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,utilization.gpu \
      --format=csv
  status=0
  # One section per process: a failing section does not cost the others.
  for section in ntk core hook; do
    "$PY" benchmarks/run.py --only "$section" "$@" || { echo "section $section failed"; status=1; }
  done
  exit $status
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
