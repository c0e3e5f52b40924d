"""Data-set curvature, objective and diagonals: equal to the one-batch result, prior once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import data as mmdata

N = 13
# Partitions of the N examples into 1, 3 and 7 batches, each with a ragged last batch
# (except the single batch).
SPLITS = {1: [13], 3: [5, 5, 3], 7: [2, 2, 2, 2, 2, 2, 1]}
# The default suite runs the 7-batch split (ragged last batch) for every builder;
# the 1- and 3-batch splits of the large grids run with -m slow.
SPLIT_PARAMS = [pytest.param(n, marks=() if n == 7 else pytest.mark.slow) for n in sorted(SPLITS)]
TOL = dict(rtol=1e-10, atol=1e-10)


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _params(key, d_in=3, hidden=4, d_out=3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {"w1": jax.random.normal(k1, (d_in, hidden)),
          "b1": 0.1 * jax.random.normal(k2, (hidden,)),
          "w2": jax.random.normal(k3, (hidden, d_out)),
          "b2": 0.1 * jax.random.normal(k4, (d_out,))}


def _problem(kind, key=jax.random.PRNGKey(0), apply_fn=_mlp):
  """nlp (num_data=N, Gaussian prior), params, all inputs/targets, a vector."""
  kp, kx, kt, kv = jax.random.split(key, 4)
  params = _params(kp)
  x = jax.random.normal(kx, (N, 3))
  if kind == "categorical":
    t = jax.random.randint(kt, (N,), 0, 3)
    ll = mm.categorical_log_likelihood
  else:
    t = jax.random.normal(kt, (N, 3))
    ll = functools.partial(mm.gaussian_log_likelihood, sigma=0.7)
  prior = functools.partial(mm.gaussian_log_prior, sigma=0.5)
  nlp = mm.negative_log_posterior(apply_fn, ll, prior, num_data=N)
  flat, unravel = ravel_pytree(params)
  vector = unravel(jax.random.normal(kv, flat.shape))
  return nlp, params, x, t, vector


def _split(x, t, sizes):
  edges = np.cumsum([0] + list(sizes))
  return [(x[a:b], t[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _close(a, b):
  np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], **TOL)


BUILDERS = {"ggn": mm.ggn_vp_fn, "fisher": mm.fisher_vp_fn,
            "empirical_fisher": mm.empirical_fisher_vp_fn, "hessian": mm.hvp_fn}


# --- equality with the one-batch result ---------------------------------------------

@pytest.mark.parametrize("num_batches", SPLIT_PARAMS)
@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_dataset_matvec_equals_one_batch(kind, name, num_batches):
  nlp, params, x, t, v = _problem(kind)
  builder = BUILDERS[name]
  want = builder(nlp, params, x, t)(v)
  got = mmdata.dataset_matvec(builder, nlp, params, _split(x, t, SPLITS[num_batches]))(v)
  _close(got, want)


def test_dataset_matvec_accepts_names_and_kwargs():
  nlp, params, x, t, v = _problem("categorical")
  data = _split(x, t, SPLITS[3])
  _close(mmdata.dataset_matvec("fisher", nlp, params, data)(v),
         mm.fisher_vp_fn(nlp, params, x, t)(v))
  # A user output-space Fisher, passed through as a static keyword.
  ofvp = lambda z, u: 2.0 * u  # noqa: E731
  _close(mmdata.dataset_matvec(mm.fisher_vp_fn, nlp, params, data, output_fisher_vp=ofvp)(v),
         mm.fisher_vp_fn(nlp, params, x, t, output_fisher_vp=ofvp)(v))


def test_dataset_matvec_matches_dense_hessian():
  """An independent reference: column j of jax.hessian of the full-data nlp."""
  nlp, params, x, t, _ = _problem("gaussian")
  flat, unravel = ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda f: nlp(unravel(f), x, t)))(flat)
  matvec = mmdata.dataset_matvec("hessian", nlp, params, _split(x, t, SPLITS[7]))
  cols = np.stack([ravel_pytree(matvec(unravel(e)))[0] for e in np.eye(flat.size)], 1)
  np.testing.assert_allclose(cols, dense, **TOL)


@pytest.mark.parametrize("num_batches", sorted(SPLITS))
def test_dataset_value_and_grad_equals_one_batch(num_batches):
  nlp, params, x, t, _ = _problem("categorical")
  want_value, want_grad = jax.value_and_grad(nlp)(params, x, t)
  value, grad = mmdata.dataset_value_and_grad(nlp, params, _split(x, t, SPLITS[num_batches]))
  np.testing.assert_allclose(value, want_value, **TOL)
  _close(grad, want_grad)


@pytest.mark.parametrize("num_batches", SPLIT_PARAMS)
@pytest.mark.parametrize("name", ["ggn", "fisher"])
def test_dataset_diagonal_equals_one_batch(name, num_batches):
  nlp, params, x, t, _ = _problem("categorical")
  diag_fn = {"ggn": mm.ggn_diagonal, "fisher": mm.fisher_diagonal}[name]
  want = diag_fn(nlp, params, x, t)
  got = mmdata.dataset_diagonal(diag_fn, nlp, params, _split(x, t, SPLITS[num_batches]))
  _close(got, want)
  # and the diagonal of the dense one-batch matrix, independently
  dense = mm.ggn_matrix(nlp, params, x, t)
  np.testing.assert_allclose(ravel_pytree(got)[0], np.diag(dense), **TOL)


def test_dataset_diagonal_chunk_size_and_name():
  nlp, params, x, t, _ = _problem("gaussian")
  got = mmdata.dataset_diagonal("ggn", nlp, params, _split(x, t, SPLITS[3]), chunk_size=2)
  _close(got, mm.ggn_diagonal(nlp, params, x, t))


# --- the prior is counted once, the data term with scale 1 ---------------------------

def test_prior_counted_once():
  """With and without the prior, the products differ by exactly one prior Hessian."""
  nlp, params, x, t, v = _problem("gaussian")
  data = _split(x, t, SPLITS[7])
  flat_nlp = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood, None, num_data=N)
  with_prior = mmdata.dataset_matvec("ggn", nlp, params, data)(v)
  without = mmdata.dataset_matvec("ggn", flat_nlp, params, data)(v)
  # gaussian_log_prior(sigma=0.5): Hessian of -log p is I / 0.25.
  diff = jax.tree_util.tree_map(jnp.subtract, with_prior, without)
  _close(diff, jax.tree_util.tree_map(lambda a: a / 0.25, v))
  value, _ = mmdata.dataset_value_and_grad(nlp, params, data)
  value_flat, _ = mmdata.dataset_value_and_grad(flat_nlp, params, data)
  np.testing.assert_allclose(value - value_flat, -nlp.log_prior(params), **TOL)
  diag = mmdata.dataset_diagonal("ggn", nlp, params, data)
  diag_flat = mmdata.dataset_diagonal("ggn", flat_nlp, params, data)
  _close(jax.tree_util.tree_map(jnp.subtract, diag, diag_flat),
         jax.tree_util.tree_map(lambda a: jnp.full_like(a, 4.0), params))


def test_data_term_not_rescaled_per_batch():
  """Without a prior, the sum over batches equals the sum over single examples."""
  nlp, params, x, t, v = _problem("categorical")
  flat_nlp = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood, None, num_data=N)
  one_each = mmdata.dataset_matvec("ggn", flat_nlp, params, _split(x, t, [1] * N))(v)
  unscaled = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood)  # N = B: scale 1
  _close(one_each, mm.ggn_vp_fn(unscaled, params, x, t)(v))


# --- errors --------------------------------------------------------------------------

def test_batch_sizes_must_sum_to_num_data():
  nlp, params, x, t, v = _problem("gaussian")
  short = _split(x[:12], t[:12], [5, 5, 2])
  with pytest.raises(ValueError, match=r"hold 12 examples in 3 batches.*num_data = 13"):
    mmdata.dataset_matvec("ggn", nlp, params, short)(v)
  with pytest.raises(ValueError, match=r"hold 12 examples.*num_data = 13"):
    mmdata.dataset_value_and_grad(nlp, params, short)
  with pytest.raises(ValueError, match=r"hold 12 examples.*num_data = 13"):
    mmdata.dataset_diagonal("ggn", nlp, params, short)
  twice = _split(x, t, [13]) * 2
  with pytest.raises(ValueError, match=r"hold 26 examples.*num_data = 13"):
    mmdata.dataset_value_and_grad(nlp, params, twice)


def test_num_data_required():
  nlp, params, x, t, v = _problem("gaussian")
  no_n = mm.negative_log_posterior(nlp.apply_fn, nlp.log_likelihood, nlp.log_prior)
  with pytest.raises(ValueError, match="num_data is None"):
    mmdata.dataset_matvec("ggn", no_n, params, _split(x, t, [13]))


def test_one_shot_generator():
  nlp, params, x, t, v = _problem("categorical")

  def gen():
    yield from _split(x, t, SPLITS[3])

  with pytest.raises(TypeError, match="one-shot iterator.*zero-argument function"):
    mmdata.dataset_matvec("ggn", nlp, params, gen())
  # A generator factory is walked afresh by every product.
  matvec = mmdata.dataset_matvec("ggn", nlp, params, gen)
  want = mm.ggn_vp_fn(nlp, params, x, t)(v)
  _close(matvec(v), want)
  _close(matvec(v), want)
  # The one-pass functions take a one-shot generator.
  value, grad = mmdata.dataset_value_and_grad(nlp, params, gen())
  want_value, want_grad = jax.value_and_grad(nlp)(params, x, t)
  np.testing.assert_allclose(value, want_value, **TOL)
  _close(grad, want_grad)
  _close(mmdata.dataset_diagonal("ggn", nlp, params, gen()),
         mm.ggn_diagonal(nlp, params, x, t))


def test_bad_arguments():
  nlp, params, x, t, v = _problem("gaussian")
  data = _split(x, t, SPLITS[3])
  with pytest.raises(TypeError, match="one-shot product ggn_vp; pass mm.ggn_vp_fn"):
    mmdata.dataset_matvec(mm.ggn_vp, nlp, params, data)
  with pytest.raises(ValueError, match="vp_fn must be one of"):
    mmdata.dataset_matvec("gnn", nlp, params, data)
  with pytest.raises(TypeError, match=r"batch 0 of data must be an \(inputs, targets\) pair"):
    mmdata.dataset_value_and_grad(nlp, params, (x, t))
  with pytest.raises(ValueError, match="no batches"):
    mmdata.dataset_value_and_grad(nlp, params, [])
  with pytest.raises(TypeError, match="needs an mlmap.NegativeLogPosterior"):
    mmdata.dataset_matvec("hessian", lambda p, a, b: 0.0, params, data)
  with pytest.raises(ValueError, match="vector"):
    mmdata.dataset_matvec("ggn", nlp, params, data)({"w1": v["w1"]})


# --- compilation, jit, and use in a solver -----------------------------------------

def test_ragged_batches_compile_at_most_twice():
  traces = []

  def apply_fn(params, x):
    traces.append(x.shape[0])
    return _mlp(params, x)

  nlp, params, x, t, v = _problem("categorical", apply_fn=apply_fn)
  data = _split(x, t, [4, 4, 4, 1])
  matvec = mmdata.dataset_matvec("ggn", nlp, params, data)
  for k in range(3):
    matvec(jax.tree_util.tree_map(lambda a: a * (k + 1), v))
  # A new matvec at other params with an equal nlp reuses the compilations.
  params2 = jax.tree_util.tree_map(lambda a: a + 0.1, params)
  mmdata.dataset_matvec("ggn", nlp, params2, data)(v)
  assert sorted(traces) == [1, 4], traces
  traces.clear()
  for _ in range(2):
    mmdata.dataset_value_and_grad(nlp, params, data)
  assert sorted(traces) == [1, 4], traces


def test_accumulate_traces_once_per_batch_shape():
  traces = []

  def per_batch(scale, inputs, targets):
    traces.append(inputs.shape)
    return {"s": scale * jnp.sum(inputs), "n": jnp.sum(targets)}

  x = jnp.arange(13.0)
  data = _split(x, x, [5, 5, 3])
  for scale in (1.0, 2.0):
    out = mmdata.accumulate(per_batch, data, args=(jnp.asarray(scale),), num_data=13)
    np.testing.assert_allclose(out["s"], scale * 78.0, **TOL)
  assert sorted(traces) == [(3,), (5,)]
  init = {"s": jnp.asarray(1.0), "n": jnp.asarray(0.0)}
  out = mmdata.accumulate(per_batch, iter(data), init, args=(jnp.asarray(1.0),))
  np.testing.assert_allclose(out["s"], 79.0, **TOL)
  with pytest.raises(ValueError, match="hold 13 examples in 3 batches.*num_data = 12"):
    mmdata.accumulate(per_batch, data, args=(jnp.asarray(1.0),), num_data=12)


def test_dataset_matvec_under_jit_and_cg():
  nlp, params, x, t, v = _problem("categorical")
  matvec = mmdata.dataset_matvec("ggn", nlp, params, _split(x, t, SPLITS[3]))
  want = mm.ggn_vp_fn(nlp, params, x, t)(v)
  _close(jax.jit(matvec)(v), want)
  # The solve of (G + prior) x = v, against the one-batch operator and a dense solve.
  sol, info = mm.cg(matvec, v, tol=1e-13, maxiter=200)
  dense = mm.ggn_matrix(nlp, params, x, t)
  flat, _ = ravel_pytree(v)
  np.testing.assert_allclose(ravel_pytree(sol)[0], np.linalg.solve(dense, flat),
                             rtol=1e-8, atol=1e-8)
  assert int(info.iterations) > 0
