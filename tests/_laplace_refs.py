"""Shared fixtures for the Laplace tests: Bayesian linear regression and a small MLP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import mlmap as mm

SIGMA, PRIOR_SIGMA = 0.4, 1.5


def linear(w, x):
  return x @ w


def blr_nlp(sigma=SIGMA, prior_sigma=PRIOR_SIGMA, num_data=None):
  return mm.negative_log_posterior(
      linear, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=prior_sigma), num_data=num_data)


def blr_data():
  """Bayesian linear regression with its exact MAP and posterior (closed forms)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 5))
  y = x @ rng.normal(size=5) + SIGMA * rng.normal(size=40)
  precision = x.T @ x / SIGMA**2 + np.eye(5) / PRIOR_SIGMA**2
  w = np.linalg.solve(precision, x.T @ y / SIGMA**2)
  return x, y, w, precision


def mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return h @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(key, d_in, hidden, d_out):
  k1, k2 = jax.random.split(key)
  return {"l1": {"w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
                 "b": jnp.zeros(hidden)},
          "l2": {"w": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
                 "b": jnp.zeros(d_out)}}


def fit(nlp, params, x, t, steps=80):
  tx = mm.newton(nlp)

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(nlp)(p, x, t), s, p, batch=(x, t))
      return (jax.tree_util.tree_map(jnp.add, p, u), s), None
    return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[0][0]
  return run(params)


def ill_conditioned_regression():
  """The matrix-free reproduction of issue 10 (cond(A) = 1.3e4): ``(nlp, w, X, t)``."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(200, 40)) * np.logspace(0, 2, 40))
  t = x @ jnp.asarray(rng.normal(size=40)) * 0.01 + 0.1 * jnp.asarray(rng.normal(size=200))
  nlp = mm.negative_log_posterior(
      linear, functools.partial(mm.gaussian_log_likelihood, sigma=0.1),
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  w = jnp.linalg.solve(x.T @ x / 0.01 + jnp.eye(40), x.T @ t / 0.01)
  return nlp, w, x, t


def custom_prior_ignoring_b(p):
  """A proper-looking custom prior that silently leaves ``p['b']`` unpenalized."""
  return mm.gaussian_log_prior(p["w"], sigma=1.0)


def dict_linear(p, x):
  return x @ p["w"] + p["b"]
