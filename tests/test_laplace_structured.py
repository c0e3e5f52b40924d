"""Acceptance tests of the structured Laplace posteriors (issue 11).

Every check compares ``mm.laplace`` / ``mm.log_evidence`` with
``structure="full" | "diag" | "kron" | "lowrank"``, ``subset=`` and ``data=``
against an independent reference from ``tests/_structured_refs.py``: dense
``J^T H J`` from ``jax.jacfwd`` and the closed-form output Hessian, the
textbook evidence ``log p(D, w*) + P/2 log 2 pi - 1/2 log det(H + D)`` with the
log joint from ``scipy.stats``, numpy Monte Carlo and scipy optimizers. Each
test's docstring says where the approximation must equal the exact answer.

The K-FAC variant is 'expand' (Eschenhagen et al. 2023,
https://arxiv.org/abs/2311.00636): ``A = mean_i a_i a_i^T``,
``G = sum_i sum_k g_ik g_ik^T`` with the exact output-Hessian square root.
"""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.special
from jax.flatten_util import ravel_pytree

import mlmap as mm
import _structured_refs as R

STRUCTS = {"full": {}, "diag": {}, "kron": {}, "lowrank": {"rank": 10}}


def _rel(a, b):
  return abs(float(a) - float(b)) / max(1.0, abs(float(b)))


def _close(a, b, tol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def _flat_paths(params):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _index(params, prefix):
  """Flat ravel_pytree indices of the leaves whose key path starts with ``prefix``."""
  return np.flatnonzero(R.flat_mask(R.leaf_mask(
      params, lambda path, leaf: path.startswith(prefix))))


def _expand(subset, params):
  """Flat bool mask of a prefix-tree subset (bool or bool-array leaves)."""
  full = jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(
          lambda l: np.broadcast_to(np.asarray(m, bool), np.shape(l)), sub),
      subset, params)
  return R.flat_mask(full)


def _data_matrix(post, params, prior_sigma=R.PRIOR_SIGMA):
  """The posterior's data term ``H``, dense: ``Lambda`` column by column minus ``D``."""
  lam = R.dense_from_vp(post.precision_vp, params)
  return lam - np.diag(R.prior_precision(params, prior_sigma))


# --- fixtures (module scope: fitted once) ----------------------------------------

@pytest.fixture(scope="module")
def linear():
  """One flax ``nn.Dense(3)`` with a bias, Gaussian likelihood, at its closed-form MAP."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(R.N_DATA, 4))
  y = x @ rng.normal(size=(4, 3)) + 0.5 + R.SIGMA * rng.normal(size=(R.N_DATA, 3))
  module = R.LinenDense(3)
  apply_fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  params = module.init(jax.random.PRNGKey(0), x[:1])["params"]
  xt = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  wt = np.linalg.solve(xt.T @ xt / R.SIGMA**2 + np.eye(5) / R.PRIOR_SIGMA**2,
                       xt.T @ y / R.SIGMA**2)
  params = {"Dense_0": {"kernel": jnp.asarray(wt[:4]), "bias": jnp.asarray(wt[4])}}
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      module.init(jax.random.PRNGKey(0), x[:1])["params"])
  return R.gaussian_nlp(apply_fn), apply_fn, params, x, y


@pytest.fixture(scope="module")
def reg_mlp():
  """2-layer tanh dict MLP (3-6-2), Gaussian likelihood, at its MAP."""
  x, y = R.regression_data(0)
  nlp = R.gaussian_nlp(R.dict_mlp, num_data=R.N_DATA)
  params = R.fit_map(nlp, R.dict_mlp_params(0, 3, 6, 2), x, y)
  return nlp, R.dict_mlp, params, x, y


@pytest.fixture(scope="module")
def cls_mlp():
  """2-layer tanh dict MLP (3-6-3), categorical likelihood, at its MAP."""
  x, y = R.classification_data(1)
  nlp = R.categorical_nlp(R.dict_mlp, num_data=R.N_DATA)
  params = R.fit_map(nlp, R.dict_mlp_params(1, 3, 6, 3), x, y)
  return nlp, R.dict_mlp, params, x, y


# --- 1. kron ------------------------------------------------------------------------

def test_kron_equals_full_for_one_linear_gaussian_layer(linear):
  """Where K-FAC is exact: one linear multi-output layer (bias folded), Gaussian
  likelihood with a scalar sigma. Then ``J = [x, 1] (x) I`` and the GGN is
  ``(X~^T X~) (x) I / sigma^2 = A (x) G``: the evidence, ``Lambda v`` and the GLM
  variances of ``"kron"`` equal ``"full"`` and the dense formula."""
  nlp, apply_fn, params, x, y = linear
  ref = R.dense_evidence("gaussian", apply_fn, params, x, y)
  kron = mm.log_evidence(nlp, params, x, y, structure="kron")
  full = mm.log_evidence(nlp, params, x, y, structure="full")
  assert _rel(full, ref) < 1e-8 and _rel(kron, ref) < 1e-8, (kron, full, ref)
  post_k = mm.laplace(nlp, params, x, y, structure="kron")
  post_f = mm.laplace(nlp, params, x, y, structure="full")
  assert _rel(post_k.log_evidence(), ref) < 1e-8
  lam = R.data_ggn("gaussian", apply_fn, params, x) + np.diag(R.prior_precision(params))
  v = jax.tree_util.tree_map(lambda l: jnp.cos(jnp.arange(l.size, dtype=l.dtype)
                                               ).reshape(l.shape), params)
  ref_v = lam @ np.asarray(ravel_pytree(v)[0])
  _close(ravel_pytree(post_k.precision_vp(v))[0], ref_v, 1e-8)
  _close(ravel_pytree(post_f.precision_vp(v))[0], ref_v, 1e-8)
  _close(R.dense_from_vp(post_k.precision_vp, params), lam, 1e-8)
  xs = np.random.default_rng(9).normal(size=(5, 4))
  ref_var = R.glm_variances(apply_fn, params, xs, lam)
  _close(post_k.glm_moments(xs)[1], ref_var, 1e-8)
  _close(post_f.glm_moments(xs)[1], ref_var, 1e-8)
  kinds = post_k.structure_of()
  assert set(kinds.values()) == {"kron:Dense_0/kernel"}, kinds


def test_kron_equals_full_for_one_linear_gaussian_conv_with_one_output_position():
  """A flax ``nn.Conv`` (3x3 kernel, VALID) on 3x3 images has one output position:
  it is a Dense layer on the flattened patch, so under a Gaussian likelihood its
  Grosse-Martens factors are exact. ``mm.laplace(structure="kron")`` finds the
  convolution in the traced computation (no registration) and its evidence,
  GLM variances and dense precision equal the dense formula's to 1e-8."""
  import flax.linen as nn
  module = nn.Conv(3, (3, 3), padding="VALID")
  rng = np.random.default_rng(5)
  x = rng.normal(size=(R.N_DATA, 3, 3, 2))
  y = rng.normal(size=(R.N_DATA, 3))
  apply_fn = lambda p, x: module.apply({"params": p}, x).reshape(x.shape[0], -1)  # noqa: E731
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  module.init(jax.random.PRNGKey(1), x[:1])["params"])
  nlp = R.gaussian_nlp(apply_fn)
  post = mm.laplace(nlp, params, x, y, structure="kron", map_tol=None)
  assert set(post.structure_of().values()) == {"kron:kernel"}, post.structure_of()
  ref = R.dense_evidence("gaussian", apply_fn, params, x, y)
  assert _rel(post.log_evidence(), ref) < 1e-8, (post.log_evidence(), ref)
  lam = R.data_ggn("gaussian", apply_fn, params, x) + np.diag(R.prior_precision(params))
  _close(R.dense_from_vp(post.precision_vp, params), lam, 1e-8)
  xs = rng.normal(size=(4, 3, 3, 2))
  _close(post.glm_moments(xs)[1], R.glm_variances(apply_fn, params, xs, lam), 1e-8)


def test_kron_on_an_mlp_is_exact_on_the_gaussian_last_layer_only(reg_mlp):
  """'expand' K-FAC on a 2-layer tanh MLP. Exact where it must be: the last
  layer's block under a Gaussian likelihood (its output factor ``I / sigma^2`` is
  the same for every example), and every block for a one-example batch (then
  ``A (x) G = a a^T (x) g g^T`` is the block itself; equal traces in particular).
  Not exact: the first layer's block on the full batch, and the cross-layer
  blocks (K-FAC is block diagonal)."""
  nlp, apply_fn, params, x, y = reg_mlp
  post = mm.laplace(nlp, params, x, y, structure="kron")
  h = _data_matrix(post, params)
  g = R.data_ggn("gaussian", apply_fn, params, x)
  last, first = _index(params, "['l2']"), _index(params, "['l1']")
  _close(h[np.ix_(last, last)], g[np.ix_(last, last)], 1e-10)
  assert np.all(h[np.ix_(first, last)] == 0)
  err = np.abs(h[np.ix_(first, first)] - g[np.ix_(first, first)]).max()
  assert err > 1e-3 * np.abs(g[np.ix_(first, first)]).max(), err
  assert _rel(post.log_evidence(), R.dense_evidence("gaussian", apply_fn, params, x, y)
              ) > 1e-6
  # One example: every block is exact.
  nlp1 = R.gaussian_nlp(apply_fn)
  post1 = mm.laplace(nlp1, params, x[:1], y[:1], structure="kron", map_tol=None)
  h1 = _data_matrix(post1, params)
  g1 = R.data_ggn("gaussian", apply_fn, params, x[:1])
  for idx in (first, last):
    np.testing.assert_allclose(np.trace(h1[np.ix_(idx, idx)]),
                               np.trace(g1[np.ix_(idx, idx)]), rtol=1e-10)
    _close(h1[np.ix_(idx, idx)], g1[np.ix_(idx, idx)], 1e-10)
  kinds = post.structure_of()
  assert kinds == {"l1/b": "kron:l1/w", "l1/w": "kron:l1/w",
                   "l2/b": "kron:l2/w", "l2/w": "kron:l2/w"}, kinds


# --- 2. diag ------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["reg_mlp", "cls_mlp"])
def test_diag_is_the_diagonal_of_the_dense_precision(problem, request):
  """``"diag"``: ``Lambda = diag(GGN) + D`` exactly (the GGN from ``jax.jacfwd`` J
  and the closed-form output Hessian), and its evidence is
  ``log p(D, w*) + P/2 log 2 pi - 1/2 sum log diag`` computed by hand."""
  nlp, apply_fn, params, x, y = request.getfixturevalue(problem)
  kind = "gaussian" if problem == "reg_mlp" else "categorical"
  post = mm.laplace(nlp, params, x, y, structure="diag")
  lam = R.dense_from_vp(post.precision_vp, params)
  prec = R.prior_precision(params)
  ref_diag = np.diag(R.data_ggn(kind, apply_fn, params, x)) + prec
  _close(np.diag(lam), ref_diag, 1e-10)
  assert np.all(lam[~np.eye(len(prec), dtype=bool)] == 0)
  joint = (R.log_likelihood(kind, apply_fn(params, x), y)
           + R.log_prior(ravel_pytree(params)[0], prec))
  ref = joint + 0.5 * len(prec) * math.log(2 * math.pi) - 0.5 * np.sum(np.log(ref_diag))
  assert _rel(post.log_evidence(), ref) < 1e-10
  assert _rel(mm.log_evidence(nlp, params, x, y, structure="diag"), ref) < 1e-10
  assert set(post.structure_of().values()) == {"diag"}


@pytest.mark.slow
def test_hutchinson_diagonal_is_within_its_standard_error(cls_mlp):
  """Monte-Carlo diagonal: unbiased, so within 5 of its reported standard errors
  of the exact diagonal; exact where the GGN is diagonal (never here)."""
  nlp, apply_fn, params, x, y = cls_mlp
  post = mm.laplace(nlp, params, x, y, structure="diag", diag_method="hutchinson",
                    num_samples=64, key=jax.random.PRNGKey(3), map_tol=None)
  exact = np.diag(R.data_ggn("categorical", apply_fn, params, x))
  est = np.diag(_data_matrix(post, params))
  se = np.asarray(post.diag_stderr)
  assert se.shape == exact.shape and np.all(se[exact > 1e-6] > 0)
  assert np.all(np.abs(est - exact) <= 5 * se + 1e-12), np.max(np.abs(est - exact) / se)


# --- 3. low rank --------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [
    # Default: ranks 2 and P (bracketing, monotone error, exact at P); the
    # intermediate ranks run with -m slow.
    (2,), pytest.param((2, 5, 10, 20), marks=pytest.mark.slow)])
def test_lowrank_of_full_rank_equals_full_and_its_error_falls_with_rank(cls_mlp, ranks):
  """``"lowrank"`` with ``rank = P`` is the full GGN: evidence (1e-8) and GLM
  variances equal ``"full"``. For ``rank < P`` the Ritz values are below the top
  eigenvalues (Cauchy interlacing), so the evidence is bracketed by the exact
  top-``k`` truncation and the prior-only value, and its error vs ``"full"`` does
  not increase with the rank (default suite: ranks 2, P; slow: 2, 5, 10, 20, P)."""
  nlp, apply_fn, params, x, y = cls_mlp
  p = ravel_pytree(params)[0].size
  full = mm.laplace(nlp, params, x, y, structure="full")
  ref = R.dense_evidence("categorical", apply_fn, params, x, y)
  assert _rel(full.log_evidence(), ref) < 1e-10
  post_p = mm.laplace(nlp, params, x, y, structure="lowrank", rank=p)
  assert _rel(post_p.log_evidence(), ref) < 1e-8
  xs = np.random.default_rng(8).normal(size=(4, 3))
  _close(post_p.glm_moments(xs)[1], full.glm_moments(xs)[1], 1e-8)
  prec = R.prior_precision(params)
  joint = (R.log_likelihood("categorical", apply_fn(params, x), y)
           + R.log_prior(ravel_pytree(params)[0], prec))
  eig = np.sort(np.linalg.eigvalsh(R.data_ggn("categorical", apply_fn, params, x)))[::-1]
  delta = prec[0]
  prior_only = joint + 0.5 * p * math.log(2 * math.pi) - 0.5 * p * math.log(delta)
  errors = []
  for k in ranks + (p,):
    value = float(mm.log_evidence(nlp, params, x, y, structure="lowrank", rank=k))
    trunc = prior_only - 0.5 * np.sum(np.log1p(np.clip(eig[:k], 0, None) / delta))
    assert trunc - 1e-9 <= value <= prior_only + 1e-9, (k, trunc, value, prior_only)
    errors.append(value - float(ref))
  assert all(e >= -1e-9 for e in errors), errors
  assert all(b <= a + 1e-10 for a, b in zip(errors, errors[1:])), errors
  assert errors[0] > 1.0 and abs(errors[-1]) < 1e-8 * abs(float(ref)), errors


# --- 4. subsets ---------------------------------------------------------------------

@pytest.mark.parametrize("structure, kw", [
    ("full", {}), ("kron", {}), ("diag", {}),
    pytest.param("lowrank", {"rank": 14}, marks=pytest.mark.slow)])
def test_last_layer_subset_is_the_evidence_of_the_sub_model(reg_mlp, structure, kw):
  """The last layer (``l2``: 6 x 2 + 2 = 14 parameters) as the subset equals the
  dense evidence of the sub-model ``apply_sub(w_last, x)`` (the first layer closed
  over at its MAP, a Gaussian prior on the last layer only). Exact for
  ``"full"``, for ``"lowrank"`` at ``rank = P_sub`` and for ``"kron"`` (last layer,
  Gaussian); ``"diag"`` equals the sub-model's diagonal evidence."""
  nlp, apply_fn, params, x, y = reg_mlp
  mask = R.flat_mask(R.leaf_mask(params, lambda path, leaf: path.startswith("['l2']")))
  subset = mm.last_layer_subset(params)
  np.testing.assert_array_equal(_expand(subset, params), mask)
  ref = R.subset_evidence("gaussian", apply_fn, params, mask, x, y,
                          structure="diag" if structure == "diag" else "full")
  post = mm.laplace(nlp, params, x, y, structure=structure, subset=subset, **kw)
  assert post.num_params == 14
  assert _rel(post.log_evidence(), ref) < 1e-8, (float(post.log_evidence()), ref)
  value = mm.log_evidence(nlp, params, x, y, structure=structure, subset=subset, **kw)
  assert _rel(value, ref) < 1e-8
  kinds = post.structure_of()
  assert kinds["l1/w"] == kinds["l1/b"] == "fixed" and kinds["l2/w"] != "fixed"
  samples = post.sample(jax.random.PRNGKey(0), 3)
  for leaf in ("w", "b"):
    assert np.all(np.asarray(samples["l1"][leaf]) == np.asarray(params["l1"][leaf])[None])
    assert np.all(np.std(np.asarray(samples["l2"][leaf]), axis=0) > 0)


@pytest.mark.parametrize("structure", ["full", pytest.param("diag", marks=pytest.mark.slow)])
def test_elementwise_subset_is_the_evidence_of_the_sub_model(cls_mlp, structure):
  """An element-wise bool mask (entries of every leaf, some leaves entirely out)
  equals the dense (or diagonal) evidence of the sub-model that closes over the
  unselected entries; its prior covers the selected entries only."""
  nlp, apply_fn, params, x, y = cls_mlp
  rng = np.random.default_rng(4)
  mask_tree = R.leaf_mask(params, lambda path, leaf: (
      np.zeros(np.shape(leaf), bool) if path == "['l2']['b']"
      else rng.random(np.shape(leaf)) < 0.4))
  mask = R.flat_mask(mask_tree)
  assert 5 < mask.sum() < mask.size
  ref = R.subset_evidence("categorical", apply_fn, params, mask, x, y, structure=structure)
  value = mm.log_evidence(nlp, params, x, y, structure=structure, subset=mask_tree)
  assert _rel(value, ref) < 1e-8, (float(value), ref)
  prefix = {"l1": {"w": mask_tree["l1"]["w"], "b": True}, "l2": False}
  ref2 = R.subset_evidence("categorical", apply_fn, params,
                           R.flat_mask(R.leaf_mask(params, lambda path, leaf: (
                               mask_tree["l1"]["w"] if path == "['l1']['w']"
                               else path == "['l1']['b']"))),
                           x, y, structure=structure)
  value2 = mm.log_evidence(nlp, params, x, y, structure=structure, subset=prefix)
  assert _rel(value2, ref2) < 1e-8, (float(value2), ref2)


# --- 5. loaders ---------------------------------------------------------------------

@pytest.mark.parametrize("structure", [
    pytest.param("full", marks=pytest.mark.slow), pytest.param("diag", marks=pytest.mark.slow),
    "kron", "lowrank"])
def test_data_loader_equals_one_batch(cls_mlp, structure):
  """Batches that partition the data (1, 3 and 7 of uneven sizes, ``num_data = N``)
  give the one-batch evidence and predictive for every structure (1e-10): the
  data term is summed once per example and the prior counted once."""
  nlp, apply_fn, params, x, y = cls_mlp
  kw = STRUCTS[structure]
  xs = np.random.default_rng(5).normal(size=(4, 3))
  direct = mm.laplace(nlp, params, x, y, structure=structure, **kw)
  ev, pred = float(direct.log_evidence()), np.asarray(direct.predictive(xs))
  if structure == "full":
    assert _rel(ev, R.dense_evidence("categorical", apply_fn, params, x, y)) < 1e-10
  for nb in (1, 3, 7):
    post = mm.laplace(nlp, params, data=R.batches(x, y, nb), structure=structure, **kw)
    assert abs(float(post.log_evidence()) - ev) < 1e-10 * max(1.0, abs(ev)), (nb, ev)
    _close(post.predictive(xs), pred, 1e-10)
    value = mm.log_evidence(nlp, params, data=R.batches(x, y, nb), structure=structure,
                            **kw)
    assert abs(float(value) - ev) < 1e-10 * max(1.0, abs(ev))


# --- 6. predictive ------------------------------------------------------------------

class _Posts(dict):
  """The classification posteriors, built on first use (one failure stays local)."""

  def __init__(self, problem):
    super().__init__()
    self.problem = problem

  def __missing__(self, structure):
    nlp, _, params, x, y = self.problem
    self[structure] = mm.laplace(nlp, params, x, y, structure=structure,
                                 **STRUCTS[structure])
    return self[structure]


@pytest.fixture(scope="module")
def cls_posts(cls_mlp):
  return _Posts(cls_mlp)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_mc_and_bridge_predictives_match_numpy(cls_mlp, cls_posts, structure):
  """``"mc"`` is an unbiased estimate of ``E[softmax(f)]`` under the GLM Gaussian
  ``N(mean, J Lambda^{-1} J^T)`` (moments from ``glm_moments(full_cov=True)``):
  within 4 combined standard errors of a 200000-sample numpy Monte Carlo of the
  same Gaussian. ``"bridge"`` equals a numpy transcription of the Laplace bridge
  (Hobbhahn et al. 2022, with its zero-sum correction) on the same moments."""
  nlp, apply_fn, params, x, y = cls_mlp
  post = cls_posts[structure]
  xs = np.random.default_rng(6).normal(size=(4, 3)) * 2
  mean, cov = post.glm_moments(xs, full_cov=True)
  assert cov.shape == (4, 3, 3)
  ref, ref_se = R.mc_softmax(mean, cov)
  probs, se = post.predictive(xs, link_approx="mc", num_samples=20000,
                              key=jax.random.PRNGKey(1), return_stderr=True)
  probs, se = np.asarray(probs), np.asarray(se)
  assert np.all(np.abs(probs - ref) <= 4 * np.sqrt(se**2 + ref_se**2)), (probs, ref)
  np.testing.assert_allclose(se, ref_se * math.sqrt(200_000 / 20000), rtol=0.2)
  bridge = np.asarray(post.predictive(xs, link_approx="bridge"))
  _close(bridge, R.laplace_bridge(mean, cov)[0], 1e-10)
  _close(bridge.sum(-1), np.ones(4), 1e-12)


def test_glm_moments_in_chunks_equal_one_vmap_eager_and_under_jit(cls_mlp, cls_posts):
  """The three evaluation paths of ``glm_moments`` (one vmap; a Python loop of
  jitted chunks for concrete inputs, which keeps convolutions out of loop bodies
  on XLA:CPU; ``lax.map`` under ``jit``) give the same covariances."""
  _, _, _, x, _ = cls_mlp
  post = cls_posts["kron"]
  ref = post.glm_moments(x, full_cov=True)[1]
  eager = post.glm_moments(x, full_cov=True, chunk_size=4)[1]  # 21 = 5 x 4 + 1
  jitted = jax.jit(lambda p, x: p.glm_moments(x, full_cov=True, chunk_size=4)[1])(post, x)
  assert ref.shape == (x.shape[0], 3, 3)
  np.testing.assert_allclose(eager, ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(jitted, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_nn_predictive_samples_weights(cls_mlp, cls_posts, structure):
  """``pred_type="nn"``: probabilities that sum to 1, equal (within 4 combined
  standard errors) to a numpy Monte Carlo of ``E[softmax(f(x; w))]`` over
  ``w ~ N(w*, Lambda^{-1})``, ``Lambda`` the posterior's own precision made dense
  (for ``"kron"`` this checks sampling through the factors' square roots)."""
  nlp, apply_fn, params, x, y = cls_mlp
  post = cls_posts[structure]
  xs = np.random.default_rng(7).normal(size=(4, 3))
  probs, se = post.predictive(xs, pred_type="nn", num_samples=4000,
                              key=jax.random.PRNGKey(2), return_stderr=True)
  probs, se = np.asarray(probs), np.asarray(se)
  assert probs.shape == (4, 3) and np.all(probs >= 0)
  _close(probs.sum(-1), np.ones(4), 1e-12)
  flat, unravel = ravel_pytree(params)
  lam = R.dense_from_vp(post.precision_vp, params)
  if structure == "full":
    _close(lam, R.data_ggn("categorical", apply_fn, params, x)
           + np.diag(R.prior_precision(params)), 1e-10)
  chol = np.linalg.cholesky(0.5 * (lam + lam.T))
  z = np.random.RandomState(0).standard_normal((len(flat), 20000))
  w = np.asarray(flat)[:, None] + scipy.linalg.solve_triangular(chol.T, z, lower=False)
  out = jax.vmap(lambda f: apply_fn(unravel(f), xs))(jnp.asarray(w.T))
  p = scipy.special.softmax(np.asarray(out), axis=-1)
  ref, ref_se = p.mean(0), p.std(0, ddof=1) / math.sqrt(p.shape[0])
  assert np.all(np.abs(probs - ref) <= 4 * np.sqrt(se**2 + ref_se**2)), (probs, ref)


# --- 7. prior scales ----------------------------------------------------------------

PRIORS = [0.7, {"l1": 0.5, "l2": 2.0}, {"l1": {"w": 0.5, "b": 3.0}, "l2": 2.0}]


@pytest.mark.parametrize("structure", list(STRUCTS))
def test_log_evidence_at_another_prior_scale(cls_mlp, cls_posts, structure):
  """``post.log_evidence(prior_sigma=s)`` reuses ``H``: equal to a fresh
  ``mm.log_evidence`` whose nlp has the prior ``sigma=s`` (same MAP, not refit),
  and to the dense formula with the posterior's own ``H`` and ``D(s)`` (scalar,
  per-layer and per-leaf scales; also under ``jax.jit`` with ``s`` traced)."""
  nlp, apply_fn, params, x, y = cls_mlp
  post = cls_posts[structure]
  h = _data_matrix(post, params)
  for s in PRIORS:
    value = float(post.log_evidence(prior_sigma=s))
    prec = R.prior_precision(params, s)
    joint = (R.log_likelihood("categorical", apply_fn(params, x), y)
             + R.log_prior(ravel_pytree(params)[0], prec))
    assert _rel(value, R.laplace_evidence(joint, h, prec)) < 1e-9, s
    fresh = R.categorical_nlp(apply_fn, prior_sigma=s, num_data=R.N_DATA)
    other = mm.log_evidence(fresh, params, x, y, structure=structure, map_tol=None,
                            **STRUCTS[structure])
    assert _rel(value, other) < 1e-9, s
    if structure == "full":
      assert _rel(value, R.dense_evidence("categorical", apply_fn, params, x, y, s)) < 1e-9
  jitted = jax.jit(lambda p, s: p.log_evidence(prior_sigma=s))
  for s in (0.7, 1.9):
    assert _rel(jitted(post, s), post.log_evidence(prior_sigma=s)) < 1e-12


def _dense_objective(post, params, x, y, apply_fn, groups=None):
  """``-log Z(sigma)`` in numpy: the posterior's ``H``, the dense closed form.

  ``groups``: top-level keys of ``params`` with one scale each (None: one scalar)."""
  h = _data_matrix(post, params)
  ll = R.log_likelihood("categorical", apply_fn(params, x), y)
  flat = np.asarray(ravel_pytree(params)[0])
  owner = (np.zeros(flat.size, int) if groups is None else
           sum(i * R.flat_mask(R.leaf_mask(params, lambda path, leaf, g=g: path.startswith(
               f"['{g}']"))).astype(int) for i, g in enumerate(groups)))
  sq = flat**2

  def neg_ev(log_s):
    prec = np.exp(-2.0 * np.atleast_1d(log_s))[owner]
    log_prior = 0.5 * np.sum(np.log(prec) - R.LOG_2PI - prec * sq)
    return -R.laplace_evidence(ll + log_prior, h, prec)
  return neg_ev


@pytest.mark.parametrize("structure", [
    pytest.param("full", marks=pytest.mark.slow), "diag", "kron",
    pytest.param("lowrank", marks=pytest.mark.slow)])
def test_optimize_prior_is_the_scipy_optimum(cls_mlp, cls_posts, structure):
  """``post.optimize_prior()`` maximizes the evidence at the fixed MAP and ``H``:
  its scalar ``prior_sigma`` equals scipy's bounded ``minimize_scalar`` (xatol
  1e-12, over ``log sigma``) of the dense closed form to 1e-6; it reports
  ``converged``, its evidence is that closed form at the optimum, and a per-layer
  tree of scales agrees with scipy's Nelder-Mead optimum to 1e-5."""
  nlp, apply_fn, params, x, y = cls_mlp
  post = cls_posts[structure]
  neg_ev = _dense_objective(post, params, x, y, apply_fn)
  assert _rel(-neg_ev(math.log(0.7)), post.log_evidence(prior_sigma=0.7)) < 1e-9
  res = scipy.optimize.minimize_scalar(neg_ev, bounds=(math.log(1e-2), math.log(1e2)),
                                       method="bounded", options={"xatol": 1e-12})
  best = post.optimize_prior()
  assert bool(best.optimize_info.converged), best.optimize_info
  sigma = float(best.prior_sigma)
  assert abs(sigma / math.exp(res.x) - 1) < 1e-6, (sigma, math.exp(res.x))
  assert _rel(best.log_evidence(), -res.fun) < 1e-10
  assert _rel(best.log_evidence(), post.log_evidence(prior_sigma=sigma)) < 1e-12
  assert float(best.log_evidence()) >= float(post.log_evidence()) - 1e-12
  init = {"l1": 1.0, "l2": 1.0}
  neg_tree = _dense_objective(post, params, x, y, apply_fn, ("l1", "l2"))
  assert abs(neg_tree(np.log([0.5, 2.0])) + float(post.log_evidence(
      prior_sigma={"l1": 0.5, "l2": 2.0}))) < 1e-9 * abs(neg_tree(np.zeros(2)))
  res2 = scipy.optimize.minimize(neg_tree, np.zeros(2), method="Nelder-Mead",
                                 options=dict(xatol=1e-11, fatol=1e-14, maxiter=4000))
  best2 = post.optimize_prior(init)
  assert bool(best2.optimize_info.converged)
  got = np.array([float(best2.prior_sigma["l1"]), float(best2.prior_sigma["l2"])])
  np.testing.assert_allclose(got, np.exp(res2.x), rtol=1e-5)


def test_optimize_prior_compiles_once(cls_mlp, caplog):
  """Two posteriors of the same shapes (same nlp, two data sets): the second
  ``optimize_prior`` call compiles nothing named like the prior search (the
  first does: a ``maxiter`` no other test uses, so no earlier compilation is
  reused)."""
  _, apply_fn, params, x, y = cls_mlp
  nlp = mm.negative_log_posterior(
      apply_fn, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=R.PRIOR_SIGMA), R.N_DATA)
  x2, y2 = R.classification_data(2)
  posts = [mm.laplace(nlp, params, a, b, structure="diag", map_tol=None)
           for a, b in ((x, y), (x2, y2))]
  assert float(posts[0].log_evidence()) != float(posts[1].log_evidence())
  counts = []
  with jax.log_compiles(True):
    for post in posts:
      caplog.clear()
      with caplog.at_level(logging.WARNING):
        best = post.optimize_prior(maxiter=37)
        jax.block_until_ready(best.prior_sigma)
      counts.append(sum("optimize" in r.getMessage() for r in caplog.records))
  assert counts[0] >= 1 and counts[1] == 0, counts


# --- 8. frameworks ------------------------------------------------------------------

@pytest.fixture(scope="module", params=[
    pytest.param("linen", marks=pytest.mark.slow), "nnx",
    pytest.param("dict", marks=pytest.mark.slow)])
def framework(request):
  """A 3-6-2 tanh MLP in flax linen, flax NNX (nnx.split / nnx.merge, pure-dict
  state) and as a plain function of a dict, at random parameters (Gaussian
  likelihood): the Laplace formulas hold at any point, so no MAP fit is needed
  (``map_tol=None`` in the calls)."""
  apply_fn, params, last = R.make_model(request.param, seed=4)
  x, y = R.regression_data(4)
  nlp = R.gaussian_nlp(apply_fn, num_data=R.N_DATA)
  return request.param, nlp, apply_fn, params, last, x, y


def test_every_structure_and_loader_on_each_framework(framework):
  """Per framework: ``"full"`` and ``"lowrank"`` at ``rank = P`` equal the dense
  evidence; ``"diag"`` the diagonal one; ``"kron"``'s last-layer block equals the
  exact GGN block (Gaussian: exact there) and its first layer is a Kronecker block
  too (``structure_of``); three uneven batches give the one-batch evidence."""
  name, nlp, apply_fn, params, last, x, y = framework
  p = ravel_pytree(params)[0].size
  ref = R.dense_evidence("gaussian", apply_fn, params, x, y)
  g = R.data_ggn("gaussian", apply_fn, params, x)
  prec = R.prior_precision(params)
  joint = (R.log_likelihood("gaussian", apply_fn(params, x), y)
           + R.log_prior(ravel_pytree(params)[0], prec))
  ref_diag = R.laplace_evidence(joint, np.diag(np.diag(g)), prec)
  expected = {"full": ref, "lowrank": ref, "diag": ref_diag}
  kws = {"full": {}, "diag": {}, "kron": {}, "lowrank": {"rank": p}}
  for structure, kw in kws.items():
    post = mm.laplace(nlp, params, x, y, structure=structure, map_tol=None, **kw)
    value = float(post.log_evidence())
    if structure == "kron":
      h = _data_matrix(post, params)
      idx = _index(params, f"['{last}']")
      _close(h[np.ix_(idx, idx)], g[np.ix_(idx, idx)], 1e-10)
      kinds = set(post.structure_of().values())
      assert len(kinds) == 2 and all(k.startswith("kron:") for k in kinds), kinds
    else:
      assert _rel(value, expected[structure]) < 1e-8, (name, structure, value)
    batched = mm.log_evidence(nlp, params, data=R.batches(x, y, 3), structure=structure,
                              map_tol=None, **kw)
    assert abs(float(batched) - value) < 1e-10 * max(1.0, abs(value)), (name, structure)


def test_last_layer_subset_on_each_framework(framework):
  """``mm.last_layer_subset`` selects exactly the last layer's kernel and bias;
  its ``"full"`` and ``"kron"`` evidence (direct and over three batches) equals the
  dense evidence of the sub-model (exact: last layer, Gaussian)."""
  name, nlp, apply_fn, params, last, x, y = framework
  subset = mm.last_layer_subset(params)
  mask = R.flat_mask(R.leaf_mask(params, lambda path, leaf: path.startswith(f"['{last}']")))
  np.testing.assert_array_equal(_expand(subset, params), mask)
  ref_sub = R.subset_evidence("gaussian", apply_fn, params, mask, x, y)
  for structure in ("full", "kron"):
    value = mm.log_evidence(nlp, params, x, y, structure=structure, subset=subset,
                            map_tol=None)
    assert _rel(value, ref_sub) < 1e-8, (name, structure, float(value), ref_sub)
  value = mm.log_evidence(nlp, params, data=R.batches(x, y, 3), structure="kron",
                          subset=subset, map_tol=None)
  assert _rel(value, ref_sub) < 1e-8, (name, float(value), ref_sub)


@pytest.mark.slow
def test_nnx_state_params_work_like_the_pure_dict():
  """NNX parameters given as the ``nnx.State`` that ``nnx.split`` returns (not its
  pure dict): the same dense evidence, kron last-layer block and last-layer subset."""
  from flax import nnx
  graphdef, state = nnx.split(R.NNXMLP(3, 6, 2, nnx.Rngs(4)))
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  x, y = R.regression_data(4)
  nlp = R.gaussian_nlp(apply_fn, num_data=R.N_DATA)
  params = state
  ref = R.dense_evidence("gaussian", apply_fn, params, x, y)
  p = ravel_pytree(params)[0].size
  for structure, kw in (("full", {}), ("lowrank", {"rank": p})):
    value = mm.log_evidence(nlp, params, x, y, structure=structure, map_tol=None, **kw)
    assert _rel(value, ref) < 1e-8, (structure, float(value), ref)
  mask = R.flat_mask(R.leaf_mask(params, lambda path, leaf: path.startswith("['l2']")))
  subset = mm.last_layer_subset(params)
  np.testing.assert_array_equal(_expand(subset, params), mask)
  ref_sub = R.subset_evidence("gaussian", apply_fn, params, mask, x, y)
  value = mm.log_evidence(nlp, params, x, y, structure="kron", subset=subset,
                          map_tol=None)
  assert _rel(value, ref_sub) < 1e-8, (float(value), ref_sub)
  value = mm.log_evidence(nlp, params, data=R.batches(x, y, 3), structure="kron",
                          subset=subset, map_tol=None)
  assert _rel(value, ref_sub) < 1e-8, (float(value), ref_sub)


# --- 9. bad inputs ------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors(reg_mlp):
  """Each misuse raises a ValueError naming the offending value."""
  nlp, apply_fn, params, x, y = reg_mlp
  p = ravel_pytree(params)[0].size
  for call in (mm.laplace, mm.log_evidence):
    with pytest.raises(ValueError, match=r"structure.*'blockdiag'"):
      call(nlp, params, x, y, structure="blockdiag")
    with pytest.raises(ValueError, match=r"rank.*None"):
      call(nlp, params, x, y, structure="lowrank")
    with pytest.raises(ValueError, match=r"rank.*\b0\b"):
      call(nlp, params, x, y, structure="lowrank", rank=0)
    with pytest.raises(ValueError, match=rf"rank.*{p + 1}"):
      call(nlp, params, x, y, structure="lowrank", rank=p + 1)
    laplace_prior = mm.negative_log_posterior(
        apply_fn, nlp.log_likelihood, functools.partial(mm.laplace_log_prior, scale=1.0),
        R.N_DATA)
    with pytest.raises(ValueError, match=r"gaussian_log_prior"):
      call(laplace_prior, params, x, y, subset=mm.last_layer_subset(params))
    with pytest.raises(ValueError, match=r"data"):
      call(nlp, params, x, y, data=R.batches(x, y, 3))
    with pytest.raises(ValueError, match=r"hessian"):
      call(nlp, params, x, y, "hessian", structure="kron")
