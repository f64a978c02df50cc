"""Writes ``infinite_reference.npz``: neural-tangents 0.6.5 infinite-width kernels.

Run in the peer venv (jax 0.4.25 + neural-tangents 0.6.5, which do not import
on the main stack)::

    make .venv-peer/.installed                      # from the repository root
    .venv-peer/bin/python tests/data/make_infinite_reference.py

Every case is a list of layers, ``[name, kwargs]`` in the vocabulary of
``ntk_diag.infinite`` (stored as JSON in the file, so the test builds the same
network from the same text). Each is mapped to its ``neural_tangents.stax``
layer in the NTK parametrization:

* ``Dense`` -> ``stax.Dense(512, W_std, b_std, parameterization="ntk")``;
* ``Conv`` -> ``stax.Conv(64, filter_shape, padding=..., W_std, b_std,
  parameterization="ntk")`` (NHWC, stride 1);
* ``Relu``/``Erf`` -> ``stax.Relu()``/``stax.Erf()`` (closed forms);
* ``Tanh`` -> ``stax.ElementwiseNumerical(jnp.tanh, deg=TANH_DEG, df=1 - tanh²)``
  (NT has no closed form; Gauss–Hermite quadrature with ``TANH_DEG`` points);
* ``GlobalAvgPool``/``Flatten`` -> ``stax.GlobalAvgPool()``/``stax.Flatten()``.

The kernels are computed in float64 (``jax_enable_x64``) on seeded standard
normal inputs: ``x1`` (8 vectors of dimension 6, or 5 images 6×6×3) and
``x2`` (5 vectors, or 3 images). Stored per case: ``x1``, ``x2``, ``nngp`` and
``ntk`` of ``(x1, x1)`` and ``nngp_12``, ``ntk_12`` of ``(x1, x2)``. For Tanh
networks ``tanh_quadrature_change`` is the largest relative change of any entry
when the quadrature goes from ``TANH_DEG`` to ``TANH_DEG + 100`` points (how
converged the reference itself is).
"""

from __future__ import annotations

import json
import os
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402

TANH_DEG = 200
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "infinite_reference.npz")


def _mlp(act, depth, w_std, b_std):
  layers = []
  for _ in range(depth):
    layers += [["Dense", {"W_std": w_std, "b_std": b_std}], [act, {}]]
  return layers + [["Dense", {"W_std": 1.0, "b_std": 0.1}]]


# name -> (layers, input kind). Depth = number of hidden layers.
CASES = {}
for _act in ("Relu", "Erf", "Tanh"):
  CASES[f"mlp_{_act.lower()}_depth1"] = (_mlp(_act, 1, 1.0, 0.0), "vectors")
  CASES[f"mlp_{_act.lower()}_depth2"] = (_mlp(_act, 2, 1.5, 0.2), "vectors")
  CASES[f"mlp_{_act.lower()}_depth3"] = (_mlp(_act, 3, 1.2, 0.5), "vectors")
CASES["conv_same_relu_gap_dense"] = ([
    ["Conv", {"filter_shape": [3, 3], "padding": "SAME", "W_std": 1.5, "b_std": 0.1}],
    ["Relu", {}],
    ["GlobalAvgPool", {}],
    ["Dense", {"W_std": 1.0, "b_std": 0.0}],
], "images")
CASES["conv_valid_same_gap"] = ([
    ["Conv", {"filter_shape": [3, 2], "padding": "VALID", "W_std": 1.3, "b_std": 0.2}],
    ["Erf", {}],
    ["Conv", {"filter_shape": [2, 2], "padding": "SAME", "W_std": 1.4, "b_std": 0.0}],
    ["Relu", {}],
    ["Dense", {"W_std": 1.1, "b_std": 0.3}],
    ["Relu", {}],
    ["GlobalAvgPool", {}],
    ["Dense", {"W_std": 1.0, "b_std": 0.1}],
], "images")
CASES["conv_flatten"] = ([
    ["Conv", {"filter_shape": [3, 3], "padding": "SAME", "W_std": 1.5, "b_std": 0.1}],
    ["Relu", {}],
    ["Conv", {"filter_shape": [2, 3], "padding": "VALID", "W_std": 1.2, "b_std": 0.3}],
    ["Relu", {}],
    ["Flatten", {}],
    ["Dense", {"W_std": 1.0, "b_std": 0.0}],
], "images")
CASES["flatten_mlp"] = ([
    ["Flatten", {}],
    ["Dense", {"W_std": 1.4, "b_std": 0.2}],
    ["Relu", {}],
    ["Dense", {"W_std": 1.0, "b_std": 0.0}],
], "images")


def stax_layer(name, kwargs, tanh_deg):
  if name == "Dense":
    return stax.Dense(512, W_std=kwargs["W_std"], b_std=kwargs["b_std"], parameterization="ntk")
  if name == "Conv":
    return stax.Conv(64, tuple(kwargs["filter_shape"]), padding=kwargs["padding"],
                     W_std=kwargs["W_std"], b_std=kwargs["b_std"], parameterization="ntk")
  if name == "Relu":
    return stax.Relu()
  if name == "Erf":
    return stax.Erf()
  if name == "Tanh":
    return stax.ElementwiseNumerical(jnp.tanh, deg=tanh_deg, df=lambda x: 1 - jnp.tanh(x) ** 2)
  if name == "GlobalAvgPool":
    return stax.GlobalAvgPool()
  if name == "Flatten":
    return stax.Flatten()
  raise ValueError(name)


def inputs(kind, seed):
  rng = np.random.default_rng(seed)
  if kind == "vectors":
    return rng.standard_normal((8, 6)), rng.standard_normal((5, 6))
  return rng.standard_normal((5, 6, 6, 3)), rng.standard_normal((3, 6, 6, 3))


def kernels(layers, x1, x2, tanh_deg):
  _, _, kernel_fn = stax.serial(*[stax_layer(n, kw, tanh_deg) for n, kw in layers])
  kernel_fn = jax.jit(kernel_fn, static_argnames="get")
  k11 = kernel_fn(x1, None, get=("nngp", "ntk"))
  k12 = kernel_fn(x1, x2, get=("nngp", "ntk"))
  return {"nngp": k11.nngp, "ntk": k11.ntk, "nngp_12": k12.nngp, "ntk_12": k12.ntk}


def main():
  warnings.filterwarnings("ignore", message="Numerical Activation Layer")
  arrays = {}
  specs = {}
  for seed, (name, (layers, kind)) in enumerate(CASES.items()):
    x1, x2 = inputs(kind, seed)
    out = {k: np.asarray(v, np.float64) for k, v in kernels(layers, x1, x2, TANH_DEG).items()}
    arrays.update({f"{name}/x1": x1, f"{name}/x2": x2})
    arrays.update({f"{name}/{k}": v for k, v in out.items()})
    line = f"{name}: nngp {out['nngp'].shape}, ntk {out['ntk'].shape}"
    if any(n == "Tanh" for n, _ in layers):
      finer = kernels(layers, x1, x2, TANH_DEG + 100)
      change = max(float(np.max(np.abs(np.asarray(finer[k]) / out[k] - 1))) for k in out)
      arrays[f"{name}/tanh_quadrature_change"] = np.asarray(change)
      line += f", tanh quadrature change {change:.1e}"
    specs[name] = layers
    print(line, flush=True)
  arrays["specs"] = np.asarray(json.dumps(specs))
  arrays["versions"] = np.asarray(json.dumps({
      "neural_tangents": getattr(nt, "__version__", "0.6.5"), "jax": jax.__version__,
      "numpy": np.__version__, "tanh_deg": TANH_DEG, "x64": True}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
