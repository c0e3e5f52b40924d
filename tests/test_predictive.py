"""Tests of mlmap._predictive: probit, Monte Carlo, Laplace bridge, sample mixture.

Each new Monte Carlo setting (likelihood, shapes, num_samples, batch size) is
a compile of about a second and a half here, so the default suite keeps one Monte
Carlo comparison with numpy (categorical, full covariances, jitted with the key
as an argument), batch-size independence at one chunked batch size, and every
argument check. Only under ``-m slow``: the other comparisons with numpy
(categorical from variances, Bernoulli, a singular PSD covariance), the zero-
covariance exactness test, and batch-size independence at a batch size above
num_samples.
"""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from mlmap import _predictive as pr


def _np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _correlated_cov(rng, b, k, scale=1.0):
  a = rng.normal(size=(b, k, k))
  return scale * (np.einsum("bij,bkj->bik", a, a) / k + 0.05 * np.eye(k))


# ----------------------------------------------------------------------------- probit


def test_probit_bernoulli_equals_the_closed_form():
  rng = np.random.default_rng(0)
  m, v = rng.normal(size=(3, 2)) * 3, rng.uniform(0.0, 5.0, size=(3, 2))
  want = _np_sigmoid(m / np.sqrt(1.0 + np.pi * v / 8.0))
  got = jax.jit(functools.partial(pr.probit, "bernoulli"))(m, v)
  np.testing.assert_allclose(got, want, rtol=1e-13)
  np.testing.assert_array_equal(pr.probit("bernoulli", m, np.zeros_like(v)),
                                jax.nn.sigmoid(jnp.asarray(m)))


def test_probit_categorical_equals_the_closed_form_and_reads_the_diagonal():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(4, 3)) * 2
  cov = _correlated_cov(rng, 4, 3)
  v = np.einsum("bkk->bk", cov)
  want = _np_softmax(m / np.sqrt(1.0 + np.pi * v / 8.0))
  got = jax.jit(functools.partial(pr.probit, "categorical"))(m, v)
  np.testing.assert_allclose(got, want, rtol=1e-13)
  np.testing.assert_allclose(pr.probit("categorical", m, cov), want, rtol=1e-13)
  np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=1e-14)


def test_probit_rejects_bad_arguments():
  with pytest.raises(ValueError, match="'gaussian'"):
    pr.probit("gaussian", jnp.zeros(3), jnp.ones(3))
  with pytest.raises(ValueError, match=r"\(3, 2\).*\(3,\)"):
    pr.probit("bernoulli", jnp.zeros(3), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match=r"\(2, 4\)"):
    pr.probit("categorical", jnp.zeros((2, 3)), jnp.ones((2, 4)))


# ------------------------------------------------------------------------ monte carlo


def _assert_mc_agrees(p, se, ref_samples, num_samples):
  """Within 4 combined standard errors of numpy's MC; stderr within 20%."""
  ref = ref_samples.mean(axis=0)
  ref_std = ref_samples.std(axis=0, ddof=1)
  ref_se = ref_std / np.sqrt(ref_samples.shape[0])
  p, se = np.asarray(p), np.asarray(se)
  assert np.all(np.abs(p - ref) <= 4.0 * np.sqrt(se**2 + ref_se**2)), (p, ref, se)
  np.testing.assert_allclose(se, ref_std / np.sqrt(num_samples), rtol=0.2)


def test_monte_carlo_categorical_full_covariance_matches_numpy(key):
  rng = np.random.default_rng(2)
  b, k, s = 3, 4, 20000
  mean = rng.normal(size=(b, k)) * 1.5
  cov = _correlated_cov(rng, b, k, scale=2.0)
  draw = jax.jit(lambda key, m, c: pr.monte_carlo("categorical", key, m, c, s))
  p, se = draw(key, mean, cov)
  assert p.shape == se.shape == (b, k)
  np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, rtol=1e-12)
  rs = np.random.RandomState(0)
  ref = np.stack([_np_softmax(rs.multivariate_normal(mean[i], cov[i], size=200000))
                  for i in range(b)], axis=1)
  _assert_mc_agrees(p, se, ref, s)
  # Jitted with the key as an argument: another key, other (but agreeing) samples.
  p2, _ = draw(jax.random.PRNGKey(1), mean, cov)
  assert not np.allclose(p2, p, rtol=0, atol=1e-12)
  _assert_mc_agrees(p2, se, ref, s)


@pytest.mark.slow
def test_monte_carlo_categorical_variances_match_numpy(key):
  rng = np.random.default_rng(3)
  mean, var = rng.normal(size=(2, 3)), rng.uniform(0.5, 3.0, size=(2, 3))
  p, se = pr.monte_carlo("categorical", key, mean, var, 20000)
  rs = np.random.RandomState(0)
  ref = _np_softmax(mean + np.sqrt(var) * rs.normal(size=(200000, 2, 3)))
  _assert_mc_agrees(p, se, ref, 20000)


@pytest.mark.slow
def test_monte_carlo_bernoulli_matches_numpy(key):
  rng = np.random.default_rng(4)
  mean, var = rng.normal(size=(3, 2)) * 2, rng.uniform(0.1, 6.0, size=(3, 2))
  p, se = jax.jit(lambda key: pr.monte_carlo("bernoulli", key, mean, var, 20000))(key)
  rs = np.random.RandomState(0)
  ref = _np_sigmoid(mean + np.sqrt(var) * rs.normal(size=(200000, 3, 2)))
  _assert_mc_agrees(p, se, ref, 20000)


@pytest.mark.slow
def test_monte_carlo_zero_covariance_is_the_link_of_the_mean_exactly(key):
  mean = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)))
  p, se = pr.monte_carlo("categorical", key, mean, jnp.zeros((3, 4, 4)), 500)
  np.testing.assert_array_equal(p, jax.nn.softmax(mean, axis=-1))
  np.testing.assert_array_equal(se, 0.0)
  p, se = pr.monte_carlo("bernoulli", key, mean, jnp.zeros((3, 4)), 500, batch_size=7)
  np.testing.assert_array_equal(p, jax.nn.sigmoid(mean))
  np.testing.assert_array_equal(se, 0.0)


@pytest.mark.parametrize("batch_size", [300, pytest.param(5000, marks=pytest.mark.slow)])
def test_monte_carlo_is_independent_of_batch_size(key, batch_size):
  rng = np.random.default_rng(6)
  mean, cov = rng.normal(size=(2, 3)), _correlated_cov(rng, 2, 3)
  ref = pr.monte_carlo("categorical", key, mean, cov, 1000)
  got = jax.jit(lambda key: pr.monte_carlo(
      "categorical", key, mean, cov, 1000, batch_size=batch_size))(key)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-9)


@pytest.mark.slow
def test_monte_carlo_psd_singular_covariance(key):
  # Rank-1 covariance: all mass on one direction; no Cholesky would exist.
  u = np.array([1.0, -2.0, 0.5])
  cov = np.outer(u, u)[None]
  mean = np.array([[0.3, -0.1, 0.2]])
  p, se = pr.monte_carlo("categorical", key, mean, cov, 20000)
  assert np.all(np.isfinite(p)) and np.all(np.isfinite(se))
  rs = np.random.RandomState(0)
  ref = _np_softmax(mean + rs.normal(size=(200000, 1, 1)) * u)
  _assert_mc_agrees(p, se, ref, 20000)


def test_monte_carlo_rejects_bad_arguments(key):
  m, v = jnp.zeros((2, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="num_samples.*got 1"):
    pr.monte_carlo("categorical", key, m, v, 1)
  with pytest.raises(ValueError, match="num_samples.*got 10.0"):
    pr.monte_carlo("categorical", key, m, v, 10.0)
  with pytest.raises(ValueError, match="batch_size.*got 0"):
    pr.monte_carlo("categorical", key, m, v, 10, batch_size=0)
  with pytest.raises(ValueError, match="'gaussian'"):
    pr.monte_carlo("gaussian", key, m, v, 10)
  with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
    pr.monte_carlo("categorical", key, m, jnp.ones((2, 3, 4)), 10)


# --------------------------------------------------------------------- laplace bridge


def _np_bridge(mean, cov):
  """The paper's equations from scratch: condition on sum 0, then the bridge.

  The conditioning is done in coordinates of the sum-zero subspace, f = Q y with
  Q an orthonormal basis of 1-perp: the density N(Q y; mu, Sigma) in y has
  precision Q^T Sigma^{-1} Q (a route independent of the closed form the
  library uses).
  """
  k = mean.shape[-1]
  _, vecs = np.linalg.eigh(np.eye(k) - np.ones((k, k)) / k)
  q = vecs[:, 1:]                                    # eigenvalue-1 eigenvectors
  probs, alphas = [], []
  for mu, sigma in zip(mean, cov):
    inv = np.linalg.inv(sigma)
    prec = q.T @ inv @ q
    cov_y = np.linalg.inv(prec)
    mu_c = q @ (cov_y @ (q.T @ inv @ mu))
    var_c = np.diag(q @ cov_y @ q.T)
    alpha = (1.0 - 2.0 / k + np.exp(mu_c) / k**2 * np.sum(np.exp(-mu_c))) / var_c
    alphas.append(alpha)
    probs.append(alpha / alpha.sum())
  return np.array(probs), np.array(alphas)


@pytest.mark.parametrize("k", [2, 4])
def test_laplace_bridge_equals_the_papers_equations(k):
  rng = np.random.default_rng(7 + k)
  mean, cov = rng.normal(size=(5, k)) * 2, _correlated_cov(rng, 5, k, scale=1.5)
  probs, alpha = jax.jit(pr.laplace_bridge)(mean, cov)
  want_p, want_a = _np_bridge(mean, cov)
  np.testing.assert_allclose(alpha, want_a, rtol=1e-10)
  np.testing.assert_allclose(probs, want_p, rtol=1e-10)
  assert np.all(alpha > 0)
  np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-14)
  # Without the correction the result differs: the step is not a no-op here.
  mu = mean
  naive = (1 - 2 / k + np.exp(mu) / k**2 * np.exp(-mu).sum(-1, keepdims=True))
  naive = naive / np.einsum("bkk->bk", cov)
  assert not np.allclose(naive / naive.sum(-1, keepdims=True), want_p, rtol=1e-3)


def test_laplace_bridge_variances_are_a_diagonal_covariance():
  rng = np.random.default_rng(9)
  mean, var = rng.normal(size=(3, 5)), rng.uniform(0.2, 2.0, size=(3, 5))
  full = np.einsum("bk,kl->bkl", var, np.eye(5))
  got = pr.laplace_bridge(mean, var)
  want = _np_bridge(mean, full)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-10)


def test_laplace_bridge_small_covariance_mode_is_the_argmax_of_the_mean():
  rng = np.random.default_rng(10)
  mean = rng.normal(size=(20, 6)) * 2
  probs, alpha = pr.laplace_bridge(mean, 1e-10 * np.broadcast_to(np.eye(6), (20, 6, 6)))
  np.testing.assert_array_equal(np.argmax(probs, -1), np.argmax(mean, -1))
  assert np.all(alpha > 1e9)  # a concentrated Dirichlet


def test_laplace_bridge_stays_finite():
  mean = jnp.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
  probs, alpha = pr.laplace_bridge(mean, jnp.broadcast_to(jnp.eye(3), (2, 3, 3)))
  assert np.all(np.isfinite(probs)) and np.all(alpha > 0)
  np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0], atol=1e-12)
  np.testing.assert_allclose(probs[1], np.full(3, 1 / 3), rtol=1e-14)
  # Zero covariance (the limit alpha -> inf): finite, normalized probabilities.
  probs, _ = pr.laplace_bridge(jnp.array([0.5, -0.2, 0.1]), jnp.zeros((3, 3)))
  assert np.all(np.isfinite(probs)) and np.isclose(float(probs.sum()), 1.0, rtol=1e-14)


def test_laplace_bridge_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"K >= 2.*\(4, 1\)"):
    pr.laplace_bridge(jnp.zeros((4, 1)), jnp.ones((4, 1)))
  with pytest.raises(ValueError, match=r"\(4, 2, 3\)"):
    pr.laplace_bridge(jnp.zeros((4, 2)), jnp.ones((4, 2, 3)))


# --------------------------------------------------------------------- sample mixture


def test_sample_mixture_classification_against_numpy():
  out = np.random.default_rng(11).normal(size=(7, 3, 4)) * 2
  got = jax.jit(functools.partial(pr.sample_mixture, "categorical"))(out)
  np.testing.assert_allclose(got, _np_softmax(out).mean(axis=0), rtol=1e-13)
  got = pr.sample_mixture("bernoulli", out)
  np.testing.assert_allclose(got, _np_sigmoid(out).mean(axis=0), rtol=1e-13)


def test_sample_mixture_gaussian_is_the_law_of_total_variance():
  out = np.random.default_rng(12).normal(size=(9, 5, 2)) * 3 + 1
  sigma = 0.7
  mean, var = jax.jit(lambda o: pr.sample_mixture("gaussian", o, sigma))(out)
  # The mixture's moments from E[y^2] = mean_s(f_s^2 + sigma^2).
  second = np.mean(out**2 + sigma**2, axis=0)
  np.testing.assert_allclose(mean, out.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(var, second - out.mean(axis=0) ** 2, rtol=1e-12)
  np.testing.assert_allclose(pr.sample_mixture("gaussian", out)[1],
                             out.var(axis=0) + 1.0, rtol=1e-13)


def test_sample_mixture_rejects_bad_arguments():
  with pytest.raises(ValueError, match="sigma=0.5.*'categorical'"):
    pr.sample_mixture("categorical", jnp.zeros((2, 3, 4)), 0.5)
  with pytest.raises(ValueError, match="sigma must be > 0, got -1"):
    pr.sample_mixture("gaussian", jnp.zeros((2, 3)), -1.0)
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    pr.sample_mixture("gaussian", jnp.zeros(3))
  with pytest.raises(ValueError, match="'poisson'"):
    pr.sample_mixture("poisson", jnp.zeros((2, 3)))


# ------------------------------------------------------------------------- check_link


def test_check_link_accepts_and_resolves(key):
  check = functools.partial(pr.check_link, "post.predictive")
  assert check(None, "glm", "categorical", None, None) == "probit"
  assert check("bridge", "glm", "categorical", None, None) == "bridge"
  assert check("probit", "glm", "bernoulli", None, None) == "probit"
  assert check("mc", "glm", "bernoulli", 2, key) == "mc"
  assert check(None, "glm", "gaussian", None, None) is None
  assert check("probit", "nn", "gaussian", 10, jax.random.key(0)) == "nn"
  assert check("mc", "nn", "categorical", 10, key) == "nn"
  # A traced key passes (the check reads only its dtype and shape).
  jax.jit(lambda k: (check("mc", "glm", "categorical", 5, k), k)[1])(key)


@pytest.mark.parametrize("args, error, match", [
    (("laplace", "glm", "categorical", None, None), ValueError, "'laplace'"),
    (("probit", "mcmc", "categorical", None, None), ValueError, "'mcmc'"),
    (("probit", "glm", "poisson", None, None), ValueError, "'poisson'"),
    (("bridge", "glm", "bernoulli", None, None), ValueError, "'bridge'.*'bernoulli'"),
    (("mc", "glm", "gaussian", 10, "KEY"), ValueError, "'mc'.*closed form"),
    (("bridge", "glm", "gaussian", None, None), ValueError, "'bridge'.*closed form"),
    (("bridge", "nn", "categorical", 10, "KEY"), ValueError, "'bridge'.*pred_type='glm'"),
    (("mc", "glm", "categorical", 10, None), TypeError, "link_approx='mc'.*key=None"),
    (("probit", "nn", "gaussian", 10, None), TypeError, "pred_type='nn'.*key=None"),
    (("mc", "glm", "categorical", 10, np.zeros(3, np.uint32)), TypeError, r"\(3,\)"),
    (("mc", "glm", "categorical", 1, "KEY"), ValueError, "num_samples.*got 1"),
    (("mc", "glm", "categorical", None, "KEY"), ValueError, "num_samples.*got None"),
    (("probit", "nn", "bernoulli", 2.5, "KEY"), ValueError, "num_samples.*got 2.5"),
    (("mc", "glm", "categorical", True, "KEY"), ValueError, "num_samples.*got True"),
])
def test_check_link_errors_name_the_offending_value(key, args, error, match):
  args = tuple(key if isinstance(a, str) and a == "KEY" else a for a in args)
  with pytest.raises(error, match=match) as info:
    pr.check_link("post.predictive", *args)
  assert str(info.value).startswith("post.predictive: ")
