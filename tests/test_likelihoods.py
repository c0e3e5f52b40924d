"""Likelihoods against scipy and the lecture's identities."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special
import scipy.stats

import mlmap as mm


def _rng(seed=0):
  return np.random.default_rng(seed)


# --- Gaussian -----------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_gaussian_matches_scipy(sigma):
  r = _rng()
  z, t = r.normal(size=(5, 3)), r.normal(size=(5, 3))
  got = jax.jit(mm.gaussian_log_likelihood)(z, t, sigma)
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(t, z, sigma), rtol=1e-12)


def test_gaussian_array_sigma_broadcasts():
  r = _rng(1)
  z, t = r.normal(size=(6, 2)), r.normal(size=(6, 2))
  sigma = np.exp(r.normal(size=(6, 1)))
  got = jax.jit(mm.gaussian_log_likelihood)(z, t, sigma)
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(t, z, sigma), rtol=1e-12)


def test_gaussian_ml_line_is_least_squares_for_every_sigma():
  r = _rng(2)
  x = r.uniform(-2, 2, size=40)
  t = 1.5 * x - 0.7 + 0.3 * r.normal(size=40)
  design = np.stack([x, np.ones_like(x)], 1)
  lstsq = np.linalg.lstsq(design, t, rcond=None)[0]
  for sigma in [0.01, 1.0, 30.0]:
    nll = lambda w, s=sigma: -jnp.sum(mm.gaussian_log_likelihood(design @ w, t, s))
    # One Newton step from zero is exact on a quadratic objective.
    g = jax.jit(jax.grad(nll))(jnp.zeros(2))
    h = jax.jit(jax.hessian(nll))(jnp.zeros(2))
    w_ml = -np.linalg.solve(h, g)
    np.testing.assert_allclose(w_ml, lstsq, rtol=1e-10)


def test_gaussian_ml_sigma_is_rms_residual():
  r = _rng(3)
  z, t = r.normal(size=50), r.normal(size=50)
  nll = jax.jit(lambda log_s: -jnp.sum(mm.gaussian_log_likelihood(z, t, jnp.exp(log_s))))
  res = scipy.optimize.minimize_scalar(lambda s: float(nll(s)), bracket=(-2, 2), tol=1e-12)
  np.testing.assert_allclose(np.exp(res.x), np.sqrt(np.mean((t - z) ** 2)), rtol=1e-6)


def test_heteroscedastic_regression_recovers_weighted_ml():
  """Mean w*x and noise s*x predicted by the model: ML has a closed form."""
  r = _rng(4)
  x = r.uniform(0.5, 2.0, size=200)
  t = 2.0 * x + 0.3 * x * r.normal(size=200)

  def nll(p):
    mean, sigma = p["w"] * x, jnp.exp(p["log_s"]) * x
    return -jnp.sum(mm.gaussian_log_likelihood(mean, t, sigma))

  val_grad = jax.jit(jax.value_and_grad(nll))
  from jax.flatten_util import ravel_pytree
  flat0, unravel = ravel_pytree({"w": 0.0, "log_s": 0.0})
  res = scipy.optimize.minimize(
      lambda f: tuple(np.asarray(v) for v in
                      (lambda vg: (vg[0], ravel_pytree(vg[1])[0]))(val_grad(unravel(f)))),
      np.asarray(flat0), jac=True, method="BFGS", options={"gtol": 1e-10})
  p = unravel(res.x)
  w_closed = np.mean(t / x)
  s_closed = np.sqrt(np.mean(((t - w_closed * x) / x) ** 2))
  np.testing.assert_allclose(p["w"], w_closed, rtol=1e-6)
  np.testing.assert_allclose(np.exp(p["log_s"]), s_closed, rtol=1e-6)


# --- Bernoulli ----------------------------------------------------------------

def test_bernoulli_matches_scipy():
  r = _rng(5)
  s = r.normal(scale=3, size=20)
  t = (r.uniform(size=20) < 0.5).astype(float)
  got = jax.jit(mm.bernoulli_log_likelihood)(s, t)
  np.testing.assert_allclose(
      got, scipy.stats.bernoulli.logpmf(t, scipy.special.expit(s)), rtol=1e-10)


def test_bernoulli_grad_is_z_minus_t():
  r = _rng(6)
  s, t = r.normal(scale=3, size=30), r.uniform(size=30)
  g = jax.jit(jax.grad(lambda s: -jnp.sum(mm.bernoulli_log_likelihood(s, t))))(s)
  np.testing.assert_allclose(g, scipy.special.expit(s) - t, atol=1e-14)


def test_cross_entropy_is_kl_plus_entropy():
  r = _rng(7)
  s, t = r.normal(size=25), r.uniform(size=25)
  z = scipy.special.expit(s)
  p, q = np.stack([1 - t, t]), np.stack([1 - z, z])
  kl = scipy.special.rel_entr(p, q).sum(0)
  h = scipy.stats.entropy(p)
  ce = -jax.jit(mm.bernoulli_log_likelihood)(s, t)
  np.testing.assert_allclose(ce, kl + h, rtol=1e-10)


def test_sigmoid_is_two_class_softmax():
  r = _rng(8)
  s = r.normal(scale=4, size=15)
  t = (r.uniform(size=15) < 0.5).astype(np.int32)
  two_class = jnp.stack([jnp.zeros_like(s), s], -1)
  np.testing.assert_allclose(
      jax.jit(mm.bernoulli_log_likelihood)(s, t.astype(float)),
      jax.jit(mm.categorical_log_likelihood)(two_class, t), rtol=1e-12)


def test_bernoulli_float32_extreme_logits():
  s = jnp.array([1e4, -1e4, 1e4, -1e4], jnp.float32)
  t = jnp.array([1.0, 0.0, 0.0, 1.0], jnp.float32)
  ll = jax.jit(mm.bernoulli_log_likelihood)(s, t)
  assert ll.dtype == jnp.float32
  np.testing.assert_array_equal(ll, np.array([0.0, 0.0, -1e4, -1e4], np.float32))
  g = jax.jit(jax.grad(lambda s: -jnp.sum(mm.bernoulli_log_likelihood(s, t))))(s)
  np.testing.assert_array_equal(g, np.array([0.0, 0.0, 1.0, -1.0], np.float32))


# --- categorical --------------------------------------------------------------

def test_categorical_matches_log_softmax_any_batch_shape():
  r = _rng(9)
  logits = r.normal(size=(2, 3, 5))
  labels = r.integers(0, 5, size=(2, 3))
  got = jax.jit(mm.categorical_log_likelihood)(logits, labels)
  ref = np.take_along_axis(scipy.special.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_softmax_grad_is_delta_minus_p():
  r = _rng(10)
  z = r.normal(size=(4, 6))
  k = r.integers(0, 6, size=4)
  g = jax.jit(jax.grad(lambda z: jnp.sum(mm.categorical_log_likelihood(z, k))))(z)
  np.testing.assert_allclose(g, np.eye(6)[k] - scipy.special.softmax(z, -1), atol=1e-14)


def test_soft_categorical_one_hot_and_kl_identity():
  r = _rng(11)
  z = r.normal(size=(7, 4))
  k = r.integers(0, 4, size=7)
  np.testing.assert_allclose(
      jax.jit(mm.soft_categorical_log_likelihood)(z, np.eye(4)[k]),
      mm.categorical_log_likelihood(z, k), rtol=1e-12)
  p = scipy.special.softmax(r.normal(size=(7, 4)), -1)
  q = scipy.special.softmax(z, -1)
  ce = -mm.soft_categorical_log_likelihood(z, p)
  np.testing.assert_allclose(
      ce, scipy.special.rel_entr(p, q).sum(-1) + scipy.stats.entropy(p, axis=-1), rtol=1e-10)


def test_categorical_float32_extreme_logits():
  z = jnp.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], jnp.float32)
  k = jnp.array([2, 1])
  ll = jax.jit(mm.categorical_log_likelihood)(z, k)
  np.testing.assert_array_equal(ll, np.array([-2e4, 0.0], np.float32))
  g = jax.jit(jax.grad(lambda z: jnp.sum(mm.categorical_log_likelihood(z, k))))(z)
  chex.assert_tree_all_finite(g)
  np.testing.assert_array_equal(g, np.array([[-1, 0, 1], [0, 0, 0]], np.float32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_low_precision_dtypes(dtype, tol):
  r = _rng(12)
  z = r.normal(size=(8, 3))
  k = r.integers(0, 3, size=8)
  s, t = r.normal(size=8), r.uniform(size=8)
  cases = [
      (mm.categorical_log_likelihood, (z.astype(dtype), k),
       np.take_along_axis(scipy.special.log_softmax(z, -1), k[:, None], -1)[:, 0]),
      (mm.bernoulli_log_likelihood, (s.astype(dtype), t.astype(dtype)),
       t * np.log(scipy.special.expit(s)) + (1 - t) * np.log(scipy.special.expit(-s))),
      (mm.gaussian_log_likelihood, (s.astype(dtype), t.astype(dtype)),
       scipy.stats.norm.logpdf(t, s)),
  ]
  for fn, args, ref in cases:
    got = jax.jit(fn)(*args)
    assert got.dtype == dtype, fn.__name__
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol)


# --- bad input ----------------------------------------------------------------

def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(4, 1\).*\(4,\)"):
    mm.gaussian_log_likelihood(jnp.zeros((4, 1)), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"\(3,\).*\(5,\)"):
    mm.bernoulli_log_likelihood(jnp.zeros(3), jnp.zeros(5))
  with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
    mm.categorical_log_likelihood(jnp.zeros((4, 2)), jnp.zeros(3, jnp.int32))


def test_shape_mismatch_raises_at_trace_time():
  f = jax.jit(lambda z, t: mm.gaussian_log_likelihood(z, t))
  with pytest.raises(ValueError, match="do not match"):
    f(jnp.zeros((4, 1)), jnp.zeros(4))


def test_float_labels_type_error_points_to_soft():
  with pytest.raises(TypeError, match="soft_categorical_log_likelihood"):
    mm.categorical_log_likelihood(jnp.zeros((3, 2)), jnp.zeros(3))


def test_labels_out_of_range():
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    mm.categorical_log_likelihood(jnp.zeros((3, 2)), jnp.array([0, 1, 2]))


@pytest.mark.parametrize("sigma", [0.0, -1.0, np.array([1.0, -2.0])])
def test_non_positive_sigma(sigma):
  with pytest.raises(ValueError, match="sigma must be > 0"):
    mm.gaussian_log_likelihood(jnp.zeros(2), jnp.zeros(2), sigma)


def test_partial_binding_documented_way():
  ll = functools.partial(mm.gaussian_log_likelihood, sigma=0.5)
  np.testing.assert_allclose(ll(jnp.array(1.0), jnp.array(0.0)),
                             scipy.stats.norm.logpdf(0.0, 1.0, 0.5), rtol=1e-12)


# --- issue 10: no silent wrong values -----------------------------------------

def test_sigma_that_enlarges_outputs_raises_naming_both_shapes():
  # Item 1: sigma [B, 1] with outputs [B] broadcast to [B, B]: 8x the NLL (90.8, not 11.35).
  with pytest.raises(ValueError, match=r"sigma shape \(8, 1\).*outputs' shape \(8,\)"):
    mm.gaussian_log_likelihood(jnp.zeros(8), jnp.ones(8), sigma=jnp.ones((8, 1)))
  sigma_head = mm.negative_log_posterior(
      lambda w, x: x @ w, lambda z, t: mm.gaussian_log_likelihood(z, t, jnp.ones((8, 1))))
  with pytest.raises(ValueError, match=r"\(8, 1\).*\(8,\)"):
    jax.jit(sigma_head)(jnp.zeros(2), jnp.ones((8, 2)), jnp.ones(8))
  right = mm.negative_log_posterior(
      lambda w, x: x @ w, lambda z, t: mm.gaussian_log_likelihood(z, t, jnp.ones(8)))
  np.testing.assert_allclose(jax.jit(right)(jnp.zeros(2), jnp.ones((8, 2)), jnp.ones(8)),
                             -8 * scipy.stats.norm.logpdf(1.0), rtol=1e-12)  # 11.35


def test_sigma_that_does_not_broadcast_is_a_clear_value_error():
  with pytest.raises(ValueError, match=r"sigma shape \(3,\).*\(8,\)"):
    jax.jit(mm.gaussian_log_likelihood)(jnp.zeros(8), jnp.ones(8), jnp.ones(3))


def test_noise_head_sigma_broadcasting_to_outputs_still_works():
  r = _rng(13)
  out, t = r.normal(size=(7, 2)), r.normal(size=(7, 1))
  ll = jax.jit(lambda o, t: mm.gaussian_log_likelihood(o[:, :1], t, jnp.exp(o[:, 1:])))
  got = ll(out, t)
  assert got.shape == (7, 1)
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(t, out[:, :1], np.exp(out[:, 1:])),
                             rtol=1e-12)
  np.testing.assert_allclose(mm.gaussian_log_likelihood(out, out, np.array([0.5, 2.0])),
                             scipy.stats.norm.logpdf(out, out, [0.5, 2.0]), rtol=1e-12)


@pytest.mark.parametrize("sigma", [np.inf, np.nan, np.array([1.0, np.inf])])
def test_non_finite_concrete_sigma(sigma):
  with pytest.raises(ValueError, match="sigma must be finite"):
    mm.gaussian_log_likelihood(jnp.zeros(2), jnp.zeros(2), sigma)


def test_negative_concrete_labels_raise():
  # Item 2: -1 (PyTorch's "ignore") would be read as class K-1.
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*-1"):
    mm.categorical_log_likelihood(jnp.zeros((2, 3)), jnp.array([-1, 0]))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_traced_out_of_range_labels_give_nan_entries(dtype):
  r = _rng(14)
  z = r.normal(size=(5, 3))
  k = np.array([-1, 1, 3, 0, 2])
  got = jax.jit(mm.categorical_log_likelihood)(z.astype(dtype), k)
  assert got.dtype == dtype
  ok = (k >= 0) & (k < 3)
  assert np.all(np.isnan(np.asarray(got, np.float64)[~ok]))
  ref = scipy.special.log_softmax(z, -1)[np.arange(5)[ok], k[ok]]
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(np.asarray(got, np.float64)[ok], ref, rtol=tol, atol=tol)
  # The summed loss is NaN (so make_train_step skips the batch); the gradient stays finite.
  loss = jax.jit(lambda z, k: -jnp.sum(mm.categorical_log_likelihood(z, k)))
  assert np.isnan(float(loss(z, k)))
  chex.assert_tree_all_finite(jax.jit(jax.grad(loss))(z, k))


def test_train_step_skips_a_batch_with_an_ignore_label():
  nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.categorical_log_likelihood)
  tx = optax.sgd(0.1)
  step = mm.make_train_step(nlp, tx)
  w, x = jnp.ones((2, 3)), jnp.asarray(_rng(18).normal(size=(2, 2)))
  w_new, _, metrics = step(w, tx.init(w), (x, jnp.array([0, -1])))
  np.testing.assert_array_equal(w_new, w)
  assert bool(metrics["skipped"]) and np.isnan(float(metrics["loss"]))
  w_ok, _, metrics = step(w, tx.init(w), (x, jnp.array([0, 2])))
  assert not bool(metrics["skipped"]) and not np.array_equal(w_ok, w)


def test_weight_mask_from_the_docstring():
  r = _rng(15)
  z = r.normal(size=(6, 4))
  k = np.array([0, -1, 3, 2, -1, 1])
  w = (k >= 0).astype(float)
  masked = jax.jit(lambda z, t: t[1] * mm.categorical_log_likelihood(
      z, jnp.where(t[1] > 0, t[0], 0)))
  got = masked(z, (k, w))
  ref = np.where(k >= 0, scipy.special.log_softmax(z, -1)[np.arange(6), np.maximum(k, 0)], 0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_bernoulli_targets_outside_unit_interval():
  # Item 5: the audit's call returned +2.95, a log-probability above zero.
  with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\].*-1\.0"):
    mm.bernoulli_log_likelihood(jnp.array([-3.0]), jnp.array([-1.0]))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    mm.bernoulli_log_likelihood(jnp.zeros(2), jnp.array([0.5, np.nan]))
  s, t = np.array([-3.0, 0.5, 2.0, 1.0]), np.array([-1.0, 0.3, 1.5, 1.0])
  got = np.asarray(jax.jit(mm.bernoulli_log_likelihood)(s, t))
  assert np.all(np.isnan(got[[0, 2]]))
  np.testing.assert_allclose(
      got[[1, 3]], t[[1, 3]] * scipy.special.log_expit(s[[1, 3]])
      + (1 - t[[1, 3]]) * scipy.special.log_expit(-s[[1, 3]]), rtol=1e-12)


def test_soft_categorical_probs_must_be_distributions():
  z = _rng(16).normal(size=(3, 4))
  with pytest.raises(ValueError, match="probs must be >= 0"):
    mm.soft_categorical_log_likelihood(z, np.array([[1.5, -0.5, 0.0, 0.0]] * 3))
  with pytest.raises(ValueError, match=r"row \(1,\) sums to 2\.0"):
    mm.soft_categorical_log_likelihood(z, np.array([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0],
                                                    [0.25] * 4]))
  p = np.array([[1.0, 0, 0, 0], [1.5, -0.5, 0, 0], [0.5, 0.6, 0, 0]])
  got = jax.jit(mm.soft_categorical_log_likelihood)(z, p)
  assert np.isnan(got[1]) and np.isnan(got[2])
  np.testing.assert_allclose(got[0], scipy.special.log_softmax(z[0])[0], rtol=1e-12)


def test_soft_categorical_tolerance_by_dtype():
  # float32 rounding of a softmax passes; an error of 1e-3 does not.
  z = _rng(17).normal(size=(5, 10)).astype(np.float32)
  p32 = jax.nn.softmax(jnp.asarray(z) * 3.0, axis=-1)
  assert np.all(np.isfinite(mm.soft_categorical_log_likelihood(z, p32)))
  with pytest.raises(ValueError, match="sum to 1"):
    mm.soft_categorical_log_likelihood(z, p32 * (1 + 1e-3))
  pbf = jax.nn.softmax(jnp.asarray(z, jnp.bfloat16), axis=-1)
  assert np.all(np.isfinite(np.asarray(
      jax.jit(mm.soft_categorical_log_likelihood)(z.astype(jnp.bfloat16), pbf), np.float32)))
