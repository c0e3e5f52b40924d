"""maximize_evidence on structured posteriors over data loaders (float64).

References: sklearn's BayesianRidge (MacKay's updates on the same linear-Gaussian
model), the dense ``maximize_evidence`` path, and the structured evidence's own
exact data-partition invariance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlmap as mm
import _structured_refs as R


def _make_nlp(hyper, num_data=None):
  """A linear-Gaussian model ``x @ W`` with ``W`` a (10, 1) matrix: one Kronecker layer."""
  return mm.negative_log_posterior(
      lambda w, x: (x @ w["W"])[:, 0],
      functools.partial(mm.gaussian_log_likelihood, sigma=hyper["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=hyper["prior_sigma"]),
      num_data=num_data)


@pytest.mark.parametrize("structure, extra", [("kron", {}), ("lowrank", {"rank": 10}),
                                              pytest.param("full", {}, marks=pytest.mark.slow)])
def test_structured_equals_bayesian_ridge_where_exact(diabetes, structure, extra):
  """K-FAC is exact for one linear layer under a Gaussian likelihood, low rank with
  rank = P is exact: the fixed point then lands on sklearn's BayesianRidge, with
  Hessian-free refits (nothing dense), as the dense path does."""
  x, y, ridge = diabetes
  make_nlp = functools.partial(_make_nlp, num_data=x.shape[0])
  hyper, w, info = mm.maximize_evidence(
      make_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, {"W": jnp.zeros((10, 1))}, x, y,
      structure=structure, fit_steps=3, num_iterations=300, tol=1e-10,
      data=None, **extra)
  np.testing.assert_allclose(1 / hyper["sigma"] ** 2, ridge.alpha_, rtol=1e-7)
  np.testing.assert_allclose(1 / hyper["prior_sigma"] ** 2, ridge.lambda_, rtol=1e-7)
  np.testing.assert_allclose(w["W"][:, 0], ridge.coef_, rtol=1e-6, atol=1e-9)
  assert bool(info.converged) and bool(jnp.all(info.valid_update))
  assert info.log_evidence.shape == (info.num_iterations,)
  np.testing.assert_allclose(info.log_evidence[-1], mm.log_evidence(
      make_nlp(hyper), w, x, y), rtol=1e-9)
  eig = np.linalg.eigvalsh(np.asarray(x.T @ x)) / hyper["sigma"] ** 2
  alpha = 1 / hyper["prior_sigma"] ** 2
  np.testing.assert_allclose(info.gamma[-1], np.sum(eig / (eig + alpha)), rtol=1e-8)


def test_loader_batches_give_the_same_fixed_point(diabetes):
  """At fixed weights (``fit_steps=0``, the weights at BayesianRidge's MAP) the
  hyperparameter updates read only the data term summed over the batches: 1 and 4
  batches (uneven) give the same hyperparameters and evidence trace to 1e-10; the
  diagonal structure is used, with a dense refusal at 1 kB that never fires."""
  x, y, ridge = diabetes
  make_nlp = functools.partial(_make_nlp, num_data=x.shape[0])
  w0 = {"W": jnp.asarray(ridge.coef_)[:, None]}
  cuts = [0, 100, 250, 300, x.shape[0]]
  runs = []
  for data in ([(x, y)], [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]):
    runs.append(mm.maximize_evidence(
        make_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, w0, data=data, structure="diag",
        fit_steps=0, num_iterations=4, tol=0.0, map_tol=None, max_bytes=1000))
  (h1, _, i1), (h4, _, i4) = runs
  assert i1.num_iterations == i4.num_iterations == 4
  for k in ("sigma", "prior_sigma"):
    np.testing.assert_allclose(h4[k], h1[k], rtol=1e-10)
  np.testing.assert_allclose(i4.log_evidence, i1.log_evidence, rtol=1e-10)


def test_loader_and_one_batch_refits_converge_to_the_same_hyperparameters(diabetes,
                                                                          mackay_ridge):
  """With refits: 4 equal minibatches through ``optax.MultiSteps(adam, 4)`` (the
  mean of the 4 minibatch gradients is the full-batch gradient, since each
  minibatch term is scaled to ``num_data``) and one batch through plain Adam take
  the same weight steps (to rounding), so both runs converge to the same
  hyperparameters (1e-8),
  and to sklearn's BayesianRidge on the same 440 examples (1e-5)."""
  x, y, _ = diabetes
  x, y = x[:440], y[:440]
  ridge = mackay_ridge(x, y)
  make_nlp = functools.partial(_make_nlp, num_data=440)
  adam = lambda nlp: optax.adam(optax.exponential_decay(0.05, 300, 0.5))  # noqa: E731
  runs = []
  for data, tx, steps in (([(x, y)], adam, 10),
                          ([(x[i:i + 110], y[i:i + 110]) for i in range(0, 440, 110)],
                           lambda nlp: optax.MultiSteps(adam(nlp), 4), 40)):
    runs.append(mm.maximize_evidence(
        make_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, {"W": jnp.zeros((10, 1))},
        data=data, structure="kron", make_optimizer=tx, fit_steps=steps,
        num_iterations=150, tol=0.0, map_tol=None, max_bytes=1000))
  (h1, w1, _), (h4, w4, _) = runs
  for k in ("sigma", "prior_sigma"):
    np.testing.assert_allclose(h4[k], h1[k], rtol=1e-8)
  # Adam divides by sqrt(v): float64 rounding of the summed gradients shows at 1e-8.
  np.testing.assert_allclose(w4["W"], w1["W"], rtol=0, atol=1e-7)
  np.testing.assert_allclose(1 / h4["sigma"] ** 2, ridge.alpha_, rtol=1e-5)
  np.testing.assert_allclose(1 / h4["prior_sigma"] ** 2, ridge.lambda_, rtol=1e-5)


# Slow (per-layer scales, kron over 3 batches, Hessian-free refits). Default
# coverage of the same property on an MLP:
# test_flax_models_fixed_point_is_the_evidence_maximum[nnx].
@pytest.mark.slow
def test_per_layer_fixed_point_is_the_evidence_maximum_on_an_mlp():
  """A 2-layer tanh MLP, one prior scale per layer, kron over 3 batches.

  With minibatch Hessian-free refits the evidence rises. At fixed weights
  (``fit_steps=0``, noise fixed) ``post.optimize_prior`` 's Newton maximum of the
  evidence in the per-layer ``log sigma`` is a fixed point of MacKay's per-layer
  map (one step leaves it within 1e-7), and a point that is not one moves. A
  last-layer subset leaves the first layer's scale untouched."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(60, 3)))
  y = jnp.asarray(np.sin(x @ np.array([1.0, -0.5, 0.3])) + 0.1 * rng.normal(size=60))

  def apply(p, x):
    return (jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"])[:, 0]

  def make_nlp(h, noise=None):
    sigma = h["sigma"] if noise is None else noise
    return mm.negative_log_posterior(
        apply, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
        functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]), num_data=60)

  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"l1": {"w": 0.5 * jax.random.normal(k1, (3, 8)), "b": jnp.zeros(8)},
            "l2": {"w": 0.5 * jax.random.normal(k2, (8, 1)), "b": jnp.zeros(1)}}
  prior0 = {"l1": 1.0, "l2": 1.0}
  data = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
  _, w, info = mm.maximize_evidence(make_nlp, {"sigma": 0.5, "prior_sigma": prior0},
                                    params, data=data, structure="kron", fit_steps=6,
                                    num_iterations=4, tol=0.0, map_tol=None)
  assert float(info.log_evidence[-1]) > float(info.log_evidence[0])
  fixed = functools.partial(make_nlp, noise=0.2)
  best = mm.laplace(fixed({"prior_sigma": prior0}), w, data=data, structure="kron",
                    map_tol=None).optimize_prior(init=prior0)
  assert bool(best.optimize_info.converged)
  start = {k: float(v) for k, v in best.prior_sigma.items()}
  # MacKay's map leaves the evidence's stationary point where it is (one step
  # from Newton's optimum), and moves away from a point that is not one.
  hyper, _, _ = mm.maximize_evidence(fixed, {"prior_sigma": start}, w, data=data,
                                     structure="kron", fit_steps=0, num_iterations=2,
                                     tol=0.0, map_tol=None)
  for k in ("l1", "l2"):
    np.testing.assert_allclose(hyper["prior_sigma"][k], start[k], rtol=1e-7)
  moved, _, _ = mm.maximize_evidence(fixed, {"prior_sigma": prior0}, w, data=data,
                                     structure="kron", fit_steps=0, num_iterations=2,
                                     tol=0.0, map_tol=None)
  assert abs(float(moved["prior_sigma"]["l2"]) / prior0["l2"] - 1) > 1e-3
  sub = mm.last_layer_subset(params)
  h_sub, _, _ = mm.maximize_evidence(fixed, {"prior_sigma": prior0}, w, data=data,
                                     structure="kron", subset=sub, fit_steps=0,
                                     num_iterations=3, tol=0.0, map_tol=None)
  assert float(h_sub["prior_sigma"]["l1"]) == 1.0
  assert float(h_sub["prior_sigma"]["l2"]) != 1.0


def test_structured_refuses_what_it_cannot_do(diabetes):
  x, y, _ = diabetes
  make_nlp = functools.partial(_make_nlp, num_data=x.shape[0])
  h = {"sigma": 1.0, "prior_sigma": 1.0}
  w = {"W": jnp.zeros((10, 1))}
  with pytest.raises(ValueError, match="total_derivative=True .* dense only"):
    mm.maximize_evidence(make_nlp, h, w, x, y, structure="kron", total_derivative=True)
  with pytest.raises(ValueError, match="needs prior_key"):
    mm.maximize_evidence(make_nlp, h, w, x, y, structure="diag", prior_key=None,
                         noise_key=None)
  with pytest.raises(ValueError, match=r"hyper entries \['extra'\]"):
    mm.maximize_evidence(make_nlp, {**h, "extra": 2.0}, w, x, y, structure="diag")
  with pytest.raises(ValueError, match="either data= or inputs"):
    mm.maximize_evidence(make_nlp, h, w, x, y, data=[(x, y)], structure="diag")
  with pytest.raises(TypeError, match="one-shot iterator"):
    mm.maximize_evidence(make_nlp, h, w, data=iter([(x, y)]), structure="diag")


@pytest.mark.parametrize("kind", ["nnx", pytest.param("linen", marks=pytest.mark.slow)])
def test_flax_models_fixed_point_is_the_evidence_maximum(kind):
  """flax NNX (``nnx.split`` / ``nnx.merge``, pure-dict state) and linen MLPs:
  two minibatch refit steps run on the framework's parameter tree, and at fixed
  weights ``optimize_prior`` 's maximum is a fixed point of MacKay's map (1e-7)."""
  apply_fn, params, _ = R.make_model(kind, seed=4)
  x, y = R.regression_data(4)
  n = x.shape[0]

  def make_nlp(h):
    return mm.negative_log_posterior(
        apply_fn, functools.partial(mm.gaussian_log_likelihood, sigma=0.3),
        functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]), num_data=n)

  data = [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]
  _, w, info = mm.maximize_evidence(make_nlp, {"prior_sigma": 1.0}, params, data=data,
                                    structure="kron", fit_steps=2, num_iterations=2,
                                    tol=0.0, map_tol=None)
  assert jax.tree_util.tree_structure(w) == jax.tree_util.tree_structure(params)
  assert bool(jnp.all(jnp.isfinite(info.log_evidence)))
  best = mm.laplace(make_nlp({"prior_sigma": 1.0}), w, data=data, structure="kron",
                    map_tol=None).optimize_prior()
  start = float(best.prior_sigma)
  hyper, _, _ = mm.maximize_evidence(make_nlp, {"prior_sigma": start}, w, data=data,
                                     structure="kron", fit_steps=0, num_iterations=2,
                                     tol=0.0, map_tol=None)
  np.testing.assert_allclose(hyper["prior_sigma"], start, rtol=1e-7)
