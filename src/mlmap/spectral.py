"""Spectra and stochastic estimates of symmetric pytree operators.

Every function is matrix-free: it takes ``matvec(v) = A v`` over pytrees (e.g.
``lambda v: mm.hvp(f, params, v, x, y)`` or ``mm.ggn_vp``) and ``like``, a
pytree with the operator's structure (usually ``params``) from which random
probes are drawn. Extreme eigenpairs come from Lanczos, traces and diagonals
from Hutchinson's estimator, and densities and log-determinants from
stochastic Lanczos quadrature (SLQ). Stochastic estimates return their
standard error next to the estimate.

Checks at call time: ``like`` must have real floating leaves only (a
``TypeError`` names each integer, bool or complex leaf by its path, as the
curvature products do for ``params``), ``key`` must be a ``jax.random`` key,
and the integer options (``num_probes``, ``num_steps``, ``k``, ``batch_size``)
must be Python ints in range.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import _loops
from mlmap.curvature import _check_key
from mlmap.linalg import (_HIGHEST, _check_floating, _scalar_dtype, _check_int, _check_steps,
                          _flat_operator, _lanczos_flat, _random_like, tree_vdot,
                          tridiagonal)

_tmap = jax.tree_util.tree_map


class StochasticEstimate(NamedTuple):
  """A Monte-Carlo estimate and its standard error.

  Attributes:
    estimate: the sample mean over probes (a scalar, or a pytree for diagonals).
    standard_error: ``std(samples, ddof=1) / sqrt(num_probes)``, same shape.
  """
  estimate: Any
  standard_error: Any


def _size(like) -> int:
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(like))


def _check_like(fn, like):
  """``like`` (usually params): floating leaves only, each named by path if not."""
  _checks.check_float_leaves(fn, like, "like")
  _check_floating(fn, "like", like)


def _check_probes(fn, like, num_probes, batch_size, minimum=2, key=None):
  _check_like(fn, like)
  if key is not None:
    _check_key(fn, key)
  num_probes = _check_int(fn, "num_probes", num_probes, minimum)
  batch_size = 1 if batch_size is None else _check_int(fn, "batch_size", batch_size, 1)
  if num_probes % batch_size:
    raise ValueError(f"{fn}: batch_size ({batch_size}) must divide num_probes "
                     f"({num_probes}).")
  return num_probes, batch_size


def _probe_unroll(fn, unroll, matvec, like, num_probes, batch_size, num_steps=1):
  """:func:`mlmap._loops.resolve_unroll` for a loop of ``num_probes / batch_size``
  chunks of ``num_steps`` products each."""
  return _loops.resolve_unroll(fn, unroll, num_probes // batch_size * num_steps, matvec,
                               like, host=True)


def _chunked(keys, batch_size):
  return keys.reshape((keys.shape[0] // batch_size, batch_size) + keys.shape[1:])


def _per_chunk(sample, ks):
  """``sample`` of each key in the chunk ``ks``, stacked on a leading axis.

  No vmap for a single probe: vmap turns ``lax.cond`` (Lanczos restarts) into
  select, which runs both branches."""
  if ks.shape[0] == 1:
    return _tmap(lambda v: v[None], sample(ks[0]))
  return jax.vmap(sample)(ks)


def _moments(chunk, keys, batch_size, unroll=False) -> StochasticEstimate:
  """Mean and standard error of the samples ``chunk(ks)`` (stacked on a leading
  axis, one per key of the chunk ``ks``) over ``keys`` in O(1) memory.

  Chunks of ``batch_size`` probes (``functools.partial(_per_chunk, sample)``
  vmaps a one-key ``sample``) are merged with Chan et al.'s pairwise update of
  (mean, sum of squared deviations), so a diagonal estimate never stores one
  pytree per probe.
  """
  n = keys.shape[0]
  shape = jax.eval_shape(chunk, keys[:1])
  zeros = _tmap(lambda s: jnp.zeros(s.shape[1:], s.dtype), shape)

  def step(carry, ks):
    i, mean, m2 = carry
    vals = chunk(ks)
    b_mean = _tmap(lambda v: jnp.mean(v, 0), vals)
    b_m2 = _tmap(lambda v, m: jnp.sum((v - m) ** 2, 0), vals, b_mean)
    count = (i * batch_size).astype(jax.tree_util.tree_leaves(zeros)[0].dtype)
    total = count + batch_size
    delta = _tmap(lambda a, b: a - b, b_mean, mean)
    mean = _tmap(lambda m, d: m + d * (batch_size / total).astype(m.dtype), mean, delta)
    m2 = _tmap(lambda a, b, d: a + b + d * d * (count * batch_size / total).astype(a.dtype),
               m2, b_m2, delta)
    return (i + 1, mean, m2), None

  carry, chunks = (jnp.zeros((), jnp.int32), zeros, zeros), _chunked(keys, batch_size)
  # Rolled, a Python loop, or from the host (see mlmap._loops).
  _, mean, m2 = _loops.fori_loop(0, chunks.shape[0], lambda c, cr: step(cr, chunks[c])[0],
                                 carry, unroll)
  se = _tmap(lambda a: jnp.sqrt(a / (n - 1) / n), m2)
  return StochasticEstimate(estimate=mean, standard_error=se)


def hutchinson_trace(matvec: Callable, like, key, num_probes: int,
                     batch_size: int | None = None, *,
                     unroll: bool | str | None = None) -> StochasticEstimate:
  r"""Hutchinson's unbiased estimate of ``tr(A)`` with Rademacher probes.

  .. math::
    \widehat{\mathrm{tr}}(A) = \frac1n \sum_{l=1}^n z_l^\top A z_l,
    \quad z_l \in \{\pm 1\}^P, \qquad
    \mathrm{Var}[z^\top A z] = 2 \sum_{i \ne j} A_{ij}^2 .

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``.
    like: pytree with the operator's structure, shapes and dtypes (probes
      take each leaf's dtype).
    key: ``jax.random`` key.
    num_probes: number of probes ``n >= 2``.
    batch_size: probes vmapped together (must divide ``num_probes``);
      default 1 (sequential, lowest memory).
    unroll: ``True`` unrolls the loop over probe chunks, ``False``
      keeps a ``lax`` loop, ``"host"`` iterates it from the host (one jitted
      top-level step per chunk; not differentiable); ``None`` (default), when
      the backend is the CPU and ``matvec`` contains a convolution, unrolls up
      to 64 products and iterates from the host above (XLA:CPU runs a
      convolution inside a loop about 25x slower; see ``mlmap._loops``), and
      elsewhere keeps the ``lax`` loop. The result is the same either way.

  Returns:
    :class:`StochasticEstimate` of scalars (estimate, standard error).

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines", 1990. Avron & Toledo, "Randomized
    algorithms for estimating the trace of an implicit symmetric positive
    semi-definite matrix", 2011.
  """
  num_probes, batch_size = _check_probes("hutchinson_trace", like, num_probes, batch_size,
                                         key=key)
  unroll = _probe_unroll("hutchinson_trace", unroll, matvec, like, num_probes, batch_size)
  dtype = _scalar_dtype(like)

  def sample(k):
    z = _random_like(like, k, "rademacher")
    return tree_vdot(z, matvec(z), dtype)

  return _moments(functools.partial(_per_chunk, sample), jax.random.split(key, num_probes),
                  batch_size, unroll)


def hutchinson_diagonal(matvec: Callable, like, key, num_probes: int,
                        batch_size: int | None = None, *,
                        unroll: bool | str | None = None) -> StochasticEstimate:
  r"""Hutchinson-style unbiased estimate of ``diag(A)`` with Rademacher probes.

  .. math::
    \widehat{\mathrm{diag}}(A) = \frac1n \sum_{l=1}^n z_l \odot A z_l,
    \qquad \mathrm{Var}[(z \odot A z)_i] = \sum_{j \ne i} A_{ij}^2 .

  For the GGN / Fisher prefer their exact diagonals (curvature module); this
  is for the Hessian, whose diagonal has no cheap exact form.

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``.
    like: pytree with the operator's structure, shapes and dtypes.
    key: ``jax.random`` key.
    num_probes: number of probes ``n >= 2``.
    batch_size: probes vmapped together (must divide ``num_probes``); default 1.
    unroll: as :func:`hutchinson_trace`.

  Returns:
    :class:`StochasticEstimate` of pytrees shaped like ``like`` (per-entry
    estimate and standard error).

  References:
    Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
    2007. Yao et al., "ADAHESSIAN", 2020, arXiv:2006.00719.
  """
  num_probes, batch_size = _check_probes("hutchinson_diagonal", like, num_probes,
                                         batch_size, key=key)
  unroll = _probe_unroll("hutchinson_diagonal", unroll, matvec, like, num_probes,
                         batch_size)

  def sample(k):
    z = _random_like(like, k, "rademacher")
    return _tmap(lambda a, b: a * b, z, matvec(z))

  return _moments(functools.partial(_per_chunk, sample), jax.random.split(key, num_probes),
                  batch_size, unroll)
class RitzResult(NamedTuple):
  """Output of :func:`lanczos_eigenvalues`.

  Attributes:
    eigenvalues: ``[k]`` Ritz values, ordered as requested by ``which``.
    eigenvectors: pytree like ``like`` with a leading axis ``k`` (unit-norm
      Ritz vectors; ``eigenvectors[i]`` goes with ``eigenvalues[i]``).
    residual_norms: ``[k]`` ``||A y_i - theta_i y_i||`` (= ``beta_m |s_{m,i}|``),
      an a-posteriori error bound: some eigenvalue of ``A`` lies within it.
  """
  eigenvalues: Any
  eigenvectors: Any
  residual_norms: Any


def lanczos_eigenvalues(matvec: Callable, like, key, k: int = 6,
                        num_steps: int | None = None, which: str = "LA", *,
                        unroll: bool | str | None = None) -> RitzResult:
  r"""Extreme eigenpairs of a symmetric pytree operator by Lanczos (``eigsh``-style).

  Runs :func:`lanczos` from a Gaussian random start drawn with ``key`` and
  returns ``k`` Ritz pairs ``(theta_i, y_i = V s_i)`` of ``T s_i = theta_i s_i``.
  No restarts: accuracy grows with ``num_steps`` (with ``num_steps = P`` the
  Ritz values are the eigenvalues of ``A`` to rounding).

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``; symmetric
      (e.g. ``lambda v: mm.hvp(f, params, v, x, y)``).
    like: pytree with the operator's structure, shapes and dtypes (e.g. params).
    key: ``jax.random`` key for the starting vector.
    k: number of eigenpairs, ``1 <= k <= num_steps``.
    num_steps: Lanczos steps ``m <= P``; default ``min(P, max(2k + 1, 20))``.
    which: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest
      algebraic (ascending), ``"LM"`` largest magnitude (descending ``|theta|``).
    unroll: as :func:`mlmap.lanczos`: ``None`` (default), on the CPU when
      ``matvec`` contains a convolution, unrolls ``num_steps <= 64`` steps and
      iterates more from the host.

  Returns:
    A :class:`RitzResult`.

  References:
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization
    via Hessian eigenvalue density", 2019, arXiv:1901.10159. Yao, Gholami,
    Keutzer & Mahoney, "PyHessian: neural networks through the lens of the
    Hessian", 2020, arXiv:1912.07145.
  """
  fn = "lanczos_eigenvalues"
  if which not in ("LA", "SA", "LM"):
    raise ValueError(f"{fn}: which must be 'LA', 'SA' or 'LM', got {which!r}.")
  _check_like(fn, like)
  _check_key(fn, key)
  k = _check_int(fn, "k", k, 1)
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(like))
  if num_steps is None:
    num_steps = min(size, max(2 * k + 1, 20))
  num_steps = _check_steps(fn, like, num_steps)
  if k > num_steps:
    raise ValueError(f"{fn}: k ({k}) must be <= num_steps ({num_steps}).")
  unroll = _loops.resolve_unroll(fn, unroll, num_steps, matvec, like, host=True)
  v0 = _random_like(like, key, "normal")
  flat, unravel, mv = _flat_operator(matvec, v0)
  res = _lanczos_flat(mv, flat, num_steps, unroll)
  theta, s = jnp.linalg.eigh(tridiagonal(res))
  order = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[which]
  idx = jnp.argsort(order)[:k]
  theta, s = theta[idx], s[:, idx]
  vectors = jnp.dot(s.T, res.basis, precision=_HIGHEST)
  return RitzResult(eigenvalues=theta, eigenvectors=jax.vmap(unravel)(vectors),
                    residual_norms=jnp.abs(res.residual * s[-1]))


class SLQResult(NamedTuple):
  """Gauss quadrature rules of stochastic Lanczos quadrature (SLQ).

  Attributes:
    nodes: ``[num_probes, m]`` Ritz values ``theta_{lk}`` per probe.
    weights: ``[num_probes, m]`` weights ``tau_{lk}^2`` (squared first entries
      of the eigenvectors of ``T_l``), each row summing to 1.
    dimension: ``P``, the number of scalar entries (``||z_l||^2`` of a
      Rademacher probe), so that ``tr f(A) ~ P * mean_l sum_k w_lk f(theta_lk)``.
  """
  nodes: Any
  weights: Any
  dimension: int


def _slq_checks(fn, like, num_probes, num_steps, batch_size, minimum, key):
  num_probes, batch_size = _check_probes(fn, like, num_probes, batch_size, minimum, key)
  num_steps = _check_steps(fn, like, num_steps)
  return num_probes, num_steps, batch_size


def _slq_rule(matvec, like, num_steps, unroll=False):
  """Quadrature rules of a chunk of probes: keys [b] -> (nodes [b, m], weights [b, m]).

  The chunk's probes run as one batched Lanczos loop over the vmapped product
  (see :func:`mlmap.linalg._lanczos_flat`), not as a vmap of one-probe loops."""

  def rule(ks):
    z = jax.vmap(lambda k: _random_like(like, k, "rademacher"))(ks)
    flat, _, mv = _flat_operator(matvec, _tmap(lambda a: a[0], z))
    flats = jax.vmap(lambda t: ravel_pytree(t)[0])(z)
    if flats.shape[0] == 1:  # the one-vector loop (faster than a batch of one)
      res = _tmap(lambda a: a[None], _lanczos_flat(mv, flats[0], num_steps, unroll))
    else:
      res = _lanczos_flat(jax.vmap(mv), flats, num_steps, unroll)
    theta, s = jnp.linalg.eigh(jax.vmap(tridiagonal)(res))
    return theta, s[:, 0] ** 2

  return rule


def slq_quadrature(matvec: Callable, like, key, num_probes: int, num_steps: int,
                   batch_size: int | None = None, *,
                   unroll: bool | str | None = None) -> SLQResult:
  r"""Stochastic Lanczos quadrature: Gauss rules for ``tr f(A)`` of a symmetric ``A``.

  For each Rademacher probe ``z_l``, ``m`` Lanczos steps from ``z_l / sqrt(P)``
  give ``T_l = S_l diag(theta_l) S_l^T`` and

  .. math::
    z_l^\top f(A)\, z_l \approx P \sum_{k=1}^m \tau_{lk}^2 f(\theta_{lk}),
    \quad \tau_{lk} = (S_l)_{1k}, \qquad
    \mathrm{tr} f(A) \approx \frac{P}{n}\sum_{l=1}^n \sum_{k=1}^m \tau_{lk}^2 f(\theta_{lk}),

  exact per probe for polynomials ``f`` of degree ``<= 2m - 1`` (so the only
  error left is Hutchinson's for those). The spectral density is the measure
  ``(1/n) sum_{l,k} tau_lk^2 delta(t - theta_lk)``.

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``; symmetric.
    like: pytree with the operator's structure, shapes and dtypes.
    key: ``jax.random`` key.
    num_probes: number of probes ``n >= 1``.
    num_steps: Lanczos steps ``m`` per probe, ``1 <= m <= P``.
    batch_size: probes run together (must divide ``num_probes``) as one
      Lanczos loop over the vmapped ``matvec``; default 1.
    unroll: ``True`` unrolls the loop over probe chunks and the Lanczos
      steps, ``False`` keeps ``lax`` loops, ``"host"`` keeps the probe loop
      rolled and iterates each chunk's Lanczos steps from the host (one jitted
      top-level step each; not differentiable); ``None`` (default), when the
      backend is the CPU and ``matvec`` contains a convolution, unrolls up to
      64 products (chunks x steps) and takes ``"host"`` above (XLA:CPU runs a
      convolution inside a loop about 25x slower; see ``mlmap._loops``), and
      elsewhere keeps ``lax`` loops. The result is the same either way.

  Returns:
    :class:`SLQResult` (``nodes``, ``weights``, ``dimension``).

  References:
    Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", 2017, SIAM J. Matrix Anal. Appl. Golub & Meurant, "Matrices,
    Moments and Quadrature with Applications", 2010.
  """
  num_probes, num_steps, batch_size = _slq_checks("slq_quadrature", like, num_probes,
                                                  num_steps, batch_size, 1, key)
  unroll = _probe_unroll("slq_quadrature", unroll, matvec, like, num_probes, batch_size,
                         num_steps)
  rule, keys = _slq_rule(matvec, like, num_steps, unroll), jax.random.split(key, num_probes)
  chunks = _chunked(keys, batch_size)
  if unroll is True:
    parts = [rule(c) for c in chunks]
  else:  # rolled; with "host" each chunk's Lanczos loop runs from the host
    parts = [lax.map(rule, chunks)]
  nodes, weights = (jnp.concatenate([q[i].reshape(-1, num_steps) for q in parts])
                    for i in (0, 1))
  return SLQResult(nodes=nodes, weights=weights, dimension=_size(like))


def spectral_density(matvec: Callable, like, key, num_probes: int, num_steps: int,
                     grid, sigma, batch_size: int | None = None, *,
                     unroll: bool | str | None = None):
  r"""Gaussian-broadened eigenvalue density of a symmetric ``A`` by SLQ.

  .. math::
    \phi_\sigma(t) = \frac1n \sum_{l=1}^n \sum_{k=1}^m \tau_{lk}^2\,
      \frac{1}{\sigma\sqrt{2\pi}} \exp\!\Big(-\frac{(t - \theta_{lk})^2}{2\sigma^2}\Big),

  an estimate of ``(1/P) sum_i N(t; lambda_i, sigma^2)``; it integrates to 1
  over a grid that covers the spectrum by a few ``sigma`` (the loss-landscape
  "Hessian eigenvalue density" of PyHessian).

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``; symmetric.
    like: pytree with the operator's structure, shapes and dtypes.
    key: ``jax.random`` key.
    num_probes: number of probes ``n >= 1``.
    num_steps: Lanczos steps per probe ``1 <= m <= P``.
    grid: array of points ``t`` (any shape).
    sigma: Gaussian broadening, > 0.
    batch_size: probes run together (must divide ``num_probes``) as one
      Lanczos loop over the vmapped ``matvec``; default 1.
    unroll: as :func:`slq_quadrature`.

  Returns:
    Array of ``phi_sigma(t)`` with ``grid``'s shape.

  References:
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization
    via Hessian eigenvalue density", 2019, arXiv:1901.10159. Lin, Saad & Yang,
    "Approximating spectral densities of large matrices", 2016,
    arXiv:1308.5467. Ubaru, Chen & Saad, 2017.
  """
  fn = "spectral_density"
  _check_like(fn, like)
  _check_key(fn, key)
  _checks.check_positive("sigma", sigma, fn)
  if _checks.is_concrete(sigma) and not np.all(np.isfinite(np.asarray(sigma, float))):
    raise ValueError(f"{fn}: sigma must be finite, got {sigma!r}.")
  grid = jnp.asarray(grid)
  _checks.check_float(fn, "grid", grid)
  rule = slq_quadrature(matvec, like, key, num_probes, num_steps, batch_size,
                        unroll=unroll)
  dtype = rule.nodes.dtype
  sigma = jnp.asarray(sigma, dtype)
  t = grid.astype(dtype)[..., None, None]
  kern = jnp.exp(-0.5 * ((t - rule.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
  return jnp.sum(rule.weights * kern, axis=(-2, -1)) / num_probes


def stochastic_logdet(matvec: Callable, like, key, num_probes: int, num_steps: int,
                      batch_size: int | None = None, *,
                      unroll: bool | str | None = None) -> StochasticEstimate:
  r"""``log det A`` of a symmetric positive definite ``A`` by SLQ, with its standard error.

  .. math::
    \log\det A = \mathrm{tr}\log A \approx \frac{P}{n} \sum_{l=1}^n
      \sum_{k=1}^m \tau_{lk}^2 \log\theta_{lk}.

  Two errors: the Monte-Carlo error over probes, reported as
  ``standard_error`` (the estimate is within a few of them of
  ``E_z[z^T log(T) z]``), and the quadrature bias of ``m`` Lanczos steps, which
  decays like ``((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^{2m}`` for condition
  number ``kappa`` (Ubaru et al. 2017, Thm. 4.1) and vanishes for
  ``m = P``; take ``m`` of a few ``sqrt(kappa)`` (e.g. 30-100 for a damped
  GGN). A non-positive Ritz value (``A`` not positive definite) gives NaN.

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``like``; SPD.
    like: pytree with the operator's structure, shapes and dtypes.
    key: ``jax.random`` key.
    num_probes: number of probes ``n >= 2``.
    num_steps: Lanczos steps per probe ``1 <= m <= P``.
    batch_size: probes run together (must divide ``num_probes``) as one
      Lanczos loop over the vmapped ``matvec``; default 1.
    unroll: as :func:`slq_quadrature`.

  Returns:
    :class:`StochasticEstimate` (scalar estimate, standard error).

  References:
    Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", 2017, SIAM J. Matrix Anal. Appl. Dong, Eriksson, Nickisch,
    Bindel & Wilson, "Scalable log determinants for Gaussian process kernel
    learning", 2017, arXiv:1711.03481.
  """
  num_probes, num_steps, batch_size = _slq_checks("stochastic_logdet", like, num_probes,
                                                  num_steps, batch_size, 2, key)
  unroll = _probe_unroll("stochastic_logdet", unroll, matvec, like, num_probes, batch_size,
                         num_steps)
  rule = _slq_rule(matvec, like, num_steps, unroll)
  size = _size(like)

  def chunk(ks):
    theta, w = rule(ks)
    safe = jnp.where(theta > 0, theta, jnp.nan)  # NaN flags a non-SPD operator
    return size * jnp.sum(jnp.where(w > 0, w * jnp.log(safe), 0), axis=1)

  # With "host" the Lanczos loops run from the host inside a rolled probe loop.
  return _moments(chunk, jax.random.split(key, num_probes), batch_size,
                  unroll if unroll is True else False)
