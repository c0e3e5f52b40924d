r"""Structured Laplace posterior precisions :math:`H + D` (private).

The precision at a MAP is :math:`\Lambda = H + D`: ``H`` the data-term curvature
(the GGN) in one of four structures, ``D = diag(d)`` the Gaussian prior's
precision, :math:`d_i = 1/\sigma_i^2`. Every vector is *flat*, in
``jax.flatten_util.ravel_pytree(params)`` order, of length ``P``.

- :class:`DiagPrecision`: ``H = diag(h)``; every operation ``O(P)``.
- :class:`DensePrecision`: a ``(P, P)`` matrix (small models); Cholesky, ``O(P^3)``.
- :class:`LowRankPrecision`: :math:`H = U \mathrm{diag}(l) U^\top` with ``k``
  orthonormal columns (:func:`lowrank_precision`, Lanczos); Woodbury,
  ``O(P k^2)``.
- :class:`KronPrecision`: :math:`H = \mathrm{blockdiag}(A_l \otimes G_l,
  \mathrm{diag}(h))`, K-FAC (:func:`kron_precision`); per layer
  ``O(in^2 out + in out^2)`` from the factors' eigendecompositions.

:func:`logdet`, :func:`solve`, :func:`matvec` and :func:`sample` compute
:math:`\log\det(H + D)`, :math:`(H + D)^{-1} v`, :math:`(H + D) v` and a draw
:math:`x = S z` with :math:`S S^\top = (H + D)^{-1}` exactly, for the given
structure (no approximation beyond the structure of ``H``). Only the dense
structure and :func:`to_dense` form ``P x P`` matrices.

The prior ``leaf_prec`` is given per parameter leaf: a tuple aligned with
``jax.tree_util.tree_leaves(params)`` whose entries broadcast to their leaves
(``1/sigma^2``), or one scalar for every leaf, or (not for Kronecker) a flat
``[P]`` array. A precision built without leaf shapes (``shapes=None``) takes
only a scalar or a flat array.

References:
  MacKay, "A practical Bayesian framework for backpropagation networks",
  Neural Computation 1992.
  Ritter, Botev and Barber, "A scalable Laplace approximation for neural
  networks", ICLR 2018.
  Immer, Bauer, Fortuin, Ratsch and Khan, "Scalable marginal likelihood
  estimation for model selection in deep learning", ICML 2021,
  https://arxiv.org/abs/2104.04975.
  Daxberger, Kristiadi, Immer, Eschenhagen, Bauer and Hennig, "Laplace redux:
  effortless Bayesian deep learning", NeurIPS 2021,
  https://arxiv.org/abs/2106.14806.
"""

from __future__ import annotations


import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy import linalg as jsl


_HIGHEST = lax.Precision.HIGHEST
# The types and the Kronecker structure live in their own modules; these are the
# names the rest of mlmap reads from here.
from mlmap._precision_types import (DensePrecision, DiagPrecision, KronIndex,  # noqa: F401
                                    KronPrecision, LeafShapes, LowRankPrecision,
                                    _check_prec, _check_vector, _dot, _flat_d,
                                    flat_prior, leaf_shapes)
from mlmap._kron_precision import (_kron_apply, _kron_dense, _kron_diagonal,  # noqa: F401
                                   _kron_logdet, _kron_matvec, _kron_prior,
                                   _kron_spectra, kron_precision)


# --- low-rank ---------------------------------------------------------------------

def _lowrank_w(prec, d):
  r""":math:`W = D^{-1/2} U L^{1/2}`, so :math:`H + D = D^{1/2}(I + W W^\top)D^{1/2}`."""
  lam = jnp.maximum(prec.eigvals, 0)
  return prec.eigvecs * (jnp.sqrt(lam)[None, :] / jnp.sqrt(d)[:, None])


def _lowrank_chol(w):
  r"""Cholesky of :math:`C = I_k + W^\top W` (``C >= I``, well conditioned)."""
  k = w.shape[1]
  return jnp.linalg.cholesky(jnp.eye(k, dtype=w.dtype) + _dot(w.T, w))


def _lowrank_sample(w, z):
  r""":math:`(I + W W^\top)^{-1/2} z`, the symmetric square root, exactly.

  With :math:`W^\top W = R\,\mathrm{diag}(s) R^\top` and
  :math:`f(x) = (1+x)^{-1/2} = 1 + x\,g(x)`,
  :math:`g(x) = -1/(\sqrt{1+x}(1+\sqrt{1+x}))` (smooth at 0), functional
  calculus gives :math:`f(W W^\top) = I + W\,g(W^\top W)\,W^\top`.
  """
  s, r = jnp.linalg.eigh(_dot(w.T, w))
  q = jnp.sqrt(1 + jnp.maximum(s, 0))
  g = -1 / (q * (1 + q))
  return z + _dot(w, _dot(r, g * _dot(r.T, _dot(w.T, z))))


# --- the operations -------------------------------------------------------------

def logdet(prec, leaf_prec):
  r""":math:`\log\det(H + D)` for any of the four structures.

  .. math::
    \text{diag: } \textstyle\sum_i \log(h_i + d_i); \quad
    \text{dense: } 2\sum_i \log L_{ii},\ L L^\top = H + D; \quad
    \text{low rank: } \sum_i \log d_i + \log\det(I_k + L^{1/2}U^\top D^{-1} U L^{1/2})

  (matrix determinant lemma); Kronecker block ``l``, with
  :math:`\tilde A = D_{in}^{-1/2} A D_{in}^{-1/2}` of eigenvalues :math:`\mu`:
  :math:`out\cdot\sum\log d_{in} + \sum_{ij}\log(1 + \mu_i\gamma_j)`, which is
  :math:`\sum_{ij}\log(\alpha_i\gamma_j + \delta)` for one prior ``delta`` on the
  layer (``O(in * out)``, no ``eigh``). Differentiable in ``leaf_prec``. A
  non-positive-definite dense matrix gives NaN (no exception under ``jit``).

  Args:
    prec: a :class:`DiagPrecision`, :class:`DensePrecision`,
      :class:`LowRankPrecision` or :class:`KronPrecision`.
    leaf_prec: the prior precision (see the module docstring).

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlmap import _precisions as pr
    >>> prec = pr.DiagPrecision(jnp.array([1.0, 3.0]))
    >>> round(float(pr.logdet(prec, 1.0)), 6)  # log 2 + log 4
    2.079442
    >>> pr.solve(prec, 1.0, jnp.array([2.0, 4.0]))
    Array([1., 1.], dtype=float...)
  """
  fn = "logdet"
  _check_prec(fn, prec)
  if isinstance(prec, KronPrecision):
    return _kron_logdet(fn, prec, leaf_prec)
  d = _flat_d(fn, prec, leaf_prec)
  if isinstance(prec, DiagPrecision):
    return jnp.sum(jnp.log(prec.diag + d))
  if isinstance(prec, DensePrecision):
    chol = jnp.linalg.cholesky(prec.matrix + jnp.diag(d))
    return 2 * jnp.sum(jnp.log(jnp.diagonal(chol)))
  chol = _lowrank_chol(_lowrank_w(prec, d))
  return jnp.sum(jnp.log(d)) + 2 * jnp.sum(jnp.log(jnp.diagonal(chol)))


def solve(prec, leaf_prec, v):
  r""":math:`(H + D)^{-1} v` for a flat ``[P]`` vector ``v`` (vmap for several).

  Low rank (Woodbury, stable when some :math:`l_i = 0`): with
  :math:`W = D^{-1/2} U L^{1/2}` and :math:`C = I + W^\top W`,

  .. math::
    (H + D)^{-1} v = D^{-1/2}\big(y - W C^{-1} W^\top y\big), \qquad y = D^{-1/2} v .

  Kronecker: see :func:`logdet`; both factors diagonalized, ``O(in^2 out + in out^2)``,
  differentiated implicitly (``lax.custom_linear_solve``), so the derivative in
  every prior entry is exact in both branches.

  Args:
    prec: a precision (see :func:`logdet`).
    leaf_prec: the prior precision.
    v: ``[P]``.

  Returns:
    ``[P]``.
  """
  fn = "solve"
  _check_prec(fn, prec)
  v = _check_vector(fn, "v", prec, v)
  if isinstance(prec, KronPrecision):
    entries = _kron_prior(fn, prec, leaf_prec, v.dtype)
    # Spectra outside the solve: its closure is traced, so the branch is chosen here.
    spectra = _kron_spectra(prec, entries)
    # Implicit derivative: dx = (H + D)^{-1}(dv - d(H + D) x), for any prior, also
    # where the uniform branch's eigenvectors would not carry the bias prior's.
    return lax.custom_linear_solve(
        lambda x: _kron_matvec(prec, entries, x), v,
        lambda _, b: _kron_apply(prec, entries, spectra, b, -1), symmetric=True)
  d = _flat_d(fn, prec, leaf_prec)
  if isinstance(prec, DiagPrecision):
    return v / (prec.diag + d)
  if isinstance(prec, DensePrecision):
    chol = jnp.linalg.cholesky(prec.matrix + jnp.diag(d))
    return jsl.cho_solve((chol, True), v)
  w = _lowrank_w(prec, d)
  y = v / jnp.sqrt(d)
  y = y - _dot(w, jsl.cho_solve((_lowrank_chol(w), True), _dot(w.T, y)))
  return y / jnp.sqrt(d)


def matvec(prec, leaf_prec, v):
  r""":math:`(H + D) v` for a flat ``[P]`` vector (``leaf_prec=None``: :math:`H v`).

  Args:
    prec: a precision (see :func:`logdet`).
    leaf_prec: the prior precision, or ``None`` for the data term alone.
    v: ``[P]``.

  Returns:
    ``[P]``.
  """
  fn = "matvec"
  _check_prec(fn, prec)
  v = _check_vector(fn, "v", prec, v)
  if isinstance(prec, KronPrecision):
    entries = None if leaf_prec is None else _kron_prior(fn, prec, leaf_prec, v.dtype)
    return _kron_matvec(prec, entries, v)
  d = 0 if leaf_prec is None else _flat_d(fn, prec, leaf_prec)
  if isinstance(prec, DiagPrecision):
    hv = prec.diag * v
  elif isinstance(prec, DensePrecision):
    hv = _dot(prec.matrix, v)
  else:
    hv = _dot(prec.eigvecs, prec.eigvals * _dot(prec.eigvecs.T, v))
  return hv + d * v


def sample(prec, leaf_prec, z):
  r"""``x = S z`` with :math:`S S^\top = (H + D)^{-1}` exactly; ``z ~ N(0, I_P)``.

  .. math::
    \text{dense: } x = L^{-\top} z; \quad
    \text{low rank: } x = D^{-1/2}(I + W W^\top)^{-1/2} z; \quad
    \text{Kronecker: } x = \Sigma^{-1}(Q \otimes R)(\mu\gamma^\top + 1)^{-1/2} z

  (symmetric square root for the low-rank case, see ``_lowrank_sample``), so
  ``x ~ N(0, (H + D)^{-1})``. Not meant to be differentiated in ``leaf_prec``
  (for a Kronecker layer with equal weight and bias priors the square root's
  derivative in the bias prior alone is not that of the general branch);
  :func:`logdet` and :func:`solve` are.

  Args:
    prec: a precision (see :func:`logdet`).
    leaf_prec: the prior precision.
    z: ``[P]`` standard normal draw (vmap for several).

  Returns:
    ``[P]``.
  """
  fn = "sample"
  _check_prec(fn, prec)
  z = _check_vector(fn, "z", prec, z)
  if isinstance(prec, KronPrecision):
    entries = _kron_prior(fn, prec, leaf_prec, z.dtype)
    return _kron_apply(prec, entries, _kron_spectra(prec, entries), z, -0.5)
  d = _flat_d(fn, prec, leaf_prec)
  if isinstance(prec, DiagPrecision):
    return z / jnp.sqrt(prec.diag + d)
  if isinstance(prec, DensePrecision):
    chol = jnp.linalg.cholesky(prec.matrix + jnp.diag(d))
    return jsl.solve_triangular(chol, z, lower=True, trans="T")
  return _lowrank_sample(_lowrank_w(prec, d), z) / jnp.sqrt(d)


def whiten(prec, leaf_prec, v):
  r"""``S^T v`` for the square root ``S`` of :func:`sample` (:math:`S S^\top = (H + D)^{-1}`).

  So :math:`a^\top (H + D)^{-1} b = \langle S^\top a, S^\top b\rangle`: one
  transform per vector instead of a solve (for Kronecker one pair of products
  per layer, not two). The result is in ``S``'s coordinates (the factors'
  eigenbasis for Kronecker), not the parameters'.

  .. math::
    \text{dense: } L^{-1} v; \quad
    \text{low rank: } (I + W W^\top)^{-1/2} D^{-1/2} v; \quad
    \text{Kronecker: } (\mu\gamma^\top + 1)^{-1/2}(Q \otimes R)^\top \Sigma^{-1} v

  Args:
    prec: a precision (see :func:`logdet`).
    leaf_prec: the prior precision.
    v: ``[P]`` (vmap for several).

  Returns:
    ``[P]``.
  """
  fn = "whiten"
  _check_prec(fn, prec)
  v = _check_vector(fn, "v", prec, v)
  if isinstance(prec, KronPrecision):
    entries = _kron_prior(fn, prec, leaf_prec, v.dtype)
    return _kron_apply(prec, entries, _kron_spectra(prec, entries), v, 0.5)
  d = _flat_d(fn, prec, leaf_prec)
  if isinstance(prec, DiagPrecision):
    return v / jnp.sqrt(prec.diag + d)
  if isinstance(prec, DensePrecision):
    chol = jnp.linalg.cholesky(prec.matrix + jnp.diag(d))
    return jsl.solve_triangular(chol, v, lower=True)
  return _lowrank_sample(_lowrank_w(prec, d), v / jnp.sqrt(d))


def data_diagonal(prec):
  r""":math:`\mathrm{diag}(H)`, ``[P]``.

  Kronecker: :math:`\mathrm{diag}(A_l) \otimes \mathrm{diag}(G_l)` per block, the
  stored diagonal for the uncovered leaves.
  """
  _check_prec("data_diagonal", prec)
  if isinstance(prec, DiagPrecision):
    return prec.diag
  if isinstance(prec, DensePrecision):
    return jnp.diagonal(prec.matrix)
  if isinstance(prec, LowRankPrecision):
    return _dot(prec.eigvecs * prec.eigvecs, prec.eigvals)
  return _kron_diagonal(prec)


def spectrum(prec):
  r"""The eigenvalues of the data term ``H``, ``[P]`` (in no particular order).

  Diagonal: the diagonal; dense: ``eigvalsh`` (``O(P^3)``, once); low rank: the
  ``k`` stored eigenvalues and ``P - k`` zeros; Kronecker: per block the products
  :math:`\alpha_i\gamma_j` of the factors' eigenvalues, and the stored diagonal of
  the uncovered leaves. With one prior precision :math:`\delta` on every entry,
  :math:`\log\det(H + \delta I) = \sum_i \log(s_i + \delta)`: the evidence's
  search over one scale needs nothing else.
  """
  _check_prec("spectrum", prec)
  if isinstance(prec, DiagPrecision):
    return prec.diag
  if isinstance(prec, DensePrecision):
    return jnp.linalg.eigvalsh(prec.matrix)
  if isinstance(prec, LowRankPrecision):
    p, k = jnp.shape(prec.eigvecs)
    return jnp.concatenate([prec.eigvals, jnp.zeros((p - k,), prec.eigvals.dtype)])
  parts = [jnp.outer(a, g).reshape(-1) for a, g in zip(prec.a_eigvals, prec.g_eigvals)]
  parts += [jnp.ravel(d) for d in prec.diagonal]
  return jnp.concatenate(parts)


def scale(prec, c):
  r"""The data term :math:`cH` in the same structure (``c > 0`` a scalar): ``O(P)``.

  The Gaussian likelihood's curvature is :math:`J^\top J / \sigma^2`, so a new
  noise scale :math:`\sigma` multiplies a stored ``H`` by
  :math:`\sigma_{\mathrm{old}}^2/\sigma^2` without a pass over the data.
  Kronecker: :math:`A \otimes cG` (the ``G`` eigenvalues and the diagonal blocks).
  """
  _check_prec("scale", prec)
  if isinstance(prec, DiagPrecision):
    return prec._replace(diag=c * prec.diag)
  if isinstance(prec, DensePrecision):
    return prec._replace(matrix=c * prec.matrix)
  if isinstance(prec, LowRankPrecision):
    return prec._replace(eigvals=c * prec.eigvals)
  return prec._replace(g_eigvals=tuple(c * g for g in prec.g_eigvals),
                       diagonal=tuple(c * d for d in prec.diagonal))


def to_dense(prec):
  """``H`` as a dense ``(P, P)`` matrix in ``ravel_pytree`` order.

  For tests and small models: ``O(P^2)`` memory.
  """
  _check_prec("to_dense", prec)
  if isinstance(prec, DiagPrecision):
    return jnp.diag(prec.diag)
  if isinstance(prec, DensePrecision):
    return prec.matrix
  if isinstance(prec, LowRankPrecision):
    return _dot(prec.eigvecs * prec.eigvals, prec.eigvecs.T)
  return _kron_dense(prec)


# --- Lanczos for the low-rank structure -------------------------------------------

def _orth(basis, w):
  """Classical Gram-Schmidt against the rows of ``basis``, twice ("twice is enough")."""
  w = w - _dot(_dot(basis, w), basis)
  return w - _dot(_dot(basis, w), basis)


@jax.jit
def _lanczos_step(basis, j, v, w, v_prev, beta_prev, anorm, key):
  """One step after ``w = A v``: store ``v``, reorthogonalize, restart on breakdown."""
  basis = basis.at[j].set(v)
  eps = jnp.finfo(w.dtype).eps
  w_norm = jnp.linalg.norm(w)
  anorm = jnp.maximum(anorm, w_norm)
  alpha = jnp.vdot(v, w, precision=_HIGHEST)
  w = _orth(basis, w - alpha * v - beta_prev * v_prev)
  beta = jnp.linalg.norm(w)
  breakdown = beta <= 10 * eps * anorm
  # Invariant Krylov space: continue from a fresh random direction orthogonal to
  # the basis, with beta = 0, so T stays block diagonal and exact.
  u = _orth(basis, jax.random.normal(jax.random.fold_in(key, j), v.shape, v.dtype))
  u_norm = jnp.linalg.norm(u)
  v_next = jnp.where(breakdown, u / jnp.where(u_norm > 0, u_norm, 1),
                     w / jnp.where(breakdown, 1, beta))
  return basis, alpha, jnp.where(breakdown, 0, beta), v_next, anorm


@functools.partial(jax.jit, static_argnums=3)
def _ritz(basis, alphas, betas, k):
  """The ``k`` largest Ritz pairs of ``T``: ``(V^T s_i [P, k], max(theta_i, 0) [k])``."""
  off = betas[:-1]
  t = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  theta, s = jnp.linalg.eigh(t)
  top = jnp.argsort(-theta)[:k]
  return _dot(basis.T, s[:, top]), jnp.maximum(theta[top], 0)


def _check_count(fn, name, value, lo, hi):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{fn}: {name} must be an int, got {value!r}.")
  if not lo <= value <= hi:
    raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {value}.")
  return int(value)


def lowrank_precision(matvec: Callable, num_params: int, rank: int, dtype, *,
                      key=None, num_steps: Optional[int] = None,
                      params_like=None) -> LowRankPrecision:
  r"""Top-``rank`` eigenpairs of a symmetric PSD operator by Lanczos.

  ``num_steps`` Lanczos steps with full reorthogonalization (classical
  Gram-Schmidt, twice, every step) build ``V`` (``m x P``, orthonormal rows) and
  the tridiagonal :math:`T = V H V^\top`; the ``rank`` largest Ritz pairs
  :math:`(\theta_i, V^\top s_i)` give

  .. math::
    H \approx U \mathrm{diag}(\max(\theta, 0)) U^\top .

  With ``rank == num_steps == P`` this is the exact eigendecomposition (to
  rounding). An invariant Krylov space (``beta`` at rounding level) restarts
  from a random vector orthogonal to the basis. ``matvec`` is called once per
  step from Python, so it may loop over a data set or leave JAX; the rest runs
  as a jitted step. Memory ``O(m P)``; cost ``m`` matvecs plus ``O(m^2 P)``.

  Args:
    matvec: ``v [P] -> H v [P]``, a plain callable (not traced as a whole).
    num_params: ``P``.
    rank: ``k``, ``1 <= k <= P``.
    dtype: the floating dtype of the vectors.
    key: ``jax.random`` key of the start vector (default ``PRNGKey(0)``).
    num_steps: ``m``, ``k <= m <= P`` (default ``min(P, max(2k, k + 10))``).
    params_like: optional parameter pytree (or :class:`LeafShapes`) for per-leaf
      priors.

  Returns:
    A :class:`LowRankPrecision` (eigenvalues descending).

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", 1950. Parlett, "The
    Symmetric Eigenvalue Problem", 1998, ch. 13.
  """
  fn = "lowrank_precision"
  if not callable(matvec):
    raise TypeError(f"{fn}: matvec must be callable, got {type(matvec).__name__}.")
  p = _check_count(fn, "num_params", num_params, 1, np.iinfo(np.int64).max)
  k = _check_count(fn, "rank", rank, 1, p)
  m = min(p, max(2 * k, k + 10)) if num_steps is None else num_steps
  m = _check_count(fn, "num_steps", m, k, p)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: dtype must be floating, got {dtype}.")
  shapes = None if params_like is None else leaf_shapes(params_like)
  if shapes is not None and shapes.size != p:
    raise ValueError(f"{fn}: params_like has {shapes.size} parameters, "
                     f"num_params is {p}.")
  key = jax.random.PRNGKey(0) if key is None else key
  k0, k1 = jax.random.split(key)
  v = jax.random.normal(k0, (p,), dtype)
  v = v / jnp.linalg.norm(v)
  basis, v_prev = jnp.zeros((m, p), dtype), jnp.zeros((p,), dtype)
  beta, anorm = jnp.zeros((), dtype), jnp.zeros((), dtype)
  alphas, betas = [], []
  for j in range(m):
    w = matvec(v)
    if jnp.shape(w) != (p,):
      raise ValueError(f"{fn}: matvec must map a [{p}] vector to a [{p}] vector, "
                       f"got shape {jnp.shape(w)}.")
    basis, alpha, beta_new, v_next, anorm = _lanczos_step(
        basis, j, v, jnp.asarray(w, dtype), v_prev, beta, anorm, k1)
    alphas.append(alpha)
    betas.append(beta_new)
    v_prev, v, beta = v, v_next, beta_new
  u, lam = _ritz(basis, jnp.stack(alphas), jnp.stack(betas), k)
  return LowRankPrecision(u, lam, shapes)
