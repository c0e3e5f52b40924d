r"""K-FAC (Martens & Grosse 2015) as an optax transformation (private).

Re-exported as ``mlmap.kfac``. The factors come from :func:`mlmap.kron.kron_factors`
(the 'expand' K-FAC of the GGN with the exact output-side factor); the helpers
shared with the other optimizers come from :mod:`mlmap._optim_common`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mlmap import _checks
from mlmap import _layers
from mlmap import _optim_common as _oc
from mlmap import kron
from mlmap import laplace as _laplace
from mlmap import priors as _priors
from mlmap.curvature import ggn_quadratic_forms
from mlmap.linalg import tree_vdot
from mlmap.posterior import is_negative_log_posterior

_tmap = jax.tree_util.tree_map
_HIGHEST = lax.Precision.HIGHEST
_DAMPING_TYPES = ("factored", "exact")


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST)


# --- state ------------------------------------------------------------------------

class KFACState(NamedTuple):
  """State of :func:`kfac`.

  Per-layer tuples follow ``factors.layout.layers`` of :func:`mlmap.kron.kron_factors`;
  the factor fields are ``None`` until the first update when ``kfac`` was built
  without ``example_inputs`` (the layer layout is not known before then).

  Attributes:
    count: number of updates so far (int32).
    damping: Tikhonov ``lambda`` for the next update (NaN before the first
      update with ``damping="auto"``).
    rho: reduction ratio of the last update (NaN before the first update, 0
      when ``adaptive=False``; finite, as ``mm.make_train_step`` requires).
    rejected: the last step was not taken (loss rose, or a non-finite step).
    nonfinite: the last gradient or preconditioned direction was non-finite
      (zero update).
    A: per layer the running average of :math:`A_l`, ``(in(+1), in(+1))``.
    G: per layer the running average of :math:`G_l`, ``(out, out)``.
    diagonal: per uncovered leaf the running average of its GGN diagonal.
    a_eigvals, a_eigvecs, g_eigvals, g_eigvecs: ``eigh`` of ``A`` and ``G``,
      refreshed every ``inverse_every`` updates.
    velocity: the last update taken (zeros after a rejected step).
    alpha, mu: step coefficients of the last update (``delta = alpha Delta + mu
      delta_0``; ``alpha = learning_rate``, ``mu = 0`` when ``adaptive=False``).
  """
  count: Any
  damping: Any
  rho: Any
  rejected: Any
  nonfinite: Any
  A: Any
  G: Any
  diagonal: Any
  a_eigvals: Any
  a_eigvecs: Any
  g_eigvals: Any
  g_eigvecs: Any
  velocity: Any
  alpha: Any
  mu: Any


def _allocate(objective, params, example_inputs):
  """Zero factors and identity eigenbases for the layout traced on ``example_inputs``."""
  traced = _layers.trace_model(objective.apply_fn, params, example_inputs)
  leaves = jax.tree_util.tree_leaves(params)
  dt = _checks.tree_float_dtype(params)
  dims = [l.in_dim + (l.bias is not None) for l in traced.layers]
  outs = [l.out_dim for l in traced.layers]
  return dict(
      A=tuple(jnp.zeros((d, d), dt) for d in dims),
      G=tuple(jnp.zeros((o, o), dt) for o in outs),
      diagonal=tuple(jnp.zeros(jnp.shape(leaves[j]), dt) for j in traced.uncovered),
      a_eigvals=tuple(jnp.zeros((d,), dt) for d in dims),
      a_eigvecs=tuple(jnp.eye(d, dtype=dt) for d in dims),
      g_eigvals=tuple(jnp.zeros((o,), dt) for o in outs),
      g_eigvecs=tuple(jnp.eye(o, dtype=dt) for o in outs))


# --- prior -------------------------------------------------------------------------

def _prior_precisions(fn, objective, params):
  """``1/sigma^2`` per leaf for a Gaussian prior (``None`` sigma: 0); zeros otherwise."""
  leaves = jax.tree_util.tree_leaves(params)
  lp = objective.log_prior
  found = None if lp is None else _laplace._builtin_prior(lp)
  if found is None or found[0] is not _priors.gaussian_log_prior:
    return tuple(jnp.zeros((), jnp.result_type(w)) for w in leaves)
  out = []
  for _, w, s in _priors._scaled_leaves(fn, "sigma", found[1].get("sigma", 1.0), params):
    dt = jnp.result_type(w)
    out.append(jnp.zeros((), dt) if s is None else 1.0 / jnp.square(jnp.asarray(s, dt)))
  return tuple(out)


def _layer_eta(layer, etas):
  """One scalar prior precision for the layer's block, or 0 (then only damping)."""
  dw = etas[layer.weight_index]
  if jnp.ndim(dw) != 0:
    return jnp.zeros((), dw.dtype)
  if layer.bias is None:
    return dw
  db = etas[layer.bias_index]
  if jnp.ndim(db) != 0:
    return jnp.zeros((), dw.dtype)
  return jnp.where(dw == db, dw, 0.0)


# --- factors, eigenbases, direction -----------------------------------------------

def _running_factors(state, new, decay):
  """EMA of the factors; the first update takes ``new``; non-finite ``new`` is skipped."""
  fresh = (tuple(new.A), tuple(new.G), tuple(new.diagonal))
  old = (state.A, state.G, state.diagonal)
  if state.A is None:
    old = _tmap(jnp.zeros_like, fresh)
  first = state.count == 0
  ema = _tmap(lambda o, x: jnp.where(first, x, decay * o + (1 - decay) * x), old, fresh)
  ok = _checks.tree_all_finite(fresh)
  return _oc.where_tree(ok, ema, old)


def _eigh_all(a_list, g_list):
  a = [jnp.linalg.eigh(0.5 * (m + m.T)) for m in a_list]
  g = [jnp.linalg.eigh(0.5 * (m + m.T)) for m in g_list]
  return (tuple(x[0] for x in a), tuple(x[1] for x in a),
          tuple(x[0] for x in g), tuple(x[1] for x in g))


def _refresh_eigh(state, a_list, g_list, inverse_every):
  """``eigh`` of the factors at multiples of ``inverse_every`` (always at count 0)."""
  if state.a_eigvals is None:
    old = _tmap(jnp.zeros_like, jax.eval_shape(_eigh_all, a_list, g_list))
  else:
    old = (state.a_eigvals, state.a_eigvecs, state.g_eigvals, state.g_eigvecs)

  def refresh(_):
    new = _eigh_all(a_list, g_list)
    return _oc.where_tree(_checks.tree_all_finite(new), new, old)
  return lax.cond(state.count % inverse_every == 0, refresh, lambda _: old, None)


def _pi(a_eig, g_eig):
  r""":math:`\pi = \sqrt{(\mathrm{tr}A/\dim A) / (\mathrm{tr}G/\dim G)}` (1 if either is 0)."""
  ta, tg = jnp.mean(a_eig), jnp.mean(g_eig)
  ok = (ta > 0) & (tg > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1.0), 1.0)), 1.0)


def _direction(layout, grads, eig, diagonal, lam, etas, damping_type):
  r"""``Delta = -(K-FAC + damping)^{-1} g``, leaf by leaf (see :func:`kfac`)."""
  g_leaves, treedef = jax.tree_util.tree_flatten(grads)
  out = list(g_leaves)
  for l, layer in enumerate(layout.layers):
    b_leaf = None if layer.bias is None else g_leaves[layer.bias_index]
    m = kron._to_matrix(layer, g_leaves[layer.weight_index], b_leaf)
    a, g = jnp.maximum(eig[0][l], 0), jnp.maximum(eig[2][l], 0)
    qa, qg = eig[1][l], eig[3][l]
    c = lam + _layer_eta(layer, etas)
    if damping_type == "exact":
      den = jnp.outer(a, g) + c
    else:
      pi, s = _pi(a, g), jnp.sqrt(c)
      den = jnp.outer(a + pi * s, g + s / pi)
    v = _dot(qa, _dot(_dot(_dot(qa.T, m.astype(qa.dtype)), qg) / den, qg.T))
    w, b = kron._from_matrix(layer, -v, g_leaves[layer.weight_index], b_leaf)
    out[layer.weight_index] = w
    if b is not None:
      out[layer.bias_index] = b
  for k, j in enumerate(layout.uncovered_index):
    d = diagonal[k] + lam + etas[j]
    out[j] = (-g_leaves[j] / d).astype(jnp.result_type(g_leaves[j]))
  return jax.tree_util.tree_unflatten(treedef, out)


def _auto_damping(a_list, g_list, diagonal, min_damping, dtype):
  r"""Mean diagonal of the K-FAC blocks, :math:`\mathrm{mean}_l (\mathrm{tr}A_l/\dim)
  (\mathrm{tr}G_l/\dim)` (of the uncovered diagonals when there are no layers)."""
  if a_list:
    vals = jnp.stack([jnp.mean(jnp.diagonal(a)) * jnp.mean(jnp.diagonal(g))
                      for a, g in zip(a_list, g_list)])
  elif diagonal:
    vals = jnp.concatenate([jnp.ravel(d) for d in diagonal])
  else:
    vals = jnp.ones((1,), dtype)
  lam = jnp.mean(vals).astype(dtype)
  return jnp.where(jnp.isfinite(lam), jnp.maximum(lam, min_damping), 1.0).astype(dtype)


# --- the adaptive step (Sec. 7) ---------------------------------------------------

def _solve_alpha_mu(m11, m12, m22, b1, b2, use_mu):
  r"""Minimize :math:`\tfrac12 x^\top M x + b^\top x` over ``x = (alpha, mu)``.

  Falls back to ``alpha`` alone (``mu = 0``) without momentum, or when the 2x2
  system is singular, indefinite or gives a non-finite or non-descent result.
  """
  eps = jnp.finfo(m11.dtype).eps
  alpha1 = jnp.where(m11 > 0, -b1 / jnp.where(m11 > 0, m11, 1.0), 0.0)
  det = m11 * m22 - m12 * m12
  pd = use_mu & (m11 > 0) & (m22 > 0) & (det > 1e3 * eps * m11 * m22)
  safe = jnp.where(pd, det, 1.0)
  alpha2, mu2 = (-b1 * m22 + b2 * m12) / safe, (-b2 * m11 + b1 * m12) / safe
  value2 = 0.5 * (alpha2 * b1 + mu2 * b2)
  ok = pd & jnp.isfinite(alpha2) & jnp.isfinite(mu2) & (value2 < 0)
  alpha1 = jnp.where(jnp.isfinite(alpha1), alpha1, 0.0)
  return jnp.where(ok, alpha2, alpha1), jnp.where(ok, mu2, 0.0)


def _adaptive_coefficients(objective_c, params, xc, tc, grads, delta, delta0, lam):
  """``(alpha, mu, quad)``: the Sec. 7 coefficients and the undamped model pieces."""
  c = ggn_quadratic_forms(objective_c, params, xc, tc, [delta, delta0])
  c11, c12, c22 = c[0, 0], c[0, 1], c[1, 1]
  n11, n12 = tree_vdot(delta, delta), tree_vdot(delta, delta0)
  n22 = tree_vdot(delta0, delta0)
  b1, b2 = tree_vdot(grads, delta), tree_vdot(grads, delta0)
  alpha, mu = _solve_alpha_mu(c11 + lam * n11, c12 + lam * n12, c22 + lam * n22,
                              b1, b2, n22 > 0)
  return alpha, mu, (c11, c12, c22, b1, b2)


def _model_change(coef, quad):
  """Undamped ``g.d + d^T B d / 2`` at ``d = a Delta + m delta_0``."""
  (a, m), (c11, c12, c22, b1, b2) = coef, quad
  return a * b1 + m * b2 + 0.5 * (a * a * c11 + 2 * a * m * c12 + m * m * c22)


# --- the transformation ---------------------------------------------------------

def _check_args(fn, objective, learning_rate, damping, decay, damping_type,
                damping_factor, min_damping, curvature_fraction, mc_samples):
  if not is_negative_log_posterior(objective):
    raise TypeError(
        f"{fn} needs a negative_log_posterior (mm.negative_log_posterior(apply_fn, "
        f"log_likelihood, log_prior)) to find the layers of its model and the GGN "
        f"of its likelihood; got {type(objective).__name__}. For a plain function "
        "use mm.newton or mm.hessian_free(..., curvature='hessian').")
  _checks.check_nonnegative("learning_rate", learning_rate, fn)
  _oc.check_damping(fn, damping)
  if _checks.is_concrete(decay) and not (np.ndim(decay) == 0 and 0.0 <= float(decay) < 1.0):
    raise ValueError(f"{fn}: decay must lie in [0, 1), got {decay!r}.")
  if damping_type not in _DAMPING_TYPES:
    raise ValueError(f"{fn}: damping_type must be one of {_DAMPING_TYPES}, got "
                     f"{damping_type!r}.")
  _oc.check_factor(fn, "damping_factor", damping_factor)
  _checks.check_nonnegative("min_damping", min_damping, fn)
  _oc.check_fraction(fn, curvature_fraction)
  if mc_samples is not None:
    _oc.check_count(fn, "mc_samples", mc_samples)


def kfac(objective, learning_rate=1.0, damping="auto", *, decay=0.95, inverse_every=20,
         damping_type="factored", adaptive=True, damping_factor=1.5, min_damping=1e-8,
         curvature_fraction=None, example_inputs=None, mc_samples=None):
  r"""K-FAC: natural gradient with a Kronecker-factored GGN (Martens & Grosse 2015).

  Each layer ``l`` (found in the traced model, :mod:`mlmap.kron`) gets the block
  :math:`A_l \otimes G_l` of the GGN, every other leaf its exact GGN diagonal
  ``h``. The factors are running averages over updates,
  :math:`F \leftarrow \beta F + (1-\beta) F_{new}` (``beta = decay``; the first
  update takes :math:`F_{new}`), of :func:`mlmap.kron.kron_factors` on the
  curvature batch, scaled to ``num_data``. Their eigendecompositions
  :math:`A = Q_A \mathrm{diag}(a) Q_A^\top`, :math:`G = Q_G \mathrm{diag}(g) Q_G^\top`
  are refreshed every ``inverse_every`` updates (stale in between). With
  :math:`\tilde W` the gradient of a layer as an ``(in(+1), out)`` matrix, the
  preconditioned direction is :math:`\Delta = -\tilde V`,

  .. math::
    \text{exact: } \tilde V = Q_A\Big[\frac{Q_A^\top \tilde W Q_G}
      {a g^\top + \lambda + \eta}\Big] Q_G^\top, \qquad
    \text{factored: } \tilde V = (A + \pi\sqrt{\lambda+\eta}\, I)^{-1}\,\tilde W\,
      (G + \tfrac{\sqrt{\lambda+\eta}}{\pi} I)^{-1},

  :math:`\pi = \sqrt{(\mathrm{tr}A/\dim A)/(\mathrm{tr}G/\dim G)}` (Sec. 6.3),
  and :math:`\Delta = -g/(h + \lambda + \eta)` for an uncovered leaf. ``eta`` is
  the prior precision :math:`1/\sigma^2` of a ``functools.partial(
  mm.gaussian_log_prior, sigma=...)`` prior when the layer's weight and bias share
  one scalar value (per-entry or unequal scales: ``eta = 0`` on that block, the
  prior enters through ``lambda`` only; uncovered leaves take per-entry values).
  For any other prior ``eta = 0``.

  ``adaptive=False``: the update is :math:`\eta_t \Delta` (``eta_t =
  learning_rate``, a float or optax schedule), ``lambda`` fixed. ``adaptive=True``
  (Sec. 7): with :math:`\delta_0` the previous update and ``B`` the exact GGN
  with the prior Hessian (:func:`mlmap.ggn_vp` on the curvature batch),

  .. math::
    (\alpha, \mu) = \arg\min\ g^\top\delta + \tfrac12 \delta^\top (B + \lambda I)\delta,
    \qquad \delta = \alpha\Delta + \mu\delta_0

  (a 2x2 solve; ``alpha`` alone on the first step, after a rejection, or when
  the 2x2 system is singular), the update is :math:`\eta_t \delta`, and
  ``lambda`` follows the Levenberg-Marquardt rule on
  :math:`\rho = (f(w+\delta) - f(w)) / (g^\top\delta + \tfrac12 \delta^\top B \delta)`
  (on the gradient batch): ``rho < 1/4`` grows it by ``damping_factor``,
  ``rho > 3/4`` shrinks it; a step that raises the loss is rejected (zero
  update, ``lambda`` times ``damping_factor**3``). ``damping="auto"`` starts from
  the mean diagonal of the K-FAC blocks,
  :math:`\mathrm{mean}_l (\mathrm{tr}A_l/\dim A_l)(\mathrm{tr}G_l/\dim G_l)`,
  floored at ``min_damping``. Non-finite gradients or directions give a zero
  update (``state.nonfinite``), never NaN.

  Cost per update: one :func:`mlmap.kron.kron_factors` pass on the curvature
  batch (a forward pass and ``O`` backward passes, ``O`` outputs per example,
  or ``mc_samples`` of them;
  plus the exact diagonal of the uncovered leaves), ``O(in^3 + out^3)`` per
  layer every ``inverse_every`` updates for ``eigh``, ``O(in^2 out + in out^2)``
  per layer for the direction; ``adaptive=True`` adds two GGN-vector products and
  two forward passes.

  Layout: the state's factor shapes depend on the layers found in the model.
  With ``example_inputs`` (any batch of the inputs' shape) ``init`` allocates
  them, so the state keeps one structure (needed in ``lax.scan`` /
  ``fori_loop``). Without it ``init`` leaves the factor fields ``None`` and the
  first update fills them: a jitted step then traces twice, once for the first
  update.

  Args:
    objective: a :class:`mlmap.NegativeLogPosterior`.
    learning_rate: ``eta_t >= 0``, a float or an optax schedule of the count.
    damping: ``lambda >= 0`` or ``"auto"``.
    decay: ``beta`` in [0, 1) of the factors' running average.
    inverse_every: refresh period of the eigendecompositions, an int >= 1.
    damping_type: ``"factored"`` (Sec. 6.3) or ``"exact"``.
    adaptive: the Sec. 7 step and Levenberg-Marquardt damping.
    damping_factor: ``> 1``, factor of the damping rule.
    min_damping: floor of the damping (grown from 0; and of ``"auto"``).
    curvature_fraction: ``None`` (the curvature on the whole batch) or the
      fraction in (0, 1] of the batch's first examples used for it; a
      ``curvature_batch=(inputs, targets)`` extra arg overrides both.
    example_inputs: inputs to trace the model on in ``init`` (shapes only).
    mc_samples: ``None`` (the exact output factor: one backward pass per model
      output, e.g. 784 for a 28x28 autoencoder) or ``S >= 1``: ``G`` from ``S``
      backward passes with targets sampled from the model (Sec. 5; key
      ``fold_in(PRNGKey(0), count)``), an unbiased estimate; built-in
      likelihoods only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`KFACState`; call
    ``tx.update(grads, state, params, batch=(x, y))`` (optionally
    ``curvature_batch=(xc, yc)``).

  Raises:
    TypeError: ``objective`` is not a negative log-posterior, or ``params`` has
      a non-floating leaf.
    ValueError: a bad argument (named with its value), ``grads`` not shaped like
      ``params``, or an objective that is not scalar on the batch.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, optax, mlmap as mm
    >>> nlp = mm.negative_log_posterior(
    ...     lambda p, x: x @ p["w"] + p["b"],
    ...     functools.partial(mm.gaussian_log_likelihood, sigma=0.5), mm.gaussian_log_prior)
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (16, 3)); y = x @ jnp.ones((3, 2))
    >>> p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> tx = mm.kfac(nlp, example_inputs=x); state = tx.init(p)
    >>> u, state = tx.update(jax.grad(nlp)(p, x, y), state, p, batch=(x, y))
    >>> bool(nlp(optax.apply_updates(p, u), x, y) < nlp(p, x, y)), state.A[0].shape
    (True, (4, 4))

  References:
    Martens and Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015, https://arxiv.org/abs/1503.05671.
  """
  fn = "kfac"
  _check_args(fn, objective, learning_rate, damping, decay, damping_type,
              damping_factor, min_damping, curvature_fraction, mc_samples)
  if mc_samples is not None:
    mc_samples = int(mc_samples)
  inverse_every = _oc.check_count(fn, "inverse_every", inverse_every)
  if example_inputs is not None and objective.has_state:
    raise ValueError(f"{fn}: example_inputs cannot trace a model with state "
                     "(has_state=True) before its state is known; build mm.kfac(nlp) "
                     "without it: the factors are allocated at the first update.")

  def init_fn(params):
    _oc.check_params(fn, params)
    dt = _checks.tree_float_dtype(params)
    if example_inputs is not None:
      fields = _allocate(objective, params, example_inputs)
    else:
      fields = dict.fromkeys(("A", "G", "diagonal", "a_eigvals", "a_eigvecs",
                              "g_eigvals", "g_eigvecs"))
    return KFACState(
        count=jnp.zeros((), jnp.int32), damping=_oc.initial_damping(damping, dt),
        rho=_oc.scalar(jnp.nan, dt), rejected=jnp.zeros((), bool),
        nonfinite=jnp.zeros((), bool), velocity=_tmap(jnp.zeros_like, params),
        alpha=_oc.scalar(0.0, dt), mu=_oc.scalar(0.0, dt), **fields)

  def update_fn(grads, state, params=None, **extra_args):
    objective_u, inputs, targets = _oc.update_problem(fn, objective, grads, params,
                                                      extra_args)
    obj_c, xc, tc = _oc.curvature_problem(fn, objective_u, params, inputs, targets,
                                          extra_args, curvature_fraction)
    if mc_samples is None:
      new = kron.kron_factors(obj_c, params, xc, tc)
    else:
      key = jax.random.fold_in(jax.random.PRNGKey(0), state.count)
      new = kron.kron_factors(obj_c, params, xc, tc, key=key, num_samples=mc_samples)
    layout = new.layout
    _check_state_layout(fn, state, layout)
    dt = state.damping.dtype
    a_list, g_list, diagonal = _running_factors(state, new, decay)
    eig = _refresh_eigh(state, a_list, g_list, inverse_every)
    lam = jnp.where(jnp.isnan(state.damping),
                    _auto_damping(a_list, g_list, diagonal, min_damping, dt), state.damping)
    etas = _prior_precisions(fn, objective_u, params)
    delta = _direction(layout, grads, eig, diagonal, lam, etas, damping_type)
    finite = _checks.tree_all_finite(grads) & _checks.tree_all_finite(delta)
    delta = _oc.where_tree(finite, delta, _tmap(jnp.zeros_like, delta))
    lr = _oc.lr_at(learning_rate, state.count, dt)
    if adaptive:
      alpha, mu, quad = _adaptive_coefficients(obj_c, params, xc, tc, grads, delta,
                                               state.velocity, lam)
      alpha, mu = (lr * alpha).astype(dt), (lr * mu).astype(dt)
    else:
      alpha, mu = lr, jnp.zeros((), dt)
    step = _tmap(lambda d, v: (alpha * d + mu * v).astype(d.dtype), delta, state.velocity)
    finite = finite & _checks.tree_all_finite(step)
    step = _oc.where_tree(finite, step, _tmap(jnp.zeros_like, step))
    if adaptive:
      f0 = _oc.value_at(fn, objective_u, params, inputs, targets, extra_args)
      f1 = objective_u(optax.apply_updates(params, step), inputs, targets)
      rho, accept = _oc.reduction_ratio(f0, f1, _model_change((alpha, mu), quad))
      rho = jnp.where(finite, rho, -jnp.finfo(dt).max)
      accept = accept & finite
      floor = jnp.asarray(min_damping, dt)
      next_lam = _oc.adapt_damping(lam, rho, accept, damping_factor, floor)
      next_lam = jnp.where(_checks.tree_all_finite(grads), next_lam, lam)
    else:
      rho, accept, next_lam = jnp.zeros((), dt), finite, lam
    updates = _oc.where_tree(accept, step, _tmap(jnp.zeros_like, step))
    return updates, KFACState(
        count=state.count + 1, damping=next_lam.astype(dt), rho=rho.astype(dt),
        rejected=~accept, nonfinite=~finite, A=a_list, G=g_list, diagonal=diagonal,
        a_eigvals=eig[0], a_eigvecs=eig[1], g_eigvals=eig[2], g_eigvecs=eig[3],
        velocity=updates, alpha=jnp.asarray(alpha, dt), mu=jnp.asarray(mu, dt))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state_layout(fn, state, layout):
  """A state allocated from ``example_inputs`` must match the layers found now."""
  if state.A is None:
    return
  want = [(l.in_dim + (l.bias is not None), l.out_dim) for l in layout.layers]
  have = [(a.shape[0], g.shape[0]) for a, g in zip(state.A, state.G)]
  if want != have or len(state.diagonal) != len(layout.uncovered_index):
    raise ValueError(
        f"{fn}: the state was allocated for layers (A, G sizes) {have} and "
        f"{len(state.diagonal)} uncovered leaves, but the model on this batch has "
        f"{want} and {len(layout.uncovered_index)}; pass example_inputs of the "
        "batch's shape (or none) to kfac.")
