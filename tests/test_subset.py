"""Parameter subsets (mlmap.subset): split/merge, the sub-model objective, last layer.

Only under ``-m slow``: the sub-model value/Hessian check with a per-leaf prior
scale tree (the scalar-sigma case, same checks, stays in the default suite) and
last_layer_subset on linen setup-named submodules / Sequential / nested trees
(a real, eager init; linen stays in the default suite through the MLP, CNN and
auto-index tests), and the nnx sub-model value evaluated op by op (the default
suite evaluates the same comparison under jit).
"""

import functools

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import subset as ss

FN = "laplace"


def _params(key):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {"hidden": {"w": jax.random.normal(k1, (2, 3)), "b": jax.random.normal(k2, (3,))},
          "out": {"w": jax.random.normal(k3, (3, 1)), "b": jax.random.normal(k4, (1,))}}


def _apply(p, x):
  h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
  return (h @ p["out"]["w"] + p["out"]["b"])[:, 0]


_MASK_W = np.array([[True, False, True], [False, False, True]])
_MASK = {"hidden": {"w": _MASK_W, "b": False}, "out": True}


def _data(key, n=7):
  kx, ky = jax.random.split(jax.random.fold_in(key, 1))
  return jax.random.normal(kx, (n, 2)), jax.random.normal(ky, (n,))


# --- split / merge ------------------------------------------------------------------

def test_split_values_and_static_fields(key):
  params = _params(key)
  s = ss.make_subset(FN, params, _MASK)
  assert s.num_params == 3 + 3 + 1 and s.elementwise
  assert s.paths == ("hidden/w", "out/b", "out/w")
  sub = s.split(params)
  assert sub["hidden"]["b"] is None
  np.testing.assert_array_equal(sub["hidden"]["w"], np.asarray(params["hidden"]["w"])[_MASK_W])
  np.testing.assert_array_equal(sub["out"]["w"], params["out"]["w"])
  assert s.leaf_status(params) == {"hidden/b": "out", "hidden/w": "partial",
                                   "out/b": "in", "out/w": "in"}
  # Same mask, same static object: hashable and equal, so jit caches on it.
  assert s == ss.make_subset(FN, params, _MASK) and hash(s) == hash(ss.make_subset(FN, params, _MASK))


def test_merge_round_trip_under_jit(key):
  params = _params(key)
  s = ss.make_subset(FN, params, _MASK)
  sub = s.split(params)
  new_sub = jax.tree_util.tree_map(lambda x: x + 10.0, sub)

  @jax.jit
  def merge(subset, sub, params):
    return subset.merge(sub, params)

  merged = merge(s, new_sub, params)
  expect = jax.tree_util.tree_map(np.asarray, params)
  expect["hidden"]["w"] = expect["hidden"]["w"] + 10.0 * _MASK_W
  expect["out"] = {k: v + 10.0 for k, v in expect["out"].items()}
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, expect)
  back = merge(s, sub, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # split o merge is the identity on sub, also jitted.
  again = jax.jit(lambda sub: s.split(s.merge(sub, params)))(new_sub)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, new_sub)


def test_flat_mask_is_ravel_order(key):
  params = _params(key)
  s = ss.make_subset(FN, params, _MASK)
  flat, unravel = ravel_pytree(params)
  ids = ravel_pytree(s.split(unravel(jnp.arange(flat.size, dtype=flat.dtype))))[0]
  np.testing.assert_array_equal(np.flatnonzero(s.flat_mask()), np.asarray(ids, int))
  np.testing.assert_array_equal(flat[s.flat_mask()], ravel_pytree(s.split(params))[0])


def test_full_and_empty_array_masks_are_whole_leaves(key):
  params = _params(key)
  mask = {"hidden": {"w": np.ones((2, 3), bool), "b": np.zeros(3, bool)}, "out": False}
  s = ss.make_subset(FN, params, mask)
  assert not s.elementwise and s.paths == ("hidden/w",) and s.num_params == 6
  assert ss.make_subset(FN, params, None) is None
  assert ss.make_subset(FN, params, s) is s


# --- prior scales and the sub-model ----------------------------------------------------

def test_restrict_scale(key):
  params = _params(key)
  s = ss.make_subset(FN, params, _MASK)
  assert s.restrict_scale(FN, 0.7) == 0.7 and s.restrict_scale(FN, None) is None
  sig_w = np.array([0.5, 1.0, 2.0])  # broadcast over the rows of hidden/w
  scale = {"hidden": {"w": sig_w, "b": None}, "out": 3.0}
  r = s.restrict_scale(FN, scale)
  np.testing.assert_array_equal(r["hidden"]["w"], np.broadcast_to(sig_w, (2, 3))[_MASK_W])
  assert r["hidden"]["b"] is None and r["out"]["w"] == 3.0
  sub = s.split(params)
  got = jax.jit(lambda sub: mm.gaussian_log_prior(sub, r))(sub)  # jit: one compile, not op by op
  w = np.asarray(params["hidden"]["w"])[_MASK_W]
  ref = scipy.stats.norm.logpdf(w, 0.0, np.broadcast_to(sig_w, (2, 3))[_MASK_W]).sum()
  ref += scipy.stats.norm.logpdf(np.asarray(ravel_pytree(params["out"])[0]), 0.0, 3.0).sum()
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  with pytest.raises(ValueError, match=r"hidden/w.*\(2,\).*\(2, 3\)"):
    s.restrict_scale(FN, {"hidden": {"w": np.ones(2), "b": 1.0}, "out": 1.0})
  with pytest.raises(ValueError, match="prior scale tree .* is not a prefix of params tree"):
    s.restrict_scale(FN, {"hidden": 1.0})


def _nlp(sigma):
  return mm.negative_log_posterior(
      _apply, functools.partial(mm.gaussian_log_likelihood, sigma=0.3),
      functools.partial(mm.gaussian_log_prior, sigma=sigma), num_data=20)


@pytest.mark.parametrize("sigma", [0.8, pytest.param("tree", marks=pytest.mark.slow)])
def test_sub_nlp_value_and_hessian_block(key, sigma):
  params = _params(key)
  x, y = _data(key)
  if sigma == "tree":
    sigma = {"hidden": {"w": np.array([[0.5], [2.0]]), "b": 1.5}, "out": 0.9}
  nlp = _nlp(sigma)
  s = ss.make_subset(FN, params, _MASK)
  snlp = ss.sub_nlp(nlp, s, params)
  assert snlp.num_data == nlp.num_data and snlp.log_likelihood is nlp.log_likelihood
  sub, merged = jax.jit(lambda p: (lambda sub: (sub, s.merge(sub, p)))(
      jax.tree_util.tree_map(lambda v: v * 0.9 + 0.1, s.split(p))))(params)
  if isinstance(sigma, dict):
    sig_full = {"hidden": {"w": np.broadcast_to(sigma["hidden"]["w"], (2, 3)),
                           "b": np.full(3, 1.5)},
                "out": {"w": np.full((3, 1), 0.9), "b": np.full(1, 0.9)}}
  else:
    sig_full = jax.tree_util.tree_map(lambda p: np.full(np.shape(p), sigma), params)
  flat_w, flat_s = ravel_pytree(merged)[0], ravel_pytree(sig_full)[0]
  fm = s.flat_mask()
  lp_in = scipy.stats.norm.logpdf(np.asarray(flat_w)[fm], 0.0, np.asarray(flat_s)[fm]).sum()
  lp_out = scipy.stats.norm.logpdf(np.asarray(flat_w)[~fm], 0.0, np.asarray(flat_s)[~fm]).sum()
  value, full_value, out = jax.jit(lambda: (snlp(sub, x, y), nlp(merged, x, y), _apply(merged, x)))()
  loglik = scipy.stats.norm.logpdf(np.asarray(y), np.asarray(out), 0.3).sum()
  np.testing.assert_allclose(value, -20 / 7 * loglik - lp_in, rtol=1e-12)
  np.testing.assert_allclose(value, full_value + lp_out, rtol=1e-12)
  # Curvature of the sub-model = the subset block of the full model's.
  flat_sub, unravel_sub = ravel_pytree(sub)
  h_sub = jax.jit(jax.hessian(lambda v: snlp(unravel_sub(v), x, y)))(flat_sub)
  flat_p, unravel_p = ravel_pytree(merged)
  h_full = jax.jit(jax.hessian(lambda v: nlp(unravel_p(v), x, y)))(flat_p)
  np.testing.assert_allclose(h_sub, h_full[np.ix_(fm, fm)], rtol=1e-12, atol=1e-12)
  assert h_sub.shape == (s.num_params, s.num_params)


@pytest.mark.parametrize("prior", [
    None, mm.laplace_log_prior, functools.partial(mm.laplace_log_prior, scale=1.0),
    lambda p: -0.5 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))])
def test_sub_nlp_refuses_other_priors(key, prior):
  params = _params(key)
  nlp = mm.negative_log_posterior(_apply, mm.gaussian_log_likelihood, prior)
  s = ss.make_subset(FN, params, _MASK)
  with pytest.raises(ValueError, match=r"subset needs functools\.partial\(mm\.gaussian_log_prior, "
                     r"sigma=\.\.\.\)"):
    ss.sub_nlp(nlp, s, params)


def test_sub_nlp_bare_gaussian_prior_is_sigma_one(key):
  params = _params(key)
  x, y = _data(key)
  s = ss.make_subset(FN, params, _MASK)
  a = ss.sub_nlp(mm.negative_log_posterior(_apply, mm.gaussian_log_likelihood,
                                           mm.gaussian_log_prior), s, params)
  b = ss.sub_nlp(mm.negative_log_posterior(_apply, mm.gaussian_log_likelihood,
                                           functools.partial(mm.gaussian_log_prior, sigma=1.0)),
                 s, params)
  sub = s.split(params)
  got_a, got_b = jax.jit(lambda sub: (a(sub, x, y), b(sub, x, y)))(sub)  # one compile
  np.testing.assert_allclose(got_a, got_b, rtol=1e-14)


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask, error, pattern", [
    ({"hidden": True}, ValueError,
     r"subset tree .*PyTreeDef.* is not a prefix of params tree PyTreeDef.*keys \['hidden'\] "
     r"vs params keys \['hidden', 'out'\]"),
    ({"hidden": {"w": True, "b": {"x": True}}, "out": True}, ValueError,
     r"at 'hidden/b': dict over a params leaf"),
    ({"hidden": [True, False], "out": True}, ValueError, r"not a prefix.*at 'hidden'"),
    ({"hidden": 1, "out": 0}, TypeError, r"'hidden' must be a bool or a bool array, got int "
     r"of dtype int64 \(0/1 numbers"),
    ({"hidden": 1.0, "out": True}, TypeError, r"'hidden'.*float"),
    ({"hidden": {"w": np.ones((2, 3)), "b": True}, "out": True}, TypeError,
     r"'hidden/w'.*ndarray of dtype float64"),
    ({"hidden": {"w": jnp.ones((2, 3), jnp.int32), "b": True}, "out": True}, TypeError,
     r"'hidden/w'.*int32"),
    ({"hidden": None, "out": True}, TypeError, r"'hidden' must be a bool.*NoneType"),
    ({"hidden": {"w": np.ones((3, 2), bool), "b": True}, "out": True}, ValueError,
     r"mask at 'hidden/w' has shape \(3, 2\), the params leaf has shape \(2, 3\)"),
    ({"hidden": np.ones(3, bool), "out": True}, ValueError,
     r"'hidden' is a bool array of shape \(3,\) over 2 params leaves"),
    ({"hidden": False, "out": {"w": np.zeros((3, 1), bool), "b": False}}, ValueError,
     r"selects no parameter"),
])
def test_make_subset_errors(key, mask, error, pattern):
  with pytest.raises(error, match=pattern):
    ss.make_subset(FN, _params(key), mask)


def test_traced_mask_is_refused(key):
  params = _params(key)

  @jax.jit
  def f(m):
    ss.make_subset(FN, params, {"hidden": {"w": m, "b": True}, "out": True})
    return m

  with pytest.raises(ValueError, match=r"'hidden/w' is traced.*must be concrete"):
    f(jnp.ones((2, 3), bool))


def test_selected_integer_leaf_is_refused(key):
  params = {"w": jnp.ones(2), "step": jnp.array(3)}
  with pytest.raises(TypeError, match=r"non-floating params leaves 'step' \(int"):
    ss.make_subset(FN, params, True)
  assert ss.make_subset(FN, params, {"w": True, "step": False}).paths == ("w",)


def test_subset_on_other_structure_is_refused(key):
  params = _params(key)
  s = ss.make_subset(FN, params, _MASK)
  with pytest.raises(ValueError, match=r"Subset.split: params tree .* differs from the tree"):
    s.split(params["hidden"])
  with pytest.raises(ValueError, match=r"sub tree .* differs"):
    s.merge({"hidden": None, "out": None}, params)
  sub = s.split(params)
  sub["out"]["w"] = None
  with pytest.raises(ValueError, match=r"sub has None at the selected leaf 'out/w'"):
    s.merge(sub, params)
  with pytest.raises(ValueError, match=r"laplace: params tree .* differs"):
    ss.make_subset(FN, {"a": params}, s)


# --- last layer -----------------------------------------------------------------------

linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")


def _init(model, shape):
  # Shapes are all last_layer_subset and make_subset read; eval_shape compiles nothing.
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones(shape))


def _selected(params, mask):
  s = ss.make_subset(FN, params, mask)
  return {p for p, v in s.leaf_status(params).items() if v == "in"}


class _MLP(linen.Module):
  width: int = 3
  depth: int = 3

  @linen.compact
  def __call__(self, x):
    for _ in range(self.depth - 1):
      x = jnp.tanh(linen.Dense(self.width)(x))
    return linen.Dense(1)(x)


class _CNN(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.Conv(2, (3, 3))(x))
    x = linen.relu(linen.Conv(2, (3, 3))(x))
    return linen.Dense(3)(x.reshape(x.shape[0], -1))


class _Encoder(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(2)(linen.Dense(4)(x))


class _Named(linen.Module):
  def setup(self):  # "trunk" sorts after "head": insertion order must decide
    self.trunk = _Encoder()
    self.head = linen.Dense(1)

  def __call__(self, x):
    return self.head(self.trunk(x))


def test_last_layer_linen_mlp():
  variables = _init(_MLP(), (1, 2))
  mask = ss.last_layer_subset(variables)
  assert mask == {"params": {"Dense_0": False, "Dense_1": False, "Dense_2": True}}
  assert _selected(variables, mask) == {"params/Dense_2/bias", "params/Dense_2/kernel"}
  assert ss.last_layer_subset(variables["params"]) == mask["params"]


def test_last_layer_linen_auto_index_survives_sorted_keys():
  params = _init(_MLP(depth=12), (1, 2))["params"]
  params = jax.tree_util.tree_map(lambda v: v, params)  # jax rebuilds dicts with sorted keys
  assert list(params)[-1] == "Dense_9"
  mask = ss.last_layer_subset(params)
  assert [k for k, v in mask.items() if v is True] == ["Dense_11"]


def test_last_layer_linen_cnn():
  params = _init(_CNN(), (1, 6, 6, 1))["params"]
  assert ss.last_layer_subset(params) == {"Conv_0": False, "Conv_1": False, "Dense_0": True}


@pytest.mark.slow
def test_last_layer_linen_named_submodules_and_sequential():
  # A real init: jax transforms (eval_shape, jit, tree_map) rebuild dicts with sorted keys.
  params = _Named().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  assert list(params) == ["trunk", "head"]
  assert ss.last_layer_subset(params) == {"trunk": False, "head": True}
  seq = linen.Sequential([linen.Dense(3), linen.relu, linen.Dense(2), linen.LayerNorm()])
  variables = _init(seq, (1, 3))
  assert ss.last_layer_subset(variables) == {
      "params": {"layers_0": False, "layers_2": True, "layers_3": False}}
  nested = {"params": {"Dense_0": params["head"], "body": params["trunk"]}}
  assert ss.last_layer_subset(nested) == {
      "params": {"Dense_0": False, "body": {"Dense_0": False, "Dense_1": True}}}


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(2, 4, rngs=rngs)
    self.l2 = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class _NNXList(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs) for _ in range(11)]
                           + [nnx.Linear(3, 1, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


@pytest.mark.parametrize("evaluate", [
    "jit",  # one compile; op-by-op (eager) evaluation costs seconds here
    pytest.param("eager", marks=pytest.mark.slow)])
def test_last_layer_nnx_linear_mlp(evaluate):
  model = _NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  mask = ss.last_layer_subset(state)
  assert type(mask) is type(state)
  assert dict(mask) == {"l1": False, "l2": True}
  assert _selected(state, mask) == {"l2/bias/value", "l2/kernel/value"}
  # The mask is a prefix as jax.tree_util sees it, too.
  jax.tree_util.tree_map(lambda m, sub: None, mask, state)
  # A plain dict mask works on a State as well, and sub_nlp runs through nnx.merge.
  s = ss.make_subset(FN, state, {"l1": False, "l2": True})
  assert s == ss.make_subset(FN, state, mask)
  nlp = mm.negative_log_posterior(
      lambda st, x: nnx.merge(graphdef, st)(x)[:, 0], mm.gaussian_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  x, y = jnp.ones((3, 2)), jnp.zeros(3)
  snlp = ss.sub_nlp(nlp, s, state)

  def both(st):
    return snlp(s.split(st), x, y), nlp(st, x, y) + mm.gaussian_log_prior(st["l1"])

  got, want = (jax.jit(both) if evaluate == "jit" else both)(state)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_last_layer_nnx_list_of_layers():
  _, state = nnx.split(nnx.eval_shape(lambda: _NNXList(nnx.Rngs(0))))
  mask = ss.last_layer_subset(state)
  chosen = [k for k, v in mask["layers"].items() if v is True]
  assert chosen == [11]
  assert _selected(state, mask) == {"layers/11/bias/value", "layers/11/kernel/value"}


def test_last_layer_dict_mlps():
  layer = lambda m, n: {"w": np.zeros((m, n)), "b": np.zeros(n)}  # noqa: E731
  params = {"layers": [layer(2, 3), layer(3, 3), layer(3, 1)]}
  assert ss.last_layer_subset(params) == {"layers": [False, False, True]}
  assert ss.last_layer_subset((layer(2, 3), layer(3, 1))) == (False, True)
  assert ss.last_layer_subset([layer(2, 3), {"scale": np.ones(3)}]) == [True, False]
  assert ss.last_layer_subset(layer(2, 1)) is True
  # A 1-D "w" is not a layer weight.
  assert ss.last_layer_subset({"a": layer(2, 3), "norm": {"w": np.ones(3)}}) == {
      "a": True, "norm": False}


def test_last_layer_refuses_flat_dict():
  params = {"w1": np.zeros((2, 3)), "b1": np.zeros(3), "w2": np.zeros((3, 1)), "b2": np.zeros(1)}
  with pytest.raises(ValueError, match=r"top-level keys \['w1', 'b1', 'w2', 'b2'\].*by hand.*"
                     r"'w2': True, 'b2': True"):
    ss.last_layer_subset(params)
  with pytest.raises(ValueError, match="params of type ndarray"):
    ss.last_layer_subset(np.zeros((2, 2)))
