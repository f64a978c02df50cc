"""LazyTrainingHook on an NNX model with BatchNorm and Dropout, held in train mode.

A CNN (``flax.nnx``: conv, BatchNorm, ReLU, Dropout, dense head) on the
offline 8×8 digits, trained on minibatches with ``nnx.Optimizer`` (Adam) on
softmax cross-entropy. The training loop keeps the model in train mode the
whole time, as NNX loops usually do; the hook is given the model itself,

    hook(step, model=model)

reads its ``nnx.Param`` state and its other state (the BatchNorm averages of
this step), and evaluates a copy in eval mode — Dropout off, running
averages, no ``rngs`` — so ``model`` is never switched or mutated.

    python examples/nnx_batchnorm_dropout.py --workdir runs/nnx_bn
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ntk_diag as nd


class CNN(nnx.Module):

  def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.hidden = nnx.Linear(channels * 16, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.norm(self.conv(x)))
    h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
    h = self.dropout(nnx.relu(self.hidden(h.reshape(h.shape[0], -1))))
    return self.head(h)


def load_data(num_train: int):
  from ntk_diag.datasets import load_numpy
  x, labels = load_numpy("digits", split="train")
  x = (x[:num_train] - 0.5).reshape(-1, 8, 8, 1).astype(np.float32)
  return x, labels[:num_train].astype(np.int32)


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/nnx_bn")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--num-train", type=int, default=1024)
  parser.add_argument("--probe-size", type=int, default=32)
  parser.add_argument("--every-steps", type=int, default=25)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  if os.path.exists(args.workdir):  # a new run: a reused workdir would hold another θ0
    shutil.rmtree(args.workdir)
  x, labels = load_data(args.num_train)
  model = CNN(args.channels, args.hidden, rngs=nnx.Rngs(args.seed))
  model.train()  # the loop holds it in train mode; the hook evaluates an eval-mode copy
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)
  apply_fn, _ = nd.from_nnx(model)
  hook = nd.LazyTrainingHook(apply_fn, x[:args.probe_size], labels[:args.probe_size],
                             workdir=args.workdir, every_steps=args.every_steps,
                             loss="softmax_cross_entropy")
  rng = np.random.default_rng(args.seed)
  for step in range(args.steps + 1):
    hook(step, model=model)
    if step == args.steps:
      break
    batch = rng.choice(len(x), args.batch_size, replace=False)
    loss = train_step(model, optimizer, x[batch], labels[batch])
    if step % args.every_steps == 0:
      print(f"step {step}: loss {float(loss):.3f}")
  last = hook.last
  print(f"step {last.step}: " + ", ".join(
      f"{name} {last.scalars[name]:.4g}" for name in
      ("kappa", "residual_norm", "kernel_drift", "twin_gap", "weight_change")))
  print(f"TensorBoard logs: {os.path.abspath(args.workdir)}")
  return {"model": model, "hook": hook}


if __name__ == "__main__":
  main()
