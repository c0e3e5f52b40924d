"""fit_evidence: online evidence maximization (float64).

References: sklearn's BayesianRidge (where K-FAC is exact), the dense
``maximize_evidence`` path on a small digits MLP, a dense ``jax`` log evidence
for the ``O(P)`` moved posterior, and an uninterrupted run for the resume."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import mlmap as mm
from mlmap import _evidence_terms as T
from mlmap import _precisions

import _structured_refs as R


def _linear_nlp(h, num_data):
  return mm.negative_log_posterior(
      lambda w, x: (x @ w["W"])[:, 0],
      functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]), num_data=num_data)


def test_online_kron_equals_bayesian_ridge(diabetes):
  """One linear Gaussian layer (K-FAC exact), Newton weight steps (each one the
  exact MAP), Adam with a decaying rate on the log prior scale and log noise: the
  online fixed point is sklearn's BayesianRidge; nothing dense (max_bytes=1 kB)."""
  x, y, ridge = diabetes
  make_nlp = functools.partial(_linear_nlp, num_data=x.shape[0])
  r = mm.fit_evidence(make_nlp, {"sigma": 1.0, "prior_sigma": 1.0},
                      {"W": jnp.zeros((10, 1))}, lambda nlp: mm.newton(nlp), (x, y),
                      epochs=30, hyper_steps=50, noise_key="sigma", max_bytes=1000,
                      hyper_tx=optax.adam(optax.exponential_decay(0.1, 100, 0.5)))
  np.testing.assert_allclose(1 / r.hyper["sigma"] ** 2, ridge.alpha_, rtol=1e-8)
  np.testing.assert_allclose(1 / r.hyper["prior_sigma"] ** 2, ridge.lambda_, rtol=1e-8)
  np.testing.assert_allclose(r.params["W"][:, 0], ridge.coef_, rtol=1e-7, atol=1e-10)
  assert r.history["hyper_epoch"] == list(range(1, 31)) and r.step == 30
  assert r.history["log_evidence"][-1] >= r.history["log_evidence_before"][-1] - 1e-9
  np.testing.assert_allclose(r.history["log_evidence"][-1], mm.log_evidence(
      make_nlp(r.hyper), r.params, x, y), rtol=1e-10)
  np.testing.assert_allclose(r.posterior.log_evidence(), r.history["log_evidence"][-1],
                             rtol=1e-10)


def test_moved_posterior_is_the_rebuilt_one(diabetes):
  """The posterior built at (1, 1) and moved to other prior and noise scales in O(P)
  has the evidence, gradient norm and Newton decrement of one rebuilt there."""
  x, y, _ = diabetes
  make_nlp = functools.partial(_linear_nlp, num_data=x.shape[0])
  w = {"W": jnp.linspace(-0.3, 0.4, 10)[:, None]}
  data = [(x[:200], y[:200]), (x[200:], y[200:])]
  ref = mm.laplace(make_nlp({"sigma": 1.0, "prior_sigma": 1.0}), w, data=data,
                   structure="kron", map_tol=None)
  terms = T.hyper_terms("t", ref, data, jnp.asarray(1.0), ref.nlp.apply_fn, w)
  h = {"sigma": 0.6, "prior_sigma": 0.2}
  moved = jax.jit(lambda t: T.posterior_at("t", t, 0.2, 0.6))(terms)
  built = mm.laplace(make_nlp(h), w, data=[(x, y)], structure="kron", map_tol=None)
  np.testing.assert_allclose(T.log_evidence(terms, 0.2, 0.6),
                             mm.log_evidence(make_nlp(h), w, x, y), rtol=1e-11)
  np.testing.assert_allclose(moved.log_evidence(), mm.log_evidence(make_nlp(h), w, x, y),
                             rtol=1e-11)
  np.testing.assert_allclose(moved.grad_norm, built.grad_norm, rtol=1e-10)
  np.testing.assert_allclose(moved.newton_decrement, built.newton_decrement, rtol=1e-9)


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank", "full"])
def test_scale_is_c_times_the_data_term(structure):
  """_precisions.scale(prec, c) is c H, densely, for every structure."""
  key = jax.random.PRNGKey(3)
  x = jax.random.normal(key, (30, 4))
  nlp = mm.negative_log_posterior(
      lambda p, x: jnp.tanh(x @ p["w"] + p["b"]), mm.gaussian_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.0), num_data=30)
  p = {"w": 0.5 * jax.random.normal(jax.random.PRNGKey(4), (4, 3)), "b": jnp.ones(3)}
  t = jnp.sin(x[:, :3])
  extra = {"rank": 5} if structure == "lowrank" else {}
  post = mm.laplace(nlp, p, data=[(x, t)], structure=structure, map_tol=None, **extra)
  np.testing.assert_allclose(_precisions.to_dense(_precisions.scale(post.precision, 2.5)),
                             2.5 * _precisions.to_dense(post.precision), rtol=1e-12,
                             atol=1e-12)


def test_diag_prior_scale_is_below_the_full_one_at_equal_weights():
  """At fixed weights gamma_diag >= gamma_full (sum_i 1/Lambda_ii <= tr Lambda^{-1}),
  so the diagonal evidence's optimal sigma is the smaller: a tanh model, 3 keys."""
  for k in range(3):
    x = jax.random.normal(jax.random.PRNGKey(k), (40, 5))
    p = {"w": jax.random.normal(jax.random.PRNGKey(10 + k), (5, 3)), "b": jnp.ones(3)}
    nlp = mm.negative_log_posterior(
        lambda p, x: jnp.tanh(x @ p["w"] + p["b"]), mm.gaussian_log_likelihood,
        functools.partial(mm.gaussian_log_prior, sigma=1.0))
    t = jnp.cos(x[:, :3])
    s = {st: float(mm.laplace(nlp, p, x, t, structure=st, map_tol=None)
                   .optimize_prior().prior_sigma) for st in ("diag", "full")}
    assert s["diag"] < s["full"], s


def _mlp_nlp(h, num_data):
  def apply(p, x):
    return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]
  return mm.negative_log_posterior(
      apply, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]), num_data=num_data)


def _mlp(hidden, key=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(key))
  return {"l1": {"w": 0.3 * jax.random.normal(k1, (64, hidden)), "b": jnp.zeros(hidden)},
          "l2": {"w": 0.3 * jax.random.normal(k2, (hidden, 10)), "b": jnp.zeros(10)}}


def test_resume_is_bit_exact(tmp_path):
  """4 epochs in one go, and 2 epochs + a resumed 2 (from the checkpoint), with
  shuffled minibatches, per-layer prior scales and updates every epoch after a
  burn-in of 1: the same weights, optimizer states, hyperparameters and history."""
  d = load_digits()
  x, y = jnp.asarray(d.data[:120] / 16.0), jnp.asarray(d.target[:120])
  make_nlp = functools.partial(_mlp_nlp, num_data=120)
  kw = dict(structure="diag", batch_size=40, key=jax.random.PRNGKey(5), burn_in=1,
            every=1, hyper_steps=5)
  h0 = {"prior_sigma": {"l1": 1.0, "l2": 1.0}}
  whole = mm.fit_evidence(make_nlp, h0, _mlp(4), optax.adam(1e-2), (x, y), epochs=4, **kw)
  first = mm.fit_evidence(make_nlp, h0, _mlp(4), optax.adam(1e-2), (x, y), epochs=2,
                          checkpoint_dir=str(tmp_path), **kw)
  assert first.history["hyper_epoch"] == [2]
  rest = mm.fit_evidence(make_nlp, h0, _mlp(4), optax.adam(1e-2), (x, y), epochs=4,
                         checkpoint_dir=str(tmp_path), **kw)
  assert whole.history["hyper_epoch"] == [2, 3, 4] and rest.step == whole.step == 12
  for a, b in zip(jax.tree_util.tree_leaves((rest.params, rest.opt_state, rest.hyper)),
                  jax.tree_util.tree_leaves((whole.params, whole.opt_state, whole.hyper))):
    np.testing.assert_array_equal(a, b)
  for k in ("loss", "log_evidence", "log_evidence_before", "step", "skipped"):
    assert rest.history[k] == whole.history[k], k
  assert whole.history["hyper"][-1]["prior_sigma"]["l1"] != 1.0


# Plain-function models are the default suite's diabetes and digits cases.
@pytest.mark.parametrize("kind", ["nnx", pytest.param("dict", marks=pytest.mark.slow),
                                  pytest.param("linen", marks=pytest.mark.slow)])
@pytest.mark.parametrize("structure, extra", [
    ("kron", {}), ("lowrank", {"rank": 3, "subset": "last"})])
def test_flax_and_plain_models_end_at_the_evidence_maximum(kind, structure, extra):
  """flax NNX (``nnx.split`` pure dict), linen and plain-dict MLPs, Gaussian noise
  and prior scales, minibatches of 7 (21 examples): the hyperparameters after the
  last update maximize the structured log evidence rebuilt at the final weights
  (every 5% step in either scale lowers it), and the history's evidence is it."""
  apply_fn, params, last = R.make_model(kind, seed=4)
  x, y = (jnp.asarray(a) for a in R.regression_data(4))
  if extra.get("subset") == "last":
    extra = {**extra, "subset": mm.last_layer_subset(params)}

  def make_nlp(h):
    return mm.negative_log_posterior(
        apply_fn, functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]),
        functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]),
        num_data=x.shape[0])

  r = mm.fit_evidence(make_nlp, {"sigma": 1.0, "prior_sigma": 1.0}, params,
                      optax.adam(1e-2), (x, y), structure=structure, epochs=3,
                      batch_size=7, key=jax.random.PRNGKey(0), burn_in=2,
                      hyper_steps=300, noise_key="sigma",
                      hyper_tx=optax.adam(optax.exponential_decay(0.1, 100, 0.3)),
                      **extra)
  assert jax.tree_util.tree_structure(r.params) == jax.tree_util.tree_structure(params)

  def evidence(h):
    return float(mm.laplace(make_nlp(h), r.params, data=[(x, y)], structure=structure,
                            map_tol=None, **extra).log_evidence())
  best = evidence(r.hyper)
  np.testing.assert_allclose(r.history["log_evidence"][-1], best, rtol=1e-8)
  for k in ("sigma", "prior_sigma"):
    for f in (1.05, 1 / 1.05):
      assert evidence({**r.hyper, k: r.hyper[k] * f}) < best, (k, f)


def test_refusals(diabetes, tmp_path):
  x, y, _ = diabetes
  make_nlp = functools.partial(_linear_nlp, num_data=x.shape[0])
  w = {"W": jnp.zeros((10, 1))}
  h = {"sigma": 1.0, "prior_sigma": 1.0}
  tx = optax.adam(1e-2)
  with pytest.raises(ValueError, match="num_data must be the number of training"):
    mm.fit_evidence(functools.partial(_linear_nlp, num_data=10), h, w, tx, (x, y))
  with pytest.raises(ValueError, match="noise_key='s' is not a key"):
    mm.fit_evidence(make_nlp, h, w, tx, (x, y), noise_key="s")
  with pytest.raises(ValueError, match=r"hyper\['prior_sigma'\] = .*-1"):
    mm.fit_evidence(make_nlp, {"sigma": 1.0, "prior_sigma": -1.0}, w, tx, (x, y))
  with pytest.raises(TypeError, match="tx must be"):
    mm.fit_evidence(make_nlp, h, w, 3, (x, y))
  with pytest.raises(ValueError, match=r"hyper\['sigma'\] has shape \(2,\)"):
    mm.fit_evidence(make_nlp, {**h, "sigma": jnp.ones(2)}, w, tx, (x, y), noise_key="sigma")
  with pytest.raises(ValueError, match="every must be an integer >= 1"):
    mm.fit_evidence(make_nlp, h, w, tx, (x, y), every=0)
  # the noise key must be the Gaussian likelihood's sigma: here it is used twice
  twice = lambda hh: mm.negative_log_posterior(  # noqa: E731
      lambda p, x: (x @ p["W"])[:, 0],
      functools.partial(mm.gaussian_log_likelihood, sigma=2 * hh["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=hh["prior_sigma"]),
      num_data=x.shape[0])
  with pytest.raises(ValueError, match="must be the\nsigma|sigma of mlmap.gaussian"):
    mm.fit_evidence(twice, h, w, tx, (x, y), noise_key="sigma", structure="diag")
  # the only structure that forms P x P refuses at a small max_bytes
  with pytest.raises(ValueError, match="max_bytes"):
    mm.fit_evidence(make_nlp, h, w, tx, (x, y), structure="full", max_bytes=100)
  # a fit checkpoint is not a fit_evidence one
  mm.save_checkpoint(str(tmp_path / "fit_evidence.ckpt"), {"params": w})
  with pytest.raises(ValueError, match="not a fit_evidence checkpoint"):
    mm.fit_evidence(make_nlp, h, w, tx, (x, y), checkpoint_dir=str(tmp_path))


def _online_decades(n, hidden, dense_kw, tx, **online_kw):
  """``log10(online sigma / dense sigma)`` for kron and diag: a digits MLP 64-hidden-10
  on the first ``n`` digits, one prior scale, both from the same initial weights."""
  d = load_digits()
  x, y = jnp.asarray(d.data[:n] / 16.0), jnp.asarray(d.target[:n])
  make_nlp = functools.partial(_mlp_nlp, num_data=n)
  p0 = _mlp(hidden)
  hd, _, _ = mm.maximize_evidence(make_nlp, {"prior_sigma": 1.0}, p0, x, y, fit_steps=5,
                                  **dense_kw)
  got = {}
  for s in ("kron", "diag"):
    r = mm.fit_evidence(make_nlp, {"prior_sigma": 1.0}, p0, tx, (x, y), structure=s,
                        **online_kw)
    got[s] = np.log10(float(r.hyper["prior_sigma"]) / float(hd["prior_sigma"]))
  return got


def test_online_prior_scale_within_a_tenth_of_a_decade_of_the_dense_method():
  """The issue's MLP check. Digits MLP 64-4-10 (P = 310) on all 1797 digits, one
  prior scale; the online weights are trained by mlmap's Hessian-free (full
  batch, so they are near the MAP of the current scale at every update).

  Dense maximize_evidence: sigma 1.629. Online kron: -0.020 decades, diag: -0.040
  (2-core CPU). Kron is nearer: diag's gamma uses sum_i 1/Lambda_ii <=
  tr(Lambda^{-1}) (tested below), so it overcounts the well-determined
  parameters, takes a larger alpha = gamma / |w|^2, and the refit weights follow.
  Here, with N/P = 5.8, both structures are near gamma = P and agree; in the
  underdetermined regime of the slow test below (P > N) diag is 0.31 decades off."""
  got = _online_decades(1797, 4, dict(num_iterations=20, tol=1e-5),
                        lambda nlp: mm.hessian_free(nlp, maxiter=50), epochs=40,
                        burn_in=5, every=1, hyper_steps=50, max_bytes=10_000)
  assert abs(got["kron"]) < 0.1 and abs(got["diag"]) < 0.1, got
  assert got["diag"] < got["kron"] < 0, got


@pytest.mark.slow
def test_online_prior_scale_against_the_dense_method_on_an_mlp():
  """Underdetermined regime, Adam weights. Digits MLP 64-12-10 (P = 910, 400
  examples, one scale), Adam full batch with a decaying rate, 600 epochs, 50 Adam
  steps on log sigma every 5 epochs after 10.

  Dense maximize_evidence: sigma 0.909. Online kron lands 0.10 decades below it
  (measured -0.102 on 2-core CPU), online diag 0.31 below. Diag is always below at
  equal weights: its gamma uses sum_i 1/Lambda_ii <= tr(Lambda^{-1}), so gamma_diag
  >= gamma_full and alpha = gamma / |w|^2 is larger (a smaller sigma)."""
  got = _online_decades(400, 12, dict(num_iterations=40, tol=1e-6),
                        optax.adam(optax.exponential_decay(1e-2, 120, 0.5)), epochs=600,
                        burn_in=10, every=5, hyper_steps=50)
  assert abs(got["kron"]) < 0.11, got
  assert got["diag"] < got["kron"] < 0, got
