"""Placeholder until issue 5 lands."""

def load_initial_params(*args, **kwargs):
  raise NotImplementedError
