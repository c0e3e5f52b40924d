"""Shared test set-up: float64 on, fixed PRNG keys."""

import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)
