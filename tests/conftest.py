"""Shared test setup: float32 everywhere (x64 stays off), small fixed seeds."""

import os
import sys

import jax
import pytest

# Make `tests/reference.py` importable as `reference` whatever the rootdir.
sys.path.insert(0, os.path.dirname(__file__))

jax.config.update("jax_enable_x64", False)


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)
