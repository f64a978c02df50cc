"""One diagnostics snapshot: every quantity the hook logs, in one pure jitted function.

Pure JAX (no TensorFlow, no writer). :func:`snapshot` maps
``(state, params, ...)`` to ``(state, metrics)``, with the state a
:class:`ntk_diag.diag_state.DiagState` (a pytree in the manner of Flax's
``TrainState``) and every static choice (model, loss, groups, cost options) in
a :class:`ntk_diag.diag_state.SnapshotSpec`.
:class:`Snapshotter` compiles it once, ahead of time, for the shardings of
the first call, and places later arguments on those shardings, so a run
compiles exactly once. The hook (:mod:`ntk_diag.hooks`) schedules and writes.

The first call of a run is made at θ0 (``state.initialized`` false): it fills
``f0``, ``K0`` (unless restored), the lazy radius and the warm starts, and is
a regular snapshot at θ0.

Scalars (tags ``ntk_diag/<name>``), with ``X`` the probe set and ``X_m`` its
first ``m = norm_examples`` points:

* always: ``residual_norm = ‖∇_f L(f(θ, X_m), Y_m)‖₂`` of the summed loss
  (``‖f − y‖`` for mse), ``weight_change = ‖θ − θ0‖ / ‖θ0‖`` and
  ``weight_change/<layer>`` per top-level parameter group, ``nonfinite``.
* NTK group: ``ntk_trace``, ``ntk_eig_max``, ``ntk_eig_min``,
  ``ntk_condition_number``, ``kernel_drift``, ``kernel_distance``,
  ``kernel_alignment`` (see :func:`ntk_diag.kernel_stats`) on ``X`` and
  ``kernel_velocity = ‖K_t − K_prev‖_F / (‖K0‖_F · Δstep)`` between snapshots.
* NTK group with ``infinite``: ``kernel_distance_infinite``, the relative
  Frobenius distance of the per-output NTK from the infinite-width one.
* norms group, on ``X_m``: ``jacobian_norm``, ``hessian_norm``, ``kappa``
  (Chizat et al. 2019), ``lazy_radius = σ_min(J_{X_m}(θ0)) / (2‖∇²f(θ0)‖)``
  (the lecture's radius ``B = σ_min/2γ``),
  ``lazy_radius_ratio = ‖θ − θ0‖ / lazy_radius``; and on all of ``X``
  (with ``compute_sharpness``), ``sharpness`` (the top eigenvalue of the
  Hessian of the mean loss) and, with a learning rate, ``sharpness_lr = η · sharpness``.
* twin group: ``twin_gap = ‖f(θ) − f_lin(θ)‖ / ‖f(θ) − f(θ0)‖`` on ``X``
  (0 when ``f(θ) = f(θ0)``); with the lockstep twin's ``θ̃``,
  ``twin_distance`` and ``twin_param_distance`` (:func:`ntk_diag.twin.twin_distances`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _lanczos
from ntk_diag import _layout
from ntk_diag import _model
from ntk_diag import _placement
from ntk_diag import _tree
from ntk_diag import losses
from ntk_diag import norms
from ntk_diag import radius
from ntk_diag import sharpness
from ntk_diag import structured
from ntk_diag import twin
from ntk_diag.diag_state import DiagState
from ntk_diag.diag_state import SnapshotSpec
from ntk_diag.diag_state import hessian_layout
from ntk_diag.diag_state import stacked_shardings
from ntk_diag.diag_state import state_shardings
from ntk_diag.kernel_stats import kernel_stats
from ntk_diag.kernel_stats import safe_div
from ntk_diag.linearize import linearize

PyTree = Any


def layer_groups(params: PyTree) -> list[str]:
  """Top-level parameter group of each leaf (``"Dense_0"``, ``"layers"``...)."""
  return [name.split(".")[0] for name in _tree.leaf_names(params)]


def weight_change(params: PyTree, theta0: PyTree) -> dict[str, jax.Array]:
  """``‖θ − θ0‖ / ‖θ0‖`` globally (key ``weight_change``) and per top-level group."""
  groups = layer_groups(theta0)
  diffs = [jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(theta0))]
  refs = [jnp.sum(jnp.square(b)) for b in jax.tree.leaves(theta0)]
  out = {"weight_change": safe_div(jnp.sqrt(sum(diffs)), jnp.sqrt(sum(refs)))}
  for group in dict.fromkeys(groups):
    num = sum(d for d, g in zip(diffs, groups) if g == group)
    den = sum(r for r, g in zip(refs, groups) if g == group)
    out[f"weight_change/{group}"] = safe_div(jnp.sqrt(num), jnp.sqrt(den))
  return out


def _kernel(spec: SnapshotSpec, params: PyTree, x: PyTree, model_state: PyTree, k: int
            ) -> tuple[jax.Array, jax.Array | None]:
  """The NTK of ``x`` and, when the norms group needs them (``k ≤ GRAM_MAX_OUTPUTS``),
  the Gram blocks ``J_{x_i} J_{x_i}ᵀ`` of the first ``norm_examples`` points from the
  same pass (``None`` otherwise)."""
  model_state = model_state if spec.with_model_state else None
  if spec.compute_norms and k <= norms.GRAM_MAX_OUTPUTS:
    return spec.ntk_and_diagonal_fn(params, x, model_state=model_state)
  return spec.ntk_fn(params, x, model_state=model_state), None


def snapshot(spec: SnapshotSpec, state: DiagState, params: PyTree, model_state: PyTree,
             step: jax.Array, twin_params: PyTree, has_twin: jax.Array,
             sharpness_basis: PyTree | None = None
             ) -> tuple[DiagState, dict[str, jax.Array], PyTree | None]:
  """One snapshot at ``params`` (with ``model_state``) at ``step``: ``(state, metrics, basis)``.

  ``twin_params`` are the lockstep twin's parameters θ̃ when ``has_twin``
  (anything of params' structure otherwise). ``metrics`` maps tag names to
  scalars, plus ``"eigenvalues"`` (NTK group). A non-finite snapshot leaves the
  references of the next one (previous kernel and step, warm starts) as they were.
  ``sharpness_basis``: storage for the sharpness's Krylov basis, zeros
  (:func:`sharpness_basis`) or the previous snapshot's ``basis`` (returned
  after the solve; ``None`` when not given): kept and donated between
  snapshots, the program allocates no (m + 1)-vector buffer per snapshot.
  """
  cfg = spec.config
  init = ~state.initialized
  f = spec.model(model_state)
  x, y = state.probe_x, state.probe_y
  n = y.shape[0]
  m = spec.norm_examples
  x_m = _model.take(x, jnp.arange(m))
  y_m = y[:m]
  sharp = None
  f_loop = f
  if spec.compute_norms:
    # Solver loops apply the model's derivatives: there, the model with its
    # convolutions as products on patches (same values, far faster on CPU).
    f_loop = structured.model_by_patches(f, params, x_m)
  if spec.compute_norms and spec.compute_sharpness:
    # Sharpness on every probe point: on a few points the mean loss's Hessian
    # overweights its diagonal (η·sharpness 2.45 on 4 of the demo's points vs
    # 1.00 on all 256 training points).
    with jax.named_scope("sharpness"):
      sharp, basis, loop_outputs = sharpness.loss_sharpness_solve(
          f_loop, params, x, y, loss=spec.loss, num_iters=cfg.num_iters, tol=cfg.tol,
          krylov_dim=cfg.sharpness_krylov_dim, key=jax.random.key(cfg.seed + 2),
          init=state.sharpness_vector, basis=sharpness_basis,
          screen_iters=cfg.sharpness_screen_iters if spec.warm_start else None)
    sharpness_basis = basis  # None when none was handed in
  # The probe outputs come out of the sharpness's linearisation when its loop
  # model is the model itself (no convolution replayed by patches).
  outputs = loop_outputs if sharp is not None and f_loop is f else f(params, x)
  k = outputs[0].size
  f0 = jnp.where(init, outputs, state.f0)
  metrics = {"residual_norm": losses.residual_norm(spec.loss, outputs[:m], y_m)}
  metrics.update(weight_change(params, state.theta0))
  updates: dict[str, Any] = {"f0": f0, "initialized": jnp.ones((), bool)}

  grams = None
  if spec.compute_ntk:
    with jax.named_scope("ntk"):  # group names in profiles (XLA op names)
      kernel, grams = _kernel(spec, params, x, model_state, k)
    kernel0 = jnp.where(init & ~state.kernel0_restored, kernel, state.kernel0)
    prev_kernel = jnp.where(init, kernel0, state.prev_kernel)
    prev_step = jnp.where(init, step, state.prev_step)
    targets = y.reshape(n, -1) if spec.alignment else None
    with jax.named_scope("kernel_stats"):
      stats = kernel_stats(kernel, K0=kernel0, y=targets, top_k=_layout.matrix_size(kernel))
    for name in ("trace", "eig_max", "eig_min", "condition_number"):
      metrics[f"ntk_{name}"] = stats[name]
    for name in ("kernel_drift", "kernel_distance", "kernel_alignment"):
      if name in stats:
        metrics[name] = stats[name]
    step_delta = jnp.maximum(step - prev_step, 1).astype(kernel.dtype)
    metrics["kernel_velocity"] = safe_div(
        jnp.linalg.norm((kernel - prev_kernel).reshape(-1)),
        jnp.linalg.norm(kernel0.reshape(-1)) * step_delta)
    metrics["eigenvalues"] = stats["eigenvalues"]
    updates.update(kernel0=kernel0, prev_kernel=kernel)
    if spec.infinite is not None:
      from ntk_diag import infinite  # local: only runs that compare with the limit need it
      per_output = (kernel if kernel.ndim == 2 else jnp.einsum("ijaa->ij", kernel)) / k
      kernel_inf = lax.cond(init, lambda: infinite.kernels(spec.infinite, x)[1].astype(kernel.dtype),
                            lambda: state.infinite_kernel)
      metrics["kernel_distance_infinite"] = infinite.relative_distance(per_output, kernel_inf)
      updates["infinite_kernel"] = kernel_inf

  if spec.compute_norms:
    # The factored Hessian keeps `f`: its products use patches already, and
    # its warm-start vectors have the layout of `f`.
    f_hessian = f if hessian_layout(spec, params, model_state, x) is not None else f_loop
    options = norms.SolverOptions(num_iters=cfg.num_iters, tol=cfg.tol, method=cfg.norm_method,
                                  return_vector=spec.warm_start,
                                  screen_iters=cfg.hessian_screen_iters)
    key_jac, key_hess = jax.random.split(jax.random.key(cfg.seed))
    if grams is None:
      jac = norms.jacobian_norm_core(f_loop, params, x_m, options, key=key_jac,
                                     init=state.jacobian_vectors)
    else:  # exact, from the NTK pass (what jacobian_norm_core computes for k ≤ 64)
      jac = norms.jacobian_norm_from_grams(grams)
    with jax.named_scope("hessian_norm"):
      hess = norms.hessian_norm_core(f_hessian, params, x_m, options, key=key_hess,
                                     init=state.hessian_vectors, init_values=state.hessian_values)
    metrics["jacobian_norm"] = jac.value
    metrics["hessian_norm"] = hess.value
    metrics["kappa"] = norms.kappa(hess.value, jac.value, metrics["residual_norm"])
    # The radius needs θ0's σ_min and Hessian norm: computed at the first
    # snapshot (which is at θ0), then carried in the state.
    with jax.named_scope("sigma_min"):
      sigma_min0 = lax.cond(
          init, lambda: radius.jacobian_sigma_min_core(f, params, x_m, ntk_method=cfg.ntk_method,
                                                       batch_size=cfg.ntk_batch_size),
          lambda: jnp.zeros((), hess.value.dtype))
    lazy_radius = jnp.where(init, radius.radius_from_norms(sigma_min0, hess.value),
                            state.lazy_radius)
    metrics["lazy_radius"] = lazy_radius
    metrics["lazy_radius_ratio"] = radius.lazy_radius_ratio(params, state.theta0, lazy_radius)
    updates["lazy_radius"] = lazy_radius
    if sharp is not None:
      metrics["sharpness"] = sharp.value
      if spec.learning_rate is not None:
        metrics["sharpness_lr"] = spec.learning_rate * sharp.value
    if spec.warm_start:
      updates.update(jacobian_vectors=jac.vector, hessian_vectors=hess.vector,
                     hessian_values=hess.per_problem)
      if sharp is not None:
        updates["sharpness_vector"] = sharp.vector

  if spec.compute_twin:
    with jax.named_scope("twin"):
      f_theta0 = spec.model(state.model_state0)
      twin_out = linearize(f_theta0, state.theta0)(params, x)
      moved = jnp.linalg.norm((outputs - f0).reshape(-1))
      metrics["twin_gap"] = safe_div(jnp.linalg.norm((outputs - twin_out).reshape(-1)), moved)
      zero = jnp.zeros((), moved.dtype)
      distances = lax.cond(
          has_twin,
          lambda: twin.twin_distances(f_theta0, state.theta0, params, twin_params, x,
                                      outputs=outputs, outputs0=f0),
          lambda: {"twin_distance": zero, "twin_param_distance": zero})
      metrics.update(distances)

  scalars = [v for name, v in metrics.items() if name != "eigenvalues"]
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in scalars]))
  metrics["nonfinite"] = jnp.where(finite, 0.0, 1.0)
  # A non-finite snapshot does not become the reference of the next one,
  # except the first, whose θ0 quantities are needed either way.
  keep = finite | init
  updates["prev_step"] = jnp.where(keep, step, state.prev_step).astype(state.prev_step.dtype)
  new_state = dataclasses.replace(state, **{
      name: _select(keep, value, getattr(state, name)) if name in _REFERENCES else value
      for name, value in updates.items()})
  return new_state, metrics, sharpness_basis


_REFERENCES = frozenset({"prev_kernel", "jacobian_vectors", "hessian_vectors", "hessian_values",
                         "sharpness_vector"})


def _select(keep: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  if old is None:
    return new
  return jax.tree.map(lambda a, b: jnp.where(keep, a, b).astype(b.dtype), new, old)


# XLA:CPU options for the snapshot (not the user's step). The legacy loop emitter
# instead of the MLIR fusion emitters: 35-40 % less compile time (CNN 8.7 -> 5.7 s,
# MLP 5.1 -> 3.3 s), the same snapshot time within noise (CNN 328 vs 333 ms,
# MLP 75-86 vs 78-82 ms), measured 2026-11-29 (benchmarks/README.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def sharpness_basis(spec: SnapshotSpec, theta0: PyTree) -> PyTree | None:
  """Zero storage for the sharpness's Krylov basis (``sharpness_krylov_dim + 1``
  parameter-sized vectors, NumPy), held across snapshots when warm starts are
  (``spec.warm_start``) and it fits ``warm_start_bytes``; else ``None``.

  Kept and donated between snapshots, it is no temporary of the program: on
  CPU the 669k-parameter MLP's snapshot then needs 22 instead of 45 MB of
  temporaries, which glibc serves from its heap instead of fresh pages
  (~9,600 page faults per snapshot before, none after; measured 2026-11-29).
  """
  cfg = spec.config
  if not (spec.compute_norms and spec.compute_sharpness and spec.warm_start):
    return None
  basis = _lanczos.zero_basis(theta0, cfg.num_iters, cfg.sharpness_krylov_dim)
  if sum(a.nbytes for a in jax.tree.leaves(basis)) > cfg.warm_start_bytes:
    return None
  return basis


class Snapshotter:
  """:func:`snapshot` compiled once for a run, with the shardings of its first call.

  The state's device arrays keep their shardings; its host values go on a
  replicated sharding over the devices of the first committed argument,
  except the parameter-shaped warm-start vectors, which are sharded like
  θ0's leaves (see :func:`ntk_diag.diag_state.state_shardings`). The compiled
  snapshot returns its state on those same shardings and its metrics
  replicated, so the state never moves between calls and every process can
  fetch the metrics (a multi-process run included).
  Later calls place their arguments on the input shardings (a no-op when they
  already match), so params of any sharding never recompile it.

  The sharpness's Krylov basis storage (:func:`sharpness_basis`) is held
  here, sharded like the warm-start vectors, and donated to every call,
  which returns it; it goes back to zeros after a non-finite snapshot (stale
  rows must be finite) or a call that failed.
  """

  def __init__(self, spec: SnapshotSpec, state: DiagState, params: PyTree, model_state: PyTree):
    self.spec = spec
    replicated = _placement.reference_sharding(params, model_state, state)
    shardings = state_shardings(state, replicated)
    state = _placement.put(state, shardings)
    zeros = sharpness_basis(spec, state.theta0)
    basis_shardings = stacked_shardings(zeros, state.theta0, 1, replicated)
    self._basis_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), zeros)
    self._basis_shardings = basis_shardings
    self._basis = None
    self._nonfinite: jax.Array | None = None  # the flag of the snapshot that wrote the basis
    self._fn = jax.jit(functools.partial(_snapshot_entry, spec),
                       out_shardings=(shardings, replicated, basis_shardings),
                       donate_argnums=6)
    args = (state, params, model_state, np.asarray(0, np.int32), params, np.asarray(False),
            self._fresh_basis())
    cpu = all(d.platform == "cpu" for d in replicated.device_set)
    self._compiled = self._fn.lower(*args).compile(
        compiler_options=CPU_COMPILER_OPTIONS if cpu else None)
    self._shardings = self._compiled.input_shardings[0]

  def _fresh_basis(self) -> PyTree:
    if self._basis_shapes is None:
      return None
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), self._basis_shapes)
    return _placement.put(zeros, self._basis_shardings)

  def _take_basis(self) -> PyTree:
    """The kept basis storage, or zeros if there is none, it is deleted (a call
    that donated it failed) or the snapshot that wrote it was non-finite."""
    basis = self._basis
    self._basis = None
    if basis is None or any(a.is_deleted() for a in jax.tree.leaves(basis)):
      return self._fresh_basis()
    if self._nonfinite is not None and _placement.to_host(self._nonfinite) != 0:
      return self._fresh_basis()
    return basis

  def __call__(self, state: DiagState, params: PyTree, model_state: PyTree, step: int,
               twin_params: PyTree = None) -> tuple[DiagState, dict[str, jax.Array]]:
    has_twin = twin_params is not None
    args = (state, params, model_state, np.asarray(step, np.int32),
            state.theta0 if twin_params is None else twin_params, np.asarray(has_twin))
    args = _placement.put(args, self._shardings[:6]) + (self._take_basis(),)
    state, metrics, self._basis = self._compiled(*args)
    self._nonfinite = metrics["nonfinite"]
    return state, metrics


def _snapshot_entry(spec, state, params, model_state, step, twin_params, has_twin,
                    sharpness_basis):
  return snapshot(spec, state, params, model_state, step, twin_params, has_twin,
                  sharpness_basis)
