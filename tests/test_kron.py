"""K-FAC factors (mlmap.kron) and layer discovery (mlmap._layers).

References: the dense data GGN ``mm.ggn_matrix`` of the same nlp without its
prior, built column by column; the 'expand' K-FAC is compared with it where it
is exact, and with the precise trace identity where it is not.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import _layers
from mlmap import kron

F64 = jnp.float64


def _keys(n, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), n)


def _data_nlp(apply_fn, log_likelihood, num_data=None, prior=True):
  log_prior = functools.partial(mm.gaussian_log_prior, sigma=1.5) if prior else None
  return mm.negative_log_posterior(apply_fn, log_likelihood, log_prior, num_data)


@functools.partial(jax.jit, static_argnums=0)
def _data_ggn(nlp, params, inputs, targets):
  """Exact data term of the GGN: ggn_matrix minus the prior Hessian."""
  full = mm.ggn_matrix(nlp, params, inputs, targets)
  prior = mm.hessian_matrix(lambda p: nlp.prior_term(p), params)
  return full - prior


def _close(a, b, tol=1e-10):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def _block_index(factors, params, layer):
  """Flat ravel_pytree indices of a layer's (weight, bias) block in K-FAC vec order."""
  idx, _ = kron._leaf_indices(jax.tree_util.tree_leaves(params))
  b = None if layer.bias is None else idx[layer.bias_index]
  return np.asarray(kron._to_matrix(layer, idx[layer.weight_index], b)).reshape(-1)


GAUSS = functools.partial(mm.gaussian_log_likelihood, sigma=0.4)


# --- models ----------------------------------------------------------------------

def dict_linear(p, x):
  return x @ p["w"] + p["b"]


def dict_mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
  return h @ p["l3"]["w"] + p["l3"]["b"]


def dict_mlp_params(key, sizes=(3, 5, 4, 3)):
  ks = _keys(2 * len(sizes), 11)
  return {f"l{i + 1}": {"w": jax.random.normal(ks[2 * i], (m, n)) / np.sqrt(m),
                        "b": 0.3 * jax.random.normal(ks[2 * i + 1], (n,))}
          for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}


class LinenMLP(nn.Module):
  hidden: tuple = (5, 4)
  out: int = 3

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = jnp.tanh(nn.Dense(h, param_dtype=F64)(x))
    return nn.Dense(self.out, param_dtype=F64)(x)


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 5, rngs=rngs, param_dtype=F64)
    self.l2 = nnx.Linear(5, 4, rngs=rngs, param_dtype=F64)
    self.l3 = nnx.Linear(4, 3, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def linen(module, x, seed=3):
  params = module.init(jax.random.PRNGKey(seed), x)["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


def nnx_model():
  graphdef, state = nnx.split(NNXMLP(nnx.Rngs(5)))
  return (lambda s, x: nnx.merge(graphdef, s)(x)), state


@pytest.fixture
def data():
  k = _keys(4)
  x = jax.random.normal(k[0], (9, 3))
  return dict(x=x, y=jax.random.randint(k[1], (9,), 0, 3),
              t=jax.random.normal(k[2], (9, 3)), t2=jax.random.normal(k[3], (9, 2)))


# --- layer discovery -------------------------------------------------------------

def _found(apply_fn, params, x):
  tr = _layers.trace_model(apply_fn, params, x)
  out, _ = tr.evaluate(params, x, tr.zero_perturbations())
  _close(out, apply_fn(params, x), 1e-14)  # the interpreter is the model
  return tr


def test_layers_dict_mlp(data):
  tr = _found(dict_mlp, dict_mlp_params(0), data["x"])
  assert [(l.weight, l.bias, l.kind) for l in tr.layers] == [
      ("l1/w", "l1/b", "dense"), ("l2/w", "l2/b", "dense"), ("l3/w", "l3/b", "dense")]
  assert tr.uncovered_paths == () and tr.shared == ()


def test_layers_linen_dense_stack_with_relu_custom_jvp(data):
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(4, param_dtype=F64)(x))  # relu is a custom_jvp call
      x = nn.Dense(4, param_dtype=F64)(x)
      return nn.Dense(2, param_dtype=F64)(jnp.tanh(x))
  apply_fn, params = linen(M(), data["x"])
  tr = _found(apply_fn, params, data["x"])
  assert [(l.weight, l.bias) for l in tr.layers] == [
      (f"Dense_{i}/kernel", f"Dense_{i}/bias") for i in range(3)]
  assert all(l.weight_perm is None and l.bias_perm is None for l in tr.layers)
  assert tr.uncovered_paths == ()


def test_layers_inside_jit_and_checkpoint(data):
  @jax.jit
  def layer(w, b, h):
    return h @ w + b

  def model(p, x):
    h = jax.checkpoint(lambda h: jnp.tanh(layer(p["l1"]["w"], p["l1"]["b"], h)))(x)
    return layer(p["l2"]["w"], p["l2"]["b"], h)
  p = dict_mlp_params(0)
  del p["l3"]
  tr = _found(model, p, data["x"])
  assert [(l.weight, l.bias) for l in tr.layers] == [("l1/w", "l1/b"), ("l2/w", "l2/b")]


def test_layers_nnx_linear_stack(data):
  apply_fn, state = nnx_model()
  tr = _found(apply_fn, state, data["x"])
  assert [(l.weight, l.bias) for l in tr.layers] == [
      (f"l{i}/kernel/value", f"l{i}/bias/value") for i in (1, 2, 3)]
  assert tr.uncovered_paths == ()


def test_layers_shared_weight_is_uncovered(data):
  def tied(p, x):  # w used twice (tied encoder / decoder)
    return jnp.tanh(x @ p["w"]) @ p["w"].T @ p["v"]
  p = {"w": jnp.ones((3, 3)), "v": jnp.ones((3, 2))}
  tr = _found(tied, p, data["x"])
  assert [l.weight for l in tr.layers] == ["v"]
  assert tr.uncovered_paths == ("w",) and tr.shared == ("w",)


def test_layers_scalar_temperature_and_torch_layout(data):
  def model(p, x):  # weight stored [out, in] as in torch, used as x @ w.T
    return (jnp.tanh(x @ p["w"].T + p["b"]) @ p["v"]) / p["temp"]
  p = {"w": jnp.ones((4, 3)), "b": jnp.ones(4), "v": jnp.ones((4, 2)), "temp": jnp.ones(())}
  tr = _found(model, p, data["x"])
  assert [(l.weight, l.bias) for l in tr.layers] == [("w", "b"), ("v", None)]
  assert tr.layers[0].weight_perm is not None  # a transposed view of the leaf
  assert tr.uncovered_paths == ("temp",)


def test_layers_bias_used_twice_is_not_folded(data):
  def model(p, x):
    return x @ p["w"] + p["b"] + jnp.sum(p["b"])
  tr = _found(model, {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, data["x"])
  assert [(l.weight, l.bias) for l in tr.layers] == [("w", None)]
  assert tr.uncovered_paths == ("b",)


# --- exactness -------------------------------------------------------------------

def _linear_models(x):
  apply_fn, params = linen(nn.Dense(2, param_dtype=F64), x)
  k = _keys(2, 7)
  return [("linen", apply_fn, params),
          ("dict", dict_linear, {"w": jax.random.normal(k[0], (3, 2)),
                                 "b": jax.random.normal(k[1], (2,))}),
          ("torch_layout", lambda p, x: x @ p["w"].T + p["b"],
           {"w": jax.random.normal(k[0], (2, 3)), "b": jax.random.normal(k[1], (2,))})]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_linear_gaussian_layer_is_exact(data, which):
  """One linear layer with a bias, Gaussian scalar sigma: A (x) G is the whole GGN."""
  name, apply_fn, params = _linear_models(data["x"])[which]
  nlp = _data_nlp(apply_fn, GAUSS, num_data=40)
  f = kron.kron_factors(nlp, params, data["x"], data["t2"])
  assert len(f.layout.layers) == 1 and f.layout.uncovered == (), name
  exact = _data_ggn(nlp, params, data["x"], data["t2"])
  _close(kron.kron_to_dense(f, params), exact)
  v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.PRNGKey(9), p.shape),
                             params)
  _close(ravel_pytree(kron.kron_vp(f, params, v))[0], exact @ ravel_pytree(v)[0])


def _mlp_models():
  apply_fn, params = linen(LinenMLP(), jnp.ones((1, 3)))
  return {"dict": (dict_mlp, dict_mlp_params(0)), "linen": (apply_fn, params),
          "nnx": nnx_model()}


LIKELIHOODS = {"categorical": (mm.categorical_log_likelihood, "y"),
               "gaussian": (GAUSS, "t")}


_kron_factors = jax.jit(kron.kron_factors, static_argnums=0)  # under jit, as users will


def _blocks(nlp, params, x, t):
  f = _kron_factors(nlp, params, x, t)
  approx, exact = kron.kron_to_dense(f, params), _data_ggn(nlp, params, x, t)
  for layer in f.layout.layers:
    i = _block_index(f, params, layer)
    yield layer, f, approx[np.ix_(i, i)], exact[np.ix_(i, i)]


# dict runs by default; the linen and NNX models (same math) with -m slow.
@pytest.mark.parametrize("model", ["dict", pytest.param("linen", marks=pytest.mark.slow),
                                   pytest.param("nnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_mlp_blocks_exact_for_one_example(data, model, lik):
  """B = 1 (no shared axis): every layer's block is exactly A (x) G, any likelihood."""
  apply_fn, params = _mlp_models()[model]
  ll, tkey = LIKELIHOODS[lik]
  nlp = _data_nlp(apply_fn, ll, num_data=25)
  for i in (0, 4):
    x, t = data["x"][i:i + 1], data[tkey][i:i + 1]
    for _, _, approx, exact in _blocks(nlp, params, x, t):
      _close(approx, exact)


@pytest.mark.parametrize("model", ["dict", "linen"])
def test_mlp_gaussian_last_layer_block_exact(data, model):
  """Gaussian likelihood: sum_k g g^T = I / sigma^2 for every row of the last layer."""
  apply_fn, params = _mlp_models()[model]
  nlp = _data_nlp(apply_fn, GAUSS, num_data=25)
  *_, (layer, _, approx, exact) = _blocks(nlp, params, data["x"], data["t"])
  _close(approx, exact)


@pytest.mark.parametrize("model", ["dict", pytest.param("linen", marks=pytest.mark.slow)])
@pytest.mark.parametrize("lik", ["categorical", "gaussian"])
def test_mlp_block_traces(data, model, lik):
  r"""tr(A (x) G) = tr(A) tr(G) = (N/B)(1/B) sum_i |a_i|^2 sum_j tr G_j, while the
  exact block's trace is (N/B) sum_i |a_i|^2 tr G_i: equal when |a_i|^2 is the
  same for every example (first layer, inputs of equal norm), not in general.
  The exact trace is the sum of the one-example factors' traces."""
  apply_fn, params = _mlp_models()[model]
  ll, tkey = LIKELIHOODS[lik]
  x, t = data["x"], data[tkey]
  b = x.shape[0]
  nlp = _data_nlp(apply_fn, ll, num_data=25)
  xn = x / jnp.linalg.norm(x, axis=1, keepdims=True)  # every |[x_i; 1]|^2 = 2
  first = next(_blocks(nlp, params, xn, t))
  _close(np.trace(first[2]), np.trace(first[3]))
  _close(first[1].A[0], first[1].A[0].T)
  per_example = [list(_blocks(nlp, params, x[i:i + 1], t[i:i + 1])) for i in range(b)]
  for l, (layer, f, approx, exact) in enumerate(_blocks(nlp, params, x, t)):
    # tr(A (x) G) in factor form.
    _close(np.trace(approx), np.trace(f.A[l]) * np.trace(f.G[l]))
    # One-example factors (num_data fixed, so each carries N/1) sum to B times the
    # exact block: the exact trace without the K-FAC cross-example mixing.
    _close(sum(np.trace(pe[l][2]) for pe in per_example) / b, np.trace(exact))
    if l > 0 and not (lik == "gaussian" and l == len(f.layout.layers) - 1):
      assert abs(np.trace(approx) - np.trace(exact)) > 1e-6 * abs(np.trace(exact))


# --- diagonal blocks, vector products, eigendecomposition -------------------------

def _temp_mlp(p, x):
  return dict_mlp(p["net"], x) / p["temp"]


def _temp_params():
  return {"net": dict_mlp_params(0), "temp": jnp.asarray(1.3)}


@pytest.mark.slow  # K-FAC is private until the Laplace structures use it
def test_uncovered_leaf_gets_exact_diagonal_and_vp_matches_dense(data):
  params = _temp_params()
  nlp = _data_nlp(_temp_mlp, mm.categorical_log_likelihood, num_data=30)
  f = kron.kron_factors(nlp, params, data["x"], data["y"])
  assert f.layout.uncovered == ("temp",)
  assert f.layout.structure()["temp"] == "diag"
  assert f.layout.structure()["net/l2/b"] == "kron:net/l2/w"
  exact = _data_ggn(nlp, params, data["x"], data["y"])
  j = len(ravel_pytree(params["net"])[0])  # "temp" is raveled last
  d = kron.kron_to_dense(f, params)
  _close(d[j, j], exact[j, j])
  _close(f.diagonal[0], exact[j, j])
  v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape),
                             params)
  _close(ravel_pytree(kron.kron_vp(f, params, v))[0], d @ ravel_pytree(v)[0])


def test_kron_eigh_reconstructs_blocks(data):
  params = _temp_params()
  nlp = _data_nlp(_temp_mlp, mm.categorical_log_likelihood, num_data=30)
  f = kron.kron_factors(nlp, params, data["x"], data["y"])
  e = kron.kron_eigh(f)
  for l in range(len(f.layout.layers)):
    for vals, vecs, m in ((e.a_eigvals[l], e.a_eigvecs[l], f.A[l]),
                          (e.g_eigvals[l], e.g_eigvecs[l], f.G[l])):
      _close((vecs * vals) @ vecs.T, m)
    block = jnp.kron(f.A[l], f.G[l])
    _close(np.sort(np.linalg.eigvalsh(block)),
           np.sort(np.outer(e.a_eigvals[l], e.g_eigvals[l]).ravel()))
  _close(e.diagonal[0], f.diagonal[0])


# --- batch accumulation ----------------------------------------------------------

@pytest.mark.slow  # K-FAC is private until the Laplace structures use it
def test_batches_that_partition_the_data_give_the_one_batch_factors():
  k = _keys(2, 21)
  n = 23
  x = jax.random.normal(k[0], (n, 3))
  y = jax.random.randint(k[1], (n,), 0, 3)
  params = _temp_params()
  nlp = _data_nlp(_temp_mlp, mm.categorical_log_likelihood, num_data=n)

  @jax.jit
  @chex.assert_max_traces(n=5)  # batch sizes 23, 8, 7, 4, 3
  def step(xb, yb):
    return kron.kron_factors(nlp, params, xb, yb)

  results = []
  for num in (1, 3, 7):
    parts = zip(np.array_split(np.arange(n), num), strict=True)
    acc = None
    for (ids,) in parts:
      f = step(x[ids], y[ids])
      acc = f if acc is None else kron.add_kron_factors(acc, f)
    results.append(acc)
  one = results[0]
  _close(kron.kron_to_dense(one, params), kron.kron_to_dense(
      kron.kron_factors(nlp, params, x, y), params))
  for acc in results[1:]:
    assert float(acc.num_examples) == n
    for got, want in zip(acc.A + acc.G + acc.diagonal, one.A + one.G + one.diagonal):
      _close(got, want)
    _close(kron.kron_to_dense(acc, params), kron.kron_to_dense(one, params))


def test_one_batch_carries_the_nlp_scale(data):
  nlp = _data_nlp(dict_linear, GAUSS, num_data=40)
  params = _linear_models(data["x"])[1][2]
  f = kron.kron_factors(nlp, params, data["x"], data["t2"])
  _close(f.scale, nlp.scale(data["x"]))
  # A is the mean of [x; 1][x; 1]^T; G = (N/B) sum_i I / sigma^2.
  xa = jnp.concatenate([data["x"], jnp.ones((9, 1))], axis=1)
  _close(f.A[0], xa.T @ xa / 9)
  _close(f.G[0], 40 * jnp.eye(2) / 0.4**2)


def test_add_kron_factors_refuses_other_models(data):
  params = _linear_models(data["x"])[1][2]
  f1 = kron.kron_factors(_data_nlp(dict_linear, GAUSS, num_data=40), params,
                         data["x"], data["t2"])
  f2 = kron.kron_factors(_data_nlp(dict_linear, GAUSS, num_data=50), params,
                         data["x"], data["t2"])
  with pytest.raises(ValueError, match="different models or num_data"):
    kron.add_kron_factors(f1, f2)
  with pytest.raises(TypeError, match="two KronFactors"):
    kron.add_kron_factors(f1, params)
  with pytest.raises(ValueError, match="params has 3 leaves"):
    kron.kron_vp(f1, {**params, "c": jnp.ones(())}, {**params, "c": jnp.ones(())})


# --- convolutions ----------------------------------------------------------------

def _conv_data():
  k = _keys(2, 31)
  x = jax.random.normal(k[0], (4, 5, 5, 2))
  return x, jax.random.normal(k[1], (4, 5, 5, 3))


@pytest.mark.slow  # long; CI runs -m slow too
def test_conv_linear_gaussian_is_exact():
  """One flax nn.Conv, Gaussian on every output pixel: 'expand' K-FAC is exact.

  Each row (example, output pixel) has its own outputs, so the rows'
  output-side vectors are orthogonal and sum_k g g^T = I / sigma^2 for all:
  A (x) G with A the mean patch outer product is the exact GGN (with bias)."""
  x, t = _conv_data()
  for padding, strides in (("SAME", (1, 1)), ("VALID", (2, 2))):
    module = nn.Conv(3, (3, 3), padding=padding, strides=strides, param_dtype=F64)
    apply_fn, params = linen(module, x)
    tt = t[:, ::strides[0], ::strides[1]] if padding == "SAME" else t[:, :2, :2]
    nlp = _data_nlp(apply_fn, GAUSS, num_data=10)
    f = kron.kron_factors(nlp, params, x, tt)
    assert f.layout.layers[0].kind == "conv" and f.layout.layers[0].weight_perm is None
    _close(kron.kron_to_dense(f, params), _data_ggn(nlp, params, x, tt))


@pytest.mark.slow
def test_conv_nchw_layout_is_exact_and_patches_reproduce_the_conv():
  """A lax conv in NCHW/OIHW (a permuted view of the kernel), no bias."""
  x, _ = _conv_data()
  x = jnp.transpose(x, (0, 3, 1, 2))
  k = _keys(2, 41)
  params = {"k": 0.3 * jax.random.normal(k[0], (3, 2, 3, 3))}

  def model(p, x):
    return jax.lax.conv_general_dilated(x, p["k"], (2, 2), "SAME",
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))
  tr = _found(model, params, x)
  assert [(l.weight, l.bias, l.kind) for l in tr.layers] == [("k", None, "conv")]
  assert tr.layers[0].weight_perm is not None
  out, acts = tr.evaluate(params, x, tr.zero_perturbations())
  m = kron._to_matrix(tr.layers[0], params["k"], None)
  _close(tr.a_rows(0, acts[0]) @ m, tr.s_rows(0, out), 1e-12)
  t = jax.random.normal(k[1], out.shape)
  nlp = _data_nlp(model, GAUSS, num_data=10)
  f = kron.kron_factors(nlp, params, x, t)
  _close(kron.kron_to_dense(f, params), _data_ggn(nlp, params, x, t))


def test_conv_with_pooled_output_is_not_exact():
  """Pixels sharing one output (global pooling): 'expand' is not exact even for
  one example; the 'reduce' variant (not implemented) is the one for this case."""
  x, _ = _conv_data()
  module = nn.Conv(3, (3, 3), param_dtype=F64)
  apply_fn, params = linen(module, x)
  pooled = lambda p, x: jnp.mean(apply_fn(p, x), axis=(1, 2))
  t = jnp.zeros((1, 3))
  nlp = _data_nlp(pooled, GAUSS, num_data=10)
  (_, _, approx, exact), = _blocks(nlp, params, x[:1], t)
  assert np.abs(approx - exact).max() > 1e-3 * np.abs(exact).max()
