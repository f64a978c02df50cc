"""LazyTrainingHook on a Linen ResNet with BatchNorm, trained like Flax's imagenet example.

A small ResNet (conv stem, residual blocks of conv–BatchNorm–ReLU, global
average pool, dense head) on the offline 8×8 digits, trained on minibatches
with SGD + momentum on softmax cross-entropy. The ``TrainState`` carries
``batch_stats``, updated every step; the hook measures the model of this
step in eval mode (running averages) by receiving them as its model state,
and takes ``state.step`` (a jax array) as the step:

    hook(state.step, params=state.params, model_state={"batch_stats": state.batch_stats})

The probe targets are integer labels, with ``loss="softmax_cross_entropy"``
(the residual of κ is then ``‖softmax(f) − y‖``).

    python examples/resnet_batchnorm.py --workdir runs/resnet
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import ntk_diag as nd


class ResidualBlock(nn.Module):
  filters: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    h = nn.relu(norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(x)))
    h = norm(scale_init=nn.initializers.zeros)(nn.Conv(self.filters, (3, 3), use_bias=False)(h))
    return nn.relu(x + h)


class ResNet(nn.Module):
  filters: int = 16
  blocks: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        nn.Conv(self.filters, (3, 3), use_bias=False)(x)))
    for _ in range(self.blocks):
      x = ResidualBlock(self.filters)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: Any


def load_data(num_train: int):
  from ntk_diag.datasets import load_numpy
  x, labels = load_numpy("digits", split="train")
  x = (x[:num_train] - 0.5).reshape(-1, 8, 8, 1).astype(np.float32)
  return x, labels[:num_train].astype(np.int32)


@jax.jit
def train_step(state: TrainState, x, y):
  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (updates, logits)
  (loss, (updates, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  return state, loss, jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/resnet")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--filters", type=int, default=16)
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--num-train", type=int, default=1024)
  parser.add_argument("--probe-size", type=int, default=32)
  parser.add_argument("--every-steps", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  if os.path.exists(args.workdir):  # a new run: a reused workdir would hold another θ0
    shutil.rmtree(args.workdir)
  x, labels = load_data(args.num_train)
  model = ResNet(filters=args.filters, blocks=args.blocks)
  variables = model.init(jax.random.key(args.seed), x[:1], train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            batch_stats=variables["batch_stats"],
                            tx=optax.sgd(args.learning_rate, momentum=0.9))

  # The measured function: the model in eval mode, its statistics passed per step.
  apply_fn, _ = nd.from_linen(model, variables, train=False)
  hook = nd.LazyTrainingHook(apply_fn, x[:args.probe_size], labels[:args.probe_size],
                             workdir=args.workdir, every_steps=args.every_steps,
                             loss="softmax_cross_entropy")
  rng = np.random.default_rng(args.seed)
  steps_per_epoch = len(x) // args.batch_size
  for epoch in range(args.epochs):
    order = rng.permutation(len(x))
    for i in range(steps_per_epoch):
      hook(state.step, params=state.params, model_state={"batch_stats": state.batch_stats})
      batch = order[i * args.batch_size:(i + 1) * args.batch_size]
      state, loss, accuracy = train_step(state, x[batch], labels[batch])
    print(f"epoch {epoch}: loss {float(loss):.3f}, batch accuracy {float(accuracy):.2f}")
  hook(state.step, params=state.params, model_state={"batch_stats": state.batch_stats})
  last = hook.last
  print(f"step {last.step}: " + ", ".join(
      f"{name} {last.scalars[name]:.4g}" for name in
      ("kappa", "residual_norm", "kernel_drift", "twin_gap", "weight_change")))
  print(f"TensorBoard logs: {os.path.abspath(args.workdir)}")
  return {"state": state, "hook": hook}


if __name__ == "__main__":
  main()
