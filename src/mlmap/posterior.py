"""The negative log-posterior: a likelihood, a prior and a model, composed.

``negative_log_posterior`` returns a callable object that is the training
objective of MAP estimation and also carries its parts, so that curvature
(GGN, Fisher), natural gradients and the Laplace evidence can take the model and
the likelihood apart again.
"""

from __future__ import annotations

import dataclasses
import functools
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
    "Pass only the weights ('params' collection) as params, and the model state "
    "apart: mm.negative_log_posterior(apply_fn, ..., has_state=True) with "
    "apply_fn(params, inputs, *, state, rng) -> (outputs, new_state), then "
    "nlp.bind(state) for the evaluation-mode objective; or close over the state in "
    "apply_fn, e.g. lambda p, x: model.apply({'params': p, 'batch_stats': "
    "batch_stats}, x, train=False).")


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
    TypeError: naming the collection(s) found, and how to pass the state apart
      (``has_state=True``) or close over it (evaluation mode).
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
    return self.scaled_nll(params, outputs, targets, scale)

  def scaled_nll(self, params, outputs, targets, scale):
    r""":math:`-s\sum_i \log p(t_i \mid z_i)` of outputs already computed (``s = N/B``).

    Shared by :meth:`data_term` and the stateful objective; checks ``params``
    (``None`` skips it) and ``outputs`` for model state first.
    """
    check_stateless_model("negative_log_posterior", params, outputs)
    return -scale * jnp.sum(self.log_likelihood(outputs, targets))

  def prior_term(self, params):
    r""":math:`-\log p(w)`, zero for the flat prior."""
    if self.log_prior is None:
      return jnp.zeros((), _checks.tree_float_dtype(params))
    return -self.log_prior(params)

  def __call__(self, params, inputs, targets):
    return self.data_term(params, inputs, targets) + self.prior_term(params)

  @property
  def has_state(self) -> bool:
    """False: ``apply_fn(params, inputs)`` has no model state (see :class:`StatefulNegativeLogPosterior`)."""
    return False


_MISSING = object()

_BIND_HINT = (
    "curvature, the Laplace approximation and the optimizers take the objective at "
    "a fixed model state: nlp.bind(state) (evaluation mode: no dropout, running "
    "statistics) or nlp.bind(state, rng) (training mode with one dropout mask); "
    "mm.make_train_step(nlp, tx) threads the state itself.")


def _shapes(tree):
  """Leaf shapes (a flax ``FrozenDict`` compares as the dict it holds)."""
  if isinstance(tree, Mapping) and not isinstance(tree, dict):
    tree = dict(tree)
  return jax.tree_util.tree_map(jnp.shape, tree)


def call_model(model_fn, params, inputs, state, rng):
  """``model_fn(params, inputs, state=state, rng=rng)``, checked: ``(outputs, new_state)``.

  The new state must have the old state's tree structure and shapes (read at
  trace time), else ``ValueError`` showing both; it is cast to the old state's
  dtypes (flax linen keeps float32 batch statistics that float64 inputs update
  in float64), so a jitted loop that carries it never retraces.
  """
  fn = "negative_log_posterior"
  check_stateless_model(fn, params, None)
  result = model_fn(params, inputs, state=state, rng=rng)
  if not (isinstance(result, tuple) and len(result) == 2):
    raise TypeError(f"{fn}: with has_state=True, apply_fn(params, inputs, *, state, rng) "
                    f"must return (outputs, new_state), got {type(result).__name__}.")
  outputs, new_state = result
  if _shapes(new_state) != _shapes(state):
    raise ValueError(f"{fn}: apply_fn returned a new state unlike the state it was "
                     f"given (tree and shapes): {_shapes(new_state)} against "
                     f"{_shapes(state)}.")
  old_leaves, treedef = jax.tree_util.tree_flatten(state)
  new_state = jax.tree_util.tree_unflatten(treedef, [
      jnp.asarray(n, jnp.result_type(o))
      for n, o in zip(jax.tree_util.tree_leaves(new_state), old_leaves)])
  return outputs, new_state


def _apply_at(model_fn, state, rng, params, inputs):
  return call_model(model_fn, params, inputs, state, rng)[0]


@dataclasses.dataclass(frozen=True)
class StatefulNegativeLogPosterior:
  r"""MAP objective of a model with state and randomness; see :func:`negative_log_posterior`.

  The model is ``model_fn(params, inputs, *, state, rng) -> (outputs, new_state)``:
  ``state`` is a pytree of non-trained variables (flax ``batch_stats``), and
  ``rng=None`` means **evaluation mode** (deterministic: no dropout, batch-norm
  running statistics), a PRNG key training mode (dropout drawn from it,
  batch statistics, ``new_state`` the updated running statistics).

  There is no ``nlp(params, inputs, targets)`` without a state: call
  ``nlp(params, inputs, targets, state=s, rng=None)``, or take
  ``nlp.bind(s)``, the ordinary :class:`NegativeLogPosterior` of the
  evaluation-mode network with the state held fixed, which every curvature,
  Laplace and evidence function accepts. ``nlp.apply_fn`` raises ``TypeError``
  saying so, so a stateful nlp is never differentiated with a made-up state.

  Attributes:
    model_fn: the stateful model.
    log_likelihood, log_prior, num_data: as in :class:`NegativeLogPosterior`.
  """
  model_fn: Callable[..., Any]
  log_likelihood: Callable[..., Any]
  log_prior: Optional[Callable[..., Any]] = None
  num_data: Optional[int] = None

  @property
  def has_state(self) -> bool:
    return True

  @property
  def apply_fn(self):
    raise TypeError(f"negative_log_posterior: this nlp has model state (has_state=True), "
                    f"so it has no apply_fn(params, inputs); {_BIND_HINT}")

  def bind(self, state, rng=None) -> NegativeLogPosterior:
    """The stateless objective ``w -> nlp(w, X, T; state, rng)`` (``new_state`` dropped).

    ``rng=None``: the evaluation-mode network (what the Laplace approximation and
    the curvature of a trained model should use). A key: the training-mode
    network with that dropout mask and the batch's statistics, which is what
    ``mm.make_train_step`` differentiates; ``mm.hessian_free`` and the other
    curvature optimizers take their products of it.
    """
    apply_fn = functools.partial(_apply_at, self.model_fn, state, rng)
    return NegativeLogPosterior(apply_fn, self.log_likelihood, self.log_prior, self.num_data)

  def loss_and_state(self, params, inputs, targets, *, state, rng=None):
    """``(nlp(params, inputs, targets), new_state)`` of one call of the model."""
    base = NegativeLogPosterior(None, self.log_likelihood, self.log_prior, self.num_data)
    scale = base.scale(inputs)
    outputs, new_state = call_model(self.model_fn, params, inputs, state, rng)
    data = base.scaled_nll(None, outputs, targets, scale)
    return data + base.prior_term(params), new_state

  def __call__(self, params, inputs, targets, *, state=_MISSING, rng=None):
    if state is _MISSING:
      raise TypeError("negative_log_posterior: this nlp has model state "
                      "(has_state=True): call nlp(params, inputs, targets, state=..., "
                      f"rng=None); {_BIND_HINT}")
    return self.loss_and_state(params, inputs, targets, state=state, rng=rng)[0]


def is_negative_log_posterior(obj) -> bool:
  """An nlp of :func:`negative_log_posterior`, with or without model state."""
  return isinstance(obj, (NegativeLogPosterior, StatefulNegativeLogPosterior))


def negative_log_posterior(apply_fn, log_likelihood, log_prior=None, num_data=None, *,
                           has_state=False):
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
    has_state: the model has state and randomness (batch norm, dropout):
      ``apply_fn(params, inputs, *, state, rng) -> (outputs, new_state)``, with
      ``rng=None`` meaning evaluation mode. Then the result is a
      :class:`StatefulNegativeLogPosterior`; ``nlp.bind(state)`` is the
      evaluation-mode objective, and ``mm.make_train_step`` / ``mm.fit`` thread
      the state and a per-step key. docs/models.md shows flax linen and NNX.

  Returns:
    A :class:`NegativeLogPosterior` (a :class:`StatefulNegativeLogPosterior`
    with ``has_state=True``).

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
  if not isinstance(has_state, bool):
    raise TypeError(f"{fn}: has_state must be True or False, got {has_state!r}.")
  if has_state:
    return StatefulNegativeLogPosterior(apply_fn, log_likelihood, log_prior, num_data)
  return NegativeLogPosterior(apply_fn, log_likelihood, log_prior, num_data)
