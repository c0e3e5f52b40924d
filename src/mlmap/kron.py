r"""Kronecker-factored (K-FAC) GGN of a negative log-posterior's data term.

The layers are found from the traced model (:mod:`mlmap._layers`): every 2-D
weight used as ``x @ W`` (flax ``nn.Dense``, ``nnx.Linear``, dict MLPs) or as a
convolution kernel (flax ``nn.Conv``), with the bias added to its output folded
in. Every other leaf gets the exact GGN diagonal as its block.

Notation. Layer :math:`l` computes :math:`s_r = \tilde a_r^\top \tilde W` for
each *row* :math:`r` (an example, or an example at one position of a shared
axis: a sequence step, a convolution output pixel), with
:math:`\tilde a_r = [a_r; 1]` and :math:`\tilde W = [W; b]` when a bias is
folded, ``W`` the weight viewed as ``(in_dim, out_dim)`` (flax ``kernel`` as
is). The output-space Hessian of example ``i``, :math:`H_i = L_i L_i^\top`, is
factored exactly (Gaussian :math:`L = \mathrm{diag}(1/\sigma)`; Bernoulli
:math:`\mathrm{diag}\sqrt{p(1-p)}`; categorical columns
:math:`\sqrt{p_k}(e_k - p)`; other likelihoods: ``eigh`` of the exact block,
negative eigenvalues dropped), and :math:`g_{rk} = (\partial z_i / \partial
s_r)^\top L_i e_k` is the output-side vector of row ``r`` (of example ``i``).

The 'expand' K-FAC (Eschenhagen et al. 2023), with ``n`` examples, ``R`` rows
in all (``R = n`` for a plain MLP) and ``N = nlp.num_data``:

.. math::
  A_l = \frac{1}{R}\sum_r \tilde a_r \tilde a_r^\top, \qquad
  G_l = \frac{N}{n}\sum_r\sum_k g_{rk} g_{rk}^\top, \qquad
  \hat G_{ll} = A_l \otimes G_l

so ``A`` carries the ``1/R`` (a mean), ``G`` the data scale ``N/n`` (which is
``nlp.scale(inputs)`` for one batch, and 1 when ``num_data`` is ``None``: then
``N = n``). The exact block is

.. math::
  G_{ll} = \frac{N}{n}\sum_i \sum_{r, r' \in i}
    \tilde a_r \tilde a_{r'}^\top \otimes \sum_k g_{rk} g_{r'k}^\top ,

and ``A (x) G`` equals it when each example has one row and that example's
:math:`\sum_k g g^\top` is the same for all (the last layer of a Gaussian model;
one linear Gaussian layer is exact for the whole GGN), when the batch is one
example with one row (not one image of a convolution), or when the rows' output-side vectors are orthogonal across rows and
their sums equal (a linear convolution with a Gaussian on every output pixel).
Its trace is exact only when the squared input norms :math:`|\tilde a_r|^2`
and :math:`\mathrm{tr}\sum_k g_{rk} g_{rk}^\top` are uncorrelated over the
rows (e.g. inputs of equal norm); in general it is not (tests/test_kron.py).

Vec order: the block acts on the row-major ravel of :math:`\tilde W`
(``in_dim (+1)`` major, ``out_dim`` minor), so :math:`(A \otimes G)\,
\mathrm{vec}(\tilde V) = \mathrm{vec}(A \tilde V G)`; the bias is the last row of
:math:`\tilde V`. :func:`kron_to_dense` places it in ``ravel_pytree`` order.

Accumulation. :class:`KronFactors` stores the *unnormalized* sums
:math:`\sum_r \tilde a_r \tilde a_r^\top`, :math:`\sum_r\sum_k g g^\top`, the
row count ``R``, the example count ``n`` and the uncovered leaves' summed
diagonal; these are additive over batches (:func:`add_kron_factors`) and are
normalized on read (``factors.A``, ``factors.G``, ``factors.diagonal``). Batches
that partition the data set, each scored with ``num_data = N``, give the
one-batch factors exactly; the prior is not part of the factors.

References:
  Martens and Grosse, "Optimizing neural networks with Kronecker-factored
  approximate curvature", ICML 2015, https://arxiv.org/abs/1503.05671.
  Grosse and Martens, "A Kronecker-factored approximate Fisher matrix for
  convolution layers", ICML 2016, https://arxiv.org/abs/1602.01407.
  Eschenhagen, Immer, Turner, Schneider and Hennig, "Kronecker-factored
  approximate curvature for modern neural network architectures", NeurIPS 2023,
  https://arxiv.org/abs/2311.00636.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import tree_util
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import _fisher
from mlmap import _layers
from mlmap import curvature
from mlmap import dense
from mlmap import posterior

_HIGHEST = jax.lax.Precision.HIGHEST


@tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KronLayout:
  """Static description of the factors: which leaf got which structure.

  Attributes:
    layers: the :class:`mlmap._layers.Layer` s, one Kronecker block each.
    uncovered: paths of the leaves with a diagonal block.
    uncovered_index: their positions in ``tree_leaves(params)``.
    num_leaves: number of parameter leaves.
    num_data: ``nlp.num_data`` (``None``: each batch counts once).
  """
  layers: tuple
  uncovered: tuple
  uncovered_index: tuple
  num_leaves: int
  num_data: Optional[int]

  def structure(self):
    """``{leaf path: "kron:<weight path>" | "diag"}`` for every covered/uncovered leaf."""
    out = {}
    for layer in self.layers:
      out[layer.weight] = f"kron:{layer.weight}"
      if layer.bias is not None:
        out[layer.bias] = f"kron:{layer.weight}"
    for p in self.uncovered:
      out[p] = "diag"
    return out


class KronFactors(NamedTuple):
  r"""Additive K-FAC sums of one or more batches (see the module docstring).

  Attributes:
    layout: :class:`KronLayout` (static).
    a_sum: per layer :math:`\sum_r \tilde a_r \tilde a_r^\top`, ``(in_dim(+1), in_dim(+1))``.
    g_sum: per layer :math:`\sum_r \sum_k g_{rk} g_{rk}^\top`, ``(out_dim, out_dim)``.
    rows: per layer the number of rows ``R`` summed (examples x shared positions).
    diag_sum: per uncovered leaf the exact GGN diagonal summed over examples
      (no ``N/n``), leaf-shaped.
    num_examples: ``n``, the number of examples summed.

  ``A``, ``G`` and ``diagonal`` are the normalized factors; only the fields above
  add over batches.
  """
  layout: KronLayout
  a_sum: tuple
  g_sum: tuple
  rows: tuple
  diag_sum: tuple
  num_examples: Any

  @property
  def scale(self):
    """``N / n`` (``1`` when ``num_data`` is ``None``)."""
    if self.layout.num_data is None:
      return jnp.ones((), jnp.result_type(self.num_examples))
    return self.layout.num_data / self.num_examples

  @property
  def A(self):  # noqa: N802 - the factor's name in the literature
    r""":math:`A_l = \frac{1}{R}\sum_r \tilde a_r \tilde a_r^\top` per layer."""
    return tuple(a / r.astype(a.dtype) for a, r in zip(self.a_sum, self.rows))

  @property
  def G(self):  # noqa: N802
    r""":math:`G_l = \frac{N}{n}\sum_r\sum_k g_{rk} g_{rk}^\top` per layer."""
    return tuple(jnp.asarray(self.scale, g.dtype) * g for g in self.g_sum)

  @property
  def diagonal(self):
    """``N/n`` times the summed diagonal, per uncovered leaf."""
    return tuple(jnp.asarray(self.scale, d.dtype) * d for d in self.diag_sum)


class KronEigh(NamedTuple):
  r"""Eigendecompositions of the normalized factors (see :func:`kron_eigh`).

  Layer ``l``'s block :math:`A_l \otimes G_l` has eigenvalues
  ``jnp.outer(a_eigvals[l], g_eigvals[l])`` (row-major over ``(in, out)``) with
  eigenvectors ``jnp.kron(a_eigvecs[l][:, i], g_eigvecs[l][:, j])``; the
  diagonal blocks are their own eigenvalues.
  """
  layout: KronLayout
  a_eigvals: tuple
  a_eigvecs: tuple
  g_eigvals: tuple
  g_eigvecs: tuple
  diagonal: tuple


def _output_sqrt(nlp, outputs, targets):
  """``L`` with ``L_i L_i^T`` the per-example output Hessian: ``[B, O, K]``."""
  b = outputs.shape[0]
  o = outputs.size // b
  dtype = outputs.dtype
  found = _fisher.builtin_likelihood(nlp.log_likelihood)
  kind = None if found is None else found[0]
  if kind == "gaussian":
    sigma = jnp.asarray(found[1].get("sigma", 1.0), dtype)
    inv = jnp.broadcast_to(1.0 / sigma, outputs.shape).reshape(b, o)
    return inv[:, :, None] * jnp.eye(o, dtype=dtype)
  if kind == "bernoulli":
    p = jax.nn.sigmoid(outputs).reshape(b, o)
    return jnp.sqrt(p * (1 - p))[:, :, None] * jnp.eye(o, dtype=dtype)
  if kind in ("categorical", "soft_categorical"):
    c = outputs.shape[-1]
    p = jax.nn.softmax(outputs, axis=-1).reshape(b, o // c, c)
    sq = jnp.sqrt(p)
    # Column k of a class block: sqrt(p_k) (e_k - p); blocks per position m.
    blk = sq[..., None, :] * (jnp.eye(c, dtype=dtype) - p[..., :, None])
    m = o // c
    full = jnp.einsum("bmij,mn->bminj", blk, jnp.eye(m, dtype=dtype))
    return full.reshape(b, o, o)
  hess = jax.linearize(jax.grad(curvature._sum_nll(nlp, targets)), outputs)[1]
  blocks = dense._output_blocks(hess, outputs)
  lam, vecs = jnp.linalg.eigh(0.5 * (blocks + jnp.swapaxes(blocks, 1, 2)))
  return vecs * jnp.sqrt(jnp.maximum(lam, 0))[:, None, :]


def _uncovered_diagonal(nlp, params, inputs, targets, index):
  """Exact data-GGN diagonal of the leaves at ``index``, summed over examples."""
  leaves, treedef = tree_util.tree_flatten(params)

  def sub_apply(sub, x):
    full = list(leaves)
    for j, v in zip(index, sub):
      full[j] = v
    return nlp.apply_fn(tree_util.tree_unflatten(treedef, full), x)
  sub_nlp = posterior.negative_log_posterior(sub_apply, nlp.log_likelihood)
  return tuple(dense.ggn_diagonal(sub_nlp, tuple(leaves[j] for j in index),
                                  inputs, targets))


def _sampled_cotangents(fn, nlp, outputs, key, num_samples):
  r"""``S`` cotangents :math:`\nabla_z(-\log p(\tilde t \mid z))/\sqrt S`,
  :math:`\tilde t \sim p(t \mid z)`: ``[S, *outputs.shape]``; their outer
  products average to the output Fisher (= the output Hessian of a built-in)."""
  found = _fisher.builtin_likelihood(nlp.log_likelihood)
  if found is None:
    raise ValueError(f"{fn}: a sampled output factor (key=...) needs a built-in "
                     "likelihood to sample targets from; use key=None (the exact factor).")
  if not (isinstance(num_samples, int) and num_samples >= 1):
    raise ValueError(f"{fn}: num_samples must be an int >= 1, got {num_samples!r}.")
  sampler = _fisher.builtin_sampler(*found)
  scale = num_samples ** -0.5

  def one(k):
    t = sampler(k, outputs)
    g = jax.grad(lambda z: -jnp.sum(nlp.log_likelihood(z, t)))(outputs)
    return g * jnp.asarray(scale, outputs.dtype)
  return jax.vmap(one)(jax.random.split(key, num_samples))


def kron_factors(nlp, params, inputs, targets, *, key=None, num_samples=1) -> KronFactors:
  r"""K-FAC ('expand', exact output factor) sums of the data GGN on one batch.

  .. math::
    \hat G = \mathrm{blockdiag}\big(A_1 \otimes G_1, \ldots,
      \mathrm{diag}(\text{uncovered})\big), \qquad
    A_l = \tfrac{1}{R}\textstyle\sum_r \tilde a_r \tilde a_r^\top, \quad
    G_l = \tfrac{N}{B}\textstyle\sum_r\sum_k g_{rk} g_{rk}^\top

  approximates the data term :math:`\frac{N}{B}\sum_i J_i^\top H_i J_i` of
  :func:`mlmap.ggn_matrix` (no prior). Cost: one forward pass, ``O`` backward
  passes over the batch (``O`` outputs per example, vmapped: memory ``O`` times
  the activations) and the exact diagonal of the uncovered leaves
  (:func:`mlmap.ggn_diagonal` restricted to them). ``apply_fn`` must treat
  examples independently (no batch norm statistics).

  With ``key`` the output factor is sampled (Martens & Grosse 2015, Sec. 5):
  ``num_samples`` backward passes of :math:`\nabla_z(-\log p(\tilde t\mid z))`
  with targets drawn from the model, whose outer products average to the output
  Fisher (= the output Hessian for the built-in likelihoods), so ``G_l`` is an
  unbiased estimate at ``S`` instead of ``O`` backward passes (``A_l`` and the
  uncovered diagonal stay exact). Built-in likelihoods only.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`; its ``apply_fn`` returns one
      array with a leading batch axis.
    params: pytree.
    inputs: batch of inputs.
    targets: batch of targets.
    key: ``None`` (the exact output factor) or a ``jax.random`` key.
    num_samples: ``S >= 1`` sampled targets per example when ``key`` is given.

  Returns:
    :class:`KronFactors` (unnormalized sums; read ``.A``, ``.G``, ``.diagonal``).

  Examples:
    >>> import functools, jax, jax.numpy as jnp, mlmap as mm
    >>> from mlmap import kron
    >>> nlp = mm.negative_log_posterior(
    ...     lambda p, x: x @ p["w"] + p["b"],
    ...     functools.partial(mm.gaussian_log_likelihood, sigma=0.5))
    >>> p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> f = kron.kron_factors(nlp, p, jnp.ones((4, 3)), jnp.zeros((4, 2)))
    >>> [l.weight for l in f.layout.layers], f.A[0].shape, f.G[0].shape
    (['w'], (4, 4), (2, 2))
  """
  fn = "kron_factors"
  curvature._check_nlp(fn, nlp)
  _checks.check_float_leaves(fn, params)
  traced = _layers.trace_model(nlp.apply_fn, params, inputs)
  n = posterior.batch_size(inputs)

  def model(e):
    return traced.evaluate(params, inputs, e)
  outputs, vjp_fn, acts = jax.vjp(model, traced.zero_perturbations(), has_aux=True)
  if not isinstance(outputs, jax.Array) or outputs.ndim < 1 or outputs.shape[0] != n:
    raise ValueError(f"{fn}: apply_fn must return one array with the batch axis "
                     f"first ({n}), got {tree_util.tree_map(jnp.shape, outputs)}.")
  if key is None:
    sqrt = _output_sqrt(nlp, outputs, targets)  # [B, O, K]
    u = jnp.moveaxis(sqrt, 2, 0).reshape((sqrt.shape[2],) + outputs.shape)
  else:
    u = _sampled_cotangents(fn, nlp, outputs, key, num_samples)
  cots = jax.vmap(lambda c: vjp_fn(c)[0])(u) if traced.layers else ()

  a_sum, g_sum, rows = [], [], []
  for l, layer in enumerate(traced.layers):
    a = traced.a_rows(l, acts[l])
    if layer.bias is not None:
      a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    a_sum.append(jnp.dot(a.T, a, precision=_HIGHEST))
    c = jax.vmap(lambda s, l=l: traced.s_rows(l, s))(cots[l]).reshape(-1, layer.out_dim)
    g_sum.append(jnp.dot(c.T, c, precision=_HIGHEST))
    rows.append(jnp.asarray(a.shape[0], a.dtype))
  diag = ()
  if traced.uncovered:
    diag = _uncovered_diagonal(nlp, params, inputs, targets, traced.uncovered)
  dtype = _checks.tree_float_dtype(params)
  layout = KronLayout(traced.layers, traced.uncovered_paths, traced.uncovered,
                      len(traced.paths), nlp.num_data)
  return KronFactors(layout, tuple(a_sum), tuple(g_sum), tuple(rows), diag,
                     jnp.asarray(n, dtype))


def add_kron_factors(f1: KronFactors, f2: KronFactors) -> KronFactors:
  """Sum the additive fields of two batches' factors (same model and ``num_data``).

  With batches partitioning the data set and ``nlp.num_data`` the data set's size,
  the sum over all batches normalizes to the factors of the whole data set as
  one batch.
  """
  if not isinstance(f1, KronFactors) or not isinstance(f2, KronFactors):
    raise TypeError("add_kron_factors takes two KronFactors, got "
                    f"{type(f1).__name__} and {type(f2).__name__}.")
  if f1.layout != f2.layout:
    raise ValueError("add_kron_factors: the factors come from different models or "
                     f"num_data: {f1.layout} vs {f2.layout}.")
  return tree_util.tree_map(jnp.add, f1, f2)


def _check_params(fn, factors, params):
  if not isinstance(factors, (KronFactors, KronEigh)):
    raise TypeError(f"{fn}: factors must be KronFactors, got {type(factors).__name__}.")
  leaves = tree_util.tree_leaves(params)
  if len(leaves) != factors.layout.num_leaves:
    raise ValueError(f"{fn}: params has {len(leaves)} leaves, the factors were "
                     f"built for {factors.layout.num_leaves}.")
  return leaves


def _to_matrix(layer, w_leaf, b_leaf):
  """``tilde V``: the weight leaf as ``(in, out)``, with the bias row appended."""
  w = jnp.ravel(w_leaf)
  if layer.weight_perm is not None:
    w = w[jnp.asarray(layer.weight_perm)]
  w = w.reshape(layer.in_dim, layer.out_dim)
  if layer.bias is None:
    return w
  b = jnp.ravel(b_leaf)
  if layer.bias_perm is not None:
    b = b[jnp.asarray(layer.bias_perm)]
  return jnp.concatenate([w, b[None].astype(w.dtype)], axis=0)


def _from_matrix(layer, m, w_leaf, b_leaf):
  w = m[:layer.in_dim].reshape(-1)
  if layer.weight_perm is not None:
    w = jnp.zeros_like(w).at[jnp.asarray(layer.weight_perm)].set(w)
  w = w.reshape(jnp.shape(w_leaf)).astype(jnp.result_type(w_leaf))
  if layer.bias is None:
    return w, None
  b = m[layer.in_dim]
  if layer.bias_perm is not None:
    b = jnp.zeros_like(b).at[jnp.asarray(layer.bias_perm)].set(b)
  return w, b.reshape(jnp.shape(b_leaf)).astype(jnp.result_type(b_leaf))


def kron_vp(factors: KronFactors, params, vector):
  r"""K-FAC data-GGN times a params-shaped ``vector``.

  .. math::
    (A_l \otimes G_l)\,\mathrm{vec}(\tilde V_l) = \mathrm{vec}(A_l \tilde V_l G_l)

  per layer, and ``diagonal * v`` for the uncovered leaves. The prior is not
  included (add its Hessian product).

  Args:
    factors: :class:`KronFactors`.
    params: pytree (its structure; values are not read).
    vector: pytree like ``params``.

  Returns:
    A pytree like ``params``.
  """
  fn = "kron_vp"
  leaves = _check_params(fn, factors, params)
  _checks.check_tree_like(fn, "vector", vector, params)
  v_leaves, treedef = tree_util.tree_flatten(vector)
  out = [None] * len(leaves)
  for layer, a, g in zip(factors.layout.layers, factors.A, factors.G):
    b_leaf = None if layer.bias is None else v_leaves[layer.bias_index]
    m = _to_matrix(layer, v_leaves[layer.weight_index], b_leaf)
    m = jnp.dot(jnp.dot(a, m.astype(a.dtype), precision=_HIGHEST), g, precision=_HIGHEST)
    w, b = _from_matrix(layer, m, v_leaves[layer.weight_index], b_leaf)
    out[layer.weight_index] = w
    if b is not None:
      out[layer.bias_index] = b
  for j, d in zip(factors.layout.uncovered_index, factors.diagonal):
    out[j] = (d * v_leaves[j]).astype(jnp.result_type(v_leaves[j]))
  return tree_util.tree_unflatten(treedef, out)


def _leaf_indices(leaves):
  """Flat ``ravel_pytree`` index arrays, one per leaf, leaf-shaped."""
  out, offset = [], 0
  for x in leaves:
    size = int(jnp.size(x))
    out.append(jnp.arange(offset, offset + size).reshape(jnp.shape(x)))
    offset += size
  return out, offset


def kron_to_dense(factors: KronFactors, params, *, max_bytes=dense.DEFAULT_MAX_BYTES):
  """The K-FAC data GGN as a dense ``(P, P)`` matrix in ``ravel_pytree`` order.

  For tests and small models: ``O(P^2)`` memory. Blocks between layers are zero.
  """
  fn = "kron_to_dense"
  leaves = _check_params(fn, factors, params)
  flat, _ = ravel_pytree(params)
  dense.check_dense_bytes(fn, flat.size, flat.dtype, max_bytes)
  index, p = _leaf_indices(leaves)
  out = jnp.zeros((p, p), flat.dtype)
  for layer, a, g in zip(factors.layout.layers, factors.A, factors.G):
    b_idx = None if layer.bias is None else index[layer.bias_index]
    idx = _to_matrix(layer, index[layer.weight_index], b_idx).reshape(-1)
    out = out.at[jnp.ix_(idx, idx)].set(jnp.kron(a, g).astype(flat.dtype))
  for j, d in zip(factors.layout.uncovered_index, factors.diagonal):
    idx = index[j].reshape(-1)
    out = out.at[idx, idx].set(jnp.ravel(d).astype(flat.dtype))
  return out


def kron_eigh(factors: KronFactors) -> KronEigh:
  """Per-layer ``eigh`` of the normalized ``A`` and ``G`` (see :class:`KronEigh`).

  With these, a block's inverse, log-determinant or square root at any added
  prior precision costs ``O(in * out)`` per layer.
  """
  if not isinstance(factors, KronFactors):
    raise TypeError(f"kron_eigh: factors must be KronFactors, got {type(factors).__name__}.")
  a = [jnp.linalg.eigh(0.5 * (m + m.T)) for m in factors.A]
  g = [jnp.linalg.eigh(0.5 * (m + m.T)) for m in factors.G]
  return KronEigh(factors.layout, tuple(x[0] for x in a), tuple(x[1] for x in a),
                  tuple(x[0] for x in g), tuple(x[1] for x in g), factors.diagonal)
