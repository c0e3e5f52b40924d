"""Evidence maximization on a structured Laplace posterior, over a data loader.

The scalable branch of :func:`mlmap.maximize_evidence` (``structure`` other
than the plain dense one, or ``subset`` / ``data``). Each outer iteration

1. refits the weights by ``fit_steps`` steps of any optax transformation
   (default :func:`mlmap.hessian_free`) on minibatches taken in turn from
   ``data``, the optimizer state carried over;
2. builds the structured posterior there (:func:`mlmap.laplace` with the same
   ``structure`` / ``subset`` / ``data``: nothing ``P x P`` unless
   ``structure="full"``);
3. takes MacKay's fixed-point step for the prior scales and the Gaussian noise,
   whose traces come from the stored structure in ``O(P)``.

With prior precisions :math:`\\alpha_g = \\sigma_g^{-2}` on groups ``g``
(the scalar entries of the prior-scale prefix tree) and :math:`\\Lambda = H + D`:

.. math::
  \\gamma_g = n_g - \\alpha_g \\operatorname{tr}_g(\\Lambda^{-1}),\\qquad
  \\sigma_g^2 \\leftarrow \\frac{\\|w_g\\|^2}{\\gamma_g},\\qquad
  \\sigma^2 \\leftarrow \\frac{\\mathrm{SSE}}{N O - \\sum_g \\gamma_g}

where :math:`\\alpha_g \\operatorname{tr}_g(\\Lambda^{-1}) =
\\partial(-\\tfrac12\\log\\det\\Lambda)/\\partial\\log\\sigma_g` and
:math:`\\alpha_g\\|w_g\\|^2 - n_g = \\partial\\log p(w)/\\partial\\log\\sigma_g`
are read off by autodiff of the structure's closed-form log-determinant and of
the Gaussian log prior (``n_g`` from the same derivative at ``w = 0``), so any
structure, any prefix tree and any subset use one code path.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

from mlmap import _evidence_terms as _terms
from mlmap import _hf
from mlmap import _precisions
from mlmap import data as _data
from mlmap import priors as _priors
from mlmap import laplace_structured as _ls

_CALL = "maximize_evidence"


def _cycle(data):
  """The batches of ``data``, again and again (a fresh pass each time round)."""
  for _ in itertools.count():
    empty = True
    for batch in _data._batches(_CALL, data):
      empty = False
      yield batch
    if empty:
      raise ValueError(f"{_CALL}: data has no batches.")


def _refit_step(make_nlp, make_optimizer):
  """One jitted optimizer step on a minibatch, traced in the hyperparameters."""
  @jax.jit
  def step(hyper, params, state, inputs, targets):
    nlp = make_nlp(hyper)
    tx = optax.with_extra_args_support(make_optimizer(nlp))
    grads = jax.grad(nlp)(params, inputs, targets)
    updates, state = tx.update(grads, state, params, batch=(inputs, targets))
    return optax.apply_updates(params, updates), state
  return step


def _groups_terms(post, sigma):
  """``(n_g, alpha_g ||w_g||^2, alpha_g tr_g(Lambda^{-1}))``, each a tree like ``sigma``."""
  log_s = jax.tree_util.tree_map(jnp.log, sigma)

  def log_prior(ls, mean):
    scale = post._sub_sigma(_CALL, jax.tree_util.tree_map(jnp.exp, ls))
    return _priors.gaussian_log_prior(mean, scale)

  def neg_half_logdet(ls):
    prec = post._leaf_prec(_CALL, jax.tree_util.tree_map(jnp.exp, ls))
    return -0.5 * _precisions.logdet(post.precision, prec)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, post.sub_mean)
  n = jax.tree_util.tree_map(jnp.negative, jax.grad(log_prior)(log_s, zeros))
  a = jax.tree_util.tree_map(jnp.add, jax.grad(log_prior)(log_s, post.sub_mean), n)
  b = jax.grad(neg_half_logdet)(log_s)
  return n, a, b


@jax.jit
def _prior_update(post, sigma):
  """MacKay's step for the prior scales: ``(new sigma, sum gamma, all valid)``."""
  n, a, b = _groups_terms(post, sigma)
  gamma = jax.tree_util.tree_map(jnp.subtract, n, b)
  # Groups that cover no parameter (outside a subset) keep their scale.
  covered = jax.tree_util.tree_map(lambda k: k > 0, n)
  ok = jax.tree_util.tree_map(lambda c, g, w: ~c | ((g > 0) & (w > 0)), covered, gamma, a)
  new = jax.tree_util.tree_map(
      lambda s, c, g, w, v: jnp.where(c & v, s * jnp.sqrt(w / jnp.where(c & v, g, 1.0)), s),
      sigma, covered, gamma, a, ok)
  total = sum(jnp.sum(jnp.where(c, g, 0.0)) for c, g in
              zip(jax.tree_util.tree_leaves(covered), jax.tree_util.tree_leaves(gamma)))
  valid = jnp.all(jnp.asarray([jnp.all(v) for v in jax.tree_util.tree_leaves(ok)]))
  return new, total, valid


def noise_step(sse, entries, gamma, noise, ok, num_params):
  """MacKay's Gaussian-noise step ``sigma^2 <- SSE / (entries - gamma)``: ``(new, valid)``.

  Undefined (the old ``noise`` kept, ``valid`` False) unless there are degrees of
  freedom left and ``0 <= gamma <= P`` (the exact Hessian can leave that range)."""
  dof = entries - gamma
  ok_n = ok & (dof > 0) & (sse > 0) & (gamma >= 0) & (gamma <= num_params)
  return jnp.where(ok_n, jnp.sqrt(sse / jnp.where(ok_n, dof, 1.0)), noise), ok_n


def check_structured(fn, hyper, prior_key, noise_key, total_derivative, make_nlp):
  """Refuse what the structured branch cannot do (instead of ignoring it)."""
  if prior_key is None:
    raise ValueError(f"{fn}: the structured evidence (structure / subset / data) needs "
                     "prior_key: it updates the Gaussian prior scales by MacKay's fixed "
                     "point; gradient ascent on other hyperparameters is dense-only "
                     "(structure='full' with inputs, targets).")
  others = sorted(k for k in hyper if k not in (prior_key, noise_key))
  if others:
    raise ValueError(f"{fn}: hyper entries {others} would need gradient ascent through "
                     "the curvature, which only the dense path has; the structured "
                     f"evidence updates hyper[{prior_key!r}] and the Gaussian noise "
                     f"hyper[{noise_key!r}] only.")
  if total_derivative:
    raise ValueError(f"{fn}: total_derivative=True differentiates the MAP through a "
                     "dense Hessian solve: dense only (structure='full' with inputs, "
                     "targets and no data / subset).")
  nlp = make_nlp(hyper)
  if noise_key is not None and not hasattr(nlp, "apply_fn"):
    raise TypeError(f"{fn}: the noise update needs an mlmap.NegativeLogPosterior, got "
                    f"{type(nlp).__name__}.")
  return nlp


def _fixed_point(terms, hyper, prior_key, noise_key):
  """MacKay's step at ``hyper``: ``(new hyper, posterior there, gamma, valid)``."""
  noise = None if noise_key is None else hyper[noise_key]
  post = _terms.posterior_at(_CALL, terms, hyper[prior_key], noise)
  new = dict(hyper)
  new[prior_key], gamma, valid = _prior_update(post, hyper[prior_key])
  if noise_key is not None:
    new[noise_key], ok_n = noise_step(terms.sse, terms.entries, gamma, noise, True,
                                      post.num_params)
    valid = valid & ok_n
  return new, post, gamma, valid


def _log_change(new, old):
  return max(float(jnp.max(jnp.abs(jnp.log(a) - jnp.log(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)))


def maximize_structured(make_nlp, hyper, params, data, *, structure, subset, curvature,
                        prior_key, noise_key, num_iterations, fit_steps, make_optimizer,
                        tol, map_tol, laplace_kw, fixed_point=True, learning_rate=0.05):
  """The loop; returns ``(hyper, params, records, hypers, converged)``.

  Every posterior is built with the first ``make_nlp(hyper)`` and moved to the
  current hyperparameters by :mod:`mlmap._evidence_terms` (``O(P)``), so the
  curvature passes compile once. Where the fixed point is invalid (or with
  ``fixed_point=False``) one ``Adam(learning_rate)`` step on the log evidence in
  the log hyperparameters is taken instead.
  """
  if make_optimizer is None:
    make_optimizer = _hf.hessian_free
  step = _refit_step(make_nlp, make_optimizer)
  batches = _cycle(data)
  hyper = jax.tree_util.tree_map(lambda x: jnp.asarray(x, float), hyper)
  nlp_ref = make_nlp(hyper)
  ref_noise = None if noise_key is None else hyper[noise_key]
  state = optax.with_extra_args_support(make_optimizer(nlp_ref)).init(params)
  hyper_tx = optax.adam(learning_rate)
  theta_state = hyper_tx.init(_terms.log_hyper(hyper, prior_key, noise_key))
  records, hypers, converged = [], [], jnp.asarray(False)
  for t in range(num_iterations):
    for _ in range(fit_steps):
      inputs, targets = next(batches)
      params, state = step(hyper, params, state, inputs, targets)
    post_ref = _ls.laplace(nlp_ref, params, curvature=curvature, structure=structure,
                           subset=subset, data=data, map_tol=None, **laplace_kw)
    terms = _terms.hyper_terms(_CALL, post_ref, data, ref_noise, nlp_ref.apply_fn, params)
    new, post, gamma, valid = _fixed_point(terms, hyper, prior_key, noise_key)
    value = post.log_evidence()
    ok = jnp.isfinite(value)
    valid = valid & ok
    if not (fixed_point and bool(valid)):
      theta, theta_state, _ = _terms.ascend(
          prior_key, noise_key, 1, hyper_tx, terms,
          _terms.log_hyper(hyper, prior_key, noise_key), theta_state)
      new = _terms.from_log(theta, hyper)
    records.append((jnp.where(ok, value, -jnp.inf), gamma, post.grad_norm,
                    post.newton_decrement, ok, valid))
    hypers.append(hyper)
    converged = jnp.asarray((_log_change(new, hyper) < tol) & bool(ok)
                            & (bool(valid) or not fixed_point)
                            & (map_tol is None or float(post.newton_decrement) <= map_tol))
    if bool(converged):
      break
    if t < num_iterations - 1:
      hyper = new
  return hyper, params, records, hypers, converged
