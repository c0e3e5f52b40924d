"""Laplace approximation at a MAP, and its log marginal likelihood (evidence).

Around a mode ``w*`` of the posterior, a second-order expansion of the
negative log joint ``nlp(w) = -log p(D, w)`` gives a Gaussian posterior
``N(w*, A^{-1})`` with ``A`` the curvature of ``nlp`` at ``w*`` (prior
included), and a closed-form log evidence. The curvature is the exact Hessian
or the generalized Gauss-Newton (GGN) matrix of :mod:`mlmap.curvature`; the
log-determinant is dense (Cholesky) for small models or a stochastic Lanczos
quadrature estimate (:func:`mlmap.stochastic_logdet`) when ``A`` does not fit.

The evidence is that of the data the ``nlp`` is given: ``inputs`` and
``targets`` must be the full data set. On a minibatch of ``B`` examples with
``nlp.num_data = N`` every likelihood term (and the data curvature) is scaled
by ``N / B``, which is the evidence of a data set made of ``N / B`` copies of
the batch: an estimate of the full-data value, not the value.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import curvature as _curv
from mlmap import dense as _dense
from mlmap import linalg as _linalg
from mlmap import spectral as _spectral

_LOG_2PI = math.log(2.0 * math.pi)
_CURVATURES = ("ggn", "hessian")
_METHODS = ("dense", "slq")


class EvidenceInfo(NamedTuple):
  """Diagnostics of :func:`log_evidence` (``return_info=True``).

  Attributes:
    log_joint: ``-nlp(params)``, the log joint ``log p(D, w)`` at ``params``.
    logdet: ``log det A`` (dense value or SLQ estimate; 0 when not PD).
    logdet_stderr: standard error of the SLQ estimate (0 for ``"dense"``).
    positive_definite: whether ``A`` is positive definite (Cholesky succeeded;
      for ``"slq"``: every Lanczos Ritz value was positive).
    grad_norm: Euclidean norm of ``grad nlp(params)``.
    newton_decrement: ``g^T A^{-1} g / 2``, the decrease of ``nlp`` one
      Newton step would give: how many nats ``params`` are from the MAP of the
      local quadratic model (0 at a MAP).
  """
  log_joint: Any
  logdet: Any
  logdet_stderr: Any
  positive_definite: Any
  grad_norm: Any
  newton_decrement: Any


def check_curvature(fn: str, nlp, curvature: str, method: str = "dense") -> None:
  """Trace-time checks shared by the Laplace functions (``ValueError``/``TypeError``)."""
  if curvature not in _CURVATURES:
    raise ValueError(f"{fn}: curvature must be one of {_CURVATURES}, got {curvature!r}.")
  if method not in _METHODS:
    raise ValueError(f"{fn}: method must be one of {_METHODS}, got {method!r}.")
  if not callable(nlp):
    raise TypeError(f"{fn}: nlp must be callable, got {type(nlp).__name__}.")
  if curvature == "ggn":
    _curv._check_nlp(fn, nlp)


def curvature_matrix(nlp, params, inputs, targets, curvature="ggn"):
  """Dense ``(P, P)`` curvature ``A`` of ``nlp`` at ``params`` (ravel_pytree order)."""
  if curvature == "ggn":
    return _dense.ggn_matrix(nlp, params, inputs, targets)
  return _dense.hessian_matrix(nlp, params, inputs, targets)


def curvature_vp_fn(nlp, params, inputs, targets, curvature="ggn"):
  """Matrix-free ``v -> A v`` over pytrees like ``params``."""
  if curvature == "ggn":
    return _curv.ggn_vp_fn(nlp, params, inputs, targets)
  return _curv.hvp_fn(nlp, params, inputs, targets)


def safe_cholesky(a):
  """Lower Cholesky factor of symmetric ``a`` and whether ``a`` is PD.

  A matrix that is not positive definite is replaced by the identity before
  the (differentiated) factorization, so neither the factor nor its
  derivatives contain NaN; the flag says which case happened.
  """
  a = 0.5 * (a + a.T)
  probe = jnp.linalg.cholesky(jax.lax.stop_gradient(a))
  ok = jnp.all(jnp.isfinite(probe)) & jnp.all(jnp.diagonal(probe) > 0)
  if _checks.is_concrete(ok):
    return (probe if _checks.is_concrete(a) else jnp.linalg.cholesky(a)), ok
  eye = jnp.eye(a.shape[0], dtype=a.dtype)
  return jnp.linalg.cholesky(jnp.where(ok, a, eye)), ok


def _concrete_all(*xs) -> bool:
  return all(_checks.is_concrete(x) for x in xs)


def _report(fn, curvature, ok, info, map_tol, a=None):
  """Raise on a non-PD curvature and warn when far from a MAP (concrete values only)."""
  if _concrete_all(ok) and not bool(ok):
    extra = ""
    if a is not None and _checks.is_concrete(a):
      eig = jnp.linalg.eigvalsh(a)
      extra = (f" (Cholesky failed; eigenvalues from {float(eig[0]):.3g} to "
               f"{float(eig[-1]):.3g}, dtype {a.dtype})")
    hint = ("refit the MAP, or use curvature='ggn'" if curvature == "hessian"
            else "put a proper prior on every parameter, or compute in float64")
    raise ValueError(
        f"{fn}: the {curvature} curvature at params is not (numerically) positive "
        f"definite{extra}: params are not a MAP, or directions are unidentified "
        f"(a flat prior on e.g. softmax biases leaves a null direction); {hint}.")
  dec = info.newton_decrement
  if map_tol is not None and _concrete_all(dec) and float(dec) > map_tol:
    warnings.warn(
        f"{fn}: params are far from a MAP: gradient norm {float(info.grad_norm):.3g}, "
        f"Newton decrement g^T A^-1 g / 2 = {float(dec):.3g} nats > map_tol={map_tol:g}; "
        "the Laplace approximation assumes a mode, refit the MAP first.",
        stacklevel=3)


def _dense_parts(nlp, params, inputs, targets, curvature):
  a = curvature_matrix(nlp, params, inputs, targets, curvature)
  chol, ok = safe_cholesky(a)
  value, grads = jax.value_and_grad(nlp)(params, inputs, targets)
  return -value, a, chol, ok, ravel_pytree(grads)[0]


def _slq_parts(nlp, params, inputs, targets, curvature, key, num_probes, num_steps):
  matvec = curvature_vp_fn(nlp, params, inputs, targets, curvature)
  est, stderr = _spectral.stochastic_logdet(matvec, params, key, num_probes, num_steps)
  ok = jnp.isfinite(est) & jnp.isfinite(stderr)
  value, grads = jax.value_and_grad(nlp)(params, inputs, targets)
  sol, _ = _linalg.cg(matvec, grads, tol=1e-8, maxiter=4 * num_steps)
  g = ravel_pytree(grads)[0]
  return (-value, jnp.where(ok, est, 0.0), jnp.where(ok, stderr, 0.0), ok, g,
          0.5 * jnp.dot(g, ravel_pytree(sol)[0]))


_dense_parts_jit = jax.jit(_dense_parts, static_argnums=(0, 4))
_slq_parts_jit = jax.jit(_slq_parts, static_argnums=(0, 4, 6, 7))


def _eager(nlp, *arrays) -> bool:
  """Concrete arrays and a hashable nlp: compile once instead of running op by op."""
  try:
    hash(nlp)
  except TypeError:
    return False
  return all(_checks.is_concrete(x) for x in jax.tree_util.tree_leaves(arrays))


def dense_parts(nlp, params, inputs, targets, curvature):
  """``(-nlp, A, L, ok, g)``: log joint, dense curvature, its Cholesky factor
  (identity when not PD), the PD flag and the raveled gradient."""
  fn = _dense_parts_jit if _eager(nlp, params, inputs, targets) else _dense_parts
  return fn(nlp, params, inputs, targets, curvature)


def _newton_decrement(chol, g):
  u = jax.scipy.linalg.solve_triangular(chol, g, lower=True)
  return 0.5 * jnp.sum(u * u)


def log_evidence(nlp, params, inputs, targets, curvature="ggn", *, method="dense",
                 key=None, num_probes=16, num_steps=30, map_tol=1e-2,
                 return_info=False):
  r"""Laplace approximation of the log marginal likelihood at a MAP.

  .. math::
    \log p(D) \approx -\mathrm{nlp}(w^*) + \frac{P}{2}\log 2\pi
                      - \frac12 \log\det A,
    \qquad A = \nabla^2_w \mathrm{nlp}(w^*) \ \text{(or the GGN)}

  with ``nlp(w) = -log p(D | w) - log p(w)`` the negative log *joint*: the
  likelihood and the prior must be normalized (all mlmap likelihoods and
  priors are) and the prior proper. Exact for a linear model with Gaussian
  likelihood and prior. ``inputs``/``targets`` must be the full data set; on a
  minibatch with ``nlp.num_data = N`` the result is the evidence of ``N / B``
  copies of the batch (likelihood and curvature both scaled by ``N / B``).

  ``method="dense"`` forms ``A`` (``P`` curvature products, ``O(P^2)`` memory)
  and takes its log-determinant by Cholesky (``O(P^3)``): for small models.
  ``method="slq"`` never forms ``A``: it estimates ``log det A`` by stochastic
  Lanczos quadrature (``num_probes`` Rademacher probes, ``num_steps`` Lanczos
  steps each; see :func:`mlmap.stochastic_logdet` and ``docs/laplace.md`` for
  its measured accuracy), and the Newton decrement by conjugate gradients.

  Errors and flags: for concrete arrays a curvature that is not positive
  definite raises ``ValueError`` and a Newton decrement above ``map_tol``
  (params far from a MAP) warns. Under ``jit`` neither can raise: the result is
  ``-inf`` (never NaN) when ``A`` is not positive definite, and
  ``return_info=True`` returns the flags.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior` (any scalar
      ``fun(params, inputs, targets)`` for ``curvature="hessian"``) that is a
      normalized negative log joint.
    params: a MAP of ``nlp`` (pytree).
    inputs: the full data set's inputs.
    targets: its targets.
    curvature: ``"ggn"`` (positive semi-definite data term; the usual choice
      for networks) or ``"hessian"`` (exact second derivatives).
    method: ``"dense"`` or ``"slq"``.
    key: PRNG key for the SLQ probes (required for ``"slq"``).
    num_probes: SLQ probe vectors.
    num_steps: Lanczos steps per probe (at most ``P``; larger is clipped to ``P``).
    map_tol: warn when ``g^T A^{-1} g / 2`` exceeds this many nats (``None``:
      never).
    return_info: also return an :class:`EvidenceInfo`.

  Returns:
    The scalar log evidence, or ``(log_evidence, EvidenceInfo)``.

  Raises:
    ValueError: unknown ``curvature``/``method``, missing ``key`` for SLQ, or a
      concrete curvature that is not positive definite.
    TypeError: ``curvature="ggn"`` with an ``nlp`` that is not a
      :class:`mlmap.NegativeLogPosterior`.

  References:
    MacKay, "Bayesian interpolation", Neural Computation 1992.
    MacKay, "A practical Bayesian framework for backpropagation networks",
    Neural Computation 1992.
    Immer et al., "Scalable marginal likelihood estimation for model selection
    in deep learning", ICML 2021, https://arxiv.org/abs/2104.04975.
    Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 2017.
  """
  fn = "log_evidence"
  check_curvature(fn, nlp, curvature, method)
  num_params = ravel_pytree(params)[0].size
  half_p_log_2pi = 0.5 * num_params * _LOG_2PI
  a = None
  if method == "dense":
    log_joint, a, chol, ok, g = dense_parts(nlp, params, inputs, targets, curvature)
    logdet = jnp.where(ok, 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))), 0.0)
    stderr = jnp.zeros_like(logdet)
    decrement = _newton_decrement(chol, g)
  else:
    if key is None:
      raise ValueError(f"{fn}: method='slq' needs a PRNG key, got key=None.")
    args = (nlp, params, inputs, targets, curvature, key, num_probes,
            min(num_steps, num_params))
    fn = _slq_parts_jit if _eager(nlp, params, inputs, targets, key) else _slq_parts
    log_joint, logdet, stderr, ok, g, decrement = fn(*args)
  info = EvidenceInfo(log_joint=log_joint, logdet=logdet, logdet_stderr=stderr,
                      positive_definite=ok, grad_norm=jnp.linalg.norm(g),
                      newton_decrement=jnp.where(ok, decrement, jnp.inf))
  _report(fn, curvature, ok, info, map_tol, a)
  value = jnp.where(ok, log_joint + half_p_log_2pi - 0.5 * logdet, -jnp.inf)
  return (value, info) if return_info else value
