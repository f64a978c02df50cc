"""Sharpness and the edge of stability: a lazy run and a catapult run.

A wide two-layer ReLU network in the NTK parametrization is trained by
full-batch gradient descent on the mean squared loss, twice, with learning
rates set from the sharpness λ0 = λ_max(∇²L(θ0)) (:func:`ntk_diag.loss_sharpness`):

* lazy: ``η = 1/λ0``. ``η·sharpness`` stays near 1, below 2: the loss
  decreases monotonically and the NTK barely moves (the kernel regime);
* catapult: ``η = 3/λ0``, between 2/λ0 and 4/λ0 (Lewkowycz et al. 2020). At
  first ``η·sharpness = 3 > 2``: gradient descent is unstable along the top
  eigenvector, the loss spikes, and the network escapes by flattening —
  the sharpness drops until ``η·sharpness < 2`` — then the loss converges.
  The NTK moved: the run left the kernel regime, which no kernel predictor
  at θ0 describes. (Below ``4/λ0`` it converges; above, it diverges.)

    python examples/sharpness.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntk_diag as nd


def make_problem(n: int, dim: int, width: int, seed: int = 0):
  """``(apply_fn, params, x, y)``: ±1 targets from the first input coordinate."""
  k_x, k_w, k_v = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k_x, (n, dim))
  y = jnp.sign(x[:, :1])
  params = {"w": jax.random.normal(k_w, (dim, width)), "v": jax.random.normal(k_v, (width, 1))}

  def apply_fn(p, x):
    return jax.nn.relu(x @ p["w"] / np.sqrt(dim)) @ p["v"] / np.sqrt(width)

  return apply_fn, params, x, y


def run(apply_fn, params, x, y, learning_rate: float, steps: int, measure_at):
  """GD on the mean loss; losses every step, ``η·sharpness`` at ``measure_at`` steps."""
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, x) - y) ** 2, axis=1))
  tx = optax.sgd(learning_rate)

  @jax.jit
  def step(p, opt_state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(p, updates), opt_state, value

  opt_state, losses, sharpness_lr = tx.init(params), [], {}
  p = params
  for i in range(steps + 1):
    if i in measure_at:
      sharpness_lr[i] = learning_rate * float(nd.loss_sharpness(apply_fn, p, x, y).value)
    if i < steps:
      p, opt_state, value = step(p, opt_state)
      losses.append(float(value))
  k0 = nd.empirical_ntk(apply_fn, params, x)
  drift = float(nd.kernel_stats(nd.empirical_ntk(apply_fn, p, x), K0=k0)["kernel_drift"])
  return {"losses": np.array(losses), "sharpness_lr": sharpness_lr, "kernel_drift": drift}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--num-train", type=int, default=32)
  parser.add_argument("--dim", type=int, default=8)
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)

  apply_fn, params, x, y = make_problem(args.num_train, args.dim, args.width)
  sharpness0 = float(nd.loss_sharpness(apply_fn, params, x, y).value)
  measure_at = sorted({0, 2, 5, 10, 20, 40, args.steps // 2, args.steps} & set(range(args.steps + 1)))
  results = {}
  print(f"sharpness at θ0: λ0 = {sharpness0:.4g}")
  for name, factor in (("lazy", 1.0), ("catapult", 3.0)):
    eta = factor / sharpness0
    result = run(apply_fn, params, x, y, eta, args.steps, measure_at)
    results[name] = result
    losses = result["losses"]
    print(f"\n{name}: η = {factor:g}/λ0 = {eta:.4g}")
    print("  step   η·sharpness   loss")
    for step, value in result["sharpness_lr"].items():
      loss = losses[min(step, len(losses) - 1)]
      print(f"  {step:4d}   {value:11.3f}   {loss:.4g}")
    print(f"  largest loss {losses.max():.4g} at step {int(losses.argmax())};"
          f" kernel drift ‖K − K0‖/‖K0‖ = {result['kernel_drift']:.3g}")
  return results


if __name__ == "__main__":
  main()
