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

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_likelihood(outputs, targets, sigma=1.0):
  r"""Gaussian log density of ``targets`` around ``outputs``, elementwise.

  .. math::
    \log p(t \mid z) = -\frac{(t - z)^2}{2\sigma^2} - \log\sigma - \tfrac12\log 2\pi

  The sum over observations is ``-SSE / (2 sigma^2)`` plus a constant, so its
  argmax over the network is the least-squares fit for every ``sigma`` (the noise
  scale drops out of the argmin). ``sigma`` may be an array that broadcasts with
  ``outputs`` (e.g. a second network head predicting its own noise:
  heteroscedastic regression).

  Args:
    outputs: predicted means ``z``, any shape.
    targets: observed ``t``; must broadcast to ``outputs``' shape.
    sigma: noise standard deviation, > 0; scalar or broadcastable array.

  Returns:
    Array of ``log p(t | z)`` with ``outputs``' (broadcast with ``sigma``) shape.

  Examples:
    >>> import jax.numpy as jnp, mlmap as mm
    >>> float(mm.gaussian_log_likelihood(jnp.array(0.0), jnp.array(0.0)))  # doctest: +ELLIPSIS
    -0.918938...
  """
  fn = "gaussian_log_likelihood"
  _checks.check_targets_shape(fn, outputs, targets)
  _checks.check_positive("sigma", sigma, fn)
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

  Args:
    logits: pre-sigmoid outputs ``s``.
    targets: ``t`` in [0, 1] (hard or soft); must broadcast to ``logits``.

  Returns:
    Array of ``log p(t | s)`` with ``logits``' shape.
  """
  fn = "bernoulli_log_likelihood"
  _checks.check_targets_shape(fn, logits, targets, what="logits")
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.inexact):
    logits = logits.astype(float)
  targets = jnp.asarray(targets, dtype=logits.dtype)
  return (targets * jax.nn.log_sigmoid(logits)
          + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def categorical_log_likelihood(logits, labels):
  r"""Categorical log-probability of integer ``labels`` under ``softmax(logits)``.

  .. math::
    \log P(k \mid z) = z_k - \log\sum_j e^{z_j},
    \qquad \frac{\partial \log P(k)}{\partial z_i} = \delta_{ik} - P(i)

  Args:
    logits: ``[..., K]`` unnormalized log-probabilities.
    labels: integer class indices of shape ``logits.shape[:-1]``. Float or
      one-hot targets go to :func:`soft_categorical_log_likelihood` instead.

  Returns:
    Array ``[...]`` of ``log P(label | logits)``.

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
  if _checks.is_concrete(labels):
    lab = np.asarray(labels)  # numpy: jnp ops would be staged inside a trace
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
      raise ValueError(f"{fn}: labels must lie in [0, {num_classes}), got range "
                       f"[{int(lab.min())}, {int(lab.max())}].")
  labels = jnp.broadcast_to(jnp.asarray(labels), logits.shape[:-1])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def soft_categorical_log_likelihood(logits, probs):
  r"""Expected categorical log-probability under target distribution ``probs``.

  .. math::
    \sum_k p_k \log P(k \mid z) = -\big(\mathrm{KL}(p \,\|\, P) + H(p)\big)

  With one-hot ``probs`` this equals :func:`categorical_log_likelihood`.

  Args:
    logits: ``[..., K]`` unnormalized log-probabilities.
    probs: ``[..., K]`` float target probabilities (rows summing to one).

  Returns:
    Array ``[...]``.
  """
  fn = "soft_categorical_log_likelihood"
  _checks.check_float(fn, "probs", probs)
  _checks.check_targets_shape(fn, logits, probs, what="logits")
  log_p = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  return jnp.sum(jnp.asarray(probs, log_p.dtype) * log_p, axis=-1)
