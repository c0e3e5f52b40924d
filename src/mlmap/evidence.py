"""Evidence maximization: choose the prior scales and the noise by the data.

Alternates a warm-started MAP refit (a second-order optimizer of this library)
with hyperparameter updates that increase the Laplace log evidence of
:func:`mlmap.log_evidence`: MacKay's fixed point for Gaussian prior scales and a
Gaussian noise scale, and gradient ascent (Adam, in log space, autodiff through
the Cholesky log-determinant) for any other positive hyperparameter.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import dense as _dense
# ``mlmap.laplace`` is also the name of a function in the package namespace.
from mlmap.laplace import (_improper_error, _none_scale_paths, check_curvature,
                           check_params, check_proper_prior, dense_parts)
from mlmap import optimizers as _optimizers
from mlmap import data as _data
from mlmap._evidence_terms import _batch_sse
from mlmap.evidence_structured import check_structured, maximize_structured, noise_step

_LOG_2PI = math.log(2.0 * math.pi)


class EvidenceHistory(NamedTuple):
  """``info`` of :func:`maximize_evidence`: one entry per outer iteration.

  Entry ``t`` is evaluated at the hyperparameters ``hyper[t]`` and the MAP
  refit for them; the last entry belongs to the returned ``(hyper, params)``.

  Attributes:
    log_evidence: ``[T]`` Laplace log evidence (``-inf`` where the curvature
      was not positive definite).
    hyper: the hyperparameter dict with leaves stacked to ``[T, ...]``.
    gamma: ``[T]`` effective number of parameters
      ``P - tr(A^{-1} H_prior)`` (``P - sum_g alpha_g tr_g(A^{-1})`` for
      Gaussian priors).
    grad_norm: ``[T]`` gradient norm of the nlp after each refit.
    newton_decrement: ``[T]`` ``g^T A^{-1} g / 2`` after each refit (nats from
      the MAP of the quadratic model).
    positive_definite: ``[T]`` curvature positive definite at the refit.
    valid_update: ``[T]`` every proposed update was well defined (``0 < gamma_g``,
      ``gamma < N``, finite gradients); invalid parts kept their old value.
    num_iterations: outer iterations run (= T).
    converged: the last refit reached a MAP (Newton decrement <= ``map_tol``)
      and the update there was valid and would change no ``log``
      hyperparameter by more than ``tol``.
  """
  log_evidence: Any
  hyper: Any
  gamma: Any
  grad_norm: Any
  newton_decrement: Any
  positive_definite: Any
  valid_update: Any
  num_iterations: int
  converged: Any


def _prior_groups(fn, prior_scale, params):
  """Group index of every raveled parameter under a prior-scale prefix tree.

  Every scalar entry of ``prior_scale`` is one group (a layer's scale, or one
  entry of an array scale broadcast over a leaf, e.g. one per input: ARD).
  Returns ``(ids [P] int array, -1 = unpenalized, num_groups)``.
  """
  is_none = lambda x: x is None  # noqa: E731
  s_leaves, s_def = jax.tree_util.tree_flatten(prior_scale, is_leaf=is_none)
  id_leaves, offset = [], 0
  for s in s_leaves:
    if s is None:
      id_leaves.append(None)
      continue
    size = int(np.size(s))
    id_leaves.append(offset + np.arange(size).reshape(np.shape(s)))
    offset += size
  id_tree = jax.tree_util.tree_unflatten(s_def, id_leaves)
  if jax.tree_util.treedef_is_leaf(s_def):
    pairs = [(w, id_tree) for w in jax.tree_util.tree_leaves(params)]
  else:
    try:
      nested = jax.tree_util.tree_map(
          lambda i, sub: [(w, i) for w in jax.tree_util.tree_leaves(sub)],
          id_tree, params, is_leaf=is_none)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{fn}: prior scale tree {s_def} is not a prefix of params "
                       f"tree {jax.tree_util.tree_structure(params)} ({e}).") from None
    pairs = [p for lst in jax.tree_util.tree_leaves(
        nested, is_leaf=lambda x: isinstance(x, list)) for p in lst]
  ids = [np.full(np.shape(w), -1) if i is None else np.broadcast_to(i, np.shape(w))
         for w, i in pairs]
  ids = np.concatenate([np.ravel(i) for i in ids]) if ids else np.zeros(0, int)
  return ids.astype(np.int32), offset


def _check_hyper(fn, hyper, prior_key, noise_key):
  if not isinstance(hyper, dict):
    raise TypeError(f"{fn}: hyper must be a dict of positive hyperparameters, got "
                    f"{type(hyper).__name__}.")
  for name, value in hyper.items():
    for leaf in jax.tree_util.tree_leaves(value):
      _checks.check_positive(f"hyper[{name!r}]", leaf, fn)
  if noise_key in hyper and jnp.ndim(hyper[noise_key]) != 0:
    raise ValueError(f"{fn}: the noise scale hyper[{noise_key!r}] must be a scalar "
                     f"for the fixed-point update, got shape {jnp.shape(hyper[noise_key])}.")


def _check_keys(fn, hyper, prior_key, noise_key):
  """``(prior_key, noise_key)`` after refusing names that would silently change
  which entries get the fixed point and which gradient ascent."""
  keys = sorted(hyper)
  if prior_key is not None and prior_key not in hyper:
    raise ValueError(
        f"{fn}: prior_key={prior_key!r} is not a key of hyper (keys {keys}). prior_key "
        "names the entry holding the Gaussian prior standard deviation(s) sigma_0 "
        "(MacKay's fixed point); pass prior_key=<that key>, or prior_key=None to "
        "optimize every entry by gradient ascent.")
  if noise_key is not None and noise_key not in hyper:
    # prior_key=None already opted into gradient ascent for everything else.
    others = [k for k in keys if k != prior_key]
    if prior_key is not None and others:
      raise ValueError(
          f"{fn}: noise_key={noise_key!r} is not a key of hyper (keys {keys}), so "
          f"{others} would silently be optimized by gradient ascent. noise_key names "
          "the Gaussian noise standard deviation; pass noise_key=<that key>, or "
          "noise_key=None to optimize the other entries by gradient ascent.")
    noise_key = None
  return prior_key, noise_key


def _tree_log(tree):
  return jax.tree_util.tree_map(lambda x: jnp.log(jnp.asarray(x, float)), tree)


def _log_ev(log_other, make_nlp, h, p, inputs, targets, curvature, max_bytes):
  """Log evidence at fixed ``p`` as a function of the log of some hyperparameters."""
  h = {**h, **jax.tree_util.tree_map(jnp.exp, log_other)}
  log_joint, _, chol, ok, g = dense_parts(make_nlp(h), p, inputs, targets, curvature,
                                          max_bytes)
  value = log_joint + 0.5 * chol.shape[0] * _LOG_2PI - jnp.sum(jnp.log(jnp.diagonal(chol)))
  return jnp.where(ok, value, 0.0), (value, chol, ok, g)


def _add_implicit_term(grads, make_nlp, log_other, h, p, inputs, targets, curvature,
                       max_bytes):
  """Add ``(dL/dw)^T dw*/dh`` with ``dw*/dh = -H^{-1} d(grad_w nlp)/dh``.

  The implicit function theorem at ``grad_w nlp(w*, h) = 0`` with ``H`` the
  dense exact Hessian of the nlp.
  """
  grad_w = jax.grad(lambda q: _log_ev(log_other, make_nlp, h, q, inputs, targets,
                                      curvature, max_bytes)[0])(p)
  hess = _dense.hessian_matrix(make_nlp(h), p, inputs, targets, max_bytes=max_bytes)
  v = jnp.linalg.solve(0.5 * (hess + hess.T), ravel_pytree(grad_w)[0])

  def coupling(lo):
    nlp = make_nlp({**h, **jax.tree_util.tree_map(jnp.exp, lo)})
    return jnp.dot(v, ravel_pytree(jax.grad(nlp)(p, inputs, targets))[0])
  return jax.tree_util.tree_map(jnp.subtract, grads, jax.grad(coupling)(log_other))


def log_evidence_grad(make_nlp: Callable, hyper: dict, params, inputs, targets,
                      curvature="ggn", *, total_derivative=True,
                      max_bytes=_dense.DEFAULT_MAX_BYTES):
  r"""Log evidence at a MAP and its gradient with respect to ``log hyper``.

  .. math::
    rac{d L}{d \log h} = h\Big(rac{\partial L}{\partial h}
      - \Big(rac{\partial L}{\partial w}\Big)^{\!	op} H^{-1}
        rac{\partial^2 \mathrm{nlp}}{\partial w\,\partial h}\Big),
    \qquad L = \log p(D \mid h) 	ext{ of } :func:`mlmap.log_evidence`

  The second term is the change of the MAP ``w*(h)`` (implicit function
  theorem, ``H`` the exact dense Hessian of the nlp); ``total_derivative=False``
  drops it (the fixed-``w`` partial derivative, whose zero is MacKay's fixed
  point). Autodiff runs through the dense curvature's Cholesky log-det:
  ``O(P^3)``, for small models.

  Args:
    make_nlp: ``hyper -> NegativeLogPosterior``.
    hyper: dict of positive hyperparameters.
    params: the MAP of ``make_nlp(hyper)``.
    inputs: full data-set inputs.
    targets: the targets.
    curvature: ``"ggn"`` or ``"hessian"``.
    total_derivative: include the MAP's dependence on ``hyper``.
    max_bytes: refuse (``ValueError`` naming ``log_evidence_grad``) a dense
      ``(P, P)`` matrix above this many bytes.

  Returns:
    ``(log_evidence, grads)`` with ``grads`` shaped like ``hyper``.

  Raises:
    ValueError: an improper prior for ``make_nlp(hyper)`` (as in
      :func:`mlmap.log_evidence`), a hyperparameter <= 0, or a dense matrix
      above ``max_bytes``.
    TypeError: ``hyper`` not a dict, or non-floating ``params`` leaves.
  """
  fn = "log_evidence_grad"
  _check_hyper(fn, hyper, None, None)
  nlp = make_nlp(hyper)
  check_curvature(fn, nlp, curvature)
  check_params(fn, params, max_bytes)
  check_proper_prior(fn, nlp, params)
  log_h = {k: _tree_log(v) for k, v in hyper.items()}
  (_, (value, _, ok, _)), grads = jax.value_and_grad(_log_ev, has_aux=True)(
      log_h, make_nlp, hyper, params, inputs, targets, curvature, max_bytes)
  if total_derivative:
    grads = _add_implicit_term(grads, make_nlp, log_h, hyper, params, inputs, targets,
                               curvature, max_bytes)
  return jnp.where(ok, value, -jnp.inf), grads


def maximize_evidence(make_nlp: Callable, hyper: dict, params, inputs=None, targets=None, *,
                      curvature="ggn", prior_key: Optional[str] = "prior_sigma",
                      noise_key: Optional[str] = "sigma", num_iterations=100,
                      fit_steps=10, make_optimizer: Optional[Callable] = None,
                      learning_rate=0.05, tol=1e-8, map_tol=1e-2,
                      total_derivative=False, max_bytes=_dense.DEFAULT_MAX_BYTES,
                      structure="full", subset=None, data=None, rank=None,
                      diag_method="exact", num_samples=None, key=None, fixed_point=True):
  r"""Maximize the Laplace log evidence over hyperparameters, refitting the MAP.

  Each outer iteration refits ``params`` to the MAP of ``make_nlp(hyper)``
  (``fit_steps`` steps of ``make_optimizer(nlp)``, warm-started), computes the
  dense curvature ``A`` there and updates the hyperparameters:

  .. math::
    \gamma_g = n_g - \alpha_g \operatorname{tr}_g(A^{-1}),\qquad
    \alpha_g \leftarrow \frac{\gamma_g}{\|w_g\|^2},\qquad
    \sigma^2 \leftarrow \frac{\mathrm{SSE}}{N - \gamma},\qquad
    \gamma = P - \sum_g \alpha_g \operatorname{tr}_g(A^{-1})

  for the Gaussian prior precisions ``alpha_g = 1 / sigma_{0,g}^2``, where
  ``hyper[prior_key]`` holds the prior *standard deviations* ``sigma_{0,g}``
  (not precisions or variances: a scalar or a pytree prefix of ``params``,
  every scalar entry one group ``g`` of ``n_g`` parameters; no ``None`` leaves,
  the evidence needs a proper prior on every parameter)
  and the Gaussian noise scale ``hyper[noise_key]`` (MacKay 1992; with one
  group ``gamma = sum_i lambda_i / (lambda_i + alpha)`` over the eigenvalues
  ``lambda_i`` of the data curvature). These are the stationarity conditions of
  the log evidence at fixed ``w`` (``SSE`` and ``N`` count target entries and
  are scaled by ``N / B`` on a minibatch). Every other entry of ``hyper``
  takes ``Adam(learning_rate)`` ascent steps on ``log h`` with the gradient of
  the log evidence at fixed ``params`` (autodiff through the Cholesky).

  ``make_nlp`` must use ``hyper[prior_key]`` as the ``sigma`` of
  :func:`mlmap.gaussian_log_prior` and ``hyper[noise_key]`` as the ``sigma`` of
  :func:`mlmap.gaussian_log_likelihood`; pass ``prior_key=None`` /
  ``noise_key=None`` to have them updated by gradient ascent instead. A
  ``prior_key`` that is not a key of ``hyper`` raises ``ValueError`` (it would
  silently switch that entry to gradient ascent); ``prior_key=None`` opts
  every entry into gradient ascent. With a ``prior_key``, an absent
  ``noise_key`` raises too when ``hyper`` has other entries (they would
  silently be ascended); with ``hyper = {prior_key: ...}`` alone (e.g.
  classification) it just means there is no noise scale. The prior must be proper
  (as for :func:`mlmap.log_evidence`): a flat prior or ``None`` scale leaves
  raise ``ValueError`` naming the unpenalized leaves. The
  fixed point ignores how the MAP moves with the hyperparameters (the classic
  evidence framework; exact for linear-Gaussian models). For networks that
  can stop far from the evidence maximum along the MAP path: then ascend the
  total derivative (``prior_key=None, noise_key=None, total_derivative=True``,
  see :func:`log_evidence_grad`). A group whose weights the data do not need
  (e.g. an output bias with its own scale) is pruned: its scale shrinks towards
  0 (ARD) and ``A`` becomes ill-conditioned; group such parameters together.
  Cost per iteration: ``fit_steps`` optimizer steps plus one dense curvature
  and Cholesky, so for models up to a few thousand parameters.

  **At scale** (``structure="diag"|"kron"|"lowrank"``, or ``subset`` /
  ``data`` with any structure; :mod:`mlmap.evidence_structured`): the refit is
  ``fit_steps`` steps of ``make_optimizer(nlp)`` (any optax transformation; an
  mlmap one receives ``batch=``; default :func:`mlmap.hessian_free`) on
  minibatches taken in turn from ``data``; the posterior is
  :func:`mlmap.laplace` with the same ``structure`` / ``subset`` / ``data``
  (``rank``, ``diag_method``, ``num_samples``, ``key``, ``max_bytes`` passed
  on), and the fixed point reads ``gamma_g`` from the structure's closed-form
  log-determinant in ``O(P)``. The curvature is computed once per iteration
  with the first ``make_nlp(hyper)`` and moved to the current prior and noise
  in ``O(P)`` (the GGN of a Gaussian likelihood scales as ``1/sigma^2``), so
  the passes over ``data`` compile once per run. Only ``hyper[prior_key]`` and
  the Gaussian noise are updated there: other entries, ``prior_key=None`` and
  ``total_derivative=True`` raise ``ValueError`` (dense only). The
  hyperparameters converge as far as the minibatch refits do; where K-FAC or
  the low rank is exact (one linear Gaussian layer; ``rank=P``) they equal the
  dense path's (``tests/test_evidence_structured.py``).

  Args:
    make_nlp: ``make_nlp(hyper) -> NegativeLogPosterior`` with the full data
      set's ``num_data`` (or ``None``); jax-traceable in ``hyper``.
    hyper: dict of positive hyperparameters (scalars or pytrees of them).
    params: initial parameters (the refits are warm-started from them).
    inputs: full data-set inputs (or a minibatch with ``num_data = N``).
    targets: the targets.
    curvature: ``"ggn"`` or ``"hessian"`` for ``A``.
    prior_key: key of ``hyper`` holding the Gaussian prior standard
      deviation(s) ``sigma_0`` (fixed-point updated), or ``None`` (gradient
      ascent for it too).
    noise_key: key of the Gaussian noise standard deviation, or ``None``.
    num_iterations: maximum outer iterations.
    fit_steps: optimizer steps per refit (the optimizer state carries over
      from one refit to the next).
    make_optimizer: ``nlp -> optax.GradientTransformationExtraArgs`` taking
      ``batch=(inputs, targets)``; default ``mm.newton(nlp)`` (damped Newton).
    learning_rate: Adam step on ``log h`` for the gradient-ascent entries.
    tol: stop when no ``log`` hyperparameter would change by more than ``tol``.
    map_tol: warn when the final refit's Newton decrement exceeds this.
    total_derivative: for the gradient-ascent entries, differentiate the
      evidence along the MAP path, ``dL/dh + (dL/dw)^T dw*/dh``, with
      ``dw*/dh`` from the implicit function theorem (dense exact Hessian solve
      and a gradient through the dense curvature's log-det; about 3x the cost
      of an iteration). Zero extra term for linear-Gaussian models; for
      networks the fixed-``w`` stationary point can be far from the
      evidence maximum along the MAP path (``docs/laplace.md``).
    max_bytes: refuse (``ValueError`` naming ``maximize_evidence``) a dense
      ``(P, P)`` curvature above this many bytes.
    structure: ``"full"`` (default), ``"diag"``, ``"kron"`` or ``"lowrank"``.
    subset: covered parameters (a bool prefix tree, as for :func:`mlmap.laplace`).
    data: an iterable of ``(inputs, targets)`` batches (not a one-shot
      iterator: it is walked every iteration), instead of ``inputs, targets``;
      ``make_nlp(hyper).num_data`` must be their total size.
    rank, diag_method, num_samples, key: of the structure (see :func:`mlmap.laplace`).
    fixed_point: update ``hyper[prior_key]`` and the noise by MacKay's fixed point
      (default); False: by ``Adam(learning_rate)`` steps on the log evidence in
      their logs instead (dense: as ``prior_key=None, noise_key=None``;
      structured: the ``O(P)`` evidence of the stored structure, which is also
      the fallback wherever the fixed point is undefined, ``gamma_g <= 0``).

  Returns:
    ``(hyper, params, info)``: the hyperparameters (same structure), the MAP
    for them, and an :class:`EvidenceHistory`.

  Raises:
    TypeError: ``hyper`` is not a dict, or non-floating ``params`` leaves.
    ValueError: a concrete hyperparameter <= 0, a non-scalar noise scale, a
      ``prior_key``/``noise_key`` missing from ``hyper`` (see above), an
      improper prior, a prior-scale tree that is not a prefix of ``params``, a
      dense curvature above ``max_bytes``, or a curvature that is not positive
      definite at the first refit.

  References:
    MacKay, "Bayesian interpolation", Neural Computation 1992.
    MacKay, "A practical Bayesian framework for backpropagation networks",
    Neural Computation 1992.
    Tipping, "Sparse Bayesian learning and the relevance vector machine", JMLR
    2001 (the same updates, as in sklearn's BayesianRidge / ARDRegression).
    Immer et al., "Scalable marginal likelihood estimation for model selection
    in deep learning", ICML 2021, https://arxiv.org/abs/2104.04975.
  """
  fn = "maximize_evidence"
  if not isinstance(fixed_point, bool):
    raise TypeError(f"{fn}: fixed_point must be True or False, got {fixed_point!r}.")
  _check_hyper(fn, hyper, prior_key, noise_key)
  prior_key, noise_key = _check_keys(fn, hyper, prior_key, noise_key)
  if not (structure == "full" and subset is None and data is None):
    return _maximize_structured(
        fn, make_nlp, hyper, params, inputs, targets, dict(
            structure=structure, subset=subset, data=data, curvature=curvature,
            prior_key=prior_key, noise_key=noise_key, num_iterations=num_iterations,
            fit_steps=fit_steps, make_optimizer=make_optimizer, tol=tol, map_tol=map_tol,
            total_derivative=total_derivative, fixed_point=fixed_point,
            learning_rate=learning_rate),
        dict(rank=rank, diag_method=diag_method, num_samples=num_samples, key=key,
             max_bytes=max_bytes))
  if not fixed_point:  # every entry by the Adam ascent of the log evidence
    prior_key = noise_key = None
  if inputs is None or targets is None:
    raise ValueError(f"{fn}: pass inputs and targets (or data= with a structure).")
  nlp0 = make_nlp(hyper)
  check_curvature(fn, nlp0, curvature)
  check_params(fn, params, max_bytes)
  check_proper_prior(fn, nlp0, params)
  if noise_key is not None and not hasattr(nlp0, "apply_fn"):
    raise TypeError(f"{fn}: the noise update needs an mlmap.NegativeLogPosterior, "
                    f"got {type(nlp0).__name__}.")
  _check_counts(fn, num_iterations, fit_steps)
  groups = None
  if prior_key is not None:
    unpenalized = _none_scale_paths(fn, hyper[prior_key], params)
    if unpenalized:
      raise _improper_error(fn, f"hyper[{prior_key!r}] (None leaves)", unpenalized)
    ids, num_groups = _prior_groups(fn, hyper[prior_key], params)
    groups = (jnp.asarray(ids), jnp.asarray(
        np.bincount(ids[ids >= 0], minlength=num_groups), float), num_groups)
  grad_keys = tuple(k for k in hyper if k not in (prior_key, noise_key))
  if make_optimizer is None:
    make_optimizer = _optimizers.newton
  adam = optax.adam(learning_rate)
  setup = _DenseSetup(make_nlp, inputs, targets, curvature, max_bytes, prior_key,
                      noise_key, grad_keys, groups, adam, total_derivative)
  refit = jax.jit(_dense_refit(make_nlp, make_optimizer, inputs, targets, fit_steps))
  return _dense_loop(fn, setup, refit, make_optimizer(nlp0), hyper, params,
                     num_iterations, tol, map_tol)


def _dense_loop(fn, setup, refit, tx0, hyper, params, num_iterations, tol, map_tol):
  """Refit, evaluate, update until the update changes no log hyperparameter by ``tol``."""
  evaluate = jax.jit(functools.partial(_dense_evaluate, setup))
  hyper = jax.tree_util.tree_map(lambda x: jnp.asarray(x, float), hyper)
  adam_state = setup.adam.init({k: _tree_log(hyper[k]) for k in setup.grad_keys})
  opt_state = tx0.init(params)
  records, hypers, converged = [], [], jnp.asarray(False)
  for t in range(num_iterations):
    params, opt_state = refit(hyper, params, opt_state)
    new, adam_state, stats, change = evaluate(hyper, params, adam_state)
    if t == 0 and _checks.is_concrete(stats[4]) and not bool(stats[4]):
      raise ValueError(f"{fn}: the {setup.curvature} curvature is not positive definite at "
                       "the first refit: the optimizer did not reach a MAP (raise "
                       "fit_steps, or use curvature='ggn' with a proper prior).")
    records.append(stats)
    hypers.append(hyper)
    converged = (change < tol) & stats[5] & (stats[3] <= map_tol if map_tol else True)
    if _checks.is_concrete(converged) and bool(converged):
      break
    if t < num_iterations - 1:
      hyper = new  # invalid parts of the update already kept their old values
  info = _history(records, hypers, converged)
  dec = info.newton_decrement[-1]
  if map_tol is not None and _checks.is_concrete(dec) and float(dec) > map_tol:
    warnings.warn(f"{fn}: the last refit is far from a MAP (Newton decrement "
                  f"{float(dec):.3g} nats > map_tol={map_tol:g}); raise fit_steps.",
                  stacklevel=3)
  return hyper, params, info


class _DenseSetup(NamedTuple):
  """What the dense evaluation step closes over (static for ``jax.jit``)."""
  make_nlp: Any
  inputs: Any
  targets: Any
  curvature: str
  max_bytes: Any
  prior_key: Any
  noise_key: Any
  grad_keys: tuple
  groups: Any  # (ids [P], counts [G], G) or None
  adam: Any
  total_derivative: bool


def _dense_refit(make_nlp, make_optimizer, inputs, targets, fit_steps):
  def refit(h, p, opt_state):
    # The optimizer state (e.g. Newton's adapted damping) carries over from the
    # previous refit: only the hyperparameters changed.
    nlp = make_nlp(h)
    tx = make_optimizer(nlp)

    def body(carry, _):
      p, s = carry
      g = jax.grad(nlp)(p, inputs, targets)
      u, s = tx.update(g, s, p, batch=(inputs, targets))
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, opt_state), None, length=fit_steps)[0]
  return refit


def _dense_prior_update(groups, sigma_tree, p, diag_cov, ok, dtype):
  """MacKay's step for the prior groups: ``(new scale tree, all valid)``."""
  ids_j, counts, num_groups = groups
  leaves, treedef = jax.tree_util.tree_flatten(sigma_tree)
  sig = jnp.concatenate([jnp.ravel(jnp.asarray(s, dtype)) for s in leaves])
  alpha = 1.0 / jnp.square(sig)
  w = ravel_pytree(p)[0]
  mask = ids_j >= 0
  seg = jnp.where(mask, ids_j, 0)
  tr = jax.ops.segment_sum(jnp.where(mask, diag_cov, 0.0), seg, num_groups)
  w2 = jax.ops.segment_sum(jnp.where(mask, w * w, 0.0), seg, num_groups)
  gamma_g = counts - alpha * tr
  ok_g = ok & (gamma_g > 0) & (w2 > 0)
  sig_new = jnp.where(ok_g, jnp.sqrt(w2 / jnp.where(ok_g, gamma_g, 1.0)), sig)
  sizes = np.cumsum([np.size(s) for s in leaves])[:-1]
  parts = jnp.split(sig_new, sizes)
  new = jax.tree_util.tree_unflatten(
      treedef, [jnp.reshape(q, jnp.shape(s)) for q, s in zip(parts, leaves)])
  return new, jnp.all(ok_g)


def _dense_noise_update(nlp, p, inputs, targets, gamma, num_params, noise, ok, dtype):
  """MacKay's step for the Gaussian noise scale: ``(new scale, valid)``."""
  sse, entries = _batch_sse(nlp.apply_fn, p, inputs, targets)
  scale = nlp.scale(inputs)  # a minibatch counts N / B times
  return noise_step(scale * sse, scale * entries, gamma, jnp.asarray(noise, dtype), ok,
                    num_params)


def _dense_ascent(setup, grads, log_other, adam_state, ok):
  """Adam on ``log h`` for the gradient-ascent entries: ``(new values, state, valid)``."""
  finite = ok & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(grads)]))
  neg = jax.tree_util.tree_map(lambda x: -jnp.where(finite, x, 0.0), grads)
  upd, adam_state = setup.adam.update(neg, adam_state)
  log_new = optax.apply_updates(log_other, upd)
  return ({k: jax.tree_util.tree_map(jnp.exp, log_new[k]) for k in setup.grad_keys},
          adam_state, finite)


def _dense_evaluate(setup, h, p, adam_state):
  """Evidence, ``gamma`` and every update at ``(h, p)``, dense (one Cholesky)."""
  st = setup
  p = jax.lax.stop_gradient(p)
  log_other = {k: _tree_log(h[k]) for k in st.grad_keys}
  (_, (value, chol, ok, g)), grads = jax.value_and_grad(_log_ev, has_aux=True)(
      log_other, st.make_nlp, h, p, st.inputs, st.targets, st.curvature, st.max_bytes)
  nlp = st.make_nlp(h)
  if st.grad_keys and st.total_derivative:
    grads = _add_implicit_term(grads, st.make_nlp, log_other, h, p, st.inputs, st.targets,
                               st.curvature, st.max_bytes)
  # Traced hyperparameters cannot raise: a non-positive one (or a non-finite
  # evidence) only flags the iteration and leaves every value unchanged.
  positive = jnp.all(jnp.asarray([jnp.all(x > 0) for x in jax.tree_util.tree_leaves(h)]))
  ok = ok & positive & jnp.isfinite(value)
  eye = jnp.eye(chol.shape[0], dtype=chol.dtype)
  linv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
  diag_cov = jnp.sum(linv * linv, axis=0)
  decrement = 0.5 * jnp.sum(jnp.square(linv @ g))
  new, valid = dict(h), ok
  num_params = chol.shape[0]
  # gamma = tr(A^{-1} H_data) = P - tr(A^{-1} H_prior), for any prior.
  h_prior = _dense.hessian_matrix(nlp.prior_term, p, max_bytes=st.max_bytes)
  gamma = num_params - jnp.sum((linv @ h_prior) * linv)
  if st.prior_key is not None:
    new[st.prior_key], ok_p = _dense_prior_update(st.groups, h[st.prior_key], p, diag_cov,
                                                  ok, chol.dtype)
    valid = valid & ok_p
  if st.noise_key is not None:
    new[st.noise_key], ok_n = _dense_noise_update(nlp, p, st.inputs, st.targets, gamma,
                                                  num_params, h[st.noise_key], ok,
                                                  chol.dtype)
    valid = valid & ok_n
  if st.grad_keys:
    ascended, adam_state, finite = _dense_ascent(st, grads, log_other, adam_state, ok)
    new.update(ascended)
    valid = valid & finite
  change = jnp.max(jnp.asarray([0.0] + [
      jnp.max(jnp.abs(jnp.log(a) - jnp.log(b)))
      for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(h))]))
  stats = (jnp.where(ok, value, -jnp.inf), gamma, jnp.linalg.norm(g),
           jnp.where(ok, decrement, jnp.inf), ok, valid)
  return new, adam_state, stats, change


def _check_counts(fn, num_iterations, fit_steps):
  for name, value in (("num_iterations", num_iterations), ("fit_steps", fit_steps)):
    if (isinstance(value, bool) or not isinstance(value, int)
        or value < (1 if name == "num_iterations" else 0)):
      raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}.")


def _history(records, hypers, converged):
  cols = [jnp.stack([jnp.asarray(x) for x in c]) for c in zip(*records)]
  return EvidenceHistory(
      log_evidence=cols[0], hyper=jax.tree_util.tree_map(lambda *x: jnp.stack(x), *hypers),
      gamma=cols[1], grad_norm=cols[2], newton_decrement=cols[3],
      positive_definite=cols[4], valid_update=cols[5], num_iterations=len(records),
      converged=converged)


def _maximize_structured(fn, make_nlp, hyper, params, inputs, targets, opts, laplace_kw):
  """The structured branch (:mod:`mlmap.evidence_structured`), checked and recorded."""
  check_structured(fn, hyper, opts["prior_key"], opts["noise_key"],
                   opts.pop("total_derivative"), make_nlp)
  _check_counts(fn, opts["num_iterations"], opts["fit_steps"])
  check_params(fn, params, None)
  if opts["data"] is not None and (inputs is not None or targets is not None):
    raise ValueError(f"{fn}: pass either data= or inputs, targets, not both.")
  if opts["data"] is None:
    if inputs is None or targets is None:
      raise ValueError(f"{fn}: pass inputs and targets, or data= batches.")
    opts["data"] = [(inputs, targets)]
  _data._check_data(fn, opts["data"], "many")
  unpenalized = _none_scale_paths(fn, hyper[opts["prior_key"]], params)
  if unpenalized:
    raise _improper_error(fn, f"hyper[{opts['prior_key']!r}] (None leaves)", unpenalized)
  hyper, params, records, hypers, converged = maximize_structured(
      make_nlp, hyper, params, laplace_kw=laplace_kw, **opts)
  dec = records[-1][3]
  if opts["map_tol"] is not None and float(dec) > opts["map_tol"]:
    warnings.warn(f"{fn}: the last refit is far from a MAP (Newton decrement "
                  f"{float(dec):.3g} nats > map_tol={opts['map_tol']:g}); raise fit_steps.",
                  stacklevel=3)
  return hyper, params, _history(records, hypers, converged)
