"""``LazyTrainingHook``: lazy-training diagnostics inside any Flax training loop.

A thin stateful shell, in the manner of ``clu.periodic_actions``: the math
lives in the pure functions of :mod:`ntk_diag.snapshot`, compiled once; this
module decides when to run it, keeps θ0 (via :mod:`ntk_diag.checkpoint`) and
writes the results through a CLU ``MetricWriter``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable

import jax
import numpy as np
from clu import metric_writers
from clu import periodic_actions

from ntk_diag import _validation
from ntk_diag import checkpoint
from ntk_diag import snapshot as snapshot_lib
from ntk_diag import tb_logging

PyTree = Any
DEFAULT_EVERY_STEPS = 100


@dataclasses.dataclass(frozen=True)
class SnapshotResult:
  """The last snapshot, as host values.

  Attributes:
    step: training step of the snapshot.
    scalars: every logged scalar, keyed by tag without the ``ntk_diag/`` prefix.
    eigenvalues: NTK eigenvalues on the probe set, descending (or ``None``).
    kernel: the NTK on the probe set (or ``None``).
  """
  step: int
  scalars: dict[str, float]
  eigenvalues: np.ndarray | None
  kernel: np.ndarray | None


class LazyTrainingHook(periodic_actions.PeriodicAction):
  """Periodic NTK / lazy-ratio diagnostics, logged to TensorBoard through CLU.

  Call it once per step, before the update (so step 0 sees θ0)::

    hook = LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=workdir, every_steps=100)
    for step in range(num_steps):
      hook(step, params=state.params)   # or hook(step, model=model) for NNX
      state = train_step(state, batch)

  On the first call θ0, the probe set and the NTK at θ0 are checkpointed under
  ``workdir`` with orbax; a hook on a ``workdir`` that already holds them (a
  resumed run) restores them instead, so every quantity keeps being measured
  from the original θ0. Each triggered call computes one snapshot with a
  single compiled function, writes it, and flushes the writer.

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)`` (e.g. from :func:`ntk_diag.from_linen`).
    probe_x: probe inputs, ``n`` examples.
    probe_y: probe targets, shaped like the model output on ``probe_x``.
    workdir: directory for the θ0 checkpoint and (default writer) event files.
    writer: a ``clu.metric_writers.MetricWriter``; default
      ``create_default_writer(workdir)`` (logging only on processes other than 0).
    every_steps, every_secs, on_steps: when to trigger, as in
      ``clu.periodic_actions.PeriodicAction``; if all are ``None``,
      ``every_steps=100``. A step divisible by ``every_steps`` triggers,
      including the first call.
    compute_ntk: NTK snapshot, kernel statistics vs θ0 and targets, velocity.
    compute_norms: Jacobian / Hessian norms and κ.
    compute_twin: gap between the network and its linearization at θ0.
    config: cost and method options, see :class:`ntk_diag.snapshot.SnapshotConfig`.
    log_images: also write the NTK heatmap and spectrum plot as images.
    images_every: write the images at every ``images_every``-th snapshot
      (the first included); rendering the plot costs ~0.1 s.
    strict: re-raise exceptions from a snapshot instead of warning and
      counting them in ``ntk_diag/failed`` (the training loop is never
      interrupted when ``False``).
  """

  def __init__(self, apply_fn: Callable, probe_x: PyTree, probe_y: Any, *, workdir: str,
               writer: metric_writers.MetricWriter | None = None,
               every_steps: int | None = None, every_secs: float | None = None,
               on_steps: Iterable[int] | None = None,
               compute_ntk: bool = True, compute_norms: bool = True, compute_twin: bool = True,
               config: snapshot_lib.SnapshotConfig | None = None,
               log_images: bool = True, images_every: int = 10, strict: bool = False):
    _validation.check_callable("apply_fn", apply_fn)
    n = _validation.leading_size("probe_x", probe_x)
    _validation.check_same_length("probe_x", n, "probe_y", _validation.leading_size("probe_y", probe_y))
    _validation.check_positive_int("every_steps", every_steps, optional=True)
    _validation.check_positive_number("every_secs", every_secs, optional=True)
    _validation.check_positive_int("images_every", images_every)
    if not isinstance(workdir, (str, bytes)) and not hasattr(workdir, "__fspath__"):
      raise TypeError(f"`workdir` must be a path; got {type(workdir).__name__}.")
    if every_steps is None and every_secs is None and not on_steps:
      every_steps = DEFAULT_EVERY_STEPS
    super().__init__(every_steps=every_steps, every_secs=every_secs, on_steps=on_steps)
    self._config = config or snapshot_lib.SnapshotConfig()
    self._config.validate()
    self._groups = snapshot_lib.Groups(ntk=compute_ntk, norms=compute_norms, twin=compute_twin)
    self._apply_fn = apply_fn
    self._probe_x = probe_x
    self._probe_y = probe_y
    self._workdir = workdir
    self._is_writer = jax.process_index() == 0
    self._writer = writer if writer is not None else metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer)
    self._log_images = log_images
    self._images_every = images_every
    self._snapshots = 0
    self._strict = strict
    self._params = None
    self._engine: snapshot_lib.SnapshotEngine | None = None
    self._failures = 0
    self._disabled = False
    self._warned_nonfinite = False
    self.last: SnapshotResult | None = None

  # ----------------------------------------------------------------- calling
  def __call__(self, step: int, t: float | None = None, *, params: PyTree = None,
               model: Any = None) -> bool:
    """Call after every step with the current ``params`` (or NNX ``model``).

    Returns:
      Whether a snapshot was taken.
    """
    if (params is None) == (model is None):
      raise TypeError("Pass exactly one of `params=` (a params pytree) or `model=` (an nnx.Module).")
    if model is not None:
      from flax import nnx
      if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx.Module; got {type(model).__name__}.")
      params = nnx.state(model, nnx.Param)
    if self._disabled:
      return False
    if self._engine is None:
      # Wrong probe targets, a stale workdir...: without `strict` the hook
      # turns itself off instead of killing the run.
      if not self._guarded(step, "could not start; the hook is disabled",
                           lambda: setattr(self, "_engine", self._initialize(params, step))):
        self._disabled = True
        return False
    self._params = params
    try:
      return super().__call__(step, t)
    finally:
      self._params = None

  @property
  def initial_params(self) -> PyTree:
    """θ0 (restored from ``workdir`` on a resumed run)."""
    if self._engine is None:
      raise RuntimeError("θ0 is known after the first call of the hook.")
    return self._engine.theta0

  # ---------------------------------------------------------------- internals
  def _initialize(self, params: PyTree, step: int) -> snapshot_lib.SnapshotEngine:
    if checkpoint.has_initial_state(self._workdir):
      state = checkpoint.restore_initial_state(self._workdir, params)
      return snapshot_lib.SnapshotEngine(self._apply_fn, state.params, state.probe_x, state.probe_y,
                                         kernel0=state.kernel0, step0=state.step,
                                         groups=self._groups, config=self._config)
    engine = snapshot_lib.SnapshotEngine(self._apply_fn, params, self._probe_x, self._probe_y,
                                         kernel0=None, step0=step, groups=self._groups,
                                         config=self._config)
    checkpoint.save_initial_state(self._workdir, checkpoint.InitialState(
        params=engine.theta0, probe_x=engine.probe_x, probe_y=engine.probe_y,
        kernel0=engine.kernel0, step=step))
    return engine

  def _apply(self, step: int, t: float) -> None:
    self._guarded(step, "snapshot failed and was skipped",
                  lambda: self._record(step, self._engine.run(self._params, step)))

  def _guarded(self, step: int, what: str, action: Callable[[], Any]) -> bool:
    """Runs ``action``; a failure is counted in ``ntk_diag/failed`` and warned
    about (re-raised with ``strict``), never propagated into the training loop."""
    try:
      action()
      return True
    except Exception as error:
      self._failures += 1
      if self._strict:
        raise
      warnings.warn(f"ntk_diag: step {step}: {what}: {type(error).__name__}: {error}",
                    RuntimeWarning, stacklevel=4)
      try:
        self._write(step, {"failed": float(self._failures)}, None, None)
      except Exception:  # the writer itself is broken; the warning is all we can do
        pass
      return False

  def _record(self, step: int, result: snapshot_lib.EngineResult) -> None:
    scalars = dict(result.scalars, failed=float(self._failures))
    if not result.finite:
      if not self._warned_nonfinite:
        warnings.warn(f"ntk_diag: non-finite values at step {step} (NaN/Inf in params or outputs); "
                      "logging them with ntk_diag/nonfinite = 1.", RuntimeWarning, stacklevel=3)
        self._warned_nonfinite = True
    self.last = SnapshotResult(step=step, scalars=scalars, eigenvalues=result.eigenvalues,
                               kernel=result.kernel)
    images = self._log_images and self._snapshots % self._images_every == 0
    self._snapshots += 1
    self._write(step, scalars, result.eigenvalues, result.kernel if images else None)

  def _write(self, step: int, scalars: dict[str, float], eigenvalues: np.ndarray | None,
             kernel: np.ndarray | None) -> None:
    if not self._is_writer:
      return
    tb_logging.write_snapshot(self._writer, step, scalars, eigenvalues, kernel)

  @property
  def disabled(self) -> bool:
    """Whether the hook turned itself off because it could not start (``strict=False``)."""
    return self._disabled
