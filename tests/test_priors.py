"""Priors against scipy, and weight decay as a Gaussian prior."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import mlmap as mm


def _params(seed=0):
  r = np.random.default_rng(seed)
  return {"dense": {"kernel": r.normal(size=(3, 4)), "bias": r.normal(size=4)},
          "out": {"kernel": r.normal(size=(4, 1)), "bias": r.normal(size=1)}}


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def test_gaussian_prior_matches_scipy_scalar_sigma():
  p = _params()
  got = jax.jit(functools.partial(mm.gaussian_log_prior, sigma=0.7))(p)
  ref = sum(scipy.stats.norm.logpdf(w, 0, 0.7).sum() for w in _leaves(p))
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_gaussian_prior_prefix_tree_with_none():
  p = _params(1)
  sigma = {"dense": {"kernel": 2.0, "bias": None}, "out": 0.5}
  got = jax.jit(mm.gaussian_log_prior)(p, sigma)
  ref = (scipy.stats.norm.logpdf(p["dense"]["kernel"], 0, 2.0).sum()
         + sum(scipy.stats.norm.logpdf(w, 0, 0.5).sum() for w in _leaves(p["out"])))
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_gaussian_prior_array_sigma_per_weight():
  p = {"w": np.arange(1.0, 7.0).reshape(2, 3)}
  sigma = {"w": np.array([0.5, 1.0, 2.0])}
  got = jax.jit(mm.gaussian_log_prior)(p, sigma)
  ref = scipy.stats.norm.logpdf(p["w"], 0, np.broadcast_to(sigma["w"], (2, 3))).sum()
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_laplace_prior_matches_scipy():
  p = _params(2)
  got = jax.jit(functools.partial(mm.laplace_log_prior, scale={"dense": 0.3, "out": None}))(p)
  ref = sum(scipy.stats.laplace.logpdf(w, 0, 0.3).sum() for w in _leaves(p["dense"]))
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_flat_prior_is_zero_and_grad_free():
  p = _params(3)
  assert float(jax.jit(mm.flat_log_prior)(p)) == 0.0
  g = jax.grad(mm.flat_log_prior)(p)
  assert all(np.all(np.asarray(x) == 0) for x in _leaves(g))


def test_gaussian_prior_gradient_is_weight_decay():
  p = _params(4)
  g = jax.jit(jax.grad(lambda q: -mm.gaussian_log_prior(q, 2.0)))(p)
  for gw, w in zip(_leaves(g), _leaves(p)):
    np.testing.assert_allclose(gw, w / 4.0, rtol=1e-12)


def test_sse_plus_decay_is_sigma_squared_times_nlp():
  """(1/2) SSE + (lambda/2)|w|^2 = sigma^2 * nlp + const, lambda = sigma^2/sigma_0^2."""
  r = np.random.default_rng(5)
  x, t = r.normal(size=(30, 3)), r.normal(size=30)
  sigma, sigma0 = 0.4, 1.7
  lam = float(mm.prior_sigma_to_weight_decay(sigma0, sigma))
  np.testing.assert_allclose(lam, sigma**2 / sigma0**2, rtol=1e-14)
  nlp = mm.negative_log_posterior(
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=sigma0))
  lecture = lambda w: 0.5 * jnp.sum((x @ w - t) ** 2) + 0.5 * lam * jnp.sum(w**2)
  diff = jax.jit(lambda w: lecture(w) - sigma**2 * nlp(w, x, t))
  d = [float(diff(r.normal(size=3) * s)) for s in (0.1, 1.0, 10.0)]
  np.testing.assert_allclose(d, d[0], atol=1e-9)
  # And the constant is the normalizers: N log(sigma) + P log(sigma_0) + (N+P)/2 log(2 pi).
  const = -(30 * np.log(sigma) + 3 * np.log(sigma0) + 33 / 2 * np.log(2 * np.pi))
  np.testing.assert_allclose(d[0], sigma**2 * const, rtol=1e-12)


def test_optax_decayed_weights_convention():
  """mean loss + add_decayed_weights(wd) follows (sigma^2/N) * grad nlp."""
  r = np.random.default_rng(6)
  n, sigma, sigma0 = 40, 0.5, 2.0
  x, t = r.normal(size=(n, 3)), r.normal(size=n)
  wd = float(mm.prior_sigma_to_optax_weight_decay(sigma0, n, sigma))
  np.testing.assert_allclose(wd, sigma**2 / (n * sigma0**2), rtol=1e-14)
  np.testing.assert_allclose(mm.optax_weight_decay_to_prior_sigma(wd, n, sigma), sigma0,
                             rtol=1e-14)
  mean_loss = lambda w: jnp.mean(0.5 * (x @ w - t) ** 2)
  nlp = mm.negative_log_posterior(
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=sigma0))
  w = jnp.asarray(r.normal(size=3))
  tx = optax.add_decayed_weights(wd)
  g_optax, _ = tx.update(jax.grad(mean_loss)(w), tx.init(w), w)
  g_nlp = jax.jit(jax.grad(nlp))(w, x, t) * sigma**2 / n
  np.testing.assert_allclose(g_optax, g_nlp, rtol=1e-12)


def test_conversion_round_trips():
  np.testing.assert_allclose(
      mm.weight_decay_to_prior_sigma(mm.prior_sigma_to_weight_decay(3.0, 0.2), 0.2), 3.0,
      rtol=1e-14)


# --- bad input ----------------------------------------------------------------

def test_sigma_not_a_prefix_names_both_trees():
  with pytest.raises(ValueError, match=r"not a prefix of params tree"):
    mm.gaussian_log_prior(_params(), {"dense": 1.0})
  with pytest.raises(ValueError, match=r"not a prefix"):
    mm.laplace_log_prior({"a": jnp.ones(2)}, {"b": 1.0})


@pytest.mark.parametrize("bad", [0.0, -1.0, {"dense": -1.0, "out": 1.0}])
def test_non_positive_scales(bad):
  with pytest.raises(ValueError, match="must be > 0"):
    mm.gaussian_log_prior(_params(), bad)
  with pytest.raises(ValueError, match="must be > 0"):
    mm.laplace_log_prior(_params(), bad)


def test_conversion_bad_input():
  with pytest.raises(ValueError, match="weight_decay must be > 0"):
    mm.weight_decay_to_prior_sigma(0.0)
  with pytest.raises(ValueError, match="num_data must be > 0"):
    mm.prior_sigma_to_optax_weight_decay(1.0, 0)


# --- issue 10: non-floating leaves, non-finite conversions --------------------

@pytest.mark.parametrize("prior", [mm.gaussian_log_prior, mm.laplace_log_prior])
def test_integer_leaf_raises_naming_its_path(prior):
  # Item 3: the step counter was penalized as a weight (-500001.8).
  params = {"w": jnp.zeros(1), "step": jnp.array(1000)}
  with pytest.raises(TypeError, match=r"non-floating leaves: 'step' \(int"):
    prior(params)
  with pytest.raises(TypeError, match="'step'"):
    jax.jit(prior)(params)
  nested = {"layer": {"w": jnp.zeros(2), "mask": jnp.array([True, False])}}
  with pytest.raises(TypeError, match=r"'layer/mask' \(bool\)"):
    prior(nested, {"layer": 2.0})


def test_integer_leaf_allowed_where_the_scale_tree_marks_it_none():
  w = np.array([0.3, -1.2])
  params = {"w": w, "step": jnp.array(1000), "state": {"mask": jnp.array([True]),
                                                       "count": jnp.array(3)}}
  sigma = {"w": 0.5, "step": None, "state": None}
  got = jax.jit(mm.gaussian_log_prior)(params, sigma)
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(w, 0, 0.5).sum(), rtol=1e-12)
  got = mm.laplace_log_prior(params, {"w": 0.5, "step": None, "state": None})
  np.testing.assert_allclose(got, scipy.stats.laplace.logpdf(w, 0, 0.5).sum(), rtol=1e-12)


def test_list_and_tuple_scale_trees():
  # Prefix trees whose nodes are lists or tuples (were mis-flattened before).
  a, b = np.array([0.1, 0.2]), np.array([1.0, -2.0, 3.0])
  ref = scipy.stats.norm.logpdf(a, 0, 1.0).sum() + scipy.stats.norm.logpdf(b, 0, 2.0).sum()
  np.testing.assert_allclose(mm.gaussian_log_prior([a, b], [1.0, 2.0]), ref, rtol=1e-12)
  np.testing.assert_allclose(mm.gaussian_log_prior((a, (b,)), (1.0, None)),
                             scipy.stats.norm.logpdf(a).sum(), rtol=1e-12)


def test_flat_prior_accepts_integer_leaves():
  assert float(mm.flat_log_prior({"w": jnp.ones(2), "step": jnp.array(3)})) == 0.0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_conversions_reject_non_finite(bad):
  calls = [
      (lambda: mm.prior_sigma_to_weight_decay(bad), "prior_sigma must be finite"),
      (lambda: mm.prior_sigma_to_weight_decay(1.0, bad), "noise_sigma must be finite"),
      (lambda: mm.weight_decay_to_prior_sigma(bad), "weight_decay must be finite"),
      (lambda: mm.prior_sigma_to_optax_weight_decay(1.0, bad), "num_data must be finite"),
      (lambda: mm.optax_weight_decay_to_prior_sigma(bad, 10), "weight_decay must be finite"),
  ]
  for call, msg in calls:
    with pytest.raises(ValueError, match=msg):
      call()
