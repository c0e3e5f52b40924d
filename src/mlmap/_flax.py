"""A flax NNX module as mlmap's ``(apply_fn, params, state)`` (private; ``mm.from_nnx``).

flax is imported when :func:`from_nnx` is called, not when mlmap is.
"""

from __future__ import annotations

import functools

import jax


def _split(nnx, module):
  """``(graphdef, params, rngs, rest)``: weights, random streams and the other variables."""
  graphdef, params, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
  pure = getattr(nnx, "to_pure_dict", None) or (lambda state: state.to_pure_dict())
  return graphdef, pure(params), pure(rngs), pure(rest)


def _stream_tags(nnx, module):
  return sorted({node.tag for _, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.RngStream)})


def _apply_plain(nnx, graphdef, rngs, rest, params, inputs):
  return nnx.merge(graphdef, params, rngs, rest)(inputs)


def _apply_stateful(nnx, graphs, rngs, tags, params, inputs, *, state, rng):
  train = rng is not None
  module = nnx.merge(graphs[train], params, rngs, state)
  if train and tags:
    nnx.reseed(module, **{tag: jax.random.fold_in(rng, i) for i, tag in enumerate(tags)})
  outputs = module(inputs)
  return outputs, _split(nnx, module)[3]


def from_nnx(model):
  r"""``(apply_fn, params, state)`` of a flax NNX module, for mlmap's calls.

  The module is split into its weights (``nnx.Param``, as a plain nested dict:
  what priors, curvature and checkpoints see), its random streams
  (``nnx.RngState``) and the rest, its *state* (``nnx.BatchStat`` and any other
  variable). The module itself is not changed (a clone is split).

  * **No state, no random streams** (an MLP, a CNN): ``state`` is None and
    ``apply_fn(params, inputs) -> outputs`` is the ordinary model function:
    ``mm.negative_log_posterior(apply_fn, ...)``.
  * **Batch norm or dropout**: ``state`` is the dict of the non-weight variables
    (``{}`` for dropout alone) and ``apply_fn(params, inputs, *, state, rng) ->
    (outputs, new_state)`` is the stateful model of
    ``mm.negative_log_posterior(..., has_state=True)``. ``rng=None`` runs the
    module in evaluation mode (``module.eval()``: no dropout, running
    statistics); a key runs it in training mode (``module.train()``), with
    every random stream reseeded from that key (stream ``i`` of the sorted tags
    gets ``fold_in(rng, i)``), so the dropout mask is a function of the key and
    the step is reproducible.

  Args:
    model: an ``nnx.Module``.

  Returns:
    ``(apply_fn, params, state)`` as above; ``nnx.merge`` rebuilds the module.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.

  Examples:
    >>> import jax.numpy as jnp, mlmap as mm
    >>> from flax import nnx
    >>> apply_fn, params, state = mm.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> sorted(params), state, apply_fn(params, jnp.ones((4, 3))).shape
    (['bias', 'kernel'], None, (4, 2))
  """
  from flax import nnx
  if not isinstance(model, nnx.Module):
    raise TypeError(f"from_nnx: model must be a flax nnx.Module, got "
                    f"{type(model).__name__}.")
  module = nnx.clone(model)
  graphdef, params, rngs, rest = _split(nnx, module)
  tags = _stream_tags(nnx, module)
  if not rest and not tags:
    return functools.partial(_apply_plain, nnx, graphdef, rngs, rest), params, None
  module.eval()
  graph_eval = _split(nnx, module)[0]
  module.train()
  graph_train = _split(nnx, module)[0]
  apply_fn = functools.partial(_apply_stateful, nnx, (graph_eval, graph_train), rngs, tags)
  return apply_fn, params, rest
