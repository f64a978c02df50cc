"""How the lazy-training quantities of the seed scale with the width ``d``.

For the seed's one-hidden-layer network

    f(x; θ) = d^{-1/2} Σ_i β_i tanh(w_iᵀ x),   w_i, β_i ~ N(0, 1) i.i.d.,

at initialisation, on a small data set (``n`` Gaussian inputs in ``R^dim``,
targets ``y = sin(x_1) + x_2 / 2``), this measures with ``nd.lazy_ratio``

* ``‖∇f‖²``: ``jacobian_norm.value²`` = ``max_i ‖∇_θ f(x_i)‖²`` (seed: O(1));
* ``‖∇²f‖``: ``hessian_norm.value`` = ``max_i ‖∇²_θ f(x_i)‖₂`` (the seed's text
  says O(1/d); it is O(d^{-1/2}) up to a slowly growing ``sqrt(log d)``: each
  neuron contributes a 2 × 2 block of size O(d^{-1/2}) and the norm is the
  largest of ``d`` such blocks);
* ``κ = ‖∇²f‖ / ‖∇f‖² · ‖f(X) − y‖`` (seed: O(d^{-1/2})),

averages ``log`` of each over ``--seeds`` initialisations, prints a table and
the log-log slopes (``np.polyfit``), and saves a log-log plot.

    python examples/width_scaling.py --widths 128 512 2048 8192 --out width_scaling.png
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ntk_diag as nd

QUANTITIES = ("grad_sq", "hessian", "kappa")


def apply_fn(params, x):
  """The seed network; the width is read from the parameters."""
  width = params["w"].shape[0]
  return jnp.tanh(x @ params["w"].T) @ params["beta"] / jnp.sqrt(width)


def init_params(key, width, dim, symmetric=False):
  """i.i.d. N(0, 1); ``symmetric``: neurons in pairs ``(w, β), (w, −β)`` so ``f(·; θ0) = 0``.

  The symmetric ("doubling") initialisation of Chizat et al. (2019) keeps every
  parameter marginally N(0, 1) but removes the O(1) random output at θ0, so
  ``‖f(X) − y‖ = ‖y‖`` and the slope of κ is not blurred by its fluctuations.
  """
  key_w, key_beta = jax.random.split(key)
  if symmetric:
    w = jax.random.normal(key_w, (width // 2, dim))
    beta = jax.random.normal(key_beta, (width // 2,))
    return {"w": jnp.concatenate([w, w]), "beta": jnp.concatenate([beta, -beta])}
  return {"w": jax.random.normal(key_w, (width, dim)),
          "beta": jax.random.normal(key_beta, (width,))}


def dataset(n, dim, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(10_000 + seed), (n, dim))
  y = jnp.sin(x[:, 0]) + 0.5 * x[:, 1 % dim]
  return x, y


def measure(widths, *, seeds=3, n=8, dim=3, method="lanczos", symmetric=False):
  """``{quantity: (len(widths),) geometric means over seeds}``, plus the raw values."""
  x, y = dataset(n, dim)
  raw = {q: np.zeros((len(widths), seeds)) for q in QUANTITIES}
  for i, width in enumerate(widths):
    for s in range(seeds):
      params = init_params(jax.random.PRNGKey(s), width, dim, symmetric)
      report = nd.lazy_ratio(apply_fn, params, x, y, method=method)
      raw["grad_sq"][i, s] = float(report.jacobian_norm.value) ** 2
      raw["hessian"][i, s] = float(report.hessian_norm.value)
      raw["kappa"][i, s] = float(report.kappa)
  means = {q: np.exp(np.log(raw[q]).mean(axis=1)) for q in QUANTITIES}
  return means, raw


def slopes(widths, means):
  """Log-log slope of each quantity against the width."""
  log_d = np.log(np.asarray(widths, np.float64))
  return {q: float(np.polyfit(log_d, np.log(means[q]), 1)[0]) for q in QUANTITIES}


def plot(widths, means, found, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 4))
  labels = {"grad_sq": "‖∇f‖²", "hessian": "‖∇²f‖", "kappa": "κ"}
  for q in QUANTITIES:
    ax.loglog(widths, means[q], "o-", label=f"{labels[q]} (slope {found[q]:+.2f})")
  ax.loglog(widths, means["kappa"][0] * (np.asarray(widths) / widths[0]) ** -0.5, "k:",
            label="d^-1/2")
  ax.set_xlabel("width d")
  ax.set_title("Seed network at initialisation")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+",
                      default=[128, 256, 512, 1024, 2048, 4096, 8192])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--n", type=int, default=8, help="data set size")
  parser.add_argument("--dim", type=int, default=3, help="input dimension")
  parser.add_argument("--method", default="lanczos", choices=["power", "lanczos"])
  parser.add_argument("--symmetric", action="store_true",
                      help="paired neurons (w, β), (w, -β): f = 0 at init")
  parser.add_argument("--out", default=None, help="PNG path for the log-log plot")
  args = parser.parse_args(argv)

  start = time.time()
  widths = sorted(args.widths)
  means, _ = measure(widths, seeds=args.seeds, n=args.n, dim=args.dim, method=args.method,
                     symmetric=args.symmetric)
  found = slopes(widths, means)
  print(f"{'width':>7} {'‖∇f‖²':>10} {'‖∇²f‖':>10} {'κ':>10}")
  for i, width in enumerate(widths):
    print(f"{width:>7} {means['grad_sq'][i]:10.4f} {means['hessian'][i]:10.4f}"
          f" {means['kappa'][i]:10.4f}")
  print(f"log-log slopes: ‖∇f‖² {found['grad_sq']:+.3f} (seed: 0),"
        f" ‖∇²f‖ {found['hessian']:+.3f} (seed text: -1; expected -1/2),"
        f" κ {found['kappa']:+.3f} (seed: -1/2)")
  if args.out:
    plot(widths, means, found, args.out)
    print(f"saved {args.out}")
  print(f"({time.time() - start:.1f} s)")
  return found


if __name__ == "__main__":
  main()
