"""Tests of mlmap.laplace: log evidence, Laplace posterior, GLM predictive."""

import functools

import numpy as np
import pytest
import scipy.stats
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import mlmap as mm

SIGMA, PRIOR_SIGMA = 0.4, 1.5


def _linear(w, x):
  return x @ w


def _blr_nlp(sigma=SIGMA, prior_sigma=PRIOR_SIGMA, num_data=None):
  return mm.negative_log_posterior(
      _linear, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=prior_sigma), num_data=num_data)


@pytest.fixture(scope="module")
def blr():
  """Bayesian linear regression with its exact MAP and posterior (closed forms)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 5))
  y = x @ rng.normal(size=5) + SIGMA * rng.normal(size=40)
  precision = x.T @ x / SIGMA**2 + np.eye(5) / PRIOR_SIGMA**2
  w = np.linalg.solve(precision, x.T @ y / SIGMA**2)
  return x, y, w, precision


def _mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return h @ p["l2"]["w"] + p["l2"]["b"]


def _mlp_params(key, d_in, hidden, d_out):
  k1, k2 = jax.random.split(key)
  return {"l1": {"w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
                 "b": jnp.zeros(hidden)},
          "l2": {"w": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
                 "b": jnp.zeros(d_out)}}


def _fit(nlp, params, x, t, steps=80):
  tx = mm.newton(nlp)

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(nlp)(p, x, t), s, p, batch=(x, t))
      return (jax.tree_util.tree_map(jnp.add, p, u), s), None
    return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[0][0]
  return run(params)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_log_evidence_is_the_closed_form_marginal_likelihood(blr, curvature):
  x, y, w, _ = blr
  ref = scipy.stats.multivariate_normal(
      np.zeros(len(y)), SIGMA**2 * np.eye(len(y)) + PRIOR_SIGMA**2 * x @ x.T).logpdf(y)
  nlp = _blr_nlp()
  f = jax.jit(lambda w: mm.log_evidence(nlp, w, x, y, curvature))
  np.testing.assert_allclose(f(jnp.asarray(w)), ref, rtol=1e-8)
  np.testing.assert_allclose(mm.log_evidence(nlp, jnp.asarray(w), x, y, curvature),
                             ref, rtol=1e-8)


def test_log_evidence_info_and_minibatch_scaling(blr):
  x, y, w, precision = blr
  w = jnp.asarray(w)
  value, info = jax.jit(lambda w: mm.log_evidence(_blr_nlp(), w, x, y, return_info=True))(w)
  np.testing.assert_allclose(info.logdet, np.linalg.slogdet(precision)[1], rtol=1e-10)
  assert bool(info.positive_definite)
  assert float(info.newton_decrement) < 1e-20 and float(info.grad_norm) < 1e-9
  # A batch with num_data = 2B stands for every example twice: the evidence of
  # the duplicated data set (whose MAP differs, so refit both).
  x2, y2 = np.concatenate([x, x]), np.concatenate([y, y])
  p2 = x2.T @ x2 / SIGMA**2 + np.eye(5) / PRIOR_SIGMA**2
  w2 = jnp.asarray(np.linalg.solve(p2, x2.T @ y2 / SIGMA**2))
  scaled = mm.log_evidence(_blr_nlp(num_data=2 * len(y)), w2, x, y)
  full = mm.log_evidence(_blr_nlp(), w2, x2, y2)
  np.testing.assert_allclose(scaled, full, rtol=1e-12)


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


def test_slq_log_evidence_matches_dense_within_its_standard_error():
  rng = np.random.default_rng(4)
  x = rng.uniform(-2, 2, size=(60, 1))
  y = np.sin(2 * x) + 0.1 * rng.normal(size=(60, 1))
  nlp = mm.negative_log_posterior(
      _mlp, functools.partial(mm.gaussian_log_likelihood, sigma=0.1),
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  params = _fit(nlp, _mlp_params(jax.random.PRNGKey(1), 1, 8, 1), x, y)
  dense, dinfo = mm.log_evidence(nlp, params, x, y, return_info=True)
  f = jax.jit(lambda k: mm.log_evidence(nlp, params, x, y, method="slq", key=k,
                                        num_probes=64, num_steps=25, return_info=True))
  errs, ses = [], []
  for i in range(3):
    value, info = f(jax.random.PRNGKey(i))
    np.testing.assert_allclose(value - dense, -0.5 * (info.logdet - dinfo.logdet), atol=1e-8)
    errs.append(float(info.logdet - dinfo.logdet))
    ses.append(float(info.logdet_stderr))
  # Stated tolerance: |SLQ - dense| <= 4 standard errors (num_steps = P: no
  # quadrature bias, Monte-Carlo error only).
  assert all(abs(e) <= 4 * s for e, s in zip(errs, ses)), (errs, ses)
  assert all(0 < s < 0.1 * abs(float(dinfo.logdet)) for s in ses)


def test_not_positive_definite_raises_and_flags_under_jit():
  # f(x; w) = w0 w1 x: at w = 0 the Hessian's data term [[0, -c], [-c, 0]] is indefinite.
  x = np.linspace(-1, 1, 20)[:, None]
  y = 3 * x[:, 0]
  nlp = mm.negative_log_posterior(
      lambda w, x: x[:, 0] * w[0] * w[1],
      functools.partial(mm.gaussian_log_likelihood, sigma=0.5),
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  w0 = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"hessian curvature at params is not \(numerically\) positive definite"):
    mm.log_evidence(nlp, w0, x, y, "hessian")
  with pytest.raises(ValueError, match=r"not \(numerically\) positive definite"):
    mm.laplace(nlp, w0, x, y, "hessian")
  value, info = jax.jit(lambda w: mm.log_evidence(nlp, w, x, y, "hessian",
                                                  return_info=True))(w0)
  assert float(value) == -np.inf and not bool(info.positive_definite)
  assert not np.isnan(float(info.logdet))
  grad = jax.jit(jax.grad(lambda w: mm.log_evidence(nlp, w, x, y, "hessian")))(w0 + 0.01)
  assert np.all(np.isfinite(grad))


def test_far_from_a_map_warns_and_bad_arguments_raise(blr):
  x, y, w, _ = blr
  nlp = _blr_nlp()
  with pytest.warns(UserWarning, match="params are far from a MAP: gradient norm"):
    mm.log_evidence(nlp, jnp.asarray(w) + 0.5, x, y)
  with pytest.warns(UserWarning, match="far from a MAP"):
    mm.laplace(nlp, jnp.asarray(w) + 0.5, x, y)
  with pytest.raises(ValueError, match="curvature must be one of"):
    mm.log_evidence(nlp, jnp.asarray(w), x, y, curvature="fisher_diag")
  with pytest.raises(ValueError, match="method='slq' needs a PRNG key"):
    mm.log_evidence(nlp, jnp.asarray(w), x, y, method="slq")
  with pytest.raises(TypeError, match="NegativeLogPosterior"):
    mm.log_evidence(lambda p, x, t: jnp.sum(p**2), jnp.asarray(w), x, y, "ggn")
  post = mm.laplace(nlp, jnp.asarray(w), x, y)
  with pytest.raises(ValueError, match="likelihood must be"):
    post.predictive(x, likelihood="poisson")
