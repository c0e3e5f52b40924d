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

The evidence needs a proper prior on every parameter: a flat prior or ``None``
leaves in the prior's scale tree raise ``ValueError`` naming the unpenalized
leaves (:func:`check_proper_prior`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import curvature as _curv
from mlmap import dense as _dense
from mlmap import linalg as _linalg
from mlmap import priors as _priors
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
    cg_status: int32 :class:`mlmap.CGStatus` code of the conjugate-gradient
      solve ``A^{-1} g`` behind ``newton_decrement`` (``method="slq"`` and the
      matrix-free :func:`mlmap.laplace`); ``CGStatus.CONVERGED`` (0) for the
      dense Cholesky path. Anything else means ``newton_decrement`` is inexact.
  """
  log_joint: Any
  logdet: Any
  logdet_stderr: Any
  positive_definite: Any
  grad_norm: Any
  newton_decrement: Any
  cg_status: Any = 0


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


def check_params(fn: str, params, max_bytes=None) -> None:
  """Floating leaves only (``TypeError`` naming their paths) and, when
  ``max_bytes`` is given, a dense ``(P, P)`` curvature that fits in it."""
  _checks.check_float_leaves(fn, params)
  if max_bytes is not None:
    flat = ravel_pytree(params)[0]
    _dense.check_dense_bytes(fn, flat.size, flat.dtype, max_bytes)


def cg_status(info):
  """int32 :class:`mlmap.CGStatus` code of a :class:`mlmap.CGInfo`."""
  return jnp.asarray(info.status, jnp.int32)


# --- proper priors ---------------------------------------------------------------

_SCALE_KEYWORD = {_priors.gaussian_log_prior: "sigma", _priors.laplace_log_prior: "scale"}


def _builtin_prior(log_prior):
  """``(func, keywords)`` of a (nested) ``functools.partial`` of a built-in prior,
  or ``None`` for another callable (positional partial arguments included)."""
  keywords, func = {}, log_prior
  while isinstance(func, functools.partial):
    if func.args:
      return None
    keywords = {**func.keywords, **keywords}
    func = func.func
  if func is _priors.flat_log_prior or func in _SCALE_KEYWORD:
    return func, keywords
  return None


def _leaf_paths(tree, prefix=()):
  return [_checks.leaf_path(prefix + tuple(path))
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _none_scale_paths(fn, scale, params):
  """Paths of the ``params`` leaves under ``None`` leaves of a scale prefix tree."""
  is_none = lambda x: x is None  # noqa: E731
  if scale is None:
    return _leaf_paths(params)
  found = []

  def visit(path, s, sub):
    if s is None:
      found.extend(_leaf_paths(sub, tuple(path)))
  try:
    jax.tree_util.tree_map_with_path(visit, scale, params, is_leaf=is_none)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{fn}: prior scale tree {jax.tree_util.tree_structure(scale, is_leaf=is_none)} "
        f"is not a prefix of params tree {jax.tree_util.tree_structure(params)} ({e})."
    ) from None
  return found


def _locally_flat_prior(nlp, params):
  r"""``[P]`` bool: entries the prior does not depend on near ``params``.

  An entry ``j`` is flagged when the prior's gradient ``g_j`` and one prior
  Hessian-vector product ``(H z)_j`` with a fixed Gaussian probe ``z`` are both
  exactly 0: ``(H z)_j = 0`` for a nonzero Hessian row has probability 0.
  """
  flat, unravel = ravel_pytree(params)
  grad = jax.grad(lambda f: nlp.prior_term(unravel(f)))
  z = jax.random.normal(jax.random.PRNGKey(0), flat.shape, flat.dtype)
  g, hz = jax.jvp(grad, (flat,), (z,))
  return (g == 0) & (hz == 0)


def _improper_error(fn, what, paths):
  shown = ", ".join(repr(p) for p in paths[:10]) + (" ..." if len(paths) > 10 else "")
  return ValueError(
      f"{fn}: {what} leaves {len(paths)} parameter leaves unpenalized ({shown}): the "
      "Laplace evidence is not defined for an improper prior, it needs a proper prior "
      "on every parameter (e.g. functools.partial(mm.gaussian_log_prior, sigma=...) "
      "with no None leaf in the sigma tree).")


def check_proper_prior(fn: str, nlp, params):
  """Refuse an improper prior for an evidence; returns a traced "proper" flag.

  * ``nlp.log_prior`` None or :func:`mlmap.flat_log_prior`: ``ValueError``.
  * a ``functools.partial`` of :func:`mlmap.gaussian_log_prior` /
    :func:`mlmap.laplace_log_prior` whose scale tree has ``None`` leaves:
    ``ValueError`` naming the parameter paths under them (static: also under jit).
  * any other prior: entries where the prior is locally flat
    (:func:`_locally_flat_prior`, one prior gradient and HVP): ``ValueError``
    naming their leaves when ``params`` are concrete; under ``jit`` the returned
    flag is False instead (the caller makes its result NaN).

  Returns:
    ``True`` (a Python bool) when properness was established at trace time,
    else a traced scalar bool.
  """
  log_prior = getattr(nlp, "log_prior", None)
  if not hasattr(nlp, "apply_fn"):
    return True  # a plain objective: its prior is not separable from it
  if log_prior is None:
    raise _improper_error(fn, "nlp.log_prior is None (a flat prior): it",
                          _leaf_paths(params))
  found = _builtin_prior(log_prior)
  if found is not None:
    func, keywords = found
    if func is _priors.flat_log_prior:
      raise _improper_error(fn, "mm.flat_log_prior", _leaf_paths(params))
    name = _SCALE_KEYWORD[func]
    paths = _none_scale_paths(fn, keywords.get(name, 1.0), params)
    if paths:
      raise _improper_error(fn, f"the prior's {name} tree (None leaves)", paths)
    return True
  flat_mask = _locally_flat_prior(nlp, params)
  if _checks.is_concrete(flat_mask):
    mask = np.asarray(flat_mask)
    if mask.any():
      unravel = ravel_pytree(params)[1]
      marked = unravel(jnp.asarray(mask, ravel_pytree(params)[0].dtype))
      paths = [_checks.leaf_path(p) for p, m in
               jax.tree_util.tree_flatten_with_path(marked)[0] if np.any(np.asarray(m))]
      raise _improper_error(
          fn, f"the prior {log_prior!r} (its gradient and curvature vanish at params)",
          paths)
    return True
  return ~jnp.any(flat_mask)


def curvature_matrix(nlp, params, inputs, targets, curvature="ggn",
                     max_bytes=_dense.DEFAULT_MAX_BYTES):
  """Dense ``(P, P)`` curvature ``A`` of ``nlp`` at ``params`` (ravel_pytree order)."""
  if curvature == "ggn":
    return _dense.ggn_matrix(nlp, params, inputs, targets, max_bytes=max_bytes)
  return _dense.hessian_matrix(nlp, params, inputs, targets, max_bytes=max_bytes)


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
  status = info.cg_status
  if _concrete_all(status) and int(status) != _linalg.CGStatus.CONVERGED:
    warnings.warn(
        f"{fn}: the conjugate-gradient solve A^-1 g behind the Newton decrement stopped "
        f"with status {_linalg.CGStatus.NAMES[int(status)]!r}: newton_decrement is "
        "inexact (see EvidenceInfo.cg_status / LaplacePosterior.cg_info).", stacklevel=3)
  dec = info.newton_decrement
  if map_tol is not None and _concrete_all(dec) and float(dec) > map_tol:
    warnings.warn(
        f"{fn}: params are far from a MAP: gradient norm {float(info.grad_norm):.3g}, "
        f"Newton decrement g^T A^-1 g / 2 = {float(dec):.3g} nats > map_tol={map_tol:g}; "
        "the Laplace approximation assumes a mode, refit the MAP first.",
        stacklevel=3)


def _dense_parts(nlp, params, inputs, targets, curvature, max_bytes):
  a = curvature_matrix(nlp, params, inputs, targets, curvature, max_bytes)
  chol, ok = safe_cholesky(a)
  value, grads = jax.value_and_grad(nlp)(params, inputs, targets)
  return -value, a, chol, ok, ravel_pytree(grads)[0]


def _slq_parts(nlp, params, inputs, targets, curvature, key, num_probes, num_steps):
  matvec = curvature_vp_fn(nlp, params, inputs, targets, curvature)
  est, stderr = _spectral.stochastic_logdet(matvec, params, key, num_probes, num_steps)
  value, grads = jax.value_and_grad(nlp)(params, inputs, targets)
  sol, info = _linalg.cg(matvec, grads, tol=1e-8, maxiter=4 * num_steps)
  # CG meeting non-positive curvature along g is a certificate that A is not PD.
  ok = (jnp.isfinite(est) & jnp.isfinite(stderr)
        & (cg_status(info) != _linalg.CGStatus.NEGATIVE_CURVATURE))
  g = ravel_pytree(grads)[0]
  return (-value, jnp.where(ok, est, 0.0), jnp.where(ok, stderr, 0.0), ok, g,
          0.5 * jnp.dot(g, ravel_pytree(sol)[0]), cg_status(info))


_dense_parts_jit = jax.jit(_dense_parts, static_argnums=(0, 4, 5))
_slq_parts_jit = jax.jit(_slq_parts, static_argnums=(0, 4, 6, 7))


def _eager(nlp, *arrays) -> bool:
  """Concrete arrays and a hashable nlp: compile once instead of running op by op."""
  try:
    hash(nlp)
  except TypeError:
    return False
  return all(_checks.is_concrete(x) for x in jax.tree_util.tree_leaves(arrays))


def dense_parts(nlp, params, inputs, targets, curvature, max_bytes=_dense.DEFAULT_MAX_BYTES):
  """``(-nlp, A, L, ok, g)``: log joint, dense curvature, its Cholesky factor
  (identity when not PD), the PD flag and the raveled gradient."""
  fn = _dense_parts_jit if _eager(nlp, params, inputs, targets) else _dense_parts
  return fn(nlp, params, inputs, targets, curvature, max_bytes)


def _newton_decrement(chol, g):
  u = jax.scipy.linalg.solve_triangular(chol, g, lower=True)
  return 0.5 * jnp.sum(u * u)


def log_evidence(nlp, params, inputs, targets, curvature="ggn", *, method="dense",
                 key=None, num_probes=16, num_steps=30, map_tol=1e-2,
                 return_info=False, max_bytes=_dense.DEFAULT_MAX_BYTES):
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
  ``return_info=True`` returns the flags. Warnings start with ``log_evidence:``;
  for ``"slq"`` a CG solve for the Newton decrement that did not converge warns
  (eager) and is flagged in ``EvidenceInfo.cg_status``; CG meeting negative
  curvature marks ``A`` not positive definite.

  Proper priors only: the evidence of an improper prior is not defined. A flat
  prior (``nlp.log_prior`` None or :func:`mlmap.flat_log_prior`) or ``None``
  leaves in the scale tree of a ``functools.partial`` of
  :func:`mlmap.gaussian_log_prior` / :func:`mlmap.laplace_log_prior` raise
  ``ValueError`` naming the unpenalized leaves (also under ``jit``: the check is
  structural). For another ``log_prior`` the entries where the prior's gradient
  and a random prior Hessian-vector product both vanish at ``params`` count as
  unpenalized (the prior does not depend on them): ``ValueError`` for concrete
  ``params``, a NaN result under ``jit``. A plain objective (not a
  :class:`mlmap.NegativeLogPosterior`) is not checked.

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
    max_bytes: ``method="dense"`` refuses (``ValueError`` naming
      ``log_evidence``) a dense ``(P, P)`` curvature above this many bytes
      (default ``mlmap.dense.DEFAULT_MAX_BYTES``, 2 GiB).

  Returns:
    The scalar log evidence, or ``(log_evidence, EvidenceInfo)``.

  Raises:
    ValueError: unknown ``curvature``/``method``, missing ``key`` for SLQ, an
      improper prior (see above), a dense curvature above ``max_bytes``, or a
      concrete curvature that is not positive definite.
    TypeError: ``curvature="ggn"`` with an ``nlp`` that is not a
      :class:`mlmap.NegativeLogPosterior`, or non-floating ``params`` leaves
      (named by path).

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
  check_params(fn, params, max_bytes if method == "dense" else None)
  proper = check_proper_prior(fn, nlp, params)
  num_params = ravel_pytree(params)[0].size
  half_p_log_2pi = 0.5 * num_params * _LOG_2PI
  a = None
  if method == "dense":
    log_joint, a, chol, ok, g = dense_parts(nlp, params, inputs, targets, curvature,
                                            max_bytes)
    logdet = jnp.where(ok, 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))), 0.0)
    stderr = jnp.zeros_like(logdet)
    decrement = _newton_decrement(chol, g)
    status = jnp.asarray(_linalg.CGStatus.CONVERGED, jnp.int32)
  else:
    if key is None:
      raise ValueError(f"{fn}: method='slq' needs a PRNG key, got key=None.")
    args = (nlp, params, inputs, targets, curvature, key, num_probes,
            min(num_steps, num_params))
    parts = _slq_parts_jit if _eager(nlp, params, inputs, targets, key) else _slq_parts
    log_joint, logdet, stderr, ok, g, decrement, status = parts(*args)
  info = EvidenceInfo(log_joint=log_joint, logdet=logdet, logdet_stderr=stderr,
                      positive_definite=ok, grad_norm=jnp.linalg.norm(g),
                      newton_decrement=jnp.where(ok, decrement, jnp.inf),
                      cg_status=status)
  _report(fn, curvature, ok, info, map_tol, a)
  value = jnp.where(ok, log_joint + half_p_log_2pi - 0.5 * logdet, -jnp.inf)
  if proper is not True:  # a custom prior found locally flat under jit
    value = jnp.where(proper, value, jnp.nan)
  return (value, info) if return_info else value
