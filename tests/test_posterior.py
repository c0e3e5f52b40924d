"""The negative log-posterior: formula, transformations, flax, and sklearn optima."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.datasets
import sklearn.linear_model
import sklearn.preprocessing

import mlmap as mm


def _linear(w, x):
  return x @ w["w"] + w["b"]


def _data(seed=0, n=12, d=3):
  r = np.random.default_rng(seed)
  return r.normal(size=(n, d)), r.normal(size=n), {"w": r.normal(size=d), "b": r.normal()}


def test_formula_with_minibatch_scaling():
  x, t, p = _data()
  nlp = mm.negative_log_posterior(
      _linear, functools.partial(mm.gaussian_log_likelihood, sigma=0.3),
      functools.partial(mm.gaussian_log_prior, sigma=2.0), num_data=100)
  z = x @ p["w"] + p["b"]
  ref = (-(100 / 12) * scipy.stats.norm.logpdf(t, z, 0.3).sum()
         - scipy.stats.norm.logpdf(np.append(p["w"], p["b"]), 0, 2.0).sum())
  np.testing.assert_allclose(jax.jit(nlp)(p, x, t), ref, rtol=1e-12)
  assert nlp.num_data == 100 and nlp.apply_fn is _linear
  np.testing.assert_allclose(nlp.scale(x), 100 / 12)


def test_minibatch_average_is_full_data_objective():
  x, t, p = _data(1, n=24)
  full = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, mm.gaussian_log_prior)
  mini = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, mm.gaussian_log_prior,
                                   num_data=24)
  f = jax.jit(mini)
  avg = np.mean([f(p, x[i:i + 6], t[i:i + 6]) for i in range(0, 24, 6)])
  np.testing.assert_allclose(avg, full(p, x, t), rtol=1e-12)


def test_flat_prior_default_is_maximum_likelihood():
  x, t, p = _data(2)
  nlp = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood)
  np.testing.assert_allclose(
      nlp(p, x, t), -scipy.stats.norm.logpdf(t, x @ p["w"] + p["b"]).sum(), rtol=1e-12)


def test_jit_grad_vmap_and_hash():
  x, t, p = _data(3)
  nlp = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, mm.gaussian_log_prior)
  g = jax.jit(jax.grad(nlp))(p, x, t)
  eps = 1e-6
  e = {"w": jnp.zeros(3).at[1].set(eps), "b": 0.0}
  plus = jax.tree_util.tree_map(jnp.add, p, e)
  minus = jax.tree_util.tree_map(jnp.subtract, p, e)
  np.testing.assert_allclose(g["w"][1], (nlp(plus, x, t) - nlp(minus, x, t)) / (2 * eps),
                             rtol=1e-7)
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), p)
  vals = jax.jit(jax.vmap(nlp, in_axes=(0, None, None)))(stacked, x, t)
  np.testing.assert_allclose(vals[1], nlp(jax.tree_util.tree_map(lambda a: 2 * a, p), x, t),
                             rtol=1e-12)
  # Usable as a static argument: hashable and equal when rebuilt from the same parts.
  again = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, mm.gaussian_log_prior)
  assert hash(again) == hash(nlp) and again == nlp
  f = jax.jit(lambda obj, p: obj(p, x, t), static_argnums=0)
  np.testing.assert_allclose(f(nlp, p), nlp(p, x, t), rtol=1e-12)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def test_flax_linen_model():
  r = np.random.default_rng(4)
  x, k = r.normal(size=(10, 4)), r.integers(0, 3, size=10)
  model = _MLP()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  nlp = mm.negative_log_posterior(
      lambda p, x: model.apply({"params": p}, x), mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.5), num_data=50)
  logits = np.asarray(model.apply({"params": params}, x))
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  ref = (-(50 / 10) * logp[np.arange(10), k].sum()
         - sum(scipy.stats.norm.logpdf(np.asarray(w), 0, 1.5).sum()
               for w in jax.tree_util.tree_leaves(params)))
  np.testing.assert_allclose(jax.jit(nlp)(params, x, k), ref, rtol=1e-10)
  g = jax.jit(jax.grad(nlp))(params, x, k)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)


def _newton_minimize(fun, w, steps):
  from jax.flatten_util import ravel_pytree
  flat, unravel = ravel_pytree(w)
  f = lambda v: fun(unravel(v))
  g, h = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
  for _ in range(steps):
    flat = flat - jnp.linalg.solve(h(flat), g(flat))
  return unravel(flat), float(jnp.linalg.norm(g(flat)))


def test_map_ridge_equals_sklearn_on_diabetes():
  x, y = sklearn.datasets.load_diabetes(return_X_y=True)
  x = sklearn.preprocessing.StandardScaler().fit_transform(x)
  y = (y - y.mean()) / y.std()
  sigma, sigma0 = 0.7, 0.2
  lam = float(mm.prior_sigma_to_weight_decay(sigma0, sigma))
  nlp = mm.negative_log_posterior(
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=sigma0))
  w, _ = _newton_minimize(lambda w: nlp(w, x, y), jnp.zeros(x.shape[1]), 1)
  ridge = sklearn.linear_model.Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(x, y)
  np.testing.assert_allclose(w, ridge.coef_, rtol=1e-9, atol=1e-12)


def test_map_l2_logistic_equals_sklearn_on_breast_cancer():
  x, y = sklearn.datasets.load_breast_cancer(return_X_y=True)
  x = sklearn.preprocessing.StandardScaler().fit_transform(x)
  sigma0 = 0.5
  # sklearn minimizes C * sum(CE) + |w|^2 / 2 with an unpenalized intercept:
  # the Gaussian prior on w with a None (flat) leaf for the bias, C = sigma_0^2.
  nlp = mm.negative_log_posterior(
      lambda p, x: x @ p["w"] + p["b"], mm.bernoulli_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma={"w": sigma0, "b": None}))
  p, gnorm = _newton_minimize(lambda p: nlp(p, x, y.astype(float)),
                              {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}, 12)
  assert gnorm < 1e-9
  clf = sklearn.linear_model.LogisticRegression(
      C=sigma0**2, tol=1e-12, max_iter=100_000).fit(x, y)
  np.testing.assert_allclose(p["w"], clf.coef_[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p["b"], clf.intercept_[0], rtol=1e-5, atol=1e-7)


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_num_data(n):
  with pytest.raises(ValueError, match="num_data must be an integer >= 1"):
    mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, num_data=n)


def test_not_callable():
  with pytest.raises(TypeError, match="must be callable"):
    mm.negative_log_posterior(_linear, "gaussian")
  with pytest.raises(TypeError, match="log_prior must be callable"):
    mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, 1.0)


def test_shape_bug_surfaces_through_nlp():
  x, t, p = _data(5)
  nlp = mm.negative_log_posterior(lambda w, x: (x @ w["w"])[:, None], mm.gaussian_log_likelihood)
  with pytest.raises(ValueError, match=r"\(12, 1\).*\(12,\)"):
    jax.jit(nlp)(p, x, t)


# --- issue 10: num_data and model state ----------------------------------------

def test_num_data_smaller_than_batch_raises_naming_both():
  # Item 8: N / B < 1 silently down-weighted the data.
  x, t, p = _data(6)
  nlp = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, num_data=5)
  with pytest.raises(ValueError, match=r"num_data = 5 is smaller than the batch size B = 12"):
    nlp(p, x, t)
  with pytest.raises(ValueError, match=r"num_data = 5.*B = 12"):
    jax.jit(nlp)(p, x, t)
  np.testing.assert_allclose(nlp.scale(x[:5]), 1.0)


def test_empty_batch_raises():
  # Item 8: was a bare ZeroDivisionError with num_data set.
  x, t, p = _data(7)
  for n in (10, None):
    nlp = mm.negative_log_posterior(_linear, mm.gaussian_log_likelihood, num_data=n)
    with pytest.raises(ValueError, match=r"batch is empty"):
      nlp(p, x[:0], t[:0])


class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(4, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
    return nn.Dense(1, param_dtype=jnp.float64)(jnp.tanh(x))[:, 0]


def _bn_setup():
  x, t, _ = _data(8, n=10, d=3)
  model = _BNNet()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
  return model, variables, x, t


def test_flax_batch_stats_in_params_is_refused_naming_the_collection():
  model, variables, x, t = _bn_setup()
  nlp = mm.negative_log_posterior(lambda v, x: model.apply(v, x, train=False),
                                  mm.gaussian_log_likelihood)
  with pytest.raises(TypeError, match=r"'batch_stats'.*has_state=True.*close over"):
    nlp(variables, x, t)
  with pytest.raises(TypeError, match=r"'batch_stats'"):
    jax.jit(nlp)(variables, x, t)


def test_flax_mutable_outputs_are_refused_naming_the_collection():
  model, variables, x, t = _bn_setup()
  stats = variables["batch_stats"]
  nlp = mm.negative_log_posterior(
      lambda p, x: model.apply({"params": p, "batch_stats": stats}, x,
                               mutable=["batch_stats"]), mm.gaussian_log_likelihood)
  with pytest.raises(TypeError, match=r"apply_fn returned \(outputs, state\).*'batch_stats'"):
    jax.jit(nlp)(variables["params"], x, t)
  with pytest.raises(TypeError, match=r"'batch_stats'.*evaluation-mode"):
    mm.ggn_vp(nlp, variables["params"], variables["params"], x, t)


def test_flax_state_closed_over_in_eval_mode_works():
  model, variables, x, t = _bn_setup()
  stats = variables["batch_stats"]
  nlp = mm.negative_log_posterior(
      lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=False),
      mm.gaussian_log_likelihood)
  z = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(jax.jit(nlp)(variables["params"], x, t),
                             -scipy.stats.norm.logpdf(t, z).sum(), rtol=1e-12)


def test_check_stateless_model_passes_structured_outputs():
  from flax.core import FrozenDict
  check = mm.posterior.check_stateless_model
  check("f", {"params": {"w": 1.0}}, (jnp.zeros(2), jnp.ones(2)))
  check("f", {"w": 1.0}, (jnp.zeros(2), {"log_sigma": jnp.ones(2)}))
  check("f", {"cached": 1.0}, {"mean": jnp.zeros(2)})
  with pytest.raises(TypeError, match=r"collections 'batch_stats', 'cache'"):
    check("f", {"params": {}, "batch_stats": {}, "cache": {}}, None)
  with pytest.raises(TypeError, match=r"'intermediates'"):
    check("f", None, (jnp.zeros(2), {"intermediates": {}}))
  with pytest.raises(TypeError, match=r"'stats'"):
    check("f", None, (jnp.zeros(2), FrozenDict({"stats": {"m": jnp.zeros(1)}})))
  with pytest.raises(TypeError, match=r"'extra'"):
    check("f", FrozenDict({"params": {}, "extra": {}}), None)
