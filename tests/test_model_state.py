"""Models with state and randomness: flax linen BatchNorm + Dropout.

``mm.negative_log_posterior(..., has_state=True)``, the stateful train step,
``fit`` with a model state (checkpointed, resumed bit-exactly), Hessian-free on
it, and the curvature of the evaluation-mode network against a hand-written
network with the statistics frozen into an affine layer (float64).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlmap as mm

F64 = jnp.float64
EPS = 1e-5  # linen BatchNorm's default epsilon


class _Net(nn.Module):
  """Dense(6) -> BatchNorm -> tanh -> Dropout(0.25) -> Dense(1)."""

  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(6, param_dtype=F64)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS,
                     param_dtype=F64, dtype=F64)(h)
    h = nn.Dropout(0.25, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(1, param_dtype=F64)(h)[:, 0]


_NET = _Net()


def linen_apply(params, x, *, state, rng):
  """The documented linen pattern (docs/models.md)."""
  variables = {"params": params, **state}
  if rng is None:
    return _NET.apply(variables, x, train=False), state
  y, new = _NET.apply(variables, x, train=True, rngs={"dropout": rng},
                      mutable=list(state))
  return y, new


@pytest.fixture(scope="module")
def problem():
  kx, kn = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (64, 3), F64)
  y = jnp.sin(x @ jnp.array([1.0, -0.5, 0.3])) + 0.05 * jax.random.normal(kn, (64,))
  variables = _NET.init(jax.random.PRNGKey(1), x, train=False)
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, F64), variables)
  state = {"batch_stats": variables["batch_stats"]}
  nlp = mm.negative_log_posterior(linen_apply, mm.gaussian_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=3.0),
                                  num_data=64, has_state=True)
  return nlp, variables["params"], state, x, y


def _frozen_apply(params, state, x):
  """The evaluation-mode network written out: batch norm as the affine map of its
  running statistics, no dropout."""
  d0, bn, d1 = params["Dense_0"], params["BatchNorm_0"], params["Dense_1"]
  stats = state["batch_stats"]["BatchNorm_0"]
  h = x @ d0["kernel"] + d0["bias"]
  h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + EPS) * bn["scale"] + bn["bias"]
  return (jnp.tanh(h) @ d1["kernel"] + d1["bias"])[:, 0]


def _trained_state(problem):
  """A state with non-trivial running statistics: 5 training-mode passes."""
  nlp, params, state, x, y = problem
  for i in range(5):
    _, state = nlp.loss_and_state(params, x, y, state=state, rng=jax.random.PRNGKey(i))
  return state


def _equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


def test_evaluation_mode_objective_equals_the_frozen_statistics_network(problem):
  nlp, params, _, x, y = problem
  state = _trained_state(problem)
  ev = nlp.bind(state)
  ref = mm.negative_log_posterior(lambda p, x: _frozen_apply(p, state, x),
                                  mm.gaussian_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=3.0),
                                  num_data=64)
  np.testing.assert_allclose(jax.jit(ev)(params, x, y), ref(params, x, y), rtol=1e-13)
  np.testing.assert_allclose(nlp(params, x, y, state=state), ref(params, x, y), rtol=1e-13)
  # The curvature of the evaluation-mode network is that of the frozen network;
  # the frozen network's GGN is checked against jax.hessian of the GGN's
  # definition J^T H_z J + prior Hessian.
  g = jax.jit(mm.ggn_matrix, static_argnums=0)(ev, params, x, y)
  g_ref = mm.ggn_matrix(ref, params, x, y)
  np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-11)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.jacfwd(lambda w: _frozen_apply(unravel(w), state, x))(flat)
  np.testing.assert_allclose(g_ref, jac.T @ jac + np.eye(flat.size) / 9.0, rtol=1e-11,
                             atol=1e-11)
  h = mm.hessian_matrix(ev, params, x, y)
  h_ref = jax.hessian(lambda w: ref(unravel(w), x, y))(flat)
  np.testing.assert_allclose(h, h_ref, rtol=1e-10, atol=1e-10)


def test_training_mode_uses_batch_statistics_and_updates_the_running_ones(problem):
  nlp, params, state, x, y = problem
  loss, new = nlp.loss_and_state(params, x, y, state=state, rng=jax.random.PRNGKey(3))
  h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  stats = new["batch_stats"]["BatchNorm_0"]
  old = state["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], 0.9 * old["mean"] + 0.1 * h.mean(0),
                             rtol=1e-12)
  np.testing.assert_allclose(stats["var"], 0.9 * old["var"] + 0.1 * h.var(0), rtol=1e-12)
  # Dropout drew a mask: another key gives another loss, the same key the same one.
  again = nlp.loss_and_state(params, x, y, state=state, rng=jax.random.PRNGKey(3))[0]
  other = nlp.loss_and_state(params, x, y, state=state, rng=jax.random.PRNGKey(4))[0]
  assert loss == again and loss != other


def test_train_step_gradient_is_the_training_mode_gradient_and_threads_the_state(problem):
  nlp, params, state, x, y = problem
  tx = optax.sgd(1e-3)
  step = mm.make_train_step(nlp, tx)
  rng = jax.random.PRNGKey(9)
  new_params, _, metrics, new_state = step(params, tx.init(params), (x, y), state, rng)
  loss, want_state = nlp.loss_and_state(params, x, y, state=state, rng=rng)
  grads = jax.grad(lambda p: nlp.bind(state, rng)(p, x, y))(params)
  want = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-13)
  for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  assert _equal(new_state, want_state) and not _equal(new_state, state)


def test_non_finite_batch_leaves_params_and_both_states_bit_identical(problem):
  nlp, params, state, x, y = problem
  tx = optax.adam(1e-2)
  step = mm.make_train_step(nlp, tx)
  opt_state = tx.init(params)
  bad = x.at[3, 1].set(jnp.nan)
  new_params, new_opt, metrics, new_state = step(params, opt_state, (bad, y), state,
                                                 jax.random.PRNGKey(0))
  assert bool(metrics["skipped"])
  assert _equal(new_params, params) and _equal(new_opt, opt_state)
  assert _equal(new_state, state)


def test_hessian_free_takes_its_products_of_the_training_mode_network(problem):
  """The update with model_state/rng equals HF on ``nlp.bind(state, rng)``: the
  same dropout mask and batch statistics the gradient was taken with."""
  nlp, params, state, x, y = problem
  rng = jax.random.PRNGKey(2)
  grads = jax.grad(lambda p: nlp.bind(state, rng)(p, x, y))(params)
  tx = mm.hessian_free(nlp, damping=1.0, maxiter=10)
  ref = mm.hessian_free(nlp.bind(state, rng), damping=1.0, maxiter=10)
  got, _ = jax.jit(functools.partial(tx.update, batch=(x, y)))(
      grads, tx.init(params), params, model_state=state, rng=rng)
  want, _ = ref.update(grads, ref.init(params), params, batch=(x, y))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  with pytest.raises(ValueError, match=r"has model state.*model_state=\.\.\."):
    tx.update(grads, tx.init(params), params, batch=(x, y))


@pytest.mark.parametrize("make_tx", [lambda nlp: optax.adam(5e-2),
                                     pytest.param(lambda nlp: mm.hessian_free(
                                         nlp, damping="auto", maxiter=10),
                                         marks=pytest.mark.slow)],
                         ids=["adam", "hessian_free"])
def test_fit_trains_a_batchnorm_dropout_network(problem, make_tx):
  nlp, params, state, x, y = problem

  def mse(p, s):  # the evaluation-mode network's fit (the nlp's floor is its constants)
    return jnp.mean((linen_apply(p, x, state=s, rng=None)[0] - y) ** 2)

  r = mm.fit(nlp, params, None, (x, y), tx=make_tx(nlp), epochs=20, batch_size=32,
             key=jax.random.PRNGKey(0), model_state=state, rng=jax.random.PRNGKey(1),
             progress=False, eval_fn=mse)
  start, last = float(mse(params, state)), r.history["eval"][-1][1]
  assert not any(r.history["skipped"])
  assert last < 0.5 * start and last < 0.6 * float(jnp.var(y)), (start, last, jnp.var(y))
  assert not _equal(r.model_state, state)


def test_fit_resumes_bit_exactly_with_the_model_state_checkpointed(problem, tmp_path):
  nlp, params, state, x, y = problem
  kw = dict(tx=optax.adam(1e-2), epochs=3, batch_size=16, key=jax.random.PRNGKey(4),
            model_state=state, rng=jax.random.PRNGKey(5), progress=False,
            eval_fn=lambda p, s: nlp(p, x, y, state=s))
  full = mm.fit(nlp, params, None, (x, y), **kw)
  d = str(tmp_path)
  stopped = mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, checkpoint_every=3,
                   callback=lambda t, *_: t == 7, **kw)
  assert stopped.step == 7
  resumed = mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, checkpoint_every=3, **kw)
  assert resumed.step == full.step == 12
  assert resumed.history == full.history
  assert _equal((resumed.params, resumed.opt_state, resumed.model_state),
                (full.params, full.opt_state, full.model_state))
  # A checkpoint of another model state is refused, naming the leaf.
  other = {"batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(7), "var": jnp.ones(7)}}}
  with pytest.raises(ValueError, match="model_state"):
    mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, **{**kw, "model_state": other})


def test_laplace_of_the_evaluation_mode_network_equals_the_frozen_network(problem):
  nlp, params, _, x, y = problem
  state = _trained_state(problem)
  ref = mm.negative_log_posterior(lambda p, x: _frozen_apply(p, state, x),
                                  mm.gaussian_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=3.0),
                                  num_data=64)
  for structure in ("full", "kron"):
    with pytest.warns(UserWarning, match="far from a MAP"):
      got = mm.log_evidence(nlp.bind(state), params, x, y, structure=structure)
    with pytest.warns(UserWarning, match="far from a MAP"):
      want = mm.log_evidence(ref, params, x, y, structure=structure)
    np.testing.assert_allclose(got, want, rtol=1e-11)


def test_stateful_misuse_is_refused_with_the_remedy(problem):
  nlp, params, state, x, y = problem
  with pytest.raises(TypeError, match=r"has model state.*state=\.\.\..*nlp\.bind"):
    nlp(params, x, y)
  with pytest.raises(TypeError, match=r"no apply_fn.*nlp\.bind\(state\)"):
    mm.ggn_vp(nlp, params, params, x, y)
  with pytest.raises(TypeError, match=r"no apply_fn"):
    mm.laplace(nlp, params, x, y, structure="diag")
  step = mm.make_train_step(nlp, optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"rng missing.*evaluation mode"):
    step(params, optax.sgd(0.1).init(params), (x, y), state, None)
  plain = mm.make_train_step(lambda p, x, t: jnp.sum(p["Dense_1"]["bias"] ** 2),
                             optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"no model state.*has_state=True"):
    plain(params, optax.sgd(0.1).init(params), (x, y), state, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"both model_state and rng"):
    mm.fit(nlp, params, None, (x, y), tx=optax.sgd(0.1), model_state=state)
  with pytest.raises(ValueError, match=r"example_inputs cannot trace a model with state"):
    mm.kfac(nlp, example_inputs=x)
  with pytest.raises(TypeError, match=r"has_state must be True or False"):
    mm.negative_log_posterior(linen_apply, mm.gaussian_log_likelihood, has_state=1)
  whole = {"params": params, **state}
  with pytest.raises(TypeError, match=r"'batch_stats'"):
    nlp(whole, x, y, state=state)


def test_a_new_state_of_another_shape_is_refused_and_dtypes_are_kept(problem):
  nlp, params, state, x, y = problem

  def grows(p, x, *, state, rng):
    return x @ jnp.ones(3), {"n": jnp.zeros(state["n"].shape[0] + 1)}

  bad = mm.negative_log_posterior(grows, mm.gaussian_log_likelihood, has_state=True)
  with pytest.raises(ValueError, match=r"new state unlike the state.*\(2,\).*\(1,\)"):
    bad(params, x, y, state={"n": jnp.zeros(1)})

  def counts(p, x, *, state, rng):
    return x @ jnp.ones(3), {"n": state["n"] + jnp.ones((), F64)}

  f32 = mm.negative_log_posterior(counts, mm.gaussian_log_likelihood, has_state=True)
  _, new = f32.loss_and_state(params, x, y, state={"n": jnp.zeros((), jnp.float32)},
                              rng=jax.random.PRNGKey(0))
  assert new["n"].dtype == jnp.float32 and float(new["n"]) == 1.0


@pytest.mark.slow
def test_kfac_trains_a_stateful_model_through_the_train_step(problem):
  nlp, params, state, x, y = problem
  tx = mm.kfac(nlp, damping=1.0)
  step = mm.make_train_step(nlp, tx)
  opt_state = tx.init(params)
  start = float(nlp(params, x, y, state=state))
  for t in range(5):
    params, opt_state, metrics, state = step(params, opt_state, (x, y), state,
                                             jax.random.PRNGKey(t))
    assert not bool(metrics["skipped"])
  assert float(nlp(params, x, y, state=state)) < start
