"""A one-word verdict per run from the hook's logged scalars.

Thresholds (relative errors, so unitless) on the values of the last snapshot:

* ``twin_gap = ‖f(θ) − f_lin(θ)‖ / ‖f(θ) − f(θ0)‖``: the share of the change in
  the outputs that the linearization at ``θ0`` does not explain;
* ``kernel_drift = ‖K − K0‖_F / ‖K0‖_F``: how far the NTK moved;
* ``lazy_radius_ratio = ‖θ − θ0‖ / B``: below 1 the lecture's proof guarantees
  lazy training (absent in runs logged before it existed).

The verdict is **lazy** when the larger of twin gap and kernel drift is at
most :data:`LAZY_MAX` (the network is its linearization up to 10 %),
**feature learning** when it exceeds :data:`FEATURE_LEARNING_MIN` (the
kernel or the function moved by more than half, the kernel description has
failed) and **drifting** in between. The radius ratio cannot overrule the
measured ones (it is a sufficient condition only); it says whether the proof
covers the run. With neither twin gap nor kernel drift logged, a ratio below
1 still gives **lazy**; otherwise the verdict is **undetermined**.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

LAZY_MAX = 0.1
FEATURE_LEARNING_MIN = 0.5
LABELS = ("lazy", "drifting", "feature learning", "undetermined")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """``label`` (one of :data:`LABELS`) and the ``sentence`` that explains it."""
  label: str
  sentence: str


def run_verdict(last: Mapping[str, float]) -> Verdict:
  """Verdict from the last logged value of each scalar (``{name: value}``,
  names without the ``ntk_diag/`` prefix); non-finite values count as missing."""
  value = lambda name: last.get(name) if last.get(name) is not None and math.isfinite(
      last[name]) else None
  gap, drift, ratio = value("twin_gap"), value("kernel_drift"), value("lazy_radius_ratio")
  measured = {name: v for name, v in (("twin_gap", gap), ("kernel_drift", drift)) if v is not None}
  proof = _proof_clause(ratio)
  if not measured:
    if ratio is not None and ratio < 1:
      return Verdict("lazy", f"lazy by the lecture's proof alone: {proof}; no twin_gap or"
                             " kernel_drift was logged to confirm it.")
    return Verdict("undetermined", "undetermined: neither twin_gap nor kernel_drift was logged"
                   + (f", and {proof}." if ratio is not None else "."))
  worst = max(measured.values())
  values = " and ".join(f"{name} = {v:.3g}" for name, v in measured.items())
  if worst <= LAZY_MAX:
    label, why = "lazy", f"{values}, all ≤ {LAZY_MAX}: the network stayed its linearization"
  elif worst > FEATURE_LEARNING_MIN:
    label, why = "feature learning", (
        f"{values}, above {FEATURE_LEARNING_MIN}: the network left its linearization at θ0")
  else:
    label, why = "drifting", (
        f"{values}, between {LAZY_MAX} and {FEATURE_LEARNING_MIN}: the kernel description"
        " is fading")
  return Verdict(label, f"{label}: {why}" + (f"; {proof}." if proof else "."))


def _proof_clause(ratio: float | None) -> str:
  if ratio is None:
    return ""
  if ratio < 1:
    return f"lazy_radius_ratio = {ratio:.3g} < 1, inside the lecture's radius B where lazy training is proved"
  return (f"lazy_radius_ratio = {ratio:.3g} ≥ 1, beyond the lecture's radius B, where its proof"
          " no longer applies")
