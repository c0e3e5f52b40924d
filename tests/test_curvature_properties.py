"""Property tests: curvature products against dense forms on random small MLPs.

For each built-in likelihood, hypothesis draws the architecture (depth 1-2,
widths 1-4), the batch (1-5), the prior, ``num_data`` and the Gaussian sigma
(none, or bound with ``functools.partial``).
For each draw one jitted call computes the matrix-free products, the dense
forms and an independent reference (the GGN from explicit ``jax.jacfwd``
Jacobians and per-example output Hessians, the empirical Fisher from
per-example gradients), so one example costs one compilation. Two examples per
likelihood (hypothesis's first is the minimal one) keep the file near 20 s on a
loaded 2-core CPU; tests/test_curvature.py and tests/test_dense.py hold the
fixed, larger cases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

import mlmap as mm

KINDS = ("gaussian", "bernoulli", "categorical", "soft_categorical")
SETTINGS = settings(max_examples=2, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _mlp(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w + b
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def _likelihood(kind, sigma):
  """The built-in; the Gaussian bare (``sigma=None``) or with a bound ``sigma``."""
  return {
      "gaussian": (mm.gaussian_log_likelihood if sigma is None
                   else functools.partial(mm.gaussian_log_likelihood, sigma=sigma)),
      "bernoulli": mm.bernoulli_log_likelihood,
      "categorical": mm.categorical_log_likelihood,
      "soft_categorical": mm.soft_categorical_log_likelihood,
  }[kind]


def _targets(kind, key, batch, width):
  if kind == "gaussian":
    return jax.random.normal(key, (batch, width))
  if kind == "bernoulli":
    return jax.random.bernoulli(key, 0.4, (batch, width)).astype(jnp.float64)
  if kind == "categorical":
    return jax.random.randint(key, (batch,), 0, width)
  return jax.random.dirichlet(key, jnp.ones(width), (batch,))


@st.composite
def problems(draw, kind):
  depth = draw(st.integers(1, 2))
  widths = [draw(st.integers(1, 4)) for _ in range(depth + 1)]
  batch = draw(st.integers(1, 5))
  seed = draw(st.integers(0, 2**16))
  prior = draw(st.booleans())
  num_data = draw(st.sampled_from([None, batch, 3 * batch + 1]))
  sigma = draw(st.one_of(st.none(), st.floats(0.3, 3.0)))
  k = jax.random.split(jax.random.PRNGKey(seed), depth + 3)
  params = [(jax.random.normal(k[i], (m, n)) / np.sqrt(m),
             0.3 * jax.random.normal(jax.random.fold_in(k[i], 1), (n,)))
            for i, (m, n) in enumerate(zip(widths[:-1], widths[1:]))]
  x = jax.random.normal(k[-3], (batch, widths[0]))
  y = _targets(kind, k[-2], batch, widths[-1])
  v = ravel_pytree(params)[1](jax.random.normal(k[-1], (ravel_pytree(params)[0].size,)))
  log_prior = functools.partial(mm.gaussian_log_prior, sigma=1.7) if prior else None
  nlp = mm.negative_log_posterior(_mlp, _likelihood(kind, sigma), log_prior, num_data)
  return nlp, params, x, y, v


def _references(nlp, params, x, y):
  """Dense GGN and empirical Fisher without mlmap's curvature code."""
  f, unravel = ravel_pytree(params)
  z = _mlp(params, x)
  jac = jax.jacfwd(lambda w: _mlp(unravel(w), x))(f)  # [B, O, P]

  def example_nll(zi, ti):
    return -jnp.sum(nlp.log_likelihood(zi[None], ti[None]))
  hz = jax.vmap(jax.hessian(example_nll))(z, y)
  grads = jax.vmap(lambda xi, ti: jax.grad(
      lambda w: example_nll(_mlp(unravel(w), xi[None])[0], ti))(f))(x, y)
  prior_h = (jnp.zeros((f.size, f.size)) if nlp.log_prior is None
             else jax.hessian(lambda w: -nlp.log_prior(unravel(w)))(f))
  scale = 1.0 if nlp.num_data is None else nlp.num_data / x.shape[0]
  ggn = scale * jnp.einsum("iop,ioq,iqr->pr", jac, hz, jac) + prior_h
  return {"ggn": ggn, "empirical": scale * grads.T @ grads + prior_h}


def _close(a, b, rtol=1e-9):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.max(np.abs(b))), 1e-12)
  np.testing.assert_allclose(a / scale, b / scale, atol=rtol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_products_equal_dense_forms_and_references(kind):
  @SETTINGS
  @given(problems(kind))
  def check(problem):
    _compare(*problem)
  check()


def _compare(nlp, params, x, y, v):

  @jax.jit
  def compute(params, v, x, y):
    flat = lambda t: ravel_pytree(t)[0]  # noqa: E731
    return {
        "hvp": flat(mm.hvp(nlp, params, v, x, y)),
        "ggn_vp": flat(mm.ggn_vp(nlp, params, v, x, y)),
        "fisher_vp": flat(mm.fisher_vp(nlp, params, v, x, y)),
        "empirical_vp": flat(mm.empirical_fisher_vp(nlp, params, v, x, y)),
        "hessian_matrix": mm.hessian_matrix(nlp, params, x, y),
        "ggn_matrix": mm.ggn_matrix(nlp, params, x, y, chunk_size=3),
        "fisher_matrix": mm.fisher_matrix(nlp, params, x, y),
        "empirical_matrix": mm.empirical_fisher_matrix(nlp, params, x, y),
        "ggn_diagonal": flat(mm.ggn_diagonal(nlp, params, x, y, chunk_size=2)),
        "ref": _references(nlp, params, x, y),
    }

  out = compute(params, v, x, y)
  vf = ravel_pytree(v)[0]
  ref = out["ref"]
  _close(out["hvp"], out["hessian_matrix"] @ vf)
  _close(out["ggn_vp"], out["ggn_matrix"] @ vf)
  _close(out["fisher_vp"], out["fisher_matrix"] @ vf)
  _close(out["empirical_vp"], out["empirical_matrix"] @ vf)
  _close(out["ggn_diagonal"], jnp.diag(out["ggn_matrix"]))
  np.testing.assert_allclose(out["hessian_matrix"], out["hessian_matrix"].T, atol=1e-12)
  _close(out["ggn_matrix"], ref["ggn"])
  # Built-ins have canonical links (or a fixed Gaussian sigma): Fisher = GGN.
  _close(out["fisher_matrix"], ref["ggn"])
  _close(out["empirical_matrix"], ref["empirical"])
  # Symmetric positive semi-definite (convex negative log-likelihoods).
  assert np.min(np.linalg.eigvalsh(np.asarray(out["ggn_matrix"]))) > -1e-9 * max(
      1.0, float(np.max(np.abs(out["ggn_matrix"]))))
