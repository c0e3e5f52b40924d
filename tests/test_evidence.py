"""Tests of mlmap.evidence: maximize_evidence (MacKay fixed point, gradient ascent)."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import mlmap as mm


def _make_linear_nlp(hyper, num_data=None):
  return mm.negative_log_posterior(
      lambda w, x: x @ w,
      functools.partial(mm.gaussian_log_likelihood, sigma=hyper["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=hyper["prior_sigma"]),
      num_data=num_data)


@pytest.mark.parametrize("mode", ["fixed_point", "gradient"])
def test_recovers_sklearn_bayesian_ridge_on_diabetes(diabetes, mode):
  x, y, ridge = diabetes
  keys = {} if mode == "fixed_point" else {"prior_key": None, "noise_key": None}
  hyper, w, info = mm.maximize_evidence(
      _make_linear_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, jnp.zeros(10), x, y,
      fit_steps=2, num_iterations=600, tol=1e-12, **keys)
  rtol = 1e-8 if mode == "fixed_point" else 1e-4
  np.testing.assert_allclose(1 / hyper["sigma"] ** 2, ridge.alpha_, rtol=rtol)
  np.testing.assert_allclose(1 / hyper["prior_sigma"] ** 2, ridge.lambda_, rtol=rtol)
  np.testing.assert_allclose(w, ridge.coef_, rtol=10 * rtol, atol=1e-10)
  assert bool(info.converged) and bool(jnp.all(info.valid_update))
  assert info.log_evidence.shape == (info.num_iterations,)
  assert info.hyper["sigma"].shape == (info.num_iterations,)
  # The evidence rises to its maximum; its last value is the exact evidence.
  assert float(info.log_evidence[-1]) >= float(jnp.max(info.log_evidence)) - 1e-9
  np.testing.assert_allclose(
      info.log_evidence[-1],
      mm.log_evidence(_make_linear_nlp(hyper), w, x, y), rtol=1e-12)
  # gamma = sum_i lambda_i / (lambda_i + alpha) over the data-curvature spectrum.
  eig = np.linalg.eigvalsh(x.T @ x) / hyper["sigma"] ** 2
  alpha = 1 / hyper["prior_sigma"] ** 2
  np.testing.assert_allclose(info.gamma[-1], np.sum(eig / (eig + alpha)), rtol=1e-8)


def test_minibatch_scaling_counts_the_batch_n_over_b_times(diabetes):
  x, y, _ = diabetes
  x, y = x[:100], y[:100]
  run = functools.partial(mm.maximize_evidence, hyper={"sigma": 1.0, "prior_sigma": 1.0},
                          params=jnp.zeros(10), fit_steps=2, num_iterations=300, tol=1e-12)
  h_scaled, _, _ = run(lambda h: _make_linear_nlp(h, num_data=300), inputs=x, targets=y)
  h_full, _, _ = run(_make_linear_nlp, inputs=np.tile(x, (3, 1)), targets=np.tile(y, 3))
  h_plain, _, _ = run(_make_linear_nlp, inputs=x, targets=y)
  for k in ("sigma", "prior_sigma"):
    np.testing.assert_allclose(h_scaled[k], h_full[k], rtol=1e-8)
  assert abs(float(h_scaled["sigma"] - h_plain["sigma"])) > 1e-3


def _mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"])[:, 0]


def _make_mlp_nlp(hyper):
  return mm.negative_log_posterior(
      _mlp, functools.partial(mm.gaussian_log_likelihood, sigma=hyper["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=hyper["prior_sigma"]))


def _sine_mlp_problem(seed, n, hidden, noise):
  """Noisy sin(2x) on [-2, 2] and a 1-hidden-1 tanh MLP initialization."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-2, 2, size=(n, 1))
  y = np.sin(2 * x[:, 0]) + noise * rng.normal(size=n)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"l1": {"w": jax.random.normal(k1, (1, hidden)), "b": jnp.zeros(hidden)},
            "l2": {"w": jax.random.normal(k2, (hidden, 1)) / 3, "b": jnp.zeros(1)}}
  return x, y, params


def test_mlp_per_layer_prior_scales_reach_a_stationary_point_of_the_evidence():
  x, y, params = _sine_mlp_problem(seed=0, n=60, hidden=8, noise=0.1)
  hyper0 = {"sigma": 0.5, "prior_sigma": {"l1": 1.0, "l2": 1.0}}
  hyper, w, info = mm.maximize_evidence(_make_mlp_nlp, hyper0, params, x, y,
                                        num_iterations=100, fit_steps=10, tol=1e-10)
  assert bool(info.converged) and bool(jnp.all(info.valid_update))
  assert float(info.newton_decrement[-1]) < 1e-12
  assert float(info.log_evidence[-1]) > float(info.log_evidence[0]) + 50
  assert 0 < float(info.gamma[-1]) < 25
  # MacKay's fixed point is where the evidence's gradient (at fixed params,
  # by autodiff through the Cholesky log-det) vanishes.
  grad = jax.jit(jax.grad(lambda lh: mm.log_evidence(
      _make_mlp_nlp(jax.tree_util.tree_map(jnp.exp, lh)), w, x, y)))(
          jax.tree_util.tree_map(jnp.log, hyper))
  for g in jax.tree_util.tree_leaves(grad):
    assert abs(float(g)) < 1e-6
  np.testing.assert_allclose(hyper["sigma"], 0.1, rtol=0.2)  # the true noise


def test_bad_hyperparameters_raise_or_flag(diabetes):
  x, y, _ = diabetes
  w0 = jnp.zeros(10)
  with pytest.raises(ValueError, match=r"hyper\['prior_sigma'\] must be > 0, got -1.0"):
    mm.maximize_evidence(_make_linear_nlp, {"sigma": 1.0, "prior_sigma": -1.0}, w0, x, y)
  with pytest.raises(ValueError, match=r"hyper\['sigma'\] must be > 0"):
    mm.maximize_evidence(_make_linear_nlp, {"sigma": 0.0, "prior_sigma": 1.0}, w0, x, y)
  with pytest.raises(TypeError, match="hyper must be a dict"):
    mm.maximize_evidence(_make_linear_nlp, (1.0, 1.0), w0, x, y)
  with pytest.raises(ValueError, match="noise scale .* must be a scalar"):
    mm.maximize_evidence(_make_linear_nlp, {"sigma": jnp.ones(2), "prior_sigma": 1.0},
                         w0, x, y)
  with pytest.raises(ValueError, match="not a prefix of params"):
    mm.maximize_evidence(_make_linear_nlp, {"sigma": 1.0, "prior_sigma": {"a": 1.0}},
                         w0, x, y)

  # Traced hyperparameters cannot raise: a negative one gives a NaN-free
  # result with every update flagged invalid.
  @jax.jit
  def traced(prior_sigma):
    return mm.maximize_evidence(_make_linear_nlp, {"sigma": 1.0, "prior_sigma": prior_sigma},
                                w0, x, y, num_iterations=3, fit_steps=1)
  hyper, w, info = traced(-1.0)
  for leaf in jax.tree_util.tree_leaves((hyper, w, info.log_evidence, info.gamma)):
    assert not np.any(np.isnan(leaf))
  assert not np.any(info.valid_update) and not bool(info.converged)
  hyper, w, info = traced(1.0)
  assert np.all(info.valid_update) and float(info.log_evidence[-1]) > -np.inf


def test_unreached_map_warns(diabetes):
  x, y, _ = diabetes
  with pytest.warns(UserWarning, match="far from a MAP"):
    _, _, info = mm.maximize_evidence(
        _make_linear_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, jnp.zeros(10), x, y,
        num_iterations=2, fit_steps=0)
  assert not bool(info.converged)


@pytest.mark.slow  # long; CI runs -m slow too
def test_total_derivative_matches_finite_differences_along_the_map_path():
  x, y, params = _sine_mlp_problem(seed=1, n=40, hidden=6, noise=0.2)
  hyper = {"sigma": 0.3, "prior_sigma": 0.8}

  @jax.jit
  def refit_evidence(log_h, p):
    nlp = _make_mlp_nlp(jax.tree_util.tree_map(jnp.exp, log_h))
    tx = mm.newton(nlp)

    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(nlp)(p, x, y), s, p, batch=(x, y))
      return (jax.tree_util.tree_map(jnp.add, p, u), s), None
    p = jax.lax.scan(body, (p, tx.init(p)), None, length=60)[0][0]
    return mm.log_evidence(nlp, p, x, y, map_tol=None), p

  log_h = {k: jnp.log(v) for k, v in hyper.items()}
  value, w = refit_evidence(log_h, params)
  grad_f = jax.jit(lambda w, total: mm.log_evidence_grad(
      _make_mlp_nlp, hyper, w, x, y, total_derivative=total), static_argnums=1)
  v_total, total = grad_f(w, True)
  _, partial = grad_f(w, False)
  np.testing.assert_allclose(v_total, value, rtol=1e-12)
  eps = 1e-4
  for k in hyper:
    up = refit_evidence({**log_h, k: log_h[k] + eps}, w)[0]
    down = refit_evidence({**log_h, k: log_h[k] - eps}, w)[0]
    fd = (up - down) / (2 * eps)
    np.testing.assert_allclose(total[k], fd, rtol=1e-5, atol=1e-5)
    # The fixed-w partial derivative is a different number for a network.
    assert abs(float(partial[k] - fd)) > 0.1


def test_total_derivative_adds_nothing_for_a_linear_model(diabetes):
  x, y, ridge = diabetes
  hyper = {"sigma": 0.8, "prior_sigma": 0.5}
  prec = x.T @ x / 0.8**2 + np.eye(10) / 0.5**2
  w = jnp.asarray(np.linalg.solve(prec, x.T @ y / 0.8**2))
  grad_f = jax.jit(lambda w, total: mm.log_evidence_grad(
      _make_linear_nlp, hyper, w, x, y, total_derivative=total), static_argnums=1)
  (_, total), (_, partial) = grad_f(w, True), grad_f(w, False)
  for k in hyper:
    np.testing.assert_allclose(total[k], partial[k], rtol=1e-8, atol=1e-8)


def test_outer_iterations_do_not_retrace(diabetes):
  x, y, _ = diabetes
  calls = []

  def counting_make_nlp(h):
    calls.append(1)
    return _make_linear_nlp(h)
  counts = []
  for iterations in (2, 6):
    calls.clear()
    _, _, info = mm.maximize_evidence(counting_make_nlp, {"sigma": 1.0, "prior_sigma": 1.0},
                                      jnp.zeros(10), x[:50], y[:50], num_iterations=iterations,
                                      fit_steps=1, tol=0.0, map_tol=None)
    assert info.num_iterations == iterations
    counts.append(len(calls))
  assert counts[0] == counts[1]  # make_nlp runs at trace time only, not per iteration


# --- issue 10: key names, improper priors, max_bytes ---------------------------------

def _make_precision_nlp(hyper):
  return mm.negative_log_posterior(
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=1.0),
      functools.partial(mm.gaussian_log_prior, sigma=hyper["prior_precision"] ** -0.5))


def test_unknown_prior_or_noise_key_raises_listing_the_keys(diabetes):
  x, y, _ = diabetes
  w0 = jnp.zeros(10)
  # The call: "prior_precision" would silently have been ascended by Adam.
  with pytest.raises(ValueError, match=r"prior_key='prior_sigma' is not a key of hyper "
                                       r"\(keys \['prior_precision'\]\).*prior_key=None"):
    mm.maximize_evidence(_make_precision_nlp, {"prior_precision": 1.0}, w0, x, y)
  with pytest.raises(ValueError, match=r"noise_key='sigma' is not a key of hyper .*"
                                       r"\['noise'\] would silently be optimized"):
    mm.maximize_evidence(
        lambda h: _make_linear_nlp({"sigma": h["noise"], "prior_sigma": h["prior_sigma"]}),
        {"noise": 1.0, "prior_sigma": 1.0}, w0, x, y)
  # Opting in explicitly runs gradient ascent; a prior-only hyper needs no noise key.
  _, _, info = mm.maximize_evidence(_make_precision_nlp, {"prior_precision": 1.0}, w0,
                                    x, y, prior_key=None, num_iterations=2, fit_steps=1,
                                    map_tol=None)
  assert info.num_iterations == 2
  hyper, _, _ = mm.maximize_evidence(
      lambda h: _make_linear_nlp({"sigma": 1.0, **h}), {"prior_sigma": 1.0}, w0, x, y,
      num_iterations=2, fit_steps=1, map_tol=None)
  assert float(hyper["prior_sigma"]) != 1.0


def test_improper_priors_and_max_bytes_are_refused(diabetes):
  x, y, _ = diabetes
  w0 = {"a": jnp.zeros(5), "b": jnp.zeros(5)}

  def make_nlp(h):
    return mm.negative_log_posterior(
        lambda p, x: x[:, :5] @ p["a"] + x[:, 5:] @ p["b"],
        functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]),
        functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]))
  hyper = {"sigma": 1.0, "prior_sigma": {"a": 1.0, "b": None}}
  with pytest.raises(ValueError, match=r"maximize_evidence: .*unpenalized \('b'\).*proper"):
    mm.maximize_evidence(make_nlp, hyper, w0, x, y)
  with pytest.raises(ValueError, match=r"log_evidence_grad: .*unpenalized \('b'\)"):
    mm.log_evidence_grad(make_nlp, hyper, w0, x, y)
  flat = lambda h: mm.negative_log_posterior(  # noqa: E731
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]))
  with pytest.raises(ValueError, match=r"nlp.log_prior is None.*needs a proper prior"):
    mm.maximize_evidence(flat, {"sigma": 1.0}, jnp.zeros(10), x, y, prior_key=None)
  h = {"sigma": 1.0, "prior_sigma": 1.0}
  for call, name in ((mm.maximize_evidence, "maximize_evidence"),
                     (mm.log_evidence_grad, "log_evidence_grad")):
    with pytest.raises(ValueError, match=rf"^{name}: the dense \(10, 10\).*max_bytes= to {name}"):
      call(_make_linear_nlp, h, jnp.zeros(10), x, y, max_bytes=799)
  with pytest.raises(TypeError, match=r"maximize_evidence: params .*'n' \(int"):
    mm.maximize_evidence(lambda h: _make_linear_nlp(h), h, {"w": jnp.zeros(10),
                                                            "n": jnp.asarray(1)}, x, y)
