"""Operator norms and the lazy-training ratio (placeholder until issue 3 lands)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class NormEstimate:
  value: object
  per_example: object
  iterations: object
  converged: object


@dataclasses.dataclass(frozen=True)
class LazyReport:
  kappa: object
  jacobian_norm: object
  hessian_norm: object
  residual_norm: object


def jacobian_norm(*args, **kwargs):
  raise NotImplementedError


def hessian_norm(*args, **kwargs):
  raise NotImplementedError


def lazy_ratio(*args, **kwargs):
  raise NotImplementedError
