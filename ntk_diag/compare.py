"""One-call comparison of the trained network with the kernel regime.

:func:`compare` evaluates, on a test set, the network at ``θ``, its
linearized twin trained in lockstep (:class:`~ntk_diag.LinearizedTwin`), the
NTK kernel predictor at the matching training time and, for the squared
loss, the kernel interpolator (``t = ∞``); :class:`Comparison` prints them as
one table. :func:`kernel_learning_rate` converts an optimiser's learning
rate to the kernel predictor's time convention.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_diag import _layout
from ntk_diag import _model
from ntk_diag import _validation
from ntk_diag import losses
from ntk_diag import ntk
from ntk_diag import spectral
from ntk_diag.linearize import linearize
from ntk_diag.predict import kernel_predictor

PyTree = Any
REDUCTIONS = ("mean", "sum")
NETWORK = "network"
TWIN = "linearized twin"
INTERPOLATOR = "kernel interpolator (t = ∞)"
_MISSING = "—"


def kernel_learning_rate(learning_rate: float, *, num_train: int, batch_size: int | None = None,
                         momentum: float = 0.0, reduction: str = "mean") -> float:
  """The ``learning_rate`` of :func:`~ntk_diag.kernel_predictor` matching an SGD run.

  The kernel predictor models gradient flow ``dθ/dt = −η ∇L`` of the SUMMED
  loss over the ``n = num_train`` training examples, with ``t`` counted in
  optimiser steps. One step of SGD with learning rate ``lr`` on a batch of
  ``B`` examples moves, in expectation over the batch, by

  * ``lr · (1/n) ∇L`` for the batch's MEAN loss (any ``B``, full batch
    included): ``η = lr / n``;
  * ``lr · (B/n) ∇L`` for the batch's summed loss: ``η = lr · B / n``.

  Heavy-ball momentum ``β`` (``optax.sgd(lr, momentum=β)``, Nesterov too)
  multiplies the step by ``1 / (1 − β)`` once the velocity has built up
  (after ``~1/(1 − β)`` steps), so ``η`` is divided by ``1 − β``.

  .. note::
    This is the gradient-flow limit: it matches when ``η·λ_max(K) ≪ 1`` per
    step, the run is many steps long compared with ``1/(1 − β)``, and the
    minibatch noise averages out. Adaptive optimisers (Adam...) precondition
    the gradient and have no such kernel; compare with the lockstep twin.

  Args:
    learning_rate: the optimiser's learning rate ``lr > 0`` (constant).
    num_train: ``n``, the number of training examples the kernel is built on.
    batch_size: ``B``; ``None`` = full batch (``B = n``). Used for ``"sum"``.
    momentum: ``β ∈ [0, 1)``.
    reduction: ``"mean"`` or ``"sum"``, how the loss is reduced over a batch.

  Returns:
    ``η`` as a float: pass it as ``learning_rate`` with ``t`` = steps.
  """
  _validation.check_positive_number("learning_rate", learning_rate)
  _validation.check_positive_int("num_train", num_train)
  _validation.check_positive_int("batch_size", batch_size, optional=True)
  _validation.check_nonnegative_number("momentum", momentum)
  if not momentum < 1:
    raise ValueError(f"`momentum` must be in [0, 1); got {momentum}.")
  _validation.check_one_of("reduction", reduction, REDUCTIONS)
  per_step = learning_rate / (1.0 - momentum)
  if reduction == "mean":
    return per_step / num_train
  return per_step * (batch_size or num_train) / num_train


@dataclasses.dataclass(frozen=True)
class PredictorRow:
  """One predictor's test metrics.

  Attributes:
    name: ``"network"``, ``"linearized twin"``, ``"kernel predictor (t = …)"``
      or ``"kernel interpolator (t = ∞)"``.
    test_loss: mean per-example test loss (the ``loss`` of :func:`compare`).
    accuracy: fraction of test examples whose argmax output is the label;
      ``None`` when the targets are not classes.
    agreement: fraction of test examples on which the argmax agrees with the
      network's; ``None`` for the network and for non-class targets.
    distance: ``‖f − f_net‖ / ‖f_net − f(θ0)‖`` over all test outputs, the
      function-space distance to the network relative to how far the
      network moved (0 where it did not move); ``None`` for the network.
  """
  name: str
  test_loss: float
  accuracy: float | None
  agreement: float | None
  distance: float | None


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Result of :func:`compare`: one :class:`PredictorRow` per predictor.

  Attributes:
    rows: network first, then the twin, kernel predictor and interpolator
      where computed.
    loss: name of the loss (``"mse"``, ``"softmax_cross_entropy"``, or the
      callable's ``__name__``).
    time: ``t`` of the kernel predictor (optimiser steps), or ``None``.
    kernel_learning_rate: ``η`` of the kernel predictor, or ``None``.
    num_train, num_test: examples in the training (kernel) and test sets.
    test_outputs: ``{row name: (m, *out) array}``, the test outputs behind
      each row (not shown in the table).
  """
  rows: tuple[PredictorRow, ...]
  loss: str
  time: float | None
  kernel_learning_rate: float | None
  num_train: int
  num_test: int
  test_outputs: dict[str, np.ndarray] = dataclasses.field(repr=False, compare=False,
                                                          default_factory=dict)

  def row(self, name: str) -> PredictorRow:
    """The row called ``name`` (``KeyError`` listing the names otherwise)."""
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"No row {name!r}; rows: {[r.name for r in self.rows]}.")

  def caption(self) -> str:
    """One line: data sizes, loss and the kernel predictor's time."""
    text = f"{self.num_test} test examples, kernel on {self.num_train} training examples, loss {self.loss}"
    if self.time is not None:
      text += f", kernel predictor at t = {_number(self.time)} (η = {self.kernel_learning_rate:.4g})"
    return text + "."

  def table(self) -> str:
    """Plain-text table, columns aligned."""
    header = ("predictor", "test loss", "accuracy", "agreement", "distance")
    cells = [header] + [_cells(row) for row in self.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)

  def to_markdown(self) -> str:
    """Markdown table with a caption line below it."""
    lines = ["| predictor | test loss | accuracy | argmax agreement with network |"
             " ‖f − f_net‖ / ‖f_net − f(θ0)‖ (test) |", "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in self.rows]
    return "\n".join(lines) + "\n\n" + self.caption() + "\n"

  def __str__(self) -> str:
    return self.table() + "\n" + self.caption()


def compare(apply_fn: Callable, params0: PyTree | str | os.PathLike, params: PyTree,
            x_train: PyTree, y_train: Any, x_test: PyTree, y_test: Any, *,
            loss: losses.LossLike = "mse", twin_params: PyTree | None = None,
            learning_rate: float | None = None, steps: float | None = None,
            momentum: float = 0.0, batch_size: int | None = None, reduction: str = "mean",
            interpolator_ridge: float | None = 1e-3, model_state: Any = None,
            model_state0: Any = None, ntk_batch_size: int | None = None) -> Comparison:
  """The network, its lockstep twin and the NTK kernel predictor on a test set.

  Rows (see :class:`PredictorRow` for the columns):

  * ``"network"``: ``f(θ, x)``;
  * ``"linearized twin"`` (with ``twin_params``): ``f(θ0, x) + J_x(θ0)(θ̃ − θ0)``
    at the parameters ``θ̃`` of a :class:`~ntk_diag.LinearizedTwin` trained
    in lockstep with the network. Not the twin at ``θ``: the linearization
    evaluated at the network's final parameters is not a trained model;
  * ``"kernel predictor (t = steps)"`` (with ``learning_rate`` and ``steps``):
    :func:`~ntk_diag.kernel_predictor` with the full NTK at ``θ0`` on
    ``x_train``, ``loss``, ``t = steps`` and ``η`` from
    :func:`kernel_learning_rate` (``learning_rate``, ``momentum``,
    ``batch_size``, ``reduction``);
  * ``"kernel interpolator (t = ∞)"`` (``loss="mse"`` only; skip with
    ``interpolator_ridge=None``): the lecture's interpolator
    ``f0(x) + K_xX (K + ρI)⁻¹ (y − f0(X))``, ``ρ = interpolator_ridge · λ_max(K)``.

  ``x_train`` is the set the network was trained on (or the subset the
  kernel should be built on: the full ``(n·k) × (n·k)`` NTK is formed, and
  the kernel predictor's time assumes the network saw these ``n`` examples).

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; with ``model_state``,
      ``apply_fn(params, x, model_state)``.
    params0: ``θ0``, or the hook's ``workdir`` (a path) from which it is
      restored with ``load_initial_params(workdir, like=params)``.
    params: the trained network's ``θ``.
    x_train, y_train: training inputs and targets (for the kernel predictor).
    x_test, y_test: test inputs and targets. Targets as the ``loss`` takes
      them: outputs' shape, or integer labels for cross-entropy.
    loss: ``"mse"``, ``"softmax_cross_entropy"`` or a callable per-example loss.
    twin_params: ``TwinState.params`` of the lockstep twin, if any.
    learning_rate, steps: the optimiser's (constant) learning rate and the
      number of steps taken; both or neither.
    momentum, batch_size, reduction: see :func:`kernel_learning_rate`.
    interpolator_ridge: ridge of the ``t = ∞`` row, relative to ``λ_max(K)``.
    model_state: non-trainable variables of the network at ``θ``.
    model_state0: those at ``θ0``, used by the twin and the kernel; default
      ``model_state``.
    ntk_batch_size: ``batch_size`` of :func:`~ntk_diag.empirical_ntk`.

  Returns:
    A :class:`Comparison`; ``print(comparison)`` shows the table.
  """
  _validation.check_callable("apply_fn", apply_fn)
  losses.check_loss("loss", loss)
  if (learning_rate is None) != (steps is None):
    raise ValueError(
        "Pass both `learning_rate` and `steps` (the optimiser's learning rate and the number"
        f" of steps taken) for the kernel predictor row, or neither; got learning_rate="
        f"{learning_rate!r}, steps={steps!r}.")
  if steps is not None:
    _validation.check_nonnegative_number("steps", steps)
  if interpolator_ridge is not None:
    _validation.check_positive_number("interpolator_ridge", interpolator_ridge)
  _validation.check_positive_int("ntk_batch_size", ntk_batch_size, optional=True)
  n = _validation.leading_size("x_train", x_train)
  m = _validation.leading_size("x_test", x_test)
  _validation.check_same_features("x_train", x_train, "x_test", x_test)
  eta = None if learning_rate is None else kernel_learning_rate(
      learning_rate, num_train=n, batch_size=batch_size, momentum=momentum, reduction=reduction)
  if isinstance(params0, (str, os.PathLike)):
    from ntk_diag.checkpoint import load_initial_params
    params0 = load_initial_params(os.fspath(params0), like=params)
  _check_same_tree("params0", params0, "params", params)
  if twin_params is not None:
    _check_same_tree("twin_params", twin_params, "params", params)
  fn = _model.bind_model_state(apply_fn, model_state)
  fn0 = _model.bind_model_state(apply_fn, model_state if model_state0 is None else model_state0)
  out_shape = _model.example_output_shape(fn, params, x_test)
  losses.check_targets("y_train", y_train, loss, (n,) + out_shape)
  losses.check_targets("y_test", y_test, loss, (m,) + out_shape)
  y_test_prepared = losses.prepare_targets(loss, y_test, (m,) + out_shape)

  outputs = {NETWORK: jax.jit(fn)(params, x_test)}
  f0_test = jax.jit(fn0)(params0, x_test)
  if twin_params is not None:
    outputs[TWIN] = jax.jit(linearize(fn0, params0))(twin_params, x_test)
  if eta is not None or (loss == "mse" and interpolator_ridge is not None):
    k_train = ntk.empirical_ntk(fn0, params0, x_train, batch_size=ntk_batch_size)
    k_test = ntk.empirical_ntk(fn0, params0, x_test, x_train, batch_size=ntk_batch_size)
    f0_train = jax.jit(fn0)(params0, x_train)
    targets = y_train if not isinstance(loss, str) or loss != "mse" else jnp.reshape(
        jnp.asarray(y_train), (n,) + out_shape)
    if eta is not None:
      predict = kernel_predictor(k_train, targets, learning_rate=eta, loss=loss)
      name = f"kernel predictor (t = {_number(steps)})"
      outputs[name] = predict(steps, f0_train, f0_test, k_test).reshape(f0_test.shape)
    if loss == "mse" and interpolator_ridge is not None:
      ridge = interpolator_ridge * _largest_eigenvalue(k_train)
      interpolate = kernel_predictor(k_train, targets, ridge=ridge)
      outputs[INTERPOLATOR] = interpolate(None, f0_train, f0_test, k_test).reshape(f0_test.shape)

  labels = _class_labels(loss, y_test, (m,) + out_shape)
  host = {name: np.asarray(value, np.float64) for name, value in outputs.items()}
  rows = tuple(_row(name, value, host[NETWORK], np.asarray(f0_test, np.float64),
                    float(losses.mean(loss, outputs[name], y_test_prepared)), labels)
               for name, value in host.items())
  return Comparison(rows=rows, loss=_loss_name(loss), time=None if steps is None else float(steps),
                    kernel_learning_rate=eta, num_train=n, num_test=m, test_outputs=host)


def _row(name: str, f: np.ndarray, net: np.ndarray, f0: np.ndarray, test_loss: float,
         labels: np.ndarray | None) -> PredictorRow:
  is_net = name == NETWORK
  accuracy = agreement = None
  if labels is not None:
    accuracy = float(np.mean(np.argmax(f, -1) == labels))
    if not is_net:
      agreement = float(np.mean(np.argmax(f, -1) == np.argmax(net, -1)))
  distance = None
  if not is_net:
    moved = np.linalg.norm(net - f0)
    distance = float(np.linalg.norm(f - net) / moved) if moved > 0 else 0.0
  return PredictorRow(name=name, test_loss=test_loss, accuracy=accuracy, agreement=agreement,
                      distance=distance)


def _class_labels(loss: Any, y: Any, output_shape: tuple[int, ...]) -> np.ndarray | None:
  """Integer labels of shape ``output_shape[:-1]``, or None when ``y`` is not classes.

  Classes: integer labels; or targets of the outputs' shape with ``k >= 2``
  classes on the last axis that are one-hot (each row one 1, zeros
  elsewhere) — or, for cross-entropy, any probabilities (argmax).
  """
  y = np.asarray(y)
  if len(output_shape) < 2 or output_shape[-1] < 2:
    return None
  if np.issubdtype(y.dtype, np.integer) and y.shape == tuple(output_shape[:-1]):
    return y
  if y.shape != tuple(output_shape):
    return None
  one_hot = np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1)
  return np.argmax(y, -1) if one_hot or loss == "softmax_cross_entropy" else None


def _largest_eigenvalue(kernel: jax.Array) -> float:
  """``λ_max`` of the kernel as an ``(N, N)`` matrix (power iteration, dense matvecs)."""
  matrix = _layout.kernel_to_matrix(kernel)
  start = jnp.ones((matrix.shape[0],), matrix.dtype)
  return float(spectral.power_iteration(matrix, start, num_iters=200, tol=1e-4).value)


def _check_same_tree(name: str, tree: PyTree, ref_name: str, ref: PyTree) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(ref):
    raise ValueError(
        f"`{name}` must have the pytree structure of `{ref_name}`: expected"
        f" {jax.tree.structure(ref)}, got {jax.tree.structure(tree)}.")
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f"`{name}` leaves must have the shapes of `{ref_name}`: {np.shape(a)} vs {np.shape(b)}.")


def _cells(row: PredictorRow) -> tuple[str, ...]:
  fmt = lambda v: _MISSING if v is None else f"{v:.4f}"
  return (row.name, f"{row.test_loss:.4g}", fmt(row.accuracy), fmt(row.agreement),
          fmt(row.distance))


def _number(value: float) -> str:
  return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _loss_name(loss: Any) -> str:
  return loss if isinstance(loss, str) else getattr(loss, "__name__", "callable")

