r"""Objectives and curvature over a data set given as batches: the data term summed, the prior once.

A data set is an iterable of ``(inputs, targets)`` batches that partition the
``N = nlp.num_data`` examples: a list or tuple of batches, any re-iterable loader
(``iter(data)`` returns a fresh iterator each time), or a zero-argument function
returning a fresh iterable (a generator factory such as ``lambda: loader(seed)``).
Every function here computes the one-batch result on the concatenated data,

.. math::
  \sum_{b}\sum_{i \in b} c_i(w) + c_{\mathrm{prior}}(w)
  \;=\; c\big(w; X_{1:N}, T_{1:N}\big) \quad\text{with}\quad \frac{N}{B} = 1,

where :math:`c_i` is example ``i``'s term (its NLL, gradient, or curvature
product) and :math:`c_{\mathrm{prior}}` the prior's, added once. Each batch is
evaluated with a copy of ``nlp`` whose ``num_data`` is ``None`` (so its scale
``N/B`` is 1, not ``N/B_b``) and whose ``log_prior`` is ``None``; rescaling one
batch by ``N/B_b``, or adding the prior per batch, would count the data or the
prior more than once.

**Passes.** A curvature product (:func:`dataset_matvec`) walks the data on every
call, so it refuses a one-shot iterator (a generator object) with a ``TypeError``
instead of silently materializing it on the device; pass a list, a re-iterable
loader, or a generator factory. The one-pass functions (:func:`accumulate`,
:func:`dataset_value_and_grad`, :func:`dataset_diagonal`) accept one-shot
iterators too.

**Compilation and synchronization.** The per-batch function is a ``jax.jit``
(module-level, with ``nlp`` and the builder as static arguments), so it is traced
and compiled once per distinct batch shape and reused across calls with equal
``nlp``: a loader of equal batches plus a ragged last batch compiles at most twice.
A loader whose batch sizes all differ compiles once per size; pad the batches or
drop the remainder in that case. Results are summed on the device; no value is
read back to the host per batch (the batch-size check uses static shapes only).

**Cost.** Nothing is cached between products: each product re-runs every batch's
forward pass, so memory stays at one batch's activations (as laplace-torch's
``fit(loader)``). Under ``jax.jit`` (e.g. inside :func:`mlmap.cg`'s while loop) the
walk is unrolled at trace time and the batches become constants of the compiled
program; for large data sets drive the solver from Python instead.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import curvature
from mlmap import dense
from mlmap import posterior

# Names accepted for ``vp_fn`` / ``diag_fn``, as strings.
_VP_BUILDERS = {
    "ggn": curvature.ggn_vp_fn,
    "fisher": curvature.fisher_vp_fn,
    "empirical_fisher": curvature.empirical_fisher_vp_fn,
    "hessian": curvature.hvp_fn,
}
_DIAGONALS = {"ggn": dense.ggn_diagonal, "fisher": dense.fisher_diagonal}
# The one-shot products, mapped to the builder the user meant.
_PRODUCTS = {
    curvature.ggn_vp: "mm.ggn_vp_fn",
    curvature.fisher_vp: "mm.fisher_vp_fn",
    curvature.empirical_fisher_vp: "mm.empirical_fisher_vp_fn",
    curvature.hvp: "mm.hvp_fn",
    curvature.mc_fisher_vp: "a builder (mc_fisher_vp has none)",
}


# --- walking the data ----------------------------------------------------------

def _is_one_shot(data) -> bool:
  try:
    return iter(data) is data
  except TypeError:
    return False


def _check_data(fn: str, data, passes: str) -> None:
  """Refuse what is not a data set; refuse a one-shot iterator when ``passes="many"``."""
  if callable(data):
    return
  if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
    raise TypeError(f"{fn}: data must be an iterable of (inputs, targets) batches or a "
                    f"zero-argument function returning one, got {type(data).__name__}.")
  if passes == "many" and _is_one_shot(data):
    raise TypeError(
        f"{fn}: data is a one-shot iterator ({type(data).__name__}); every product "
        "walks the data again, and a second walk would see no batches. Pass a list "
        "of batches, a re-iterable loader, or a zero-argument function returning a "
        "fresh iterator (e.g. data=lambda: make_batches()).")


def _batches(fn: str, data):
  """Iterate ``data`` (calling it first if it is a factory), checking each batch."""
  it = data() if callable(data) else data
  for k, batch in enumerate(it):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
      what = type(batch).__name__
      if hasattr(batch, "shape"):
        what += f" of shape {tuple(batch.shape)}"
      raise TypeError(f"{fn}: batch {k} of data must be an (inputs, targets) pair, got "
                      f"{what}; for a single batch write data=[(inputs, targets)].")
    yield batch[0], batch[1]


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


_tree_add_jit = jax.jit(_tree_add)


def _as_jitted(f):
  """``f`` itself when it is (a ``functools.partial`` of) a ``jax.jit`` function.

  Wrapping a fresh partial in ``jax.jit`` again would start an empty cache and
  compile again on every call.
  """
  inner = f
  while isinstance(inner, functools.partial):
    inner = inner.func
  return f if hasattr(inner, "lower") else jax.jit(f)


def accumulate(per_batch: Callable[..., Any], data, init=None, *, args=(),
               num_data=None, fn: str = "accumulate"):
  r"""Sum a per-batch pytree over the batches of a data set, on the device.

  .. math::
    \mathrm{init} + \sum_{b} \mathrm{per\_batch}(*\mathrm{args}, X_b, T_b)

  ``per_batch`` is wrapped in ``jax.jit`` unless it already is one (or a
  ``functools.partial`` of one). ``jax.jit`` caches on the function object, so
  pass the same function, not a fresh lambda, to reuse compilations, and put what
  changes between calls in ``args``. It is traced once per distinct
  batch shape: equal batches plus a ragged last batch compile at most twice. The
  partial sums stay on the device; nothing is read back per batch.

  Args:
    per_batch: ``per_batch(*args, inputs, targets) -> pytree``, the same
      structure and shapes for every batch.
    data: an iterable of ``(inputs, targets)`` batches, or a zero-argument
      function returning one. One pass is made; a one-shot generator is fine.
    init: pytree to start the sum from (e.g. the prior's term), or ``None``.
    args: leading arguments of ``per_batch`` (params, a tangent vector, ...).
    num_data: when given, the batch sizes must sum to it.
    fn: the public function to name in error messages.

  Returns:
    The sum, a pytree like ``per_batch``'s result.

  Raises:
    ValueError: ``data`` has no batches, or (with ``num_data``) its batch sizes
      do not sum to ``num_data``; both numbers are named.
    TypeError: ``data`` is not iterable, or a batch is not an ``(inputs,
      targets)`` pair.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlmap.data import accumulate
    >>> batches = [(jnp.arange(3.0), None), (jnp.arange(2.0), None)]
    >>> float(accumulate(lambda x, t: jnp.sum(x), batches, num_data=5))
    4.0
  """
  _check_data(fn, data, "one")
  step = _as_jitted(per_batch)
  total, seen, count = init, 0, 0
  for inputs, targets in _batches(fn, data):
    seen += posterior.batch_size(inputs)
    count += 1
    out = step(*args, inputs, targets)
    total = out if total is None else _tree_add_jit(total, out)
  if count == 0:
    raise ValueError(f"{fn}: data yielded no batches.")
  if num_data is not None and seen != num_data:
    raise ValueError(
        f"{fn}: the batches of data hold {seen} examples in {count} batches, but "
        f"nlp.num_data = {num_data}. The data term of every batch is counted once "
        "(scale 1), so the batches must partition the num_data examples exactly; "
        "a mismatch would double-count or leave out part of the data term.")
  return total


# --- the nlp, split into its data and prior parts --------------------------------

def _data_only(fn: str, nlp):
  """A copy of ``nlp`` with scale 1 and no prior: one batch's exact data term."""
  if not all(hasattr(nlp, a) for a in ("apply_fn", "log_likelihood", "log_prior",
                                       "num_data", "prior_term")) \
      or not dataclasses.is_dataclass(nlp):
    raise TypeError(f"{fn} needs an mlmap.NegativeLogPosterior (built with "
                    f"mm.negative_log_posterior), got {type(nlp).__name__}.")
  n = nlp.num_data
  if n is None:
    raise ValueError(f"{fn}: nlp.num_data is None; set num_data to N, the total "
                     "number of examples in data, e.g. mm.negative_log_posterior("
                     "..., num_data=N).")
  return dataclasses.replace(nlp, num_data=None, log_prior=None)


def _static_kwargs(fn: str, kwargs):
  items = tuple(sorted(kwargs.items()))
  try:
    hash(items)
  except TypeError:
    raise TypeError(f"{fn}: the extra keyword arguments {sorted(kwargs)} must be "
                    "hashable (they are static arguments of the jitted per-batch "
                    "function); close over arrays in a function instead.") from None
  return items


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_vp(builder, nlp_data, kw, params, vector, inputs, targets):
  return builder(nlp_data, params, inputs, targets, **dict(kw))(vector)


@functools.partial(jax.jit, static_argnums=(0,))
def _prior_vp(nlp, params, vector):
  if nlp.log_prior is None:
    return jax.tree_util.tree_map(jnp.zeros_like, vector)
  return curvature.hvp_fn(nlp.prior_term, params)(vector)


def _resolve(fn: str, what: str, given, table):
  if isinstance(given, str):
    if given not in table:
      raise ValueError(f"{fn}: {what} must be one of {sorted(table)} or a function, "
                       f"got {given!r}.")
    return table[given]
  if not callable(given):
    raise TypeError(f"{fn}: {what} must be callable or one of {sorted(table)}, got "
                    f"{type(given).__name__}.")
  try:
    builder_name = _PRODUCTS.get(given)
  except TypeError:
    builder_name = None
  if builder_name is not None:
    raise TypeError(f"{fn}: {what} takes the builder (nlp, params, inputs, targets) "
                    f"-> matvec, not the one-shot product {given.__name__}; pass "
                    f"{builder_name}.")
  return given


def dataset_matvec(vp_fn, nlp, params, data, **kwargs):
  r"""A curvature-vector product over a whole data set: data term summed, prior once.

  .. math::
    M v = \sum_{b}\sum_{i \in b} M_i v + \nabla^2_w\big(-\log p(w)\big)\, v

  with :math:`M_i` example ``i``'s curvature: :math:`J_i^\top H_{z_i} J_i` (GGN),
  :math:`J_i^\top F_{z_i} J_i` (Fisher), :math:`g_i g_i^\top` (empirical Fisher)
  or :math:`\nabla^2_w(-\log p(t_i \mid f(x_i; w)))` (Hessian). When the batches
  partition the ``N = nlp.num_data`` examples this equals ``vp_fn``'s product on
  the concatenated data in one batch. Each batch is evaluated with
  ``num_data=None`` (scale 1, not ``N/B_b``) and no prior; the prior's Hessian
  product is added once.

  Every call walks ``data`` again (one jitted product per batch, summed on the
  device; see the module notes on compilation), so ``data`` must be re-iterable.

  Args:
    vp_fn: a builder ``vp_fn(nlp, params, inputs, targets, **kwargs) -> matvec``:
      :func:`mlmap.ggn_vp_fn`, :func:`mlmap.fisher_vp_fn`,
      :func:`mlmap.empirical_fisher_vp_fn` or :func:`mlmap.hvp_fn` (which gets the
      data-only ``nlp`` as its scalar function), or the names ``"ggn"``,
      ``"fisher"``, ``"empirical_fisher"``, ``"hessian"``. It must be hashable
      (a module-level function or a ``functools.partial`` of one).
    nlp: an :class:`mlmap.NegativeLogPosterior` with ``num_data`` set to ``N``.
    params: pytree where the curvature is taken.
    data: a list of ``(inputs, targets)`` batches, a re-iterable loader, or a
      zero-argument function returning a fresh iterable. Not a one-shot
      generator.
    **kwargs: static keyword arguments for ``vp_fn`` (e.g. ``output_fisher_vp``).

  Returns:
    ``matvec(vector) -> pytree`` like ``params``.

  Raises:
    ValueError: ``nlp.num_data`` is ``None``; (at each product) the batch sizes do
      not sum to ``nlp.num_data``; ``vector`` unlike ``params``.
    TypeError: ``data`` is a one-shot iterator or not iterable; ``vp_fn`` is a
      one-shot product such as ``mm.ggn_vp`` instead of its builder.

  Examples:
    >>> import functools, jax.numpy as jnp, mlmap as mm
    >>> from mlmap.data import dataset_matvec
    >>> nlp = mm.negative_log_posterior(
    ...     lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...     functools.partial(mm.gaussian_log_prior, sigma=1.0), num_data=3)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> data = [(x[:2], jnp.zeros(2)), (x[2:], jnp.zeros(1))]
    >>> matvec = dataset_matvec(mm.ggn_vp_fn, nlp, jnp.zeros(2), data)
    >>> matvec(jnp.array([1.0, 0.0])).tolist()  # (X^T X + I) e_1
    [3.0, 1.0]

  References:
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, https://arxiv.org/abs/1412.1193.
    Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
    NeurIPS 2021, https://arxiv.org/abs/2106.14806.
  """
  fn = "dataset_matvec"
  builder = _resolve(fn, "vp_fn", vp_fn, _VP_BUILDERS)
  nlp_data = _data_only(fn, nlp)
  kw = _static_kwargs(fn, kwargs)
  _check_data(fn, data, "many")
  step = functools.partial(_batch_vp, builder, nlp_data, kw)

  def matvec(vector):
    _checks.check_tree_like(fn, "vector", vector, params)
    v = jax.tree_util.tree_map(lambda a, p: jnp.asarray(a, jnp.result_type(p)),
                               vector, params)
    return accumulate(step, data, _prior_vp(nlp, params, v), args=(params, v),
                      num_data=nlp.num_data, fn=fn)
  return matvec


# --- objective and gradient ------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,))
def _batch_value_and_grad(nlp_data, params, inputs, targets):
  return jax.value_and_grad(nlp_data)(params, inputs, targets)


@functools.partial(jax.jit, static_argnums=(0,))
def _prior_value_and_grad(nlp, params):
  return jax.value_and_grad(nlp.prior_term)(params)


def dataset_value_and_grad(nlp, params, data):
  r"""The full-data negative log-posterior and its gradient, prior counted once.

  .. math::
    \mathrm{nlp}(w; D) = -\sum_{b}\sum_{i \in b}\log p\big(t_i \mid f(x_i; w)\big)
                         - \log p(w), \qquad \nabla_w \mathrm{nlp}(w; D)

  equal to ``jax.value_and_grad(nlp)(params, X, T)`` on the concatenated data
  with ``num_data = N`` (scale ``N/N = 1``). One pass over ``data``; a one-shot
  generator is accepted.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior` with ``num_data`` set to ``N``.
    params: pytree.
    data: an iterable of ``(inputs, targets)`` batches partitioning the ``N``
      examples, or a zero-argument function returning one.

  Returns:
    ``(value, grad)``: a scalar and a pytree like ``params``.

  Raises:
    ValueError: ``nlp.num_data`` is ``None``, or the batch sizes do not sum to it.
  """
  fn = "dataset_value_and_grad"
  nlp_data = _data_only(fn, nlp)
  return accumulate(functools.partial(_batch_value_and_grad, nlp_data), data,
                    _prior_value_and_grad(nlp, params), args=(params,),
                    num_data=nlp.num_data, fn=fn)


# --- exact diagonals ----------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_diagonal(diag_fn, nlp_data, kw, params, inputs, targets):
  return diag_fn(nlp_data, params, inputs, targets, **dict(kw))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prior_diag(nlp, chunk_size, params):
  _, unravel = ravel_pytree(params)
  return unravel(dense._prior_diagonal("dataset_diagonal", nlp, params, chunk_size))


def dataset_diagonal(diag_fn, nlp, params, data, **kwargs):
  r"""Exact curvature diagonal over a data set: data term summed, prior once.

  .. math::
    \mathrm{diag}(M) = \sum_{b}\mathrm{diag}\Big(\sum_{i \in b} M_i\Big)
                       + \mathrm{diag}\,\nabla^2_w\big(-\log p(w)\big)

  for :func:`mlmap.ggn_diagonal` (:math:`M_i = J_i^\top H_{z_i} J_i`) or
  :func:`mlmap.fisher_diagonal` (:math:`M_i = J_i^\top F_{z_i} J_i`), each batch
  with scale 1 and no prior, the prior's diagonal added once. Equals ``diag_fn``
  on the concatenated data. One pass; a one-shot generator is accepted.

  Args:
    diag_fn: :func:`mlmap.ggn_diagonal`, :func:`mlmap.fisher_diagonal`, the
      names ``"ggn"`` / ``"fisher"``, or any hashable function with their
      signature ``diag_fn(nlp, params, inputs, targets, **kwargs) -> pytree``.
    nlp: an :class:`mlmap.NegativeLogPosterior` with ``num_data`` set to ``N``.
    params: pytree.
    data: an iterable of ``(inputs, targets)`` batches, or a zero-argument
      function returning one.
    **kwargs: static keyword arguments for ``diag_fn`` (``chunk_size``,
      ``output_fisher_vp``).

  Returns:
    A pytree like ``params`` holding the diagonal.

  Raises:
    ValueError: ``nlp.num_data`` is ``None``, or the batch sizes do not sum to it.
  """
  fn = "dataset_diagonal"
  diag = _resolve(fn, "diag_fn", diag_fn, _DIAGONALS)
  nlp_data = _data_only(fn, nlp)
  kw = _static_kwargs(fn, kwargs)
  chunk_size = kwargs.get("chunk_size")
  if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral)
                                 or isinstance(chunk_size, bool) or chunk_size < 1):
    raise ValueError(f"{fn}: chunk_size must be an integer >= 1, got {chunk_size!r}.")
  return accumulate(functools.partial(_batch_diagonal, diag, nlp_data, kw), data,
                    _prior_diag(nlp, chunk_size, params), args=(params,),
                    num_data=nlp.num_data, fn=fn)
