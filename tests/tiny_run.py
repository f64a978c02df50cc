"""A few seconds of training with the hook attached: event files for the report / TensorBoard tests."""

import os
import shutil

import jax
import jax.numpy as jnp
import optax

import ntk_diag as nd
from models import MLP


def write_tiny_run(workdir, steps=6, every_steps=3):
  """Trains a small MLP with the hook (default settings) attached, logging to ``workdir``."""
  x = jax.random.normal(jax.random.key(0), (8, 4))
  y = jax.nn.one_hot(jnp.arange(8) % 3, 3)
  model = MLP(hidden=(16,), out=3)
  tx = optax.sgd(0.1)
  apply_fn, params = nd.from_linen(model, model.init(jax.random.key(1), x))
  opt_state = tx.init(params)
  grad_fn = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((apply_fn(p, x) - y) ** 2)))
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(workdir), every_steps=every_steps,
                             strict=True)
  for step in range(steps + 1):
    hook(step, params=params)
    updates, opt_state = tx.update(grad_fn(params), opt_state)
    params = optax.apply_updates(params, updates)
  return str(workdir)


def write_tiny_runs(root, names=("run_a", "run_b")):
  """``root/<name>`` per name; the runs after the first are copies (each hook compiles anew)."""
  first = write_tiny_run(os.path.join(root, names[0]))
  for name in names[1:]:
    shutil.copytree(first, os.path.join(root, name))
  return [os.path.join(root, name) for name in names]
