"""Tests for mlmap.curvature: products against independent dense references."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import _fisher as fisher_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _curvature_refs import (KINDS, assert_close, bn_nlps, bn_problem, flat,  # noqa: E402
                             mlp_apply, mlp_init, problem, references,
                             structured_output_fisher, structured_problem,
                             structured_references, with_step_counter)

_hvp = jax.jit(mm.hvp, static_argnums=0)
_ggn = jax.jit(mm.ggn_vp, static_argnums=0)
_fisher = jax.jit(mm.fisher_vp, static_argnums=0)
_emp = jax.jit(mm.empirical_fisher_vp, static_argnums=0)


def _vector(params, seed=1):
  f, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.PRNGKey(seed), f.shape))


# The num_data + prior scaling does not depend on the likelihood: every kind runs
# plain by default, the scaled case by default for categorical only; the scaled
# gaussian and bernoulli cases run with -m slow.
_SCALED_CASES = [pytest.param(kind, scaled, id=f"{kind}-{'num_data+prior' if scaled else 'plain'}",
                              marks=pytest.mark.slow if scaled and kind != "categorical" else ())
                 for kind in KINDS for scaled in (False, True)]


@pytest.mark.parametrize("kind, scaled", _SCALED_CASES)
def test_products_equal_reference_matrix_times_vector(kind, scaled):
  nlp, params, x, y = problem(kind, scaled)
  ref = references(kind, scaled)
  v = _vector(params)
  vf = flat(v)
  assert_close(flat(_hvp(nlp, params, v, x, y)), ref["hessian"] @ vf)
  ggn = flat(_ggn(nlp, params, v, x, y))
  assert_close(ggn, ref["ggn"] @ vf)
  fisher = flat(_fisher(nlp, params, v, x, y))
  assert_close(fisher, ref["fisher"] @ vf)
  # Canonical links: the closed-form Fisher is the GGN.
  assert_close(fisher, ggn, rtol=1e-12)
  assert_close(flat(_emp(nlp, params, v, x, y)), ref["empirical"] @ vf)
  # The empirical Fisher is a different matrix (the test can fail).
  assert not np.allclose(ref["empirical"], ref["fisher"], rtol=0.05)


def test_products_under_vmap_and_linearized_builders():
  nlp, params, x, y = problem("categorical", True)
  ref = references("categorical", True)
  f, unravel = ravel_pytree(params)
  vs = jax.random.normal(jax.random.PRNGKey(3), (4, f.size))
  batched = jax.vmap(unravel)(vs)

  @jax.jit
  def all_products(vectors):
    out = {
        "hessian": jax.vmap(lambda v: mm.hvp(nlp, params, v, x, y))(vectors),
        "ggn": jax.vmap(lambda v: mm.ggn_vp(nlp, params, v, x, y))(vectors),
        "fisher": jax.vmap(lambda v: mm.fisher_vp(nlp, params, v, x, y))(vectors),
        "empirical": jax.vmap(
            lambda v: mm.empirical_fisher_vp(nlp, params, v, x, y))(vectors),
    }
    builders = {"hessian": mm.hvp_fn(nlp, params, x, y),
                "ggn": mm.ggn_vp_fn(nlp, params, x, y),
                "fisher": mm.fisher_vp_fn(nlp, params, x, y),
                "empirical": mm.empirical_fisher_vp_fn(nlp, params, x, y)}
    out.update({k + "_fn": jax.vmap(fn)(vectors) for k, fn in builders.items()})
    return out

  out = all_products(batched)
  for name in ("hessian", "ggn", "fisher", "empirical"):
    expected = vs @ ref[name].T
    assert_close(jax.vmap(flat)(out[name]), expected)
    assert_close(jax.vmap(flat)(out[name + "_fn"]), expected)


def test_flax_model_ggn_and_hessian():
  import flax.linen as flax_nn

  class MLP(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
      x = jnp.tanh(flax_nn.Dense(4, param_dtype=jnp.float64)(x))
      return flax_nn.Dense(3, param_dtype=jnp.float64)(x)

  model = MLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
  y = jnp.array([0, 1, 2, 1, 0])
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  nlp = mm.negative_log_posterior(lambda p, x: model.apply({"params": p}, x),
                                  mm.categorical_log_likelihood,
                                  mm.gaussian_log_prior, num_data=30)
  v = _vector(params, seed=5)

  @jax.jit
  def compute(params, v):
    f, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda w: nlp(unravel(w), x, y))(f)
    # J^T H_z J from explicit Jacobians; the categorical H_z = diag(p) - p p^T.
    jac = jax.jacfwd(lambda w: nlp.apply_fn(unravel(w), x))(f)
    p = jax.nn.softmax(nlp.apply_fn(params, x))
    hz = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    ggn = 6.0 * jnp.einsum("iop,ioq,iqr->pr", jac, hz, jac) + jnp.eye(f.size)
    return (flat(mm.hvp(nlp, params, v, x, y)), hess @ flat(v),
            flat(mm.ggn_vp(nlp, params, v, x, y)), ggn @ flat(v))

  hv, hv_ref, gv, gv_ref = compute(params, v)
  assert_close(hv, hv_ref)
  assert_close(gv, gv_ref)


# --- likelihoods where the GGN is not the Fisher ---------------------------------

def _hetero_log_likelihood(outputs, targets):
  """Gaussian with mean outputs[..., 0] and log-sigma outputs[..., 1]."""
  return mm.gaussian_log_likelihood(outputs[..., 0], targets,
                                    sigma=jnp.exp(outputs[..., 1]))


def _hetero_output_fisher(outputs, u):
  # Fisher of (mu, log sigma): diag(1 / sigma^2, 2).
  return jnp.stack([u[..., 0] * jnp.exp(-2 * outputs[..., 1]), 2 * u[..., 1]], -1)


def _hetero_problem():
  k = jax.random.split(jax.random.PRNGKey(7), 3)
  params = mlp_init(k[0], (3, 5, 2))
  x = jax.random.normal(k[1], (6, 3))
  y = 2.0 * jax.random.normal(k[2], (6,))
  nlp = mm.negative_log_posterior(mlp_apply, _hetero_log_likelihood, num_data=12)
  return nlp, params, x, y


def test_heteroscedastic_fisher_is_expectation_and_differs_from_ggn():
  nlp, params, x, y = _hetero_problem()
  f, unravel = ravel_pytree(params)
  v = _vector(params, seed=2)
  z = nlp.apply_fn(params, x)
  # Reference: E_t[g g^T] by Gauss-Hermite quadrature over t ~ N(mu_i, sigma_i^2),
  # exact here (g is quadratic in t), with per-example gradients.
  nodes, weights = np.polynomial.hermite_e.hermegauss(10)
  weights = weights / weights.sum()

  @jax.jit
  def expected_outer(z):
    def example(xi, zi):
      def grad_at(node):
        t = zi[0] + jnp.exp(zi[1]) * node
        return jax.grad(lambda p: -jnp.sum(nlp.log_likelihood(
            nlp.apply_fn(unravel(p), xi[None]), t[None])))(f)
      g = jax.vmap(grad_at)(nodes)
      return jnp.einsum("n,np,nq->pq", weights, g, g)
    return 2.0 * jnp.sum(jax.vmap(example)(x, z), axis=0)  # N / B = 12 / 6

  fisher = np.asarray(expected_outer(z))
  got = jax.jit(functools.partial(mm.fisher_vp, output_fisher_vp=_hetero_output_fisher),
                static_argnums=0)(nlp, params, v, x, y)
  assert_close(flat(got), fisher @ flat(v), rtol=1e-9)
  ggn = flat(_ggn(nlp, params, v, x, y))
  assert np.linalg.norm(ggn - fisher @ flat(v)) > 0.1 * np.linalg.norm(ggn)
  # Monte-Carlo Fisher with the exact Gaussian sampler agrees statistically.
  def sample(key, outputs):
    return outputs[..., 0] + jnp.exp(outputs[..., 1]) * jax.random.normal(
        key, outputs.shape[:-1])
  mc = flat(jax.jit(lambda v: mm.mc_fisher_vp(
      nlp, params, v, x, y, jax.random.PRNGKey(0), num_samples=20000,
      sample_fn=sample))(v))
  assert np.linalg.norm(mc - fisher @ flat(v)) < 0.05 * np.linalg.norm(fisher @ flat(v))


def test_student_t_fisher_closed_form_matches_monte_carlo_not_ggn():
  nu, s = 3.0, 0.7

  def log_lik(outputs, targets):
    r2 = jnp.square((targets - outputs) / s)
    return -0.5 * (nu + 1) * jnp.log1p(r2 / nu)  # up to a constant

  def output_fisher(outputs, u):  # location Fisher of Student-t
    return (nu + 1) / ((nu + 3) * s**2) * u

  def sample(key, outputs):
    # nu = 3: a normal over the root of a chi-square with 3 degrees of freedom.
    e = jax.random.normal(key, (4,) + outputs.shape)
    return outputs + s * e[0] / jnp.sqrt(jnp.sum(e[1:] ** 2, 0) / nu)

  k = jax.random.split(jax.random.PRNGKey(11), 3)
  params = mlp_init(k[0], (3, 4, 1))
  x = jax.random.normal(k[1], (6, 3))
  y = 3.0 * jax.random.normal(k[2], (6, 1))
  nlp = mm.negative_log_posterior(mlp_apply, log_lik)
  v = _vector(params)
  fisher = flat(jax.jit(functools.partial(mm.fisher_vp, output_fisher_vp=output_fisher),
                        static_argnums=0)(nlp, params, v, x, y))
  mc = flat(jax.jit(mm.mc_fisher_vp, static_argnums=(0, 6, 7))(
      nlp, params, v, x, y, jax.random.PRNGKey(2), 40000, sample))
  assert np.linalg.norm(mc - fisher) < 0.05 * np.linalg.norm(fisher)
  ggn = flat(_ggn(nlp, params, v, x, y))
  assert np.linalg.norm(ggn - fisher) > 0.2 * np.linalg.norm(fisher)


# --- Monte-Carlo Fisher ----------------------------------------------------------

def test_mc_fisher_with_observed_targets_is_empirical_fisher():
  nlp, params, x, y = problem("bernoulli", True)
  v = _vector(params)
  mc = jax.jit(lambda v: mm.mc_fisher_vp(nlp, params, v, x, y, jax.random.PRNGKey(0),
                                         num_samples=3, sample_fn=lambda key, z: y))(v)
  assert_close(flat(mc), flat(_emp(nlp, params, v, x, y)))


@pytest.mark.parametrize("kind", KINDS)
def test_mc_fisher_builtin_sampler_is_unbiased(kind):
  nlp, params, x, y = problem(kind, False)
  v = _vector(params)
  keys = jax.random.split(jax.random.PRNGKey(4), 4000)
  draws = jax.jit(jax.vmap(lambda k: flat(mm.mc_fisher_vp(nlp, params, v, x, y, k))))(keys)
  exact = flat(_fisher(nlp, params, v, x, y))
  mean = draws.mean(0)
  stderr = draws.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-12)
  assert np.max(stderr) > 0  # samples really vary


# --- recognition of the built-in likelihoods -------------------------------------

def test_builtin_likelihood_recognition():
  find = fisher_lib.builtin_likelihood
  assert find(mm.gaussian_log_likelihood) == ("gaussian", {})
  assert find(functools.partial(mm.gaussian_log_likelihood, sigma=0.5)) == (
      "gaussian", {"sigma": 0.5})
  assert find(functools.partial(mm.categorical_log_likelihood))[0] == "categorical"
  assert find(mm.soft_categorical_log_likelihood)[0] == "soft_categorical"
  assert find(lambda z, t: mm.gaussian_log_likelihood(z, t, 0.5)) is None
  assert find(functools.partial(mm.gaussian_log_likelihood, targets=0.0)) is None
  assert find(functools.partial(mm.bernoulli_log_likelihood, sigma=2.0)) is None


def test_partial_sigma_and_soft_categorical_fisher():
  nlp, params, x, y = problem("gaussian", False)
  v = _vector(params)
  scalar = mm.negative_log_posterior(
      mlp_apply, functools.partial(mm.gaussian_log_likelihood, sigma=0.5))
  f, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda w: mlp_apply(unravel(w), x))(f)
  ref = jnp.einsum("iop,ioq->pq", jac, jac) / 0.25
  assert_close(flat(_fisher(scalar, params, v, x, y)), ref @ flat(v))
  # Soft targets: the categorical Fisher, which equals the soft GGN.
  nlp_c, params_c, x_c, y_c = problem("categorical", False)
  soft = mm.negative_log_posterior(mlp_apply, mm.soft_categorical_log_likelihood)
  probs = jnp.full((x_c.shape[0], 3), 1.0 / 3.0)
  vc = _vector(params_c)
  assert_close(flat(_fisher(soft, params_c, vc, x_c, probs)),
               flat(_fisher(nlp_c, params_c, vc, x_c, y_c)))
  assert_close(flat(_ggn(soft, params_c, vc, x_c, probs)),
               flat(_fisher(nlp_c, params_c, vc, x_c, y_c)))


# --- bad input -------------------------------------------------------------------

def test_vector_unlike_params_raises_naming_both():
  nlp, params, x, y = problem("gaussian", False)
  bad_tree = {"layer0": params["layer0"]}
  for product in (mm.ggn_vp, mm.fisher_vp, mm.empirical_fisher_vp):
    with pytest.raises(ValueError, match="vector tree structure .* differs from params"):
      product(nlp, params, bad_tree, x, y)
  bad_shape = jax.tree_util.tree_map(lambda a: a, params)
  bad_shape["layer1"]["b"] = jnp.zeros(7)
  with pytest.raises(ValueError, match=r"leaf shapes .*\(7,\).* differ from params"):
    mm.hvp(nlp, params, bad_shape, x, y)
  with pytest.raises(ValueError, match="vector"):
    mm.mc_fisher_vp(nlp, params, bad_shape, x, y, jax.random.PRNGKey(0))


def test_unknown_likelihood_and_options_raise():
  nlp, params, x, y = _hetero_problem()
  v = _vector(params)
  with pytest.raises(ValueError, match="output_fisher_vp=.*mc_fisher_vp"):
    mm.fisher_vp(nlp, params, v, x, y)
  with pytest.raises(ValueError, match="sample_fn"):
    mm.mc_fisher_vp(nlp, params, v, x, y, jax.random.PRNGKey(0))
  with pytest.raises(TypeError, match="output_fisher_vp must be callable"):
    mm.fisher_vp(nlp, params, v, x, y, output_fisher_vp="exact")
  g_nlp, g_params, gx, gy = problem("gaussian", False)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
    mm.mc_fisher_vp(g_nlp, g_params, v, gx, gy, jax.random.PRNGKey(0), num_samples=0)
  with pytest.raises(TypeError, match="NegativeLogPosterior"):
    mm.ggn_vp(lambda p, x, y: 0.0, params, v, x, y)
  wrong_sigma = mm.negative_log_posterior(
      mlp_apply, functools.partial(mm.gaussian_log_likelihood, sigma=jnp.ones(3)))
  with pytest.raises(ValueError, match=r"sigma shape \(3,\) does not broadcast"):
    mm.fisher_vp(wrong_sigma, g_params, _vector(g_params), gx, gy)


def test_builtin_output_fisher_is_the_closed_form():
  """Bernoulli p(1-p) u and categorical (diag(p) - p p^T) u, in numpy."""
  from mlmap import _fisher
  rng = np.random.default_rng(3)
  z, u = rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4))
  sig = 1.0 / (1.0 + np.exp(-z))
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  fisher = np.eye(4)[None] * p[:, :, None] - p[:, :, None] * p[:, None, :]
  cat = np.einsum("bkl,bl->bk", fisher, u)
  for kind, ref in (("bernoulli", sig * (1 - sig) * u), ("categorical", cat),
                    ("soft_categorical", cat)):
    got = jax.jit(_fisher.builtin_output_fisher_vp(kind, {}))(z, u)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
  assert _fisher.log_partition("gaussian") is None


# --- issue 10: structured outputs, non-floating leaves, model state --------------

@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_structured_outputs_products_equal_references(kind):
  """empirical_fisher_vp (and the MC Fisher) on (mean, extra head) outputs."""
  nlp, params, x, y = structured_problem(kind)
  ref = structured_references(kind)
  ofvp = structured_output_fisher(kind)
  v = _vector(params, seed=4)

  @jax.jit
  def products(v):
    emp_fn = mm.empirical_fisher_vp_fn(nlp, params, x, y)
    return {
        "hessian": mm.hvp(nlp, params, v, x, y),
        "ggn": mm.ggn_vp(nlp, params, v, x, y),
        "fisher": mm.fisher_vp(nlp, params, v, x, y, output_fisher_vp=ofvp),
        "empirical": mm.empirical_fisher_vp(nlp, params, v, x, y),
        "empirical_fn": emp_fn(v),
        # Observed targets as the "samples": the MC Fisher is then the empirical one.
        "mc_observed": mm.mc_fisher_vp(nlp, params, v, x, y, jax.random.PRNGKey(0),
                                       num_samples=2, sample_fn=lambda key, z: y),
    }

  got = products(v)
  vf = flat(v)
  for name in ("hessian", "ggn", "fisher", "empirical"):
    assert_close(flat(got[name]), ref[name] @ vf)
  assert_close(flat(got["empirical_fn"]), ref["empirical"] @ vf)
  assert_close(flat(got["mc_observed"]), ref["empirical"] @ vf)
  # The heteroscedastic head makes GGN, Fisher and empirical Fisher differ.
  assert not np.allclose(ref["ggn"], ref["empirical"], rtol=1e-2)
  assert not np.allclose(ref["ggn"], ref["fisher"], rtol=1e-2)


_PRODUCTS = {
    "hvp": lambda nlp, p, v, x, y: mm.hvp(nlp, p, v, x, y),
    "hvp_fn": lambda nlp, p, v, x, y: mm.hvp_fn(nlp, p, x, y),
    "ggn_vp": mm.ggn_vp,
    "ggn_vp_fn": lambda nlp, p, v, x, y: mm.ggn_vp_fn(nlp, p, x, y),
    "fisher_vp": mm.fisher_vp,
    "fisher_vp_fn": lambda nlp, p, v, x, y: mm.fisher_vp_fn(nlp, p, x, y),
    "empirical_fisher_vp": mm.empirical_fisher_vp,
    "empirical_fisher_vp_fn": lambda nlp, p, v, x, y: mm.empirical_fisher_vp_fn(nlp, p, x, y),
    "mc_fisher_vp": lambda nlp, p, v, x, y: mm.mc_fisher_vp(nlp, p, v, x, y,
                                                            jax.random.PRNGKey(0)),
}


@pytest.mark.parametrize("name", sorted(_PRODUCTS))
def test_non_floating_params_leaf_is_named(name):
  """Item 3: an int step counter / bool mask in params is named, eager and under jit."""
  nlp, params, x, y = problem("gaussian", True)
  bad = with_step_counter(params)
  product = _PRODUCTS[name]
  pattern = rf"{name}: params must have floating leaves only.*'mask' \(bool\), 'step' \(int"
  with pytest.raises(TypeError, match=pattern):
    product(nlp, bad, bad, x, y)
  with pytest.raises(TypeError, match=pattern):
    jax.jit(lambda p, x: product(nlp, p, p, x, y))(bad, x)


@pytest.mark.parametrize("name", sorted(set(_PRODUCTS) - {"hvp", "hvp_fn"}))
@pytest.mark.parametrize("how", ["mutable", "variables"])
def test_flax_model_state_is_refused_naming_collection(name, how):
  """A BatchNorm model with mutable=["batch_stats"], or all variables as params."""
  model, variables, x, y = bn_problem()
  nlp, params = bn_nlps(model, variables)[how]
  with pytest.raises(TypeError, match=rf"{name}: .*'batch_stats'.*has_state=True"):
    _PRODUCTS[name](nlp, params, params, x, y)
  with pytest.raises(TypeError, match=rf"{name}: .*'batch_stats'"):
    jax.jit(lambda p: _PRODUCTS[name](nlp, p, p, x, y))(params)


def test_builder_matvec_checks_vector_and_mc_key():
  nlp, params, x, y = problem("bernoulli", False)
  bad_shape = jax.tree_util.tree_map(jnp.zeros_like, params)
  bad_shape["layer0"]["b"] = jnp.zeros(9)
  for builder in (mm.ggn_vp_fn, mm.fisher_vp_fn, mm.empirical_fisher_vp_fn):
    with pytest.raises(ValueError, match=r"vector leaf shapes .*\(9,\).* differ"):
      builder(nlp, params, x, y)(bad_shape)
  with pytest.raises(ValueError, match="vector tree structure"):
    mm.hvp_fn(nlp, params, x, y)([1.0])
  for key in (0, jnp.zeros(3, jnp.uint32), jnp.zeros(2)):
    with pytest.raises(TypeError, match="mc_fisher_vp: key must be a jax.random key"):
      mm.mc_fisher_vp(nlp, params, params, x, y, key)
  # Typed keys are accepted.
  out = mm.mc_fisher_vp(nlp, params, params, x, y, jax.random.key(1))
  assert np.all(np.isfinite(flat(out)))
