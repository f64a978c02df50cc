"""The main job (`make demo`): is an MLP on digits training lazily?

Trains a one-hidden-layer tanh MLP in the NTK parametrization (the seed's
``f(x) = d^-1/2 Σ βᵢ σ(wᵢᵀx)``, N(0, 1) weights) at a narrow and a wide width,
with full-batch gradient descent on the squared loss ``½‖f(X) − Y‖²`` against
one-hot targets, and ``LazyTrainingHook`` attached the way a user adds it to
their loop. Then it compares, on the test split, the trained network with its
linearized twin (trained by the same gradient descent) and with the NTK
kernel predictor at the same training time and at t = ∞.

    python examples/digits_mlp.py --workdir runs/digits
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import ntk_diag as nd


RIDGE = 1e-3  # relative to λ_max, for the t = ∞ predictor only


class NTKDense(nn.Module):
  """Dense layer in the NTK parametrization: ``y = x W / sqrt(fan_in)``, ``W ~ N(0, 1)``."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
    return x @ kernel / jnp.sqrt(x.shape[-1])


class MLP(nn.Module):
  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return NTKDense(self.num_classes)(jnp.tanh(NTKDense(self.width)(x)))


def load_data(dataset: str, num_train: int, data_dir: str | None):
  from ntk_diag.datasets import load_numpy
  x_train, y_train = load_numpy(dataset, split="train", data_dir=data_dir)
  x_test, y_test = load_numpy(dataset, split="test", data_dir=data_dir)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3  # standardise features
  prep = lambda x: (x - mean) / std
  return (prep(x_train[:num_train]), np.eye(num_classes, dtype=np.float32)[y_train[:num_train]],
          prep(x_test), np.eye(num_classes, dtype=np.float32)[y_test], num_classes)


def train(width, data, *, steps, workdir, every_steps, probe_size, seed=0):
  """Full-batch GD with the hook attached; returns everything the table needs."""
  x_train, y_train, x_test, y_test, num_classes = data
  model = MLP(width=width, num_classes=num_classes)
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(seed), x_train[:1]))

  # Learning rate from the NTK at θ0: stable for GD on ½‖f − y‖² when η < 2/λ_max.
  kernel_train = nd.empirical_ntk(apply_fn, params, x_train)
  eig_max = float(nd.kernel_stats(kernel_train, top_k=1)["eig_max"])
  learning_rate = 1.0 / eig_max

  loss = lambda p, f: 0.5 * jnp.sum((f(p, x_train) - y_train) ** 2)
  state = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=optax.sgd(learning_rate))
  twin_fn = nd.linearize(apply_fn, params)
  twin = train_state.TrainState.create(apply_fn=twin_fn, params=params, tx=optax.sgd(learning_rate))

  @jax.jit
  def train_step(state, twin):
    state = state.apply_gradients(grads=jax.grad(loss)(state.params, apply_fn))
    twin = twin.apply_gradients(grads=jax.grad(loss)(twin.params, twin_fn))
    return state, twin

  hook = nd.LazyTrainingHook(apply_fn, x_train[:probe_size], y_train[:probe_size], workdir=workdir,
                             every_steps=every_steps, on_steps=[steps], norm_examples=4)
  from tqdm import tqdm
  for step in tqdm(range(steps + 1), desc=f"width {width:>5}", ncols=80):
    hook(step, params=state.params)          # <- the one line a user adds
    if step < steps:
      state, twin = train_step(state, twin)

  # NTK kernel predictor (NTK at θ0), gradient flow for the same time η·steps.
  # t = ∞ is the K⁻¹ interpolator; a tiny ridge keeps it defined for the narrow
  # net, whose (n·k × n·k) kernel is numerically singular in float32.
  predict = nd.kernel_predictor(kernel_train, y_train, learning_rate=learning_rate)
  interpolate = nd.kernel_predictor(kernel_train, y_train, ridge=RIDGE * eig_max)
  kernel_test = nd.empirical_ntk(apply_fn, params, x_test, x_train)
  f0_train, f0_test = apply_fn(params, x_train), apply_fn(params, x_test)
  outputs = {
      "network": apply_fn(state.params, x_test),
      "linearized twin": twin_fn(twin.params, x_test),
      "NTK predictor, t": predict(steps, f0_train, f0_test, kernel_test),
      "NTK predictor, t=∞": interpolate(None, f0_train, f0_test, kernel_test),
  }
  return {"outputs": {k: np.asarray(v) for k, v in outputs.items()}, "y_test": y_test,
          "last": hook.last.scalars, "f0_test": np.asarray(f0_test)}


def comparison_rows(result):
  """``{row name: value}`` for one width."""
  outputs, y = result["outputs"], result["y_test"]
  net = outputs["network"]
  rows = {}
  for name, f in outputs.items():
    rows[f"test MSE  [{name}]"] = float(np.mean(np.sum((f - y) ** 2, axis=1)))
  for name, f in outputs.items():
    rows[f"accuracy  [{name}]"] = float(np.mean(f.argmax(1) == y.argmax(1)))
  for name, f in outputs.items():
    if name != "network":
      rows[f"argmax agreement with network [{name}]"] = float(np.mean(f.argmax(1) == net.argmax(1)))
  moved = np.linalg.norm(net - result["f0_test"])
  for name in ("linearized twin", "NTK predictor, t"):
    rows[f"‖f_net − f‖/‖f_net − f0‖ [{name}]"] = float(np.linalg.norm(net - outputs[name]) / moved)
  for tag in ("kappa", "kernel_drift", "weight_change", "twin_gap"):
    rows[f"{tag} (end of training)"] = result["last"][tag]
  return rows


def print_table(results):
  widths = list(results)
  table = {w: comparison_rows(r) for w, r in results.items()}
  names = list(table[widths[0]])
  first = max(len(n) for n in names) + 2
  print("\n" + "metric".ljust(first) + "".join(f"width {w}".rjust(14) for w in widths))
  print("-" * (first + 14 * len(widths)))
  for name in names:
    print(name.ljust(first) + "".join(f"{table[w][name]:14.4f}" for w in widths))
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/digits", help="TensorBoard logs go to WORKDIR/width_<d>.")
  parser.add_argument("--dataset", default="digits",
                      help="'digits' (offline, bundled) or any TFDS image dataset name, e.g. mnist.")
  parser.add_argument("--data-dir", default=None, help="TFDS data_dir.")
  parser.add_argument("--widths", type=int, nargs="+", default=[64, 4096])
  parser.add_argument("--num-train", type=int, default=256)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--every-steps", type=int, default=50)
  parser.add_argument("--probe-size", type=int, default=64)
  parser.add_argument("--keep", action="store_true", help="Keep an existing WORKDIR (resume).")
  args = parser.parse_args(argv)

  if os.path.exists(args.workdir) and not args.keep:
    shutil.rmtree(args.workdir)
  data = load_data(args.dataset, args.num_train, args.data_dir)
  start = time.time()
  results = {w: train(w, data, steps=args.steps, workdir=os.path.join(args.workdir, f"width_{w}"),
                      every_steps=args.every_steps, probe_size=args.probe_size)
             for w in args.widths}
  table = print_table(results)
  print(f"\nTrained {len(args.widths)} widths in {time.time() - start:.0f} s.")
  print(f"TensorBoard logs: {os.path.abspath(args.workdir)}")
  print(f"View them with:\n  tensorboard --logdir {os.path.relpath(os.path.dirname(os.path.abspath(args.workdir)))}")
  return table


if __name__ == "__main__":
  main()
