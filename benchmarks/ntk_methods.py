"""Time `empirical_ntk` methods side by side on an MLP (compile excluded).

    python benchmarks/ntk_methods.py                      # 64-512-512-10, 256 points
    python benchmarks/ntk_methods.py --methods structured --repeats 7

Each (method, traced) pair is run once to compile, then `--repeats` times; the
median wall time (with `block_until_ready`) is reported, with the speed-up of
`structured` over each other method. Timings are noisy on shared machines; the
process CPU time (summed over threads) is printed too as a steadier measure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ntk_diag as nd


class MLP(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths[:-1]:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.widths[-1])(x)


def time_method(apply_fn, params, x, method, trace_outputs, repeats):
  run = lambda: nd.empirical_ntk(apply_fn, params, x, method=method,
                                 trace_outputs=trace_outputs,
                                 batch_size=x.shape[0]).block_until_ready()
  kernel = run()  # compile
  times, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(times), statistics.median(cpu), kernel


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="64,512,512,10",
                      help="input width, hidden widths, output width")
  parser.add_argument("--n", type=int, default=256, help="number of points")
  parser.add_argument("--methods", default="structured,jacobian,ntk_vp")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--slow-repeats", type=int, default=1,
                      help="repeats for the (slow) non-structured methods")
  args = parser.parse_args()

  widths = [int(w) for w in args.widths.split(",")]
  model = MLP(tuple(widths[1:]))
  x = jax.random.normal(jax.random.PRNGKey(0), (args.n, widths[0]))
  variables = model.init(jax.random.PRNGKey(1), x[:1])
  apply_fn, params = nd.from_linen(model, variables)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  methods = args.methods.split(",")
  print(f"MLP {args.widths} ({num_params} params), n={args.n}, "
        f"backend={jax.default_backend()}, devices={jax.device_count()}")

  for trace_outputs in (False, True):
    label = "traced" if trace_outputs else "full"
    results, cpu, kernels = {}, {}, {}
    for method in methods:
      repeats = args.repeats if method == "structured" else args.slow_repeats
      results[method], cpu[method], kernels[method] = time_method(
          apply_fn, params, x, method, trace_outputs, repeats)
    ref = kernels[methods[0]]
    for method in methods:
      err = float(jnp.linalg.norm(kernels[method] - ref) / jnp.linalg.norm(ref))
      ratio = ""
      if "structured" in results and method != "structured":
        ratio = f"  structured is {results[method] / results['structured']:6.1f}x faster"
      print(f"{label:6s} {method:10s} {results[method]:8.3f} s wall {cpu[method]:8.3f} s cpu  "
            f"rel.err vs {methods[0]}: {err:.1e}{ratio}")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
