"""Small models the tests share (one definition each)."""

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class MLP(nn.Module):
  """``Dense → tanh`` for each width in ``hidden``, then ``Dense(out)``.

  With ``squeeze`` a single output is returned as shape ``(n,)``.
  """
  hidden: tuple = (16,)
  out: int = 3
  use_bias: bool = True
  squeeze: bool = False

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = jnp.tanh(nn.Dense(width, use_bias=self.use_bias)(x))
    x = nn.Dense(self.out, use_bias=self.use_bias)(x)
    return x[:, 0] if self.squeeze else x


class NNXMLP(nnx.Module):
  """``Linear → tanh → Linear`` in flax.nnx."""

  def __init__(self, din, width, dout, *, rngs):
    self.l1 = nnx.Linear(din, width, rngs=rngs)
    self.l2 = nnx.Linear(width, dout, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.tanh(self.l1(x)))
