"""The negative log-posterior: a likelihood, a prior and a model, composed.

``negative_log_posterior`` returns a callable object that is the training
objective of MAP estimation and also carries its parts, so that curvature
(GGN, Fisher), natural gradients and the Laplace evidence can take the model and
the likelihood apart again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mlmap import _checks


def batch_size(inputs) -> int:
  """Leading dimension ``B`` of ``inputs`` (an array or a pytree of arrays)."""
  leaves = jax.tree_util.tree_leaves(inputs)
  if not leaves or jnp.ndim(leaves[0]) == 0:
    raise ValueError("negative_log_posterior: inputs need a leading batch axis, "
                     f"got {jax.tree_util.tree_map(jnp.shape, inputs)}.")
  sizes = {jnp.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"negative_log_posterior: input leaves disagree on the batch "
                     f"size: {sorted(sizes)}.")
  return leaves[0].shape[0]


def check_stateless_model(fn: str, params, outputs) -> None:
  """Refuse model state (flax ``batch_stats``, ``mutable=``) with a clear error.

  STUB: the owner of posterior.py fills this in (TypeError naming the collection).
  """
  del fn, params, outputs


@dataclasses.dataclass(frozen=True)
class NegativeLogPosterior:
  r"""Callable MAP objective; see :func:`negative_log_posterior`.

  Attributes:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` (logits or means).
    log_likelihood: ``log_likelihood(outputs, targets) -> log p`` elementwise.
    log_prior: ``log_prior(params) -> scalar`` or ``None`` (flat prior).
    num_data: ``N``, the data-set size the batch stands for, or ``None`` (= B).
  """
  apply_fn: Callable[..., Any]
  log_likelihood: Callable[..., Any]
  log_prior: Optional[Callable[..., Any]] = None
  num_data: Optional[int] = None

  def scale(self, inputs):
    """``N / B``: how many times the batch's likelihood counts (1 when N is None)."""
    b = batch_size(inputs)
    return 1.0 if self.num_data is None else self.num_data / b

  def per_example_nll(self, outputs, targets):
    """``-log p(t_i | z_i)`` summed over all but the leading axis: shape ``[B]``."""
    ll = jnp.asarray(self.log_likelihood(outputs, targets))
    return -jnp.sum(ll.reshape(ll.shape[0], -1), axis=1)

  def data_term(self, params, inputs, targets):
    r""":math:`-\frac{N}{B}\sum_i \log p(t_i \mid f(x_i; w))` (the scaled NLL)."""
    outputs = self.apply_fn(params, inputs)
    return -self.scale(inputs) * jnp.sum(self.log_likelihood(outputs, targets))

  def prior_term(self, params):
    r""":math:`-\log p(w)`, zero for the flat prior."""
    if self.log_prior is None:
      return jnp.zeros((), _checks.tree_float_dtype(params))
    return -self.log_prior(params)

  def __call__(self, params, inputs, targets):
    return self.data_term(params, inputs, targets) + self.prior_term(params)


def negative_log_posterior(apply_fn, log_likelihood, log_prior=None, num_data=None):
  r"""Build the MAP objective (negative log-posterior up to ``log p(D)``).

  .. math::
    \mathrm{nlp}(w; X, T) = -\frac{N}{B}\sum_{i=1}^{B}\log p\big(t_i \mid f(x_i; w)\big)
                            - \log p(w)

  ``B = inputs.shape[0]`` is the batch size and ``N = num_data`` (default ``B``),
  so on a minibatch the objective is an unbiased estimate of the full-data one.
  With the Gaussian likelihood and prior this is :math:`1/\sigma^2` times the
  lecture's ``(1/2) SSE + (lambda/2)|w|^2`` plus a constant, with
  ``lambda = sigma^2 / sigma_0^2``.

  The result is a frozen dataclass: hashable (usable as a static argument),
  callable, and ``jax.jit``/``jax.grad``/``jax.vmap`` apply to it directly.
  It exposes ``apply_fn``, ``log_likelihood``, ``log_prior`` and ``num_data``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; a plain function or a flax
      ``lambda p, x: model.apply({"params": p}, x)``.
    log_likelihood: elementwise ``log p(t | z)``, e.g.
      ``functools.partial(mm.gaussian_log_likelihood, sigma=0.5)``.
    log_prior: scalar ``log p(w)`` or ``None`` for a flat prior (ML estimation).
    num_data: ``N`` >= 1, the number of examples in the full data set.

  Returns:
    A :class:`NegativeLogPosterior`.

  Examples:
    >>> import functools, jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(
    ...     lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...     functools.partial(mm.gaussian_log_prior, sigma=10.0), num_data=100)
    >>> float(nlp(jnp.zeros(2), jnp.ones((4, 2)), jnp.zeros(4)))  # doctest: +ELLIPSIS
    98.33...
  """
  fn = "negative_log_posterior"
  if not callable(apply_fn) or not callable(log_likelihood):
    raise TypeError(f"{fn}: apply_fn and log_likelihood must be callable, got "
                    f"{type(apply_fn).__name__} and {type(log_likelihood).__name__}.")
  if log_prior is not None and not callable(log_prior):
    raise TypeError(f"{fn}: log_prior must be callable or None, got "
                    f"{type(log_prior).__name__}.")
  if num_data is not None:
    if not _checks.is_concrete(num_data) or int(num_data) != num_data or num_data < 1:
      raise ValueError(f"{fn}: num_data must be an integer >= 1, got {num_data!r}.")
    num_data = int(num_data)
  return NegativeLogPosterior(apply_fn, log_likelihood, log_prior, num_data)
