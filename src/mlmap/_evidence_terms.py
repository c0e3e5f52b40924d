r"""The Laplace evidence as a function of its hyperparameters at one posterior (private).

A :class:`StructuredPosterior` built once, at the weights ``w`` and at
*reference* hyperparameters (prior scale :math:`\sigma_{0,\mathrm{ref}}`,
Gaussian noise :math:`\sigma_{\mathrm{ref}}`), gives the log evidence at any
other prior scales :math:`\sigma_0` and noise :math:`\sigma` in ``O(P)``:

.. math::
  \log Z(\sigma_0, \sigma) = -\Big[\frac{\mathrm{SSE}}{2\sigma^2} + M\log\sigma
    + \frac M2\log 2\pi\Big] + \log p(w \mid \sigma_0) + \frac P2 \log 2\pi
    - \frac12\log\det\big(c H_{\mathrm{ref}} + D(\sigma_0)\big),
  \qquad c = \sigma_{\mathrm{ref}}^2 / \sigma^2

(the Gaussian likelihood's curvature is :math:`J^\top J/\sigma^2`; ``M`` counts the
target entries). Without a noise scale the bracket is the stored data term and
``c = 1``. Nothing is recomputed from the data, and the posterior's static fields
(its ``nlp``) stay the reference ones, so jitted consumers compile once for a
whole run instead of once per hyperparameter value.

Used by :mod:`mlmap.evidence_structured` (MacKay's fixed point, and its gradient
fallback) and :mod:`mlmap.evidence_online` (online evidence ascent).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import _precisions
from mlmap import data as _data

_LOG_2PI = math.log(2.0 * math.pi)


class HyperTerms(NamedTuple):
  """What the evidence needs at fixed ``w``, as a pytree.

  Attributes:
    post: the posterior built at the reference hyperparameters.
    data_grad: flat ``[P]`` gradient of the data term (covered parameters) at
      the reference noise.
    sse: full-data sum of squared residuals, or None (no noise scale).
    entries: ``M``, the number of target entries (a float scalar), or None.
    ref_noise: the reference noise scale, or None.
  """
  post: Any
  data_grad: Any
  sse: Any = None
  entries: Any = None
  ref_noise: Any = None


def gaussian_nll(sse, entries, noise):
  r""":math:`\mathrm{SSE}/(2\sigma^2) + M\log\sigma + \tfrac M2 \log 2\pi`."""
  return 0.5 * sse / jnp.square(noise) + entries * (jnp.log(noise) + 0.5 * _LOG_2PI)


@functools.partial(jax.jit, static_argnums=0)
def _batch_sse(apply_fn, params, inputs, targets):
  out = apply_fn(params, inputs)
  resid = jnp.broadcast_to(targets, jnp.shape(out)) - out
  return jnp.sum(resid * resid), math.prod(jnp.shape(resid))


def sse(fn, apply_fn, params, data):
  """``(sum of squared residuals, number of target entries)`` over ``data``."""
  total, count = 0.0, 0
  for inputs, targets in _data._batches(fn, data):
    s, size = _batch_sse(apply_fn, params, inputs, targets)
    total = total + s
    count += int(size)
  return total, count


def hyper_terms(fn, post, data, noise=None, apply_fn=None, full_params=None):
  """The :class:`HyperTerms` of ``post`` (one gradient pass, one SSE pass with noise).

  With a noise scale the closed-form Gaussian data term at ``noise`` must equal
  ``post.nll``: otherwise ``noise`` is not the ``sigma`` of
  :func:`mlmap.gaussian_log_likelihood` in this model and ``ValueError`` says so.
  """
  nlp_data = dataclasses.replace(post.sub_nlp, log_prior=None)
  _, grad = _data.dataset_value_and_grad(nlp_data, post.sub_mean, data)
  g = ravel_pytree(grad)[0]
  if noise is None:
    return HyperTerms(post, g)
  total, count = sse(fn, apply_fn, post.mean if full_params is None else full_params, data)
  noise = jnp.asarray(noise, g.dtype)
  closed = float(gaussian_nll(total, count, noise))
  if not math.isclose(closed, float(post.nll), rel_tol=1e-4, abs_tol=1e-6 * count):
    raise ValueError(f"{fn}: the model's data term is {float(post.nll):.6g} nats but a "
                     f"Gaussian likelihood with sigma = the noise hyperparameter "
                     f"{float(noise):.6g} gives {closed:.6g}: the noise key must be the "
                     "sigma of mlmap.gaussian_log_likelihood (or pass noise_key=None).")
  return HyperTerms(post, g, total, jnp.asarray(count, g.dtype), noise)


def _moved(terms, noise):
  """``(c, data term cH, nll)`` at noise ``noise`` (``c = 1``: no noise scale)."""
  post = terms.post
  if terms.ref_noise is None or noise is None:
    return 1.0, post.precision, post.nll
  c = jnp.square(terms.ref_noise / noise)
  return (c, _precisions.scale(post.precision, c),
          gaussian_nll(terms.sse, terms.entries, noise))


def posterior_at(fn, terms, sigma, noise=None):
  """``terms.post`` at prior scale ``sigma`` and noise ``noise``: data term, ``nll``,
  gradient norm and Newton decrement there (static fields kept: the reference
  ``nlp``, whose own prior and noise are stale)."""
  post = terms.post
  c, prec, nll = _moved(terms, noise)
  leaf_prec = post._leaf_prec(fn, sigma)
  d = _precisions.flat_prior(leaf_prec, post.sub_mean, terms.data_grad.dtype)
  g = c * terms.data_grad + d * ravel_pytree(post.sub_mean)[0]
  decrement = 0.5 * jnp.dot(g, _precisions.solve(prec, leaf_prec, g))
  return dataclasses.replace(post, precision=prec, prior_sigma=sigma, nll=nll,
                             grad_norm=jnp.linalg.norm(g), newton_decrement=decrement)


def log_evidence(terms, sigma, noise=None):
  r""":math:`\log Z(\sigma_0, \sigma)` of the module docstring (NaN if not PD): the
  posterior's own :meth:`log_evidence` on the moved data term (no solve)."""
  _, prec, nll = _moved(terms, noise)
  return dataclasses.replace(terms.post, precision=prec, nll=nll).log_evidence(sigma)


def log_hyper(hyper, prior_key, noise_key):
  """``{key: log value}`` for the evidence's hyperparameters (the ascent variables)."""
  keys = [k for k in (prior_key, noise_key) if k is not None]
  return {k: jax.tree_util.tree_map(jnp.log, hyper[k]) for k in keys}


def from_log(theta, hyper):
  """``hyper`` with the entries of ``theta`` exponentiated back in."""
  out = dict(hyper)
  out.update({k: jax.tree_util.tree_map(jnp.exp, v) for k, v in theta.items()})
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def ascend(prior_key, noise_key, steps, tx, terms, theta, state):
  r"""``steps`` steps of the optax ``tx`` on :math:`-\log Z` in the log hyperparameters.

  Returns ``(theta, state, (log Z before, log Z after))``; a step whose value or
  gradient is not finite is skipped (``theta`` and ``state`` kept).
  """

  def neg(th):
    noise = None if noise_key is None else jnp.exp(th[noise_key])
    sigma = jax.tree_util.tree_map(jnp.exp, th[prior_key])
    return -log_evidence(terms, sigma, noise)

  def body(carry, _):
    th, st = carry
    value, grad = jax.value_and_grad(neg)(th)
    updates, new_st = tx.update(grad, st, th)
    new_th = optax.apply_updates(th, updates)
    ok = _checks.tree_all_finite((value, grad))
    keep = lambda n, o: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), n, o)  # noqa: E731
    return (keep(new_th, th), keep(new_st, st)), None

  before = -neg(theta)
  (theta, state), _ = jax.lax.scan(body, (theta, state), None, length=steps)
  return theta, state, (before, -neg(theta))
