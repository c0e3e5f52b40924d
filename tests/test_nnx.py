"""flax NNX through ``mm.from_nnx``: training, curvature, optimizers, Laplace and
checkpoints, each against the same network written in plain JAX (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlmap as mm

F64 = jnp.float64
EPS = 1e-5  # nnx.BatchNorm's default epsilon


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 5, rngs=rngs, param_dtype=F64)
    self.l2 = nnx.Linear(5, 1, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))[:, 0]


class _BNDropout(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 6, rngs=rngs, param_dtype=F64)
    self.bn = nnx.BatchNorm(6, momentum=0.9, epsilon=EPS, rngs=rngs, param_dtype=F64,
                            dtype=F64)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.l2 = nnx.Linear(6, 1, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))[:, 0]


def _plain_mlp(p, x):
  """_MLP written out (kernel: [in, out])."""
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return (h @ p["l2"]["kernel"] + p["l2"]["bias"])[:, 0]


def _frozen_bn(p, state, x):
  """_BNDropout in evaluation mode written out: the running statistics as an affine map."""
  h = x @ p["l1"]["kernel"] + p["l1"]["bias"]
  bn = state["bn"]
  h = (h - bn["mean"]) / jnp.sqrt(bn["var"] + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
  return (jnp.tanh(h) @ p["l2"]["kernel"] + p["l2"]["bias"])[:, 0]


_PRIOR = functools.partial(mm.gaussian_log_prior, sigma=2.0)


@pytest.fixture(scope="module")
def data():
  kx, kn = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (48, 3), F64)
  y = jnp.sin(x @ jnp.array([1.0, -0.5, 0.3])) + 0.05 * jax.random.normal(kn, (48,))
  return x, y


@pytest.fixture(scope="module")
def mlp():
  apply_fn, params, state = mm.from_nnx(_MLP(nnx.Rngs(0)))
  return apply_fn, params, state


def _leaves_close(a, b, rtol):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * 1e-2)


def test_stateless_module_is_a_plain_apply_fn_over_a_plain_dict(mlp, data):
  apply_fn, params, state = mlp
  x, _ = data
  module = _MLP(nnx.Rngs(0))
  assert state is None and isinstance(params, dict) and sorted(params) == ["l1", "l2"]
  np.testing.assert_allclose(jax.jit(apply_fn)(params, x), module(x), rtol=1e-14)
  np.testing.assert_allclose(apply_fn(params, x), _plain_mlp(params, x), rtol=1e-14)
  with pytest.raises(TypeError, match="must be a flax nnx.Module, got dict"):
    mm.from_nnx(params)


def test_curvature_and_laplace_equal_the_plain_jax_network(mlp, data):
  apply_fn, params, _ = mlp
  x, y = data
  nlp = mm.negative_log_posterior(apply_fn, mm.gaussian_log_likelihood, _PRIOR)
  ref = mm.negative_log_posterior(_plain_mlp, mm.gaussian_log_likelihood, _PRIOR)
  v = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=F64)).reshape(a.shape),
                             params)
  _leaves_close(jax.jit(mm.ggn_vp, static_argnums=0)(nlp, params, v, x, y),
                mm.ggn_vp(ref, params, v, x, y), 1e-12)
  _leaves_close(mm.hvp(nlp, params, v, x, y), mm.hvp(ref, params, v, x, y), 1e-12)
  with pytest.warns(UserWarning, match="far from a MAP"):
    got = mm.log_evidence(nlp, params, x, y, structure="kron")
  with pytest.warns(UserWarning, match="far from a MAP"):
    want = mm.log_evidence(ref, params, x, y, structure="kron")
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("make_tx", [
    lambda nlp: mm.hessian_free(nlp, damping=1.0, maxiter=8),
    lambda nlp: mm.natural_gradient(nlp, damping=1.0),
    pytest.param(lambda nlp: mm.kfac(nlp, damping=1.0), marks=pytest.mark.slow),
], ids=["hessian_free", "natural_gradient", "kfac"])
def test_optimizer_steps_equal_the_plain_jax_networks(mlp, data, make_tx):
  apply_fn, params, _ = mlp
  x, y = data
  nlp = mm.negative_log_posterior(apply_fn, mm.gaussian_log_likelihood, _PRIOR)
  ref = mm.negative_log_posterior(_plain_mlp, mm.gaussian_log_likelihood, _PRIOR)
  out = []
  for objective in (nlp, ref):
    tx = make_tx(objective)
    step = mm.make_train_step(objective, tx)
    p, s = params, tx.init(params)
    for _ in range(3):
      p, s, m = step(p, s, (x, y))
    out.append(p)
  _leaves_close(out[0], out[1], 1e-9)
  assert float(nlp(out[0], x, y)) < float(nlp(params, x, y))


def test_fit_and_checkpoints_of_an_nnx_model(mlp, data, tmp_path):
  apply_fn, params, _ = mlp
  x, y = data
  nlp = mm.negative_log_posterior(apply_fn, mm.gaussian_log_likelihood, _PRIOR,
                                  num_data=48)
  kw = dict(tx=optax.adam(1e-2), epochs=4, batch_size=16, key=jax.random.PRNGKey(1),
            progress=False)
  full = mm.fit(nlp, params, None, (x, y), **kw)
  d = str(tmp_path)
  mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, checkpoint_every=2,
         callback=lambda t, *_: t == 5, **kw)
  resumed = mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, **kw)
  assert resumed.history == full.history
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                                                  jax.tree_util.tree_leaves(full.params)))
  mm.save_checkpoint(str(tmp_path / "p.ckpt"), full.params)
  back = mm.load_checkpoint(str(tmp_path / "p.ckpt"), like=params)
  model = nnx.merge(nnx.split(_MLP(nnx.Rngs(0)))[0], back)  # back into a module
  np.testing.assert_array_equal(model(x), apply_fn(full.params, x))


@pytest.fixture(scope="module")
def bn_model():
  module = _BNDropout(nnx.Rngs(0, dropout=1))
  apply_fn, params, state = mm.from_nnx(module)
  state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, F64), state)
  nlp = mm.negative_log_posterior(apply_fn, mm.gaussian_log_likelihood, _PRIOR,
                                  num_data=48, has_state=True)
  return module, apply_fn, params, state, nlp


def test_stateful_module_modes_and_the_untouched_original(bn_model, data):
  module, apply_fn, params, state, _ = bn_model
  x, _ = data
  assert sorted(state) == ["bn"] and sorted(state["bn"]) == ["mean", "var"]
  assert not module.drop.deterministic  # from_nnx split a clone; the module keeps its mode
  y_eval, same = apply_fn(params, x, state=state, rng=None)
  np.testing.assert_allclose(y_eval, _frozen_bn(params, state, x), rtol=1e-13)
  assert same is state or all(np.array_equal(a, b) for a, b in
                              zip(jax.tree_util.tree_leaves(same),
                                  jax.tree_util.tree_leaves(state)))
  k = jax.random.PRNGKey(3)
  y1, new = jax.jit(lambda p, s: apply_fn(p, x, state=s, rng=k))(params, state)
  y2, _ = apply_fn(params, x, state=state, rng=k)
  y3, _ = apply_fn(params, x, state=state, rng=jax.random.PRNGKey(4))
  np.testing.assert_allclose(y1, y2, rtol=1e-13)  # the key fixes the mask
  assert not np.allclose(y1, y3)
  h = x @ params["l1"]["kernel"] + params["l1"]["bias"]
  np.testing.assert_allclose(new["bn"]["mean"], 0.9 * state["bn"]["mean"] + 0.1 * h.mean(0),
                             rtol=1e-12)


def test_stateful_nnx_curvature_is_that_of_the_frozen_network(bn_model, data):
  _, _, params, state, nlp = bn_model
  x, y = data
  state = nlp.loss_and_state(params, x, y, state=state, rng=jax.random.PRNGKey(0))[1]
  ref = mm.negative_log_posterior(lambda p, x: _frozen_bn(p, state, x),
                                  mm.gaussian_log_likelihood, _PRIOR, num_data=48)
  np.testing.assert_allclose(mm.ggn_matrix(nlp.bind(state), params, x, y),
                             mm.ggn_matrix(ref, params, x, y), rtol=1e-11, atol=1e-11)


@pytest.mark.slow
def test_stateful_nnx_trains_with_hessian_free_and_resumes_bit_exactly(bn_model, data,
                                                                        tmp_path):
  _, apply_fn, params, state, nlp = bn_model
  x, y = data

  def mse(p, s):
    return jnp.mean((apply_fn(p, x, state=s, rng=None)[0] - y) ** 2)

  kw = dict(tx=mm.hessian_free(nlp, damping="auto", maxiter=10), epochs=8, batch_size=24,
            key=jax.random.PRNGKey(2), model_state=state, rng=jax.random.PRNGKey(3),
            progress=False, eval_fn=mse)
  full = mm.fit(nlp, params, None, (x, y), **kw)
  assert full.history["eval"][-1][1] < 0.6 * float(mse(params, state))
  d = str(tmp_path)
  mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, checkpoint_every=3,
         callback=lambda t, *_: t == 10, **kw)
  resumed = mm.fit(nlp, params, None, (x, y), checkpoint_dir=d, **kw)
  assert resumed.history == full.history
  got = jax.tree_util.tree_leaves((resumed.params, resumed.model_state, resumed.opt_state))
  want = jax.tree_util.tree_leaves((full.params, full.model_state, full.opt_state))
  assert all(np.array_equal(a, b) for a, b in zip(got, want))
