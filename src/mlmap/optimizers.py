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

``hessian_free`` lives in :mod:`mlmap._hf` and ``nonlinear_cg`` in
:mod:`mlmap._ncg`; both are re-exported here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import cho_solve

from mlmap import _checks
from mlmap.curvature import fisher_vp_fn
from mlmap.dense import fisher_matrix, hessian_matrix
from mlmap.linalg import cg, tree_vdot
from mlmap.posterior import NegativeLogPosterior

_tmap = jax.tree_util.tree_map


# --- shared helpers (also used by mlmap._hf) -----------------------------------

def _get_batch(fn: str, params, extra_args):
  """The ``(inputs, targets)`` pair from the update's extra args, checked."""
  if params is None:
    raise ValueError(f"{fn}: tx.update needs params; call "
                     "tx.update(grads, state, params, batch=(inputs, targets)).")
  batch = extra_args.get("batch")
  if batch is None:
    raise ValueError(
        f"{fn}: the update needs the minibatch its objective is evaluated on; pass "
        f"batch=(inputs, targets) to tx.update(grads, state, params, "
        f"batch=(inputs, targets)) (got extra args {sorted(extra_args)}).")
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise ValueError(f"{fn}: batch must be a pair (inputs, targets), got "
                     f"{type(batch).__name__} of length "
                     f"{len(batch) if hasattr(batch, '__len__') else '?'}.")
  return batch[0], batch[1]


def _check_factor(fn: str, name: str, value) -> None:
  if not (np.ndim(value) == 0 and float(value) > 1.0):
    raise ValueError(f"{fn}: {name} must be a number > 1, got {value!r}.")


def _scalar(value, dtype):
  return jnp.asarray(value, dtype=dtype)  # explicit dtype: never weak-typed


def _lr_at(learning_rate, count, dtype):
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  return jnp.asarray(lr, dtype)


def _where_tree(pred, a, b):
  return _tmap(lambda x, y: jnp.where(pred, x, y), a, b)


def _noise(f0):
  """Rounding level of objective differences: below it a model is uninformative."""
  eps = jnp.finfo(jnp.result_type(f0)).eps
  return 10.0 * eps * (jnp.abs(f0) + 1.0)


def _reduction_ratio(f0, f1, predicted):
  r"""``rho = (f1 - f0) / predicted`` and whether to accept the step.

  ``predicted`` is the (negative) change of the quadratic model. A step is
  accepted when ``f1`` is finite and not above ``f0`` (up to rounding); when the
  model change is at rounding level, rho is 1 for an accepted step (converged:
  nothing to learn about the damping) and -inf otherwise.
  """
  noise = _noise(f0)
  accept = jnp.isfinite(f1) & jnp.isfinite(predicted) & (f1 <= f0 + noise)
  informative = predicted < -noise
  rho = (f1 - f0) / jnp.where(informative, predicted, -1.0)
  rho = jnp.where(informative, rho, jnp.where(accept, 1.0, -jnp.inf))
  rho = jnp.where(jnp.isfinite(f1), rho, -jnp.inf)
  return rho, accept


def _adapt_damping(damping, rho, accepted, factor, floor):
  """Levenberg-Marquardt rule: rho < 1/4 grows the damping, rho > 3/4 shrinks it.

  A rejected step (the loss rose) grows it by ``factor**3``: the step was far
  outside the region where the quadratic model holds, and every rejection
  costs a whole update.
  """
  cap = jnp.sqrt(jnp.finfo(jnp.result_type(damping)).max)
  grow = jnp.where(accepted, factor, factor ** 3)
  up = jnp.minimum(jnp.maximum(damping * grow, floor), cap)
  return jnp.where(rho < 0.25, up, jnp.where(rho > 0.75, damping / factor, damping))


def _damped_cholesky(h, damping, max_tries=40):
  r"""Cholesky factor of ``h + lam I``, growing ``lam`` from ``damping`` until PD.

  Nocedal & Wright (2006), Alg. 3.3: on failure ``lam <- max(10 lam, floor,
  -min_i h_ii + floor)`` with ``floor = 1e-6 mean|h_ii|``. A failed
  factorization shows up as NaN entries (jax's ``cholesky`` does not raise).

  Returns:
    ``(chol, lam, ok, floor)``; ``ok`` is False after ``max_tries`` failures
    (a non-finite ``h``).
  """
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  diag = jnp.diagonal(h)
  scale = jnp.mean(jnp.abs(diag))
  floor = 1e-6 * jnp.where(scale > 0, scale, 1.0)

  def factor(lam):
    chol = jnp.linalg.cholesky(h + lam * eye)
    return chol, jnp.all(jnp.isfinite(chol))

  def cond(c):
    return ~c[2] & (c[3] < max_tries)

  def body(c):
    lam = jnp.maximum(jnp.maximum(10.0 * c[1], floor), floor - jnp.min(diag))
    chol, ok = factor(lam)
    return chol, lam, ok, c[3] + 1

  chol0, ok0 = factor(damping)
  chol, lam, ok, _ = lax.while_loop(cond, body, (chol0, damping, ok0, 0))
  return chol, lam, ok, floor


# --- Newton --------------------------------------------------------------------

class NewtonState(NamedTuple):
  """State of :func:`newton`.

  Attributes:
    count: number of updates so far (int32).
    damping: Levenberg-Marquardt ``lambda`` for the next update.
    rho: reduction ratio of the last update (actual / predicted decrease);
      NaN when ``adaptive=False``.
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
           damping_factor=2.0):
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

  Args:
    objective: ``objective(params, inputs, targets) -> scalar``.
    learning_rate: ``eta >= 0``, a float or an optax schedule of the step count.
    damping: initial ``lambda >= 0`` (0: pure Newton while ``H`` is PD).
    adaptive: adapt ``lambda`` by ``rho`` and reject uphill steps.
    damping_factor: ``> 1``, the factor of the ``rho`` rule.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NewtonState`.

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
  _checks.check_nonnegative("damping", damping, fn)
  _check_factor(fn, "damping_factor", damping_factor)

  def init_fn(params):
    dt = _checks.tree_float_dtype(params)
    return NewtonState(count=jnp.zeros((), jnp.int32), damping=_scalar(damping, dt),
                       rho=_scalar(jnp.nan, dt), negative_curvature=jnp.zeros((), bool),
                       rejected=jnp.zeros((), bool))

  def update_fn(grads, state, params=None, **extra_args):
    inputs, targets = _get_batch(fn, params, extra_args)
    _checks.check_tree_like(fn, "grads", grads, params)
    flat_w, unravel = ravel_pytree(params)
    g = ravel_pytree(grads)[0].astype(flat_w.dtype)
    h = hessian_matrix(objective, params, inputs, targets)
    h = 0.5 * (h + h.T)
    lam_in = state.damping
    chol, lam, ok, floor = _damped_cholesky(h, lam_in)
    step = -_lr_at(learning_rate, state.count, g.dtype) * cho_solve((chol, True), g)
    finite = ok & jnp.all(jnp.isfinite(step))
    step = jnp.where(finite, step, 0.0)
    if adaptive:
      f0 = objective(params, inputs, targets)
      f1 = objective(unravel(flat_w + step), inputs, targets)
      predicted = g @ step + 0.5 * step @ (h @ step)
      rho, accept = _reduction_ratio(f0, f1, predicted)
      accept = accept & finite
      next_lam = _adapt_damping(lam, rho, accept, damping_factor, floor)
    else:
      rho, accept, next_lam = jnp.full((), jnp.nan, g.dtype), finite, lam_in
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
    damping: the damping ``lambda`` added to the Fisher.
    cg_iterations: CG iterations of the last solve (0 for ``solver="dense"``).
    cg_residual: ``||(F + lambda I) d - g||`` of the last solve.
    negative_curvature: CG met ``p^T (F + lambda I) p <= 0`` (rounding), or the
      dense factorization needed extra damping.
    fallback: the solve failed (non-finite or not a descent direction) and the
      plain gradient was used.
  """
  count: Any
  damping: Any
  cg_iterations: Any
  cg_residual: Any
  negative_curvature: Any
  fallback: Any


def natural_gradient(objective, learning_rate=1.0, damping=1e-3, *, solver="cg",
                     maxiter=100, tol=1e-6):
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

  Args:
    objective: a :class:`mlmap.NegativeLogPosterior` (``mm.negative_log_posterior``):
      the Fisher needs the model and the likelihood apart.
    learning_rate: ``eta >= 0``, a float or an optax schedule.
    damping: ``lambda >= 0`` (Tikhonov damping, fixed).
    solver: ``"cg"`` or ``"dense"``.
    maxiter: CG iterations per update (``solver="cg"``).
    tol: relative CG residual tolerance.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NaturalGradientState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.bernoulli_log_likelihood,
    ...                                 mm.gaussian_log_prior)
    >>> x, t = jnp.array([[1.0, 2.0], [1.0, -1.0], [1.0, 0.5]]), jnp.array([1.0, 0.0, 1.0])
    >>> tx = optax.chain(mm.natural_gradient(nlp), optax.scale(0.5))  # half steps
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
  if not isinstance(objective, NegativeLogPosterior):
    raise TypeError(
        f"{fn} needs a negative_log_posterior (mm.negative_log_posterior(apply_fn, "
        f"log_likelihood, ...)) to take a Fisher of its likelihood; got "
        f"{type(objective).__name__}. For a plain function use mm.newton or "
        "mm.hessian_free(..., curvature='hessian').")
  if solver not in ("cg", "dense"):
    raise ValueError(f"{fn}: solver must be one of ('cg', 'dense'), got {solver!r}.")
  _checks.check_nonnegative("learning_rate", learning_rate, fn)
  _checks.check_nonnegative("damping", damping, fn)
  _checks.check_nonnegative("tol", tol, fn)
  if int(maxiter) < 1:
    raise ValueError(f"{fn}: maxiter must be >= 1, got {maxiter!r}.")

  def init_fn(params):
    dt = _checks.tree_float_dtype(params)
    return NaturalGradientState(
        count=jnp.zeros((), jnp.int32), damping=_scalar(damping, dt),
        cg_iterations=jnp.zeros((), jnp.int32), cg_residual=_scalar(0.0, dt),
        negative_curvature=jnp.zeros((), bool), fallback=jnp.zeros((), bool))

  def update_fn(grads, state, params=None, **extra_args):
    inputs, targets = _get_batch(fn, params, extra_args)
    _checks.check_tree_like(fn, "grads", grads, params)
    lam = state.damping
    if solver == "cg":
      fvp = fisher_vp_fn(objective, params, inputs, targets)

      def matvec(v):
        fv = fvp(v)
        return _tmap(lambda a, b: a + lam.astype(b.dtype) * b, fv, v)
      d, info = cg(matvec, grads, maxiter=int(maxiter), tol=tol)
      iters, resid, negative = info.iterations, info.residual_norm, info.negative_curvature
    else:
      g, unravel = ravel_pytree(grads)
      f = fisher_matrix(objective, params, inputs, targets)
      chol, lam_used, _, _ = _damped_cholesky(0.5 * (f + f.T), lam)
      x = cho_solve((chol, True), g)
      d = unravel(x)
      iters = jnp.zeros((), jnp.int32)
      resid = jnp.linalg.norm(f @ x + lam * x - g)
      negative = lam_used > lam
    ok = _checks.tree_all_finite(d) & (tree_vdot(grads, d) > 0)
    d = _where_tree(ok, d, grads)
    lr = _lr_at(learning_rate, state.count, lam.dtype)
    updates = _tmap(lambda u: (-lr * u).astype(u.dtype), d)
    return updates, NaturalGradientState(
        count=state.count + 1, damping=lam, cg_iterations=iters.astype(jnp.int32),
        cg_residual=jnp.asarray(resid).astype(lam.dtype), negative_curvature=negative,
        fallback=~ok)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


from mlmap._hf import HessianFreeState, hessian_free  # noqa: E402  (re-export)
from mlmap._ncg import NonlinearCGState, nonlinear_cg  # noqa: E402  (re-export)
