"""Placeholder until issue 4 lands."""

def linearize(*args, **kwargs):
  raise NotImplementedError
