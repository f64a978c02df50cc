"""``LazyTrainingHook``: lazy-training diagnostics inside any Flax training loop.

A thin stateful shell, in the manner of ``clu.periodic_actions``: the math
lives in the pure function :func:`ntk_diag.snapshot.snapshot`, compiled once
per run; this module decides when to run it, keeps θ0 (via
:mod:`ntk_diag.checkpoint`), holds the snapshot's state between calls and
writes the results through a CLU ``MetricWriter``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable, Iterable

import jax
import numpy as np
from clu import metric_writers
from clu import periodic_actions

from ntk_diag import _loop_inputs
from ntk_diag import _model
from ntk_diag import _placement
from ntk_diag import _validation
from ntk_diag import checkpoint
from ntk_diag import diag_state
from ntk_diag import losses
from ntk_diag import snapshot as snapshot_lib
from ntk_diag import tb_logging

PyTree = Any
DEFAULT_EVERY_STEPS = 100
_TWIN_TAGS = ("twin_distance", "twin_param_distance")


@dataclasses.dataclass(frozen=True)
class SnapshotResult:
  """The last snapshot, as host values.

  Attributes:
    step: training step of the snapshot.
    scalars: every logged scalar, keyed by tag without the ``ntk_diag/`` prefix.
    eigenvalues: NTK eigenvalues on the probe set, descending (or ``None``).
    kernel: the NTK on the probe set when it was fetched for the images, on
      the process that writes them (process 0), or ``None``.
  """
  step: int
  scalars: dict[str, float]
  eigenvalues: np.ndarray | None
  kernel: np.ndarray | None


@dataclasses.dataclass
class _Run:
  """What the hook holds after start-up: the compiled snapshot and its state."""
  snapshotter: snapshot_lib.Snapshotter
  state: diag_state.DiagState
  with_model_state: bool
  replicated: bool
  pending: tuple[int, dict] | None = None  # the start-up snapshot (at θ0), not yet logged


class LazyTrainingHook(periodic_actions.PeriodicAction):
  """Periodic NTK / lazy-ratio diagnostics, logged to TensorBoard through CLU.

  Call it once per step, before the update (so the first call sees θ0)::

    hook = LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=workdir, every_steps=100)
    for step in range(num_steps):
      hook(step, params=state.params, model_state={"batch_stats": state.batch_stats})
      state = train_step(state, batch)

  (``model_state`` only for models that have one; ``hook(step, model=model)``
  for NNX.) The measured function is always the model of this step in eval
  mode: ``apply_fn(params, x, model_state)``.

  Start-up, at the first call: θ0, its model state, the probe set and the NTK
  at θ0 are checkpointed under ``workdir`` with orbax, or restored if
  ``workdir`` holds them and this is a resumed run (a first call at a step
  after the saved one); the snapshot is compiled once for the shardings of
  that call. Misconfiguration raises here (``ValueError``/``TypeError``)
  with a message that says what to change: ``probe_y`` that doesn't fit the
  model and ``loss``, an ``apply_fn`` that fails, a ``workdir`` holding θ0 of
  another model or of another run, a checkpoint that cannot be read. After
  start-up the hook never raises into the loop (unless ``strict``): a failed
  snapshot is warned about and counted in ``ntk_diag/failed``.

  Args:
    apply_fn: ``apply_fn(params, x)``, or ``apply_fn(params, x, model_state)``
      when the hook is given ``model_state`` (e.g. from
      :func:`ntk_diag.from_linen` or :func:`ntk_diag.from_nnx`).
    probe_x: probe inputs, ``n`` examples.
    probe_y: probe targets for ``loss``: shaped like the model output, or
      integer labels for ``"softmax_cross_entropy"``.
    workdir: directory for the θ0 checkpoint and (default writer) event files.
    writer: a ``clu.metric_writers.MetricWriter``; default
      ``create_default_writer(workdir)`` (logging only on processes other than 0).
    every_steps, every_secs, on_steps: when to trigger, as in
      ``clu.periodic_actions.PeriodicAction``; if all are ``None``,
      ``every_steps=100``. A step divisible by ``every_steps`` triggers,
      including the first call.
    loss: ``"mse"`` (default), ``"softmax_cross_entropy"`` or a callable
      ``loss(outputs, y) -> (n,)``: ``residual_norm`` and ``kappa`` use its
      output gradient (:mod:`ntk_diag.losses`).
    norm_examples: the norm tags (``jacobian_norm``, ``hessian_norm``,
      ``residual_norm``, ``kappa``, the lazy radius) are those of
      :func:`ntk_diag.lazy_ratio` on the first ``norm_examples`` probe points
      (``None``: all); the kernel tags and ``sharpness``
      (:func:`ntk_diag.loss_sharpness`) use every probe point.
    learning_rate: the optimiser's step ``η``: also log
      ``sharpness_lr = η · sharpness`` (the edge of stability is at 2).
    infinite: a network of :mod:`ntk_diag.infinite` (``serial(...)``), the
      infinite-width limit of the model: also log
      ``kernel_distance_infinite``, the relative Frobenius distance of the
      per-output NTK (``trace_outputs / k``) from the limit's NTK.
    max_overhead: a budget for the fraction of wall time spent in snapshots:
      a due snapshot is deferred while (time in snapshots after the first) /
      (wall time since the first snapshot ended) would exceed it, and taken
      at the first step where it fits; ``ntk_diag/overhead`` logs that fraction.
    compute_ntk: NTK snapshot, kernel statistics vs θ0 and targets, velocity.
    compute_norms: Jacobian / Hessian norms, κ and the lazy radius.
    compute_twin: gap between the network and its linearization at θ0 (and
      the lockstep twin's distances when called with ``twin_params``).
    compute_sharpness: with ``compute_norms``, also ``sharpness`` (and
      ``sharpness_lr``): a Lanczos run on the mean loss's Hessian over every
      probe point, the norm group's most expensive part (at least two
      Hessian-vector products over all probes per snapshot: on the benchmark
      MLP about 1.4 traced NTKs of time, a third of the snapshot).
    config: cost and method options, see :class:`ntk_diag.diag_state.SnapshotConfig`.
    log_images: also write the NTK heatmap and spectrum plot as images.
    images_every: write the images at every ``images_every``-th snapshot
      (the first included); rendering the plot costs ~0.1 s.
    strict: re-raise exceptions from snapshots after start-up instead of
      warning and counting them in ``ntk_diag/failed``.
    clock: the time source for ``t`` and for the snapshot durations of
      ``max_overhead`` (tests pass a fake one).
  """

  def __init__(self, apply_fn: Callable, probe_x: PyTree, probe_y: Any, *, workdir: str,
               writer: metric_writers.MetricWriter | None = None,
               every_steps: int | None = None, every_secs: float | None = None,
               on_steps: Iterable[int] | None = None, loss: losses.LossLike = "mse",
               norm_examples: int | None = diag_state.DEFAULT_NORM_EXAMPLES,
               learning_rate: float | None = None, infinite: Any = None,
               max_overhead: float | None = None,
               compute_ntk: bool = True, compute_norms: bool = True, compute_twin: bool = True,
               compute_sharpness: bool = True, config: diag_state.SnapshotConfig | None = None,
               log_images: bool = True, images_every: int = 10, strict: bool = False,
               clock: Callable[[], float] = time.monotonic):
    _validation.check_callable("apply_fn", apply_fn)
    n = _validation.leading_size("probe_x", probe_x)
    _validation.check_same_length("probe_x", n, "probe_y", _validation.leading_size("probe_y", probe_y))
    _validation.check_positive_int("every_steps", every_steps, optional=True)
    _validation.check_positive_number("every_secs", every_secs, optional=True)
    _validation.check_positive_int("images_every", images_every)
    _validation.check_positive_int("norm_examples", norm_examples, optional=True)
    _validation.check_positive_number("max_overhead", max_overhead, optional=True)
    _validation.check_positive_number("learning_rate", learning_rate, optional=True)
    if infinite is not None:
      from ntk_diag.infinite import layers as infinite_layers
      if not isinstance(infinite, infinite_layers.Serial):
        raise TypeError("`infinite` must be a network from ntk_diag.infinite.serial(...); got "
                        f"{type(infinite).__name__}.")
      infinite_layers.check_network(infinite, tuple(np.shape(probe_x)[1:]))
    losses.check_loss("loss", loss)
    if not isinstance(workdir, (str, bytes)) and not hasattr(workdir, "__fspath__"):
      raise TypeError(f"`workdir` must be a path; got {type(workdir).__name__}.")
    if every_steps is None and every_secs is None and not on_steps:
      every_steps = DEFAULT_EVERY_STEPS
    super().__init__(every_steps=every_steps, every_secs=every_secs, on_steps=on_steps)
    self._config = config or diag_state.SnapshotConfig()
    self._config.validate()
    self._groups = dict(compute_ntk=bool(compute_ntk), compute_norms=bool(compute_norms),
                        compute_twin=bool(compute_twin),
                        compute_sharpness=bool(compute_norms and compute_sharpness))
    self._apply_fn = apply_fn
    self._probe_x = probe_x
    self._probe_y = probe_y
    self._loss = loss
    self._learning_rate = None if learning_rate is None else float(learning_rate)
    self._infinite = infinite
    self._norm_examples = diag_state.norm_examples_count(n, norm_examples)
    self._workdir = os.fspath(workdir)
    self._is_writer = jax.process_index() == 0
    self._writer = writer if writer is not None else metric_writers.create_default_writer(
        self._workdir, just_logging=not self._is_writer)
    self._log_images = log_images
    self._images_every = images_every
    self._strict = strict
    self._clock = clock
    self._max_overhead = max_overhead
    self._snapshots = 0
    self._failures = 0
    self._warned = set()
    self._run: _Run | None = None
    # Overhead accounting: end of the first snapshot, time in snapshots after
    # it, and the duration of the last one (the estimate of the next).
    self._first_end: float | None = None
    self._spent = 0.0
    self._last_cost = 0.0
    self._deferred = False
    self.last: SnapshotResult | None = None

  # ----------------------------------------------------------------- calling
  def __call__(self, step: Any, t: float | None = None, *, params: PyTree = None,
               model: Any = None, model_state: PyTree = None, twin_params: PyTree = None) -> bool:
    """Call every step (before the update) with the current ``params`` (or NNX ``model``).

    Args:
      step: the training step, a Python int or an integer scalar array
        (``TrainState.step``; passing a Python int avoids a device sync).
      t: the current time; default ``clock()``.
      params: the trainable parameters; pmap-replicated params
        (``flax.jax_utils.replicate``) are accepted (the first replica is used).
      model: an ``nnx.Module`` instead of ``params``: its ``nnx.Param`` state
        and its other (non-RNG) state are read at this step.
      model_state: the non-trainable variables of this step, e.g.
        ``{"batch_stats": state.batch_stats}``; the hook then calls
        ``apply_fn(params, x, model_state)``.
      twin_params: the lockstep twin's parameters (:class:`ntk_diag.LinearizedTwin`).

    Returns:
      Whether a snapshot was taken.
    """
    if self._run is None:
      # Start-up: misconfiguration raises here, naming the fix.
      step = _loop_inputs.as_step(step)
      self._run = self._start(step, _loop_inputs.call_inputs(params, model, model_state, twin_params))
    else:
      try:
        step = _loop_inputs.as_step(step)
      except TypeError as error:
        self._fail(step, "the call was ignored", error)
        return False
    # clu's template, with this call's model passed through to `_apply` (as
    # clu's PeriodicCallback passes its kwargs).
    t = self._clock() if t is None else t
    self._init_and_check(step, t)
    if not self._should_trigger(step, t):
      return False
    self._apply(step, t, params=params, model=model, model_state=model_state,
                twin_params=twin_params)
    self._after_apply(step, t)
    return True

  @property
  def initial_params(self) -> PyTree:
    """θ0 (restored from ``workdir`` on a resumed run), on the devices and
    shardings of the first call's params (global arrays in a multi-process run)."""
    if self._run is None:
      raise RuntimeError("θ0 is known after the first call of the hook.")
    return self._run.state.theta0

  # ------------------------------------------------------------- scheduling
  def _init_and_check(self, step: int, t: float) -> None:
    # clu raises when a step is skipped with `every_steps`; the hook must not
    # raise into the loop (gradient accumulation, evaluation-only steps...).
    if (self._previous_step is not None and self._every_steps is not None
        and step - self._last_step != 1):
      self._warn_once("skipped", f"ntk_diag: the hook was called at step {step} after step "
                      f"{self._last_step}; call it once every step for `every_steps` to be exact.")
    if self._previous_step is None:
      self._previous_step, self._previous_time = step, t
    self._last_step = step

  def _should_trigger(self, step: int, t: float) -> bool:
    due = super()._should_trigger(step, t) or self._deferred
    pending = self._run.pending is not None and self._run.pending[0] == step
    if not due or self._max_overhead is None or pending:
      return due
    projected = (self._spent + self._last_cost) / max(t + self._last_cost - self._first_end, 1e-9)
    self._deferred = projected > self._max_overhead
    return not self._deferred

  def _apply(self, step: int, t: float, **call: Any) -> None:
    start = self._clock()
    computed = []
    self._guarded(step, "snapshot failed and was skipped",
                  lambda: computed.append(self._snapshot(step, start, **call)))
    cost = self._clock() - start
    self._spent += cost
    if computed and computed[0]:
      self._last_cost = cost

  # ---------------------------------------------------------------- start-up
  def _start(self, step: int, inputs: _loop_inputs.CallInputs) -> _Run:
    replicated = _loop_inputs.is_pmap_replicated(inputs.params)
    inputs = inputs.unreplicated(replicated)
    params, model_state = inputs.params, inputs.model_state
    with_model_state = model_state is not None
    x = self._probe_x
    n = _validation.leading_size("probe_x", x)
    out_shape = self._output_shape(params, model_state, x)
    losses.check_targets("probe_y", self._probe_y, self._loss, (n,) + out_shape)
    k = _model.num_outputs(out_shape)
    spec = diag_state.SnapshotSpec(
        apply_fn=self._apply_fn, with_model_state=with_model_state, config=self._config,
        loss=self._loss, norm_examples=self._norm_examples,
        learning_rate=self._learning_rate, infinite=self._infinite,
        alignment=not callable(self._loss) or np.size(self._probe_y) == n * k, **self._groups)
    layout = diag_state.hessian_layout(spec, params, model_state, x)
    warm = diag_state.warm_start_fits(params, self._norm_examples, k,
                                      self._config.warm_start_bytes, layout=layout)
    spec = dataclasses.replace(spec, warm_start=warm)

    theta0, model_state0, probe_x, probe_y, kernel0, step0 = (
        params, model_state, x, self._probe_y, None, step)
    restored = None
    if _loop_inputs.has_checkpoint(self._workdir, step):
      restored = checkpoint.restore_initial_state(self._workdir, params, model_state,
                                                  like_probe_x=x)
      if step <= restored.step and not _placement.trees_equal(params, restored.params):
        path = checkpoint.checkpoint_path(self._workdir)
        raise ValueError(
            f"`workdir`={self._workdir!r} holds θ0 of another run: it was saved at step "
            f"{restored.step} and this run starts at step {step} with different parameters (a new "
            f"seed or model in a reused workdir?). A resumed run starts after step {restored.step}. "
            f"Use a new workdir, or delete {path} to start fresh; the checkpoint was not modified.")
      theta0, model_state0, probe_x, step0 = (restored.params, restored.model_state,
                                              restored.probe_x, restored.step)
      probe_y, kernel0 = restored.probe_y, restored.kernel0
    # Private device copies, placed like this call's arrays (the training step
    # may donate the caller's buffers); host values on a replicated sharding.
    host_sharding = _placement.reference_sharding(params, model_state, x, self._probe_y)
    like = lambda tree: jax.tree.map(lambda a: _placement.sharding_or(a, host_sharding), tree)
    theta0 = _placement.put(theta0, like(params), copy=True)
    model_state0 = (_placement.put(model_state0, like(model_state), copy=True)
                    if with_model_state else None)
    prepared_y = losses.prepare_targets(self._loss, _placement.host_unless_global(probe_y), (n,) + out_shape)
    if not _placement.is_global(prepared_y):
      prepared_y = np.asarray(prepared_y)
    state = diag_state.initial_state(spec, theta0, model_state0, probe_x, prepared_y,
                                     step=step0, kernel0=kernel0)
    snapshotter = snapshot_lib.Snapshotter(spec, state, params, model_state)
    # The first snapshot is at θ0: it fills f(θ0), K0, the lazy radius and
    # the warm starts. In a fresh run it is this step's snapshot.
    start = self._clock()
    state, metrics = jax.block_until_ready(snapshotter(state, theta0, model_state0, step0))
    self._last_cost = self._clock() - start
    if restored is None:
      checkpoint.save_initial_state(self._workdir, checkpoint.InitialState(
          params=theta0, probe_x=probe_x, probe_y=probe_y, model_state=model_state0,
          kernel0=state.kernel0, step=step0))
    pending = (step, metrics) if restored is None else None
    self._first_end = self._clock()
    return _Run(snapshotter=snapshotter, state=state, with_model_state=with_model_state,
                replicated=replicated, pending=pending)

  def _output_shape(self, params: PyTree, model_state: PyTree, x: PyTree) -> tuple[int, ...]:
    """The per-example output shape; an ``apply_fn`` that fails raises with hints."""
    fn = (self._apply_fn if model_state is None
          else lambda p, xx: self._apply_fn(p, xx, model_state))
    try:
      return _model.example_output_shape(fn, params, x)
    except Exception as error:
      raise _loop_inputs.startup_error(error, model_state is not None) from error

  # --------------------------------------------------------------- snapshots
  def _snapshot(self, step: int, start: float, **call: Any) -> bool:
    """Takes (or logs the start-up) snapshot; returns whether one was computed."""
    run = self._run
    inputs = _loop_inputs.call_inputs(**call)
    computed = not (run.pending is not None and run.pending[0] == step)
    if not computed:
      metrics = run.pending[1]  # the start-up snapshot at θ0
    else:
      model = inputs.unreplicated(run.replicated)
      if run.with_model_state != (model.model_state is not None):
        raise ValueError("Pass `model_state` at every call or at none (it was "
                         f"{'given' if run.with_model_state else 'not given'} at the first call).")
      run.state, metrics = run.snapshotter(run.state, model.params, model.model_state, step,
                                           model.twin_params)
    run.pending = None
    if inputs.twin_params is None:
      metrics = {name: v for name, v in metrics.items() if name not in _TWIN_TAGS}
    self._record(step, metrics, start)
    return computed

  def _record(self, step: int, metrics: dict[str, jax.Array], start: float) -> None:
    eigenvalues = metrics.pop("eigenvalues", None)
    host = _placement.to_host((metrics, eigenvalues))  # replicated: a local copy
    scalars = {name: float(value) for name, value in host[0].items()}
    eigenvalues = None if host[1] is None else np.asarray(host[1])
    scalars["failed"] = float(self._failures)
    if self._max_overhead is not None:
      now = self._clock()
      scalars["overhead"] = (self._spent + now - start) / max(now - self._first_end, 1e-9)
    if scalars.get("nonfinite"):
      self._warn_once("nonfinite", f"ntk_diag: non-finite values at step {step} (NaN/Inf in "
                      "params or outputs); logging them with ntk_diag/nonfinite = 1.")
    images = self._log_images and self._snapshots % self._images_every == 0
    kernel = None
    if images and self._is_writer and self._run.state.prev_kernel is not None:
      # Replicated: a local copy, on the process that writes the images.
      kernel = np.asarray(jax.device_get(self._run.state.prev_kernel))
    self._snapshots += 1
    self.last = SnapshotResult(step=step, scalars=scalars, eigenvalues=eigenvalues, kernel=kernel)
    self._write(step, scalars, eigenvalues, kernel)

  # ---------------------------------------------------------------- failures
  def _guarded(self, step: int, what: str, action: Callable[[], Any]) -> bool:
    """Runs ``action``; a failure is counted in ``ntk_diag/failed`` and warned
    about (re-raised with ``strict``), never propagated into the training loop."""
    try:
      action()
      return True
    except Exception as error:
      return self._fail(step, what, error)

  def _fail(self, step: Any, what: str, error: Exception) -> bool:
    self._failures += 1
    if self._strict:
      raise error
    warnings.warn(f"ntk_diag: step {step}: {what}: {type(error).__name__}: {error}",
                  RuntimeWarning, stacklevel=5)
    try:
      self._write(step, {"failed": float(self._failures)}, None, None)
    except Exception:  # the writer itself is broken; the warning is all we can do
      pass
    return False

  def _warn_once(self, key: str, message: str) -> None:
    if key not in self._warned:
      self._warned.add(key)
      warnings.warn(message, RuntimeWarning, stacklevel=5)

  def _write(self, step: int, scalars: dict[str, float], eigenvalues: np.ndarray | None,
             kernel: np.ndarray | None) -> None:
    if not self._is_writer:
      return
    tb_logging.write_snapshot(self._writer, step, scalars, eigenvalues, kernel)
