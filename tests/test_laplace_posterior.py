"""Tests of mlmap.laplace_posterior: samples and the linearized (GLM) predictive."""

import functools

import numpy as np
import pytest
import scipy.stats
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import mlmap as mm
from _laplace_refs import PRIOR_SIGMA, SIGMA, blr_data  # noqa: E402
from _laplace_refs import blr_nlp as _blr_nlp  # noqa: E402
from _laplace_refs import fit as _fit  # noqa: E402
from _laplace_refs import mlp as _mlp  # noqa: E402
from _laplace_refs import mlp_params as _mlp_params  # noqa: E402


@pytest.fixture(scope="module")
def blr():
  return blr_data()


def test_glm_predictive_is_the_bayesian_linear_regression_predictive(blr):
  x, y, w, precision = blr
  post = jax.jit(lambda w: mm.laplace(_blr_nlp(), w, x, y))(jnp.asarray(w))
  assert isinstance(post, mm.LaplacePosterior) and bool(post.positive_definite)
  xs = np.random.default_rng(1).normal(size=(7, 5))
  cov = np.linalg.inv(precision)
  mean, var = jax.jit(lambda p, xs: p.predictive(xs))(post, xs)
  np.testing.assert_allclose(mean, xs @ w, rtol=1e-10)
  np.testing.assert_allclose(var, SIGMA**2 + np.einsum("bi,ij,bj->b", xs, cov, xs),
                             rtol=1e-10)
  np.testing.assert_allclose(post.covariance(), cov, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(post.precision, precision, rtol=1e-12)
  v = jnp.arange(5.0)
  np.testing.assert_allclose(post.precision_vp(v), precision @ np.arange(5.0), rtol=1e-12)
  # Matrix-free posterior: A v on the stored data, CG solves for the moments.
  post_mv = mm.laplace(_blr_nlp(), jnp.asarray(w), x, y, method="matvec")
  assert post_mv.precision is None and bool(post_mv.positive_definite)
  mean_mv, var_mv = jax.jit(lambda p, xs: p.predictive(xs))(post_mv, xs)
  np.testing.assert_allclose(mean_mv, mean, rtol=1e-12)
  np.testing.assert_allclose(var_mv, var, rtol=1e-7)
  np.testing.assert_allclose(post_mv.precision_vp(v), precision @ np.arange(5.0), rtol=1e-12)
  xs2 = xs.reshape(7, 5)[:, None, :] * np.ones((1, 2, 1))  # two outputs per example
  full_mv = post_mv.glm_moments(xs2, full_cov=True)[1]
  full = post.glm_moments(xs2, full_cov=True)[1]
  assert full.shape == (7, 2, 2)
  np.testing.assert_allclose(full_mv, full, rtol=1e-7)
  with pytest.raises(ValueError, match="needs the dense precision"):
    post_mv.sample(jax.random.PRNGKey(0), 3)


def test_samples_have_the_inverse_precision_as_covariance(key):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(30, 3)) * np.array([1.0, 0.3, 2.0])
  y = rng.normal(size=30)
  precision = x.T @ x / SIGMA**2 + np.eye(3) / PRIOR_SIGMA**2
  w = np.linalg.solve(precision, x.T @ y / SIGMA**2)
  params = {"a": jnp.asarray(w[:1]), "b": jnp.asarray(w[1:])}
  nlp = mm.negative_log_posterior(
      lambda p, x: x @ ravel_pytree(p)[0],
      functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA),
      functools.partial(mm.gaussian_log_prior, sigma=PRIOR_SIGMA))
  post = mm.laplace(nlp, params, x, y)
  n = 40000
  samples = jax.jit(post.sample, static_argnums=1)(key, n)
  assert samples["a"].shape == (n, 1) and samples["b"].shape == (n, 2)
  flat = np.concatenate([samples["a"], samples["b"]], axis=1)
  cov = np.linalg.inv(precision)
  sd = np.sqrt(np.diag(cov))
  # Standard errors: Var[x_i] = C_ii / n, Var[x_i x_j] = (C_ii C_jj + C_ij^2) / n.
  assert np.all(np.abs(flat.mean(0) - w) < 5 * sd / np.sqrt(n))
  se = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / n)
  assert np.all(np.abs(np.cov(flat.T) - cov) < 5 * se)


def test_probit_predictive_for_bernoulli_and_categorical(key):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 2))
  labels = (x[:, 0] + 0.5 * x[:, 1] + 0.7 * rng.normal(size=50) > 0)
  prior = functools.partial(mm.gaussian_log_prior, sigma=1.0)
  xs = rng.normal(size=(6, 2))
  cases = [(mm.bernoulli_log_likelihood, labels.astype(float)[:, None], 1),
           (mm.categorical_log_likelihood, labels.astype(int) + (x[:, 1] > 1), 3)]
  for log_lik, t, k in cases:
    nlp = mm.negative_log_posterior(_mlp, log_lik, prior)
    params = _fit(nlp, _mlp_params(key, 2, 4, k), x, t)
    post = mm.laplace(nlp, params, x, t)
    probs, (_, full) = jax.jit(lambda p: (p.predictive(xs), p.glm_moments(xs, True)))(post)
    # Independent reference: J by forward mode, the output Hessian of -log p in
    # closed form (sigmoid: p(1-p); softmax: diag(p) - p p^T), np.linalg.inv.
    flat, unravel = ravel_pytree(params)
    jacs = jax.jit(lambda a: [jax.jacfwd(lambda p: _mlp(unravel(p), b))(flat) for b in a])
    jac, jac_x = (np.asarray(j) for j in jacs([xs, x]))
    logits = np.asarray(_mlp(params, x))
    if k == 1:
      p = 1 / (1 + np.exp(-logits))
      h_out = (p * (1 - p))[..., None]
    else:
      p = scipy.special.softmax(logits, axis=-1)
      h_out = np.einsum("bk,kl->bkl", p, np.eye(k)) - np.einsum("bk,bl->bkl", p, p)
    ggn = np.einsum("bkp,bkl,blq->pq", jac_x, h_out, jac_x) + np.eye(flat.size)
    cov = np.linalg.inv(ggn)
    mu = np.asarray(_mlp(params, xs))
    var = np.einsum("bkp,pq,bkq->bk", jac, cov, jac)
    z = mu / np.sqrt(1 + np.pi * var / 8)
    ref = 1 / (1 + np.exp(-z)) if k == 1 else scipy.special.softmax(z, axis=-1)
    np.testing.assert_allclose(probs, ref, rtol=1e-8)
    # The probit approximation is close to the Monte-Carlo GLM predictive.
    draws = mu + np.sqrt(var) * np.asarray(jax.random.normal(key, (20000,) + mu.shape))
    mc = (1 / (1 + np.exp(-draws))).mean(0)
    if k == 1:
      np.testing.assert_allclose(probs, mc, atol=0.03)
    np.testing.assert_allclose(np.diagonal(full, axis1=1, axis2=2), var, rtol=1e-8)
