"""Power iteration vs Lanczos: relative error vs matvec count against dense references.

    python benchmarks/norms_accuracy.py [--quick]

Small tanh MLPs, so that the dense references fit: ``svd`` of each per-example
Jacobian and of the stacked Jacobian, ``eigvalsh`` of each per-output Hessian
(``jax.hessian`` on ravelled parameters). ``tol`` is set tiny so each solver
runs to its ``num_iters`` cap (Lanczos may stop earlier on an invariant
subspace); ``iterations`` is what :class:`ntk_diag.NormEstimate` reports
(matvecs; power iteration on a Hessian iterates on ``H²``, two HVPs each).

The per-example Jacobian norm is exact (``k × k`` Gram matrix) for
``k ≤ ntk_diag.norms.GRAM_MAX_OUTPUTS``; its row uses a model with more outputs
so that the iterative solvers are what is measured.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import ntk_diag as nd  # noqa: E402
from ntk_diag import norms as nd_norms  # noqa: E402


def _tanh_mlp(widths, n, seed):
  x, layers = _timing.mlp_arrays(widths=widths, n=n, seed=seed)
  params = _timing.flax_params(layers)

  def apply_fn(p, xs):
    h = xs
    for i in range(len(layers)):
      h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      if i < len(layers) - 1:
        h = jnp.tanh(h)
    return h

  return apply_fn, params, jnp.asarray(x)


def dense_references(apply_fn, params, x, hessian: bool):
  flat, unravel = ravel_pytree(params)
  f = lambda theta, xi: apply_fn(unravel(theta), xi[None])[0]
  jac = jax.vmap(jax.jacrev(f), in_axes=(None, 0))(flat, x)  # (n, k, P)
  per_example = np.max(np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False), axis=-1)
  stacked = np.linalg.svd(np.asarray(jac, np.float64).reshape(-1, flat.size), compute_uv=False)[0]
  refs = {"jacobian (per-example sup)": float(per_example.max()),
          "jacobian (stacked)": float(stacked)}
  if hessian:
    hess = jax.vmap(jax.hessian(f), in_axes=(None, 0))(flat, x)  # (n, k, P, P)
    eig = np.linalg.eigvalsh(np.asarray(hess, np.float64))
    refs["hessian"] = float(np.abs(eig).max())
  return refs


def run(quick: bool = False) -> list[dict]:
  iters = (4, 8, 16, 32) if quick else (2, 4, 8, 16, 32, 64, 128)
  key = jax.random.key(0)
  # Model A (k=3): stacked Jacobian and Hessian. Model B (k > GRAM_MAX_OUTPUTS): per-example.
  small = _tanh_mlp((6, 24, 24, 3), n=8, seed=1)
  k_wide = getattr(nd_norms, "GRAM_MAX_OUTPUTS", 64) + 8
  wide = _tanh_mlp((6, 24, 24, k_wide), n=4, seed=2)
  p_small = sum(a.size for a in jax.tree.leaves(small[1]))
  p_wide = sum(a.size for a in jax.tree.leaves(wide[1]))
  ref_small = dense_references(*small, hessian=True)
  ref_wide = dense_references(*wide, hessian=False)
  problems = [
      ("jacobian (per-example sup)", wide, ref_wide, f"6-24-24-{k_wide}, n=4, P={p_wide}",
       lambda m, it, fn, p, x: nd.jacobian_norm(fn, p, x, num_iters=it, tol=1e-9, method=m,
                                                key=key)),
      ("jacobian (stacked)", small, ref_small, f"6-24-24-3, n=8, P={p_small}",
       lambda m, it, fn, p, x: nd.jacobian_norm(fn, p, x, stacked=True, num_iters=it, tol=1e-9,
                                                method=m, key=key)),
      ("hessian", small, ref_small, f"6-24-24-3, n=8, P={p_small}",
       lambda m, it, fn, p, x: nd.hessian_norm(fn, p, x, num_iters=it, tol=1e-9, method=m,
                                               key=key)),
  ]
  print("\n## Norms: relative error |estimate − dense| / dense vs num_iters "
        "(iterations reported by the solver in parentheses)")
  rows = []
  for name, (fn, p, x), refs, desc, call in problems:
    print(f"\n### {name}: {desc}, dense reference {refs[name]:.6g}")
    print("| num_iters | " + " | ".join(["power", "lanczos"]) + " |")
    print("|---:|---:|---:|")
    for it in iters:
      cells = []
      for method in ("power", "lanczos"):
        est = call(method, it, fn, p, x)
        err = abs(float(est.value) - refs[name]) / refs[name]
        cells.append(f"{err:.1e} ({int(est.iterations)})")
        rows.append({"problem": name, "method": method, "num_iters": it,
                     "iterations": int(est.iterations), "rel_err": err})
      print(f"| {it} | " + " | ".join(cells) + " |")
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  jax.config.update("jax_enable_x64", False)
  run(quick=args.quick)


if __name__ == "__main__":
  main()
