"""How the lazy-training quantities of the lecture notes scale with the width ``d``.

For the lecture's one-hidden-layer network

    f(x; θ) = d^{-1/2} Σ_i β_i tanh(w_iᵀ x),   w_i ~ N(0, I),

at initialisation, on a small data set (``n`` Gaussian inputs in ``R^dim``,
targets ``y = sin(x_1) + x_2 / 2``), this measures with ``nd.lazy_ratio``

* ``‖∇f‖²``: ``jacobian_norm.value²`` = ``max_i ‖∇_θ f(x_i)‖²`` (seed: O(1));
* ``‖∇²f‖``: ``hessian_norm.value`` = ``max_i ‖∇²_θ f(x_i)‖₂`` (lecture's text:
  O(1/d));
* ``κ = ‖∇²f‖ / ‖∇f‖² · ‖f(X) − y‖`` (eq. 3 of the lecture notes: O(d^{-1/2})),

for two laws of the output weights ``β_i``:

* ``gaussian``: ``β_i ~ N(0, 1)``. The Hessian is block diagonal, one 2 × 2
  block of size O(d^{-1/2}) per neuron, and its norm is the largest of ``d``
  blocks; with unbounded ``β_i`` that maximum carries an extreme-value factor
  growing like ``sqrt(log d)``, so the slopes of ``‖∇²f‖`` and κ sit above −1/2;
* ``sign``: ``β_i = ±1``. Bounded output weights are what the lecture's argument
  assumes ("all non-zero terms in the Hessian are O(1/√d)"); then the block
  norms are bounded and the slopes are −1/2.

Every measured norm is checked against a closed form that does not use
ntk_diag (:func:`closed_form`: ``‖∇f(x)‖²`` summed over neurons, ``‖∇²f(x)‖``
the largest 2 × 2 block eigenvalue). The script averages ``log`` of each
quantity over ``--seeds`` initialisations, prints a table and the log-log
slopes (``np.polyfit``) per law, and saves a log-log plot.

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
OUTPUT_WEIGHTS = ("gaussian", "sign")


def apply_fn(params, x):
  """The lecture's network; the width is read from the parameters."""
  width = params["w"].shape[0]
  return jnp.tanh(x @ params["w"].T) @ params["beta"] / jnp.sqrt(width)


def init_params(key, width, dim, *, output_weights="gaussian", symmetric=False):
  """``w_i ~ N(0, I)``; ``β_i ~ N(0, 1)`` (``"gaussian"``) or ``±1`` (``"sign"``).

  ``symmetric``: neurons in pairs ``(w, β), (w, −β)`` so ``f(·; θ0) = 0``. This
  ("doubling") initialisation of Chizat et al. (2019) keeps every parameter's
  law but removes the O(1) random output at θ0, so ``‖f(X) − y‖ = ‖y‖`` and
  the slope of κ is not blurred by its seed-to-seed fluctuations.
  """
  key_w, key_beta = jax.random.split(key)
  count = width // 2 if symmetric else width
  w = jax.random.normal(key_w, (count, dim))
  if output_weights == "sign":
    beta = jax.random.rademacher(key_beta, (count,), dtype=w.dtype)
  else:
    beta = jax.random.normal(key_beta, (count,))
  if symmetric:
    w, beta = jnp.concatenate([w, w]), jnp.concatenate([beta, -beta])
  return {"w": w, "beta": beta}


def closed_form(params, x):
  """``(‖∇_θ f(x_i)‖², ‖∇²_θ f(x_i)‖₂)`` per example, by hand (float64 NumPy).

  With ``z = w_iᵀx``: ``∂f/∂β_i = tanh(z)/√d``, ``∂f/∂w_i = β_i tanh'(z) x/√d``;
  the Hessian has one block per neuron, ``d^{-1/2} [[β_i tanh''(z) x xᵀ,
  tanh'(z) x], [tanh'(z) xᵀ, 0]]``, whose non-zero eigenvalues are those of
  ``d^{-1/2} [[b, a], [a, 0]]`` with ``b = β_i tanh''(z) ‖x‖²``,
  ``a = tanh'(z) ‖x‖``: largest magnitude ``(|b|/2 + sqrt(b²/4 + a²)) / √d``.
  """
  w = np.asarray(params["w"], np.float64)
  beta = np.asarray(params["beta"], np.float64)
  x = np.asarray(x, np.float64)
  width = w.shape[0]
  x_norm = np.linalg.norm(x, axis=1)[:, None]
  t = np.tanh(x @ w.T)
  d1 = 1.0 - t ** 2
  d2 = -2.0 * t * d1
  grad_sq = (t ** 2 + (beta * d1 * x_norm) ** 2).sum(axis=1) / width
  b = np.abs(beta * d2) * x_norm ** 2
  a = d1 * x_norm
  hessian = (b / 2 + np.sqrt(b ** 2 / 4 + a ** 2)).max(axis=1) / np.sqrt(width)
  return grad_sq, hessian


def dataset(n, dim, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(10_000 + seed), (n, dim))
  y = jnp.sin(x[:, 0]) + 0.5 * x[:, 1 % dim]
  return x, y


def measure(widths, *, seeds=3, n=8, dim=3, method="lanczos", output_weights="gaussian",
            symmetric=False):
  """Geometric means over seeds ``{quantity: (len(widths),)}`` and the largest
  relative deviation of ``‖∇f‖²`` and ``‖∇²f‖`` from :func:`closed_form`."""
  x, y = dataset(n, dim)
  raw = {q: np.zeros((len(widths), seeds)) for q in QUANTITIES}
  deviation = 0.0
  for i, width in enumerate(widths):
    for s in range(seeds):
      params = init_params(jax.random.PRNGKey(s), width, dim, output_weights=output_weights,
                           symmetric=symmetric)
      report = nd.lazy_ratio(apply_fn, params, x, y, method=method)
      raw["grad_sq"][i, s] = float(report.jacobian_norm.value) ** 2
      raw["hessian"][i, s] = float(report.hessian_norm.value)
      raw["kappa"][i, s] = float(report.kappa)
      grad_sq, hessian = closed_form(params, x)
      deviation = max(deviation,
                      abs(raw["grad_sq"][i, s] / grad_sq.max() - 1),
                      abs(raw["hessian"][i, s] / hessian.max() - 1))
  means = {q: np.exp(np.log(raw[q]).mean(axis=1)) for q in QUANTITIES}
  return means, deviation


def slopes(widths, means):
  """Log-log slope of each quantity against the width."""
  log_d = np.log(np.asarray(widths, np.float64))
  return {q: float(np.polyfit(log_d, np.log(means[q]), 1)[0]) for q in QUANTITIES}


def plot(widths, results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = {"grad_sq": "‖∇f‖²", "hessian": "‖∇²f‖", "kappa": "κ"}
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
  for ax, (law, (means, found)) in zip(axes[0], results.items()):
    for q in QUANTITIES:
      ax.loglog(widths, means[q], "o-", label=f"{labels[q]} (slope {found[q]:+.2f})")
    ax.loglog(widths, means["kappa"][0] * (np.asarray(widths) / widths[0]) ** -0.5, "k:",
              label="d^-1/2")
    ax.set_xlabel("width d")
    ax.set_title(f"Seed network at initialisation, β {law}")
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
  parser.add_argument("--output-weights", nargs="+", default=list(OUTPUT_WEIGHTS),
                      choices=OUTPUT_WEIGHTS, help="law(s) of the output weights β_i")
  parser.add_argument("--symmetric", action="store_true",
                      help="paired neurons (w, β), (w, -β): f = 0 at init")
  parser.add_argument("--out", default=None, help="PNG path for the log-log plot")
  args = parser.parse_args(argv)

  start = time.time()
  widths = sorted(args.widths)
  results, found_all = {}, {}
  for law in args.output_weights:
    means, deviation = measure(widths, seeds=args.seeds, n=args.n, dim=args.dim,
                               method=args.method, output_weights=law,
                               symmetric=args.symmetric)
    found = slopes(widths, means)
    results[law] = (means, found)
    found_all[law] = dict(found, closed_form_deviation=deviation)
    print(f"β {law}{' (symmetric init)' if args.symmetric else ''}:")
    print(f"{'width':>7} {'‖∇f‖²':>10} {'‖∇²f‖':>10} {'κ':>10}")
    for i, width in enumerate(widths):
      print(f"{width:>7} {means['grad_sq'][i]:10.4f} {means['hessian'][i]:10.4f}"
            f" {means['kappa'][i]:10.4f}")
    print(f"log-log slopes: ‖∇f‖² {found['grad_sq']:+.3f} (seed: 0),"
          f" ‖∇²f‖ {found['hessian']:+.3f} (lecture's text: -1),"
          f" κ {found['kappa']:+.3f} (seed: -1/2)")
    print(f"largest relative deviation from the closed form: {deviation:.1e}\n")
  if args.out:
    plot(widths, results, args.out)
    print(f"saved {args.out}")
  print(f"({time.time() - start:.1f} s)")
  return found_all


if __name__ == "__main__":
  main()
