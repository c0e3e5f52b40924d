"""Nonlinear conjugate gradients (Polak-Ribiere+) as an optax transformation.

Re-exported as ``mlmap.nonlinear_cg``; shares its helpers with
:mod:`mlmap.optimizers` through :mod:`mlmap._optim_common`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import optax

from mlmap import _checks
from mlmap import _optim_common as _oc
from mlmap.linalg import tree_vdot

_tmap = jax.tree_util.tree_map


class NonlinearCGState(NamedTuple):
  """State of :func:`nonlinear_cg`.

  Attributes:
    count: number of updates so far (int32).
    direction: the last search direction ``d`` (pytree like params).
    prev_grad: the gradient at the last update.
    restarted: the last direction was reset to steepest descent.
    rejected: the line search found no decrease and the step was not taken.
    linesearch: optax's zoom line-search state (``learning_rate`` = last step
      length ``alpha``, ``info.num_linesearch_steps``).
  """
  count: Any
  direction: Any
  prev_grad: Any
  restarted: Any
  rejected: Any
  linesearch: Any


def nonlinear_cg(objective, *, restart_every=None, max_linesearch_steps=30,
                 c1=1e-4, c2=0.1):
  r"""Nonlinear conjugate gradients, Polak-Ribiere+, with a strong-Wolfe line search.

  .. math::
    \beta_k = \max\!\Big(0,\ \frac{g_k^\top (g_k - g_{k-1})}{g_{k-1}^\top g_{k-1}}\Big),
    \qquad d_k = -g_k + \beta_k d_{k-1},\qquad \Delta w = \alpha_k d_k

  with ``alpha_k`` from optax's zoom line search (Nocedal & Wright Alg. 3.5-3.6)
  satisfying the strong Wolfe conditions
  :math:`f(w + \alpha d) \le f(w) + c_1 \alpha g^\top d` and
  :math:`|\nabla f(w + \alpha d)^\top d| \le c_2 |g^\top d|`. The direction
  restarts at ``-g`` every ``restart_every`` updates (default: the number of
  parameters), when ``beta`` is clipped to 0 (the "+"), and whenever ``d`` is not
  a descent direction. Each update evaluates the objective once at ``w`` and
  ``f``, ``grad f`` once per line-search step. A step the line search cannot make
  decrease the loss is rejected (zero update, next direction ``-g``).

  Args:
    objective: ``objective(params, inputs, targets) -> scalar``.
    restart_every: restart period (int >= 1) or None (number of parameters).
    max_linesearch_steps: line-search budget per update, an integer >= 1.
    c1: sufficient-decrease constant, ``0 < c1 < c2``.
    c2: curvature constant, ``< 1``; 0.1 is usual for CG (Nocedal & Wright).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`NonlinearCGState`.

  Raises:
    ValueError: at trace time, when the objective is not scalar on the batch
      or ``grads`` is not shaped like ``params``.
    TypeError: when ``params`` has a non-floating leaf (named by its path).

  References:
    Polak & Ribiere, 1969; Nocedal & Wright, "Numerical Optimization", 2006,
    Sec. 5.2 (PR+, restarts) and Alg. 3.5-3.6 (zoom line search).
  """
  fn = "nonlinear_cg"
  if not callable(objective):
    raise TypeError(f"{fn}: objective must be callable, got {type(objective).__name__}.")
  if not 0.0 < c1 < c2 < 1.0:
    raise ValueError(f"{fn}: need 0 < c1 < c2 < 1, got c1={c1!r}, c2={c2!r}.")
  if restart_every is not None:
    restart_every = _oc.check_count(fn, "restart_every (or None)", restart_every)
  max_linesearch_steps = _oc.check_count(fn, "max_linesearch_steps", max_linesearch_steps)
  ls = optax.scale_by_zoom_linesearch(
      max_linesearch_steps=max_linesearch_steps, slope_rtol=c1, curv_rtol=c2,
      initial_guess_strategy="keep")

  def _strong(tree):  # weak-typed leaves would retrace the user's jit once
    return _tmap(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)

  def init_fn(params):
    _oc.check_params(fn, params)
    zeros = _tmap(jnp.zeros_like, params)
    return NonlinearCGState(
        count=jnp.zeros((), jnp.int32), direction=zeros, prev_grad=zeros,
        restarted=jnp.ones((), bool), rejected=jnp.zeros((), bool),
        linesearch=_strong(ls.init(params)))

  def update_fn(grads, state, params=None, **extra_args):
    objective_u, inputs, targets = _oc.update_problem(fn, objective, grads, params,
                                                      extra_args)
    period = (sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
              if restart_every is None else restart_every)
    gg_prev = tree_vdot(state.prev_grad, state.prev_grad)
    beta = tree_vdot(grads, _tmap(jnp.subtract, grads, state.prev_grad))
    beta = jnp.maximum(beta / jnp.where(gg_prev > 0, gg_prev, 1.0), 0.0)
    restart = (state.count % period == 0) | ~(gg_prev > 0) | state.rejected
    beta = jnp.where(restart, 0.0, beta)
    d = _tmap(lambda g, p: -g + beta.astype(g.dtype) * p, grads, state.direction)
    descent = tree_vdot(grads, d) < 0
    d = _oc.where_tree(descent, d, _tmap(jnp.negative, grads))

    def value_fn(p):
      return objective_u(p, inputs, targets)

    f0 = value_fn(params)
    updates, ls_state = ls.update(d, state.linesearch, params, value=f0,
                                  grad=grads, value_fn=value_fn)
    accept = (jnp.isfinite(ls_state.value) & (ls_state.value < f0)
              & _checks.tree_all_finite(updates))
    updates = _oc.where_tree(accept, updates, _tmap(jnp.zeros_like, updates))
    ls_state = _tmap(lambda n, o: jnp.where(accept, n, o).astype(o.dtype),
                     ls_state, state.linesearch)
    return updates, NonlinearCGState(
        count=state.count + 1, direction=d, prev_grad=grads,
        restarted=restart | (beta == 0) | ~descent, rejected=~accept,
        linesearch=ls_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
