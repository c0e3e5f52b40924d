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


@pytest.mark.slow  # long; CI runs -m slow too
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


# --- issue 10: matrix-free accuracy and non-convergence, improper priors, max_bytes --

def test_matrix_free_glm_variances_match_dense_on_an_ill_conditioned_model():
  from _laplace_refs import ill_conditioned_regression
  nlp, w, x, t = ill_conditioned_regression()
  dense = mm.laplace(nlp, w, x, t).glm_moments(x[:5])[1]
  # Independent reference: x A^{-1} x^T with A in closed form, np.linalg.solve.
  a = np.asarray(x).T @ np.asarray(x) / 0.01 + np.eye(40)
  ref = np.einsum("bi,ib->b", np.asarray(x[:5]), np.linalg.solve(a, np.asarray(x[:5]).T))
  np.testing.assert_allclose(dense, ref, rtol=1e-9)
  for precond in ("ggn_diagonal", None):
    post = mm.laplace(nlp, w, x, t, method="matvec", cg_tol=1e-10, cg_preconditioner=precond)
    _, var, info = jax.jit(lambda p: p.glm_moments(x[:5], return_info=True))(post)
    np.testing.assert_allclose(var, dense, rtol=1e-6)
    assert bool(jnp.all(info.converged)) and info.status.shape == (5,)
    if precond is not None:  # the exact GGN diagonal
      np.testing.assert_allclose(post.cg_diagonal, np.diag(a), rtol=1e-12)


def test_matrix_free_non_convergence_warns_eager_and_is_flagged_under_jit():
  from _laplace_refs import ill_conditioned_regression
  nlp, w, x, t = ill_conditioned_regression()
  with pytest.warns(UserWarning, match=r"^laplace: the conjugate-gradient solve"):
    post = mm.laplace(nlp, w + 0.01, x, t, method="matvec", cg_maxiter=3,
                      cg_preconditioner=None, map_tol=None)
  assert int(post.cg_info.status) == mm.CGStatus.MAX_ITERATIONS
  with pytest.warns(UserWarning, match=r"^LaplacePosterior.glm_moments: 5 of 5 conjugate"):
    post.glm_moments(x[:5])
  with pytest.warns(UserWarning, match=r"^LaplacePosterior.predictive: 5 of 5"):
    post.predictive(x[:5])
  mean, var, info = jax.jit(lambda p: p.predictive(x[:5], return_info=True))(post)
  assert np.all(np.asarray(info.status) == mm.CGStatus.MAX_ITERATIONS)
  assert not np.any(np.asarray(info.converged))
  assert mean.shape == var.shape == (5,)
  dense = mm.laplace(nlp, w, x, t)
  assert dense.predictive(x[:5], return_info=True)[2] is None
  with pytest.raises(ValueError, match="cg_maxiter must be an integer >= 1"):
    mm.laplace(nlp, w, x, t, method="matvec", cg_maxiter=0)
  with pytest.raises(ValueError, match="cg_preconditioner must be one of"):
    mm.laplace(nlp, w, x, t, method="matvec", cg_preconditioner="jacobi")


def test_laplace_allows_an_improper_prior_only_where_the_curvature_is_pd(blr):
  x, y, _, _ = blr
  flat = mm.negative_log_posterior(
      _blr_nlp().apply_fn, _blr_nlp().log_likelihood, None)
  a = x.T @ x / SIGMA**2  # full rank: the ML posterior exists
  w_ml = jnp.asarray(np.linalg.solve(a, x.T @ y / SIGMA**2))
  for method in ("dense", "matvec"):
    post = mm.laplace(flat, w_ml, x, y, method=method)
    assert bool(post.positive_definite)
    np.testing.assert_allclose(post.glm_moments(x[:3])[1],
                               np.einsum("bi,ib->b", x[:3], np.linalg.solve(a, x[:3].T)),
                               rtol=1e-7)
  # A parameter no datum touches: the flat-prior curvature is singular.
  x0 = np.concatenate([x, np.zeros((len(y), 1))], axis=1)
  w0 = jnp.concatenate([w_ml, jnp.zeros(1)])
  for method in ("dense", "matvec"):
    with pytest.raises(ValueError, match=r"not \(numerically\) positive definite"):
      mm.laplace(flat, w0, x0, y, method=method)
    post = jax.jit(lambda w: mm.laplace(flat, w, x0, y, method=method))(w0)
    assert not bool(post.positive_definite)
  # The evidence of the same flat prior is refused outright.
  with pytest.raises(ValueError, match="needs a proper prior"):
    mm.log_evidence(flat, w_ml, x, y)


def test_laplace_max_bytes_and_non_float_leaves(blr):
  x, y, w, _ = blr
  with pytest.raises(ValueError, match=r"^laplace: the dense \(5, 5\).*max_bytes= to laplace"):
    mm.laplace(_blr_nlp(), jnp.asarray(w), x, y, max_bytes=100)
  # The matrix-free posterior builds nothing dense: max_bytes does not apply.
  mm.laplace(_blr_nlp(), jnp.asarray(w), x, y, method="matvec", max_bytes=100)
  nlp = mm.negative_log_posterior(lambda p, x: x @ p["w"], _blr_nlp().log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=1.0))
  with pytest.raises(TypeError, match=r"laplace: params .*'mask' \(bool"):
    mm.laplace(nlp, {"w": jnp.asarray(w), "mask": jnp.ones(2, bool)}, x, y)
