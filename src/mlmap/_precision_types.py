"""Leaf shapes, the per-leaf prior and the four precision types of :mod:`mlmap._precisions` (private)."""


import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from jax import lax
from jax import tree_util

from mlmap import _checks

_HIGHEST = lax.Precision.HIGHEST

def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST)


# --- leaf shapes and the prior ------------------------------------------------

@tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LeafShapes:
  """Static shapes and paths of the parameter leaves (``tree_leaves`` order).

  Attributes:
    shapes: one shape tuple per leaf.
    paths: one path string per leaf (``_checks.leaf_path`` form).
  """
  shapes: tuple
  paths: tuple

  @property
  def size(self) -> int:
    """``P``, the number of scalar parameters."""
    return sum(math.prod(s) for s in self.shapes)


def leaf_shapes(params) -> LeafShapes:
  """The :class:`LeafShapes` of a parameter pytree (values are not read)."""
  if isinstance(params, LeafShapes):
    return params
  flat = tree_util.tree_flatten_with_path(params)[0]
  return LeafShapes(tuple(tuple(int(d) for d in jnp.shape(x)) for _, x in flat),
                    tuple(_checks.leaf_path(p) for p, _ in flat))


def _per_leaf(fn, leaf_prec, shapes: LeafShapes):
  """``leaf_prec`` as a tuple with one entry per leaf, checked."""
  n = len(shapes.shapes)
  if not isinstance(leaf_prec, (tuple, list)):
    if jnp.ndim(leaf_prec) != 0:
      raise ValueError(f"{fn}: leaf_prec must be a scalar or a tuple aligned with "
                       f"tree_leaves(params) ({n} leaves), got an array of shape "
                       f"{jnp.shape(leaf_prec)}.")
    leaf_prec = (leaf_prec,) * n
  if len(leaf_prec) != n:
    raise ValueError(f"{fn}: leaf_prec has {len(leaf_prec)} entries, params has "
                     f"{n} leaves ({list(shapes.paths)}).")
  for entry, shape, path in zip(leaf_prec, shapes.shapes, shapes.paths):
    if not _checks.broadcasts_to(jnp.shape(entry), shape):
      raise ValueError(f"{fn}: the prior precision of leaf '{path}' has shape "
                       f"{jnp.shape(entry)}, which does not broadcast to the "
                       f"leaf's shape {shape}.")
    _checks.check_positive(f"the prior precision of leaf '{path}'", entry, fn)
  return tuple(leaf_prec)


def flat_prior(leaf_prec, params_like, dtype=None):
  r"""The prior precision as a flat ``[P]`` vector in ``ravel_pytree`` order.

  .. math::
    d = \mathrm{ravel}\big(\mathrm{broadcast}(\delta_j, \text{leaf}_j)\big)_j,
    \qquad \delta_j = 1/\sigma_j^2 > 0

  Args:
    leaf_prec: a tuple aligned with ``jax.tree_util.tree_leaves(params_like)``,
      each entry a scalar or an array broadcasting to its leaf; or one scalar
      for all leaves.
    params_like: the parameter pytree (shapes only) or a :class:`LeafShapes`.
    dtype: the result dtype (default: the entries' promoted dtype, at least
      ``float``).

  Returns:
    ``[P]`` array.

  Raises:
    ValueError: wrong number of entries, an entry that does not broadcast to its
      leaf, or a concrete entry ``<= 0``.
  """
  shapes = leaf_shapes(params_like)
  entries = _per_leaf("flat_prior", leaf_prec, shapes)
  if dtype is None:
    dtype = jnp.result_type(float, *entries) if entries else jnp.result_type(float)
  parts = [jnp.broadcast_to(jnp.asarray(e, dtype), s).reshape(-1)
           for e, s in zip(entries, shapes.shapes)]
  return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)


# --- the four structures --------------------------------------------------------

class DiagPrecision(NamedTuple):
  """Diagonal data term ``H = diag(diag)``.

  Attributes:
    diag: ``[P]`` data-term diagonal (``>= 0``).
    shapes: :class:`LeafShapes` (static) for per-leaf priors, or ``None``.
  """
  diag: Any
  shapes: Optional[LeafShapes] = None


class DensePrecision(NamedTuple):
  """Dense data term ``H = matrix`` (symmetric PSD, ``(P, P)``: small models).

  Attributes:
    matrix: ``[P, P]`` data-term matrix.
    shapes: :class:`LeafShapes` (static) for per-leaf priors, or ``None``.
  """
  matrix: Any
  shapes: Optional[LeafShapes] = None


class LowRankPrecision(NamedTuple):
  r"""Low-rank data term :math:`H = U \mathrm{diag}(l) U^\top`.

  Attributes:
    eigvecs: ``U``, ``[P, k]`` with orthonormal columns.
    eigvals: ``l``, ``[k]``, ``>= 0`` (descending from :func:`lowrank_precision`).
    shapes: :class:`LeafShapes` (static) for per-leaf priors, or ``None``.
  """
  eigvecs: Any
  eigvals: Any
  shapes: Optional[LeafShapes] = None


@tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KronIndex:
  """Static map between the flat vector and the Kronecker blocks.

  Attributes:
    layers: the :class:`mlmap._layers.Layer` s (one ``A (x) G`` block each).
    uncovered_index: positions in ``tree_leaves`` of the diagonal-block leaves.
    leaves: :class:`LeafShapes` of every parameter leaf.
  """
  layers: tuple
  uncovered_index: tuple
  leaves: LeafShapes


class KronPrecision(NamedTuple):
  r"""K-FAC data term :math:`H = \mathrm{blockdiag}(A_l \otimes G_l, \mathrm{diag}(h))`.

  Built by :func:`kron_precision`. Layer ``l`` acts on the row-major ravel of
  :math:`\tilde W = [W; b]` (see :mod:`mlmap.kron`, "Vec order").

  Attributes:
    index: :class:`KronIndex` (static).
    a_eigvals, a_eigvecs: per layer ``eigh(A_l)``, eigenvalues clipped at 0.
    g_eigvals, g_eigvecs: per layer ``eigh(G_l)``, eigenvalues clipped at 0.
    diagonal: per uncovered leaf its data-term diagonal, leaf-shaped.
  """
  index: KronIndex
  a_eigvals: tuple
  a_eigvecs: tuple
  g_eigvals: tuple
  g_eigvecs: tuple
  diagonal: tuple

  @property
  def shapes(self) -> LeafShapes:
    return self.index.leaves


_TYPES = (DiagPrecision, DensePrecision, LowRankPrecision, KronPrecision)


def _check_prec(fn, prec):
  if not isinstance(prec, _TYPES):
    raise TypeError(f"{fn}: prec must be one of {[t.__name__ for t in _TYPES]}, "
                    f"got {type(prec).__name__}.")


def _num_params(prec) -> int:
  if isinstance(prec, DiagPrecision):
    return int(jnp.shape(prec.diag)[0])
  if isinstance(prec, DensePrecision):
    return int(jnp.shape(prec.matrix)[0])
  if isinstance(prec, LowRankPrecision):
    return int(jnp.shape(prec.eigvecs)[0])
  return prec.index.leaves.size


def _dtype(prec):
  return jnp.result_type(*tree_util.tree_leaves(prec))


def _flat_d(fn, prec, leaf_prec):
  """The prior as ``[P]`` for the diagonal, dense and low-rank structures."""
  p, dtype = _num_params(prec), _dtype(prec)
  if not isinstance(leaf_prec, (tuple, list)) and jnp.ndim(leaf_prec) == 1:
    if jnp.shape(leaf_prec) != (p,):
      raise ValueError(f"{fn}: a flat leaf_prec must have shape ({p},), got "
                       f"{jnp.shape(leaf_prec)}.")
    _checks.check_positive("leaf_prec", leaf_prec, fn)
    return jnp.asarray(leaf_prec, dtype)
  if prec.shapes is None:
    if isinstance(leaf_prec, (tuple, list)):
      raise ValueError(f"{fn}: a per-leaf leaf_prec needs the leaf shapes: build "
                       f"the precision with shapes=leaf_shapes(params), or pass a "
                       f"scalar or a flat [{p}] prior.")
    _checks.check_positive("leaf_prec", leaf_prec, fn)
    return jnp.broadcast_to(jnp.asarray(leaf_prec, dtype), (p,))
  if prec.shapes.size != p:
    raise ValueError(f"{fn}: prec.shapes describes {prec.shapes.size} parameters, "
                     f"the precision has {p}.")
  return flat_prior(leaf_prec, prec.shapes, dtype)


def _check_vector(fn, name, prec, v):
  p = _num_params(prec)
  if jnp.shape(v) != (p,):
    raise ValueError(f"{fn}: {name} must be a flat [P] vector with P = {p}, got "
                     f"shape {jnp.shape(v)} (vmap over a leading axis).")
  return jnp.asarray(v, jnp.result_type(_dtype(prec), v))
