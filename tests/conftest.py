"""Shared test set-up: float64 on, fixed PRNG keys."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


def _mackay_ridge(x, y):
  """sklearn's BayesianRidge fitted with no hyperpriors (lambda_1 = ... = 0): it then
  runs MacKay's updates on exactly the model y ~ N(X w, 1/alpha_), w ~ N(0,
  1/lambda_) (no intercept), to convergence."""
  from sklearn.linear_model import BayesianRidge
  return BayesianRidge(fit_intercept=False, tol=1e-15, max_iter=100000, alpha_1=0.0,
                       alpha_2=0.0, lambda_1=0.0, lambda_2=0.0).fit(x, y)


@pytest.fixture(scope="session")
def mackay_ridge():
  """``mackay_ridge(x, y)``: the BayesianRidge reference on other data."""
  return _mackay_ridge


@pytest.fixture(scope="session")
def diabetes():
  """sklearn's diabetes data standardized (442 x 10, jnp) and BayesianRidge on it
  (``_mackay_ridge``)."""
  from sklearn.datasets import load_diabetes
  x, y = load_diabetes(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  y = (y - y.mean()) / y.std()
  return jnp.asarray(x), jnp.asarray(y), _mackay_ridge(x, y)
