"""The state of a run's snapshots and its static description.

In the manner of Flax's ``TrainState``: :class:`DiagState` is the pytree that
:func:`ntk_diag.snapshot.snapshot` maps to its next value (θ0, its model
state, the probe set, f(θ0), K0, the previous kernel and step, warm-start
vectors); :class:`SnapshotSpec` is everything static about a run's snapshots
(model, loss, groups, :class:`SnapshotConfig` cost options), a jit static
argument. :func:`initial_state` builds the state before the first snapshot
from host values, :func:`state_shardings` says where each of its leaves
lives, and :func:`warm_start_fits` whether the warm-start vectors fit their
byte budget.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _memory
from ntk_diag import _model
from ntk_diag import _placement
from ntk_diag import _validation
from ntk_diag import block_hessian
from ntk_diag import norms
from ntk_diag import ntk

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
      ``None``: no screen, ``num_iters`` on every problem. Default 2: on SGD
      trajectories of the benchmark MLP and CNN (snapshots 100 steps apart)
      as close to a 300-iteration solve as 3 (worst 2.7e-2 vs 2.6e-2 and
      5.9e-3 vs 2.3e-3; 1 iteration locks onto a lower eigenvalue, 1.1e-2
      low for good), each iteration ~4 ms of a ~75 ms MLP snapshot.
    sharpness_screen_iters: with warm starts, the sharpness's Lanczos run
      takes this many steps from the previous snapshot's eigenvector (a
      short first cycle), and continues (restarted Lanczos, same budget and
      stopping rule) only when their residual is above ``tol``
      (``screen_iters`` of :func:`ntk_diag.sharpness.loss_sharpness_core`).
      ``None``: no screen.
    sharpness_krylov_dim: Krylov basis size of the sharpness's restarted
      Lanczos run (``krylov_dim`` of
      :func:`ntk_diag.sharpness.loss_sharpness_core`). Every Lanczos step
      reorthogonalises against a basis of that many parameter-sized vectors, so a
      small one keeps the warm runs (a step or two) cheap; ``None``:
      ``min(num_iters, 32)``.
    seed: seed of the estimators' random start vectors.
    warm_start_bytes: the eigenvectors of one snapshot warm-start the next
      when they fit in this many bytes (``norm_examples · k`` parameter-sized
      vectors); otherwise every snapshot starts cold. The sharpness's Krylov
      basis storage (``sharpness_krylov_dim + 1`` parameter-sized vectors) is
      kept between warm-started snapshots when it fits this budget too.
  """
  ntk_method: str = "auto"
  ntk_trace_outputs: bool = True
  ntk_batch_size: int | None = None
  norm_method: str = "power"
  num_iters: int = 20
  tol: float = 1e-3
  hessian_screen_iters: int | None = 2
  sharpness_screen_iters: int | None = 4
  sharpness_krylov_dim: int | None = 8
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
    _validation.check_positive_int("sharpness_krylov_dim", self.sharpness_krylov_dim,
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
    compute_sharpness: with ``compute_norms``, whether the sharpness is.
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
  compute_sharpness: bool = True
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
    sharpness_vector = batched(()) if spec.compute_sharpness else None
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
  """Whether the warm-start vectors fit the budget (:func:`ntk_diag._memory.warm_start_fits`):
  ``norm_examples · k`` Hessian vectors, factored with ``layout``, else parameter-sized;
  the sharpness vector and, for ``k > GRAM_MAX_OUTPUTS``, ``norm_examples`` Jacobian vectors."""
  hessian_vector_bytes = None if layout is None else (
      block_hessian.vector_size(layout, theta0) * jnp.dtype(_model.param_dtype(theta0)).itemsize)
  return _memory.warm_start_fits(theta0, norm_examples, k, budget_bytes,
                                 jacobian_vectors=k > norms.GRAM_MAX_OUTPUTS,
                                 hessian_vector_bytes=hessian_vector_bytes)


def stacked_shardings(vectors: PyTree, theta0: PyTree, num_axes: int,
                      replicated: jax.sharding.Sharding) -> PyTree:
  """Where stacks of parameter-shaped vectors (leaves ``(b_1..b_num_axes, *leaf)``)
  live: a committed array where it is, else sharded like its θ0 leaf with
  unsharded stack axes; ``None`` for ``None``."""
  if vectors is None:
    return None
  return jax.tree.map(
      lambda v, t: _placement.sharding_or(v, _placement.with_batch_axes(
          _placement.sharding_or(t, replicated), num_axes, replicated)),
      vectors, theta0)


def state_shardings(state: DiagState, replicated: jax.sharding.Sharding) -> DiagState:
  """Where each leaf of ``state`` lives: a committed array where it is, a
  warm-start vector (a stack of parameter-shaped arrays) sharded like its θ0
  leaf with unsharded stack axes, anything else (factored Hessian vectors
  included) on ``replicated``."""
  where = lambda leaf: _placement.sharding_or(leaf, replicated)
  stacked = lambda vectors, num_axes: stacked_shardings(vectors, state.theta0, num_axes,
                                                        replicated)
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
