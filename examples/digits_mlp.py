"""The main job (`make demo`): is an MLP on digits training lazily?

Trains a one-hidden-layer tanh MLP in the NTK parametrization (the lecture's
``f(x) = d^-1/2 Σ βᵢ σ(wᵢᵀx)``, N(0, 1) weights) at a narrow and a wide width,
with full-batch gradient descent on the mean squared loss
``(1/n) Σ_i ½‖f(x_i) − y_i‖²`` against one-hot targets, and ``LazyTrainingHook``
attached the way a user adds it to their loop. A ``LinearizedTwin`` trains in
lockstep with the network, with the same optimiser on the same batches. Then
``nd.compare`` tabulates, on the test split, the trained network, its twin,
the NTK kernel predictor at the same training time and the kernel
interpolator (t = ∞).

    python examples/digits_mlp.py --workdir runs/digits
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import json
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


RIDGE = 1e-3  # relative to λ_max, for the t = ∞ interpolator only


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


def make_model(width: int, num_classes: int, input_dim: int, seed: int = 0):
  """``(apply_fn, params)`` of the MLP (also the ``--model`` factory of ``ntk-diag compare``)."""
  model = MLP(width=width, num_classes=num_classes)
  return nd.from_linen(model, model.init(jax.random.key(seed), jnp.zeros((1, input_dim))))


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
  """Full-batch GD with the hook and the lockstep twin; returns the comparison and the last tags."""
  x_train, y_train, x_test, y_test, num_classes = data
  apply_fn, params = make_model(width, num_classes, x_train.shape[1], seed)

  # Learning rate from the NTK at θ0: GD on the mean loss (1/n)·½‖f − y‖² is
  # stable when lr < 2n/λ_max; lr = n/λ_max is the classic 1/λ_max on the sum.
  eig_max = float(nd.kernel_stats(nd.empirical_ntk(apply_fn, params, x_train), top_k=1)["eig_max"])
  learning_rate = len(x_train) / eig_max
  tx = optax.sgd(learning_rate)

  loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, x_train) - y_train) ** 2, axis=1))
  state = train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx)
  twin = nd.LinearizedTwin(apply_fn, params, tx)   # same optimiser, same batches
  twin_state = twin.init()

  @jax.jit
  def train_step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  hook = nd.LazyTrainingHook(apply_fn, x_train[:probe_size], y_train[:probe_size], workdir=workdir,
                             every_steps=every_steps, on_steps=[steps], norm_examples=4,
                             learning_rate=learning_rate)
  from tqdm import tqdm
  for step in tqdm(range(steps + 1), desc=f"width {width:>5}", ncols=80):
    hook(step, params=state.params, twin_params=twin_state.params)   # <- the line a user adds
    if step < steps:
      state = train_step(state)
      twin_state = twin.step(twin_state, x_train, y_train)

  # θ0 from the hook's workdir; the kernel predictor runs for the same time
  # (η = lr / n for the mean loss, t = steps; see nd.kernel_learning_rate).
  comparison = nd.compare(apply_fn, workdir, state.params, x_train, y_train, x_test, y_test,
                          twin_params=twin_state.params, learning_rate=learning_rate,
                          steps=steps, interpolator_ridge=RIDGE)
  from ntk_diag import params_io
  params_io.save_params(os.path.join(workdir, "params.npz"), state.params)
  params_io.save_params(os.path.join(workdir, "twin_params.npz"), twin_state.params)
  return {"comparison": comparison, "last": hook.last.scalars, "learning_rate": learning_rate}


def print_tables(results, steps):
  """One comparison table per width, then the hook's last values."""
  for width, result in results.items():
    print(f"\nwidth {width}: {result['comparison'].caption()}")
    print(result["comparison"].table())
    last = result["last"]
    print("hook, end of training: " + ", ".join(
        f"{tag} {last[tag]:.4f}" for tag in ("kappa", "kernel_drift", "weight_change", "twin_gap",
                                             "twin_distance", "lazy_radius_ratio", "sharpness_lr")))


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
  print_tables(results, args.steps)
  print(f"\nTrained {len(args.widths)} widths in {time.time() - start:.0f} s.")
  x_train, y_train, x_test, y_test, num_classes = data
  np.savez(os.path.join(args.workdir, "data.npz"), x_train=x_train, y_train=y_train,
           x_test=x_test, y_test=y_test)
  width = args.widths[-1]
  kwargs = json.dumps(dict(width=width, num_classes=num_classes, input_dim=x_train.shape[1]))
  run = os.path.join(args.workdir, f"width_{width}")
  print(f"The same table from the command line:\n  ntk-diag compare {run} --model "
        f"{os.path.relpath(os.path.abspath(__file__))}:make_model --model-kwargs '{kwargs}' "
        f"--params {run}/params.npz --twin-params {run}/twin_params.npz "
        f"--data {args.workdir}/data.npz --learning-rate {results[width]['learning_rate']:.6g} "
        f"--steps {args.steps}")
  print(f"TensorBoard logs: {os.path.abspath(args.workdir)}")
  print(f"View them with:\n  tensorboard --logdir {os.path.relpath(os.path.dirname(os.path.abspath(args.workdir)))}")
  return results


if __name__ == "__main__":
  main()
