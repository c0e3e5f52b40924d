"""Dense curvature matrices and exact diagonals, for small models and references.

A dense ``(P, P)`` matrix costs ``O(P^2)`` memory and ``O(P^3)`` to factor; the
matrix-free products in :mod:`mlmap.curvature` stay the main path. The dense
forms here are built column block by column block: the model (or gradient) is
linearized once and the linear product is ``vmap``-ed over ``chunk_size`` basis
vectors at a time inside a ``lax.map``, so the working memory is the result plus
``chunk_size`` products, never ``P`` products at once (a plain
``jax.hessian`` vmaps all ``P`` tangents and can need many times the result).
All matrices are in ``jax.flatten_util.ravel_pytree(params)`` order.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import curvature
from mlmap import posterior
from mlmap import priors

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_CHUNK_SIZE = 128


def _check_chunk(fn, chunk_size):
  if chunk_size is None:
    return DEFAULT_CHUNK_SIZE
  if (not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool)
      or chunk_size < 1):
    raise ValueError(f"{fn}: chunk_size must be an integer >= 1, got {chunk_size!r}.")
  return int(chunk_size)


def check_dense_bytes(fn, num_params, dtype, max_bytes):
  """Refuse a dense ``(P, P)`` array above ``max_bytes``, naming the call ``fn``.

  Dense consumers (``log_evidence``, ``laplace``, ``newton``, ...) call this with
  their own name before building a matrix, so the advice names the argument the
  user can actually pass.

  Args:
    fn: the public call to name in the message (it must take ``max_bytes=``).
    num_params: ``P``.
    dtype: the matrix's dtype.
    max_bytes: the limit, a finite number > 0 (not a bool, NaN or inf).

  Raises:
    ValueError: ``max_bytes`` is not a finite positive number, or
      ``P^2 * itemsize`` exceeds it.
  """
  if (isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes, numbers.Real)
      or not math.isfinite(max_bytes) or max_bytes <= 0):
    raise ValueError(f"{fn}: max_bytes must be a positive number, got {max_bytes!r} "
                     "(a finite int or float of bytes; not a bool, NaN or inf).")
  need = num_params * num_params * jnp.dtype(dtype).itemsize
  if need > max_bytes:
    raise ValueError(
        f"{fn}: the dense ({num_params}, {num_params}) {jnp.dtype(dtype).name} "
        f"matrix needs {need} bytes ({need / 1024**3:.3g} GiB), more than "
        f"max_bytes={max_bytes} ({max_bytes / 1024**3:.3g} GiB). Pass a larger "
        f"max_bytes= to {fn} if you have the memory, or use the matrix-free products "
        "(mm.hvp, mm.ggn_vp, ...) with mm.cg / mm.lanczos"
        + (", or a structured posterior: structure='kron', 'diag' or 'lowrank' "
           "(rank=k), or subset=mm.last_layer_subset(params)."
           if fn in ("laplace", "log_evidence") else "."))


def _dense_from_matvec(fn, matvec, params, chunk_size, max_bytes):
  """Stack ``matvec(e_j)`` for all basis vectors, ``chunk_size`` at a time."""
  chunk_size = _check_chunk(fn, chunk_size)
  flat, unravel = ravel_pytree(params)
  num_params = flat.size
  check_dense_bytes(fn, num_params, flat.dtype, max_bytes)

  def column(j):
    e = jnp.zeros((num_params,), flat.dtype).at[j].set(1)
    return ravel_pytree(matvec(unravel(e)))[0]
  # Row j is M e_j; the matrices here are symmetric, so this is M itself.
  return jax.lax.map(column, jnp.arange(num_params),
                     batch_size=min(chunk_size, num_params))


def hessian_matrix(fun, params, *args, chunk_size=None, max_bytes=DEFAULT_MAX_BYTES):
  r"""Dense Hessian of ``fun(params, *args)`` in ``ravel_pytree`` order.

  .. math::
    H_{jk} = \frac{\partial^2 \mathrm{fun}}{\partial w_j \partial w_k}

  ``grad(fun)`` is linearized once and its tangent map applied to
  ``chunk_size`` basis vectors at a time (forward-over-reverse), so peak memory
  is the ``P^2`` result plus ``chunk_size`` Hessian-vector products.
  ``O(P^2)`` memory, ``O(P)`` HVPs; for small models and references only.

  Args:
    fun: scalar ``fun(params, *args)``.
    params: pytree.
    *args: further arguments of ``fun``.
    chunk_size: basis vectors per vmapped block (default 128).
    max_bytes: refuse (``ValueError`` with the bytes needed) when the result
      would be larger; default 2 GiB.

  Returns:
    ``(P, P)`` array.

  Raises:
    TypeError: a non-floating leaf in ``params``, named by its path.
    ValueError: ``chunk_size`` not an integer >= 1; ``max_bytes`` not a finite
      positive number, or smaller than the result.
  """
  fn = "hessian_matrix"
  _checks.check_float_leaves(fn, params)
  return _dense_from_matvec(fn, curvature._hvp_fn(fn, fun, params, *args),
                            params, chunk_size, max_bytes)


def ggn_matrix(nlp, params, inputs, targets, *, chunk_size=None,
               max_bytes=DEFAULT_MAX_BYTES):
  r"""Dense generalized Gauss-Newton matrix (see :func:`mlmap.ggn_vp`).

  .. math::
    G = \frac{N}{B}\sum_i J_i^\top H_{z_i} J_i + \nabla^2_w(-\log p(w))

  Args, limits and errors as :func:`hessian_matrix`, plus those of
  :func:`mlmap.ggn_vp` (structured outputs are supported, model state is
  refused). Returns a ``(P, P)`` array.
  """
  fn = "ggn_matrix"
  _checks.check_float_leaves(fn, params)
  return _dense_from_matvec(fn, curvature._ggn_vp_fn(fn, nlp, params, inputs, targets),
                            params, chunk_size, max_bytes)


def fisher_matrix(nlp, params, inputs, targets, *, output_fisher_vp=None,
                  chunk_size=None, max_bytes=DEFAULT_MAX_BYTES):
  r"""Dense Fisher matrix plus prior Hessian (see :func:`mlmap.fisher_vp`).

  .. math::
    F = \frac{N}{B}\sum_i J_i^\top F_{z_i} J_i + \nabla^2_w(-\log p(w))

  Args, limits and errors as :func:`hessian_matrix`; ``output_fisher_vp`` and
  its errors as in :func:`mlmap.fisher_vp`. Returns a ``(P, P)`` array.
  """
  fn = "fisher_matrix"
  _checks.check_float_leaves(fn, params)
  del targets
  return _dense_from_matvec(
      fn, curvature._fisher_vp_fn(fn, nlp, params, inputs, output_fisher_vp),
      params, chunk_size, max_bytes)


def empirical_fisher_matrix(nlp, params, inputs, targets, *, chunk_size=None,
                            max_bytes=DEFAULT_MAX_BYTES):
  r"""Dense empirical Fisher plus prior Hessian (see :func:`mlmap.empirical_fisher_vp`).

  .. math::
    \tilde F = \frac{N}{B}\sum_i g_i g_i^\top + \nabla^2_w(-\log p(w))

  Not the Fisher (Kunstner et al. 2019, https://arxiv.org/abs/1905.12558).
  Args, limits and errors as :func:`hessian_matrix` and
  :func:`mlmap.empirical_fisher_vp`. Returns a ``(P, P)`` array.
  """
  fn = "empirical_fisher_matrix"
  _checks.check_float_leaves(fn, params)
  return _dense_from_matvec(
      fn, curvature._empirical_fisher_vp_fn(fn, nlp, params, inputs, targets),
      params, chunk_size, max_bytes)


# --- exact diagonals -----------------------------------------------------------

_SEPARABLE_PRIORS = (priors.gaussian_log_prior, priors.laplace_log_prior,
                     priors.flat_log_prior)


def _is_separable_prior(log_prior):
  func = log_prior
  while isinstance(func, functools.partial):
    func = func.func
  return any(func is p for p in _SEPARABLE_PRIORS)


def _prior_diagonal(fn, nlp, params, chunk_size):
  """Exact diagonal of the prior's Hessian, as a flat ``[P]`` array."""
  flat, unravel = ravel_pytree(params)
  if nlp.log_prior is None:
    return jnp.zeros_like(flat)
  lin = curvature.hvp_fn(nlp.prior_term, params)
  if _is_separable_prior(nlp.log_prior):
    # A sum of per-coordinate terms has a diagonal Hessian: H 1 = diag(H).
    return ravel_pytree(lin(unravel(jnp.ones_like(flat))))[0]

  def entry(j):
    e = jnp.zeros_like(flat).at[j].set(1)
    return ravel_pytree(lin(unravel(e)))[0][j]
  return jax.lax.map(entry, jnp.arange(flat.size),
                     batch_size=min(_check_chunk(fn, chunk_size), flat.size))


def _batch_ravel(fn, outputs):
  """``outputs`` (an array or a pytree, each leaf ``[B, ...]``) as ``[B, O]``.

  Returns:
    ``(flat, unravel)``: ``flat`` is ``[B, O]``, example ``i``'s outputs of all
    leaves concatenated in leaf order; ``unravel`` maps any ``[b, O]`` back to
    a pytree like ``outputs`` with batch ``b``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(outputs)
  shapes = [jnp.shape(a) for a in leaves]
  if not leaves or any(len(sh) == 0 for sh in shapes) or len({sh[0] for sh in shapes}) != 1:
    raise ValueError(f"{fn}: every leaf of the model's outputs needs the same leading "
                     f"batch axis, got leaf shapes {shapes}.")
  b = shapes[0][0]
  sizes = [math.prod(sh[1:]) for sh in shapes]
  dtype = jnp.result_type(*leaves)
  flat = jnp.concatenate([jnp.reshape(a, (b, -1)).astype(dtype) for a in leaves], axis=1)
  splits = np.cumsum(sizes)[:-1].tolist()

  def unravel(m):
    parts = jnp.split(m, splits, axis=1)
    return jax.tree_util.tree_unflatten(treedef, [
        p.reshape((m.shape[0],) + sh[1:]).astype(a.dtype)
        for p, sh, a in zip(parts, shapes, leaves)])
  return flat, unravel


def _output_blocks(output_vp, outputs, fn="curvature"):
  """Per-example output-space matrices ``[B, O, O]`` of a block-diagonal product.

  ``outputs`` may be a pytree; ``O`` counts every leaf's entries of one example.
  """
  flat, unravel = _batch_ravel(fn, outputs)
  b, o = flat.shape
  basis = jnp.broadcast_to(jnp.eye(o, dtype=flat.dtype)[:, None, :], (o, b, o))
  cols = jax.vmap(lambda e: _batch_ravel(fn, output_vp(unravel(e)))[0])(basis)
  return jnp.transpose(cols, (1, 2, 0))  # [i, row, col]


CPU_CHUNK = 2  # examples per vmapped block on CPU by default (bench_chunk_size.py)


def _diagonal_chunks(b, o, flat, chunk_size, fn):
  """Example indices ``[C, c]`` and 0/1 weights padding ``B`` to ``C * c``."""
  if chunk_size is None:
    # Each example holds O parameter-sized rows: keep a chunk near 256 MiB.
    per_example = o * flat.size * flat.dtype.itemsize
    chunk_size = max(1, min(b, (256 * 1024**2) // max(per_example, 1)))
    if jax.default_backend() == "cpu":
      # XLA:CPU runs wider chunks slower, a convolution's many times slower
      # (a grouped convolution): experiments/bench_chunk_size.py.
      chunk_size = min(chunk_size, CPU_CHUNK)
  chunk_size = min(_check_chunk(fn, chunk_size), b)
  num_chunks = -(-b // chunk_size)
  idx = jnp.arange(num_chunks * chunk_size)
  weight = (idx < b).astype(flat.dtype).reshape(num_chunks, chunk_size)
  return (idx % b).reshape(num_chunks, chunk_size), weight, chunk_size


def _diagonal(fn, nlp, params, inputs, targets, output_vp_of, chunk_size):
  r"""``(N/B) sum_i sum_k lam_ik (J_i^T u_ik)^2`` + prior diagonal, flat ``[P]``."""
  curvature._check_nlp(fn, nlp)
  _checks.check_float_leaves(fn, params)
  posterior.check_stateless_model(fn, params, None)
  flat, unravel = ravel_pytree(params)
  outputs = nlp.apply_fn(params, inputs)
  posterior.check_stateless_model(fn, params, outputs)
  flat_out, _ = _batch_ravel(fn, outputs)
  b, o = flat_out.shape
  blocks = _output_blocks(output_vp_of(outputs), outputs, fn)
  blocks = 0.5 * (blocks + jnp.swapaxes(blocks, 1, 2))
  lam, vecs = jnp.linalg.eigh(blocks)  # M_i = sum_k lam_ik u_ik u_ik^T
  idx, weight, chunk_size = _diagonal_chunks(b, o, flat, chunk_size, fn)

  def example(x, lam_i, vecs_i):
    def f(p):
      return nlp.apply_fn(p, jax.tree_util.tree_map(lambda a: a[None], x))
    z, vjp_fn = jax.vjp(f, params)
    posterior.check_stateless_model(fn, params, z)
    unravel_z = _batch_ravel(fn, z)[1]
    rows = jax.vmap(lambda u: ravel_pytree(vjp_fn(unravel_z(u[None]))[0])[0])(vecs_i.T)
    # Contractions as dots: XLA:CPU (jaxlib 0.10) runs a fused multiply-reduce
    # over the small middle axis tens of times slower.
    return jnp.dot(lam_i, jnp.square(rows), precision=jax.lax.Precision.HIGHEST)

  def body(acc, chunk):
    ids, w = chunk
    x = jax.tree_util.tree_map(lambda a: a[ids], inputs)
    d = jax.vmap(example)(x, lam[ids], vecs[ids])
    return acc + jnp.dot(w, d, precision=jax.lax.Precision.HIGHEST), None

  data, _ = jax.lax.scan(body, jnp.zeros_like(flat), (idx, weight))
  scale = nlp.scale(inputs)
  return unravel(jnp.asarray(scale, flat.dtype) * data
                 + _prior_diagonal(fn, nlp, params, chunk_size))


def ggn_diagonal(nlp, params, inputs, targets, *, chunk_size=None):
  r"""Exact diagonal of the GGN, from per-example Jacobian rows (not ``P`` products).

  .. math::
    \mathrm{diag}(G) = \frac{N}{B}\sum_i\sum_k \lambda_{ik}\,(J_i^\top u_{ik})^2
                       + \mathrm{diag}\,\nabla^2_w(-\log p(w)),
    \qquad H_{z_i} = \sum_k \lambda_{ik} u_{ik} u_{ik}^\top

  Each example's output-space Hessian (``O x O``) is eigendecomposed and ``O``
  per-example vector-Jacobian products give the rows :math:`J_i^\top u_{ik}`:
  ``B * O`` backward passes of one example, ``chunk_size`` examples at a time
  (default: as many as fit in about 256 MiB, at most 2 on CPU, where wider
  blocks run slower: ``experiments/bench_chunk_size.py``). That is about 530 gradients for an
  MLP 784-512-512-10 at batch 512 on CPU (``experiments/bench_curvature.py``
  workload): recompute it rarely, or use ``mm.hutchinson_diagonal`` for an
  unbiased estimate at a few products per probe. ``apply_fn`` must treat examples
  independently (it is called on one example, with a batch axis of 1). It may
  return a pytree (a tuple ``(mean, extra head)``, a dict of heads), each leaf
  with its own leading batch axis: ``O`` then counts all of one example's
  outputs, as in :func:`mlmap.ggn_vp`. The prior's diagonal is ``H 1`` for the
  built-in (separable) priors, else ``P`` prior Hessian-vector products.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`.
    params: pytree.
    inputs: batch of inputs.
    targets: batch of targets.
    chunk_size: examples per vmapped block.

  Returns:
    A pytree like ``params`` holding the diagonal.

  Raises:
    TypeError: ``nlp`` is not a negative log-posterior; a non-floating leaf in
      ``params`` (named by its path); model state (flax ``batch_stats`` in
      ``params`` or a ``mutable=`` result, named by collection).
    ValueError: ``chunk_size`` not an integer >= 1; output leaves without a
      common leading batch axis.

  References:
    Dangel, Kunstner and Hennig, "BackPACK: Packing more into backprop",
    ICLR 2020, https://arxiv.org/abs/1912.10985.
  """
  def hessian_of(outputs):
    return jax.linearize(jax.grad(curvature._sum_nll(nlp, targets)), outputs)[1]
  return _diagonal("ggn_diagonal", nlp, params, inputs, targets, hessian_of,
                   chunk_size)


def fisher_diagonal(nlp, params, inputs, targets, *, output_fisher_vp=None,
                    chunk_size=None):
  r"""Exact diagonal of the Fisher plus prior Hessian (see :func:`ggn_diagonal`).

  .. math::
    \mathrm{diag}(F) = \frac{N}{B}\sum_i\sum_k \lambda_{ik}\,(J_i^\top u_{ik})^2
                       + \mathrm{diag}\,\nabla^2_w(-\log p(w)),
    \qquad F_{z_i} = \sum_k \lambda_{ik} u_{ik} u_{ik}^\top

  The output-space Fisher is the closed form of a built-in likelihood or
  ``output_fisher_vp`` (as in :func:`mlmap.fisher_vp`); an unrecognized
  likelihood without it raises ``ValueError``. Structured (pytree) outputs and
  the other errors as in :func:`ggn_diagonal`.

  Returns:
    A pytree like ``params`` holding the diagonal.
  """
  ofvp = curvature._output_fisher("fisher_diagonal", nlp, output_fisher_vp)
  return _diagonal("fisher_diagonal", nlp, params, inputs, targets,
                   lambda outputs: functools.partial(ofvp, outputs), chunk_size)
