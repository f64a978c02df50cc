"""The one timing helper of the benchmarks, and the shared problem definition.

Importable from both venvs (``.venv`` with ntk_diag and ``.venv-peer`` with
neural-tangents on jax 0.4.25): it imports only numpy, jax and flax.linen.

Timing rules (shared 2-core machines are noisy): every callable is run once to
compile, then all are run round-robin, interleaved, ``repeats`` times each, with
``block_until_ready``; the median is reported. Compile time is excluded.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The NTK benchmark problem: MLP 64-512-512-10 (301k parameters), 256 points.
NTK_WIDTHS = (64, 512, 512, 10)
NTK_POINTS = 256
NTK_SEED = 0
CROSS_CHECK_BLOCK = 8  # K[:8, :8] is saved to cross-check kernels across venvs


def block(tree):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                      tree)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5,
                     max_repeats: dict[str, int] | None = None,
                     max_seconds: float | None = None) -> dict[str, dict]:
  """Median wall time of each zero-argument callable, measured round-robin.

  Args:
    fns: name -> callable returning JAX arrays (blocked on before the clock stops).
    repeats: timed runs per callable (after one untimed compile run).
    max_repeats: per-name cap on timed runs (for slow baselines).
    max_seconds: per-name cap: no further runs once a name's total time exceeds it
      (at least one timed run is always made).

  Returns:
    name -> ``{"median": s, "times": [s, ...], "compile": s (first run), "result": output}``.
  """
  out = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    result = block(fn())
    out[name] = {"compile": time.perf_counter() - start, "times": [], "result": result}
  caps = {name: min(repeats, (max_repeats or {}).get(name, repeats)) for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times = out[name]["times"]
      if len(times) >= caps[name]:
        continue
      if times and max_seconds is not None and sum(times) > max_seconds:
        continue
      start = time.perf_counter()
      block(fn())
      times.append(time.perf_counter() - start)
  for entry in out.values():
    entry["median"] = statistics.median(entry["times"])
  return out


def mlp_arrays(widths=NTK_WIDTHS, n=NTK_POINTS, seed=NTK_SEED):
  """``(x, layers)``: NumPy inputs and LeCun-normal Dense weights, identical in every venv.

  ``layers`` is a list of ``(kernel (d_in, d_out), bias (d_out,))`` float32 pairs.
  """
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((n, widths[0])).astype(np.float32)
  layers = []
  for d_in, d_out in zip(widths[:-1], widths[1:]):
    kernel = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(d_out)).astype(np.float32)
    layers.append((kernel, bias))
  return x, layers


def flax_mlp(widths=NTK_WIDTHS):
  """A ``flax.linen`` ReLU MLP with ``Dense_0 .. Dense_{L-1}`` (same in both venvs)."""
  import flax.linen as nn

  class MLP(nn.Module):
    features: tuple

    @nn.compact
    def __call__(self, x):
      for w in self.features[:-1]:
        x = nn.relu(nn.Dense(w)(x))
      return nn.Dense(self.features[-1])(x)

  return MLP(tuple(widths[1:]))


def flax_params(layers):
  """``{"Dense_i": {"kernel", "bias"}}`` from :func:`mlp_arrays` layers."""
  import jax.numpy as jnp
  return {f"Dense_{i}": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
          for i, (w, b) in enumerate(layers)}


def machine() -> str:
  import os
  import platform
  return (f"{platform.machine()}, {os.cpu_count()} CPU cores, backend={jax.default_backend()}, "
          f"jax {jax.__version__}")


def sgd_classifier_step(apply_fn, pool, labels, batch: int, learning_rate: float = 0.05):
  """``(optimizer, train_step)``: SGD on the softmax cross-entropy of minibatch ``i``
  (``batch`` consecutive examples of ``pool``, wrapping around); ``train_step(params,
  opt_state, i) -> (params, opt_state)``, not jitted."""
  opt = optax.sgd(learning_rate)

  def train_step(params, opt_state, i):
    idx = (i * batch + jnp.arange(batch)) % pool.shape[0]
    xb, yb = pool[idx], labels[idx]

    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb).mean()

    updates, opt_state = opt.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return opt, train_step
