r"""Parameter subsets: a Laplace posterior over some weights, the rest fixed.

A *subset* is a pytree prefix of ``params`` whose leaves are bools (a whole
subtree in or out) or bool arrays shaped exactly like the parameter leaf under
them (element-wise selection, the "subnetwork" Laplace of Daxberger et al.).
The posterior then covers the selected weights :math:`w_S` only; the others stay
at their MAP values :math:`w^*_{\bar S}`:

.. math::
  p(w \mid D) \approx \mathcal N\big(w_S;\, w^*_S,\, A_S^{-1}\big)\,
  \delta\big(w_{\bar S} - w^*_{\bar S}\big)

:func:`make_subset` validates a mask once, at trace time, into a static
:class:`Subset`; :meth:`Subset.split` and :meth:`Subset.merge` move between the
full ``params`` and the selected part ``sub``; :func:`sub_nlp` is the objective
of ``sub`` alone. :func:`last_layer_subset` writes the mask of the last layer
(last-layer Laplace, Kristiadi et al. 2020).

A mask dict may be a plain ``dict`` where ``params`` holds another mapping of
the same keys (a flax ``FrozenDict``, an NNX ``State``): masks are matched by
key, not by container type.

References:
  Daxberger, Nalisnick, Allingham, Antoran, Hernandez-Lobato, "Bayesian Deep
  Learning via Subnetwork Inference", 2021. https://arxiv.org/abs/2010.14689

  Kristiadi, Hein, Hennig, "Being Bayesian, Even Just a Bit, Fixes
  Overconfidence in ReLU Networks", 2020. https://arxiv.org/abs/2002.10118

  Daxberger, Kristiadi, Immer, Eschenhagen, Bauer, Hennig, "Laplace Redux --
  Effortless Bayesian Deep Learning", 2021. https://arxiv.org/abs/2106.14806
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

import jax
import jax.numpy as jnp

from mlmap import _checks
from mlmap import posterior as _posterior
from mlmap import priors as _priors

_WEIGHT_NAMES = ("kernel", "w", "weight")
_AUTO_NAME = re.compile(r"(.+)_(\d+)")
_PRIOR_HINT = "subset needs functools.partial(mm.gaussian_log_prior, sigma=...)"


# --- walking a prefix tree against params -----------------------------------------

def _is_prefix_leaf(x) -> bool:
  return x is None or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _kids(t):
  """``[(key, child), ...]`` one level below ``t``, as ``jax.tree_util`` flattens it."""
  kids, _ = jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: x is not t)
  return [(path[0], child) for path, child in kids]


def _structure(tree):
  return jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is None)


def _prefix_error(fn, name, prefix, params, path, detail):
  return ValueError(
      f"{fn}: {name} tree {_structure(prefix)} is not a prefix of params tree "
      f"{jax.tree_util.tree_structure(params)} (at '{_checks.leaf_path(path)}': {detail}).")


def _prefix_walk(fn, name, prefix, params):
  """``[(key path, prefix leaf, params subtree), ...]`` in ``params``' flatten order.

  Mappings match by key set and sequences by length, whatever their container
  types; any other node must match ``params``' node as ``jax.tree_util`` demands.
  """
  out = []

  def walk(path, p, t):
    if _is_prefix_leaf(p):
      out.append((path, p, t))
      return
    if _is_prefix_leaf(t):
      raise _prefix_error(fn, name, prefix, params, path,
                          f"{type(p).__name__} over a params leaf")
    if isinstance(p, Mapping) or isinstance(t, Mapping):
      if not (isinstance(p, Mapping) and isinstance(t, Mapping)) or set(p) != set(t):
        keys = lambda x: sorted(map(str, x)) if isinstance(x, Mapping) else type(x).__name__  # noqa: E731
        raise _prefix_error(fn, name, prefix, params, path,
                            f"keys {keys(p)} vs params keys {keys(t)}")
      for k, child in _kids(t):
        walk(path + (k,), p[k.key], child)
    elif isinstance(p, (list, tuple)) and isinstance(t, (list, tuple)):
      if len(p) != len(t):
        raise _prefix_error(fn, name, prefix, params, path,
                            f"{len(p)} entries vs {len(t)} in params")
      for i, (k, child) in enumerate(_kids(t)):
        walk(path + (k,), p[i], child)
    else:
      try:
        jax.tree_util.tree_map_with_path(
            lambda q, a, b: out.append((path + tuple(q), a, b)), p, t, is_leaf=_is_prefix_leaf)
      except (ValueError, TypeError) as e:
        raise _prefix_error(fn, name, prefix, params, path, str(e)) from None

  walk((), prefix, params)
  return out


def _expand(fn, name, prefix, params):
  """``[(leaf path string, prefix leaf, params leaf), ...]``, one per params leaf, in order."""
  rows = []
  for path, p, sub in _prefix_walk(fn, name, prefix, params):
    for q, leaf in jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: x is None)[0]:
      rows.append((_checks.leaf_path(path + tuple(q)), p, leaf))
  return rows


# --- the static subset ---------------------------------------------------------------

def _mask_array(mask):
  shape, packed = mask
  return np.frombuffer(packed, dtype=np.bool_).reshape(shape)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Subset:
  """A validated, hashable parameter subset; build it with :func:`make_subset`.

  It is a static pytree (no children), so it may be passed through ``jax.jit``
  and stored in static fields.

  Attributes:
    paths: leaf paths (``'params/Dense_1/kernel'``) of the ``params`` leaves with
      at least one selected entry, in ``params``' flatten order.
    masks: one entry per path: ``None`` (whole leaf) or ``(shape, bytes)``, the
      element-wise bool mask of a partially selected leaf.
    num_params: number of selected scalars.
    elementwise: whether any leaf is partially selected.
    treedef: the ``PyTreeDef`` of the ``params`` it was built for.
    indices: positions of the selected leaves among ``params``' leaves.
    all_paths: the paths of every ``params`` leaf.
    leaf_shapes: the shapes of every ``params`` leaf.
  """
  paths: tuple
  masks: tuple
  num_params: int
  elementwise: bool
  treedef: Any
  indices: tuple
  all_paths: tuple
  leaf_shapes: tuple

  def _leaves(self, fn, tree, name="params"):
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
    if treedef != self.treedef:
      raise ValueError(f"{fn}: {name} tree {treedef} differs from the tree the subset "
                       f"was made for, {self.treedef}.")
    return leaves

  def _selection(self):
    return {i: (None if m is None else _mask_array(m))
            for i, m in zip(self.indices, self.masks)}

  def split(self, params):
    """The selected part ``sub`` of ``params``.

    ``sub`` has ``params``' containers; an unselected leaf is ``None``, a fully
    selected one is the leaf itself, a partially selected one the 1-D array
    ``leaf[mask]`` (row-major order).
    """
    sel = self._selection()
    leaves = self._leaves("Subset.split", params)
    out = []
    for i, leaf in enumerate(leaves):
      if i not in sel:
        out.append(None)
      else:
        out.append(leaf if sel[i] is None else self._take(i, leaf, sel[i]))
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def _check_shape(self, i, leaf, mask):
    if tuple(jnp.shape(leaf)) != mask.shape:
      raise ValueError(f"Subset: params leaf '{self.all_paths[i]}' has shape "
                       f"{tuple(jnp.shape(leaf))}, the subset's mask {mask.shape}.")

  def _take(self, i, leaf, mask):
    self._check_shape(i, leaf, mask)
    return jnp.asarray(leaf)[mask]

  def merge(self, sub, params):
    """``params`` with the selected entries replaced by ``sub``'s (the inverse of :meth:`split`).

    Works under ``jit`` with a traced ``sub``; partial leaves use
    ``leaf.at[mask].set(sub_leaf)`` with the static mask.
    """
    sel = self._selection()
    leaves = self._leaves("Subset.merge", params)
    subs = self._leaves("Subset.merge", sub, "sub")
    out = []
    for i, (leaf, s) in enumerate(zip(leaves, subs)):
      if i not in sel:
        out.append(leaf)
        continue
      if s is None:
        raise ValueError(f"Subset.merge: sub has None at the selected leaf "
                         f"'{self.all_paths[i]}'.")
      if sel[i] is None:
        out.append(s)
      else:
        self._check_shape(i, leaf, sel[i])
        out.append(jnp.asarray(leaf).at[sel[i]].set(s))
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def restrict_scale(self, fn: str, scale):
    """A prior scale of ``params`` turned into the matching scale of ``sub``.

    Args:
      fn: the public function to name in error messages.
      scale: a scalar (returned as is), ``None``, or a prefix tree of ``params``
        with scalar, array or ``None`` leaves.

    Returns:
      The scale tree for ``sub``: ``params``' containers with ``None`` on the
      unselected leaves; scalars pass through, arrays are broadcast to the leaf
      shape (then ``[mask]`` for partial leaves), ``None`` stays ``None``.

    Raises:
      ValueError: ``scale`` is not a prefix of the params structure, or an
        array leaf does not broadcast to its parameter leaf (path and shapes named).
    """
    if scale is None or (not isinstance(scale, (Mapping, list, tuple))
                         and _is_prefix_leaf(scale) and jnp.ndim(scale) == 0):
      return scale
    shapes = jax.tree_util.tree_unflatten(
        self.treedef, [None if n is None else jax.ShapeDtypeStruct(n, jnp.float32)
                       for n in self.leaf_shapes])
    sel = self._selection()
    out = []
    for i, (path, s, _) in enumerate(_expand(fn, "prior scale", scale, shapes)):
      if i not in sel or s is None:
        out.append(None)
      elif jnp.ndim(s) == 0:
        out.append(s)
      else:
        out.append(self._restrict_array(fn, i, path, s, sel[i]))
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def _restrict_array(self, fn, i, path, s, mask):
    shape = self.leaf_shapes[i]
    if not _checks.broadcasts_to(jnp.shape(s), shape):
      raise ValueError(f"{fn}: prior scale at '{path}' has shape {jnp.shape(s)}, which "
                       f"does not broadcast to the parameter shape {shape}.")
    s = jnp.broadcast_to(s, shape)
    return s if mask is None else s[mask]

  def leaf_status(self, params) -> dict:
    """``{leaf path: "in" | "out" | "partial"}`` for every leaf of ``params``."""
    self._leaves("Subset.leaf_status", params)
    status = {p: "out" for p in self.all_paths}
    for path, m in zip(self.paths, self.masks):
      status[path] = "in" if m is None else "partial"
    return status

  def flat_mask(self):
    """``[P]`` numpy bool: the selected entries in ``ravel_pytree(params)`` order."""
    sel = self._selection()
    parts = []
    for i, shape in enumerate(self.leaf_shapes):
      n = 0 if shape is None else int(np.prod(shape, dtype=np.int64))
      if i not in sel:
        parts.append(np.zeros(n, bool))
      else:
        parts.append(np.ones(n, bool) if sel[i] is None else sel[i].ravel())
    return np.concatenate(parts) if parts else np.zeros(0, bool)


# --- validating a mask -----------------------------------------------------------------

def _leaf_dtype(m):
  """``m``'s dtype (``None`` when it has none: a string, a function, ``None``)."""
  if hasattr(m, "dtype"):
    return np.dtype(m.dtype)
  try:
    return np.result_type(m) if m is not None else None
  except TypeError:
    return None


def _mask_leaf(fn, where, m):
  """A subset leaf as a Python bool or an ``ndim >= 1`` numpy bool array."""
  if not _checks.is_concrete(m):
    raise ValueError(
        f"{fn}: subset leaf '{where}' is traced (built inside jit?); the mask must be "
        "concrete (Python bools or numpy bool arrays known at trace time), since it "
        "decides which parameters the posterior covers.")
  if isinstance(m, (bool, np.bool_)):
    return bool(m)
  dtype = _leaf_dtype(m)
  if not hasattr(m, "dtype") or dtype != np.bool_:
    desc = type(m).__name__ + ("" if dtype is None else f" of dtype {dtype}")
    hint = (" (0/1 numbers are not masks: use True/False or .astype(bool))"
            if dtype is not None and np.issubdtype(dtype, np.number) else "")
    raise TypeError(f"{fn}: subset leaf '{where}' must be a bool or a bool array, got "
                    f"{desc}{hint}.")
  arr = np.asarray(m)
  return bool(arr) if arr.ndim == 0 else arr


def _selection_rows(fn, subset, params):
  """``[(path, params leaf, True | False | bool array), ...]`` in params' flatten order."""
  rows = []
  for path, m, sub in _prefix_walk(fn, "subset", subset, params):
    where = _checks.leaf_path(path)
    m = _mask_leaf(fn, where, m)
    leaves = jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: x is None)[0]
    if isinstance(m, np.ndarray):
      if len(leaves) != 1 or leaves[0][1] is None:
        raise ValueError(
            f"{fn}: subset leaf '{where}' is a bool array of shape {m.shape} over "
            f"{len(leaves)} params leaves; an array mask must sit on one params leaf "
            "(mark a whole subtree with True/False).")
      if tuple(jnp.shape(leaves[0][1])) != m.shape:
        raise ValueError(
            f"{fn}: subset mask at '{where}' has shape {m.shape}, the params leaf "
            f"has shape {tuple(jnp.shape(leaves[0][1]))}; they must be equal.")
    for q, leaf in leaves:
      rows.append((_checks.leaf_path(path + tuple(q)), leaf, m))
  return rows


def make_subset(fn: str, params, subset) -> Optional[Subset]:
  """Validate a subset mask against ``params`` into a static :class:`Subset`.

  Args:
    fn: the public function to name in error messages.
    params: the parameter pytree (the MAP).
    subset: ``None``, a :class:`Subset` made for ``params``' structure, or a
      pytree prefix of ``params`` whose leaves are bools (a subtree in or out) or
      bool arrays shaped exactly like the params leaf under them.

  Returns:
    ``None`` when ``subset`` is ``None``, else the :class:`Subset`.

  Raises:
    ValueError: ``subset`` is not a prefix of ``params`` (both structures
      named), a bool array's shape differs from its params leaf (path and both
      shapes named) or spans several leaves, nothing is selected, or a mask leaf
      is traced (the mask must be concrete).
    TypeError: a mask leaf is not a bool or bool array (path and dtype named:
      0/1 integers and floats are refused), or a selected params leaf is not
      floating.

  Examples:
    >>> import numpy as np
    >>> from mlmap.subset import make_subset
    >>> params = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    >>> s = make_subset("laplace", params, {"w": np.eye(2, dtype=bool), "b": True})
    >>> s.num_params, s.leaf_status(params)
    (4, {'b': 'in', 'w': 'partial'})
  """
  if subset is None:
    return None
  if isinstance(subset, Subset):
    subset._leaves(fn, params)
    return subset
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=lambda x: x is None)
  rows = _selection_rows(fn, subset, params)
  canonical = [_checks.leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: x is None)[0]]
  if [r[0] for r in rows] != canonical:  # the walk follows jax's order; guard it
    raise ValueError(f"{fn}: internal error matching the subset to params leaves "
                     f"{canonical}.")
  paths, masks, indices, bad, count = [], [], [], [], 0
  for i, (path, leaf, m) in enumerate(rows):
    n = int(np.sum(m)) if isinstance(m, np.ndarray) else int(m) * int(np.size(leaf))
    if leaf is None or n == 0:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      bad.append(f"'{path}' ({jnp.result_type(leaf)})")
    full = not isinstance(m, np.ndarray) or n == m.size
    paths.append(path)
    indices.append(i)
    masks.append(None if full else (m.shape, m.tobytes()))
    count += n
  if bad:
    raise TypeError(f"{fn}: subset selects non-floating params leaves {', '.join(bad)}; "
                    "a counter or a mask is not a weight: mark it False in the subset.")
  if count == 0:
    raise ValueError(f"{fn}: subset selects no parameter (every params leaf "
                     f"{canonical} is out); mark at least one True.")
  shapes = tuple(None if x is None else tuple(jnp.shape(x)) for x in leaves)
  return Subset(tuple(paths), tuple(masks), count, any(m is not None for m in masks),
                treedef, tuple(indices), tuple(canonical), shapes)


# --- the objective of the selected part -------------------------------------------------

def _gaussian_sigma(fn, log_prior):
  """``sigma`` of ``functools.partial(gaussian_log_prior, sigma=...)``; ``ValueError`` otherwise."""
  keywords, func = {}, log_prior
  while isinstance(func, functools.partial) and not func.args:
    keywords = {**func.keywords, **keywords}
    func = func.func
  if func is not _priors.gaussian_log_prior or set(keywords) - {"sigma"}:
    raise ValueError(f"{fn}: {_PRIOR_HINT}; got log_prior {log_prior!r}.")
  return keywords.get("sigma", 1.0)


def sub_nlp(nlp, subset: Subset, params) -> _posterior.NegativeLogPosterior:
  r"""The negative log-posterior of the selected parameters, the others fixed.

  .. math::
    \mathrm{nlp}_S(w_S) = -\frac{N}{B}\sum_{i=1}^{B}
      \log p\big(t_i \mid f(x_i;\, \mathrm{merge}(w_S, w^*))\big)
      - \log \mathcal N\big(w_S;\, 0,\, \mathrm{diag}(\sigma_S^2)\big)

  It equals ``nlp(merge(w_S, w*))`` plus the log prior of the fixed entries
  (a constant): its gradient and curvature are the ``S`` blocks of ``nlp``'s.

  Args:
    nlp: a :class:`mlmap.NegativeLogPosterior` whose ``log_prior`` is
      ``functools.partial(mm.gaussian_log_prior, sigma=...)`` (sigma a scalar or
      a prefix tree of ``params``).
    subset: a :class:`Subset` made for ``params`` (see :func:`make_subset`).
    params: the full parameters; the unselected entries stay at these values.

  Returns:
    A :class:`mlmap.NegativeLogPosterior` over ``sub = subset.split(params)``,
    with the same ``log_likelihood`` and ``num_data`` and the Gaussian prior
    restricted to the subset (``sigma = subset.restrict_scale(sigma)``).

  Raises:
    ValueError: ``nlp``'s prior is not a built-in Gaussian prior, or
      ``params`` does not have the structure the subset was made for.
    TypeError: ``nlp`` is not a negative log-posterior or ``subset`` not a
      :class:`Subset`.
  """
  fn = "sub_nlp"
  if not isinstance(subset, Subset):
    raise TypeError(f"{fn}: subset must be a Subset (see make_subset), got "
                    f"{type(subset).__name__}.")
  if not all(hasattr(nlp, a) for a in ("apply_fn", "log_likelihood", "log_prior")):
    raise TypeError(f"{fn}: nlp must be a NegativeLogPosterior (mm.negative_log_posterior), "
                    f"got {type(nlp).__name__}.")
  subset._leaves(fn, params)
  sigma = subset.restrict_scale(fn, _gaussian_sigma(fn, nlp.log_prior))
  apply_fn = nlp.apply_fn

  def sub_apply(sub, inputs):
    return apply_fn(subset.merge(sub, params), inputs)

  return _posterior.NegativeLogPosterior(
      sub_apply, nlp.log_likelihood,
      functools.partial(_priors.gaussian_log_prior, sigma=sigma), nlp.num_data)


# --- the last layer ------------------------------------------------------------------------

def _is_layer(node) -> bool:
  """A mapping holding a weight ("kernel"/"w"/"weight") of rank >= 2."""
  if not isinstance(node, Mapping):
    return False
  for k in _WEIGHT_NAMES:
    if k in node:
      leaves = jax.tree_util.tree_leaves(node[k])
      if len(leaves) == 1 and len(getattr(leaves[0], "shape", np.shape(leaves[0]))) >= 2:
        return True
  return False


def _holds_layer(node) -> bool:
  if _is_layer(node):
    return True
  if isinstance(node, Mapping):
    return any(_holds_layer(node[k]) for k in node)
  if isinstance(node, (list, tuple)):
    return any(_holds_layer(v) for v in node)
  return False


def _pick_last(keys):
  """The last of a mapping's layer keys (in order): int keys by value, ``<Type>_<i>`` by i."""
  if all(isinstance(k, int) for k in keys):
    return max(keys)
  last = _AUTO_NAME.fullmatch(str(keys[-1]))
  if last is None:
    return keys[-1]
  same = [(int(m.group(2)), i) for i, k in enumerate(keys)
          if (m := _AUTO_NAME.fullmatch(str(k))) and m.group(1) == last.group(1)]
  return keys[max(same)[1]]


def _last_layer_path(node):
  path = []
  while not _is_layer(node):
    if isinstance(node, Mapping):
      key = _pick_last([k for k in node if _holds_layer(node[k])])
    else:
      key = [i for i, v in enumerate(node) if _holds_layer(v)][-1]
    path.append(key)
    node = node[key]
  return path


def _mark(node, path):
  """A bool prefix of ``node``: ``True`` at ``path``, ``False`` beside it, containers kept."""
  if not path:
    return True
  kids, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  out = []
  for i, (k, child) in enumerate(kids):
    here = k[0].key if isinstance(node, Mapping) else i
    out.append(_mark(child, path[1:]) if here == path[0] else False)
  return jax.tree_util.tree_unflatten(treedef, out)


def last_layer_subset(params):
  """A bool prefix tree of ``params`` selecting the last layer (last-layer Laplace).

  A *layer* is a mapping that holds a weight named ``"kernel"``, ``"w"`` or
  ``"weight"`` of rank >= 2 (flax ``Dense``/``Conv``, NNX ``Linear``/``Conv``, a
  dict layer); every leaf of the last layer (weight and bias) is marked ``True``,
  everything else ``False``. From the root down, among the entries that hold a
  layer somewhere below:

  1. in a list or tuple, or a mapping with int keys (an NNX list of layers), the
     highest index is last;
  2. in a mapping, the last entry in the mapping's order is last, except that
     flax auto-names ``<Type>_<i>`` count by index: if the last entry is
     ``Dense_9``, the ``Dense_<i>`` with the highest ``i`` wins (``Dense_11``:
     so the rule survives a ``jax.tree_util`` round trip, which sorts keys);
  3. if that entry is not itself a layer, the rule repeats inside it (a
     ``Sequential``, a ``"params"`` collection, a named submodule).

  flax linen's ``init`` keeps modules in the order they are created, so the last
  created layer wins (``Conv_0, Conv_1, Dense_0`` gives ``Dense_0``). But
  ``jax.jit``, ``jax.eval_shape``, ``tree_map`` and optax updates return dicts
  with *sorted* keys, and an NNX ``State`` sorts its keys too: there, for
  *named* submodules (``trunk``, ``head``) "last" means alphabetically last.
  Check the choice with :meth:`Subset.leaf_status`, or write the mask by hand.
  Layers without such a weight (a final ``LayerNorm``) are never the last layer.

  Args:
    params: a flax linen params dict (with or without the ``"params"``
      wrapper), an NNX ``State`` (``nnx.split(model)``), a dict with a list of
      layer dicts, or a list/tuple of layer dicts.

  Returns:
    A prefix tree of ``params`` (same containers) with bool leaves.

  Raises:
    ValueError: no entry holds a rank >= 2 weight named as above (e.g. a flat
      ``{"w1", "b1", "w2", "b2"}`` dict); the message shows the top-level keys and
      how to write the mask by hand.

  Examples:
    >>> import numpy as np
    >>> from mlmap.subset import last_layer_subset
    >>> layer = lambda m, n: {"w": np.zeros((m, n)), "b": np.zeros(n)}
    >>> last_layer_subset({"layers": [layer(3, 4), layer(4, 1)]})
    {'layers': [False, True]}
    >>> last_layer_subset({"params": {"Dense_0": layer(3, 4), "Dense_1": layer(4, 1)}})
    {'params': {'Dense_0': False, 'Dense_1': True}}
  """
  if not _holds_layer(params):
    if isinstance(params, Mapping):
      keys = list(params)
      shown = f"top-level keys {keys}"
      hint = "{" + ", ".join(f"{k!r}: False" for k in keys) + "}"
    else:
      shown = f"params of type {type(params).__name__}"
      hint = "a bool (or bool array) per params leaf"
    raise ValueError(
        f"last_layer_subset: cannot decide which layer is last in {shown}: no entry "
        f"holds a weight named {'/'.join(_WEIGHT_NAMES)} of rank >= 2. Write the mask "
        f"by hand, e.g. {hint} with True on the last layer's entries "
        "(for {'w1', 'b1', 'w2', 'b2'}: {'w1': False, 'b1': False, 'w2': True, 'b2': True}).")
  return _mark(params, _last_layer_path(params))
