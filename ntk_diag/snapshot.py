"""One diagnostics snapshot: every quantity the hook logs, in one jitted function.

Pure JAX (no TensorFlow, no writer): :class:`SnapshotEngine` holds θ0, the
probe set and the NTK at θ0 and compiles :meth:`SnapshotEngine.run` once per
parameter structure. The hook (:mod:`ntk_diag.hooks`) only schedules and writes.

Scalars (tags ``ntk_diag/<name>``):

* always: ``residual_norm = ‖f(θ, X) − Y‖₂``, ``weight_change = ‖θ − θ0‖ / ‖θ0‖``
  and ``weight_change/<layer>`` per top-level parameter group, ``nonfinite``.
* NTK group: ``ntk_trace``, ``ntk_eig_max``, ``ntk_eig_min``,
  ``ntk_condition_number``, ``kernel_drift``, ``kernel_distance``,
  ``kernel_alignment`` (see :func:`ntk_diag.kernel_stats`) and
  ``kernel_velocity = ‖K_t − K_prev‖_F / (‖K0‖_F · Δstep)`` between snapshots.
* norms group: ``jacobian_norm``, ``hessian_norm``, ``kappa`` (seed eq. 3).
* twin group: ``twin_gap = ‖f(θ) − f_lin(θ)‖ / ‖f(θ) − f(θ0)‖`` (0 when
  ``f(θ) = f(θ0)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _layout
from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import norms
from ntk_diag import ntk
from ntk_diag.kernel_stats import kernel_stats
from ntk_diag.kernel_stats import safe_div
from ntk_diag.linearize import linearize

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Groups:
  """Which groups of diagnostics a snapshot computes."""
  ntk: bool = True
  norms: bool = True
  twin: bool = True


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
  """Cost and method options of a snapshot.

  The defaults keep one snapshot of a ~300k-parameter MLP on 256 probe points
  well under a second on 2 CPU cores.

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
    jacobian_examples: probe examples (the first ones) over which
      ``sup_x ‖J_x‖`` is taken; ``None`` = all.
    hessian_examples: probe examples (the first ones) over which
      ``sup_x ‖∇²f(x)‖`` is taken; ``None`` = all. The Hessian costs
      ``k · num_iters`` Hessian-vector products per example.
    hessian_screen_iters: with warm starts, screen then refine the Hessian
      norm (``screen_iters`` of :func:`ntk_diag.norms.hessian_norm_core`):
      this many iterations on each of the ``hessian_examples · k``
      eigenproblems from the previous snapshot's vectors, then up to
      ``num_iters`` more only on the largest one and on those that ranked
      above it in the previous snapshot (usually one problem). The first
      snapshot refines every problem (a full solve); so does every snapshot
      when the vectors exceed ``warm_start_bytes`` (then without a screen).
      ``None``: no screen, ``num_iters`` on every problem.
    seed: seed of the estimators' random start vectors.
    warm_start_bytes: the eigenvectors of one snapshot warm-start the next
      when they fit in this many bytes (``hessian_examples · k`` parameter-sized
      vectors); otherwise every snapshot starts cold.
  """
  ntk_method: str = "auto"
  ntk_trace_outputs: bool = True
  ntk_batch_size: int | None = None
  norm_method: str = "power"
  num_iters: int = 20
  tol: float = 1e-3
  jacobian_examples: int | None = None
  hessian_examples: int | None = 4
  hessian_screen_iters: int | None = 3
  seed: int = 0
  warm_start_bytes: int = 256 * 2**20

  def validate(self) -> None:
    _validation.check_one_of("ntk_method", self.ntk_method, ntk.METHODS)
    _validation.check_one_of("norm_method", self.norm_method, ("lanczos", "power"))
    _validation.check_positive_int("ntk_batch_size", self.ntk_batch_size, optional=True)
    _validation.check_positive_int("num_iters", self.num_iters)
    _validation.check_positive_number("tol", self.tol)
    _validation.check_positive_int("jacobian_examples", self.jacobian_examples, optional=True)
    _validation.check_positive_int("hessian_examples", self.hessian_examples, optional=True)
    _validation.check_positive_int("hessian_screen_iters", self.hessian_screen_iters,
                                   optional=True)


@dataclasses.dataclass(frozen=True)
class EngineResult:
  scalars: dict[str, float]
  eigenvalues: np.ndarray | None
  kernel: np.ndarray | None
  finite: bool


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


class SnapshotEngine:
  """θ0, the probe set, K0, and the compiled snapshot function."""

  def __init__(self, apply_fn: Callable, theta0: PyTree, probe_x: PyTree, probe_y: Any, *,
               kernel0: Any, step0: int = 0, groups: Groups, config: SnapshotConfig):
    self.apply_fn = apply_fn
    self.groups = groups
    self.config = config
    # Private device copies: the training step may donate the caller's buffers.
    self.theta0 = jax.tree.map(lambda a: jnp.array(a, copy=True), theta0)
    self.probe_x = jax.tree.map(jnp.asarray, probe_x)
    n = _validation.leading_size("probe_x", self.probe_x)
    out_shape = _model.example_output_shape(apply_fn, self.theta0, self.probe_x)
    _validation.check_targets("probe_y", probe_y, (n,) + out_shape)
    self.probe_y = jnp.asarray(probe_y).reshape((n,) + out_shape)
    self.f0 = jax.jit(apply_fn)(self.theta0, self.probe_x)
    self._compute = jax.jit(self._snapshot)
    self.kernel0 = None
    if groups.ntk:
      self.kernel0 = (jnp.asarray(kernel0) if kernel0 is not None
                      else self._kernel(self.theta0, self.probe_x))
    self._prev_kernel = self.kernel0
    # Velocity of the first snapshot (also after a resume) is measured from θ0.
    self._prev_step = step0
    self._norm_examples = (min(n, config.jacobian_examples or n), min(n, config.hessian_examples or n))
    self._warm = self._initial_vectors(out_shape) if groups.norms else None

  def _initial_vectors(self, out_shape: tuple[int, ...]):
    """``(jacobian, hessian, hessian_values)``: random start vectors shaped
    like the solvers' outputs, so that every snapshot (the first included)
    passes the same structure to the compiled function, and ``(n_hess, k)``
    per-problem Hessian norms, ``inf`` until a snapshot computes them (so the
    first snapshot refines every problem; see ``hessian_screen_iters``);
    ``None`` (cold starts) if the vectors would exceed ``warm_start_bytes``."""
    k = _model.num_outputs(out_shape)
    n_jac, n_hess = self._norm_examples
    iterative_jacobian = k > norms.GRAM_MAX_OUTPUTS
    per_vector = _tree.tree_size(self.theta0) * jnp.dtype(_model.param_dtype(self.theta0)).itemsize
    count = n_hess * k + (n_jac if iterative_jacobian else 0)
    if count * per_vector > self.config.warm_start_bytes:
      return None
    key_jac, key_hess = jax.random.split(jax.random.key(self.config.seed + 1))
    batched = lambda key, shape: _tree.tree_random_normal_like(
        key, jax.tree.map(lambda p: jax.ShapeDtypeStruct(shape + p.shape, p.dtype), self.theta0))
    jac = batched(key_jac, (n_jac,)) if iterative_jacobian else None
    hess_values = jnp.full((n_hess, k), jnp.inf, _model.param_dtype(self.theta0))
    return (jac, batched(key_hess, (n_hess, k)), hess_values)

  def _kernel(self, params: PyTree, x: PyTree) -> jax.Array:
    return ntk.empirical_ntk(self.apply_fn, params, x, trace_outputs=self.config.ntk_trace_outputs,
                             method=self.config.ntk_method, batch_size=self.config.ntk_batch_size)

  def run(self, params: PyTree, step: int) -> EngineResult:
    """Computes one snapshot at ``params`` (one compiled call, then host transfer).

    A non-finite snapshot is reported but does not become the reference of the
    next one (kernel velocity, warm starts), so training that recovers gets
    finite diagnostics again.
    """
    step_delta = float(max(step - self._prev_step, 1))
    scalars, extras, vectors = self._compute(
        params, self.theta0, self.f0, self.kernel0, self._prev_kernel, jnp.float32(step_delta),
        self.probe_x, self.probe_y, self._warm)
    kernel = extras.get("kernel")
    scalars, extras = jax.device_get((scalars, extras))
    scalars = {name: float(value) for name, value in scalars.items()}
    finite = all(np.isfinite(v) for v in scalars.values())
    scalars["nonfinite"] = 0.0 if finite else 1.0
    if finite:
      self._prev_kernel = kernel if self.groups.ntk else None
      self._warm = vectors if vectors is not None else self._warm  # stays on device
      self._prev_step = step
    return EngineResult(scalars=scalars, eigenvalues=extras.get("eigenvalues"),
                        kernel=extras.get("kernel"), finite=finite)

  def _snapshot(self, params, theta0, f0, kernel0, prev_kernel, step_delta, x, y, warm):
    cfg = self.config
    n = y.shape[0]
    outputs = self.apply_fn(params, x)
    residual_norm = jnp.linalg.norm((outputs - y).reshape(-1))
    scalars = {"residual_norm": residual_norm}
    scalars.update(weight_change(params, theta0))
    extras = {}
    if self.groups.ntk:
      kernel = self._kernel(params, x)
      stats = kernel_stats(kernel, K0=kernel0, y=y.reshape(n, -1),
                           top_k=_layout.matrix_size(kernel))
      for name in ("trace", "eig_max", "eig_min", "condition_number"):
        scalars[f"ntk_{name}"] = stats[name]
      for name in ("kernel_drift", "kernel_distance", "kernel_alignment"):
        scalars[name] = stats[name]
      scalars["kernel_velocity"] = safe_div(
          jnp.linalg.norm((kernel - prev_kernel).reshape(-1)),
          jnp.linalg.norm(kernel0.reshape(-1)) * step_delta)
      extras = {"kernel": kernel, "eigenvalues": stats["eigenvalues"]}
    vectors = None
    if self.groups.norms:
      n_jac, n_hess = self._norm_examples
      options = dict(num_iters=cfg.num_iters, tol=cfg.tol, method=cfg.norm_method,
                     return_vector=warm is not None)
      key_jac, key_hess = jax.random.split(jax.random.key(cfg.seed))
      jac = norms.jacobian_norm_core(self.apply_fn, params, _model.take(x, jnp.arange(n_jac)),
                                     key=key_jac, init=None if warm is None else warm[0], **options)
      hess = norms.hessian_norm_core(self.apply_fn, params, _model.take(x, jnp.arange(n_hess)),
                                     key=key_hess, init=None if warm is None else warm[1],
                                     screen_iters=cfg.hessian_screen_iters,
                                     init_values=None if warm is None else warm[2], **options)
      scalars["jacobian_norm"] = jac.value
      scalars["hessian_norm"] = hess.value
      scalars["kappa"] = norms.kappa(hess.value, jac.value, residual_norm)
      if warm is not None:
        vectors = (jac.vector, hess.vector, hess.per_problem)
    if self.groups.twin:
      twin = linearize(self.apply_fn, theta0)(params, x)
      scalars["twin_gap"] = safe_div(jnp.linalg.norm((outputs - twin).reshape(-1)),
                                     jnp.linalg.norm((outputs - f0).reshape(-1)))
    return scalars, extras, vectors

