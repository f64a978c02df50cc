"""The linearized twin trained in lockstep with the network.

``f_lin(θ̃, x) = f(θ0, x) + J_x(θ0)(θ̃ − θ0)`` (eq. 1 of the NTK lecture notes) is trained by the
same optax transformation as the network, on the same batches, one jitted
step each. The lecture's proof strategy (Chizat et al. 2019) says that for wide
networks the two trajectories stay together: ``θ̃_t ≈ θ_t`` and
``f_lin(θ̃_t) ≈ f(θ_t)``. :func:`twin_distances` measures both; it is the
traceable core the hook calls with ``twin_params=``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ntk_diag import _model
from ntk_diag import _tree
from ntk_diag import _validation
from ntk_diag import losses
from ntk_diag.kernel_stats import safe_div
from ntk_diag.linearize import linearize

PyTree = Any


class TwinState(struct.PyTreeNode):
  """The twin's training state (checkpointable: no callables, no config).

  Attributes:
    step: number of :meth:`LinearizedTwin.step` calls (int32 scalar).
    params: the twin's parameters ``θ̃``, in the structure of ``params0``.
    opt_state: the optax state of ``tx`` for ``params``.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState


class LinearizedTwin:
  """The linearized network, trained in lockstep with the network.

  ``apply(θ̃, x) = f(θ0, x) + J_x(θ0)(θ̃ − θ0)``, one Jacobian-vector product
  (:func:`ntk_diag.linearize`). :meth:`step` applies one update of ``tx`` to
  ``θ̃`` with the gradient of the batch's MEAN loss
  ``(1/B) Σ_i ℓ(f_lin(θ̃, x_i), y_i)`` (see :mod:`ntk_diag.losses`), the
  quantity an optax training step usually minimises. Call it with the same
  batches, in the same order, as the network's step; with the same ``tx``
  (SGD, momentum, Adam, schedules...) the twin is what the network would do
  if it were exactly linear in its parameters.

  Usage::

    twin = nd.LinearizedTwin(apply_fn, params0, tx, loss="softmax_cross_entropy")
    twin_state = twin.init()
    for step, (x, y) in enumerate(batches):
      hook(step, params=state.params, twin_params=twin_state.params)
      state = train_step(state, x, y)
      twin_state = twin.step(twin_state, x, y)

  Args:
    apply_fn: ``apply_fn(params, x) -> (n, *out)``; with ``model_state``,
      ``apply_fn(params, x, model_state)``.
    params0: ``θ0``, the network's parameters at the start of training.
    tx: an ``optax.GradientTransformation``, the network's optimiser.
    loss: ``"mse"``, ``"softmax_cross_entropy"`` or a callable per-example
      loss (see :mod:`ntk_diag.losses`); the mean over the batch is minimised.
    model_state: non-trainable variables (e.g. ``{"batch_stats": ...}``) held
      fixed at their value at ``θ0``: the twin linearises
      ``θ ↦ apply_fn(θ, x, model_state)``.
  """

  def __init__(self, apply_fn: Callable, params0: PyTree, tx: optax.GradientTransformation, *,
               loss: losses.LossLike = "mse", model_state: Any = None):
    _validation.check_callable("apply_fn", apply_fn)
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
      raise TypeError(
          f"`tx` must be an optax.GradientTransformation (with init and update); got"
          f" {type(tx).__name__}.")
    losses.check_loss("loss", loss)
    self.loss = loss
    self.tx = tx
    self._fn = _model.bind_model_state(apply_fn, model_state)
    self._apply = linearize(self._fn, params0)  # validates params0
    self.params0 = jax.tree.map(jnp.asarray, params0)
    self._output_shapes: dict[Any, tuple[int, ...]] = {}
    self._jit_step = jax.jit(self._step)
    self._jit_apply = jax.jit(self._apply)

  def init(self) -> TwinState:
    """``θ̃ = θ0`` and ``tx.init(θ0)``."""
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), self.params0)
    return TwinState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=self.tx.init(params))

  def apply(self, params: PyTree, x: PyTree) -> jax.Array:
    """``f_lin(params, x) = f(θ0, x) + J_x(θ0)(params − θ0)``, jitted."""
    return self._jit_apply(params, x)

  def step(self, state: TwinState, x: PyTree, y: Any) -> TwinState:
    """One update of ``tx`` on the batch ``(x, y)``'s mean loss; jitted.

    ``y`` is checked against the outputs (shape, integer labels for
    cross-entropy) in Python before the jitted update.
    """
    if not isinstance(state, TwinState):
      raise TypeError(f"`state` must be a TwinState from twin.init(); got {type(state).__name__}.")
    n = _validation.leading_size("x", x)
    out_shape = self._output_shape(x)
    losses.check_targets("y", y, self.loss, (n,) + out_shape)
    return self._jit_step(self.params0, state, x, y)

  def _output_shape(self, x: PyTree) -> tuple[int, ...]:
    """Per-example output shape, traced once per input signature."""
    signature = jax.tree.structure(x), jax.tree.leaves(_validation.example_signature(x))
    key = repr(signature)
    if key not in self._output_shapes:
      self._output_shapes[key] = _model.example_output_shape(self._fn, self.params0, x)
    return self._output_shapes[key]

  def _step(self, params0: PyTree, state: TwinState, x: PyTree, y: Any) -> TwinState:
    # θ0 is an argument, not a closed-over constant: a large model's θ0 is
    # then not baked into the compiled program.
    apply_lin = linearize(self._fn, params0)

    def objective(params):
      outputs = apply_lin(params, x)
      return losses.mean(self.loss, outputs, losses.prepare_targets(self.loss, y, outputs.shape))

    grads = jax.grad(objective)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)


def twin_distances(apply_fn: Callable, params0: PyTree, params: PyTree, twin_params: PyTree,
                   x: PyTree, *, outputs: jax.Array | None = None,
                   outputs0: jax.Array | None = None) -> dict[str, jax.Array]:
  """How far the network's and the twin's trajectories are apart; traceable.

  * ``twin_distance = ‖f(θ, X) − f_lin(θ̃, X)‖ / ‖f(θ, X) − f(θ0, X)‖``: the
    outputs' gap relative to how far the network's outputs moved;
  * ``twin_param_distance = ‖θ − θ̃‖ / ‖θ − θ0‖``: the same for parameters.

  Each is 0 where its denominator is 0 (e.g. at the first step). No
  validation (the hook's core); ``outputs = f(θ, X)`` and
  ``outputs0 = f(θ0, X)`` may be passed when already computed.

  Args:
    apply_fn: ``apply_fn(params, x)`` (bind a model state first).
    params0: ``θ0``.
    params: the network's parameters ``θ``.
    twin_params: the twin's parameters ``θ̃`` (:attr:`TwinState.params`).
    x: the probe batch ``X``.

  Returns:
    ``{"twin_distance": ..., "twin_param_distance": ...}``, float scalars.
  """
  if outputs is None:
    outputs = apply_fn(params, x)
  if outputs0 is None:
    outputs0 = apply_fn(params0, x)
  twin_outputs = linearize(apply_fn, params0)(twin_params, x)
  flat = lambda a: jnp.reshape(a, (-1,))
  moved = jnp.linalg.norm(flat(outputs - outputs0))
  return {
      "twin_distance": safe_div(jnp.linalg.norm(flat(outputs - twin_outputs)), moved),
      "twin_param_distance": safe_div(_tree.tree_norm(_tree.tree_sub(params, twin_params)),
                                      _tree.tree_norm(_tree.tree_sub(params, params0))),
  }
