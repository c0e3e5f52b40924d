"""Tests of mlmap's second-order optax transformations against independent optima.

References: scipy.optimize (trust-exact / L-BFGS-B on numpy-coded objectives and
gradients, polished to a gradient norm of ~1e-10), numpy IRLS steps, and the
strong Wolfe conditions evaluated directly.
"""

import functools

import numpy as np
import pytest
import scipy.optimize as so
from sklearn.datasets import load_breast_cancer, load_digits, load_iris

import jax
import jax.numpy as jnp
import optax

import mlmap as mm

PRIOR_SIGMA = 1.0


# --- problems and independent references ---------------------------------------

def _standardize(x):
  return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)


@pytest.fixture(scope="module")
def logistic():
  """L2 logistic regression on breast_cancer; optimum by scipy trust-exact."""
  x, y = load_breast_cancer(return_X_y=True)
  x = _standardize(x)
  a = np.hstack([x, np.ones((len(x), 1))])
  penalty = np.r_[np.ones(30), 0.0] / PRIOR_SIGMA**2  # no prior on the bias

  def fun(v):
    z = a @ v
    p = 1.0 / (1.0 + np.exp(-z))
    f = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * v * v)
    return f, a.T @ (p - y) + penalty * v

  def hess(v):
    p = 1.0 / (1.0 + np.exp(-(a @ v)))
    return a.T @ ((p * (1 - p))[:, None] * a) + np.diag(penalty)

  v = so.minimize(fun, np.zeros(31), jac=True, hess=hess, method="trust-exact",
                  options=dict(gtol=1e-12)).x
  for _ in range(2):  # numpy Newton polish
    v = v - np.linalg.solve(hess(v), fun(v)[1])
  assert np.abs(fun(v)[1]).max() < 1e-9
  nlp = mm.negative_log_posterior(
      lambda p, inp: inp @ p["w"] + p["b"], mm.bernoulli_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma={"w": PRIOR_SIGMA, "b": None}))
  params0 = {"w": jnp.zeros(30), "b": jnp.zeros(())}
  return dict(nlp=nlp, batch=(jnp.asarray(x), jnp.asarray(y, float)), ref=v,
              flat=lambda p: np.r_[np.asarray(p["w"]), float(p["b"])],
              params0=params0, fun=fun, hess=hess)


def _softmax_problem(x, y, k, sigma):
  x = _standardize(x)
  n, d = x.shape
  onehot = np.eye(k)[y]

  def fun(v):
    w, b = v[:d * k].reshape(d, k), v[d * k:]
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1))
    p = np.exp(z - lse[:, None])
    f = np.sum(lse - np.sum(onehot * z, 1)) + 0.5 * v @ v / sigma**2
    r = p - onehot
    return f, np.r_[(x.T @ r).ravel(), r.sum(0)] + v / sigma**2

  v = so.minimize(fun, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                  options=dict(gtol=1e-13, ftol=0.0, maxiter=20000, maxcor=50)).x
  assert np.abs(fun(v)[1]).max() < 1e-7
  nlp = mm.negative_log_posterior(
      lambda p, inp: inp @ p["w"] + p["b"], mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=sigma))
  params0 = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
  return dict(nlp=nlp, batch=(jnp.asarray(x), jnp.asarray(y)), ref=v,
              flat=lambda p: np.r_[np.asarray(p["w"]).ravel(), np.asarray(p["b"])],
              params0=params0)


@pytest.fixture(scope="module")
def softmax_iris():
  x, y = load_iris(return_X_y=True)
  return _softmax_problem(x, y, 3, sigma=2.0)


@pytest.fixture(scope="module")
def softmax_digits():
  x, y = load_digits(return_X_y=True)
  return _softmax_problem(x[:300], y[:300], 10, sigma=1.0)


def _run(problem, tx, steps, params=None):
  """``steps`` jitted updates; returns params, state and relative errors per step."""
  nlp, batch = problem["nlp"], problem["batch"]

  @jax.jit
  def step(params, state):
    grads = jax.grad(nlp)(params, *batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  params = problem["params0"] if params is None else params
  state = tx.init(params)
  errors = []
  ref = problem["ref"]
  for _ in range(steps):
    params, state = step(params, state)
    errors.append(np.linalg.norm(problem["flat"](params) - ref) / np.linalg.norm(ref))
  return params, state, np.array(errors)


# --- convergence to the independent optimum -------------------------------------

@pytest.mark.parametrize("name", ["logistic", "softmax_iris"])
def test_newton_reaches_optimum_in_12_steps(name, request):
  problem = request.getfixturevalue(name)
  _, state, errors = _run(problem, mm.newton(problem["nlp"]), 12)
  assert errors[-1] < 1e-6, errors
  assert int(state.count) == 12 and not bool(state.rejected)
  assert np.all(np.diff(errors[-3:]) <= 1e-12) or errors[-1] < 1e-9


@pytest.mark.parametrize("name,kwargs", [
    ("logistic", dict(curvature="ggn")),
    ("softmax_iris", dict(curvature="hessian")),
    ("softmax_iris", dict(curvature="ggn", preconditioner="diagonal")),
    pytest.param("softmax_iris", dict(curvature="ggn"), marks=pytest.mark.slow),
    pytest.param("logistic", dict(curvature="hessian"), marks=pytest.mark.slow),
    pytest.param("logistic", dict(curvature="ggn", preconditioner="diagonal"),
                 marks=pytest.mark.slow),
])
def test_hessian_free_reaches_optimum_in_30_steps(name, kwargs, request):
  problem = request.getfixturevalue(name)
  _, state, errors = _run(problem, mm.hessian_free(problem["nlp"], **kwargs), 30)
  assert errors[-1] < 1e-6, errors
  assert int(state.cg_iterations) >= 1
  assert not bool(state.negative_curvature) and not bool(state.fallback)


def test_hessian_free_matrix_free_on_digits(softmax_digits):
  _, state, errors = _run(softmax_digits, mm.hessian_free(softmax_digits["nlp"]), 30)
  assert errors[-1] < 1e-6, errors
  assert np.isfinite(float(state.rho))


@pytest.mark.parametrize("name,solver", [
    ("logistic", "cg"), ("softmax_iris", "dense"),
    pytest.param("softmax_iris", "cg", marks=pytest.mark.slow),
    pytest.param("logistic", "dense", marks=pytest.mark.slow)])
def test_natural_gradient_reaches_optimum_in_30_steps(name, solver, request):
  problem = request.getfixturevalue(name)
  _, state, errors = _run(problem, mm.natural_gradient(problem["nlp"], solver=solver), 30)
  assert errors[-1] < 1e-6, errors
  assert not bool(state.fallback)


def test_nonlinear_cg_reaches_optimum(logistic):
  _, state, errors = _run(logistic, mm.nonlinear_cg(logistic["nlp"]), 150)
  assert errors[-1] < 1e-4, errors[::10]
  assert np.all(np.isfinite(errors))


def test_nonlinear_cg_step_satisfies_strong_wolfe(softmax_iris):
  nlp, batch = softmax_iris["nlp"], softmax_iris["batch"]
  c1, c2 = 1e-4, 0.1
  tx = mm.nonlinear_cg(nlp, c1=c1, c2=c2)
  params, state = softmax_iris["params0"], tx.init(softmax_iris["params0"])
  vg = jax.jit(jax.value_and_grad(nlp))
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))
  for _ in range(4):
    f0, g0 = vg(params, *batch)
    updates, state = update(g0, state, params)
    new = optax.apply_updates(params, updates)
    f1, g1 = vg(new, *batch)
    slope0 = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(updates)))
    slope1 = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(updates)))
    assert slope0 < 0  # descent direction
    assert f1 <= f0 + c1 * slope0  # sufficient decrease (alpha folded into updates)
    assert abs(slope1) <= c2 * abs(slope0) + 1e-10  # strong curvature condition
    params = new


# --- natural gradient = Newton = IRLS for a canonical-link linear model ---------

def test_natural_gradient_step_equals_newton_and_irls(logistic):
  nlp, batch = logistic["nlp"], logistic["batch"]
  params = {"w": jnp.linspace(-0.3, 0.3, 30), "b": jnp.asarray(0.2)}
  grads = jax.grad(nlp)(params, *batch)

  def one(tx):
    u, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch))(grads, params)
    return logistic["flat"](u)

  v = logistic["flat"](params)
  irls = -np.linalg.solve(logistic["hess"](v), logistic["fun"](v)[1])
  newton = one(mm.newton(nlp, adaptive=False))
  ng_dense = one(mm.natural_gradient(nlp, damping=0.0, solver="dense"))
  ng_cg = one(mm.natural_gradient(nlp, damping=0.0, maxiter=200, tol=1e-13))
  np.testing.assert_allclose(newton, irls, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ng_dense, irls, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ng_cg, irls, rtol=1e-7, atol=1e-9)


# --- damping, negative curvature, never NaN -------------------------------------

def _cauchy_problem():
  """Robust (Cauchy-likelihood) regression: non-convex, undamped Newton diverges."""
  x = jnp.linspace(-1.0, 1.0, 20)
  t = 0.5 * x + 0.1 * jnp.sin(7 * x)

  def objective(w, inputs, targets):
    r = inputs * w[0] + w[1] - targets
    return jnp.sum(jnp.log1p(r * r))
  return objective, (x, t), jnp.array([4.0, -3.0])


def test_undamped_newton_diverges_damped_newton_and_hf_converge():
  objective, batch, w0 = _cauchy_problem()
  vg = jax.jit(jax.value_and_grad(objective))
  hess = jax.jit(jax.hessian(objective))
  # The reference: raw Newton steps w - H^{-1} g (numpy) climb and run away.
  w, f_start = np.asarray(w0), float(vg(w0, *batch)[0])
  for _ in range(5):
    w = w - np.linalg.solve(np.asarray(hess(w, *batch)), np.asarray(vg(w, *batch)[1]))
  assert float(vg(jnp.asarray(w), *batch)[0]) > 3 * f_start and np.abs(w).max() > 50

  for tx in [mm.newton(objective), mm.hessian_free(objective, curvature="hessian",
                                                   damping=1.0)]:
    @jax.jit
    def step(w, state, tx=tx):
      f, g = jax.value_and_grad(objective)(w, *batch)
      u, state = tx.update(g, state, w, batch=batch)
      return optax.apply_updates(w, u), state, f

    w, state = w0, tx.init(w0)
    losses, dampings, rejected = [], [], []
    for _ in range(40):
      w_old = w
      w, state, f = step(w, state)
      losses.append(float(f))
      dampings.append(float(state.damping))
      rejected.append(bool(state.rejected))
      assert np.all(np.isfinite(np.asarray(w)))
      if hasattr(state, "direction"):  # HF warm start: the accepted step, or zeros
        np.testing.assert_allclose(state.direction, w - w_old, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(losses) <= 1e-12), losses  # monotone: uphill steps rejected
    k = rejected.index(True)  # some full step went uphill: rejected, damping grown
    assert dampings[k] > dampings[k - 1] if k > 0 else dampings[0] > 0
    assert dampings[-1] < max(dampings)  # and shrunk again once the model fit (rho > 3/4)
    assert float(jnp.linalg.norm(vg(w, *batch)[1])) < 1e-6
    assert losses[-1] < 0.1 < losses[0]


def test_newton_at_indefinite_hessian_grows_damping():
  # Saddle-shaped objective; at w0 the Hessian diag(2, -2 + 3 w1^2) is indefinite.
  def objective(w, inputs, targets):
    del inputs, targets
    return w[0] ** 2 - w[1] ** 2 + 0.25 * w[1] ** 4
  dummy = (jnp.zeros((1, 1)), jnp.zeros(1))
  w0 = jnp.array([1.0, 0.1])
  assert np.linalg.eigvalsh(np.asarray(jax.hessian(objective)(w0, *dummy))).min() < 0
  for adaptive, tx in [(True, mm.newton(objective)), (False, mm.newton(objective, adaptive=False)),
                       (True, mm.hessian_free(objective, curvature="hessian", damping=0.0))]:
    @jax.jit
    def step(w, state, tx=tx):
      u, state = tx.update(jax.grad(objective)(w, *dummy), state, w, batch=dummy)
      w = optax.apply_updates(w, u)
      return w, state, objective(w, *dummy)

    f0 = objective(w0, *dummy)
    w, state, _ = step(w0, tx.init(w0))
    assert np.all(np.isfinite(np.asarray(w)))
    assert bool(state.negative_curvature | getattr(state, "fallback", False))
    for _ in range(40):
      w, state, f = step(w, state)
      assert np.all(np.isfinite(np.asarray(w)))
      assert f <= f0 or not adaptive
    if adaptive:
      np.testing.assert_allclose(np.abs(np.asarray(w)), [0.0, np.sqrt(2.0)], atol=1e-6)


def test_nan_batch_gives_zero_update_not_nan():
  objective, (x, t), w0 = _cauchy_problem()
  bad = (x.at[3].set(jnp.nan), t)
  g = jax.grad(objective)(w0, *bad)
  for tx in [mm.newton(objective), mm.hessian_free(objective, curvature="hessian")]:
    u, state = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p, batch=bad))(g, w0)
    assert np.all(np.asarray(u) == 0) and bool(state.rejected)
  assert int(state.cg_status) == mm.CGStatus.BREAKDOWN  # hessian_free's NaN products


# --- CG status in the optimizer states (issue 10, item 9) ---------------------------

@pytest.mark.parametrize("maxiter, tol", [(2, 1e-12), (200, 1e-6)])
def test_hessian_free_cg_status_matches_a_direct_dense_solve(logistic, maxiter, tol):
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  tx = mm.hessian_free(nlp, damping=1e-3, maxiter=maxiter, tol=tol)
  grads = jax.grad(nlp)(p0, *batch)
  _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch))(grads, p0)
  # Logistic regression: GGN = Hessian, the numpy reference matrix.
  a = logistic["hess"](np.zeros(31)) + 1e-3 * np.eye(31)
  g = logistic["fun"](np.zeros(31))[1]
  _, info = mm.cg(lambda v: a @ v, -g, maxiter=maxiter, tol=tol)
  assert int(state.cg_status) == int(info.status)
  # Same system; the iteration count may differ by rounding of the products.
  assert abs(int(state.cg_iterations) - int(info.iterations)) <= 3
  expected = mm.CGStatus.MAX_ITERATIONS if maxiter == 2 else mm.CGStatus.CONVERGED
  assert int(state.cg_status) == expected
  assert state.cg_status.dtype == jnp.int32 and tx.init(p0).cg_status.dtype == jnp.int32


def test_natural_gradient_cg_status_and_nan_batch(logistic):
  nlp, (x, y), p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  grads = jax.grad(nlp)(p0, x, y)
  for solver, maxiter, expected in [("cg", 100, mm.CGStatus.CONVERGED),
                                    ("cg", 1, mm.CGStatus.MAX_ITERATIONS),
                                    ("dense", 100, mm.CGStatus.CONVERGED)]:
    tx = mm.natural_gradient(nlp, solver=solver, maxiter=maxiter)
    _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=(x, y)))(grads, p0)
    assert int(state.cg_status) == expected, (solver, maxiter)
  # NaN inputs: the Fisher products are NaN; flagged, and no NaN update.
  bad = (x.at[3, 0].set(jnp.nan), y)
  g_bad = jax.grad(nlp)(p0, *bad)
  for solver in ["cg", "dense"]:
    tx = mm.natural_gradient(nlp, solver=solver)
    u, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=bad))(g_bad, p0)
    assert int(state.cg_status) == mm.CGStatus.BREAKDOWN and bool(state.fallback), solver
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(u)), solver


# --- trace-time checks (issue 10: dense refusal, scalar objective, item 3) ---------

def test_dense_optimizers_refuse_above_max_bytes(logistic):
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  need = 31 * 31 * 8
  grads = jax.grad(nlp)(p0, *batch)
  for name, make in [("newton", lambda mb: mm.newton(nlp, max_bytes=mb)),
                     ("natural_gradient",
                      lambda mb: mm.natural_gradient(nlp, solver="dense", max_bytes=mb))]:
    with pytest.raises(ValueError, match=rf"^{name}: the dense \(31, 31\) float64 .*"
                       rf"max_bytes={need - 1}.*Pass a larger max_bytes= to {name}"):
      make(need - 1).init(p0)
    state = make(need).init(p0)  # exactly enough
    with pytest.raises(ValueError, match=rf"^{name}: .*max_bytes"):
      jax.jit(lambda g, s, p: make(need - 1).update(g, s, p, batch=batch))(grads, state, p0)
    u, _ = jax.jit(lambda g, s, p: make(need).update(g, s, p, batch=batch))(grads, state, p0)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(u))
    for bad in [0, -1.0, "2GB", True]:
      with pytest.raises(ValueError, match=rf"{name}: max_bytes must be a positive number"):
        make(bad)
  # The matrix-free solver never builds the matrix, so max_bytes does not apply.
  tx = mm.natural_gradient(nlp, solver="cg", max_bytes=8)
  tx.update(grads, tx.init(p0), p0, batch=batch)


def _all_optimizers(nlp):
  return {"newton": mm.newton(nlp), "hessian_free": mm.hessian_free(nlp),
          "hessian_free-hessian": mm.hessian_free(nlp, curvature="hessian"),
          "natural_gradient": mm.natural_gradient(nlp),
          "natural_gradient-dense": mm.natural_gradient(nlp, solver="dense"),
          "nonlinear_cg": mm.nonlinear_cg(nlp)}


def test_non_scalar_objective_raises_with_its_shape(logistic):
  (x, y), p0 = logistic["batch"], logistic["params0"]
  # A prior that forgot to sum returns one term per weight: nlp is shape (30,).
  nlp = mm.negative_log_posterior(lambda p, inp: inp @ p["w"] + p["b"],
                                  mm.bernoulli_log_likelihood, lambda p: -0.5 * p["w"] ** 2)
  grads = jax.tree.map(jnp.ones_like, p0)
  for name, tx in _all_optimizers(nlp).items():
    fn = name.split("-")[0]
    with pytest.raises(ValueError, match=rf"^{fn}: objective must return a scalar.*"
                       r"returned shape \(30,\)"):
      jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p, batch=(x, y)))(grads, p0)
  per_example = lambda w, inp, t: (inp @ w - t) ** 2  # a plain function, shape (569,)
  w0 = jnp.zeros(30)
  for tx in [mm.newton(per_example), mm.hessian_free(per_example, curvature="hessian"),
             mm.nonlinear_cg(per_example)]:
    with pytest.raises(ValueError, match=r"objective must return a scalar.*shape \(569,\)"):
      tx.update(w0, tx.init(w0), w0, batch=(x, y))


def test_non_floating_params_leaf_raises_naming_its_path(logistic):
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  bad = {**p0, "step": jnp.array(1000)}
  for name, tx in _all_optimizers(nlp).items():
    fn = name.split("-")[0]
    with pytest.raises(TypeError, match=rf"^{fn}: params .*'step' \(int"):
      tx.init(bad)
    with pytest.raises(TypeError, match=rf"^{fn}: params .*'step'"):
      tx.update(bad, tx.init(p0), bad, batch=batch)
  with pytest.raises(TypeError, match=r"'mask' \(bool\)"):
    mm.newton(nlp).init({**p0, "mask": jnp.ones(3, bool)})


def test_iteration_counts_must_be_integers(logistic):
  nlp = logistic["nlp"]
  for make in [mm.hessian_free, mm.natural_gradient]:
    for bad in [0, 2.5, True, "10", jnp.asarray(0), jnp.asarray(2.5), jnp.asarray(True),
                jnp.ones(2)]:
      with pytest.raises(ValueError, match=r"maxiter must be an integer >= 1"):
        make(nlp, maxiter=bad)
    make(nlp, maxiter=20.0)  # an integral float is fine
    make(nlp, maxiter=jnp.asarray(20))  # a concrete 0-d array (optax.inject_hyperparams init)
  with pytest.raises(ValueError, match="max_linesearch_steps must be an integer >= 1, got 0"):
    mm.nonlinear_cg(nlp, max_linesearch_steps=0)
  with pytest.raises(ValueError, match=r"restart_every \(or None\) must be an integer >= 1"):
    mm.nonlinear_cg(nlp, restart_every=0.5)


# --- optax composition -------------------------------------------------------------

def test_chains_with_optax_scale_clipping_and_schedules(logistic):
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  grads = jax.grad(nlp)(p0, *batch)

  def first_update(tx):
    u, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch))(grads, p0)
    return logistic["flat"](u)

  base = first_update(mm.natural_gradient(nlp))
  half = first_update(optax.chain(mm.natural_gradient(nlp), optax.scale(0.5)))
  np.testing.assert_allclose(half, 0.5 * base, rtol=1e-12)
  sched = first_update(mm.natural_gradient(nlp, learning_rate=optax.linear_schedule(0.25, 1.0, 10)))
  np.testing.assert_allclose(sched, 0.25 * base, rtol=1e-12)
  clipped = first_update(optax.chain(optax.clip_by_global_norm(1.0), mm.newton(nlp, adaptive=False)))
  ref = -np.linalg.solve(logistic["hess"](np.zeros(31)), logistic["fun"](np.zeros(31))[1])
  gnorm = np.linalg.norm(logistic["fun"](np.zeros(31))[1])
  np.testing.assert_allclose(clipped, ref / gnorm, rtol=1e-9)  # Newton is linear in g
  assert np.all(np.isfinite(first_update(optax.chain(mm.nonlinear_cg(nlp),
                                                     optax.scale(0.5)))))


def test_chained_state_is_reached_by_index_or_tree_get(logistic):
  """After optax.chain the optimizer's state is one index deeper; optax's tree_get
  finds a field by name anywhere in it. Both read the same damping, which the
  unchained optimizer's first update sets (Hessian-free's rho rule moves it)."""
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  grads = jax.grad(nlp)(p0, *batch)
  tx = optax.chain(optax.clip_by_global_norm(1e3), mm.hessian_free(nlp), optax.scale(1.0))
  _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch))(grads, p0)
  hf = mm.hessian_free(nlp)
  _, alone = jax.jit(lambda g, p: hf.update(g, hf.init(p), p, batch=batch))(grads, p0)
  assert type(state[1]).__name__ == "HessianFreeState"
  assert float(state[1].damping) == float(optax.tree_utils.tree_get(state, "damping"))
  assert float(state[1].damping) == float(alone.damping) != 1e-3


@pytest.mark.parametrize("factory, static", [
    (mm.hessian_free, ("objective", "maxiter")),
    (mm.natural_gradient, ("objective", "maxiter", "max_bytes")),
    (mm.newton, ("objective", "max_bytes")),
    (mm.kfac, ("objective", "inverse_every"))])
def test_inject_hyperparams_learning_rate_and_damping(logistic, factory, static):
  """optax.inject_hyperparams with the objective and the integer arguments static:
  its updates equal the plain factory's; after the injected learning rate is changed
  in the state they equal a factory built with the new rate (one compiled update).
  The damping is optimizer state (Hessian-free and Newton adapt it): the injected
  value seeds state.inner_state.damping at init, and setting that field gives the
  update of a factory built with that damping."""
  nlp, batch, p0 = logistic["nlp"], logistic["batch"], logistic["params0"]
  grads = jax.grad(nlp)(p0, *batch)
  tx = optax.inject_hyperparams(factory, static_args=static)(
      nlp, learning_rate=0.5, damping=1e-2)
  traces = []

  @jax.jit
  def jitted(tx_state):
    traces.append(1)
    return tx.update(grads, tx_state, p0, batch=batch)[0]

  def update(tx_state):
    return logistic["flat"](jitted(tx_state))

  def plain(learning_rate, damping):
    t = factory(nlp, learning_rate=learning_rate, damping=damping)
    return logistic["flat"](t.update(grads, t.init(p0), p0, batch=batch)[0])

  state = tx.init(p0)
  assert float(state.inner_state.damping) == 1e-2
  np.testing.assert_allclose(update(state), plain(0.5, 1e-2), rtol=1e-10)
  state.hyperparams["learning_rate"] = jnp.asarray(0.25, jnp.float64)  # not weak: no retrace
  np.testing.assert_allclose(update(state), plain(0.25, 1e-2), rtol=1e-10)
  state = state._replace(inner_state=state.inner_state._replace(
      damping=jnp.asarray(3.0, jnp.float64)))
  np.testing.assert_allclose(update(state), plain(0.25, 3.0), rtol=1e-10)
  assert len(traces) == 1


def test_a_traced_count_is_refused_with_the_remedy(logistic):
  nlp, p0 = logistic["nlp"], logistic["params0"]
  tx = optax.inject_hyperparams(mm.hessian_free, static_args=("objective",))(nlp)
  with pytest.raises(ValueError, match=r"maxiter is traced.*static_args"):
    jax.jit(lambda s: tx.update(p0, s, p0, batch=logistic["batch"]))(tx.init(p0))


# --- bad input --------------------------------------------------------------------

def test_missing_batch_raises(logistic):
  nlp, p0 = logistic["nlp"], logistic["params0"]
  for tx in [mm.newton(nlp), mm.hessian_free(nlp), mm.natural_gradient(nlp),
             mm.nonlinear_cg(nlp)]:
    with pytest.raises(ValueError, match=r"batch=\(inputs, targets\)"):
      tx.update(p0, tx.init(p0), p0)
    with pytest.raises(ValueError, match="needs params"):
      tx.update(p0, tx.init(p0), None, batch=logistic["batch"])


def test_bad_arguments_raise(logistic):
  nlp = logistic["nlp"]
  with pytest.raises(ValueError, match=r"one of \('ggn', 'hessian'\), got 'fisher'"):
    mm.hessian_free(nlp, curvature="fisher")
  for make in [mm.newton, mm.hessian_free, mm.natural_gradient]:
    with pytest.raises(ValueError, match=r"damping must be .*>= 0.*-0\.1"):
      make(nlp, damping=-0.1)
  for make in [mm.newton, mm.natural_gradient]:
    with pytest.raises(ValueError, match=r"learning_rate must be .*>= 0.*-1"):
      make(nlp, learning_rate=-1.0)
  with pytest.raises(ValueError, match=r"learning_rate must be .*-1"):
    mm.hessian_free(nlp, learning_rate=-1.0)
  with pytest.raises(TypeError, match="needs a negative_log_posterior.*function"):
    mm.natural_gradient(lambda p, x, t: jnp.sum(p))
  with pytest.raises(TypeError, match="needs a negative_log_posterior"):
    mm.hessian_free(lambda p, x, t: jnp.sum(p))  # GGN needs the model apart
  with pytest.raises(ValueError, match=r"solver must be one of \('cg', 'dense'\)"):
    mm.natural_gradient(nlp, solver="lu")
  with pytest.raises(ValueError, match="0 < c1 < c2 < 1"):
    mm.nonlinear_cg(nlp, c1=0.5, c2=0.1)
  with pytest.raises(ValueError, match="tree structure"):
    tx = mm.newton(nlp)
    p0 = logistic["params0"]
    tx.update({"w": p0["w"]}, tx.init(p0), p0, batch=logistic["batch"])


@pytest.mark.slow  # long; CI runs -m slow too
def test_float32_params_keep_float32_updates_and_state(softmax_iris):
  nlp = softmax_iris["nlp"]
  x, y = softmax_iris["batch"]
  batch = (x.astype(jnp.float32), y)
  p0 = jax.tree.map(lambda a: a.astype(jnp.float32), softmax_iris["params0"])
  g = jax.grad(nlp)(p0, *batch)
  for tx in [mm.newton(nlp), mm.hessian_free(nlp, maxiter=5), mm.nonlinear_cg(nlp)]:
    state = tx.init(p0)
    u, new_state = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, batch=batch))(g, state, p0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(u))
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
    assert nlp(optax.apply_updates(p0, u), *batch) < nlp(p0, *batch)
