"""Second-order and natural-gradient optimizers as optax transformations.

Each factory takes the objective when it is built and returns an
``optax.GradientTransformationExtraArgs``; the minibatch comes with each update::

  updates, state = tx.update(grads, state, params, batch=(inputs, targets))
  params = optax.apply_updates(params, updates)

so they chain with optax (``optax.chain(mm.natural_gradient(nlp),
optax.scale(0.5))``, gradient clipping), take optax schedules as
``learning_rate`` and run inside the user's ``jax.jit``. ``grads`` is used as
the gradient ``g`` (so a clipping transformation before them acts on ``g``).
Data-dependent failures (a Hessian that is not positive definite, negative
curvature in CG, a step that increases the loss) are handled inside the update
and reported in the NamedTuple state; they never produce a NaN step.

``hessian_free`` lives in :mod:`mlmap._hf`, ``kfac`` in :mod:`mlmap._kfac` and
``nonlinear_cg`` in :mod:`mlmap._ncg`; all are re-exported here. The helpers they share live in
:mod:`mlmap._optim_common`, which imports none of them (no import cycle).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve

from mlmap import _checks
from mlmap import _optim_common as _oc
from mlmap._hf import HessianFreeState, hessian_free  # re-exported
from mlmap._kfac import KFACState, kfac  # re-exported
from mlmap._ncg import NonlinearCGState, nonlinear_cg  # re-exported
from mlmap.curvature import fisher_vp_fn
from mlmap.dense import DEFAULT_MAX_BYTES, fisher_matrix, hessian_matrix
from mlmap.linalg import CGStatus, cg, tree_vdot
from mlmap.posterior import is_negative_log_posterior

_tmap = jax.tree_util.tree_map


# --- Newton --------------------------------------------------------------------

class NewtonState(NamedTuple):
  """State of :func:`newton`.

  Attributes:
    count: number of updates so far (int32).
    damping: Levenberg-Marquardt ``lambda`` for the next update.
    rho: reduction ratio of the last update (actual / predicted decrease);
      NaN before the first update, 0 when ``adaptive=False`` (the state stays
      finite, which ``mm.make_train_step`` requires).
    negative_curvature: the last ``H + lambda I`` was not positive definite and
      ``lambda`` had to grow.
    rejected: the last step was not taken (loss rose or was non-finite).
  """
  count: Any
  damping: Any
  rho: Any
  negative_curvature: Any
  rejected: Any


def newton(objective, learning_rate=1.0, damping=0.0, *, adaptive=True,
           damping_factor=2.0, max_bytes=DEFAULT_MAX_BYTES):
  r"""Damped Newton's method with the dense exact Hessian (Levenberg-Marquardt).

  .. math::
    \Delta w = -\eta\,(H + \lambda I)^{-1} g, \qquad
    H = \nabla^2 f(w; X, T),\quad g = \nabla f(w; X, T)

  solved by Cholesky. When ``H + lambda I`` is not positive definite (a saddle,
  a maximum, an indefinite Hessian) ``lambda`` grows tenfold inside the update
  until it is, so the step is always a descent direction and never NaN. With
  ``adaptive=True`` the update also evaluates ``f`` at ``w + Delta w``
  (one extra forward pass) and computes the reduction ratio

  .. math::
    \rho = \frac{f(w + \Delta w) - f(w)}{g^\top \Delta w
           + \tfrac12 \Delta w^\top H \Delta w},

  shrinks ``lambda`` by ``damping_factor`` when ``rho > 3/4``, grows it when
  ``rho < 1/4``, and rejects (returns a zero update) a step that raises the loss,
  growing ``lambda`` by ``damping_factor**3``.

  Cost: a dense ``P x P`` Hessian (``P`` Hessian-vector products, ``O(P^2)``
  memory) and an ``O(P^3)`` factorization per update, and more factorizations
  when ``lambda`` must grow: for small models (``P`` up to a few thousand).
  ``init`` and ``update`` refuse (``ValueError`` naming ``newton`` and
  ``max_bytes``) a Hessian larger than ``max_bytes`` before building it.

  Args:
    objective: ``objective(params, inputs, targets) -> scalar``.
    learning_rate: ``eta >= 0``, a float or an optax schedule of the step count.
    damping: initial ``lambda >= 0`` (0: pure Newton while ``H`` is PD), or
      ``"auto"``: the mean absolute diagonal of the first update's Hessian.
    adaptive: adapt ``lambda`` by ``rho`` and reject uphill steps.
    damping_factor: ``> 1``, the factor of the ``rho`` rule.
    max_bytes: the largest dense ``P x P`` Hessian allowed, in bytes (default
      :data:`mlmap.dense.DEFAULT_MAX_BYTES`, 2 GiB).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NewtonState`.

  Raises:
    ValueError: at trace time, when the objective is not scalar on the batch,
      ``grads`` is not shaped like ``params``, or the Hessian exceeds
      ``max_bytes``.
    TypeError: when ``params`` has a non-floating leaf (named by its path).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mlmap as mm
    >>> f = lambda w, x, t: jnp.sum((x @ w - t) ** 2)
    >>> x, t = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, 2.0, 3.0])
    >>> tx = mm.newton(f); w = jnp.zeros(2); state = tx.init(w)
    >>> u, state = tx.update(jax.grad(f)(w, x, t), state, w, batch=(x, t))
    >>> optax.apply_updates(w, u).round(6).tolist()  # one step solves least squares
    [1.0, 1.0]

  References:
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, Sec. 3.4 and 4.
    Marquardt, "An algorithm for least-squares estimation of nonlinear
    parameters", 1963.
  """
  fn = "newton"
  if not callable(objective):
    raise TypeError(f"{fn}: objective must be callable, got {type(objective).__name__}.")
  _checks.check_nonnegative("learning_rate", learning_rate, fn)
  _oc.check_damping(fn, damping)
  _oc.check_factor(fn, "damping_factor", damping_factor)
  _oc.check_dense(fn, (), max_bytes)  # validates max_bytes itself

  def init_fn(params):
    _oc.check_params(fn, params)
    _oc.check_dense(fn, params, max_bytes)
    dt = _checks.tree_float_dtype(params)
    return NewtonState(count=jnp.zeros((), jnp.int32),
                       damping=_oc.initial_damping(damping, dt),
                       rho=_oc.scalar(jnp.nan, dt), negative_curvature=jnp.zeros((), bool),
                       rejected=jnp.zeros((), bool))

  def update_fn(grads, state, params=None, **extra_args):
    objective_u, inputs, targets = _oc.update_problem(fn, objective, grads, params,
                                                      extra_args)
    _oc.check_dense(fn, params, max_bytes)
    flat_w, unravel = ravel_pytree(params)
    g = ravel_pytree(grads)[0].astype(flat_w.dtype)
    h = hessian_matrix(objective_u, params, inputs, targets, max_bytes=max_bytes)
    h = 0.5 * (h + h.T)
    lam_in = _oc.resolve_damping(state.damping, lambda: jnp.mean(jnp.abs(jnp.diagonal(h))),
                                 0.0)
    chol, lam, ok, floor = _oc.damped_cholesky(h, lam_in)
    step = -_oc.lr_at(learning_rate, state.count, g.dtype) * cho_solve((chol, True), g)
    finite = ok & jnp.all(jnp.isfinite(step))
    step = jnp.where(finite, step, 0.0)
    if adaptive:
      f0 = _oc.value_at(fn, objective_u, params, inputs, targets, extra_args)
      f1 = objective_u(unravel(flat_w + step), inputs, targets)
      predicted = g @ step + 0.5 * step @ (h @ step)
      rho, accept = _oc.reduction_ratio(f0, f1, predicted)
      accept = accept & finite
      next_lam = _oc.adapt_damping(lam, rho, accept, damping_factor, floor)
    else:
      rho, accept, next_lam = jnp.zeros((), g.dtype), finite, lam_in
    step = jnp.where(accept, step, 0.0)
    updates = _tmap(lambda u, r: u.astype(r.dtype), unravel(step), grads)
    dt = state.damping.dtype
    return updates, NewtonState(
        count=state.count + 1, damping=next_lam.astype(dt), rho=rho.astype(dt),
        negative_curvature=lam > lam_in, rejected=~accept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- natural gradient ----------------------------------------------------------

class NaturalGradientState(NamedTuple):
  """State of :func:`natural_gradient`.

  Attributes:
    count: number of updates so far (int32).
    damping: the damping ``lambda`` added to the Fisher for the next update
      (adapted by ``rho`` when ``adaptive=True``; NaN before the first update
      with ``damping="auto"``).
    cg_iterations: CG iterations of the last solve (0 for ``solver="dense"``).
    cg_residual: ``||(F + lambda I) d - g||`` of the last solve.
    negative_curvature: CG met ``p^T (F + lambda I) p <= 0`` (rounding), or the
      dense factorization needed extra damping.
    fallback: the solve failed (non-finite or not a descent direction) and the
      plain gradient was used (a zero update when the gradient is non-finite).
    cg_status: int32 :class:`mlmap.CGStatus` code of the last solve
      (``info.status`` of :func:`mlmap.cg`). For ``solver="dense"``:
      ``CONVERGED``, ``NEGATIVE_CURVATURE`` when the factorization needed extra
      damping, ``BREAKDOWN`` when it failed or gave a non-finite solution.
    rho: reduction ratio of the last update (NaN before the first update, 0
      when ``adaptive=False``: the state stays finite, which
      ``mm.make_train_step`` requires).
    rejected: the last step was not taken (the loss rose or was non-finite;
      always False when ``adaptive=False``).
  """
  count: Any
  damping: Any
  cg_iterations: Any
  cg_residual: Any
  negative_curvature: Any
  fallback: Any
  cg_status: Any = None
  rho: Any = None
  rejected: Any = None


def _ng_direction(objective, solver, maxiter, tol, max_bytes, grads, params,
                  inputs, targets, lam, floor):
  """``(d, fvp, lam, iterations, residual, negative, status)`` with ``(F + lam I) d = g``.

  ``lam`` is resolved first (``damping="auto"``: Hutchinson's ``tr(F)/P`` for CG,
  the mean diagonal of the dense Fisher); ``fvp`` is the undamped Fisher product.
  """
  if solver == "cg":
    fvp = fisher_vp_fn(objective, params, inputs, targets)
    lam = _oc.resolve_damping(lam, lambda: _oc.hutchinson_scale(fvp, params), floor)

    def matvec(v):
      return _tmap(lambda a, b: a + lam.astype(b.dtype) * b, fvp(v), v)
    d, info = cg(matvec, grads, maxiter=maxiter, tol=tol)
    return (d, fvp, lam, info.iterations, info.residual_norm, info.negative_curvature,
            info.status)
  g, unravel = ravel_pytree(grads)
  f = fisher_matrix(objective, params, inputs, targets, max_bytes=max_bytes)
  f = 0.5 * (f + f.T)
  lam = _oc.resolve_damping(lam, lambda: jnp.mean(jnp.abs(jnp.diagonal(f))), floor)
  chol, lam_used, factored, _ = _oc.damped_cholesky(f, lam)
  x = cho_solve((chol, True), g)
  resid = jnp.linalg.norm(f @ x + lam * x - g)
  negative = lam_used > lam
  ok = factored & jnp.all(jnp.isfinite(x))
  status = jnp.where(~ok, CGStatus.BREAKDOWN,
                     jnp.where(negative, CGStatus.NEGATIVE_CURVATURE, CGStatus.CONVERGED))
  fvp = lambda v: unravel(f @ ravel_pytree(v)[0])  # noqa: E731
  return unravel(x), fvp, lam, jnp.zeros((), jnp.int32), resid, negative, status


def _ng_check_args(fn, objective, solver, learning_rate, damping, tol, damping_factor,
                   min_damping, curvature_fraction, max_bytes):
  if not is_negative_log_posterior(objective):
    raise TypeError(
        f"{fn} needs a negative_log_posterior (mm.negative_log_posterior(apply_fn, "
        f"log_likelihood, ...)) to take a Fisher of its likelihood; got "
        f"{type(objective).__name__}. For a plain function use mm.newton or "
        "mm.hessian_free(..., curvature='hessian').")
  if solver not in ("cg", "dense"):
    raise ValueError(f"{fn}: solver must be one of ('cg', 'dense'), got {solver!r}.")
  _checks.check_nonnegative("learning_rate", learning_rate, fn)
  _oc.check_damping(fn, damping)
  _checks.check_nonnegative("tol", tol, fn)
  _oc.check_factor(fn, "damping_factor", damping_factor)
  _checks.check_nonnegative("min_damping", min_damping, fn)
  _oc.check_fraction(fn, curvature_fraction)
  _oc.check_dense(fn, (), max_bytes)  # validates max_bytes itself


def _ng_accept(objective, params, inputs, targets, grads, d, fvp, lr, lam, floor,
               damping_factor, f0):
  """``(rho, accept, next_lam)`` of the step ``-lr d`` from the loss ``f0`` at
  ``params`` (Levenberg-Marquardt rule)."""
  step = _tmap(lambda u: (-lr * u).astype(u.dtype), d)
  f1 = objective(optax.apply_updates(params, step), inputs, targets)
  predicted = -lr * tree_vdot(grads, d) + 0.5 * lr * lr * tree_vdot(d, fvp(d))
  rho, accept = _oc.reduction_ratio(f0, f1, predicted)
  accept = accept & _checks.tree_all_finite(step)
  next_lam = _oc.adapt_damping(lam, rho, accept, damping_factor, floor)
  return rho, accept, next_lam


def natural_gradient(objective, learning_rate=1.0, damping=1e-3, *, solver="cg",
                     maxiter=100, tol=1e-6, max_bytes=DEFAULT_MAX_BYTES, adaptive=True,
                     damping_factor=1.5, min_damping=1e-8, curvature_fraction=None):
  r"""Natural gradient descent with the exact Fisher (Amari 1998).

  .. math::
    \Delta w = -\eta\,(F + \lambda I)^{-1} g,\qquad
    F = \frac{N}{B}\sum_i J_i^\top\,
        \mathbb E_{t \sim p(t \mid z_i)}\!\big[\nabla_z \log p\,\nabla_z \log p^\top\big]\,
        J_i \;-\; \nabla^2 \log p(w)

  ``F`` is the Fisher of the likelihood term under the model's own predictive
  distribution (not the empirical Fisher) plus the prior's Hessian, applied by
  :func:`mlmap.fisher_vp` inside :func:`mlmap.cg` (``solver="cg"``, matrix-free),
  or built densely by :func:`mlmap.fisher_matrix` and factorized
  (``solver="dense"``, ``O(P^2)`` memory, ``O(P^3)`` time: small models only).
  For the built-in (canonical-link) likelihoods ``F`` equals the GGN, so with a
  linear model (logistic / softmax / linear regression) ``F = H`` and the step
  is the Newton (IRLS, Fisher scoring) step. The step is invariant to smooth
  reparametrizations of the model to first order (Martens 2020).

  Damping (``adaptive=True``, the default): the update evaluates the objective
  at ``w + Delta w`` on the batch (one more forward pass; one more Fisher
  product for the model) and takes the reduction ratio
  :math:`\rho = (f(w+\Delta w) - f(w)) / (g^\top\Delta w + \tfrac12
  \Delta w^\top F \Delta w)`. ``rho < 1/4`` grows ``lambda`` by
  ``damping_factor``, ``rho > 3/4`` shrinks it; a step that raises the loss
  (or makes it non-finite) is rejected (zero update, ``lambda`` times
  ``damping_factor**3``), as in :func:`mlmap.hessian_free`. ``adaptive=False``
  keeps ``lambda`` fixed and takes every step.

  ``damping="auto"`` (recommended: the objective sums over the data, so a good
  ``lambda`` grows with ``N``) starts from the Fisher's own scale,
  :math:`\mathrm{tr}(F)/P` by Hutchinson's estimator (4 Rademacher probes,
  ``PRNGKey(0)``; the mean diagonal for ``solver="dense"``), floored at
  ``min_damping``, taken on the first update.

  Stochastic regime: with ``batch`` a minibatch, ``g`` and ``rho`` are taken
  on it (the objective with ``num_data=N`` is on the data set's scale) and the
  Fisher on ``curvature_batch=(xc, yc)`` when the update gets one, else on the
  first ``ceil(curvature_fraction * B)`` examples of the batch
  (``curvature_fraction=None``: the whole batch).

  Args:
    objective: a :class:`mlmap.NegativeLogPosterior` (``mm.negative_log_posterior``):
      the Fisher needs the model and the likelihood apart.
    learning_rate: ``eta >= 0``, a float or an optax schedule.
    damping: initial ``lambda >= 0``, or ``"auto"``.
    solver: ``"cg"`` or ``"dense"``.
    maxiter: CG iterations per update (``solver="cg"``), an integer >= 1.
    tol: relative CG residual tolerance.
    max_bytes: the largest dense ``P x P`` Fisher allowed with
      ``solver="dense"``, in bytes (default
      :data:`mlmap.dense.DEFAULT_MAX_BYTES`, 2 GiB); ``init`` and ``update``
      refuse a larger one (``ValueError`` naming ``natural_gradient`` and
      ``max_bytes``) before building it.
    adaptive: Levenberg-Marquardt damping and step rejection.
    damping_factor: ``> 1``, the factor of the damping rule.
    min_damping: floor of the damping (when grown from 0, and of ``"auto"``).
    curvature_fraction: ``None`` or the fraction in (0, 1] of the batch used for
      the Fisher when no ``curvature_batch`` is passed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NaturalGradientState`;
    its ``cg_status`` says whether the last solve converged. Call
    ``tx.update(grads, state, params, batch=(x, y))``, optionally with
    ``curvature_batch=(xc, yc)``, and with ``full_params=`` inside
    ``optax.multi_transform`` (``mm.make_train_step`` passes it).

  Raises:
    ValueError: at trace time, when the objective is not scalar on the batch,
      ``grads`` is not shaped like ``params``, or (``solver="dense"``) the
      Fisher exceeds ``max_bytes``.
    TypeError: when ``params`` has a non-floating leaf (named by its path).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.bernoulli_log_likelihood,
    ...                                 mm.gaussian_log_prior)
    >>> x, t = jnp.array([[1.0, 2.0], [1.0, -1.0], [1.0, 0.5]]), jnp.array([1.0, 0.0, 1.0])
    >>> tx = optax.chain(mm.natural_gradient(nlp, damping="auto"), optax.scale(0.5))
    >>> w = jnp.zeros(2); state = tx.init(w)
    >>> u, state = tx.update(jax.grad(nlp)(w, x, t), state, w, batch=(x, t))
    >>> bool(nlp(optax.apply_updates(w, u), x, t) < nlp(w, x, t))
    True

  References:
    Amari, "Natural gradient works efficiently in learning", Neural Computation
    1998. Martens, "New insights and perspectives on the natural gradient
    method", JMLR 2020, https://arxiv.org/abs/1412.1193.
  """
  fn = "natural_gradient"
  _ng_check_args(fn, objective, solver, learning_rate, damping, tol, damping_factor,
                 min_damping, curvature_fraction, max_bytes)
  maxiter = _oc.check_count(fn, "maxiter", maxiter)

  def init_fn(params):
    _oc.check_params(fn, params)
    if solver == "dense":
      _oc.check_dense(fn, params, max_bytes)
    dt = _checks.tree_float_dtype(params)
    return NaturalGradientState(
        count=jnp.zeros((), jnp.int32), damping=_oc.initial_damping(damping, dt),
        cg_iterations=jnp.zeros((), jnp.int32), cg_residual=_oc.scalar(0.0, dt),
        negative_curvature=jnp.zeros((), bool), fallback=jnp.zeros((), bool),
        cg_status=jnp.full((), CGStatus.CONVERGED, jnp.int32),
        rho=_oc.scalar(jnp.nan, dt), rejected=jnp.zeros((), bool))

  def update_fn(grads, state, params=None, **extra_args):
    objective_u, inputs, targets = _oc.update_problem(fn, objective, grads, params,
                                                      extra_args)
    obj_c, xc, tc = _oc.curvature_problem(fn, objective_u, params, inputs, targets,
                                          extra_args, curvature_fraction)
    if solver == "dense":
      _oc.check_dense(fn, params, max_bytes)
    dt = state.damping.dtype
    floor = jnp.asarray(min_damping, dt)
    d, fvp, lam, iters, resid, negative, status = _ng_direction(
        obj_c, solver, maxiter, tol, max_bytes, grads, params, xc, tc, state.damping, floor)
    ok = _checks.tree_all_finite(d) & (tree_vdot(grads, d) > 0)
    # The fallback is the gradient, unless it too is non-finite: then no step.
    fallback = _oc.where_tree(_checks.tree_all_finite(grads), grads,
                              _tmap(jnp.zeros_like, grads))
    d = _oc.where_tree(ok, d, fallback)
    lr = _oc.lr_at(learning_rate, state.count, dt)
    if adaptive:
      f0 = _oc.value_at(fn, objective_u, params, inputs, targets, extra_args)
      rho, accept, next_lam = _ng_accept(objective_u, params, inputs, targets, grads, d,
                                         fvp, lr, lam, floor, damping_factor, f0)
    else:
      rho, accept, next_lam = jnp.zeros((), dt), jnp.asarray(True), lam
    updates = _tmap(lambda u: jnp.where(accept, -lr * u, 0.0).astype(u.dtype), d)
    return updates, NaturalGradientState(
        count=state.count + 1, damping=next_lam.astype(dt),
        cg_iterations=iters.astype(jnp.int32),
        cg_residual=jnp.asarray(resid).astype(dt), negative_curvature=negative,
        fallback=~ok, cg_status=jnp.asarray(status, jnp.int32), rho=rho.astype(dt),
        rejected=~accept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
