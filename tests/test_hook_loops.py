"""The hook on training loops shaped like Flax's examples.

* a Linen CNN with BatchNorm, a ``TrainState`` carrying ``batch_stats``,
  ``state.step`` (a jax array) as the step, softmax cross-entropy on integer
  labels, SGD + momentum on minibatches (Flax's imagenet example);
* an NNX model with BatchNorm and Dropout held in train mode, trained with
  ``nnx.Optimizer`` (Flax's NNX examples);
* a Linen model whose ``__call__`` takes keyword-only ``inputs`` (nlp_seq).

Each measured function is checked against the model evaluated directly in
eval mode with this step's statistics.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import ntk_diag as nd
from events import read_scalars
from reference import dense_jacobian
from reference import loss_gradient


class ConvBN(nn.Module):
  """A small ResNet-style block: conv, BatchNorm, residual, pooled dense head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.5)
    h = nn.relu(norm()(nn.Conv(4, (3, 3))(x)))
    h = h + nn.relu(norm()(nn.Conv(4, (3, 3))(h)))
    return nn.Dense(3)(jnp.mean(h, axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: Any


def test_linen_batchnorm_trainstate_cross_entropy(tmp_path):
  model = ConvBN()
  data = jax.random.normal(jax.random.key(0), (32, 6, 6, 2))
  labels = jnp.arange(32) % 3
  variables = model.init(jax.random.key(1), data[:1], train=False)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            batch_stats=variables["batch_stats"], tx=optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                       train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])

  apply_fn, _ = nd.from_linen(model, variables, train=False)
  probe_x, probe_y = data[:8], labels[:8]
  hook = nd.LazyTrainingHook(apply_fn, probe_x, probe_y, workdir=str(tmp_path), every_steps=3,
                             loss="softmax_cross_entropy", norm_examples=4, log_images=False,
                             compute_norms=False)  # the norms are tested in test_hook.py
  seen = {}
  for i in range(7):
    batch = slice(8 * (i % 4), 8 * (i % 4) + 8)
    if hook(state.step, params=state.params, model_state={"batch_stats": state.batch_stats}):
      seen[int(state.step)] = jax.device_get((state.params, state.batch_stats))
    state = train_step(state, data[batch], labels[batch])
  assert sorted(seen) == [0, 3, 6]
  logged = read_scalars(tmp_path)
  onehot = np.eye(3)[np.asarray(probe_y)]
  for step, (params, stats) in seen.items():
    # The eval-mode model with this step's batch statistics, applied directly.
    direct = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=False)
    logits = np.asarray(direct(params, probe_x), np.float64)
    residual = np.linalg.norm(loss_gradient("softmax_cross_entropy", logits[:4], onehot[:4]))
    assert logged["ntk_diag/residual_norm"][step] == pytest.approx(residual, rel=1e-5)
    jac = dense_jacobian(direct, params, probe_x)
    trace = np.einsum("iap,iap->", jac, jac)
    assert logged["ntk_diag/ntk_trace"][step] == pytest.approx(trace, rel=1e-5)
  # With the initial statistics the function differs: the hook did not measure that one.
  stale = lambda p, x: model.apply({"params": p, **{"batch_stats": variables["batch_stats"]}},
                                   x, train=False)
  stale_logits = np.asarray(stale(seen[6][0], probe_x), np.float64)
  stale_residual = np.linalg.norm(loss_gradient("softmax_cross_entropy", stale_logits[:4], onehot[:4]))
  assert abs(stale_residual - logged["ntk_diag/residual_norm"][6]) > 1e-3
  # θ0's model state is checkpointed with θ0.
  saved = nd.load_initial_model_state(str(tmp_path), like={"batch_stats": variables["batch_stats"]})
  jax.tree.map(np.testing.assert_array_equal, saved["batch_stats"],
               jax.device_get(variables["batch_stats"]))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.norm(self.linear(x)))))


def test_nnx_batchnorm_dropout_in_train_mode(tmp_path):
  x = jax.random.normal(jax.random.key(0), (12, 5))
  y = jax.nn.one_hot(jnp.arange(12) % 3, 3)
  model = NNXNet(nnx.Rngs(0))
  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy(m(x), y).mean())(model)
    optimizer.update(model, grads)

  apply_fn, _ = nd.from_nnx(model)
  hook = nd.LazyTrainingHook(apply_fn, x, y, workdir=str(tmp_path), every_steps=2,
                             loss="softmax_cross_entropy", compute_norms=False, log_images=False)
  expected = {}
  for step in range(5):
    if hook(step, model=model):
      copy = nnx.merge(*nnx.split(model))
      copy.eval()
      expected[step] = np.asarray(copy(x), np.float64)
    train_step(model, optimizer)
  assert model.dropout.deterministic is False and model.norm.use_running_average is False
  logged = read_scalars(tmp_path)
  assert sorted(expected) == [0, 2, 4]
  for step, logits in expected.items():
    residual = np.linalg.norm(loss_gradient("softmax_cross_entropy", logits, y))
    assert logged["ntk_diag/residual_norm"][step] == pytest.approx(residual, rel=1e-5)
  assert logged["ntk_diag/weight_change"][4] > 0


class KeywordTagger(nn.Module):
  """Like Flax's nlp_seq Transformer: ``__call__(self, *, inputs, train)``."""

  @nn.compact
  def __call__(self, *, inputs, train):
    h = nn.Embed(11, 6)(inputs)
    h = nn.Dropout(0.3, deterministic=not train)(h)
    return nn.Dense(4)(nn.tanh(nn.Dense(8)(h)))


def test_keyword_only_inputs_through_from_linen(tmp_path):
  tokens = jax.random.randint(jax.random.key(0), (6, 5), 0, 11)
  tags = jax.random.randint(jax.random.key(1), (6, 5), 0, 4)
  model = KeywordTagger()
  variables = model.init(jax.random.key(2), inputs=tokens, train=False)
  apply_fn, params = nd.from_linen(model, variables, train=False)
  np.testing.assert_array_equal(apply_fn(params, tokens),
                                model.apply(variables, inputs=tokens, train=False))
  hook = nd.LazyTrainingHook(apply_fn, tokens, tags, workdir=str(tmp_path), every_steps=1,
                             loss="softmax_cross_entropy", compute_norms=False, log_images=False)
  assert hook(np.int64(0), params=params)
  logits = np.asarray(apply_fn(params, tokens), np.float64)
  residual = np.linalg.norm(loss_gradient("softmax_cross_entropy", logits, np.eye(4)[tags]))
  assert hook.last.scalars["residual_norm"] == pytest.approx(residual, rel=1e-5)
