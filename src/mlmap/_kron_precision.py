r"""The Kronecker-factored precision of :mod:`mlmap._precisions` (private): per layer
:math:`A_l \otimes G_l` plus the prior, through the factors' eigendecompositions."""


import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlmap import kron

_HIGHEST = lax.Precision.HIGHEST
from mlmap._precision_types import (KronIndex, KronPrecision, LeafShapes, _dot, _dtype,
                                    _per_leaf, leaf_shapes)


# --- Kronecker -------------------------------------------------------------------

@jax.custom_jvp
def _eigvalsh(m):
  return jnp.linalg.eigvalsh(m)


@_eigvalsh.defjvp
def _eigvalsh_jvp(primals, tangents):
  # d lambda_i = q_i^T dM q_i: exact for symmetric functions of the eigenvalues
  # (log det) even at repeated eigenvalues, where eigh's own rule divides by 0.
  (m,), (dm,) = primals, tangents
  w, q = jnp.linalg.eigh(m)
  return w, jnp.einsum("ji,jk,ki->i", q, dm, q, precision=_HIGHEST)


@jax.custom_jvp
def _uniform_mu(alpha, q_bias, dw, db):
  r"""``alpha / dw``: the eigenvalues of :math:`\tilde A` at ``dw == db``, with the
  derivative in ``dw`` and ``db`` apart (``q_bias``: the bias row of ``Q``)."""
  del q_bias, db
  return alpha / dw


@_uniform_mu.defjvp
def _uniform_mu_jvp(primals, tangents):
  # d mu_i = q_i^T d(tilde A) q_i = -(mu_i / delta) q_i^T dD_in q_i at D_in = delta I.
  alpha, q_bias, dw, _ = primals
  d_alpha, _, d_dw, d_db = tangents
  mu = alpha / dw
  w = q_bias ** 2
  return mu, d_alpha / dw - mu / dw * (d_dw * (1 - w) + d_db * w)


def kron_precision(factors: kron.KronFactors, params) -> KronPrecision:
  r"""The K-FAC data term of ``factors`` as a :class:`KronPrecision`.

  .. math::
    A_l = Q_l \mathrm{diag}(\alpha_l) Q_l^\top, \qquad
    G_l = R_l \mathrm{diag}(\gamma_l) R_l^\top, \qquad \alpha, \gamma \ge 0

  (negative rounding eigenvalues are clipped to 0), and each uncovered leaf's
  diagonal. ``to_dense(kron_precision(f, p))`` equals
  ``kron.kron_to_dense(f, p)`` up to that clipping.

  Args:
    factors: :class:`mlmap.kron.KronFactors` (e.g. summed over batches).
    params: the parameter pytree the factors were built for (shapes only).

  Returns:
    A :class:`KronPrecision`.
  """
  fn = "kron_precision"
  if not isinstance(factors, kron.KronFactors):
    raise TypeError(f"{fn}: factors must be KronFactors, got {type(factors).__name__}.")
  kron._check_params(fn, factors, params)
  eig = kron.kron_eigh(factors)
  clip = lambda t: tuple(jnp.maximum(x, 0) for x in t)  # noqa: E731
  index = KronIndex(factors.layout.layers, factors.layout.uncovered_index,
                    leaf_shapes(params))
  return KronPrecision(index, clip(eig.a_eigvals), eig.a_eigvecs, clip(eig.g_eigvals),
                       eig.g_eigvecs, tuple(eig.diagonal))


def _split(shapes: LeafShapes, v):
  out, offset = [], 0
  for s in shapes.shapes:
    n = math.prod(s)
    out.append(v[offset:offset + n].reshape(s))
    offset += n
  return out


def _join(leaves, dtype):
  parts = [jnp.ravel(x).astype(dtype) for x in leaves]
  return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)


def _kron_map(prec, v, layer_fn, diag_fn):
  """``layer_fn(l, M)`` on each layer's ``tilde V``, ``diag_fn(k, j, x)`` on the rest."""
  leaves = _split(prec.index.leaves, v)
  out = list(leaves)
  for l, layer in enumerate(prec.index.layers):
    b = None if layer.bias is None else leaves[layer.bias_index]
    m = layer_fn(l, kron._to_matrix(layer, leaves[layer.weight_index], b))
    w, b = kron._from_matrix(layer, m, leaves[layer.weight_index], b)
    out[layer.weight_index] = w
    if b is not None:
      out[layer.bias_index] = b
  for k, j in enumerate(prec.index.uncovered_index):
    out[j] = diag_fn(k, j, leaves[j])
  return _join(out, v.dtype)


def _kron_prior(fn, prec, leaf_prec, dtype):
  """Per-leaf prior entries; covered (layer) leaves must be scalars."""
  if not isinstance(leaf_prec, (tuple, list)) and jnp.ndim(leaf_prec) != 0:
    raise ValueError(f"{fn}: a Kronecker precision needs a scalar or a per-leaf "
                     f"tuple leaf_prec, got an array of shape {jnp.shape(leaf_prec)}.")
  entries = _per_leaf(fn, leaf_prec, prec.index.leaves)
  paths = prec.index.leaves.paths
  for layer in prec.index.layers:
    for j in (layer.weight_index, layer.bias_index):
      if j is not None and jnp.ndim(entries[j]) != 0:
        raise ValueError(
            f"{fn}: the prior precision of leaf '{paths[j]}' (Kronecker-factored "
            f"layer '{layer.weight}') must be a scalar, got shape "
            f"{jnp.shape(entries[j])}; per-entry priors are supported only on "
            f"diagonal-block leaves.")
  return tuple(jnp.asarray(e, dtype) for e in entries)


def _layer_d(layer, entries):
  """``d_in``: the prior of each row of ``tilde W`` (weight rows, then the bias)."""
  dw = entries[layer.weight_index]
  d = jnp.full((layer.in_dim,), dw)
  if layer.bias is None:
    return d, dw, None
  db = entries[layer.bias_index]
  return jnp.concatenate([d, db[None]]), dw, db


def _layer_spectrum(prec, l, layer, entries, vectors=True):
  r"""``(Q, mu, d_in)``, :math:`D_{in}^{-1/2} A D_{in}^{-1/2} = Q\,\mathrm{diag}(\mu)Q^\top`.

  Equal weight and bias priors (or no bias): :math:`\tilde A = A/\delta`, from
  the stored eigendecomposition (no ``eigh``). Otherwise ``eigh`` of
  :math:`\tilde A`, ``O(in^3)``; chosen by ``lax.cond`` when the priors are
  traced. ``vectors=False`` returns the stored ``Q`` in place of the new one
  (for :func:`logdet`, whose gradient then never differentiates eigenvectors).
  """
  alpha, qa = prec.a_eigvals[l], prec.a_eigvecs[l]
  d_in, dw, db = _layer_d(layer, entries)
  dtype = jnp.result_type(qa, alpha, d_in)  # both lax.cond branches return this

  def uniform():
    if db is None:
      return qa.astype(dtype), (alpha / dw).astype(dtype)
    return qa.astype(dtype), _uniform_mu(alpha, qa[-1], dw, db).astype(dtype)

  def general():
    s = jnp.sqrt(d_in)
    at = _dot(qa * alpha, qa.T) / (s[:, None] * s[None, :])
    at = 0.5 * (at + at.T)
    if vectors:
      mu, q = jnp.linalg.eigh(at)
    else:
      mu, q = _eigvalsh(at), qa
    return q.astype(dtype), jnp.maximum(mu, 0).astype(dtype)

  if db is None:
    return (*uniform(), d_in)
  try:  # concrete priors pick the branch in Python
    same = bool(dw == db)
  except jax.errors.ConcretizationTypeError:
    q, mu = lax.cond(dw == db, uniform, general)
  else:
    q, mu = uniform() if same else general()
  return q, mu, d_in


def _kron_logdet(fn, prec, leaf_prec):
  dtype = _dtype(prec)
  entries = _kron_prior(fn, prec, leaf_prec, dtype)
  total = jnp.zeros((), dtype)
  for l, layer in enumerate(prec.index.layers):
    _, mu, d_in = _layer_spectrum(prec, l, layer, entries, vectors=False)
    total += (layer.out_dim * jnp.sum(jnp.log(d_in))
              + jnp.sum(jnp.log1p(jnp.outer(mu, prec.g_eigvals[l]))))
  for k, j in enumerate(prec.index.uncovered_index):
    d = prec.diagonal[k] + jnp.broadcast_to(entries[j], prec.index.leaves.shapes[j])
    total += jnp.sum(jnp.log(d))
  return total


def _kron_spectra(prec, entries):
  return [_layer_spectrum(prec, l, layer, entries)
          for l, layer in enumerate(prec.index.layers)]


def _kron_apply(prec, entries, spectra, v, power):
  r"""``power=-1``: :math:`(H+D)^{-1} v`; ``-0.5``: :math:`S v`, :math:`S S^\top = (H+D)^{-1}`;
  ``0.5``: :math:`S^\top v`.

  Per layer :math:`H_l + D_l = \Sigma(\tilde A \otimes G + I)\Sigma`,
  :math:`\Sigma = D_{in}^{1/2} \otimes I`, so with both factors diagonalized
  :math:`S = \Sigma^{-1}(Q \otimes R)\,\mathrm{diag}(\mu\gamma^\top + 1)^{-1/2}`.
  """
  def layer_fn(l, m):
    q, mu, d_in = spectra[l]
    r, lam = prec.g_eigvecs[l], jnp.outer(mu, prec.g_eigvals[l]) + 1
    s = jnp.sqrt(d_in)[:, None]
    if power == 0.5:  # S^T v: the coordinates stay the eigenbasis's
      return _dot(q.T, _dot(m / s, r)) / jnp.sqrt(lam)
    if power == -1:
      m = _dot(q.T, _dot(m / s, r)) / lam
    else:
      m = m / jnp.sqrt(lam)
    return _dot(q, _dot(m, r.T)) / s

  def diag_fn(k, j, x):
    d = prec.diagonal[k] + entries[j]
    return x / d if power == -1 else x / jnp.sqrt(d)

  return _kron_map(prec, v, layer_fn, diag_fn)


def _kron_matvec(prec, entries, v):
  """:math:`(H + D) v` (``entries=None``: :math:`H v`), from the stored eigenpairs."""
  def layer_fn(l, m):
    q, r = prec.a_eigvecs[l], prec.g_eigvecs[l]
    lam = jnp.outer(prec.a_eigvals[l], prec.g_eigvals[l])
    out = _dot(q, _dot(lam * _dot(q.T, _dot(m, r)), r.T))
    if entries is None:
      return out
    return out + _layer_d(prec.index.layers[l], entries)[0][:, None] * m

  def diag_fn(k, j, x):
    out = prec.diagonal[k] * x
    return out if entries is None else out + entries[j] * x

  return _kron_map(prec, v, layer_fn, diag_fn)


def _kron_diagonal(prec):
  def layer_fn(l, m):
    qa, qg = prec.a_eigvecs[l], prec.g_eigvecs[l]
    da = _dot(qa * qa, prec.a_eigvals[l])
    dg = _dot(qg * qg, prec.g_eigvals[l])
    return jnp.outer(da, dg).astype(m.dtype)

  p = prec.index.leaves.size
  return _kron_map(prec, jnp.zeros((p,), _dtype(prec)), layer_fn,
                   lambda k, j, x: jnp.broadcast_to(prec.diagonal[k], x.shape))


def _kron_dense(prec):
  p, dtype = prec.index.leaves.size, _dtype(prec)
  idx = _split(prec.index.leaves, np.arange(p))
  out = jnp.zeros((p, p), dtype)
  for l, layer in enumerate(prec.index.layers):
    b = None if layer.bias is None else idx[layer.bias_index]
    with jax.ensure_compile_time_eval():  # static indices, also under jit
      rows = np.asarray(kron._to_matrix(layer, idx[layer.weight_index], b)).reshape(-1)
    qa, qg = prec.a_eigvecs[l], prec.g_eigvecs[l]
    a = _dot(qa * prec.a_eigvals[l], qa.T)
    g = _dot(qg * prec.g_eigvals[l], qg.T)
    out = out.at[np.ix_(rows, rows)].set(jnp.kron(a, g))
  for k, j in enumerate(prec.index.uncovered_index):
    rows = idx[j].reshape(-1)
    out = out.at[rows, rows].set(jnp.ravel(prec.diagonal[k]).astype(dtype))
  return out
