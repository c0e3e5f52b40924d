"""Adaptive natural gradient, ``damping="auto"``, curvature minibatches and masked
parameters (``optax.multi_transform``) of mlmap's curvature optimizers.

References: the damped Fisher / GGN built by ``jax.hessian`` of hand-written
float64 losses and solved by numpy; the quadratic model's reduction ratio
computed from those; exact traces of diagonal operators (where Hutchinson's
estimator is exact); and the same optimizer run on the restricted objective
(the frozen leaves closed over as constants) for the masked case.
"""

import functools

import numpy as np
import pytest
from sklearn.datasets import load_digits

import jax
import jax.numpy as jnp
import optax

import mlmap as mm
from mlmap import _optim_common as oc

SIGMA, PRIOR = 0.5, 2.0


# --- problems ---------------------------------------------------------------------

def _linear_gaussian(n=24, d=3, k=2, seed=0):
  """Linear-Gaussian model: its GGN = Fisher = Hessian, by jax.hessian below."""
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, d))
  y = x @ jax.random.normal(kw, (d, k)) + 0.1 * jnp.sin(jnp.arange(n * k).reshape(n, k))
  nlp = mm.negative_log_posterior(
      lambda p, a: a @ p["w"] + p["b"],
      functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA),
      functools.partial(mm.gaussian_log_prior, sigma=PRIOR))
  return nlp, {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}, (x, y)


def _hand_loss(flat, x, y, scale=1.0, d=3, k=2):
  """The same negative log-posterior written out (likelihood scaled by ``scale``)."""
  w, b = flat[:d * k].reshape(d, k), flat[d * k:]
  r = x @ w + b - y
  return (scale * 0.5 * jnp.sum(r ** 2) / SIGMA ** 2
          + 0.5 * jnp.sum(flat ** 2) / PRIOR ** 2)


def _flat(p):
  return np.r_[np.ravel(p["w"]), np.ravel(p["b"])]


@pytest.fixture(scope="module")
def mlp387():
  """The 387-parameter tanh MLP on digits (64-6-... ) where fixed-damping natural
  gradient at learning_rate=1 ran away (issue 13)."""
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x[:300] / 16.0)
  y = jnp.asarray(y[:300])
  sizes = [64, 5, 10]
  keys = jax.random.split(jax.random.PRNGKey(1), len(sizes) - 1)
  params = [{"w": jax.random.normal(k_, (m, n_)) / np.sqrt(m), "b": jnp.zeros(n_)}
            for k_, m, n_ in zip(keys, sizes[:-1], sizes[1:])]

  def apply(p, a):
    h = jnp.tanh(a @ p[0]["w"] + p[0]["b"])
    return h @ p[1]["w"] + p[1]["b"]

  nlp = mm.negative_log_posterior(apply, mm.categorical_log_likelihood,
                                  mm.gaussian_log_prior)
  assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == 385
  return nlp, params, (x, y)


def _run(tx, nlp, params, batch, steps):
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  losses, states = [], []
  for _ in range(steps):
    params, state, m = step(params, state, batch)
    losses.append(float(m["loss"]))
    states.append(state)
  return params, states, np.asarray(losses + [float(nlp(params, *batch))])


# --- natural gradient: adaptive damping -------------------------------------------

def test_adaptive_natural_gradient_is_monotone_where_fixed_damping_runs_away(mlp387):
  nlp, p0, batch = mlp387
  _, _, fixed = _run(mm.natural_gradient(nlp, damping=1e-3, adaptive=False),
                     nlp, p0, batch, 40)
  _, states, adaptive = _run(mm.natural_gradient(nlp, damping=1e-3), nlp, p0, batch, 40)
  assert np.nanmax(fixed) > 3 * fixed[0] or not np.all(np.isfinite(fixed))  # ran away
  assert np.all(np.diff(adaptive) <= 1e-9 * adaptive[0])  # rejected steps are zero
  assert adaptive[-1] < 0.5 * adaptive[0]
  assert any(bool(s.rejected) for s in states) or max(float(s.damping) for s in states) > 1e-3


def test_natural_gradient_rho_and_damping_rule_match_a_dense_reference():
  """One adaptive step on the linear-Gaussian model: the direction solves
  ``(F + lam I) d = g`` with ``F = jax.hessian`` of the hand-written loss, and
  ``rho`` is the actual over the quadratic model's change."""
  nlp, p0, (x, y) = _linear_gaussian()
  p0 = jax.tree_util.tree_map(lambda a: a + 0.3, p0)
  flat0 = _flat(p0)
  lam, lr = 5.0, 0.7
  h = np.asarray(jax.hessian(_hand_loss)(jnp.asarray(flat0), x, y))
  g = np.asarray(jax.grad(_hand_loss)(jnp.asarray(flat0), x, y))
  d = np.linalg.solve(h + lam * np.eye(h.shape[0]), g)
  step = -lr * d
  predicted = g @ step + 0.5 * step @ h @ step
  actual = float(_hand_loss(jnp.asarray(flat0 + step), x, y) - _hand_loss(jnp.asarray(flat0), x, y))
  rho = actual / predicted
  for solver in ("dense", "cg"):
    tx = mm.natural_gradient(nlp, learning_rate=lr, damping=lam, solver=solver, tol=1e-14)
    u, s = jax.jit(lambda p, t=tx: t.update(jax.grad(nlp)(p, x, y), t.init(p), p,
                                            batch=(x, y)))(p0)
    np.testing.assert_allclose(_flat(u), step, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(s.rho), rho, rtol=1e-8)
    want = lam / 1.5 if rho > 0.75 else (lam * 1.5 if rho < 0.25 else lam)
    np.testing.assert_allclose(float(s.damping), want, rtol=1e-12)
    assert not bool(s.rejected)


@pytest.mark.parametrize("make", [
    lambda nlp: mm.natural_gradient(nlp, damping=5.0),
    lambda nlp: mm.hessian_free(nlp, damping=5.0),
    lambda nlp: mm.newton(nlp, damping=5.0),
    lambda nlp: mm.kfac(nlp, damping=5.0)], ids=["ng", "hf", "newton", "kfac"])
def test_value_extra_arg_is_the_reduction_ratios_start(make):
  """``value=`` (what make_train_step passes) replaces the forward pass for f(w):
  the true value gives the same rho; a shifted one moves rho by shift/predicted;
  a non-scalar is refused."""
  nlp, p0, (x, y) = _linear_gaussian()
  p0 = jax.tree_util.tree_map(lambda a: a + 0.3, p0)
  tx = make(nlp)
  f = float(nlp(p0, x, y))
  run = jax.jit(lambda p, v: tx.update(jax.grad(nlp)(p, x, y), tx.init(p), p,
                                       batch=(x, y), value=v))
  ref = jax.jit(lambda p: tx.update(jax.grad(nlp)(p, x, y), tx.init(p), p, batch=(x, y)))
  base, same, shifted = ref(p0)[1], run(p0, f)[1], run(p0, f + 1e-3)[1]
  np.testing.assert_allclose(float(same.rho), float(base.rho), rtol=1e-10)
  assert float(shifted.rho) != float(base.rho)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    run(p0, jnp.ones(2))


# --- damping="auto" ----------------------------------------------------------------

def test_hutchinson_scale_is_exact_on_a_diagonal_operator_and_close_on_a_dense_one():
  diag = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.asarray([10.0, -2.0])}
  est = oc.hutchinson_scale(lambda v: jax.tree_util.tree_map(jnp.multiply, diag, v), diag)
  np.testing.assert_allclose(float(est), (21.0 + 8.0) / 8, rtol=1e-14)
  m = jax.random.normal(jax.random.PRNGKey(3), (40, 40))
  a = m @ m.T  # tr(A)/P ~ 40; Hutchinson's relative sd here ~ sqrt(2/(4*40)) ~ 0.1
  est = float(oc.hutchinson_scale(lambda v: a @ v, jnp.zeros(40)))
  np.testing.assert_allclose(est, float(jnp.trace(a)) / 40, rtol=0.4)


def test_auto_damping_takes_the_trace_scale_on_the_first_update():
  """Orthogonal design: the GGN is diagonal, so ``tr(B)/P`` is exact. With a zero
  learning rate the step is zero (rho = 1 > 3/4), so the state holds lam / 1.5."""
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(24, 3)))
  x = jnp.asarray(q * np.array([1.0, 2.0, 3.0]))
  nlp = mm.negative_log_posterior(lambda w, a: a @ w,
                                  functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA),
                                  functools.partial(mm.gaussian_log_prior, sigma=PRIOR))
  y, w = jnp.ones(24), jnp.zeros(3)
  trace = (1 + 4 + 9) / SIGMA ** 2 + 3 / PRIOR ** 2
  for tx in (mm.hessian_free(nlp, damping="auto", learning_rate=0.0),
             mm.natural_gradient(nlp, damping="auto", learning_rate=0.0),
             mm.natural_gradient(nlp, damping="auto", learning_rate=0.0, solver="dense"),
             mm.newton(nlp, damping="auto", learning_rate=0.0, damping_factor=1.5)):
    state = tx.init(w)
    assert np.isnan(float(state.damping))
    _, state = jax.jit(lambda s, t=tx: t.update(jax.grad(nlp)(w, x, y), s, w,
                                                batch=(x, y)))(state)
    np.testing.assert_allclose(float(state.damping) * 1.5, trace / 3, rtol=1e-12)


def test_auto_damping_avoids_the_rejections_of_the_contract_default(mlp387):
  nlp, p0, batch = mlp387
  _, fixed, _ = _run(mm.hessian_free(nlp, maxiter=20), nlp, p0, batch, 8)
  _, auto, losses = _run(mm.hessian_free(nlp, damping="auto", maxiter=20), nlp, p0, batch, 8)
  n_fixed = sum(bool(s.rejected) for s in fixed)
  n_auto = sum(bool(s.rejected) for s in auto)
  assert n_fixed >= 3 and n_auto <= 1, (n_fixed, n_auto)
  assert losses[-1] < losses[0]


# --- curvature minibatch ------------------------------------------------------------

def _one_update(tx, nlp, p, batch, **extra):
  return jax.jit(lambda p: tx.update(jax.grad(nlp)(p, *batch), tx.init(p), p,
                                     batch=batch, **extra))(p)


@pytest.mark.parametrize("make", [
    lambda nlp, **kw: mm.hessian_free(nlp, damping=3.0, maxiter=30, tol=1e-14, **kw),
    lambda nlp, **kw: mm.natural_gradient(nlp, damping=3.0, tol=1e-14, **kw)],
    ids=["hessian_free", "natural_gradient"])
def test_curvature_batch_is_rescaled_to_the_gradient_batch(make):
  """A batch stacked twice (N = 2B) holds the data of the batch: the batch's
  curvature rescaled by 2B / B is the stacked batch's. The fraction 1/2 of the
  stacked batch is the batch again."""
  nlp, p0, (x, y) = _linear_gaussian()
  p0 = jax.tree_util.tree_map(lambda a: a + 0.2, p0)
  twice = (jnp.concatenate([x, x]), jnp.concatenate([y, y]))
  ref = _flat(_one_update(make(nlp), nlp, p0, twice)[0])
  got = _flat(_one_update(make(nlp), nlp, p0, twice, curvature_batch=(x, y))[0])
  np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-13)
  half = _flat(_one_update(make(nlp, curvature_fraction=0.5), nlp, p0, twice)[0])
  np.testing.assert_allclose(half, ref, rtol=1e-9, atol=1e-13)
  other = _flat(_one_update(make(nlp), nlp, p0, twice, curvature_batch=(x[:5], y[:5]))[0])
  assert np.abs(other - ref).max() > 1e-3  # a different curvature batch matters


def test_hessian_free_step_uses_the_curvature_batch_hessian():
  """Against ``-(H_c + lam I)^{-1} g``: ``g`` on the batch, ``H_c`` the Hessian of
  the hand-written loss on the first 12 examples with the likelihood scaled by 24/12."""
  nlp, p0, (x, y) = _linear_gaussian()
  p0 = jax.tree_util.tree_map(lambda a: a + 0.2, p0)
  lam, lr = 10.0, 0.5
  flat0 = jnp.asarray(_flat(p0))
  g = np.asarray(jax.grad(_hand_loss)(flat0, x, y))
  hc = np.asarray(jax.hessian(_hand_loss)(flat0, x[:12], y[:12], scale=2.0))
  d = -lr * np.linalg.solve(hc + lam * np.eye(g.size), g)
  for extra, kw in (({"curvature_batch": (x[:12], y[:12])}, {}),
                    ({}, {"curvature_fraction": 0.5})):
    tx = mm.hessian_free(nlp, damping=lam, maxiter=40, tol=1e-14, learning_rate=lr, **kw)
    u, s = _one_update(tx, nlp, p0, (x, y), **extra)
    assert not bool(s.rejected)
    np.testing.assert_allclose(_flat(u), d, rtol=1e-9, atol=1e-12)


def test_bad_curvature_batches_raise():
  nlp, p0, (x, y) = _linear_gaussian()
  g = jax.grad(nlp)(p0, x, y)
  tx = mm.hessian_free(nlp)
  with pytest.raises(ValueError, match=r"curvature_batch must be a pair"):
    tx.update(g, tx.init(p0), p0, batch=(x, y), curvature_batch=x)
  with pytest.raises(ValueError, match=r"cannot be evaluated on the curvature_batch"):
    tx.update(g, tx.init(p0), p0, batch=(x, y), curvature_batch=(x[:, :2], y))
  for frac in (0.0, 1.5, -0.1, "half", True):
    with pytest.raises(ValueError, match=r"curvature_fraction must be None or a number"):
      mm.natural_gradient(nlp, curvature_fraction=frac)
  f = lambda w, a, t: jnp.sum((a @ w["w"] + w["b"] - t) ** 2)  # noqa: E731
  tx = mm.hessian_free(f, curvature="hessian")
  with pytest.raises(TypeError, match=r"curvature_batch needs a negative_log_posterior"):
    tx.update(g, tx.init(p0), p0, batch=(x, y), curvature_batch=(x, y))
  for bad in ("big", None, -1.0, True):
    with pytest.raises(ValueError, match=r"hessian_free: damping must be"):
      mm.hessian_free(nlp, damping=bad)


# --- masked parameters: optax.multi_transform ----------------------------------------

def _two_layer(seed=0):
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x[:120] / 16.0), jnp.asarray(y[:120])
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {"hidden": {"w": jax.random.normal(k1, (64, 8)) / 8, "b": jnp.zeros(8)},
            "head": {"w": jax.random.normal(k2, (8, 10)) / 3, "b": jnp.zeros(10)}}

  def apply(p, a):
    return jnp.tanh(a @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["head"]["w"] + p["head"]["b"]
  nlp = mm.negative_log_posterior(apply, mm.categorical_log_likelihood,
                                  mm.gaussian_log_prior)
  return nlp, params, (x, y)


@pytest.mark.parametrize("make", [
    pytest.param(lambda nlp: mm.hessian_free(nlp, damping="auto", maxiter=10),
                 id="hessian_free"),
    pytest.param(lambda nlp: mm.natural_gradient(nlp, damping="auto", maxiter=10),
                 id="natural_gradient", marks=pytest.mark.slow),
    pytest.param(lambda nlp: mm.newton(nlp, damping=1.0), id="newton",
                 marks=pytest.mark.slow),
    pytest.param(lambda nlp: mm.nonlinear_cg(nlp), id="nonlinear_cg",
                 marks=pytest.mark.slow)])
def test_multi_transform_equals_the_optimizer_on_the_restricted_objective(make):
  """mlmap on the head, adam on the hidden layer. The head's updates equal those of
  the same optimizer on the objective of the head alone (the hidden layer closed
  over as a constant); the hidden layer's equal adam's."""
  nlp, params, batch = _two_layer()
  labels = {"hidden": {"w": "adam", "b": "adam"}, "head": {"w": "mlmap", "b": "mlmap"}}
  tx = optax.multi_transform({"mlmap": make(nlp), "adam": optax.adam(1e-2)}, labels)
  step = mm.make_train_step(nlp, tx)
  p, state = params, tx.init(params)
  for _ in range(3):
    p, state, m = step(p, state, batch)
    assert not bool(m["skipped"])

  hidden = params["hidden"]
  sub_nlp = mm.negative_log_posterior(
      lambda h, a: nlp.apply_fn({"hidden": hidden, "head": h}, a), mm.categorical_log_likelihood,
      lambda h: mm.gaussian_log_prior({"hidden": hidden, "head": h}))
  sub_tx = make(sub_nlp)
  sub_step = mm.make_train_step(sub_nlp, sub_tx)
  ref_state = sub_tx.init(params["head"])
  ref_head, ref_state, _ = sub_step(params["head"], ref_state, batch)
  p1, _, _ = step(params, tx.init(params), batch)
  np.testing.assert_allclose(_flat(p1["head"]), _flat(ref_head), rtol=1e-9, atol=1e-12)
  adam = optax.adam(1e-2)
  g = jax.grad(nlp)(params, *batch)["hidden"]
  u, _ = adam.update(g, adam.init(hidden), hidden)
  np.testing.assert_allclose(_flat(p1["hidden"]), _flat(optax.apply_updates(hidden, u)),
                             rtol=1e-12)
  assert float(nlp(p, *batch)) < float(nlp(params, *batch))


def test_masked_params_without_full_params_name_the_remedy():
  nlp, params, batch = _two_layer()
  labels = {"hidden": {"w": "adam", "b": "adam"}, "head": {"w": "mlmap", "b": "mlmap"}}
  tx = optax.multi_transform({"mlmap": mm.hessian_free(nlp), "adam": optax.adam(1e-2)},
                             labels)
  g = jax.grad(nlp)(params, *batch)
  with pytest.raises(ValueError, match=r"MaskedNode.*pass full_params=params"):
    tx.update(g, tx.init(params), params, batch=batch)


def test_rejected_non_finite_trial_step_keeps_its_grown_damping_through_train_step():
  """A step into a NaN region is rejected and the damping grows (3.375x); the train
  step keeps that state (rho is finite) instead of discarding it, so the run moves on.
  f = w^2/2 + 1e-9 log(w + 2): a step 5 (1 + lam)^-1 g long from w = 1 lands in
  the NaN region until lam > 2/3, and uphill until lam > 3/2."""
  f = lambda w, x, t: jnp.sum(0.5 * w ** 2 + 1e-9 * jnp.log(w + 2.0))  # noqa: E731
  for tx in (mm.hessian_free(f, curvature="hessian", damping=0.1, learning_rate=5.0,
                             warm_start=0.0),
             mm.newton(f, damping=0.1, learning_rate=5.0, damping_factor=1.5)):
    w, states, losses = _run(tx, f, jnp.ones(1), (jnp.zeros(1), jnp.zeros(1)), 4)
    assert [bool(s.rejected) for s in states] == [True, True, True, False]
    assert np.isfinite(float(states[0].rho))
    np.testing.assert_allclose([float(s.damping) for s in states[:3]],
                               [0.3375, 1.1390625, 3.84433594], rtol=1e-8)
    assert losses[-1] < losses[0]


def test_non_adaptive_optimizers_step_through_train_step():
  nlp, p0, batch = _linear_gaussian()
  for tx in (mm.natural_gradient(nlp, damping=1.0, adaptive=False),
             mm.newton(nlp, damping=1.0, adaptive=False)):
    _, states, losses = _run(tx, nlp, p0, batch, 3)
    assert float(states[-1].rho) == 0.0 and np.all(np.diff(losses) < 0), losses
