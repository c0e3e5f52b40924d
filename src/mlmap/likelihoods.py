"""Log-likelihoods of independent observations: the losses, read as probability.

Each function returns ``log p(t | z)`` elementwise (per observation), with every
normalizing constant, so that ``-sum(...)`` is the negative log-likelihood whose
minimizer is the maximum-likelihood estimate. All forms are computed from the
network's pre-activation outputs through log-sigmoid / log-softmax, never through
the log of a probability, so they stay finite (values and gradients) for logits of
+-1e4 in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mlmap import _checks
from mlmap import _input_checks

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_likelihood(outputs, targets, sigma=1.0):
  r"""Gaussian log density of ``targets`` around ``outputs``, elementwise.

  .. math::
    \log p(t \mid z) = -\frac{(t - z)^2}{2\sigma^2} - \log\sigma - \tfrac12\log 2\pi

  The sum over observations is ``-SSE / (2 sigma^2)`` plus a constant, so its
  argmax over the network is the least-squares fit for every ``sigma`` (the noise
  scale drops out of the argmin). ``sigma`` may be an array that broadcasts *to*
  ``outputs``' shape (e.g. a second network head predicting its own noise:
  heteroscedastic regression with outputs ``[B, 1]`` and ``sigma`` ``[B, 1]``).
  It may never enlarge the result: outputs ``[B]`` with ``sigma`` ``[B, 1]``
  would give ``[B, B]`` terms and a negative log-likelihood B times too large,
  so that raises, as targets that enlarge the outputs do.

  Args:
    outputs: predicted means ``z``, any shape.
    targets: observed ``t``; must broadcast to ``outputs``' shape.
    sigma: noise standard deviation, > 0 and finite; a scalar or an array that
      broadcasts to ``outputs``' shape.

  Returns:
    Array of ``log p(t | z)`` with ``outputs``' shape.

  Raises:
    ValueError: ``targets`` or ``sigma`` does not broadcast to ``outputs``' shape
      (both shapes named), or a concrete ``sigma`` is <= 0, ``inf`` or NaN.

  Examples:
    >>> import jax.numpy as jnp, mlmap as mm
    >>> float(mm.gaussian_log_likelihood(jnp.array(0.0), jnp.array(0.0)))  # doctest: +ELLIPSIS
    -0.918938...
  """
  fn = "gaussian_log_likelihood"
  _checks.check_targets_shape(fn, outputs, targets)
  _input_checks.check_broadcasts_to(fn, "sigma", sigma, outputs)
  _input_checks.check_finite_positive("sigma", sigma, fn)
  outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
  sigma = jnp.asarray(sigma, dtype=jnp.result_type(outputs, float))
  r = (targets - outputs) / sigma
  return -0.5 * r * r - jnp.log(sigma) - jnp.asarray(_HALF_LOG_2PI, r.dtype)


def bernoulli_log_likelihood(logits, targets):
  r"""Bernoulli log-probability of ``targets`` under ``sigmoid(logits)``, elementwise.

  .. math::
    \log p(t \mid s) = t \log\sigma(s) + (1 - t)\log\sigma(-s),
    \qquad \frac{\partial(-\log p)}{\partial s} = \sigma(s) - t = z - t

  Its negative is the binary cross-entropy of the lecture. ``targets`` may be
  soft (in [0, 1]); then ``-log p = KL(p || q) + H(p)`` with ``p = (1-t, t)``,
  ``q = (1-z, z)``. Computed with ``log_sigmoid``, so finite for any logit.

  A target outside [0, 1] (a -1/+1 label, say) would give a "log-probability"
  above zero. Concrete targets are checked and raise; traced ones (under
  ``jit``) cannot be, so the entry of such a target is NaN, which
  ``make_train_step`` reports and skips, never a plausible number.

  Args:
    logits: pre-sigmoid outputs ``s``.
    targets: ``t`` in [0, 1] (hard or soft); must broadcast to ``logits``.

  Returns:
    Array of ``log p(t | s)`` with ``logits``' shape; NaN where a traced target
    lies outside [0, 1].

  Raises:
    ValueError: shapes do not match, or a concrete target is outside [0, 1] (or NaN).
  """
  fn = "bernoulli_log_likelihood"
  _checks.check_targets_shape(fn, logits, targets, what="logits")
  _input_checks.concrete_range(fn, "targets", targets, 0, 1)
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.inexact):
    logits = logits.astype(float)
  targets = jnp.asarray(targets, dtype=logits.dtype)
  ll = (targets * jax.nn.log_sigmoid(logits)
        + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  return _input_checks.nan_where_invalid((targets >= 0) & (targets <= 1), ll)


def categorical_log_likelihood(logits, labels):
  r"""Categorical log-probability of integer ``labels`` under ``softmax(logits)``.

  .. math::
    \log P(k \mid z) = z_k - \log\sum_j e^{z_j},
    \qquad \frac{\partial \log P(k)}{\partial z_i} = \delta_{ik} - P(i)

  Labels outside ``[0, K)`` are never read as a class (JAX indexing would wrap
  ``-1``, a PyTorch-style "ignore" label, to class ``K - 1``): concrete labels
  raise, and under ``jit`` the entry of a traced out-of-range label is NaN, so
  ``make_train_step`` reports and skips the batch. Masking examples out is the
  caller's job, done with a weight; with ``targets = (labels, weights)``, say:

  ``lambda z, t: t[1] * mm.categorical_log_likelihood(z, jnp.where(t[1] > 0, t[0], 0))``

  (the ``jnp.where`` keeps a masked ``-1`` label in range, since ``0 * NaN`` is
  NaN; the weights may be any non-negative floats).

  Args:
    logits: ``[..., K]`` unnormalized log-probabilities.
    labels: integer class indices in ``[0, K)`` of shape ``logits.shape[:-1]``
      (or broadcasting to it). Float or one-hot targets go to
      :func:`soft_categorical_log_likelihood` instead.

  Returns:
    Array ``[...]`` of ``log P(label | logits)``; NaN where a traced label lies
    outside ``[0, K)``.

  Raises:
    TypeError: ``labels`` is not an integer array.
    ValueError: shapes do not match, or a concrete label is outside [0, K).
  """
  fn = "categorical_log_likelihood"
  labels_dtype = jnp.result_type(labels)
  if not jnp.issubdtype(labels_dtype, jnp.integer):
    raise TypeError(
        f"{fn} takes integer class labels, got dtype {labels_dtype}; for soft or "
        "one-hot float targets use mlmap.soft_categorical_log_likelihood.")
  logits = jnp.asarray(logits)
  if logits.ndim < 1:
    raise ValueError(f"{fn}: logits must have a class axis, got shape {logits.shape}.")
  _checks.check_targets_shape(fn, logits[..., 0], labels, what="logits[..., 0]")
  num_classes = logits.shape[-1]
  _input_checks.concrete_range(fn, "labels", labels, 0, num_classes, closed_high=False)
  labels = jnp.broadcast_to(jnp.asarray(labels), logits.shape[:-1])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  safe = jnp.clip(labels, 0, num_classes - 1)
  ll = jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  return _input_checks.nan_where_invalid((labels >= 0) & (labels < num_classes), ll)


def _probs_tolerance(dtype, num_classes: int) -> float:
  """How far a row of ``probs`` in ``dtype`` may sum from one: ``max(1e-4, 2 K eps)``."""
  return max(1e-4, 2.0 * num_classes * float(jnp.finfo(dtype).eps))


def soft_categorical_log_likelihood(logits, probs):
  r"""Expected categorical log-probability under target distribution ``probs``.

  .. math::
    \sum_k p_k \log P(k \mid z) = -\big(\mathrm{KL}(p \,\|\, P) + H(p)\big)

  With one-hot ``probs`` this equals :func:`categorical_log_likelihood`.

  ``probs`` must be a distribution over the last axis: entries >= 0, each row
  summing to one within ``max(1e-4, 2 K eps)`` of ``probs``' dtype (1e-4 in
  float32 and float64 for ``K <= 400``). Concrete ``probs`` that are not raise;
  under ``jit`` the entry of a traced row that is not is NaN.

  Args:
    logits: ``[..., K]`` unnormalized log-probabilities.
    probs: ``[..., K]`` float target probabilities (rows summing to one);
      must broadcast to ``logits``' shape.

  Returns:
    Array ``[...]``; NaN for a traced row of ``probs`` that is not a distribution.

  Raises:
    TypeError: ``probs`` is not a floating array.
    ValueError: shapes do not match, or concrete ``probs`` has a negative entry
      or a row whose sum is not one.
  """
  fn = "soft_categorical_log_likelihood"
  _checks.check_float(fn, "probs", probs)
  _checks.check_targets_shape(fn, logits, probs, what="logits")
  logits = jnp.asarray(logits)
  if logits.ndim < 1:
    raise ValueError(f"{fn}: logits must have a class axis, got shape {logits.shape}.")
  tol = _probs_tolerance(jnp.result_type(probs), logits.shape[-1])
  _check_concrete_probs(fn, probs, tol)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.asarray(probs)
  p_sum = jnp.sum(p.astype(jnp.promote_types(p.dtype, jnp.float32)), axis=-1)
  valid = jnp.all(p >= 0, axis=-1) & (jnp.abs(p_sum - 1) <= tol)
  ll = jnp.sum(p.astype(log_p.dtype) * log_p, axis=-1)
  return _input_checks.nan_where_invalid(valid, ll)


def _check_concrete_probs(fn: str, probs, tol: float) -> None:
  """Raise ``ValueError`` if concrete ``probs`` has a negative entry or a row sum off one."""
  if not _checks.is_concrete(probs):
    return
  p = np.asarray(probs, dtype=np.float64)
  if p.size == 0:
    return
  if not np.all(p >= 0):
    raise ValueError(f"{fn}: probs must be >= 0, got entries {p[~(p >= 0)][:3].tolist()}.")
  off = np.abs(p.sum(axis=-1) - 1.0)
  if not np.all(off <= tol):
    worst = np.unravel_index(np.argmax(np.where(np.isnan(off), np.inf, off)), off.shape)
    raise ValueError(
        f"{fn}: each row of probs must sum to 1 (within {tol:.1e}); row {tuple(int(i) for i in worst)} "
        f"sums to {float(p.sum(axis=-1)[worst])!r}. Pass logits as logits and probabilities "
        "(e.g. jax.nn.softmax of soft labels) as probs.")
