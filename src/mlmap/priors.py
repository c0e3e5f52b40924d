"""Log-priors over parameter pytrees, and weight decay as a Gaussian prior.

A prior is a scalar, normalized log density over the whole parameter pytree.
Scales are a scalar or a pytree *prefix* of ``params`` (one scale per layer,
say); a ``None`` leaf in the scale tree leaves that subtree unpenalized (a flat,
improper prior on e.g. the biases). Every penalized leaf must be floating: an
integer or bool leaf (a step counter, a mask) raises ``TypeError`` naming its
path, unless the scale tree marks it (or a subtree holding it) ``None``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mlmap import _checks
from mlmap import _input_checks

_LOG_2PI = math.log(2.0 * math.pi)


class _Group(tuple):
  """The leaves under one scale (a tuple subclass, so not a pytree node: stays whole)."""


def _scaled_leaves(fn: str, name: str, scale, params):
  """``[(path, w, s), ...]``: each parameter leaf with its scale, broadcasting the prefix tree."""
  flat = jax.tree_util.tree_flatten_with_path
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(scale)):
    return [(path, w, scale) for path, w in flat(params)[0]]
  try:
    nested = jax.tree_util.tree_map_with_path(
        lambda prefix, s, sub: _Group((prefix + path, w, s) for path, w in flat(sub)[0]),
        scale, params, is_leaf=lambda x: x is None)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{fn}: {name} tree {jax.tree_util.tree_structure(scale, is_leaf=lambda x: x is None)} "
        f"is not a prefix of params tree {jax.tree_util.tree_structure(params)} ({e})."
    ) from None
  return [t for group in jax.tree_util.tree_leaves(
      nested, is_leaf=lambda x: type(x) is _Group) for t in group]


def _per_leaf(fn: str, name: str, scale, params, leaf_logpdf):
  """Sum ``leaf_logpdf(w, s)`` over leaves, broadcasting the scale prefix tree.

  A penalized leaf must be floating (a step counter or a mask is not a weight);
  a leaf whose scale is ``None`` is not read and may have any dtype.
  """
  leaves = jax.tree_util.tree_leaves(scale, is_leaf=lambda x: x is None)
  for s in leaves:
    _checks.check_positive(name, s, fn)
  if scale is None:
    return jnp.zeros((), _checks.tree_float_dtype(params))
  triples = [t for t in _scaled_leaves(fn, name, scale, params) if t[2] is not None]
  # Keyed by the full path, so that the shared check names each leaf as the user wrote it.
  _checks.check_float_leaves(fn, {_checks.leaf_path(p): w for p, w, _ in triples})
  total = jnp.zeros((), _checks.tree_float_dtype(params))
  for _, w, s in triples:
    w = jnp.asarray(w)
    s = jnp.broadcast_to(jnp.asarray(s, w.dtype), w.shape)
    total = total + jnp.sum(leaf_logpdf(w, s))
  return total


def gaussian_log_prior(params, sigma=1.0):
  r"""Isotropic Gaussian log-prior :math:`\log \prod_j \mathcal N(w_j; 0, \sigma_0^2)`.

  .. math::
    \log p(w) = -\frac{1}{2\sigma_0^2}\sum_j w_j^2 - P\log\sigma_0
                - \frac{P}{2}\log 2\pi

  Its negative is weight decay ``(lambda/2) |w|^2`` up to a constant and the
  overall scale (see :func:`prior_sigma_to_weight_decay`).

  Args:
    params: pytree of arrays.
    sigma: prior standard deviation ``sigma_0`` > 0: a scalar, or a pytree prefix
      of ``params`` whose leaves are scalars, arrays broadcasting to the matching
      parameter leaves, or ``None`` (that subtree unpenalized).

  Returns:
    Scalar log density.

  Raises:
    ValueError: a concrete ``sigma`` <= 0, or a ``sigma`` tree that is not a
      prefix of ``params``.
    TypeError: a penalized leaf (scale not ``None``) is not floating; the
      message names its path (``'step'``).

  Examples:
    >>> import jax.numpy as jnp, mlmap as mm
    >>> params = {"w": jnp.zeros(2), "step": jnp.array(3)}
    >>> float(mm.gaussian_log_prior(params, {"w": 1.0, "step": None}))  # doctest: +ELLIPSIS
    -1.837877...
  """
  def leaf(w, s):
    return -0.5 * jnp.square(w / s) - jnp.log(s) - 0.5 * _LOG_2PI
  return _per_leaf("gaussian_log_prior", "sigma", sigma, params, leaf)


def laplace_log_prior(params, scale=1.0):
  r"""Laplace (double-exponential) log-prior, the Bayesian reading of L1 decay.

  .. math::
    \log p(w) = \sum_j \Big(-\frac{|w_j|}{b} - \log 2b\Big)

  Args:
    params: pytree of arrays.
    scale: ``b`` > 0, a scalar or pytree prefix of ``params`` (``None`` leaves
      unpenalized), as for :func:`gaussian_log_prior`.

  Returns:
    Scalar log density.

  Raises:
    ValueError: a concrete ``scale`` <= 0, or a ``scale`` tree that is not a
      prefix of ``params``.
    TypeError: a penalized leaf is not floating (named by its path).
  """
  def leaf(w, b):
    return -jnp.abs(w) / b - jnp.log(2.0 * b)
  return _per_leaf("laplace_log_prior", "scale", scale, params, leaf)


def flat_log_prior(params):
  r"""The flat (improper) prior, :math:`\log p(w) = 0`: MAP is then ML.

  It reads no leaf, so it accepts any ``params`` (integer or bool leaves
  included): there is nothing to penalize wrongly. The checks on such leaves
  are made by whatever differentiates or updates them (curvature, optimizers).
  Being improper, it has no evidence: the Laplace evidence needs a proper prior.
  """
  return jnp.zeros((), _checks.tree_float_dtype(params))


def prior_sigma_to_weight_decay(prior_sigma, noise_sigma=1.0):
  r"""Weight decay of the summed loss equal to a Gaussian prior (the lecture's form).

  .. math::
    \tfrac12\sum_i (z_i - t_i)^2 + \tfrac{\lambda}{2}\sum_j w_j^2
    = \sigma^2\big(-\log p(t\mid w) - \log p(w)\big) + \text{const},
    \qquad \lambda = \sigma^2 / \sigma_0^2

  For classification (no noise scale) use ``noise_sigma=1``: the summed
  cross-entropy plus ``(lambda/2)|w|^2`` is the negative log-posterior with
  ``lambda = 1 / sigma_0^2``.

  Raises:
    ValueError: a concrete argument is <= 0, ``inf`` or NaN (the function names it);
      a traced one (under ``jit``) gives NaN instead.
  """
  _input_checks.check_finite_positive("prior_sigma", prior_sigma, "prior_sigma_to_weight_decay")
  _input_checks.check_finite_positive("noise_sigma", noise_sigma, "prior_sigma_to_weight_decay")
  wd = jnp.square(jnp.asarray(noise_sigma) / jnp.asarray(prior_sigma))
  return _input_checks.nan_unless_finite_positive(wd, prior_sigma, noise_sigma)


def weight_decay_to_prior_sigma(weight_decay, noise_sigma=1.0):
  r"""Inverse of :func:`prior_sigma_to_weight_decay`: :math:`\sigma_0 = \sigma/\sqrt{\lambda}`.

  Raises:
    ValueError: a concrete argument is <= 0, ``inf`` or NaN (the function names it);
      a traced one (under ``jit``) gives NaN instead.
  """
  _input_checks.check_finite_positive("weight_decay", weight_decay, "weight_decay_to_prior_sigma")
  _input_checks.check_finite_positive("noise_sigma", noise_sigma, "weight_decay_to_prior_sigma")
  sigma0 = jnp.asarray(noise_sigma) / jnp.sqrt(jnp.asarray(weight_decay))
  return _input_checks.nan_unless_finite_positive(sigma0, weight_decay, noise_sigma)


def prior_sigma_to_optax_weight_decay(prior_sigma, num_data, noise_sigma=1.0):
  r"""``optax.add_decayed_weights`` coefficient equal to a Gaussian prior.

  optax users minimize the *mean* loss over the data set and add ``wd * w`` to
  the gradient, i.e. minimize :math:`\frac1N\sum_i \ell_i + \frac{wd}{2}|w|^2`.
  With :math:`\ell_i = \sigma^2(-\log p(t_i \mid w))` + const (``0.5 * (z - t)^2``
  for regression, cross-entropy with ``noise_sigma=1`` for classification) this is
  :math:`\frac{\sigma^2}{N}` times the negative log-posterior when

  .. math::
    wd = \frac{\sigma^2}{N\sigma_0^2}.

  Raises:
    ValueError: a concrete argument is <= 0, ``inf`` or NaN (the function names it);
      a traced one (under ``jit``) gives NaN instead.
  """
  fn = "prior_sigma_to_optax_weight_decay"
  for name, value in (("prior_sigma", prior_sigma), ("num_data", num_data),
                      ("noise_sigma", noise_sigma)):
    _input_checks.check_finite_positive(name, value, fn)
  wd = prior_sigma_to_weight_decay(prior_sigma, noise_sigma) / num_data
  return _input_checks.nan_unless_finite_positive(wd, num_data)


def optax_weight_decay_to_prior_sigma(weight_decay, num_data, noise_sigma=1.0):
  r"""Inverse of :func:`prior_sigma_to_optax_weight_decay`: :math:`\sigma_0 = \sigma / \sqrt{N\,wd}`.

  Raises:
    ValueError: a concrete argument is <= 0, ``inf`` or NaN (the function names it);
      a traced one (under ``jit``) gives NaN instead.
  """
  fn = "optax_weight_decay_to_prior_sigma"
  _input_checks.check_finite_positive("weight_decay", weight_decay, fn)
  _input_checks.check_finite_positive("num_data", num_data, fn)
  sigma0 = weight_decay_to_prior_sigma(jnp.asarray(weight_decay) * num_data, noise_sigma)
  return _input_checks.nan_unless_finite_positive(sigma0, weight_decay, num_data)
