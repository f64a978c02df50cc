"""LazyTrainingHook in a flax-examples-style training loop, with resuming.

The loop of the Flax examples (``examples/mnist``, ``examples/imagenet``): a
linen model in a ``TrainState``, minibatch SGD with optax, one CLU
``MetricWriter`` shared by everything that logs, a list of periodic hooks
(``clu.periodic_actions.ReportProgress`` and our ``LazyTrainingHook``) and an
orbax ``CheckpointManager``. Run it, interrupt it (or pass a smaller
``--steps`` first), run it again with the same ``--workdir``: it restores
the latest ``TrainState`` and continues, and the hook restores θ0 from the
workdir, so κ, kernel drift and weight change keep being measured from the
original initialisation.

    python examples/clu_loop.py --workdir runs/clu --steps 200
    python examples/clu_loop.py --workdir runs/clu --steps 400   # resumes at 200
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers
from clu import periodic_actions
from flax import linen as nn
from flax.training import train_state

import ntk_diag as nd


class MLP(nn.Module):
  width: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.num_classes)(x)


def load_data(num_train: int | None):
  """Digits as ``(x, one-hot y)``; squared loss on one-hot targets, as in the NTK theory."""
  from ntk_diag.datasets import load_numpy
  x, labels = load_numpy("digits", split="train")
  if num_train is not None:
    x, labels = x[:num_train], labels[:num_train]
  return x, np.eye(10, dtype=np.float32)[labels]


def create_train_state(model: nn.Module, learning_rate: float, input_dim: int, seed: int):
  params = model.init(jax.random.key(seed), jnp.zeros((1, input_dim)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optax.sgd(learning_rate, momentum=0.9))


@jax.jit
def train_step(state: train_state.TrainState, x, y):
  def loss_fn(params):
    return 0.5 * jnp.mean(jnp.sum((state.apply_fn({"params": params}, x) - y) ** 2, axis=-1))
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """The minibatch of ``step``: a function of the step only, so a resumed run sees the same data."""
  return np.random.default_rng((seed, step)).choice(n, size=min(batch_size, n), replace=False)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/clu")
  parser.add_argument("--steps", type=int, default=400, help="Total number of training steps.")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--num-train", type=int, default=None, help="Default: the whole train split.")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=0.01)
  parser.add_argument("--probe-size", type=int, default=64)
  parser.add_argument("--log-every", type=int, default=20, help="Steps between loss / progress logs.")
  parser.add_argument("--ntk-every", type=int, default=50, help="Steps between ntk_diag snapshots.")
  parser.add_argument("--checkpoint-every", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  x_train, y_train = load_data(args.num_train)
  model = MLP(width=args.width)
  state = create_train_state(model, args.learning_rate, x_train.shape[1], args.seed)

  # Orbax: restore the latest TrainState if the workdir has one.
  checkpoints = ocp.CheckpointManager(
      os.path.join(os.path.abspath(args.workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=args.checkpoint_every))
  initial_step = 0
  if checkpoints.latest_step() is not None:
    initial_step = checkpoints.latest_step()
    state = checkpoints.restore(initial_step, args=ocp.args.StandardRestore(state))
    print(f"Resumed from step {initial_step}.")

  # One writer for everything; the hook gets it instead of creating its own.
  writer = metric_writers.create_default_writer(args.workdir)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=args.steps, writer=writer, every_steps=args.log_every)
  apply_fn, _ = nd.from_linen(model, {"params": state.params})
  probe = min(args.probe_size, len(x_train))
  # On a resumed run the hook finds θ0 under `workdir` and restores it.
  lazy_hook = nd.LazyTrainingHook(apply_fn, x_train[:probe], y_train[:probe],
                                  workdir=args.workdir, writer=writer,
                                  every_steps=args.ntk_every, on_steps=[args.steps])

  if initial_step == 0:
    lazy_hook(0, params=state.params)  # θ0 and the snapshot at initialisation
  for step in range(initial_step + 1, args.steps + 1):
    idx = batch_indices(step, len(x_train), args.batch_size, args.seed)
    with report_progress.timed("train_step", wait_jax_async_dispatch=False):
      state, loss = train_step(state, x_train[idx], y_train[idx])
    if step % args.log_every == 0 or step == args.steps:
      writer.write_scalars(step, {"train_loss": float(loss)})
    # The Flax examples run `for h in hooks: h(step)`; the lazy hook also takes the parameters.
    report_progress(step)
    lazy_hook(step, params=state.params)
    checkpoints.save(step, args=ocp.args.StandardSave(state))  # every --checkpoint-every steps
  if checkpoints.latest_step() != args.steps and initial_step < args.steps:
    checkpoints.save(args.steps, args=ocp.args.StandardSave(state), force=True)
  checkpoints.wait_until_finished()
  checkpoints.close()
  writer.flush()

  last = lazy_hook.last
  if last is not None:
    print(f"step {last.step}: kappa {last.scalars['kappa']:.4g}  "
          f"kernel_drift {last.scalars['kernel_drift']:.4g}  "
          f"weight_change {last.scalars['weight_change']:.4g}")
  print(f"TensorBoard logs: {os.path.abspath(args.workdir)}")
  return {"state": state, "hook": lazy_hook, "initial_step": initial_step}


if __name__ == "__main__":
  main()
