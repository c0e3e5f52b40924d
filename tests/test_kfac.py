"""K-FAC (``mm.kfac``) against the exact natural gradient where K-FAC is exact.

Where they must agree: one linear layer with a Gaussian likelihood has the GGN
``(X~^T X~) (x) (I / sigma^2)`` exactly (X~ with a column of ones for the bias),
so its K-FAC step equals the dense natural-gradient step
(``mm.natural_gradient(solver="dense")``) and the solve of ``jax.hessian`` of the
hand-written loss, to 1e-8 in float64: with ``damping_type="exact"`` for any
damping and Gaussian prior; with the factored damping only at ``lambda = 0``
and a flat prior (factored Tikhonov damping is an approximation otherwise).
Everywhere else (deeper nets) K-FAC is an approximation: the tests there check
the running averages, the inverse schedule, descent and the NaN guards.
"""

import dataclasses
import functools

import numpy as np
import pytest
from sklearn.datasets import load_digits

import jax
import jax.numpy as jnp
import optax

import mlmap as mm

SIGMA, PRIOR = 0.5, 2.0


def _linear(prior=True, n=32, d=4, k=3, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, d)) + 0.3
  y = x @ jax.random.normal(kw, (d, k)) + 0.2 * jnp.cos(jnp.arange(n * k).reshape(n, k))
  nlp = mm.negative_log_posterior(
      lambda p, a: a @ p["w"] + p["b"],
      functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA),
      functools.partial(mm.gaussian_log_prior, sigma=PRIOR) if prior else None)
  p0 = {"w": 0.1 * jnp.ones((d, k)), "b": -0.2 * jnp.ones(k)}
  return nlp, p0, (x, y)


def _flat(p):
  return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(p)])


def _update(tx, nlp, p, batch, state=None, **extra):
  state = tx.init(p) if state is None else state
  return jax.jit(lambda p, s: tx.update(jax.grad(nlp)(p, *batch), s, p, batch=batch,
                                        **extra))(p, state)


def _hessian_step(nlp, p, batch, lam):
  """``-(H + lam I)^{-1} g`` with ``H = jax.hessian`` of the objective (= F here)."""
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  f = lambda v: nlp(unravel(v), *batch)  # noqa: E731
  h, g = np.asarray(jax.hessian(f)(flat)), np.asarray(jax.grad(f)(flat))
  return _flat(unravel(jnp.asarray(-np.linalg.solve(h + lam * np.eye(g.size), g))))


@pytest.mark.parametrize("damping_type, lam, prior", [
    ("exact", 0.7, True), ("exact", 0.0, True), ("factored", 0.0, False)])
def test_one_linear_gaussian_layer_step_equals_the_exact_natural_gradient(damping_type, lam,
                                                                         prior):
  nlp, p0, batch = _linear(prior=prior)
  tx = mm.kfac(nlp, learning_rate=1.0, damping=lam, damping_type=damping_type,
               adaptive=False, example_inputs=batch[0])
  u, state = _update(tx, nlp, p0, batch)
  ng = mm.natural_gradient(nlp, damping=lam, solver="dense", adaptive=False)
  ref, _ = _update(ng, nlp, p0, batch)
  np.testing.assert_allclose(_flat(u), _flat(ref), rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(_flat(u), _hessian_step(nlp, p0, batch, lam), rtol=1e-8,
                             atol=1e-12)
  assert not bool(state.nonfinite) and int(state.count) == 1


def test_factored_damping_is_the_kronecker_of_damped_factors():
  """Sec. 6.3: ``(A + pi sqrt(lam) I)^{-1} W (G + sqrt(lam)/pi I)^{-1}`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, flat prior, built from
  the state's own factors by numpy."""
  nlp, p0, batch = _linear(prior=False)
  lam = 3.0
  tx = mm.kfac(nlp, damping=lam, adaptive=False, example_inputs=batch[0])
  u, state = _update(tx, nlp, p0, batch)
  a, g = np.asarray(state.A[0]), np.asarray(state.G[0])
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  grads = jax.grad(nlp)(p0, *batch)
  w = np.vstack([np.asarray(grads["w"]), np.asarray(grads["b"])[None]])  # (in + 1, out)
  v = np.linalg.solve(a + pi * np.sqrt(lam) * np.eye(a.shape[0]), w)
  v = np.linalg.solve(g + np.sqrt(lam) / pi * np.eye(g.shape[0]), v.T).T
  np.testing.assert_allclose(np.asarray(u["w"]), -v[:-1], rtol=1e-9)
  np.testing.assert_allclose(np.asarray(u["b"]), -v[-1], rtol=1e-9)


def test_adaptive_steps_gram_matrix_equals_ggn_products():
  """The adaptive step's ``[v_i^T G v_j]`` (JVPs only) equals ``mm.ggn_vp`` dotted."""
  from mlmap.curvature import ggn_quadratic_forms
  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  x, y = jax.random.normal(ks[0], (12, 5)), jax.random.randint(ks[1], (12,), 0, 3)
  nlp = mm.negative_log_posterior(
      lambda p, a: jnp.tanh(a @ p["w1"]) @ p["w2"], mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=0.7), num_data=40)
  p = {"w1": jax.random.normal(ks[2], (5, 4)), "w2": jax.random.normal(ks[3], (4, 3))}
  vs = [jax.tree_util.tree_map(lambda a, k=k: jax.random.normal(k, a.shape), p)
        for k in ks[4:]]
  got = jax.jit(lambda p, vs: ggn_quadratic_forms(nlp, p, x, y, vs))(p, vs)
  want = [[float(mm.linalg.tree_vdot(u, mm.ggn_vp(nlp, p, v, x, y))) for v in vs]
          for u in vs]
  np.testing.assert_allclose(np.asarray(got), np.array(want), rtol=1e-10, atol=1e-12)


def test_running_averages_and_the_inverse_schedule():
  """``F <- beta F + (1 - beta) F_new`` (the first update takes ``F_new``); the
  eigendecompositions are those of the factors at counts 0, T, 2T, ... and stale
  in between."""
  nlp, p0, (x, y) = _linear()
  beta, period = 0.8, 3
  tx = mm.kfac(nlp, damping=1.0, decay=beta, inverse_every=period, adaptive=False,
               example_inputs=x[:8])
  batches = [(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]) for i in range(4)]
  single = [mm.kron.kron_factors(nlp, p0, *b) for b in batches]
  p, state = p0, tx.init(p0)
  want_a = None
  for i, b in enumerate(batches):
    fresh = mm.kron.kron_factors(nlp, p, *b)
    want_a = fresh.A[0] if want_a is None else beta * want_a + (1 - beta) * fresh.A[0]
    u, state = _update(tx, nlp, p, b, state)
    np.testing.assert_allclose(state.A[0], want_a, rtol=1e-12)
    if i % period == 0:
      last_eig = np.linalg.eigvalsh(np.asarray(state.A[0]))
    np.testing.assert_allclose(np.sort(np.asarray(state.a_eigvals[0])), last_eig, rtol=1e-9,
                               atol=1e-12)
    p = optax.apply_updates(p, u)
  assert not np.allclose(single[0].A[0], single[1].A[0])  # the batches differ


def _digits_mlp():
  x, y = load_digits(return_X_y=True)
  x, y = jnp.asarray(x[:256] / 16.0), jnp.asarray(y[:256])
  sizes = [64, 32, 16, 10]
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  params = [{"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]

  def apply(p, a):
    for i, layer in enumerate(p):
      a = a @ layer["w"] + layer["b"]
      a = jnp.tanh(a) if i < len(p) - 1 else a
    return a
  nlp = mm.negative_log_posterior(apply, mm.categorical_log_likelihood,
                                  mm.gaussian_log_prior)
  return nlp, params, (x, y)


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="adaptive"),
    pytest.param({"damping_type": "exact"}, id="adaptive-exact", marks=pytest.mark.slow),
    pytest.param({"adaptive": False, "learning_rate": 0.2}, id="fixed",
                 marks=pytest.mark.slow)])
def test_kfac_trains_a_digits_mlp_monotonically_and_faster_than_gradient_descent(kw):
  nlp, p0, batch = _digits_mlp()
  tx = mm.kfac(nlp, damping="auto", inverse_every=5, example_inputs=batch[0], **kw)
  step = mm.make_train_step(nlp, tx)
  p, state, losses = p0, tx.init(p0), []
  for _ in range(25):
    p, state, m = step(p, state, batch)
    assert not bool(m["skipped"])
    losses.append(float(m["loss"]))
  losses.append(float(nlp(p, *batch)))
  if kw.get("adaptive", True):
    assert np.all(np.diff(losses) <= 1e-9 * losses[0])  # rejected steps are zero
  sgd = optax.sgd(1.0 / batch[0].shape[0])  # gradient descent at a stable rate
  sgd_step = mm.make_train_step(nlp, sgd)
  q, s = p0, sgd.init(p0)
  for _ in range(25):
    q, s, _ = sgd_step(q, s, batch)
  const = -float(mm.gaussian_log_prior(jax.tree_util.tree_map(jnp.zeros_like, p0)))
  kfac_gap, sgd_gap = losses[-1] - const, float(nlp(q, *batch)) - const  # both > 0
  assert 0 < kfac_gap < 0.5 * sgd_gap, (kfac_gap, sgd_gap)


def test_kfac_without_example_inputs_fills_its_state_on_the_first_update():
  nlp, p0, batch = _linear()
  lazy = mm.kfac(nlp, damping=1.0, adaptive=False)
  eager = mm.kfac(nlp, damping=1.0, adaptive=False, example_inputs=batch[0])
  assert lazy.init(p0).A is None
  u1, s1 = _update(lazy, nlp, p0, batch)
  u2, _ = _update(eager, nlp, p0, batch)
  np.testing.assert_allclose(_flat(u1), _flat(u2), rtol=1e-12)
  assert s1.A[0].shape == (5, 5) and s1.G[0].shape == (3, 3)


def test_non_finite_batch_gives_a_zero_update_and_keeps_the_factors():
  nlp, p0, (x, y) = _linear()
  tx = mm.kfac(nlp, damping=1.0, example_inputs=x)
  _, state = _update(tx, nlp, p0, (x, y))
  bad = (x.at[0, 0].set(jnp.nan), y)
  u, new = jax.jit(lambda s: tx.update(jax.grad(nlp)(p0, *bad), s, p0, batch=bad))(state)
  assert np.all(_flat(u) == 0) and bool(new.nonfinite) and bool(new.rejected)
  np.testing.assert_array_equal(new.A[0], state.A[0])
  assert np.isfinite(float(new.rho)) and np.isfinite(float(new.damping))


def test_curvature_batch_and_fraction_are_used_for_the_factors():
  nlp, p0, (x, y) = _linear()
  tx = mm.kfac(nlp, damping=1.0, adaptive=False, example_inputs=x)
  _, s_full = _update(tx, nlp, p0, (x, y))
  _, s_cb = _update(tx, nlp, p0, (x, y), curvature_batch=(x[:8], y[:8]))
  frac = mm.kfac(nlp, damping=1.0, adaptive=False, curvature_fraction=0.25, example_inputs=x)
  _, s_frac = _update(frac, nlp, p0, (x, y))
  want = mm.kron.kron_factors(dataclasses.replace(nlp, num_data=32), p0, x[:8], y[:8])
  for s in (s_cb, s_frac):
    np.testing.assert_allclose(s.G[0] * s.A[0][0, 0], want.G[0] * want.A[0][0, 0],
                               rtol=1e-12)
  assert not np.allclose(s_full.A[0], s_cb.A[0])


def test_bad_arguments_raise_with_the_value():
  nlp, p0, (x, y) = _linear()
  f = lambda p, a, t: jnp.sum((a @ p["w"] - t) ** 2)  # noqa: E731
  with pytest.raises(TypeError, match=r"kfac needs a negative_log_posterior"):
    mm.kfac(f)
  for kw, msg in [({"decay": 1.0}, r"decay must lie in \[0, 1\), got 1.0"),
                  ({"damping_type": "full"}, r"damping_type must be one of"),
                  ({"inverse_every": 0}, r"inverse_every must be an integer >= 1, got 0"),
                  ({"damping": "big"}, r"damping must be 'auto' or a number"),
                  ({"damping_factor": 1.0}, r"damping_factor must be a number > 1"),
                  ({"curvature_fraction": 2.0}, r"curvature_fraction must be None")]:
    with pytest.raises(ValueError, match=msg):
      mm.kfac(nlp, **kw)
  tx = mm.kfac(nlp, example_inputs=x[:, :3])  # allocated for another input width
  with pytest.raises(Exception):
    tx.init(p0)
  tx = mm.kfac(nlp)
  with pytest.raises(ValueError, match=r"pass batch=\(inputs, targets\)"):
    tx.update(jax.grad(nlp)(p0, x, y), tx.init(p0), p0)


def test_kfac_in_multi_transform_and_scan():
  """K-FAC on the head of a two-layer net, adam on the rest, in a lax.scan of
  train steps (the state keeps one structure: allocated from example_inputs)."""
  nlp, params, (x, y) = _digits_mlp()
  labels = [{"w": "adam", "b": "adam"}, {"w": "adam", "b": "adam"},
            {"w": "kfac", "b": "kfac"}]
  tx = optax.multi_transform({"kfac": mm.kfac(nlp, damping="auto"),
                              "adam": optax.adam(1e-2)}, labels)
  step = mm.make_train_step(nlp, tx, jit=False)
  p, s = params, tx.init(params)
  p, s, _ = jax.jit(step)(p, s, (x, y))  # the first update fills the lazy state

  def body(carry, _):
    p, s = carry
    p, s, m = step(p, s, (x, y))
    return (p, s), m["loss"]
  (p, s), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, length=10))((p, s))
  assert np.all(np.isfinite(np.asarray(losses)))
  assert float(nlp(p, x, y)) < float(nlp(params, x, y))


def test_matches_kfac_jax_on_an_mlp():
  """kfac-jax (the reference implementation; runs on jax 0.6.2, not 0.10.2: see
  docs/optimizers.md for the venv that runs this test) with
  fixed learning rate, no momentum, fixed damping and exact GGN factors: the first
  step on a tanh MLP with a Gaussian likelihood. kfac-jax averages the loss over
  the batch, mlmap sums it: mlmap's damping is N times kfac-jax's."""
  kfac_jax = pytest.importorskip("kfac_jax")
  n, lam, lr = 64, 1e-1, 0.5
  kx, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (n, 5))
  y = jnp.sin(x[:, :2])
  params = [{"w": jax.random.normal(k1, (5, 8)) / 3, "b": jnp.zeros(8)},
            {"w": jax.random.normal(k2, (8, 2)) / 3, "b": jnp.zeros(2)}]

  def apply(p, a):
    return jnp.tanh(a @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]

  def mean_loss(p, batch):
    out = apply(p, batch[0])
    kfac_jax.register_squared_error_loss(out, batch[1], weight=0.5)  # its loss is 0.5 * sum / B
    return 0.5 * jnp.mean(jnp.sum((out - batch[1]) ** 2, axis=-1))

  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(mean_loss), l2_reg=0.0,
      use_adaptive_learning_rate=False, use_adaptive_momentum=False,
      use_adaptive_damping=False, estimation_mode="ggn_exact", curvature_ema=0.0,
      inverse_update_period=1, num_burnin_steps=0, multi_device=False)
  key = jax.random.PRNGKey(1)
  state = opt.init(params, key, (x, y))
  # kfac-jax donates its params and state buffers: hand it copies.
  new, _, _ = opt.step(jax.tree_util.tree_map(jnp.copy, params), state, key, batch=(x, y),
                       global_step_int=0,
                       learning_rate=jnp.asarray(lr), momentum=jnp.asarray(0.0),
                       damping=jnp.asarray(lam))
  ref = _flat(new) - _flat(params)
  nlp = mm.negative_log_posterior(apply, functools.partial(mm.gaussian_log_likelihood,
                                                           sigma=1.0))
  tx = mm.kfac(nlp, learning_rate=lr, damping=n * lam, adaptive=False, example_inputs=x)
  u, _ = _update(tx, nlp, params, (x, y))
  np.testing.assert_allclose(_flat(u), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", [
    "gaussian", pytest.param("bernoulli", marks=pytest.mark.slow),
    pytest.param("categorical", marks=pytest.mark.slow)])
def test_sampled_output_factor_averages_to_the_exact_one(likelihood):
  """``kron_factors(..., key=)``: A is exact, G's mean over 4000 sampled targets is
  the exact G within 5 standard errors (entrywise, a CLT bound measured from the
  samples themselves)."""
  kx, kw = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (6, 3))
  ll = {"gaussian": functools.partial(mm.gaussian_log_likelihood, sigma=0.7),
        "bernoulli": mm.bernoulli_log_likelihood,
        "categorical": mm.categorical_log_likelihood}[likelihood]
  y = jnp.zeros(6, jnp.int32) if likelihood == "categorical" else jnp.zeros((6, 4))
  nlp = mm.negative_log_posterior(lambda p, a: jnp.tanh(a @ p["w1"]) @ p["w2"], ll)
  p = {"w1": jax.random.normal(kw, (3, 5)), "w2": jnp.ones((5, 4)) * 0.3}
  exact = mm.kron.kron_factors(nlp, p, x, y)
  draws = jax.jit(jax.vmap(lambda k: mm.kron.kron_factors(nlp, p, x, y, key=k).G))(
      jax.random.split(jax.random.PRNGKey(5), 4000))
  for l in range(2):
    g = np.asarray(draws[l])
    mean, se = g.mean(0), g.std(0) / np.sqrt(g.shape[0])
    assert np.all(np.abs(mean - np.asarray(exact.G[l])) <= 5 * se + 1e-12)
    np.testing.assert_allclose(mm.kron.kron_factors(nlp, p, x, y, key=jax.random.PRNGKey(0)).A[l],
                               exact.A[l], rtol=1e-12)
  with pytest.raises(ValueError, match=r"num_samples must be an int >= 1"):
    mm.kron.kron_factors(nlp, p, x, y, key=jax.random.PRNGKey(0), num_samples=0)


def test_kfac_with_sampled_factors_trains_the_digits_mlp():
  nlp, p0, batch = _digits_mlp()
  tx = mm.kfac(nlp, damping="auto", inverse_every=5, example_inputs=batch[0], mc_samples=1)
  step = mm.make_train_step(nlp, tx)
  p, s = p0, tx.init(p0)
  const = -float(mm.gaussian_log_prior(jax.tree_util.tree_map(jnp.zeros_like, p0)))
  start = float(nlp(p0, *batch)) - const
  for _ in range(25):
    p, s, m = step(p, s, batch)
    assert not bool(m["skipped"])
  assert float(nlp(p, *batch)) - const < 0.1 * start
  with pytest.raises(ValueError, match=r"mc_samples must be an integer >= 1"):
    mm.kfac(nlp, mc_samples=0)
