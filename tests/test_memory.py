"""Blocking bounds memory: peak temporary bytes grow with `batch_size`, not with `n`.

The docs promise that ``batch_size`` bounds the peak memory of
``empirical_ntk`` (blocks of examples) and of the norm estimators (batches
of eigenproblems). Blocking leaves every value unchanged, so only memory can
show it. XLA's own accounting of a compiled function is read here:
``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``, the
bytes of every buffer that is neither an argument nor the output. Functions
are compiled, never run (~0.3 s each).

The model is a Dense layer over ``L`` positions, mean-pooled, then a Dense
head: per example its activations (``L·W`` = 8192 values, plus ``k``
cotangents of each) and its Jacobian (``k·P`` = 9732 values) are large next to
the kernel itself (at most ``32² · k²`` = 4096 values), so the memory of one
tile is what the measurement sees, for every method.

Measured (2026-11-29, jax 0.10.2, CPU), temporary bytes for ``n`` examples in
blocks of ``b``:

=============  ==========  ===========  ===========  =================
method         n=8, b=2    n=32, b=2    n=32, b=8    n=32, b=32 (one)
=============  ==========  ===========  ===========  =================
jacobian       450 KB      508 KB       1.79 MB      4.55 MB
ntk_vp         426 KB      487 KB       1.69 MB      6.34 MB
structured     369 KB      430 KB       1.48 MB      4.39 MB
jacobian_norm  216 KB      216 KB       855 KB       4.33 MB
hessian_norm   557 KB      558 KB       2.17 MB      8.71 MB
=============  ==========  ===========  ===========  =================

So 4x the examples at a fixed ``b`` costs <= 1.17x (the growth is the kernel
collected from the tiles), and 4x the block size >= 3.4x. The tests allow
1.5x and require 2.5x: computing every tile (or eigenproblem) at once gives
10-20x the temporary memory, and ignoring ``batch_size`` 1x.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_diag as nd
from ntk_diag import norms
from ntk_diag import ntk

L, D, W, K = 32, 16, 256, 2
# 4x the examples at a fixed block size: at most this factor (measured <= 1.17).
FLAT = 1.5
# 4x the block size at a fixed number of examples: at least this factor (measured >= 3.4).
GROWS = 2.5


def apply_fn(params, x):  # x: (n, L, D) -> (n, K)
  h = jnp.tanh(x @ params["w1"] + params["b1"]).mean(axis=1)
  return h @ params["w2"] + params["b2"]


def _params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {"w1": normal(D, W), "b1": jnp.zeros(W), "w2": normal(W, K), "b2": jnp.zeros(K)}


PARAMS = _params()
NUM_PARAMS = D * W + W + W * K + K  # 4866


def _probe(n):
  return jax.ShapeDtypeStruct((n, L, D), jnp.float32)


def _temp_bytes(lowered) -> int:
  return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def ntk_temp(method, n, batch_size):
  """Temporary bytes of the compiled kernel that `empirical_ntk` runs."""
  return _temp_bytes(ntk._ntk_jit.lower(apply_fn, PARAMS, _probe(n), None, trace_outputs=False,
                                        method=method, batch_size=batch_size))


def norm_temp(core, n, batch_size, **options):
  """Temporary bytes of the compiled `jacobian_norm` / `hessian_norm` core."""
  return _temp_bytes(core.lower(apply_fn, PARAMS, _probe(n), key=None, init=None,
                                options=norms.SolverOptions(
                                    num_iters=10, tol=1e-4, method="power", return_vector=False,
                                    batch_size=batch_size, **options)))


def check_bounded(temp):
  """``temp(n, batch_size)``: flat in n, growing with batch_size."""
  small = temp(8, 2)
  more_examples = temp(32, 2)
  bigger_blocks = temp(32, 8)
  assert more_examples <= FLAT * small, (small, more_examples)
  assert bigger_blocks >= GROWS * more_examples, (more_examples, bigger_blocks)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured"])
def test_ntk_peak_memory_grows_with_batch_size_not_examples(method):
  check_bounded(lambda n, b: ntk_temp(method, n, b))


@pytest.mark.parametrize("core", [norms._jacobian_norm_jit, norms._hessian_norm_jit],
                         ids=["jacobian_norm", "hessian_norm"])
def test_norm_peak_memory_grows_with_batch_size_not_examples(core):
  options = {"stacked": False} if core is norms._jacobian_norm_jit else {}
  check_bounded(lambda n, b: norm_temp(core, n, b, **options))


class _Stop(Exception):
  """Raised by the spies below: the arguments are all the test needs."""


def _spy(seen, name):
  def record(*args, **kwargs):
    seen[name] = kwargs["options"].batch_size if "options" in kwargs else kwargs["batch_size"]
    raise _Stop
  return record


def test_public_functions_hand_batch_size_to_the_compiled_cores(monkeypatch):
  # The memory above is that of the cores; the public functions must pass
  # the user's `batch_size` through unchanged (and pick one from the budget).
  seen = {}
  monkeypatch.setattr(ntk, "_ntk_jit", _spy(seen, "ntk"))
  monkeypatch.setattr(norms, "_jacobian_norm_jit", _spy(seen, "jacobian_norm"))
  monkeypatch.setattr(norms, "_hessian_norm_jit", _spy(seen, "hessian_norm"))
  x = jnp.zeros((12, L, D), jnp.float32)
  for method in ("jacobian", "ntk_vp", "structured"):
    with pytest.raises(_Stop):
      nd.empirical_ntk(apply_fn, PARAMS, x, method=method, batch_size=3)
    assert seen.pop("ntk") == 3, method
  with pytest.raises(_Stop):
    nd.jacobian_norm(apply_fn, PARAMS, x, batch_size=5)
  with pytest.raises(_Stop):
    nd.hessian_norm(apply_fn, PARAMS, x, batch_size=4)
  assert seen == {"jacobian_norm": 5, "hessian_norm": 4}
  # batch_size=None with a budget: "jacobian" holds two blocks of per-example
  # Jacobians, 2·b·k·P float32 values (_memory.jacobian_batch_size's estimate).
  per_example = 2 * K * NUM_PARAMS * 4
  with pytest.raises(_Stop):
    nd.empirical_ntk(apply_fn, PARAMS, x, method="jacobian",
                     memory_budget_bytes=3 * per_example + per_example // 2)
  assert seen.pop("ntk") == 3
