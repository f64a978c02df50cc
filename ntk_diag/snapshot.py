"""One diagnostics snapshot: every quantity the hook logs, in one pure jitted function.

Pure JAX (no TensorFlow, no writer). :class:`DiagState` is the snapshot's
state, a pytree in the manner of Flax's ``TrainState`` (θ0, its model state,
the probe set, f(θ0), K0, the previous kernel and step, warm-start vectors);
:func:`snapshot` maps ``(state, params, ...)`` to ``(state, metrics)``; every
static choice (model, loss, groups, cost options) is in :class:`SnapshotSpec`.
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
  ``lazy_radius_ratio = ‖θ − θ0‖ / lazy_radius``; and on all of ``X``,
  ``sharpness`` (the top eigenvalue of the Hessian of the mean loss) and,
  with a learning rate, ``sharpness_lr = η · sharpness``.
* twin group: ``twin_gap = ‖f(θ) − f_lin(θ)‖ / ‖f(θ) − f(θ0)‖`` on ``X``
  (0 when ``f(θ) = f(θ0)``); with the lockstep twin's ``θ̃``,
  ``twin_distance`` and ``twin_param_distance`` (:func:`ntk_diag.twin.twin_distances`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_diag import _layout
from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _placement
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import block_hessian
from ntk_diag import losses
from ntk_diag import norms
from ntk_diag import ntk
from ntk_diag import radius
from ntk_diag import sharpness
from ntk_diag import twin
from ntk_diag.kernel_stats import kernel_stats
from ntk_diag.kernel_stats import safe_div
from ntk_diag.linearize import linearize

PyTree = Any

DEFAULT_NORM_EXAMPLES = 16


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
  """Cost and method options of a snapshot.

  Attributes:
    ntk_method: ``method`` of :func:`ntk_diag.empirical_ntk`.
    ntk_trace_outputs: log the output-traced ``(n, n)`` kernel (cheap; its
      spectrum has ``n`` values) instead of the full ``(n·k, n·k)`` one.
    ntk_batch_size: ``batch_size`` of :func:`ntk_diag.empirical_ntk`.
    norm_method: ``"power"`` (default: with warm starts it needs few matvecs,
      and its per-iteration cost is one Hessian-vector product, while
      Lanczos adds ``O(m·P)`` reorthogonalisation) or ``"lanczos"``.
    num_iters: iteration cap of the norm estimators.
    tol: relative tolerance of the norm estimators.
    hessian_screen_iters: with warm starts, screen then refine the Hessian
      norm (``screen_iters`` of :func:`ntk_diag.norms.hessian_norm_core`):
      this many iterations on each of the ``norm_examples · k``
      eigenproblems from the previous snapshot's vectors, then up to
      ``num_iters`` more only on the largest one and on those that ranked
      above it in the previous snapshot (usually one problem). The first
      snapshot refines every problem (a full solve); so does every snapshot
      when the vectors exceed ``warm_start_bytes`` (then without a screen).
      ``None``: no screen, ``num_iters`` on every problem.
    sharpness_screen_iters: with warm starts, the sharpness's Lanczos run
      takes this many steps from the previous snapshot's eigenvector with a
      small basis, and continues (restarted Lanczos, same budget and
      stopping rule) only when their residual is above ``tol``
      (``screen_iters`` of :func:`ntk_diag.sharpness.loss_sharpness_core`).
      ``None``: no screen.
    seed: seed of the estimators' random start vectors.
    warm_start_bytes: the eigenvectors of one snapshot warm-start the next
      when they fit in this many bytes (``norm_examples · k`` parameter-sized
      vectors); otherwise every snapshot starts cold.
  """
  ntk_method: str = "auto"
  ntk_trace_outputs: bool = True
  ntk_batch_size: int | None = None
  norm_method: str = "power"
  num_iters: int = 20
  tol: float = 1e-3
  hessian_screen_iters: int | None = 3
  sharpness_screen_iters: int | None = 4
  seed: int = 0
  warm_start_bytes: int = 256 * 2**20

  def validate(self) -> None:
    _validation.check_one_of("ntk_method", self.ntk_method, ntk.METHODS)
    _validation.check_one_of("norm_method", self.norm_method, ("lanczos", "power"))
    _validation.check_positive_int("ntk_batch_size", self.ntk_batch_size, optional=True)
    _validation.check_positive_int("num_iters", self.num_iters)
    _validation.check_positive_number("tol", self.tol)
    _validation.check_positive_int("hessian_screen_iters", self.hessian_screen_iters,
                                   optional=True)
    _validation.check_positive_int("sharpness_screen_iters", self.sharpness_screen_iters,
                                   optional=True)


@dataclasses.dataclass(frozen=True)
class SnapshotSpec:
  """Everything static about a run's snapshots (hashable: a jit static argument).

  Attributes:
    apply_fn: ``apply_fn(params, x)``, or ``apply_fn(params, x, model_state)``
      when ``with_model_state``.
    with_model_state: whether the model takes a model state.
    config: cost and method options.
    loss: the loss of :mod:`ntk_diag.losses` (``residual_norm`` is its output gradient).
    norm_examples: probe points (the first ones) of the norm group, ≥ 1.
    compute_ntk, compute_norms, compute_twin: which groups are computed.
    alignment: whether ``kernel_alignment`` is defined (targets shaped like outputs).
    warm_start: whether the norm solvers keep their vectors between snapshots.
    learning_rate: ``η`` of ``sharpness_lr = η · sharpness`` (``None``: not logged).
    infinite: a network of :mod:`ntk_diag.infinite` (``None``: no
      ``kernel_distance_infinite``).
  """
  apply_fn: Callable
  with_model_state: bool
  config: SnapshotConfig
  loss: Any = "mse"
  norm_examples: int = DEFAULT_NORM_EXAMPLES
  compute_ntk: bool = True
  compute_norms: bool = True
  compute_twin: bool = True
  alignment: bool = True
  warm_start: bool = True
  learning_rate: float | None = None
  infinite: Any = None

  def model(self, model_state: PyTree) -> Callable[[PyTree, PyTree], jax.Array]:
    """``f(params, x)`` of the model with ``model_state`` held fixed."""
    return _model.bind_model_state(self.apply_fn, model_state if self.with_model_state else None)

  @functools.cached_property
  def ntk_fn(self) -> Callable[..., jax.Array]:
    """The NTK group's kernel function, built once per spec (:func:`ntk_diag.empirical_ntk_fn`)."""
    cfg = self.config
    return ntk.empirical_ntk_fn(self.apply_fn, trace_outputs=cfg.ntk_trace_outputs,
                                method=cfg.ntk_method, batch_size=cfg.ntk_batch_size)

  @functools.cached_property
  def ntk_and_diagonal_fn(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The NTK group's kernel with the Gram blocks of the first ``norm_examples``
    points, built once per spec (:func:`ntk_diag.ntk.empirical_ntk_and_diagonal_fn`)."""
    cfg = self.config
    return ntk.empirical_ntk_and_diagonal_fn(
        self.apply_fn, num_diagonal=self.norm_examples, trace_outputs=cfg.ntk_trace_outputs,
        method=cfg.ntk_method, batch_size=cfg.ntk_batch_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagState:
  """The snapshot's state, a pytree (``None`` fields are absent groups).

  Attributes:
    theta0: the initial parameters θ0.
    model_state0: θ0's model state (``None`` if the model has none).
    probe_x: probe inputs ``X`` (``n`` examples).
    probe_y: probe targets, prepared for the loss (integer labels one-hot).
    initialized: false until the first snapshot (at θ0) filled the fields below.
    f0: ``f(θ0, X)``.
    kernel0_restored: whether ``kernel0`` was restored from a checkpoint (the
      first snapshot keeps it instead of computing it).
    kernel0: the NTK at θ0 on ``X`` (NTK group).
    prev_kernel: the NTK of the last finite snapshot (NTK group).
    prev_step: the step of the last finite snapshot (or of θ0).
    jacobian_vectors, hessian_vectors, hessian_values, sharpness_vector: warm
      starts of the norm solvers (``None`` when cold or not needed).
      ``hessian_vectors`` is a :class:`ntk_diag.block_hessian.LowRankVectors`
      with batch axes ``(norm_examples, k)`` where the factored power solver
      runs (zero before the first snapshot: "no warm start yet"), else
      ``(norm_examples, k)`` stacks of parameter-shaped vectors.
    lazy_radius: ``σ_min(J_{X_m}(θ0)) / (2‖∇²f(θ0)‖)`` (norms group).
    infinite_kernel: the infinite-width NTK on ``X``, per output (with ``infinite``).
  """
  theta0: PyTree
  model_state0: PyTree
  probe_x: PyTree
  probe_y: jax.Array
  initialized: jax.Array
  f0: jax.Array
  kernel0_restored: jax.Array
  kernel0: jax.Array | None
  prev_kernel: jax.Array | None
  prev_step: jax.Array
  jacobian_vectors: PyTree
  hessian_vectors: PyTree
  hessian_values: jax.Array | None
  sharpness_vector: PyTree
  lazy_radius: jax.Array | None
  infinite_kernel: jax.Array | None


def norm_examples_count(n: int, norm_examples: int | None) -> int:
  return min(n, norm_examples or n)


def initial_state(spec: SnapshotSpec, theta0: PyTree, model_state0: PyTree, probe_x: PyTree,
                  probe_y: Any, *, step: int, kernel0: Any = None) -> DiagState:
  """The state before the first snapshot; built from host values (no compilation).

  ``probe_y`` must already be prepared (:func:`ntk_diag.losses.prepare_targets`).
  ``kernel0`` is a restored K0 (the first snapshot then keeps it).
  """
  n = _validation.leading_size("probe_x", probe_x)
  out_shape = _model.example_output_shape(spec.model(model_state0), theta0, probe_x)
  dtype = _model.param_dtype(theta0)
  k = _model.num_outputs(out_shape)
  m = spec.norm_examples
  zeros = lambda shape: np.zeros(shape, dtype)
  traced = spec.config.ntk_trace_outputs or out_shape == ()
  kernel_placeholder = None
  if spec.compute_ntk:
    kernel_placeholder = (zeros((n, n) if traced else (n, n, k, k)) if kernel0 is None
                          else np.asarray(kernel0, dtype))
  jac_vectors = hess_vectors = hess_values = sharpness_vector = None
  if spec.compute_norms and spec.warm_start:
    random = np.random.default_rng(spec.config.seed + 1)
    batched = lambda shape: jax.tree.map(
        lambda p: random.standard_normal(shape + np.shape(p)).astype(p.dtype), theta0)
    if k > norms.GRAM_MAX_OUTPUTS:
      jac_vectors = batched((m,))
    layout = hessian_layout(spec, theta0, model_state0, probe_x)
    if layout is None:
      hess_vectors = batched((m, k))
    else:  # factored; zero = "no warm start yet" (random factors at the first snapshot)
      shapes = jax.eval_shape(lambda: block_hessian.zeros(layout, theta0, (m, k)))
      hess_vectors = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    hess_values = np.full((m, k), np.inf, dtype)
    sharpness_vector = batched(())
  return DiagState(
      theta0=theta0, model_state0=model_state0, probe_x=probe_x, probe_y=probe_y,
      initialized=np.asarray(False), f0=zeros((n,) + out_shape),
      kernel0_restored=np.asarray(kernel0 is not None), kernel0=kernel_placeholder,
      prev_kernel=kernel_placeholder, prev_step=np.asarray(step, np.int32),
      jacobian_vectors=jac_vectors, hessian_vectors=hess_vectors, hessian_values=hess_values,
      sharpness_vector=sharpness_vector,
      lazy_radius=np.asarray(np.nan, dtype) if spec.compute_norms else None,
      infinite_kernel=None if spec.infinite is None else zeros((n, n)))


def hessian_layout(spec: SnapshotSpec, theta0: PyTree, model_state0: PyTree,
                   probe_x: PyTree) -> block_hessian.Layout | None:
  """The factored layout of the Hessian norm's warm-start vectors, or ``None``
  (parameter-shaped vectors): factored where the power solver of
  :func:`ntk_diag.norms.hessian_norm_core` keeps Dense blocks as factors.
  Traces the model on one example's shapes (no FLOPs)."""
  if not spec.compute_norms or spec.config.norm_method != "power":
    return None
  return block_hessian.layout_or_none(spec.model(model_state0), theta0, probe_x)


def warm_start_fits(theta0: PyTree, norm_examples: int, k: int, budget_bytes: int, *,
                    layout: block_hessian.Layout | None = None) -> bool:
  """Whether the warm-start vectors fit the budget: ``norm_examples · k`` Hessian
  vectors (factored with ``layout``, else parameter-sized: :func:`ntk_diag._memory.warm_start_fits`),
  the sharpness vector and, for ``k > GRAM_MAX_OUTPUTS``, ``norm_examples`` Jacobian vectors."""
  jacobian_vectors = k > norms.GRAM_MAX_OUTPUTS
  if layout is None:
    return _memory.warm_start_fits(theta0, norm_examples, k, budget_bytes,
                                   jacobian_vectors=jacobian_vectors)
  per_vector = _memory.vector_bytes(theta0)
  per_hessian = (block_hessian.vector_size(layout, theta0)
                 * jnp.dtype(_model.param_dtype(theta0)).itemsize)
  dense = (norm_examples if jacobian_vectors else 0) + 1
  return norm_examples * k * per_hessian + dense * per_vector <= budget_bytes


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
             step: jax.Array, twin_params: PyTree, has_twin: jax.Array
             ) -> tuple[DiagState, dict[str, jax.Array]]:
  """One snapshot at ``params`` (with ``model_state``) at ``step``: ``(state, metrics)``.

  ``twin_params`` are the lockstep twin's parameters θ̃ when ``has_twin``
  (anything of params' structure otherwise). ``metrics`` maps tag names to
  scalars, plus ``"eigenvalues"`` (NTK group). A non-finite snapshot leaves the
  references of the next one (previous kernel and step, warm starts) as they were.
  """
  cfg = spec.config
  init = ~state.initialized
  f = spec.model(model_state)
  x, y = state.probe_x, state.probe_y
  n = y.shape[0]
  m = spec.norm_examples
  outputs = f(params, x)
  f0 = jnp.where(init, outputs, state.f0)
  x_m = _model.take(x, jnp.arange(m))
  y_m = y[:m]
  metrics = {"residual_norm": losses.residual_norm(spec.loss, outputs[:m], y_m)}
  metrics.update(weight_change(params, state.theta0))
  updates: dict[str, Any] = {"f0": f0, "initialized": jnp.ones((), bool)}

  grams = None
  if spec.compute_ntk:
    kernel, grams = _kernel(spec, params, x, model_state, outputs[0].size)
    kernel0 = jnp.where(init & ~state.kernel0_restored, kernel, state.kernel0)
    prev_kernel = jnp.where(init, kernel0, state.prev_kernel)
    prev_step = jnp.where(init, step, state.prev_step)
    targets = y.reshape(n, -1) if spec.alignment else None
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
      k = f0[0].size
      per_output = (kernel if kernel.ndim == 2 else jnp.einsum("ijaa->ij", kernel)) / k
      kernel_inf = lax.cond(init, lambda: infinite.kernels(spec.infinite, x)[1].astype(kernel.dtype),
                            lambda: state.infinite_kernel)
      metrics["kernel_distance_infinite"] = infinite.relative_distance(per_output, kernel_inf)
      updates["infinite_kernel"] = kernel_inf

  if spec.compute_norms:
    options = norms.SolverOptions(num_iters=cfg.num_iters, tol=cfg.tol, method=cfg.norm_method,
                                  return_vector=spec.warm_start,
                                  screen_iters=cfg.hessian_screen_iters)
    key_jac, key_hess = jax.random.split(jax.random.key(cfg.seed))
    if grams is None:
      jac = norms.jacobian_norm_core(f, params, x_m, options, key=key_jac,
                                     init=state.jacobian_vectors)
    else:  # exact, from the NTK pass (what jacobian_norm_core computes for k ≤ 64)
      jac = norms.jacobian_norm_from_grams(grams)
    hess = norms.hessian_norm_core(f, params, x_m, options, key=key_hess,
                                   init=state.hessian_vectors, init_values=state.hessian_values)
    metrics["jacobian_norm"] = jac.value
    metrics["hessian_norm"] = hess.value
    metrics["kappa"] = norms.kappa(hess.value, jac.value, metrics["residual_norm"])
    # The radius needs θ0's σ_min and Hessian norm: computed at the first
    # snapshot (which is at θ0), then carried in the state.
    sigma_min0 = lax.cond(
        init, lambda: radius.jacobian_sigma_min_core(f, params, x_m, ntk_method=cfg.ntk_method,
                                                     batch_size=cfg.ntk_batch_size),
        lambda: jnp.zeros((), hess.value.dtype))
    lazy_radius = jnp.where(init, radius.radius_from_norms(sigma_min0, hess.value),
                            state.lazy_radius)
    metrics["lazy_radius"] = lazy_radius
    metrics["lazy_radius_ratio"] = radius.lazy_radius_ratio(params, state.theta0, lazy_radius)
    updates["lazy_radius"] = lazy_radius
    # Sharpness on every probe point: on a few points the mean loss's Hessian
    # overweights its diagonal (η·sharpness 2.45 on 4 of the demo's points vs
    # 1.00 on all 256 training points).
    sharp = sharpness.loss_sharpness_core(f, params, x, y, loss=spec.loss,
                                          num_iters=cfg.num_iters, tol=cfg.tol,
                                          key=jax.random.key(cfg.seed + 2),
                                          init=state.sharpness_vector,
                                          screen_iters=(cfg.sharpness_screen_iters
                                                        if spec.warm_start else None))
    metrics["sharpness"] = sharp.value
    if spec.learning_rate is not None:
      metrics["sharpness_lr"] = spec.learning_rate * sharp.value
    if spec.warm_start:
      updates.update(jacobian_vectors=jac.vector, hessian_vectors=hess.vector,
                     hessian_values=hess.per_problem, sharpness_vector=sharp.vector)

  if spec.compute_twin:
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
  return new_state, metrics


_REFERENCES = frozenset({"prev_kernel", "jacobian_vectors", "hessian_vectors", "hessian_values",
                         "sharpness_vector"})


def _select(keep: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  if old is None:
    return new
  return jax.tree.map(lambda a, b: jnp.where(keep, a, b).astype(b.dtype), new, old)


class Snapshotter:
  """:func:`snapshot` compiled once for a run, with the shardings of its first call.

  The state's device arrays keep their shardings; its host values go on a
  replicated sharding over the devices of the first committed argument,
  except the parameter-shaped warm-start vectors, which are sharded like
  θ0's leaves (see :func:`state_shardings`). The compiled snapshot returns its state on those
  same shardings and its metrics replicated, so the state never moves between
  calls and every process can fetch the metrics (a multi-process run included).
  Later calls place their arguments on the input shardings (a no-op when they
  already match), so params of any sharding never recompile it.
  """

  def __init__(self, spec: SnapshotSpec, state: DiagState, params: PyTree, model_state: PyTree):
    self.spec = spec
    replicated = _placement.reference_sharding(params, model_state, state)
    shardings = state_shardings(state, replicated)
    self._fn = jax.jit(functools.partial(_snapshot_entry, spec),
                       out_shardings=(shardings, replicated))
    state = _placement.put(state, shardings)
    args = (state, params, model_state, np.asarray(0, np.int32), params, np.asarray(False))
    self._compiled = self._fn.lower(*args).compile()
    self._shardings = self._compiled.input_shardings[0]

  def __call__(self, state: DiagState, params: PyTree, model_state: PyTree, step: int,
               twin_params: PyTree = None) -> tuple[DiagState, dict[str, jax.Array]]:
    has_twin = twin_params is not None
    args = (state, params, model_state, np.asarray(step, np.int32),
            state.theta0 if twin_params is None else twin_params, np.asarray(has_twin))
    return self._compiled(*_placement.put(args, self._shardings))


def state_shardings(state: DiagState, replicated: jax.sharding.Sharding) -> DiagState:
  """Where each leaf of ``state`` lives: a committed array where it is, a
  warm-start vector (a stack of parameter-shaped arrays) sharded like its θ0
  leaf with unsharded stack axes, anything else (factored Hessian vectors
  included) on ``replicated``."""
  where = lambda leaf: _placement.sharding_or(leaf, replicated)
  theta0 = jax.tree.map(where, state.theta0)

  def stacked(vectors: PyTree, num_axes: int) -> PyTree:
    if vectors is None:
      return None
    return jax.tree.map(
        lambda v, s: _placement.sharding_or(v, _placement.with_batch_axes(s, num_axes, replicated)),
        vectors, theta0)

  hessian_vectors = state.hessian_vectors
  if isinstance(hessian_vectors, block_hessian.LowRankVectors):
    # Factor rows and canonical blocks are not parameter-shaped (a few KB per
    # eigenproblem): replicated, like the scalars.
    hessian_vectors = jax.tree.map(where, hessian_vectors)
  else:
    hessian_vectors = stacked(hessian_vectors, 2)
  return dataclasses.replace(
      jax.tree.map(where, state), jacobian_vectors=stacked(state.jacobian_vectors, 1),
      hessian_vectors=hessian_vectors, sharpness_vector=stacked(state.sharpness_vector, 0))


def _snapshot_entry(spec, state, params, model_state, step, twin_params, has_twin):
  return snapshot(spec, state, params, model_state, step, twin_params, has_twin)
