r"""The structured Laplace posterior: diagonal, Kronecker, low-rank or dense precision.

A :class:`StructuredPosterior` is the Gaussian :math:`\mathcal N(w^*, \Lambda^{-1})`
with

.. math::
  \Lambda = H + D, \qquad D = \mathrm{diag}(1/\sigma_0^2),

``H`` the data term's GGN in one of the structures of :mod:`mlmap._precisions`
(its eigendecomposition or diagonal stored) and ``D`` the Gaussian prior's
precision. Because ``H`` is stored apart from ``D``, the evidence at another prior
scale costs ``O(P)`` (:meth:`StructuredPosterior.log_evidence`), which is what
makes post-hoc prior tuning (:meth:`StructuredPosterior.optimize_prior`) cheap.
With a ``subset`` the posterior covers the selected parameters only; the others
stay at their MAP values and are not part of the evidence's prior.

:func:`mlmap.laplace` builds it (``structure="diag" | "kron" | "lowrank"``, or
``"full"`` with ``subset=`` / ``data=``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import dense as _dense
from mlmap import _precisions
from mlmap import _predictive
from mlmap import priors as _priors
from mlmap._fisher import builtin_likelihood

_LOG_2PI = math.log(2.0 * math.pi)


class OptimizePriorInfo(NamedTuple):
  """How :meth:`StructuredPosterior.optimize_prior` ended.

  Attributes:
    converged: the gradient of the evidence in ``log sigma`` fell below
      ``tol * (1 + |log evidence|)``.
    iterations: Newton steps taken.
    grad_norm: final max-norm of that gradient.
    log_evidence: the evidence at the chosen scale.
    initial_log_evidence: the evidence at the starting scale.
  """
  converged: Any
  iterations: Any
  grad_norm: Any
  log_evidence: Any
  initial_log_evidence: Any


def leaf_precisions(fn, sigma, sub):
  r"""``1 / sigma^2`` per leaf of ``sub`` (a tuple aligned with ``tree_leaves(sub)``).

  Scalar scales stay scalars (what the Kronecker blocks need); array scales are
  broadcast to their leaf.
  """
  out = []
  for path, w, s in _priors._scaled_leaves(fn, "sigma", sigma, sub):
    if s is None:
      raise ValueError(f"{fn}: the prior scale of {_checks.leaf_path(path)!r} is None "
                       "(an improper prior); the Laplace evidence needs a proper "
                       "Gaussian prior on every covered parameter.")
    s = jnp.asarray(s, jnp.asarray(w).dtype)
    if s.ndim:
      s = jnp.broadcast_to(s, jnp.shape(w))
    out.append(1.0 / jnp.square(s))
  return tuple(out)


def _prior_nlp(nlp, sigma):
  return dataclasses.replace(
      nlp, log_prior=functools.partial(_priors.gaussian_log_prior, sigma=sigma))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("mean", "precision", "prior_sigma", "nll", "grad_norm",
                                "newton_decrement", "diag_stderr", "optimize_info"),
                   meta_fields=("nlp", "sub_nlp", "subset", "structure", "curvature"))
@dataclasses.dataclass(frozen=True)
class StructuredPosterior:
  r"""Gaussian posterior ``N(w*, (H + D)^{-1})`` with a structured data term ``H``.

  A pytree: it can be returned from and passed through ``jax.jit``.

  Attributes:
    mean: the MAP, the full parameter pytree.
    precision: the data term ``H`` (:mod:`mlmap._precisions`: ``DiagPrecision``,
      ``KronPrecision``, ``LowRankPrecision`` or ``DensePrecision``) over the
      covered parameters in ``ravel_pytree`` order of the subset.
    prior_sigma: the Gaussian prior scale (scalar or prefix tree of ``params``).
    nll: the data term ``-sum_i log p(t_i | f(x_i; w*))`` over the data set.
    grad_norm: norm of the full-data gradient of the covered parameters at the mean.
    newton_decrement: ``g^T Lambda^{-1} g / 2`` with the structured ``Lambda``.
    diag_stderr: standard error of a Monte-Carlo diagonal (``diag_method=
      "hutchinson"``), flat ``[P]``; None otherwise.
    optimize_info: :class:`OptimizePriorInfo` after :meth:`optimize_prior`, else None.
    nlp: the negative log-posterior (its prior is the one at ``prior_sigma``).
    sub_nlp: the model of the covered parameters (``nlp`` itself without a subset).
    subset: a :class:`mlmap.subset.Subset`, or None (every parameter covered).
    structure: ``"full"``, ``"diag"``, ``"kron"`` or ``"lowrank"``.
    curvature: ``"ggn"`` or ``"fisher"``.
  """
  mean: Any
  precision: Any
  prior_sigma: Any
  nll: Any
  grad_norm: Any
  newton_decrement: Any
  diag_stderr: Any
  optimize_info: Any
  nlp: Any
  sub_nlp: Any
  subset: Any
  structure: str
  curvature: str = "ggn"

  # --- the covered parameters -------------------------------------------------------
  @property
  def sub_mean(self):
    """The covered parameters' MAP (``mean`` itself without a subset)."""
    return self.mean if self.subset is None else self.subset.split(self.mean)

  @property
  def num_params(self) -> int:
    """``P``, the number of covered parameters."""
    return ravel_pytree(self.sub_mean)[0].size

  def _sub_sigma(self, fn, sigma):
    return sigma if self.subset is None else self.subset.restrict_scale(fn, sigma)

  def _leaf_prec(self, fn, sigma=None):
    sigma = self.prior_sigma if sigma is None else sigma
    return leaf_precisions(fn, self._sub_sigma(fn, sigma), self.sub_mean)

  def structure_of(self):
    """``{leaf path: structure}``: ``"kron:<weight path>"`` / ``"diag"`` for a
    Kronecker posterior, else the structure name; ``"fixed"`` outside the subset."""
    paths = [_checks.leaf_path(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(self.mean)[0]]
    covered = set(paths) if self.subset is None else set(self.subset.paths)
    inner = {}
    if self.structure == "kron":
      for layer in self.precision.index.layers:
        for leaf in (layer.weight, layer.bias):
          if leaf is not None:
            inner[leaf] = f"kron:{layer.weight}"
    return {p: (inner.get(p, "diag") if self.structure == "kron" else self.structure)
            if p in covered else "fixed" for p in paths}

  # --- evidence ---------------------------------------------------------------------
  def log_evidence(self, prior_sigma=None):
    r"""Laplace log evidence at the fixed MAP, at this or another prior scale.

    .. math::
      \log p(D \mid \sigma_0) \approx \log p(D \mid w^*) + \log p(w^* \mid \sigma_0)
        + \frac P2 \log 2\pi - \frac12 \log\det\big(H + \mathrm{diag}(\sigma_0^{-2})\big)

    ``H`` is not recomputed: ``O(P)`` for ``"diag"``, ``"kron"`` (a scalar scale
    per layer; a weight scale that differs from its bias's re-factors that
    layer's input factor) and ``"lowrank"`` (``O(P k^2)``); ``"full"`` refactors
    the dense matrix (``O(P^3)``). The MAP is not refit (that is
    :func:`mlmap.maximize_evidence`).

    Args:
      prior_sigma: Gaussian prior scale: a scalar or a prefix tree of the full
        ``params`` (scalar leaves; array leaves outside Kronecker blocks); None:
        the posterior's own ``prior_sigma``.

    Returns:
      The scalar log evidence (NaN when the precision is not positive definite).
    """
    fn = "StructuredPosterior.log_evidence"
    sigma = self.prior_sigma if prior_sigma is None else prior_sigma
    sub_sigma = self._sub_sigma(fn, sigma)
    leaf_prec = leaf_precisions(fn, sub_sigma, self.sub_mean)
    log_prior = _priors.gaussian_log_prior(self.sub_mean, sub_sigma)
    logdet = _precisions.logdet(self.precision, leaf_prec)
    return -self.nll + log_prior + 0.5 * self.num_params * _LOG_2PI - 0.5 * logdet

  def with_prior(self, prior_sigma):
    """This posterior at another Gaussian prior scale (same MAP and ``H``)."""
    self._leaf_prec("StructuredPosterior.with_prior", prior_sigma)  # checks the tree
    return dataclasses.replace(self, prior_sigma=prior_sigma,
                               nlp=_prior_nlp(self.nlp, prior_sigma))

  def optimize_prior(self, init=None, *, maxiter: int = 50, tol=None):
    r"""The posterior at the prior scale that maximizes the evidence at the fixed MAP.

    .. math::
      \hat\sigma_0 = \arg\max_{\sigma_0} \log p(D \mid \sigma_0)
      \quad\text{(:meth:`log_evidence`, } w^* \text{ and } H \text{ fixed)}

    Newton's method on ``theta = log sigma_0`` (exact gradient and Hessian by
    autodiff of the closed form; a gradient step where the Hessian is not
    negative definite; backtracking to an increase), compiled once as one
    ``lax.while_loop``. This is laplace-torch's
    ``optimize_prior_precision(method="marglik")``. With one shared scale the
    evidence depends on ``H`` only through its eigenvalues
    (:func:`mlmap._precisions.spectrum`: free for diag / low rank / Kronecker,
    one ``eigvalsh`` for dense), so each step is ``O(P)`` and the program is
    the same small one for every structure; a per-subtree search steps through
    :meth:`log_evidence` (a dense one refactors ``P x P`` every step).

    Args:
      init: the starting scale and the shape of the search: a scalar (one
        shared scale) or a prefix tree of ``params`` with scalar leaves (one
        scale per subtree, e.g. per layer). Default: ``prior_sigma``.
      maxiter: Newton steps at most.
      tol: stop when the max-norm of the gradient in ``log sigma`` is below
        ``tol * (1 + |log evidence|)``; default 1e-9 in float64, 1e-5 in float32.

    Returns:
      A :class:`StructuredPosterior` with the chosen ``prior_sigma`` (Python-free
      arrays in ``init``'s structure), its ``nlp``'s prior at that scale, and
      ``optimize_info`` (:class:`OptimizePriorInfo`: ``converged`` ...).
    """
    fn = "StructuredPosterior.optimize_prior"
    init = self.prior_sigma if init is None else init
    leaves, treedef = jax.tree_util.tree_flatten(init, is_leaf=lambda x: x is None)
    if not leaves or any(x is None or jnp.ndim(x) != 0 for x in leaves):
      raise ValueError(f"{fn}: init must be a positive scalar or a prefix tree of "
                       f"params with positive scalar leaves, got {init!r}.")
    for x in leaves:
      _checks.check_positive("init", x, fn)
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
      raise ValueError(f"{fn}: maxiter must be an integer >= 1, got {maxiter!r}.")
    dtype = ravel_pytree(self.sub_mean)[0].dtype
    theta0 = jnp.log(jnp.stack([jnp.asarray(x, dtype) for x in leaves]))
    if tol is None:
      tol = 1e-9 if dtype == jnp.float64 else 1e-5
    self._leaf_prec(fn, init)  # a bad tree fails here, not inside the loop
    if len(leaves) == 1:  # one scale on every covered entry: the evidence is a
      flat = ravel_pytree(self.sub_mean)[0]  # function of the spectrum of H
      theta, info = _optimize_one_scale(_spectrum(self.precision), jnp.vdot(flat, flat),
                                        jnp.asarray(self.nll, dtype), theta0, maxiter,
                                        float(tol))
    else:
      theta, info = _optimize_log_sigma(self, theta0, treedef, maxiter, float(tol))
    sigma = jax.tree_util.tree_unflatten(treedef, list(jnp.exp(theta)))
    return dataclasses.replace(self.with_prior(sigma), optimize_info=info)

  # --- products, samples --------------------------------------------------------------
  def precision_vp(self, vector):
    """``Lambda v`` for a pytree ``v`` like the covered parameters (:attr:`sub_mean`)."""
    fn = "StructuredPosterior.precision_vp"
    _checks.check_tree_like(fn, "vector", vector, self.sub_mean, ref_name="sub_mean")
    flat, unravel = ravel_pytree(self.sub_mean)
    v = ravel_pytree(vector)[0].astype(flat.dtype)
    return unravel(_precisions.matvec(self.precision, self._leaf_prec(fn), v))

  def sample(self, key, n: int):
    r"""``n`` posterior samples: full parameter pytrees with a leading axis ``n``.

    .. math::
      w = w^* + S z,\quad z \sim \mathcal N(0, I),\quad S S^\top = \Lambda^{-1}

    (Kronecker: through the factors' eigendecompositions; low-rank: Woodbury).
    Parameters outside the subset are the MAP in every sample.
    """
    fn = "StructuredPosterior.sample"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"{fn}: n must be an integer >= 1, got {n!r}.")
    flat, unravel = ravel_pytree(self.sub_mean)
    leaf_prec = self._leaf_prec(fn)
    z = jax.random.normal(key, (n, flat.size), flat.dtype)
    x = jax.vmap(lambda zi: _precisions.sample(self.precision, leaf_prec, zi))(z)
    subs = jax.vmap(unravel)(flat[None, :] + x)
    if self.subset is None:
      return subs
    return jax.vmap(lambda s: self.subset.merge(s, self.mean))(subs)

  # --- predictive -------------------------------------------------------------------
  def glm_moments(self, inputs, full_cov=False, *, chunk_size=None):
    r"""Mean and (co)variance of the linearized network's outputs.

    .. math::
      \mathbb E[f(x)] = f(x; w^*),\qquad
      \mathrm{Cov}[f(x)] = J(x)\,\Lambda^{-1} J(x)^\top

    with ``J`` the Jacobian of the outputs in the covered parameters, one
    example's ``[O, P]`` rows at a time (``chunk_size`` examples vmapped,
    default to keep about 64 MiB of Jacobian rows, and at most 2 on CPU unless
    the precision is dense: ``experiments/bench_chunk_size.py``), each row whitened by the structured
    precision's square root (``S^T J^T``, :func:`mlmap._precisions.whiten`).

    Returns:
      ``(mean, var)`` shaped like the outputs ``[B, ...]``, or ``var`` the
      ``[B, O, O]`` covariance among each example's outputs with ``full_cov``.
    """
    fn = "StructuredPosterior.glm_moments"
    self._leaf_prec(fn)  # checks the prior before any tracing
    flat, unravel = ravel_pytree(self.sub_mean)
    apply = self.sub_nlp.apply_fn
    out_shape = jax.eval_shape(lambda p: apply(unravel(p), inputs), flat).shape
    num_out, b = math.prod(out_shape[1:]), out_shape[0]
    factor = _dense_factor(self) if isinstance(self.precision,
                                               _precisions.DensePrecision) else None
    if chunk_size is None:
      chunk_size = max(1, min(b, (64 << 20) // max(
          1, 2 * num_out * flat.size * flat.dtype.itemsize)))
      if factor is None and jax.default_backend() == "cpu":
        # Wider blocks run slower there; a dense factor, read once per block
        # by the triangular solve, wants them wide (bench_chunk_size.py).
        chunk_size = min(chunk_size, _dense.CPU_CHUNK)
    chunk_size = int(chunk_size)
    leaves = jax.tree_util.tree_leaves(inputs)
    if chunk_size >= b:
      out, cov = _output_cov(self, factor, inputs)
    elif all(_checks.is_concrete(x) for x in leaves):
      # A Python loop of jitted chunks, not lax.map: XLA:CPU runs a convolution
      # inside a loop body many times slower than the same call outside one.
      parts = [_output_cov_jit(self, factor, jax.tree_util.tree_map(
                                   lambda a: a[i:i + chunk_size],
                                                            inputs))
               for i in range(0, b, chunk_size)]
      out, cov = (jnp.concatenate([p[k] for p in parts]) for k in (0, 1))
    else:
      out, cov = jax.lax.map(lambda x: _output_cov_one(self, factor, x), inputs,
                             batch_size=chunk_size)
    mean = out.reshape(out_shape)
    if full_cov:
      return mean, cov
    return mean, jnp.diagonal(cov, axis1=1, axis2=2).reshape(out_shape)

  def predictive(self, inputs, likelihood=None, sigma=None, *, link_approx="probit",
                 pred_type="glm", num_samples=100, key=None, return_stderr=False):
    r"""Predictive distribution of the targets (linearized, or by weight samples).

    ``pred_type="glm"`` (default): the linearized network's Gaussian outputs
    :math:`\mathcal N(f(x; w^*), J\Lambda^{-1}J^\top)` (:meth:`glm_moments`),
    pushed through the link by

    * ``"probit"``: :math:`\mathrm{softmax}_k(\mu_k/\sqrt{1+\pi s_k^2/8})`
      (sigmoid for Bernoulli), MacKay 1992;
    * ``"mc"``: the mean of ``softmax`` over ``num_samples`` draws of the
      outputs (``key`` needed; standard error with ``return_stderr``);
    * ``"bridge"``: the Laplace bridge's Dirichlet mean (Hobbhahn et al. 2022).

    ``pred_type="nn"`` pushes ``num_samples`` weight samples (:meth:`sample`)
    through the network itself and averages the probabilities. It is usually
    worse: the GGN posterior is the posterior of the *linearized* model, and
    away from its mean the nonlinear network leaves the region where that
    model describes it, so samples land where the network underfits (Immer,
    Korzepa & Bauer 2021; Lawrence 2001).

    Args:
      inputs: a batch of inputs.
      likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``; default
        read off ``nlp.log_likelihood``.
      sigma: Gaussian noise scale; default the one bound in the likelihood.
      link_approx: ``"probit"``, ``"mc"`` or ``"bridge"``.
      pred_type: ``"glm"`` or ``"nn"``.
      num_samples: draws for ``"mc"`` / ``"nn"`` (>= 2).
      key: PRNG key for ``"mc"`` / ``"nn"``.
      return_stderr: also return the Monte-Carlo standard error (``"mc"`` or
        ``"nn"`` classification).

    Returns:
      ``(mean, variance)`` for ``"gaussian"``; probabilities otherwise
      (``[B, K]`` categorical, ``[B, ...]`` Bernoulli); with ``return_stderr``
      a pair ``(probs, stderr)``.
    """
    fn = "StructuredPosterior.predictive"
    return predict(self, fn, inputs, likelihood, sigma, link_approx, pred_type,
                   num_samples, key, return_stderr)


@jax.jit
def _dense_factor(post):
  """Lower Cholesky factor of the dense ``Lambda = H + D``, computed once per call."""
  d = _precisions.flat_prior(post._leaf_prec("StructuredPosterior.glm_moments"),
                             post.sub_mean)
  m = post.precision.matrix
  return jnp.linalg.cholesky(m + jnp.diag(d.astype(m.dtype)))


def _output_cov_one(post, factor, x):
  """One example's outputs ``[O]`` and ``J Lambda^{-1} J^T`` ``[O, O]`` (``factor``:
  the dense Cholesky factor, or None to solve against the structure)."""
  flat, unravel = ravel_pytree(post.sub_mean)
  leaf_prec = post._leaf_prec("StructuredPosterior.glm_moments")
  x1 = jax.tree_util.tree_map(lambda a: a[None], x)
  f = lambda p: post.sub_nlp.apply_fn(unravel(p), x1)[0].reshape(-1)  # noqa: E731
  out = f(flat)
  jac = jax.jacrev(f)(flat) if out.size < flat.size else jax.jacfwd(f)(flat)
  if factor is not None:
    v = jax.scipy.linalg.solve_triangular(factor, jac.T, lower=True)
    return out, v.T @ v
  v = jax.vmap(lambda r: _precisions.whiten(post.precision, leaf_prec, r))(jac)
  return out, v @ v.T  # J S S^T J^T, S S^T = Lambda^{-1}


def _output_cov(post, factor, inputs):
  """``(outputs [B, O], covariances [B, O, O])`` of a batch, vmapped over examples."""
  return jax.vmap(lambda x: _output_cov_one(post, factor, x))(inputs)


_output_cov_jit = jax.jit(_output_cov)


def resolve_likelihood(fn, nlp, likelihood, sigma):
  """``(likelihood, sigma)`` from the arguments or the built-in ``nlp.log_likelihood``."""
  keywords = {}
  if likelihood is None:
    found = builtin_likelihood(nlp.log_likelihood)
    if found is None or found[0] == "soft_categorical":
      raise ValueError(f"{fn}: cannot tell the likelihood of {nlp.log_likelihood!r}; "
                       "pass likelihood='gaussian', 'bernoulli' or 'categorical'.")
    likelihood, keywords = found
  if likelihood not in ("gaussian", "bernoulli", "categorical"):
    raise ValueError(f"{fn}: likelihood must be 'gaussian', 'bernoulli' or "
                     f"'categorical', got {likelihood!r}.")
  if likelihood == "gaussian":
    sigma = keywords.get("sigma", 1.0) if sigma is None else sigma
    _checks.check_positive("sigma", sigma, fn)
  return likelihood, sigma


def predict(post, fn, inputs, likelihood, sigma, link_approx, pred_type, num_samples,
            key, return_stderr):
  """The predictive of any posterior with ``glm_moments``, ``sample`` and ``nlp``."""
  likelihood, sigma = resolve_likelihood(fn, post.nlp, likelihood, sigma)
  _predictive.check_link(fn, link_approx, pred_type, likelihood, num_samples, key)
  stderr = None
  if pred_type == "nn":
    samples = post.sample(key, num_samples)
    outputs = jax.vmap(lambda p: post.nlp.apply_fn(p, inputs))(samples)
    out = _predictive.sample_mixture(likelihood, outputs, sigma)
    if likelihood != "gaussian":
      probs = (jax.nn.softmax(outputs, axis=-1) if likelihood == "categorical"
               else jax.nn.sigmoid(outputs))
      stderr = jnp.std(probs, axis=0, ddof=1) / math.sqrt(num_samples)
  elif likelihood == "gaussian":
    mean, var = post.glm_moments(inputs)
    out = (mean, var + jnp.square(jnp.asarray(sigma, var.dtype)))
  elif link_approx == "probit":
    mean, var = post.glm_moments(inputs)
    out = _predictive.probit(likelihood, mean, var)
  else:
    full = likelihood == "categorical"
    mean, cov = post.glm_moments(inputs, full_cov=full)
    if link_approx == "bridge":
      out = _predictive.laplace_bridge(mean, cov)[0]
    else:
      out, stderr = _predictive.monte_carlo(likelihood, key, mean, cov, num_samples)
  if return_stderr:
    if stderr is None:
      raise ValueError(f"{fn}: return_stderr needs a Monte-Carlo classification "
                       "predictive (link_approx='mc' or pred_type='nn').")
    return out, stderr
  return out


_spectrum = jax.jit(_precisions.spectrum)


def _newton_direction(grad, hess):
  """Saddle-free Newton ascent direction ``V |L|^{-1} V^T g`` (Dauphin et al. 2014):
  the Newton step where ``hess`` is negative definite, an ascent direction
  scaled by the curvature's magnitude where it is not."""
  evals, evecs = jnp.linalg.eigh(hess)
  scale = jnp.maximum(jnp.abs(evals), 1e-6 * jnp.max(jnp.abs(evals)) + 1e-30)
  return evecs @ ((evecs.T @ grad) / scale)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _optimize_log_sigma(post, theta0, treedef, maxiter, tol):
  """Maximize ``post.log_evidence`` over ``log sigma`` (one compiled while loop)."""
  def f(theta):
    sigma = jax.tree_util.tree_unflatten(treedef, list(jnp.exp(theta)))
    return post.log_evidence(sigma)

  return _newton_maximize(f, theta0, maxiter, tol)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _optimize_one_scale(spectrum, sq_norm, nll, theta0, maxiter, tol):
  r"""The same search for one shared scale, on the closed form in the spectrum ``s``.

  .. math::
    \log p(D \mid \sigma_0 = e^{\theta}) = -\mathrm{nll} - \tfrac12\|w^*\|^2 e^{-2\theta}
      - P\theta - \tfrac12 \textstyle\sum_i \log(s_i + e^{-2\theta})

  (the prior's and the Laplace term's ``P/2 log 2 pi`` cancel): ``O(P)`` per
  step, and one small program for every structure.
  """
  p = spectrum.shape[0]

  def f(theta):
    t = theta[0]
    delta = jnp.exp(-2 * t)
    return -nll - 0.5 * sq_norm * delta - p * t - 0.5 * jnp.sum(jnp.log(spectrum + delta))

  # Closed-form derivatives (a smaller program than autodiff's, so a faster
  # compile): with r_i = delta / (s_i + delta),
  # f' = q delta - P + sum r_i and f'' = -2 q delta - 2 sum r_i (1 - r_i) < 0.
  def value_grad(theta):
    delta = jnp.exp(-2 * theta[0])
    r = delta / (spectrum + delta)
    return f(theta), (sq_norm * delta - p + jnp.sum(r))[None]

  def hess(theta):
    delta = jnp.exp(-2 * theta[0])
    r = delta / (spectrum + delta)
    return (-2 * sq_norm * delta - 2 * jnp.sum(r * (1 - r)))[None, None]

  return _newton_maximize(f, theta0, maxiter, tol, value_grad, hess)


def _newton_maximize(f, theta0, maxiter, tol, value_grad=None, hess=None):
  """Saddle-free Newton with backtracking on a smooth ``f(theta)`` (traced, not
  jitted); the derivatives by autodiff unless given."""
  value_grad = jax.value_and_grad(f) if value_grad is None else value_grad
  hess = jax.hessian(f) if hess is None else hess

  def cond(c):
    theta, value, grad, it, stalled = c
    return (it < maxiter) & (jnp.max(jnp.abs(grad)) > tol * (1 + jnp.abs(value))) & ~stalled

  def body(c):
    theta, value, grad, it, _ = c
    step = _newton_direction(grad, hess(theta))
    step = step / jnp.maximum(1.0, jnp.max(jnp.abs(step)) / 2.0)  # at most e^2 per step

    # Below the rounding of the evidence the line search cannot see an increase;
    # there the (saddle-free) Newton step is taken as it is.
    at_rounding = jnp.dot(grad, step) <= 100 * jnp.finfo(theta.dtype).eps * (
        1 + jnp.abs(value))

    def not_better(t):
      v = f(theta + t * step)
      return (t > 1e-10) & ~at_rounding & ~(v >= value + 1e-4 * t * jnp.dot(grad, step))

    t = jax.lax.while_loop(not_better, lambda t: 0.5 * t, jnp.ones((), theta.dtype))
    new = theta + t * step
    new_value, new_grad = value_grad(new)
    better = jnp.isfinite(new_value) & ((new_value >= value) | at_rounding)
    return (jnp.where(better, new, theta), jnp.where(better, new_value, value),
            jnp.where(better, new_grad, grad), it + 1, ~better)

  value0, grad0 = value_grad(theta0)
  init = (theta0, value0, grad0, jnp.zeros((), jnp.int32), ~jnp.isfinite(value0))
  theta, value, grad, it, _ = jax.lax.while_loop(cond, body, init)
  gmax = jnp.max(jnp.abs(grad))
  info = OptimizePriorInfo(converged=gmax <= tol * (1 + jnp.abs(value)), iterations=it, grad_norm=gmax,
                           log_evidence=value, initial_log_evidence=value0)
  return theta, info


def gaussian_sigma(fn, nlp, builtin_prior):
  """The ``sigma`` of a ``functools.partial(mm.gaussian_log_prior, ...)`` prior."""
  found = builtin_prior(getattr(nlp, "log_prior", None)) if getattr(
      nlp, "log_prior", None) is not None else None
  if found is None or found[0] is not _priors.gaussian_log_prior:
    raise ValueError(
        f"{fn} needs a Gaussian prior, nlp.log_prior = functools.partial("
        f"mm.gaussian_log_prior, sigma=...), got {getattr(nlp, 'log_prior', None)!r}: "
        "the structured posteriors store the data curvature apart from the prior's "
        "diagonal precision 1/sigma^2.")
  return found[1].get("sigma", 1.0)
