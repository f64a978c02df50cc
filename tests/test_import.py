"""`import ntk_diag` and the pure-math API work with TensorFlow unavailable."""

import os
import subprocess
import sys
import textwrap

API_NAMES = (
    "from_linen", "from_nnx", "empirical_ntk", "kernel_stats", "jacobian_norm",
    "hessian_norm", "NormEstimate", "LazyReport", "lazy_ratio", "linearize",
    "kernel_predictor", "load_initial_params",
)

SCRIPT = textwrap.dedent("""
    import importlib.abc
    import sys

    class BlockTensorFlow(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          raise ImportError(f"blocked for this test: {name}")
        return None

    sys.meta_path.insert(0, BlockTensorFlow())

    import ntk_diag as nd
    assert "tensorflow" not in sys.modules, "import ntk_diag imported tensorflow"
    assert "ntk_diag.hooks" not in sys.modules, "the hook must be loaded lazily"
    for name in NAMES:
      assert name in vars(nd), f"ntk_diag does not export {name}"
      assert name in nd.__all__, f"{name} missing from ntk_diag.__all__"
    assert "LazyTrainingHook" in nd.__all__

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    module = nn.Dense(2)
    x = jnp.ones((3, 4), jnp.float32)
    apply_fn, params = nd.from_linen(module, module.init(jax.random.PRNGKey(0), x))
    kernel = nd.empirical_ntk(apply_fn, params, x)
    assert kernel.shape == (3, 3, 2, 2), kernel.shape
    stats = nd.kernel_stats(kernel, K0=kernel, y=jnp.ones((3, 2)))
    float(stats["trace"])
    assert "tensorflow" not in sys.modules, "empirical_ntk imported tensorflow"
    assert "ntk_diag.hooks" not in sys.modules
    print("OK")
""")


def test_import_without_tensorflow():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", f"NAMES = {API_NAMES!r}\n" + SCRIPT],
      capture_output=True, text=True, timeout=120, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith("OK")
