r"""Models and independent references for the structured-Laplace tests.

Everything here is written without the structured-Laplace code under test: the
data curvature is ``J^T H J`` from a ``jax.jacfwd`` Jacobian and the closed-form
output Hessian ``H`` of the likelihood (Gaussian ``I / sigma^2``; categorical
``diag(p) - p p^T``), the log joint comes from ``scipy.stats`` / ``scipy.special``,
and the Laplace evidence is its textbook formula

.. math::
  \log Z = \log p(D, w^*) + \frac{P}{2}\log 2\pi - \frac12\log\det(H + D),

with ``D`` the diagonal Gaussian prior precision. Flat vectors are in
``jax.flatten_util.ravel_pytree`` order.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
from flax import nnx
from jax.flatten_util import ravel_pytree

import mlmap as mm

F64 = jnp.float64
SIGMA, PRIOR_SIGMA = 0.3, 1.2
N_DATA = 21
BATCH_SIZES = {1: (21,), 3: (4, 13, 4), 7: (4, 2, 4, 1, 4, 2, 4)}
LOG_2PI = math.log(2.0 * math.pi)


# --- models --------------------------------------------------------------------

class LinenDense(nn.Module):
  """One linear multi-output layer with a bias: where K-FAC is exact."""
  out: int = 3

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out, param_dtype=F64)(x)


class LinenMLP(nn.Module):
  hidden: int = 6
  out: int = 2

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(self.hidden, param_dtype=F64)(x))
    return nn.Dense(self.out, param_dtype=F64)(x)


class NNXMLP(nnx.Module):

  def __init__(self, d_in, hidden, out, rngs):
    self.l1 = nnx.Linear(d_in, hidden, rngs=rngs, param_dtype=F64)
    self.l2 = nnx.Linear(hidden, out, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def dict_mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  return h @ p["l2"]["w"] + p["l2"]["b"]


def dict_mlp_params(seed, d_in, hidden, out):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"l1": {"w": jax.random.normal(k[0], (d_in, hidden), F64) / np.sqrt(d_in),
                 "b": 0.1 * jax.random.normal(k[1], (hidden,), F64)},
          "l2": {"w": jax.random.normal(k[2], (hidden, out), F64) / np.sqrt(hidden),
                 "b": 0.1 * jax.random.normal(k[3], (out,), F64)}}


def make_model(kind, d_in=3, hidden=6, out=2, seed=0):
  """``(apply_fn, params, last)``: ``last`` is the top-level key of the last layer."""
  x0 = jnp.zeros((1, d_in), F64)
  if kind == "linen":
    module = LinenMLP(hidden, out)
    params = module.init(jax.random.PRNGKey(seed), x0)["params"]
    return (lambda p, x: module.apply({"params": p}, x)), params, "Dense_1"
  if kind == "nnx":
    graphdef, state = nnx.split(NNXMLP(d_in, hidden, out, nnx.Rngs(seed)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state.to_pure_dict(), "l2"
  if kind == "dict":
    return dict_mlp, dict_mlp_params(seed, d_in, hidden, out), "l2"
  raise ValueError(kind)


# --- objectives ----------------------------------------------------------------

# Memoized: equal settings give the same nlp object, so the library's jitted
# per-batch functions (nlp is a static argument) compile once per test module.
@functools.lru_cache(maxsize=None)
def gaussian_nlp(apply_fn, sigma=SIGMA, prior_sigma=PRIOR_SIGMA, num_data=None):
  return mm.negative_log_posterior(
      apply_fn, functools.partial(mm.gaussian_log_likelihood, sigma=sigma),
      functools.partial(mm.gaussian_log_prior, sigma=prior_sigma), num_data)


@functools.lru_cache(maxsize=None)
def _categorical_nlp(apply_fn, prior_sigma, num_data):
  return mm.negative_log_posterior(
      apply_fn, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=prior_sigma), num_data)


def categorical_nlp(apply_fn, prior_sigma=PRIOR_SIGMA, num_data=None):
  """Memoized for scalar ``prior_sigma``; a fresh nlp for a tree of scales."""
  if np.isscalar(prior_sigma):
    return _categorical_nlp(apply_fn, prior_sigma, num_data)
  return _categorical_nlp.__wrapped__(apply_fn, prior_sigma, num_data)


def regression_data(seed=0, n=N_DATA, d_in=3, out=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in))
  y = np.tanh(x @ rng.normal(size=(d_in, out))) + SIGMA * rng.normal(size=(n, out))
  return x, y


def classification_data(seed=0, n=N_DATA, d_in=3, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in))
  logits = 2.0 * x @ rng.normal(size=(d_in, classes))
  y = np.array([rng.choice(classes, p=scipy.special.softmax(l)) for l in logits])
  return x, y.astype(np.int32)


def fit_map(nlp, params, x, t):
  """The MAP of ``nlp`` by scipy L-BFGS on the flat parameters (gtol 1e-10)."""
  flat0, unravel = ravel_pytree(params)
  f = jax.jit(jax.value_and_grad(lambda f: nlp(unravel(f), x, t)))

  def fun(v):
    value, grad = f(jnp.asarray(v))
    return float(value), np.asarray(grad, np.float64)
  res = scipy.optimize.minimize(fun, np.asarray(flat0), jac=True, method="L-BFGS-B",
                                options=dict(maxiter=5000, gtol=1e-10, ftol=1e-15))
  return unravel(jnp.asarray(res.x))


def batches(x, t, num_batches):
  """``(inputs, targets)`` batches of uneven sizes that partition ``(x, t)``."""
  edges = np.cumsum((0,) + BATCH_SIZES[num_batches])
  assert edges[-1] == len(x)
  return [(x[a:b], t[a:b]) for a, b in zip(edges[:-1], edges[1:])]


# --- dense references -----------------------------------------------------------

def flat_jacobian(apply_fn, params, x):
  """``J`` of the outputs w.r.t. the flat parameters: ``[B, O, P]`` (jax.jacfwd)."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda f: apply_fn(unravel(f), x).reshape(x.shape[0], -1))(flat)
  return np.asarray(jac)


def output_hessians(kind, outputs, sigma=SIGMA):
  """Closed-form ``-d^2 log p(t | z) / dz^2`` per example: ``[B, O, O]``."""
  outputs = np.asarray(outputs).reshape(len(outputs), -1)
  b, o = outputs.shape
  if kind == "gaussian":
    return np.broadcast_to(np.eye(o) / sigma**2, (b, o, o))
  p = scipy.special.softmax(outputs, axis=-1)
  return np.einsum("bi,ij->bij", p, np.eye(o)) - np.einsum("bi,bj->bij", p, p)


def data_ggn(kind, apply_fn, params, x, sigma=SIGMA):
  """Dense data-term GGN ``sum_i J_i^T H_i J_i`` ``[P, P]`` (scale ``N / B = 1``)."""
  jac = flat_jacobian(apply_fn, params, x)
  h = output_hessians(kind, apply_fn(params, x), sigma)
  return np.einsum("bop,boq,bqr->pr", jac, h, jac)


def log_likelihood(kind, outputs, targets, sigma=SIGMA):
  outputs = np.asarray(outputs)
  if kind == "gaussian":
    return float(np.sum(scipy.stats.norm.logpdf(targets, outputs, sigma)))
  logp = scipy.special.log_softmax(outputs, axis=-1)
  return float(np.sum(np.take_along_axis(logp, np.asarray(targets)[:, None], axis=-1)))


def prior_precision(params, prior_sigma=PRIOR_SIGMA):
  """Flat ``1 / sigma^2`` per entry; ``prior_sigma`` a scalar or a prefix tree."""
  if np.isscalar(prior_sigma):
    return np.full(ravel_pytree(params)[0].size, prior_sigma**-2.0)
  tree = jax.tree_util.tree_map(
      lambda s, sub: jax.tree_util.tree_map(lambda l: np.full(np.shape(l), s**-2.0), sub),
      prior_sigma, params)
  return np.asarray(ravel_pytree(tree)[0])


def log_prior(flat, precision):
  return float(np.sum(scipy.stats.norm.logpdf(np.asarray(flat), 0.0, precision**-0.5)))


def laplace_evidence(log_joint, curvature, precision):
  """``log p(D, w) + P/2 log 2 pi - 1/2 log det(curvature + diag(precision))``."""
  p = len(precision)
  sign, logdet = np.linalg.slogdet(curvature + np.diag(precision))
  assert sign > 0
  return log_joint + 0.5 * p * LOG_2PI - 0.5 * logdet


def dense_evidence(kind, apply_fn, params, x, t, prior_sigma=PRIOR_SIGMA, sigma=SIGMA):
  """The full-GGN Laplace evidence of the model, written from scratch."""
  prec = prior_precision(params, prior_sigma)
  joint = (log_likelihood(kind, apply_fn(params, x), t, sigma)
           + log_prior(ravel_pytree(params)[0], prec))
  return laplace_evidence(joint, data_ggn(kind, apply_fn, params, x, sigma), prec)


def glm_variances(apply_fn, params, x, precision_matrix):
  """``diag(J A^{-1} J^T)`` per example and output: ``[B, O]``."""
  jac = flat_jacobian(apply_fn, params, x)
  sol = np.linalg.solve(precision_matrix, jac.reshape(-1, jac.shape[-1]).T)
  return np.einsum("bop,pbo->bo", jac, sol.reshape(jac.shape[-1], *jac.shape[:2]))


# --- subsets ---------------------------------------------------------------------

def leaf_mask(params, select):
  """A full bool tree like ``params``: ``select(path_string, leaf) -> bool array``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.broadcast_to(
          np.asarray(select(jax.tree_util.keystr(path), leaf), bool), np.shape(leaf)).copy(),
      params)


def flat_mask(mask_tree):
  return np.asarray(ravel_pytree(jax.tree_util.tree_map(
      lambda m: np.asarray(m, np.float64), mask_tree))[0]) > 0.5


def sub_model(apply_fn, params, mask):
  """``(apply_sub, v0)``: the model as a function of the selected flat entries only,
  the others closed over at their values in ``params``."""
  flat, unravel = ravel_pytree(params)
  idx = np.flatnonzero(mask)

  def apply_sub(v, x):
    return apply_fn(unravel(flat.at[idx].set(v)), x)
  return apply_sub, flat[idx]


def subset_evidence(kind, apply_fn, params, mask, x, t, prior_sigma=PRIOR_SIGMA,
                    sigma=SIGMA, structure="full"):
  """Dense evidence of the sub-model with a Gaussian prior on the subset only.

  ``structure="diag"`` keeps only the diagonal of the sub-model's GGN.
  """
  apply_sub, v0 = sub_model(apply_fn, params, mask)
  prec = prior_precision(params, prior_sigma)[mask]
  joint = log_likelihood(kind, apply_sub(v0, x), t, sigma) + log_prior(v0, prec)
  ggn = data_ggn(kind, apply_sub, v0, x, sigma)
  if structure == "diag":
    ggn = np.diag(np.diag(ggn))
  return laplace_evidence(joint, ggn, prec)


# --- matrices from products ------------------------------------------------------

def dense_from_vp(vp, params):
  """``[P, P]`` matrix of a pytree linear map ``vp``: its columns ``vp(e_j)``
  (vmapped over the unit vectors, under one ``jax.jit``)."""
  flat, unravel = ravel_pytree(params)
  cols = jax.jit(jax.vmap(lambda e: ravel_pytree(vp(unravel(e)))[0]))(
      jnp.eye(flat.size, dtype=flat.dtype))
  return np.asarray(cols).T


# --- predictive references -------------------------------------------------------

def mc_softmax(mean, cov, num_samples=200_000, seed=0):
  """numpy Monte Carlo of ``E[softmax(f)]``, ``f ~ N(mean_b, cov_b)``: (mean, stderr)."""
  rng = np.random.RandomState(seed)
  mean, cov = np.asarray(mean), np.asarray(cov)
  out, se = [], []
  for m, c in zip(mean, cov):
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    root = v * np.sqrt(np.clip(w, 0.0, None))
    f = m + rng.standard_normal((num_samples, len(m))) @ root.T
    p = scipy.special.softmax(f, axis=-1)
    out.append(p.mean(0))
    se.append(p.std(0, ddof=1) / np.sqrt(num_samples))
  return np.array(out), np.array(se)


def laplace_bridge(mean, cov):
  r"""Laplace-bridge predictive (Hobbhahn, Kristiadi & Hennig, UAI 2022).

  First the Gaussian over the logits is conditioned on :math:`\sum_k f_k = 0`
  (the bridge's inverse is defined for zero-sum logits):

  .. math::
    \mu' = \mu - \Sigma 1 \frac{1^\top\mu}{1^\top\Sigma 1},\qquad
    \Sigma' = \Sigma - \frac{\Sigma 1 1^\top \Sigma}{1^\top \Sigma 1},

  then :math:`\alpha_k = \frac{1}{\Sigma'_{kk}}\big(1 - \frac2K +
  \frac{e^{\mu'_k}}{K^2}\sum_l e^{-\mu'_l}\big)` and :math:`p = \alpha / \sum\alpha`.
  """
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  k = mean.shape[-1]
  s1 = cov.sum(-1)                                   # Sigma 1, [B, K]
  tot = s1.sum(-1, keepdims=True)                    # 1^T Sigma 1
  mu = mean - s1 * mean.sum(-1, keepdims=True) / tot
  var = np.diagonal(cov, axis1=-2, axis2=-1) - s1**2 / tot
  alpha = (1.0 - 2.0 / k + np.exp(mu) / k**2 * np.exp(-mu).sum(-1, keepdims=True)) / var
  return alpha / alpha.sum(-1, keepdims=True), alpha
