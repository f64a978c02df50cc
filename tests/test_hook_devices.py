"""The hook under ``pmap`` and with params of changing shardings: one compilation per run.

Runs in a child process with four CPU devices
(``--xla_force_host_platform_device_count=4`` must be set before jax is
imported). Compilations are counted with a ``jax.monitoring`` listener on the
``backend_compile`` event, which names the compiled function.
"""

import json
import os
import subprocess
import sys

CHILD = r'''
import json
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from flax import linen as nn
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ntk_diag as nd

assert jax.device_count() == 4, jax.devices()
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiled.append(kw.get("fun_name"))
    if "backend_compile" in event else None)
out = {}


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(8)(x))
    return nn.Dense(3)(nn.tanh(h))


class TrainState(train_state.TrainState):
  batch_stats: Any


model = Net()
x = jax.random.normal(jax.random.key(0), (32, 5))
y = jnp.arange(32) % 3
variables = model.init(jax.random.key(1), x[:1], train=False)
apply_fn, _ = nd.from_linen(model, variables, train=False)

# ---- Flax's imagenet example: a replicated TrainState and a pmapped step.
state = jax_utils.replicate(TrainState.create(
    apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
    tx=optax.sgd(0.1, momentum=0.9)))


def train_step(state, x, y):
  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
  grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, "batch")
  stats = jax.lax.pmean(updates["batch_stats"], "batch")
  return state.apply_gradients(grads=grads, batch_stats=stats)


p_train_step = jax.pmap(train_step, axis_name="batch")
probe_x, probe_y = x[:8], y[:8]
hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=tempfile.mkdtemp(), every_steps=2,
                           loss="softmax_cross_entropy", norm_examples=4, log_images=False,
                           compute_norms=False)
hook_compiles, residuals = [], {}
for step in range(5):
  step_array = state.step[0]  # TrainState.step, a jax array (indexing it compiles here)
  jax.block_until_ready(step_array)
  before = len(compiled)
  took = hook(step_array, params=state.params, model_state={"batch_stats": state.batch_stats})
  hook_compiles.append(compiled[before:])
  if took:
    first = jax.tree.map(lambda a: np.asarray(a[0]), (state.params, state.batch_stats))
    logits = model.apply({"params": first[0], "batch_stats": first[1]}, probe_x[:4], train=False)
    residuals[step] = (hook.last.scalars["residual_norm"],
                       float(jnp.linalg.norm(jax.nn.softmax(logits) - jax.nn.one_hot(probe_y[:4], 3))))
  state = p_train_step(state, x.reshape(4, 8, 5), y.reshape(4, 8))
out["pmap_snapshot_compiles"] = sum(c.count("jit(_snapshot_entry)") for c in hook_compiles)
out["pmap_compiles_after_start"] = [c for c in hook_compiles[1:]]
out["pmap_residuals"] = residuals

# ---- Params of four different shardings, one run.
params = variables["params"]
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
model_axis = {"Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
              "Dense_1": {"kernel": P("model", None), "bias": P()},
              "BatchNorm_0": {"scale": P("model"), "bias": P("model")}}
variants = [
    ("uncommitted", params),
    ("device 1", jax.device_put(params, jax.devices()[1])),
    ("replicated", jax.device_put(params, NamedSharding(mesh, P()))),
    ("model-sharded", jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                                   params, model_axis)),
]
jax.block_until_ready(variants)
hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=tempfile.mkdtemp(), every_steps=1,
                           loss="softmax_cross_entropy", norm_examples=4, log_images=False,
                           compute_norms=False)
values, sharding_compiles = {}, []
for step, (name, p) in enumerate(variants):
  before = len(compiled)
  hook(step, params=p)
  sharding_compiles.append(compiled[before:])
  values[name] = hook.last.scalars
out["sharding_snapshot_compiles"] = sum(c.count("jit(_snapshot_entry)") for c in sharding_compiles)
out["sharding_compiles_after_start"] = sharding_compiles[1:]
out["sharding_values"] = values
print("RESULT " + json.dumps(out))
'''


def test_pmap_replicas_and_any_sharding_compile_once(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                        timeout=600, cwd=str(tmp_path))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  out = json.loads(lines[-1][len("RESULT "):])
  # pmap: replicated params and batch statistics, the first replica measured, one compilation.
  assert out["pmap_snapshot_compiles"] == 1
  assert out["pmap_compiles_after_start"] == [[]] * 4
  assert sorted(out["pmap_residuals"]) == ["0", "2", "4"]
  for logged, direct in out["pmap_residuals"].values():
    assert abs(logged - direct) <= 1e-5 * direct
  # Four shardings of the same params: one compilation, the same values.
  assert out["sharding_snapshot_compiles"] == 1
  assert out["sharding_compiles_after_start"] == [[]] * 3
  values = out["sharding_values"]
  for name, scalars in values.items():
    for tag, value in scalars.items():
      reference = values["uncommitted"][tag]
      if tag.startswith("weight_change") or tag.endswith("distance") or tag == "kernel_velocity":
        continue  # the four calls are four steps; these compare with the previous ones
      assert abs(value - reference) <= 1e-5 * max(abs(reference), 1e-3), (name, tag)
