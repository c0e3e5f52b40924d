"""Tests of mlmap.laplace: the Laplace log evidence, dense and SLQ, and its failure modes."""

import functools

import numpy as np
import pytest
import scipy.stats
import jax
import jax.numpy as jnp

import mlmap as mm
from _laplace_refs import PRIOR_SIGMA, SIGMA, blr_data  # noqa: E402
from _laplace_refs import blr_nlp as _blr_nlp  # noqa: E402
from _laplace_refs import fit as _fit  # noqa: E402
from _laplace_refs import mlp as _mlp  # noqa: E402
from _laplace_refs import mlp_params as _mlp_params  # noqa: E402


@pytest.fixture(scope="module")
def blr():
  return blr_data()


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


@pytest.mark.slow  # long; CI runs -m slow too
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


# --- issue 10: improper priors, max_bytes, warning prefix, SLQ CG status ------------

def _dict_problem(log_prior):
  from _laplace_refs import dict_linear
  rng = np.random.default_rng(5)
  x = rng.normal(size=(30, 3))
  y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.2 * rng.normal(size=30)
  nlp = mm.negative_log_posterior(
      dict_linear, functools.partial(mm.gaussian_log_likelihood, sigma=0.2), log_prior)
  return nlp, {"w": jnp.zeros(3), "b": jnp.zeros(())}, x, y


@pytest.mark.parametrize("log_prior, what, paths", [
    (None, "nlp.log_prior is None", "'b', 'w'"),
    (mm.flat_log_prior, "mm.flat_log_prior", "'b', 'w'"),
    (functools.partial(mm.gaussian_log_prior, sigma={"w": 1.0, "b": None}),
     "sigma tree", "'b'"),
    (functools.partial(mm.laplace_log_prior, scale={"w": None, "b": 2.0}),
     "scale tree", "'w'"),
])
def test_improper_prior_is_refused_naming_the_leaves(log_prior, what, paths):
  nlp, p, x, y = _dict_problem(log_prior)
  for call in (lambda: mm.log_evidence(nlp, p, x, y),
               lambda: jax.jit(lambda p: mm.log_evidence(nlp, p, x, y))(p),
               lambda: mm.log_evidence(nlp, p, x, y, method="slq", key=jax.random.PRNGKey(0))):
    with pytest.raises(ValueError, match=rf"{what}.*unpenalized \({paths}\).*needs a proper prior"):
      call()


def test_custom_prior_flat_in_a_leaf_raises_eager_and_is_nan_under_jit():
  from _laplace_refs import custom_prior_ignoring_b
  nlp, p, x, y = _dict_problem(custom_prior_ignoring_b)
  p = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(0.3)}
  with pytest.raises(ValueError, match=r"unpenalized \('b'\).*proper prior"):
    mm.log_evidence(nlp, p, x, y, map_tol=None)
  value = jax.jit(lambda p: mm.log_evidence(nlp, p, x, y, map_tol=None))(p)
  assert np.isnan(float(value))
  # The same custom prior made proper on every leaf: finite, equal to the built-in.
  proper = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood,
                                     lambda q: mm.gaussian_log_prior(q, sigma=1.0))
  builtin = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood,
                                      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  got = jax.jit(lambda p: mm.log_evidence(proper, p, x, y, map_tol=None))(p)
  np.testing.assert_allclose(got, mm.log_evidence(builtin, p, x, y, map_tol=None),
                             rtol=1e-12)


def test_max_bytes_and_non_float_leaves_are_refused(blr):
  x, y, w, _ = blr
  nlp = _blr_nlp()
  with pytest.raises(ValueError, match=r"log_evidence: the dense \(5, 5\) float64 matrix.*"
                                       r"max_bytes= to log_evidence"):
    mm.log_evidence(nlp, jnp.asarray(w), x, y, max_bytes=100)
  assert np.isfinite(float(mm.log_evidence(nlp, jnp.asarray(w), x, y, max_bytes=200)))
  nlp_d = mm.negative_log_posterior(
      lambda p, x: x @ p["w"], nlp.log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma={"w": 1.0, "step": None}))
  with pytest.raises(TypeError, match=r"log_evidence: params .*'step' \(int"):
    mm.log_evidence(nlp_d, {"w": jnp.asarray(w), "step": jnp.asarray(3)}, x, y)


def test_slq_warnings_start_with_log_evidence_and_cg_status_is_reported(blr):
  x, y, w, _ = blr
  nlp, key = _blr_nlp(), jax.random.PRNGKey(0)
  with pytest.warns(UserWarning, match=r"^log_evidence: params are far from a MAP"):
    mm.log_evidence(nlp, jnp.asarray(w) + 0.5, x, y, method="slq", key=key)
  _, info = mm.log_evidence(nlp, jnp.asarray(w) + 0.5, x, y, method="slq", key=key,
                            map_tol=None, return_info=True)
  assert int(info.cg_status) == mm.CGStatus.CONVERGED
  # One Lanczos step caps the CG at 4 iterations: not enough for P = 5.
  with pytest.warns(UserWarning, match=r"^log_evidence: the conjugate-gradient solve .*"
                                       r"'max_iterations'"):
    _, info = mm.log_evidence(nlp, jnp.asarray(w) + 0.5, x, y, method="slq", key=key,
                              num_steps=1, map_tol=None, return_info=True)
  assert int(info.cg_status) == mm.CGStatus.MAX_ITERATIONS
  _, info = jax.jit(lambda w: mm.log_evidence(nlp, w, x, y, method="slq", key=key,
                                              num_steps=1, map_tol=None,
                                              return_info=True))(jnp.asarray(w) + 0.5)
  assert int(info.cg_status) == mm.CGStatus.MAX_ITERATIONS
  _, dinfo = mm.log_evidence(nlp, jnp.asarray(w), x, y, return_info=True)
  assert int(dinfo.cg_status) == mm.CGStatus.CONVERGED
