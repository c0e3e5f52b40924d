"""The Laplace posterior at a MAP: samples and the linearized (GLM) predictive.

``laplace`` returns the Gaussian ``N(w*, A^{-1})`` of :mod:`mlmap.laplace`'s
expansion as a pytree object, dense for small models or matrix-free (curvature
products and conjugate-gradient solves), with the linearized predictive of
Immer et al. (2021): mean and variance for regression, and the probit
approximation for Bernoulli and categorical outputs (MacKay 1992).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Optional

import numpy as np
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import dense as _dense
from mlmap import _precisions
from mlmap import linalg as _linalg
from mlmap import structured_posterior as _sp
from mlmap.laplace import (EvidenceInfo, _builtin_prior, _newton_decrement, _report,
                           cg_status,
                           check_curvature, check_params, curvature_vp_fn, dense_parts)


_PRECONDITIONERS = ("ggn_diagonal", None)


def _default_maxiter(cg_maxiter, num_params):
  return 10 * max(num_params, 1) if cg_maxiter is None else cg_maxiter


def flat_cg(matvec, unravel, diagonal, tol, maxiter):
  """``r -> cg(A, r)`` on flat vectors, Jacobi-preconditioned by ``diagonal``."""
  def flat_mv(v):
    return ravel_pytree(matvec(unravel(v)))[0]
  precond = None if diagonal is None else (lambda r: r / diagonal)

  def solve(r):
    return _linalg.cg(flat_mv, r, tol=tol, maxiter=maxiter, preconditioner=precond)
  return solve


def _jacobi_diagonal(nlp, params, inputs, targets):
  """Exact GGN diagonal (flat ``[P]``) and whether every entry is > 0.

  Entries that are not positive and finite (a parameter no datum nor prior
  touches) are replaced by the mean of the positive ones, so the
  preconditioner stays symmetric positive definite.
  """
  # jnp arrays: ggn_diagonal indexes the inputs with traced example ids.
  inputs, targets = jax.tree_util.tree_map(jnp.asarray, (inputs, targets))
  d = ravel_pytree(_dense.ggn_diagonal(nlp, params, inputs, targets))[0]
  good = jnp.isfinite(d) & (d > 0)
  fill = jnp.sum(jnp.where(good, d, 0.0)) / jnp.maximum(jnp.sum(good), 1)
  return jnp.where(good, d, jnp.where(fill > 0, fill, 1.0)), jnp.all(good)


def _warn_cg(fn, info, what):
  """Warn (concrete values only) when any solve of a (vmapped) ``info`` failed."""
  status = info.status
  if not _checks.is_concrete(status):
    return
  status = np.atleast_1d(np.asarray(status))
  bad = status != _linalg.CGStatus.CONVERGED
  if bad.any():
    names = sorted({_linalg.CGStatus.NAMES[int(c)] for c in status[bad]})
    warnings.warn(
        f"{fn}: {int(bad.sum())} of {status.size} conjugate-gradient solves for {what} "
        f"did not converge (status {names}; largest residual norm "
        f"{float(np.max(np.atleast_1d(np.asarray(info.residual_norm))[bad])):.3g}): raise "
        "cg_maxiter or cg_tol of mm.laplace, or use method='dense'. Under jit read "
        "return_info=True.", stacklevel=3)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("mean", "precision", "scale_tril", "positive_definite",
                                "inputs", "targets", "cg_diagonal", "cg_info", "nll"),
                   meta_fields=("nlp", "curvature", "cg_tol", "cg_maxiter"))
@dataclasses.dataclass(frozen=True)
class LaplacePosterior:
  r"""Gaussian posterior ``N(mean, precision^{-1})``; see :func:`laplace`.

  A pytree (``nlp``, ``curvature``, ``cg_tol``, ``cg_maxiter`` static), so it
  can be returned from and passed through ``jax.jit``. Dense (``precision``
  set) or matrix-free (``precision`` None: ``A v`` products at ``mean`` on the
  stored data, and conjugate-gradient solves for the GLM moments).

  Attributes:
    mean: the MAP, a pytree.
    precision: dense ``(P, P)`` curvature ``A`` in ``ravel_pytree`` order, or None.
    scale_tril: lower Cholesky factor ``L``, ``A = L L^T`` (the identity when
      ``A`` is not positive definite), or None.
    positive_definite: whether ``A`` is positive definite (matrix-free: the
      CG solve for the Newton decrement met no negative curvature and, with
      the GGN diagonal preconditioner, every diagonal entry of the GGN is > 0;
      this is not a proof of definiteness).
    inputs, targets: the data (matrix-free only, else None).
    nlp: the negative log-posterior the approximation was built from.
    curvature: ``"ggn"`` or ``"hessian"``.
    cg_tol: relative residual of the matrix-free solves.
    cg_maxiter: iteration cap of each matrix-free solve (None: ``10 P``).
    cg_diagonal: the flat ``[P]`` Jacobi preconditioner of the matrix-free
      solves (the exact GGN diagonal, non-positive entries replaced by their
      positive mean), or None (no preconditioner, or dense).
    cg_info: :class:`mlmap.CGInfo` of the matrix-free construction solve
      ``A^{-1} g`` (the Newton decrement), or None (dense).
    nll: the data term ``nlp.data_term(mean, inputs, targets)`` at the MAP (what
      :meth:`log_evidence` at another prior scale needs), or None.
  """
  mean: Any
  precision: Any
  scale_tril: Any
  positive_definite: Any
  inputs: Any
  targets: Any
  nlp: Any
  curvature: str = "ggn"
  cg_tol: float = 1e-8
  cg_diagonal: Any = None
  cg_info: Any = None
  cg_maxiter: Optional[int] = None
  nll: Any = None

  @property
  def num_params(self) -> int:
    return ravel_pytree(self.mean)[0].size

  def _dense_only(self, what):
    if self.precision is None:
      raise ValueError(f"LaplacePosterior.{what} needs the dense precision; build the "
                       "posterior with mm.laplace(..., method='dense').")

  def _solve(self, rows):
    """``(A^{-1} r, CGInfo)`` for the rows of ``rows`` ``[M, P]``, by vmapped
    (Jacobi-preconditioned) CG; the info's fields have a leading axis ``M``."""
    _, unravel = self._unravel()
    matvec = curvature_vp_fn(self.nlp, self.mean, self.inputs, self.targets,
                             self.curvature)
    solve = flat_cg(matvec, unravel, self.cg_diagonal, self.cg_tol,
                    _default_maxiter(self.cg_maxiter, self.num_params))
    return jax.vmap(solve)(rows)

  def _unravel(self):
    return ravel_pytree(self.mean)

  def covariance(self):
    """Dense posterior covariance ``A^{-1}`` (``O(P^3)``)."""
    self._dense_only("covariance")
    eye = jnp.eye(self.num_params, dtype=self.precision.dtype)
    return jax.scipy.linalg.cho_solve((self.scale_tril, True), eye)

  def precision_vp(self, vector):
    """``A v`` for a pytree ``v`` like the mean."""
    _checks.check_tree_like("LaplacePosterior.precision_vp", "vector", vector, self.mean,
                            ref_name="mean")
    if self.precision is None:
      return curvature_vp_fn(self.nlp, self.mean, self.inputs, self.targets,
                             self.curvature)(vector)
    flat, unravel = self._unravel()
    return unravel(self.precision @ ravel_pytree(vector)[0].astype(flat.dtype))

  def sample(self, key, n: int):
    r"""``n`` posterior samples, a pytree with a leading axis ``n``.

    .. math::
      w = w^* + L^{-\top} z,\quad z \sim \mathcal N(0, I)
      \ \Rightarrow\ \mathrm{Cov}[w] = L^{-\top}L^{-1} = A^{-1}
    """
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"LaplacePosterior.sample: n must be an integer >= 1, got {n!r}.")
    self._dense_only("sample")
    flat, unravel = self._unravel()
    z = jax.random.normal(key, (self.num_params, n), flat.dtype)
    x = jax.scipy.linalg.solve_triangular(self.scale_tril, z, lower=True, trans="T")
    return jax.vmap(unravel)(flat[None, :] + x.T)

  def to_structured(self):
    """This dense posterior as a ``"full"`` :class:`mlmap.StructuredPosterior`.

    Its data term is ``H = A - diag(1/sigma_0^2)`` (the dense precision less the
    Gaussian prior's), so the prior scale can change without recomputing it.

    Raises:
      ValueError: a matrix-free posterior, or a prior that is not a
        ``functools.partial(mm.gaussian_log_prior, sigma=...)``.
    """
    fn = "LaplacePosterior.to_structured"
    self._dense_only("to_structured")
    sigma = _sp.gaussian_sigma(fn, self.nlp, _builtin_prior)
    d = _precisions.flat_prior(_sp.leaf_precisions(fn, sigma, self.mean), self.mean)
    h = self.precision - jnp.diag(d.astype(self.precision.dtype))
    return _sp.StructuredPosterior(
        mean=self.mean, precision=_precisions.DensePrecision(h, _precisions.leaf_shapes(self.mean)),
        prior_sigma=sigma,
        nll=self.nll, grad_norm=None, newton_decrement=None, diag_stderr=None,
        optimize_info=None, nlp=self.nlp, sub_nlp=self.nlp, subset=None,
        structure="full", curvature=self.curvature)

  def log_evidence(self, prior_sigma=None):
    r"""Laplace log evidence at the fixed MAP, at this or another Gaussian prior scale.

    .. math::
      \log p(D \mid \sigma_0) \approx \log p(D \mid w^*) + \log p(w^* \mid \sigma_0)
        + \frac P2 \log 2\pi - \frac12 \log\det\big(H + \mathrm{diag}(\sigma_0^{-2})\big)

    With ``prior_sigma=None`` this equals :func:`mlmap.log_evidence` (dense, at
    ``nlp``'s prior). Another scale refactors ``H + D`` (``O(P^3)``); see
    :meth:`to_structured`.
    """
    return self.to_structured().log_evidence(prior_sigma)

  def optimize_prior(self, init=None, **kwargs):
    """The posterior at the evidence-maximizing prior scale at the fixed MAP.

    See :meth:`mlmap.StructuredPosterior.optimize_prior`; returns the ``"full"``
    :class:`mlmap.StructuredPosterior` (:meth:`to_structured`) at that scale.
    """
    return self.to_structured().optimize_prior(init, **kwargs)

  def structure_of(self):
    """``{leaf path: "full"}``: every leaf in the one dense block."""
    return {_checks.leaf_path(p): "full"
            for p, _ in jax.tree_util.tree_flatten_with_path(self.mean)[0]}

  def glm_moments(self, inputs, full_cov=False, return_info=False):
    r"""Mean and variance of the linearized (GLM) network's outputs.

    .. math::
      f_{\mathrm{lin}}(x; w) = f(x; w^*) + J(x)(w - w^*),\quad
      \mathbb E[f] = f(x; w^*),\quad \mathrm{Cov}[f] = J(x) A^{-1} J(x)^\top

    Matrix-free posteriors solve ``A u = J_m^T`` for each output entry ``m``
    by (GGN-diagonal preconditioned) CG with the posterior's ``cg_tol`` and
    ``cg_maxiter``. A solve that did not converge warns when the values are
    concrete; under ``jit`` read ``return_info=True``. Entries whose solve
    stopped on negative curvature or a breakdown are NaN; entries that only
    ran out of iterations keep the last iterate's value (flagged).

    Args:
      inputs: a batch of inputs (leading axis ``B``).
      full_cov: return the ``[B, O, O]`` covariance among each example's
        ``O`` outputs instead of the variances.
      return_info: also return the :class:`mlmap.CGInfo` of the solves, its
        fields with a leading axis of ``B * O`` output entries (None for a
        dense posterior: no iterative solve).

    Returns:
      ``(mean, var)``: ``mean`` shaped like ``apply_fn``'s outputs ``[B, ...]``,
      ``var`` the same shape (or ``[B, O, O]``); ``(mean, var, info)`` with
      ``return_info=True``.
    """
    return self._moments(inputs, full_cov, return_info, "LaplacePosterior.glm_moments")

  def _moments(self, inputs, full_cov, return_info, fn):
    flat, unravel = self._unravel()
    def f(p):
      return self.nlp.apply_fn(unravel(p), inputs)
    out = f(flat)
    num_out = out.size
    jac = (jax.jacrev if num_out < self.num_params else jax.jacfwd)(f)(flat)
    jac = jac.reshape(num_out, self.num_params)
    b = out.shape[0]
    info = None
    if self.precision is None:  # matrix-free: one CG solve per output entry
      sol, info = self._solve(jac)
      _warn_cg(fn, info, "the GLM variances")
      status = cg_status(info)
      broken = ((status == _linalg.CGStatus.NEGATIVE_CURVATURE)
                | (status == _linalg.CGStatus.BREAKDOWN))
      sol = jnp.where(broken[:, None], jnp.nan, sol)
      if not full_cov:
        var = jnp.sum(jac * sol, axis=1).reshape(out.shape)
      else:
        c = (jac @ sol.T).reshape(b, num_out // b, b, num_out // b)
        var = jnp.einsum("bibj->bij", c)
    else:
      v = jax.scipy.linalg.solve_triangular(self.scale_tril, jac.T, lower=True)
      if not full_cov:
        var = jnp.sum(v * v, axis=0).reshape(out.shape)
      else:
        v = v.reshape(self.num_params, b, num_out // b)
        var = jnp.einsum("pbi,pbj->bij", v, v)
    return (out, var, info) if return_info else (out, var)

  def predictive(self, inputs, likelihood=None, sigma=None, return_info=False, *,
                 link_approx="probit", pred_type="glm", num_samples=100, key=None,
                 return_stderr=False):
    r"""Linearized-Laplace predictive distribution of the targets.

    .. math::
      \text{gaussian:}\quad t \sim \mathcal N\big(f(x; w^*),\ J A^{-1} J^\top + \sigma^2\big)

      \text{bernoulli:}\quad p(t = 1) \approx \mathrm{sigmoid}\Big(
          \frac{\mu}{\sqrt{1 + \pi s^2 / 8}}\Big)

      \text{categorical:}\quad p(k) \approx \mathrm{softmax}_k\Big(
          \frac{\mu_k}{\sqrt{1 + \pi s_k^2 / 8}}\Big)

    with ``mu, s^2`` the GLM moments (:meth:`glm_moments`). The Bernoulli form is
    MacKay's probit approximation; the categorical one its mean-field extension.

    Args:
      inputs: batch of inputs.
      likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``; by default
        read off the built-in ``nlp.log_likelihood``.
      sigma: Gaussian noise scale added to the variance; by default the
        ``sigma`` bound in ``nlp.log_likelihood`` (1 when unbound).
      return_info: also return the CG info of :meth:`glm_moments` (None for a
        dense posterior) as the last element (probit / Gaussian GLM only).
      link_approx: ``"probit"`` (above), ``"mc"`` (Monte Carlo over the GLM
        output Gaussian, ``num_samples`` draws with ``key``) or ``"bridge"``
        (the Laplace bridge); see :meth:`mlmap.StructuredPosterior.predictive`.
      pred_type: ``"glm"`` or ``"nn"`` (weight samples through the network; dense
        posteriors only, and usually worse: Immer et al. 2021).
      num_samples, key, return_stderr: of the Monte-Carlo predictives.

    Returns:
      ``(mean, variance)`` for ``"gaussian"``; probabilities ``p(t = 1)``
      ``[B, ...]`` for ``"bernoulli"``; ``[B, ..., K]`` for ``"categorical"``;
      with ``return_info=True`` a tuple with the info appended.

    References:
      MacKay, "The evidence framework applied to classification networks",
      Neural Computation 1992.
      Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via
      local linearization", AISTATS 2021, https://arxiv.org/abs/2008.08400.
      Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
      NeurIPS 2021, https://arxiv.org/abs/2106.14806.
    """
    fn = "LaplacePosterior.predictive"
    if link_approx != "probit" or pred_type != "glm" or return_stderr:
      if return_info:
        raise ValueError(f"{fn}: return_info is for the probit GLM predictive.")
      return _sp.predict(self, fn, inputs, likelihood, sigma, link_approx, pred_type,
                         num_samples, key, return_stderr)
    likelihood, sigma = _sp.resolve_likelihood(fn, self.nlp, likelihood, sigma)
    mean, var, info = self._moments(inputs, False, True, fn)
    if likelihood == "gaussian":
      out = (mean, var + jnp.square(jnp.asarray(sigma, var.dtype)))
    else:
      kappa = jax.lax.rsqrt(1.0 + (math.pi / 8.0) * var)
      out = (jax.nn.sigmoid(kappa * mean) if likelihood == "bernoulli"
             else jax.nn.softmax(kappa * mean, axis=-1))
    if return_info:
      return (*out, info) if isinstance(out, tuple) else (out, info)
    return out


def laplace(nlp, params, inputs, targets, curvature="ggn", *, method="dense",
            map_tol=1e-2, cg_tol=1e-8, cg_maxiter=None, cg_preconditioner="ggn_diagonal",
            max_bytes=_dense.DEFAULT_MAX_BYTES):
  r"""Laplace approximation of the posterior at a MAP.

  .. math::
    p(w \mid D) \approx \mathcal N\big(w^*, A^{-1}\big),
    \qquad A = \nabla^2_w\,\mathrm{nlp}(w^*)\ \text{(or the GGN)}

  ``method="dense"`` forms the precision (``P`` curvature products, ``O(P^2)``
  memory, ``O(P^3)`` Cholesky): for models up to a few thousand parameters.
  ``method="matvec"`` keeps only ``A v`` products on the stored data; the GLM
  moments then cost one CG solve per predicted output entry (at most
  ``cg_maxiter`` products each, to relative residual ``cg_tol``), and ``sample``
  / ``covariance`` are unavailable. The solves are preconditioned by the exact
  GGN diagonal (:func:`mlmap.ggn_diagonal`, about ``B * O`` one-example
  backward passes, computed once here): CG then converges in a number of steps
  set by the conditioning of ``D^{-1/2} A D^{-1/2}`` rather than of ``A``. A
  solve that does not converge warns when eager and is flagged by
  ``glm_moments(..., return_info=True)`` / ``predictive(..., return_info=True)``
  under ``jit``; the construction solve's :class:`mlmap.CGInfo` is kept in
  ``LaplacePosterior.cg_info``. The GGN precision is positive definite whenever
  the prior is proper, even away from a MAP; its linearized (GLM) predictive is
  the consistent one to use with it (Immer et al. 2021).

  Improper priors: unlike :func:`mlmap.log_evidence` (which refuses them), the
  posterior alone is allowed a flat prior or ``None`` prior leaves, but only
  where the curvature is positive definite: ``"dense"`` checks it by Cholesky;
  ``"matvec"`` only checks that CG meets no negative curvature and (with the
  GGN-diagonal preconditioner) that no GGN diagonal entry is 0 (a parameter no
  datum or prior touches). Not positive definite: ``ValueError`` for concrete
  values, ``positive_definite`` False under ``jit``.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior` (a scalar
      ``fun(params, inputs, targets)`` with ``apply_fn`` for ``"hessian"``).
    params: the MAP (pytree of floating arrays).
    inputs: full data-set inputs.
    targets: full data-set targets.
    curvature: ``"ggn"`` or ``"hessian"``.
    method: ``"dense"`` or ``"matvec"``.
    map_tol: warn when the Newton decrement exceeds this many nats.
    cg_tol: relative residual of the matrix-free CG solves.
    cg_maxiter: iteration cap of each matrix-free CG solve, an int >= 1;
      default ``10 * P`` (exact-arithmetic CG needs at most ``P``; the margin
      absorbs rounding on ill-conditioned ``A``).
    cg_preconditioner: ``"ggn_diagonal"`` (Jacobi preconditioning by the exact
      GGN diagonal, also for ``curvature="hessian"``) or ``None``.
    max_bytes: ``"dense"`` refuses (``ValueError`` naming ``laplace``) a dense
      ``(P, P)`` precision above this many bytes.

  Returns:
    A :class:`LaplacePosterior` with ``mean``, ``precision``, ``sample(key, n)``,
    ``glm_moments(inputs)`` and ``predictive(inputs)``.

  Raises:
    ValueError: unknown ``curvature``/``method``/``cg_preconditioner``, a bad
      ``cg_maxiter``, a dense precision above ``max_bytes``, or a concrete
      curvature that is not positive definite.
    TypeError: an ``nlp`` without ``apply_fn``, or non-floating ``params``
      leaves (named by path).

  Examples:
    >>> import functools, jax, jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...                                 functools.partial(mm.gaussian_log_prior, sigma=1.0))
    >>> x, t = jnp.eye(3), jnp.array([1.0, 2.0, 3.0])
    >>> post = mm.laplace(nlp, t / 2, x, t)  # MAP: w = t / (1 + 1)
    >>> post.covariance().diagonal().round(4).tolist()
    [0.5, 0.5, 0.5]

  References:
    MacKay, "A practical Bayesian framework for backpropagation networks",
    Neural Computation 1992.
    Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
    NeurIPS 2021, https://arxiv.org/abs/2106.14806.
  """
  fn = "laplace"
  check_curvature(fn, nlp, curvature)
  if method not in ("dense", "matvec"):
    raise ValueError(f"{fn}: method must be 'dense' or 'matvec', got {method!r}.")
  if not hasattr(nlp, "apply_fn"):
    raise TypeError(f"{fn}: nlp needs an apply_fn (an mlmap.NegativeLogPosterior), "
                    f"got {type(nlp).__name__}.")
  if cg_preconditioner not in _PRECONDITIONERS:
    raise ValueError(f"{fn}: cg_preconditioner must be one of {_PRECONDITIONERS}, "
                     f"got {cg_preconditioner!r}.")
  if cg_maxiter is not None and (isinstance(cg_maxiter, bool) or not isinstance(
      cg_maxiter, (int, np.integer)) or cg_maxiter < 1):
    raise ValueError(f"{fn}: cg_maxiter must be an integer >= 1 or None, got {cg_maxiter!r}.")
  _checks.check_nonnegative("cg_tol", cg_tol, fn)
  check_params(fn, params, max_bytes if method == "dense" else None)
  diag = cg_info = None
  if method == "dense":
    _, a, chol, ok, g = dense_parts(nlp, params, inputs, targets, curvature, max_bytes)
    decrement, data = _newton_decrement(chol, g), (None, None)
    status = jnp.asarray(_linalg.CGStatus.CONVERGED, jnp.int32)
  else:
    a = chol = None
    ok = jnp.asarray(True)
    if cg_preconditioner == "ggn_diagonal":
      diag, diag_ok = _jacobi_diagonal(nlp, params, inputs, targets)
      ok = ok & diag_ok if curvature == "ggn" else ok
    flat, unravel = ravel_pytree(params)
    g = ravel_pytree(jax.grad(nlp)(params, inputs, targets))[0]
    matvec = curvature_vp_fn(nlp, params, inputs, targets, curvature)
    sol, cg_info = flat_cg(matvec, unravel, diag, cg_tol,
                           _default_maxiter(cg_maxiter, flat.size))(g)
    status = cg_status(cg_info)
    ok = ok & (status != _linalg.CGStatus.NEGATIVE_CURVATURE)
    decrement, data = 0.5 * jnp.dot(g, sol), (inputs, targets)
  info = EvidenceInfo(None, None, None, ok, jnp.linalg.norm(g),
                      jnp.where(ok, decrement, jnp.inf), status)
  _report(fn, curvature, ok, info, map_tol, a)
  nll = nlp.data_term(params, inputs, targets) if hasattr(nlp, "data_term") else None
  return LaplacePosterior(mean=params, precision=a, scale_tril=chol, positive_definite=ok,
                          inputs=data[0], targets=data[1], nlp=nlp, curvature=curvature,
                          cg_tol=cg_tol, cg_diagonal=diag, cg_info=cg_info,
                          cg_maxiter=None if cg_maxiter is None else int(cg_maxiter),
                          nll=nll)
