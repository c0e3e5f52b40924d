"""Hessian-free optimization (Martens 2010) as an optax transformation.

Re-exported as ``mlmap.hessian_free``; shares its helpers with
:mod:`mlmap.optimizers` through :mod:`mlmap._optim_common`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mlmap import _checks
from mlmap import _optim_common as _oc
from mlmap.curvature import ggn_vp_fn, hvp_fn
from mlmap.dense import ggn_diagonal
from mlmap.linalg import CGStatus, cg, tree_vdot
from mlmap.posterior import is_negative_log_posterior

_tmap = jax.tree_util.tree_map
_CURVATURES = ("ggn", "hessian")


class HessianFreeState(NamedTuple):
  """State of :func:`hessian_free`.

  Attributes:
    count: number of updates so far (int32).
    damping: Tikhonov ``lambda`` for the next update (adapted by ``rho``).
    rho: reduction ratio of the last update (actual / predicted decrease).
    cg_iterations: CG iterations of the last update.
    cg_residual: ``||(B + lambda I) d + g||`` of the last CG solve.
    negative_curvature: CG met ``p^T (B + lambda I) p <= 0`` and stopped at the
      last good iterate.
    fallback: the CG result was not a descent direction (or non-finite) and a
      scaled gradient step was used instead.
    rejected: the last step was not taken (loss rose or was non-finite).
    direction: the last accepted CG solution (zeros after a rejected step),
      warm start of the next solve.
    cg_status: int32 :class:`mlmap.CGStatus` code of the last CG solve
      (``CONVERGED``, ``MAX_ITERATIONS`` -- the usual truncated solve --,
      ``NEGATIVE_CURVATURE`` or ``BREAKDOWN``: a non-finite curvature product).
  """
  count: Any
  damping: Any
  rho: Any
  cg_iterations: Any
  cg_residual: Any
  negative_curvature: Any
  fallback: Any
  rejected: Any
  direction: Any
  cg_status: Any = None


def hessian_free(objective, curvature="ggn", damping=1e-3, maxiter=50, *,
                 learning_rate=1.0, tol=1e-5, warm_start=0.95,
                 preconditioner=None, preconditioner_exponent=0.75,
                 damping_factor=1.5, min_damping=1e-8, curvature_fraction=None):
  r"""Hessian-free (truncated Newton-CG) optimization after Martens (2010).

  Each update approximately minimizes the damped quadratic model

  .. math::
    q(d) = g^\top d + \tfrac12 d^\top (B + \lambda I)\, d,
    \qquad \Delta w = \eta\, d

  by at most ``maxiter`` steps of conjugate gradients (:func:`mlmap.cg`) with
  curvature-vector products ``B v``: the GGN (:func:`mlmap.ggn_vp`, positive
  semi-definite, the default) or the exact Hessian (:func:`mlmap.hvp`, may be
  indefinite). CG starts from ``warm_start`` times the previous solution (from
  zero after a rejected step). The
  damping follows the Levenberg-Marquardt rule on the reduction ratio

  .. math::
    \rho = \frac{f(w + \Delta w) - f(w)}
                {g^\top \Delta w + \tfrac12 \Delta w^\top B\, \Delta w}:
    \quad \rho < \tfrac14 \Rightarrow \lambda \leftarrow \text{factor}\cdot\lambda,
    \quad \rho > \tfrac34 \Rightarrow \lambda \leftarrow \lambda / \text{factor}.

  When CG meets negative curvature it returns its last good iterate; if that is
  not a descent direction the step falls back to the gradient direction
  :math:`d = -\alpha g` with ``alpha`` minimizing ``q`` along ``g`` (or
  ``1 / lambda`` when ``q`` is unbounded along it). A step that raises the loss
  (or makes it non-finite) is rejected: zero update, damping times
  ``damping_factor**3``.

  ``damping="auto"`` (recommended: the objective sums over the data, so a good
  ``lambda`` grows with ``N``; the contract's ``1e-3`` is tiny on that scale
  and the first updates are rejected until the rule has grown it) starts from
  the curvature's own scale, :math:`|\mathrm{tr}(B)|/P` by Hutchinson's estimator
  (4 Rademacher probes, ``PRNGKey(0)``: 4 more products on the first update),
  floored at ``min_damping``.

  Stochastic regime (Martens 2010, Sec. 4.3): with ``batch`` a minibatch, ``g``
  and ``rho`` are taken on it (a negative log-posterior with ``num_data=N`` is
  on the data set's scale) and the curvature products on a smaller batch:
  ``curvature_batch=(xc, yc)`` in the update's extra args, else the first
  ``ceil(curvature_fraction * B)`` examples of the batch (``None``: the whole
  batch). The curvature batch is rescaled to the same ``N`` (the prior counts
  once). Martens used about 1/100 of the data for the products; smaller curvature
  batches make the model noisier, which the damping rule absorbs by growing
  ``lambda``.

  Cost per update, in gradient-equivalents (one forward + one backward pass):
  about 1-2 per CG iteration (GGN: a ``jvp`` and a ``vjp``; Hessian: a
  forward-over-reverse product), plus one more product for ``B d`` and two
  forward passes for ``rho`` (``f(w)`` and ``f(w + Delta w)``). The optional
  ``preconditioner="diagonal"`` uses the exact GGN diagonal
  :math:`M = (\mathrm{diag}(G) + \lambda)^{\xi}` (``xi =
  preconditioner_exponent``, 0.75 in Martens 2010), which costs about one
  backward pass per output dimension per example.

  Args:
    objective: ``objective(params, inputs, targets) -> scalar``; a
      :class:`mlmap.NegativeLogPosterior` for ``curvature="ggn"`` and for the
      diagonal preconditioner.
    curvature: ``"ggn"`` or ``"hessian"``.
    damping: initial ``lambda >= 0``, or ``"auto"`` (see above).
    maxiter: CG iterations per update, an integer >= 1.
    learning_rate: ``eta >= 0`` (float or optax schedule), 1 in Martens 2010.
    tol: relative residual tolerance of CG.
    warm_start: decay in [0, 1] of the previous solution used as CG's ``x0``.
    preconditioner: None or ``"diagonal"``.
    preconditioner_exponent: ``xi`` of the diagonal preconditioner.
    damping_factor: ``> 1``; 3/2 in Martens 2010.
    min_damping: floor of the damping when the rule grows it from 0 (and of
      ``"auto"``).
    curvature_fraction: ``None`` or the fraction in (0, 1] of the batch used for
      the curvature products when no ``curvature_batch`` is passed (needs a
      negative log-posterior).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`HessianFreeState`;
    its ``cg_status`` is the :class:`mlmap.CGStatus` of the last CG solve. Call
    ``tx.update(grads, state, params, batch=(x, y))``, optionally with
    ``curvature_batch=(xc, yc)``, and with ``full_params=`` inside
    ``optax.multi_transform`` (``mm.make_train_step`` passes it).

  Raises:
    ValueError: at trace time, when the objective is not scalar on the batch
      or ``grads`` is not shaped like ``params``.
    TypeError: when ``params`` has a non-floating leaf (named by its path).

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens & Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", 2012. Nocedal & Wright, "Numerical Optimization", 2006,
    Alg. 7.1 (line search Newton-CG).
  """
  fn = "hessian_free"
  _check_args(fn, objective, curvature, damping, learning_rate, tol, preconditioner,
              damping_factor, min_damping, warm_start, curvature_fraction)
  maxiter = _oc.check_count(fn, "maxiter", maxiter)

  def init_fn(params):
    _oc.check_params(fn, params)
    dt = _checks.tree_float_dtype(params)
    return HessianFreeState(
        count=jnp.zeros((), jnp.int32), damping=_oc.initial_damping(damping, dt),
        rho=_oc.scalar(jnp.nan, dt), cg_iterations=jnp.zeros((), jnp.int32),
        cg_residual=_oc.scalar(0.0, dt), negative_curvature=jnp.zeros((), bool),
        fallback=jnp.zeros((), bool), rejected=jnp.zeros((), bool),
        direction=_tmap(jnp.zeros_like, params),
        cg_status=jnp.full((), CGStatus.CONVERGED, jnp.int32))

  def update_fn(grads, state, params=None, **extra_args):
    objective_u, inputs, targets = _oc.update_problem(fn, objective, grads, params,
                                                      extra_args)
    obj_c, xc, tc = _oc.curvature_problem(fn, objective_u, params, inputs, targets,
                                          extra_args, curvature_fraction)
    # Linearize once per update; every CG iteration reuses the linearization.
    curv = (ggn_vp_fn if curvature == "ggn" else hvp_fn)(obj_c, params, xc, tc)
    floor = jnp.asarray(min_damping, state.damping.dtype)
    lam = _oc.resolve_damping(state.damping, lambda: _oc.hutchinson_scale(curv, params),
                              floor)
    precond = None
    if preconditioner == "diagonal":
      precond = _diagonal_preconditioner(obj_c, params, xc, tc, lam,
                                         preconditioner_exponent)
    x0 = _tmap(lambda u: (warm_start * u).astype(u.dtype), state.direction)
    d, bd, info, good = _solve(curv, lam, grads, x0, maxiter, tol, precond, min_damping)
    lr = _oc.lr_at(learning_rate, state.count, lam.dtype)
    f0 = _oc.value_at(fn, objective_u, params, inputs, targets, extra_args)
    updates, rho, accept = _try_step(objective_u, params, inputs, targets, grads, d, bd,
                                     lr, f0)
    next_lam = _oc.adapt_damping(lam, rho, accept, damping_factor, floor).astype(lam.dtype)
    # A rejected direction is a bad warm start (too long for the grown damping).
    keep = accept & _checks.tree_all_finite(d)
    direction = _oc.where_tree(keep, d, _tmap(jnp.zeros_like, d))
    return updates, HessianFreeState(
        count=state.count + 1, damping=next_lam, rho=rho.astype(lam.dtype),
        cg_iterations=info.iterations.astype(jnp.int32),
        cg_residual=info.residual_norm.astype(lam.dtype),
        negative_curvature=info.negative_curvature, fallback=~good, rejected=~accept,
        direction=direction, cg_status=info.status)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_args(fn, objective, curvature, damping, learning_rate, tol, preconditioner,
                damping_factor, min_damping, warm_start, curvature_fraction):
  if not callable(objective):
    raise TypeError(f"{fn}: objective must be callable, got {type(objective).__name__}.")
  if curvature not in _CURVATURES:
    raise ValueError(f"{fn}: curvature must be one of {_CURVATURES}, got {curvature!r}.")
  if preconditioner not in (None, "diagonal"):
    raise ValueError(f"{fn}: preconditioner must be one of (None, 'diagonal'), got "
                     f"{preconditioner!r}.")
  is_nlp = is_negative_log_posterior(objective)
  if not is_nlp and (curvature == "ggn" or preconditioner == "diagonal"):
    raise TypeError(
        f"{fn}: curvature={curvature!r} with preconditioner={preconditioner!r} needs "
        f"a negative_log_posterior (mm.negative_log_posterior(...)) to separate model "
        f"and likelihood; got {type(objective).__name__}. Use curvature='hessian' "
        "and preconditioner=None for a plain function.")
  _checks.check_nonnegative("learning_rate", learning_rate, fn)
  _oc.check_damping(fn, damping)
  _checks.check_nonnegative("tol", tol, fn)
  _checks.check_nonnegative("min_damping", min_damping, fn)
  _oc.check_factor(fn, "damping_factor", damping_factor)
  _oc.check_fraction(fn, curvature_fraction)
  if _checks.is_concrete(warm_start) and not 0.0 <= warm_start <= 1.0:
    raise ValueError(f"{fn}: warm_start must lie in [0, 1], got {warm_start!r}.")


def _diagonal_preconditioner(objective, params, inputs, targets, lam, exponent):
  """``r -> r / (diag(G) + lambda)^xi`` with the exact GGN diagonal (Martens 2010)."""
  diag = ggn_diagonal(objective, params, inputs, targets)
  m = _tmap(lambda a: (jnp.maximum(a, 0) + lam.astype(a.dtype)) ** exponent, diag)
  m = _tmap(lambda a: jnp.where(a > 0, a, 1.0), m)
  return lambda r: _tmap(jnp.divide, r, m)


def _solve(curv, lam, grads, x0, maxiter, tol, precond, min_damping):
  """CG on ``(B + lam I) d = -g``; ``(d, B d, info, good)``, the scaled gradient
  step when CG's result is not a descent direction of the model (``good`` False)."""
  def damped(v):
    return _tmap(lambda a, b: a + lam.astype(b.dtype) * b, curv(v), v)

  neg_g = _tmap(jnp.negative, grads)
  d, info = cg(damped, neg_g, x0=x0, maxiter=maxiter, tol=tol, preconditioner=precond)
  bd = curv(d)
  gd, dbd = tree_vdot(grads, d), tree_vdot(d, bd)
  good = _checks.tree_all_finite(d) & (gd < 0) & (gd + 0.5 * dbd < 0)

  def gradient_step(_):
    bg = curv(grads)
    gg, gbg = tree_vdot(grads, grads), tree_vdot(grads, bg)
    curv_g = gbg + lam * gg
    alpha = jnp.where(curv_g > 0, gg / jnp.where(curv_g > 0, curv_g, 1.0),
                      1.0 / jnp.maximum(lam, min_damping))
    alpha = jnp.where(gg > 0, alpha, 0.0)
    return (_tmap(lambda u: (-alpha * u).astype(u.dtype), grads),
            _tmap(lambda u: (-alpha * u).astype(u.dtype), bg))

  d, bd = lax.cond(good, lambda _: (d, bd), gradient_step, None)
  return d, bd, info, good


def _try_step(objective, params, inputs, targets, grads, d, bd, lr, f0):
  """``(updates, rho, accept)`` of the step ``lr d`` from the loss ``f0`` at
  ``params`` (zero update when rejected)."""
  gd, dbd = tree_vdot(grads, d), tree_vdot(d, bd)
  step = _tmap(lambda u: (lr * u).astype(u.dtype), d)
  finite = _checks.tree_all_finite(step)
  step = _oc.where_tree(finite, step, _tmap(jnp.zeros_like, step))
  f1 = objective(optax.apply_updates(params, step), inputs, targets)
  rho, accept = _oc.reduction_ratio(f0, f1, lr * gd + 0.5 * lr * lr * dbd)
  accept = accept & finite
  return _oc.where_tree(accept, step, _tmap(jnp.zeros_like, step)), rho, accept
