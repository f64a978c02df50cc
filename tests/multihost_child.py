"""One process of a two-process run (``jax.distributed`` on localhost), and the
problem it shares with the one-process reference of ``test_multihost.py``.

Run as ``python multihost_child.py PROCESS_ID PORT WORKDIR PHASE DATA OUT`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: two processes, four
devices on a 2 x 2 ``("data", "model")`` mesh whose rows are the processes.
The params are sharded FSDP-style over all four devices (each leaf's first
axis when 4 divides it), the 16 probe points over the processes (``"data"``).
``PHASE`` is ``fresh`` (the pure functions, then the hook at steps 0-2) or
``resume`` (a new hook on the same workdir at step 5). Each process writes
what it measured, gathered to host numpy, to ``OUT`` as JSON.
"""

import json
import os
import sys

FRESH_STEPS = (0, 1, 2)
RESUME_STEP = 5
NORM_EXAMPLES = 2
# Few iterations: the two runs need not converge to be compared, as both run the
# same iterations from the same start vectors; across processes each
# Hessian-vector product costs ~60 ms here (a dozen gloo collectives).
NUM_ITERS = 6
TOL = 1e-6


def build_model():
  from flax import linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(16)(x))
      h = nn.tanh(nn.Dense(16)(h))
      return nn.Dense(2)(h)

  return MLP()


def make_data(path):
  """Writes θ0, a direction for later steps and the probe set to ``path`` (npz)."""
  import jax
  import numpy as np

  import ntk_diag as nd
  from ntk_diag import _tree

  x = np.asarray(jax.random.normal(jax.random.key(0), (16, 4)), np.float32)
  y = np.asarray(jax.random.normal(jax.random.key(2), (16, 2)), np.float32)
  _, params = nd.from_linen(build_model(), build_model().init(jax.random.key(1), x))
  direction = jax.tree.map(
      lambda a: np.asarray(jax.random.normal(jax.random.key(3), a.shape), np.float32), params)
  arrays = {"x": x, "y": y}
  for name, a, d in zip(_tree.leaf_names(params), jax.tree.leaves(params),
                        jax.tree.leaves(direction)):
    arrays["theta0/" + name] = np.asarray(a)
    arrays["direction/" + name] = d
  np.savez(path, **arrays)


def load_data(path):
  """``(apply_fn, theta0, direction, x, y)`` as host numpy trees."""
  import jax
  import numpy as np

  import ntk_diag as nd
  from ntk_diag import _tree

  data = np.load(path)
  x, y = data["x"], data["y"]
  apply_fn, like = nd.from_linen(build_model(), build_model().init(jax.random.key(1), x[:1]))
  names = _tree.leaf_names(like)
  treedef = jax.tree.structure(like)
  tree = lambda prefix: jax.tree.unflatten(treedef, [data[prefix + n] for n in names])
  return apply_fn, tree("theta0/"), tree("direction/"), x, y


def params_at(theta0, direction, step):
  """The params of ``step``: ``θ0 + 0.03·step·δ``, in float32 numpy (bitwise the same anywhere)."""
  import jax
  import numpy as np
  return jax.tree.map(lambda a, d: a + np.float32(0.03 * step) * d, theta0, direction)


def pure_diagnostics(apply_fn, params0, params1, x, y):
  """The pure functions on ``(params, x, y)``: ``{name: array}``."""
  import ntk_diag as nd

  options = dict(num_iters=NUM_ITERS, tol=TOL)
  kernel = nd.empirical_ntk(apply_fn, params1, x)
  kernel0 = nd.empirical_ntk(apply_fn, params0, x)
  test_train = nd.empirical_ntk(apply_fn, params1, x[:4], x)
  stats = nd.kernel_stats(kernel, K0=kernel0, y=y)
  jac = nd.jacobian_norm(apply_fn, params1, x)  # exact per example (2 outputs)
  hess = nd.hessian_norm(apply_fn, params1, x[:2], **options)
  report = nd.lazy_ratio(apply_fn, params1, x[:2], y[:2], **options)
  twin = nd.linearize(apply_fn, params0)(params1, x)
  predict = nd.kernel_predictor(kernel, y, learning_rate=0.01)
  out = {
      "empirical_ntk": kernel, "empirical_ntk/x2": test_train,
      "jacobian_norm": jac.value, "jacobian_norm/per_example": jac.per_example,
      "hessian_norm": hess.value, "hessian_norm/per_example": hess.per_example,
      "lazy_ratio/kappa": report.kappa, "lazy_ratio/residual_norm": report.residual_norm,
      "lazy_ratio/jacobian_norm": report.jacobian_norm.value,
      "lazy_ratio/hessian_norm": report.hessian_norm.value,
      "linearize": twin,
      "kernel_predictor/train": predict(t=5.0),
      "kernel_predictor/test": predict(t=5.0, k_test_train=test_train),
  }
  out.update({f"kernel_stats/{name}": value for name, value in stats.items()})
  return out


def to_lists(values):
  """``{name: array}`` as JSON-able nested lists, gathered to every process."""
  from ntk_diag import _placement
  return {name: _placement.to_host(value).tolist() for name, value in values.items()}


def hook_options():
  from ntk_diag.diag_state import SnapshotConfig
  return dict(every_steps=1, norm_examples=NORM_EXAMPLES, strict=True,
              config=SnapshotConfig(num_iters=NUM_ITERS, tol=TOL))


def main(process_id, port, workdir, phase, data_path, out_path):
  import time
  start = time.monotonic()
  log = lambda what: print(f"[{time.monotonic() - start:.1f} s] {what}", flush=True)  # in the test's report
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import ntk_diag as nd

  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
  assert {d.process_index for d in mesh.devices[process_id]} == {process_id}

  def global_array(host, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  def fsdp(tree):  # each leaf's first axis over all four devices, when 4 divides it
    return jax.tree.map(lambda a: global_array(
        a, P(("data", "model")) if a.ndim and a.shape[0] % 4 == 0 else P()), tree)

  log("initialized")
  apply_fn, theta0, direction, x_host, y_host = load_data(data_path)
  x, y = global_array(x_host, P("data")), global_array(y_host, P("data"))
  assert not x.is_fully_addressable and len(x.addressable_shards[0].data) == 8
  gathered = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  out = {"process": process_id, "pid": os.getpid()}
  options = hook_options()
  compiled = []  # names of the functions compiled while the hook runs
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiled.append(kw.get("fun_name"))
      if "backend_compile" in event else None)

  if phase == "fresh":
    pure = pure_diagnostics(apply_fn, fsdp(theta0), fsdp(params_at(theta0, direction, 1)), x, y)
    out["pure"] = to_lists(pure)
    out["scalars_replicated"] = all(v.is_fully_replicated for v in pure.values() if v.ndim == 0)
    log("pure functions")
    hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=workdir, **options)
    out["hook"], out["kernel"], out["compiles"] = {}, None, []
    for step in FRESH_STEPS:
      params = fsdp(params_at(theta0, direction, step))
      compiled.clear()
      assert hook(step, params=params)
      out["compiles"].append(list(compiled))
      out["hook"][step] = hook.last.scalars
      log(f"step {step}")
      if hook.last.kernel is not None:
        out["kernel"] = hook.last.kernel.tolist()
      for leaf in jax.tree.leaves(params):  # as a donating train step would
        leaf.delete()
  else:
    # Another run's θ0 in this workdir is refused on both processes (compared in jit).
    other = fsdp(params_at(theta0, direction, 7))
    try:
      nd.LazyTrainingHook(apply_fn, x, y, workdir=workdir, **options)(0, params=other)
      out["refused"] = False
    except ValueError as error:
      out["refused"] = "another run" in str(error)
    log("refused")
    # Kernel and twin tags: the kernel's drift is measured from the restored K0.
    hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=workdir, compute_norms=False, **options)
    assert hook(RESUME_STEP, params=fsdp(params_at(theta0, direction, RESUME_STEP)))
    out["hook"] = {RESUME_STEP: hook.last.scalars}
    log(f"resumed at step {RESUME_STEP}")
    out["initial_params_global"] = all(not a.is_fully_addressable
                                       for a in jax.tree.leaves(hook.initial_params))
    out["initial_params_equal"] = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gathered(hook.initial_params)),
                                             jax.tree.leaves(theta0)))
  with open(out_path, "w") as f:
    json.dump(out, f)
  multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
  process_id, port, workdir, phase, data_path, out_path = sys.argv[1:]
  main(int(process_id), int(port), workdir, phase, data_path, out_path)
