"""Structured NTK: kernels from layer structure instead of per-example Jacobians.

For a Dense layer ``y = A W + b`` with inputs ``A`` (``n × c``) and output
cotangents ``G_a`` (``n × o``, the VJP of network output ``a`` w.r.t. ``y``), the
layer's contribution to the kernel is

``K_W[i, j, a, b] = (A_i · A_j) (G_{i,a} · G_{j,b})``,  ``K_b = G_{i,a} · G_{j,b}``,

so no per-example Jacobian is formed (Novak et al. 2022, "Fast Finite Width
Neural Tangent Kernel", structured derivatives). A layer applied over positions
``s`` (sequences, conv patches via ``lax.conv_general_dilated_patches``, weight
sharing across calls) sums over pairs of positions,
``K[i, j, a, b] = Σ_{s,t} (A_{i,s} · A_{j,t}) (G_{i,a,s} · G_{j,b,t})``, or — when
cheaper — forms the layer's Jacobian ``Σ_s A_{i,s} ⊗ G_{i,a,s}`` first.

The model is traced to a jaxpr; ``dot_general``/``conv_general_dilated``
equations with a parameter leaf (through reshapes/transposes/casts) as one
operand are recognised, and a bias added right after such an equation is folded
in as a column of ones. Every other parameter leaf (embeddings, norms, leaves
also used elsewhere) falls back to its per-example Jacobian, obtained in the
same backward passes, so the kernel is exact for any ``apply_fn``. The cotangents
come from ``k`` VJPs per example, vmapped over examples, so examples never mix.
If the analysis fails the whole kernel falls back to the Jacobian contraction.

Layers, each importing only the ones above it in this list:

* :mod:`~ntk_diag.structured.graph` — tracing: the inlined jaxpr as records;
* :mod:`~ntk_diag.structured.plan` — the plan: structured weights, folded
  biases, fallback leaves, and the canonical layer layouts;
* :mod:`~ntk_diag.structured.evaluate` — the graph run on one example, and
  the per-example layer inputs, cotangents and fallback Jacobians;
* :mod:`~ntk_diag.structured.kernel` — kernel assembly and batch sizing.

A plan is made by :func:`plan_or_none` for a model and an input shape; the
callers (:mod:`ntk_diag.ntk`, :mod:`ntk_diag.block_hessian`) make it once per
kernel function or per compiled core.
"""

from ntk_diag.structured.evaluate import model_by_patches
from ntk_diag.structured.kernel import choose_batch_size
from ntk_diag.structured.kernel import kernel_and_diagonal
from ntk_diag.structured.kernel import kernel_block_fn
from ntk_diag.structured.plan import Plan
from ntk_diag.structured.plan import applies
from ntk_diag.structured.plan import plan_or_none

__all__ = [
    "Plan",
    "applies",
    "choose_batch_size",
    "kernel_and_diagonal",
    "kernel_block_fn",
    "model_by_patches",
    "plan_or_none",
]
