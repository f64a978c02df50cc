"""Theorem 1 made visible: wide networks trained by gradient descent follow the NTK.

The lecture's one-hidden-layer network

    f(x; θ) = d^{-1/2} Σ_i β_i tanh(w_iᵀ x),   w_i, β_i ~ N(0, 1) i.i.d.,

is trained by full-batch gradient descent (step ``lr``, ``steps`` steps) on the
SUM loss ``½‖f(X) − y‖²`` for a 1-D regression task (``y = sin(u)``; the input
is ``x = (u, 1)``, so ``w_i`` holds a bias). At the same training time it is
compared on held-out test points with

* the NTK predictor ``nd.kernel_predictor(K, y, learning_rate=lr)(t=steps, ...)``
  built from the empirical NTK at θ0 (gradient flow of the linearized net), and
* the linearized twin ``nd.linearize(f, θ0)`` trained by the same GD.

The reported gap is ``‖f_net − f_ntk‖ / ‖f_ntk − f0‖`` on the test points: the
error relative to how far training moved the predictions (``f0`` is the
network at θ0; its O(1) random offset is not part of what is learned, so it
is kept out of the denominator). Lee et al. (2019) predict ``O(d^{-1/2})``.

    python examples/theorem1.py --widths 256 1024 4096 16384 --out theorem1.png
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import ntk_diag as nd

DEFAULT_WIDTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def apply_fn(params, x):
  """``f(x) = d^{-1/2} β · tanh(W x)`` for a batch ``x`` of shape ``(n, D)``; returns ``(n,)``."""
  width = params["beta"].shape[0]
  return jnp.tanh(x @ params["w"]) @ params["beta"] / jnp.sqrt(width)


def init_params(key, width, dim):
  kw, kb = jax.random.split(key)
  return {"w": jax.random.normal(kw, (dim, width)), "beta": jax.random.normal(kb, (width,))}


def make_data(n_train=24, n_test=50):
  """``y = sin(u)`` on ``u ∈ [−3, 3]``; inputs ``(u, 1)``; test points interleave the train points."""
  def features(u):
    return jnp.stack([u, jnp.ones_like(u)], axis=1)
  u_train = jnp.linspace(-3.0, 3.0, n_train)
  u_test = jnp.linspace(-3.2, 3.2, n_test)
  return features(u_train), jnp.sin(u_train), features(u_test), u_test


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def gradient_descent(model, params, x, y, lr, steps):
  """``steps`` full-batch GD steps on ``½‖model(params, x) − y‖²``."""
  grad = jax.grad(lambda p: 0.5 * jnp.sum((model(p, x) - y) ** 2))

  def body(_, p):
    return jax.tree.map(lambda a, g: a - lr * g, p, grad(p))

  return jax.lax.fori_loop(0, steps, body, params)


def _gap(a, b, ref):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b - ref))


def run_width(width, seed, data, lr, steps):
  """One network of ``width`` hidden units: test predictions of net, twin and NTK predictor."""
  x_train, y_train, x_test, _ = data
  params0 = init_params(jax.random.PRNGKey(seed), width, x_train.shape[1])
  f0_train, f0_test = apply_fn(params0, x_train), apply_fn(params0, x_test)

  k_train = nd.empirical_ntk(apply_fn, params0, x_train)  # (n, n): scalar output
  k_test = nd.empirical_ntk(apply_fn, params0, x_test, x_train)
  predict = nd.kernel_predictor(k_train, y_train, learning_rate=lr)
  f_ntk = predict(steps, f0_train, f0_test, k_test)

  net = gradient_descent(apply_fn, params0, x_train, y_train, lr, steps)
  apply_lin = nd.linearize(apply_fn, params0)
  twin = gradient_descent(apply_lin, params0, x_train, y_train, lr, steps)
  f_net, f_lin = apply_fn(net, x_test), apply_lin(twin, x_test)
  return dict(
      gap_ntk=_gap(f_net, f_ntk, f0_test),
      gap_twin=_gap(f_net, f_lin, f0_test),
      gap_gd_flow=_gap(f_lin, f_ntk, f0_test),
      train_loss=float(0.5 * jnp.sum((apply_fn(net, x_train) - y_train) ** 2)),
      f0=np.asarray(f0_test), f_net=np.asarray(f_net), f_ntk=np.asarray(f_ntk))


def loglog_slope(widths, gaps):
  """Least-squares slope of ``log gap`` against ``log width``."""
  return float(np.polyfit(np.log(widths), np.log(gaps), 1)[0])


def run(widths=DEFAULT_WIDTHS, steps=2000, lr=2e-3, seeds=3, n_train=24, n_test=50):
  """Gaps per width (mean over ``seeds`` initialisations) and fitted log-log slopes."""
  data = make_data(n_train, n_test)
  rows = []
  for width in widths:
    per_seed = [run_width(width, seed, data, lr, steps) for seed in range(seeds)]
    row = {key: float(np.mean([r[key] for r in per_seed]))
           for key in ("gap_ntk", "gap_twin", "gap_gd_flow", "train_loss")}
    row.update(width=int(width), example=per_seed[0])
    rows.append(row)
  widths = [r["width"] for r in rows]
  return dict(rows=rows, data=data, steps=steps, lr=lr,
              slope_ntk=loglog_slope(widths, [r["gap_ntk"] for r in rows]),
              slope_twin=loglog_slope(widths, [r["gap_twin"] for r in rows]))


def print_table(result):
  print(f"steps={result['steps']}  lr={result['lr']}  (t = steps, learning_rate = lr)")
  print(f"{'width':>7} {'gap vs NTK':>11} {'gap vs twin':>12} {'twin vs NTK':>12} {'train loss':>11}")
  for r in result["rows"]:
    print(f"{r['width']:>7d} {r['gap_ntk']:>11.4f} {r['gap_twin']:>12.4f}"
          f" {r['gap_gd_flow']:>12.2e} {r['train_loss']:>11.4f}")
  print(f"log-log slope: net vs NTK predictor {result['slope_ntk']:+.3f},"
        f" net vs linearized twin {result['slope_twin']:+.3f} (Lee et al. 2019: <= -0.5)")


def plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  widths = np.array([r["width"] for r in rows])
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for key, label, slope in (("gap_ntk", "net vs NTK predictor", result["slope_ntk"]),
                            ("gap_twin", "net vs linearized twin", result["slope_twin"])):
    gaps = np.array([r[key] for r in rows])
    ax1.loglog(widths, gaps, "o-", label=f"{label} (slope {slope:+.2f})")
  ref = rows[0]["gap_ntk"] * np.sqrt(widths[0] / widths)
  ax1.loglog(widths, ref, "k--", lw=1, label=r"$\propto d^{-1/2}$")
  ax1.set_xlabel("width d")
  ax1.set_ylabel(r"$\|f_{net} - f\| / \|f - f_0\|$ on test points")
  ax1.set_title(f"Gap after {result['steps']} GD steps (lr={result['lr']})")
  ax1.legend(fontsize=8)

  x_train, y_train, _, u_test = result["data"]
  for r, color in ((rows[0], "C0"), (rows[-1], "C1")):
    ax2.plot(u_test, r["example"]["f_net"], color=color, label=f"network, d={r['width']}")
    ax2.plot(u_test, r["example"]["f_ntk"], "--", color=color, label="its NTK predictor")
  ax2.plot(x_train[:, 0], y_train, "k.", label="train data")
  ax2.set_xlabel("u")
  ax2.set_title("Test predictions (seed 0)")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--out", default="theorem1.png", help="PNG path; '' to skip the plot")
  args = parser.parse_args(argv)
  start = time.monotonic()
  result = run(args.widths, args.steps, args.lr, args.seeds)
  print_table(result)
  if args.out:
    plot(result, args.out)
    print(f"wrote {args.out}")
  print(f"elapsed {time.monotonic() - start:.1f}s")
  return result


if __name__ == "__main__":
  main()
