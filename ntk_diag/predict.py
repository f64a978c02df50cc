"""Placeholder until issue 4 lands."""

def kernel_predictor(*args, **kwargs):
  raise NotImplementedError
