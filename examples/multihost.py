"""LazyTrainingHook with params sharded across processes (multi-host JAX), on one machine.

Every process runs this same program. A 3-layer MLP on the digits is trained
by SGD with its params sharded FSDP-style over every device of every process
and each batch split over the processes; the 16-point probe set is split over
the processes too. Every process builds the same hook and calls it at every
step: the diagnostics are computed in ``jit`` on the global arrays, θ0 and
the probe set are checkpointed by all processes into the shared workdir, and
only process 0 writes event files.

Two processes with two CPU devices each, on this machine::

    python examples/multihost.py --launch 2 --workdir runs/multihost

or by hand, one shell per process (the same command with ``--process-id 1``)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python examples/multihost.py --process-id 0 --num-processes 2 --port 12345 \\
        --workdir runs/multihost

Run it again with the same ``--workdir``: the hook finds θ0 there, checks (in
``jit``, on the global arrays) that this run starts from the same params, and
reuses it; a run resumed at a later step restores it. On a cluster,
start one process per host the way it starts JAX programs
(``jax.distributed.initialize()`` reads SLURM or TPU settings) and put
``--workdir`` on a filesystem every host sees.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ntk_diag as nd
from ntk_diag.datasets import load_numpy

PROBE_SIZE = 16


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(128)(x))
    x = nn.tanh(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def launch(num_processes: int, argv: list[str], timeout: float) -> int:
  """Runs this script in ``num_processes`` local processes (two CPU devices each)
  and waits; if one fails or ``timeout`` passes, the others are killed."""
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                             "--process-id", str(i), "--num-processes", str(num_processes),
                             "--port", str(port)], env=env) for i in range(num_processes)]
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return max(abs(p.returncode) for p in procs)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="shared by every process")
  parser.add_argument("--launch", type=int, metavar="N",
                      help="start N local processes running this script, and wait")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds, with --launch")
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--port", type=int, help="coordinator port on localhost")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--every-steps", type=int, default=25)
  parser.add_argument("--batch-size", type=int, default=64, help="global, split over processes")
  parser.add_argument("--learning-rate", type=float, default=0.05)
  args = parser.parse_args(argv)
  if args.launch:
    options = ["--workdir", args.workdir, "--steps", str(args.steps), "--every-steps",
               str(args.every_steps), "--batch-size", str(args.batch_size), "--learning-rate",
               str(args.learning_rate)]
    raise SystemExit(launch(args.launch, options, args.timeout))

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  if args.port is None:
    jax.distributed.initialize()  # a cluster's own settings (SLURM, TPU, ...)
  else:
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
  return train(args)


def train(args: argparse.Namespace) -> dict[str, float]:
  """SGD with the hook attached; returns the last snapshot's scalars."""
  # A ("data", "model") mesh whose rows are the processes: batches and probe
  # points are split over "data", params over both axes.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.asarray(devices).reshape(jax.process_count(), -1), ("data", "model"))
  rows = NamedSharding(mesh, P("data"))

  def fsdp(leaf):  # a leaf's first axis over every device when it divides, else replicated
    spec = P(("data", "model")) if leaf.ndim and leaf.shape[0] % mesh.size == 0 else P()
    return NamedSharding(mesh, spec)

  def local_rows(host):  # this process's slice of the global rows of `host`
    per_process = len(host) // jax.process_count()
    return host[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]

  x_all, labels = load_numpy("digits", split="train")
  y_all = np.eye(10, dtype=np.float32)[labels]
  model = MLP()
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(0), x_all[:1]))
  shardings = jax.tree.map(fsdp, params)
  params = jax.tree.map(lambda a, s: jax.make_array_from_callback(
      a.shape, s, lambda index: np.asarray(a)[index]), params, shardings)

  # Each process passes its own half of the probe set.
  probe = lambda host: jax.make_array_from_process_local_data(rows, local_rows(host))
  probe_x, probe_y = probe(x_all[:PROBE_SIZE]), probe(y_all[:PROBE_SIZE])
  hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=args.workdir,
                             every_steps=args.every_steps, norm_examples=2)

  tx = optax.sgd(args.learning_rate)
  opt_state = jax.jit(tx.init)(params)

  def train_step(params, opt_state, x, y):
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, x) - y) ** 2, axis=-1))
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  train_step = jax.jit(train_step, donate_argnums=(0, 1))
  rng = np.random.default_rng(0)  # the same on every process: the same global batch
  for step in range(args.steps):
    hook(step, params=params)
    index = rng.choice(len(x_all), args.batch_size, replace=False)
    x = jax.make_array_from_process_local_data(rows, local_rows(x_all[index]))
    y = jax.make_array_from_process_local_data(rows, local_rows(y_all[index]))
    params, opt_state = train_step(params, opt_state, x, y)
  scalars = hook.last.scalars
  if jax.process_index() == 0:
    print(f"step {hook.last.step}: " + ", ".join(
        f"{tag} {scalars[tag]:.4g}" for tag in ("kappa", "kernel_drift", "twin_gap", "weight_change")))
  return scalars


if __name__ == "__main__":
  main()
