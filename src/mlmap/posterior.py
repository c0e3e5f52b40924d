"""The negative log-posterior: a likelihood, a prior and a model, composed.

``negative_log_posterior`` returns a callable object that is the training
objective of MAP estimation and also carries its parts, so that curvature
(GGN, Fisher), natural gradients and the Laplace evidence can take the model and
the likelihood apart again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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


_STATE_COLLECTIONS = ("batch_stats", "cache", "intermediates", "losses", "perturbations")
_STATE_HINT = (
    "Model state is not supported yet: close over the state in apply_fn and run the "
    "model in eval mode, e.g. apply_fn = lambda p, x: model.apply("
    "{'params': p, 'batch_stats': batch_stats}, x, train=False), and pass only the "
    "'params' collection as params.")


def _state_in_params(params):
  """The flax state collections among ``params``' top-level keys (``[]`` when none)."""
  if not isinstance(params, Mapping):
    return []
  keys = [str(k) for k in params.keys()]
  if "params" in keys:
    return [k for k in keys if k != "params"]
  return [k for k in keys if k in _STATE_COLLECTIONS]


def _state_in_outputs(outputs):
  """The collections of a flax ``mutable=`` result ``(y, {collection: ...})`` (``[]`` when not)."""
  if not (isinstance(outputs, tuple) and len(outputs) == 2
          and isinstance(outputs[1], Mapping)):
    return []
  keys = [str(k) for k in outputs[1].keys()]
  frozen = type(outputs[1]).__name__ == "FrozenDict"
  named = [k for k in keys if k in _STATE_COLLECTIONS + ("params",)]
  return keys if frozen and keys else named


def check_stateless_model(fn: str, params, outputs) -> None:
  """Refuse model state (flax ``batch_stats``, ``mutable=``) with a clear error.

  Two signs of model state are recognised, both from flax:

  * ``params`` is a whole variables dict: a top-level key that is a state
    collection (``"batch_stats"``, ``"cache"``, ``"intermediates"``, ...), or any
    key other than ``"params"`` beside a ``"params"`` key;
  * ``outputs`` is what ``model.apply(..., mutable=[...])`` returns: a 2-tuple
    whose second element is a dict (or ``FrozenDict``) of state collections.

  Structured outputs that are not flax state (a tuple ``(mean, log_sigma)``, a
  dict of heads) pass. Only structure is read, so it works on traced values.

  Args:
    fn: the public function to name in the message.
    params: the parameter pytree the model was called with, or ``None``.
    outputs: what ``apply_fn`` returned, or ``None``.

  Raises:
    TypeError: naming the collection(s) found, saying model state is not
      supported yet and how to close over it (eval mode).
  """
  found = _state_in_params(params)
  where = "params has the top-level collection"
  if not found:
    found = _state_in_outputs(outputs)
    where = "apply_fn returned (outputs, state) with the collection"
  if found:
    listed = ", ".join(repr(k) for k in found)
    raise TypeError(f"{fn}: {where}{'s' if len(found) > 1 else ''} {listed}. {_STATE_HINT}")


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
    """``N / B``: how many times the batch's likelihood counts (1 when N is None).

    Raises:
      ValueError: an empty batch (``B = 0``), or ``num_data < B`` (a batch cannot
        stand for fewer examples than it holds); shapes are concrete under ``jit``.
    """
    fn = "negative_log_posterior"
    b = batch_size(inputs)
    if b == 0:
      raise ValueError(f"{fn}: the batch is empty (inputs' batch size B = 0); the "
                       "likelihood of no examples cannot be scaled to num_data.")
    if self.num_data is None:
      return 1.0
    if self.num_data < b:
      raise ValueError(f"{fn}: num_data = {self.num_data} is smaller than the batch "
                       f"size B = {b}; num_data is the size of the full data set "
                       "the batch is drawn from (N >= B), or None for N = B.")
    return self.num_data / b

  def per_example_nll(self, outputs, targets):
    """``-log p(t_i | z_i)`` summed over all but the leading axis: shape ``[B]``."""
    check_stateless_model("negative_log_posterior", None, outputs)
    ll = jnp.asarray(self.log_likelihood(outputs, targets))
    return -jnp.sum(ll.reshape(ll.shape[0], -1), axis=1)

  def data_term(self, params, inputs, targets):
    r""":math:`-\frac{N}{B}\sum_i \log p(t_i \mid f(x_i; w))` (the scaled NLL).

    Raises:
      TypeError: model state in ``params`` or ``apply_fn``'s result (see
        :func:`check_stateless_model`).
    """
    scale = self.scale(inputs)  # checks the batch before the model sees it
    outputs = self.apply_fn(params, inputs)
    check_stateless_model("negative_log_posterior", params, outputs)
    return -scale * jnp.sum(self.log_likelihood(outputs, targets))

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
