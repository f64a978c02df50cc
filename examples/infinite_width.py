"""How far a finite network's NTK is from its infinite-width limit, and that limit's spectrum.

A ReLU MLP in the NTK parametrization (``ntk_diag.infinite.NTKDense``: weights
``N(0, 1)``, forward ``W_std / sqrt(fan_in) · x W + b_std · b``),

    64 -> width -> ReLU -> width -> ReLU -> 10   (W_std = √2, b_std = 0.1),

on ``n`` digits images (``ntk_diag.datasets``, pixels scaled so ``‖x‖² = 64``):

1. **Distance to the limit.** For each width and seed, the empirical NTK at
   initialisation per output, ``nd.empirical_ntk(..., trace_outputs=True) / 10``,
   is compared with the infinite-width NTK of the same network,
   ``inf.kernels(inf.from_linen(model), x)[1]``, by the relative Frobenius
   distance ``‖K_w − K_∞‖_F / ‖K_∞‖_F`` (``inf.relative_distance``). Its
   geometric mean over seeds is fitted against the width on log-log axes; the
   fluctuations of a width-``w`` NTK are ``O(w^{-1/2})``, so the slope is −1/2.
2. **Spectrum of the limit.** The eigenvalues of the infinite-width NTK on the
   1,437 training digits, ``λ_k / n`` (the kernel operator's eigenvalues, up to
   sampling error), decay polynomially, ``λ_k ∝ k^{-α}``; ``α`` is fitted over
   ranks ``--fit-ranks`` (where the log-log plot is straight; beyond a few
   hundred the finite sample flattens it).

Both figures are saved under ``--out-dir``.

    python examples/infinite_width.py --out-dir docs/_static     # ~2 min on 2 cores
    python examples/infinite_width.py --quick                    # 3 widths, ~15 s
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import numpy as np

import ntk_diag as nd
import ntk_diag.infinite as inf

OUTPUTS = 10
W_STD = float(np.sqrt(2.0))
B_STD = 0.1
FULL_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
FULL_SEEDS = 16
# Three widths (one compile each) and many cheap seeds: over 400 resamplings
# of 32 seeds out of 128, the slope's standard deviation was 0.03.
QUICK_WIDTHS = (64, 256, 2048)
QUICK_SEEDS = 32


def digits(n: int | None = None, split: str = "train") -> np.ndarray:
  """The first ``n`` digits images, flattened to 64 pixels and scaled to ``‖x‖² = 64``
  (so the input covariance ``x · x' / 64`` is a cosine)."""
  from ntk_diag.datasets import load_numpy  # imports TensorFlow Datasets
  x, _ = load_numpy("digits", split=split)
  x = np.asarray(x, np.float32).reshape(len(x), -1)[:n]
  return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(x.shape[1])


def mlp(width: int, depth: int = 2) -> nn.Sequential:
  """``depth`` hidden NTK-parametrized ReLU layers of ``width`` units and a 10-output readout."""
  layers = []
  for _ in range(depth):
    layers += [inf.NTKDense(width, W_std=W_STD, b_std=B_STD), nn.relu]
  return nn.Sequential(layers + [inf.NTKDense(OUTPUTS, W_std=1.0, b_std=B_STD)])


def distances(x: np.ndarray, widths, seeds: int, depth: int = 2) -> np.ndarray:
  """``(len(widths), seeds)`` relative Frobenius distances of the per-output
  empirical NTK at initialisation (seeds ``PRNGKey(0 … seeds − 1)``) from the
  infinite-width NTK. One compiled function per width."""
  k_inf = inf.kernels(inf.from_linen(mlp(1, depth)), x)[1]
  out = np.zeros((len(widths), seeds))
  for i, width in enumerate(widths):
    model = mlp(width, depth)

    def apply_fn(params, inputs, model=model):
      return model.apply({"params": params}, inputs)

    @jax.jit
    def distance(key, model=model, apply_fn=apply_fn):
      params = model.init(key, x[:1])["params"]
      k_emp = nd.empirical_ntk(apply_fn, params, x, trace_outputs=True) / OUTPUTS
      return inf.relative_distance(k_emp, k_inf)

    out[i] = [float(distance(jax.random.PRNGKey(s))) for s in range(seeds)]
  return out


def geometric_mean(d: np.ndarray) -> np.ndarray:
  """Geometric mean over seeds (the last axis): the distance has a heavy right
  tail, and ``log`` of it averages with about half the spread of an RMS."""
  return np.exp(np.mean(np.log(d), axis=-1))


def loglog_slope(x, y) -> float:
  return float(np.polyfit(np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64)), 1)[0])


def spectrum(x: np.ndarray, depth: int = 2) -> np.ndarray:
  """Eigenvalues ``λ_k / n`` of the infinite-width NTK on ``x``, descending (float64 ``eigvalsh``)."""
  k_inf = np.asarray(inf.kernels(inf.from_linen(mlp(1, depth)), x)[1], np.float64)
  return np.linalg.eigvalsh(0.5 * (k_inf + k_inf.T))[::-1] / len(x)


def decay_exponent(eigenvalues: np.ndarray, ranks: tuple[int, int]) -> float:
  """``α`` of ``λ_k ∝ k^{-α}`` fitted over ranks ``ranks[0] ≤ k ≤ ranks[1]``."""
  lo, hi = ranks
  k = np.arange(1, len(eigenvalues) + 1)
  return -loglog_slope(k[lo - 1:hi], eigenvalues[lo - 1:hi])


def plot_distances(widths, d, slope, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  widths = np.asarray(widths)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for s in range(d.shape[1]):
    ax.loglog(widths, d[:, s], ".", color="0.6", label="one seed" if s == 0 else None)
  mean = geometric_mean(d)
  ax.loglog(widths, mean, "o-", label=f"geometric mean, {d.shape[1]} seeds (slope {slope:+.3f})")
  ax.loglog(widths, mean[0] * (widths / widths[0]) ** -0.5, "k:", label="width$^{-1/2}$")
  ax.set_xlabel("width")
  ax.set_ylabel(r"$\|K_w - K_\infty\|_F / \|K_\infty\|_F$")
  ax.set_title("Empirical NTK at init vs infinite-width NTK")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_spectrum(eigenvalues, ranks, alpha, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k = np.arange(1, len(eigenvalues) + 1)
  lo, hi = ranks
  fit = eigenvalues[lo - 1] * (k[lo - 1:hi] / lo) ** -alpha
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.loglog(k, eigenvalues, "-", label=r"$\lambda_k / n$")
  ax.loglog(k[lo - 1:hi], fit * 1.6, "k--", label=rf"$k^{{-{alpha:.2f}}}$ (fit, ranks {lo}–{hi})")
  ax.set_xlabel("rank k")
  ax.set_ylabel("eigenvalue")
  ax.set_title(f"Infinite-width NTK spectrum, {len(eigenvalues)} digits")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"widths {QUICK_WIDTHS}, {QUICK_SEEDS} seeds, 400 digits for the spectrum")
  parser.add_argument("--widths", type=int, nargs="+", default=None)
  parser.add_argument("--seeds", type=int, default=None,
                      help=f"initialisations per width (default {FULL_SEEDS}; {QUICK_SEEDS} with --quick)")
  parser.add_argument("--n", type=int, default=32, help="digits for the distance")
  parser.add_argument("--depth", type=int, default=2, help="hidden layers")
  parser.add_argument("--spectrum-n", type=int, default=None,
                      help="digits for the spectrum (default: all 1,437; 400 with --quick)")
  parser.add_argument("--fit-ranks", type=int, nargs=2, default=(10, 100))
  parser.add_argument("--out-dir", default=None, help="where to save the two PNGs")
  args = parser.parse_args(argv)

  start = time.time()
  widths = sorted(args.widths or (QUICK_WIDTHS if args.quick else FULL_WIDTHS))
  x = digits(args.n)
  seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
  d = distances(x, widths, seeds, args.depth)
  mean = geometric_mean(d)
  slope = loglog_slope(widths, mean)
  print(f"relative Frobenius distance of the empirical NTK at init from the infinite-width NTK"
        f" ({args.n} digits, {seeds} seeds, depth {args.depth}):")
  print(f"{'width':>7} {'geo mean':>9} {'min':>8} {'max':>8}")
  for i, width in enumerate(widths):
    print(f"{width:>7} {mean[i]:9.4f} {d[i].min():8.4f} {d[i].max():8.4f}")
  print(f"fitted slope {slope:+.3f} (theory: -0.5)")

  spectrum_n = args.spectrum_n or (400 if args.quick else None)
  eigenvalues = spectrum(digits(spectrum_n), args.depth)
  ranks = tuple(args.fit_ranks)
  alpha = decay_exponent(eigenvalues, ranks)
  print(f"infinite-width NTK on {len(eigenvalues)} digits: λ_k ∝ k^-{alpha:.3f}"
        f" over ranks {ranks[0]}-{ranks[1]} (λ_1/n = {eigenvalues[0]:.3g},"
        f" λ_{ranks[1]}/n = {eigenvalues[ranks[1] - 1]:.3g})")
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    paths = (os.path.join(args.out_dir, "infinite_width_distance.png"),
             os.path.join(args.out_dir, "infinite_width_spectrum.png"))
    plot_distances(widths, d, slope, paths[0])
    plot_spectrum(eigenvalues, ranks, alpha, paths[1])
    print("saved " + ", ".join(paths))
  print(f"({time.time() - start:.1f} s)")
  return {"widths": widths, "distances": d, "slope": slope, "eigenvalues": eigenvalues,
          "decay_exponent": alpha}


if __name__ == "__main__":
  main()
