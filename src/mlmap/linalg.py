"""Matrix-free linear algebra on pytrees: conjugate gradients and Lanczos.

Both take a callable ``matvec`` mapping a pytree to a pytree of the same
structure (e.g. ``lambda v: mm.hvp(f, params, v, x, y)``), like
``jax.scipy.sparse.linalg.cg``, and return an info ``NamedTuple`` instead of
``None`` so the caller can see whether the computation worked. Inner products
use ``Precision.HIGHEST`` (no TF32 / bf16 passes on GPU and TPU).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import _loops

_HIGHEST = lax.Precision.HIGHEST
_tmap = jax.tree_util.tree_map


# --- pytree helpers (shared with spectral.py) ---------------------------------

def _scalar_dtype(tree):
  """Dtype of a tree's inner products: its leaves' common dtype, at least float32.

  (bfloat16 / float16 leaves stay as they are; their sums are not.)
  """
  leaves = jax.tree_util.tree_leaves(tree)
  dtype = jnp.result_type(float, *leaves) if not leaves else jnp.result_type(*leaves)
  return jnp.promote_types(dtype, jnp.float32)


def tree_vdot(a, b, dtype=None):
  """Sum over leaves of ``<a_leaf, b_leaf>`` in ``Precision.HIGHEST``."""
  dtype = _scalar_dtype(a) if dtype is None else dtype
  terms = [jnp.vdot(x, y, precision=_HIGHEST, preferred_element_type=dtype)
           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return functools.reduce(jnp.add, terms, jnp.zeros((), dtype))


def _axpy(alpha, x, y):
  """``alpha * x + y`` leafwise; ``alpha`` is cast to each leaf's dtype."""
  return _tmap(lambda a, b: alpha.astype(b.dtype) * a + b, x, y)


def _check_floating(fn: str, name: str, tree) -> None:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{fn}: {name} has no array leaves (got {tree!r}).")
  for leaf in leaves:
    dt = jnp.result_type(leaf)
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"{fn}: {name} leaves must be real floating arrays, got "
                      f"dtypes {[str(jnp.result_type(x)) for x in leaves]}.")


def _check_int(fn: str, name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{fn}: {name} must be a Python int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}.")
  return int(value)


# --- conjugate gradients ------------------------------------------------------

class CGStatus:
  """Integer codes of :attr:`CGInfo.status` (like lineax's ``RESULTS``).

  ``CONVERGED``: the residual met ``tol``/``atol`` and stayed finite.
  ``MAX_ITERATIONS``: ``maxiter`` steps ran without meeting the tolerance.
  ``NEGATIVE_CURVATURE``: a direction with ``p^T A p <= 0`` (or at rounding
  level: a singular ``A``) stopped the solve.
  ``BREAKDOWN``: a non-finite value (NaN/inf matvec, residual or iterate) or a
  preconditioner with ``r^T M^{-1} r <= 0`` stopped it.

  ``CGStatus.NAMES[code]`` is the code's name.
  """
  CONVERGED = 0
  MAX_ITERATIONS = 1
  NEGATIVE_CURVATURE = 2
  BREAKDOWN = 3
  NAMES = ("converged", "max_iterations", "negative_curvature", "breakdown")


class CGInfo(NamedTuple):
  """Diagnostics of :func:`cg`.

  Attributes:
    iterations: number of CG steps taken (updates of ``x``), int32 scalar.
    residual_norm: ``||b - A x||_2`` of the returned ``x`` (the recursively
      updated residual, which equals the true one up to rounding; NaN or inf
      when the matvec of ``x0`` was not finite).
    negative_curvature: True when a search direction stopped the solve because
      its curvature ``p^T A p`` was not positive, was at rounding level
      (``<= 10 eps ||p||^2`` times the largest ``p^T A p / ||p||^2`` seen so
      far: a singular ``A``), or was not finite; ``x`` is then the last iterate
      before that direction (``x0`` if it was the first).
    converged: bool scalar, ``residual_norm <= max(tol ||b||, atol)``, finite,
      and the solve was not stopped by negative curvature or a breakdown.
    status: int32 scalar, one of the :class:`CGStatus` codes (``CGStatus.NAMES[
      status]`` is its name); under ``vmap`` each member has its own.
  """
  iterations: Any
  residual_norm: Any
  negative_curvature: Any
  converged: Any = None
  status: Any = None


class _CGState(NamedTuple):
  k: Any
  x: Any
  r: Any
  z: Any
  p: Any
  rz: Any
  rnorm: Any
  negative: Any    # stopped by a non-positive / rounding-level / non-finite p^T A p
  breakdown: Any   # stopped by a non-finite value or a non-positive r^T M^{-1} r
  curv_max: Any    # largest Rayleigh quotient p^T A p / ||p||^2 seen so far


def _cg_status(s, threshold):
  """``(converged, status)`` of a finished :func:`_cg_loop` state.

  A breakdown (non-finite ``p^T A p``, residual or iterate; a preconditioner
  with ``r^T M^{-1} r <= 0``) outranks negative curvature, which outranks the
  tolerance test.
  """
  finite = jnp.isfinite(s.rnorm)
  breakdown = s.breakdown | ~finite
  negative = s.negative & ~breakdown
  met = finite & (s.rnorm <= threshold)
  status = jnp.where(breakdown, CGStatus.BREAKDOWN,
                     jnp.where(negative, CGStatus.NEGATIVE_CURVATURE,
                               jnp.where(met, CGStatus.CONVERGED, CGStatus.MAX_ITERATIONS)))
  return met & ~negative & ~breakdown, status.astype(jnp.int32)


def _cg_step(matvec, precond, dtype, threshold, s):
  """One preconditioned CG step; a step that breaks down keeps the old iterate."""
  eps = jnp.finfo(dtype).eps
  ap = matvec(s.p)
  pap, pp = tree_vdot(s.p, ap, dtype), tree_vdot(s.p, s.p, dtype)
  # Curvature at rounding level relative to the largest seen is not curvature:
  # dividing by it is how an inconsistent singular system returns x ~ 1e15.
  bad_pap = ~jnp.isfinite(pap)
  negative = bad_pap | ~(pap > 10 * eps * pp * s.curv_max)
  alpha = s.rz / jnp.where(negative, 1, pap)
  x = _axpy(alpha, s.p, s.x)
  r = _axpy(-alpha, ap, s.r)
  rnorm = jnp.sqrt(tree_vdot(r, r, dtype))
  nonfinite = bad_pap | ~jnp.isfinite(rnorm) | ~_checks.tree_all_finite(x)
  revert = negative | nonfinite
  z = precond(r)
  rz = tree_vdot(r, z, dtype)
  # r^T M^{-1} r <= 0 (or NaN) with r not yet small: M is not positive definite.
  bad_rz = ~(rz > 0) & (rnorm > threshold)
  beta = rz / jnp.where(s.rz == 0, 1, s.rz)
  p = _axpy(beta, s.p, z)
  curv = jnp.where(pp > 0, pap / jnp.where(pp > 0, pp, 1), 0)
  new = _CGState(k=s.k + 1, x=x, r=r, z=z, p=p, rz=rz, rnorm=rnorm,
                 negative=s.negative, breakdown=s.breakdown | bad_rz,
                 curv_max=jnp.maximum(s.curv_max, curv))
  out = _tmap(lambda n, o: jnp.where(revert, o, n), new, s)
  return out._replace(negative=s.negative | negative,
                      breakdown=out.breakdown | nonfinite)


def _cg_loop(matvec, b, x0, maxiter, tol, atol, precond, unroll=False):
  """Preconditioned CG from ``x0`` (``None``: zeros, and ``r0 = b`` without a
  product; no custom derivative); returns ``(x, info)``.

  ``unroll``: ``True``: ``maxiter`` unrolled steps, each frozen once the
  stopping rule holds (same iterates as the ``while_loop``); ``"host"``: the
  ``while_loop`` iterated from the host, one jitted step per iteration
  (:func:`mlmap._loops.host_while_loop`); ``False``: the plain ``while_loop``."""
  dtype = _scalar_dtype(b)
  bnorm = jnp.sqrt(tree_vdot(b, b, dtype))
  threshold = jnp.maximum(jnp.asarray(tol, dtype) * bnorm, jnp.asarray(atol, dtype))
  if x0 is None:  # r0 = b: no product for the zero start
    x0, r0 = _tmap(jnp.zeros_like, b), b
  else:
    r0 = _tmap(lambda u, v: u - v, b, matvec(x0))
  z0 = precond(r0)
  _checks.check_tree_like("cg", "preconditioner(r)", z0, b, ref_name="b")
  rz0 = tree_vdot(r0, z0, dtype)
  rnorm0 = jnp.sqrt(tree_vdot(r0, r0, dtype))
  breakdown0 = ~jnp.isfinite(rnorm0) | (~(rz0 > 0) & (rnorm0 > threshold))
  state = _CGState(k=jnp.zeros((), jnp.int32), x=x0, r=r0, z=z0, p=z0, rz=rz0,
                   rnorm=rnorm0, negative=jnp.zeros((), bool), breakdown=breakdown0,
                   curv_max=jnp.zeros((), dtype))

  def cond(s):
    return (s.k < maxiter) & (s.rnorm > threshold) & ~s.negative & ~s.breakdown

  step = functools.partial(_cg_step, matvec, precond, dtype, threshold)
  if unroll is True:
    s = state
    for _ in range(maxiter):
      s = _tmap(functools.partial(jnp.where, cond(s)), step(s), s)
  else:
    loop = _loops.host_while_loop if unroll == "host" else lax.while_loop
    s = loop(cond, step, state)
  converged, status = _cg_status(s, threshold)
  return s.x, CGInfo(iterations=s.k, residual_norm=s.rnorm,
                     negative_curvature=s.negative,
                     converged=converged, status=status)


def cg(matvec: Callable, b, x0=None, maxiter: int | None = None, tol=1e-5,
       preconditioner: Callable | None = None, atol=0.0, *,
       unroll: bool | str | None = None):
  r"""Solve ``A x = b`` on pytrees by (preconditioned, truncated) conjugate gradients.

  ``A`` is given by ``matvec(v) = A v`` and must be symmetric; CG converges for
  positive definite ``A``. The iteration stops at the first of

  .. math::
    \|b - A x_k\|_2 \le \max(\mathrm{tol}\,\|b\|_2,\ \mathrm{atol}),
    \qquad k = \mathrm{maxiter},
    \qquad p_k^\top A p_k \le 0 .

  In the last case (negative curvature, the case Newton-CG and Hessian-free
  need) ``info.negative_curvature`` is True and ``x`` is the last iterate
  before the offending direction ``p_k`` (``x0`` when it is the first one).
  "Non-positive" is measured relative to rounding: a direction with
  ``p_k^T A p_k <= 10 eps ||p_k||^2 max_{j<k} p_j^T A p_j / ||p_j||^2`` stops
  the solve too, so an inconsistent singular system (``A = diag(1, 0)``,
  ``b = (1, 1)``) returns a finite ``x`` flagged
  ``CGStatus.NEGATIVE_CURVATURE`` instead of an ``x`` of size ``1 / eps``.
  A non-finite ``p^T A p``, residual or iterate (a NaN or inf matvec), or a
  preconditioner with ``r^T M^{-1} r <= 0``, stops it with
  ``CGStatus.BREAKDOWN`` and the last finite iterate. Read ``info.converged``
  (or ``info.status``, a :class:`CGStatus` code) before trusting ``x``: under
  ``jit`` nothing is raised.
  With ``preconditioner(r) = M^{-1} r`` (symmetric positive definite ``M``) this
  is preconditioned CG; the stopping rule still uses the unpreconditioned
  residual. Runs in ``lax.while_loop`` (see ``unroll``), so it works under ``jit`` and ``vmap``
  (a vmapped batch iterates until every member stops; finished members do not
  change). Leaves keep their dtypes (float32 stays float32); inner products are
  accumulated in the leaves' common dtype with ``Precision.HIGHEST``.

  Differentiation: the solve is wrapped in ``lax.custom_linear_solve``
  (symmetric), so ``jax.grad`` / ``jvp`` of ``x`` with respect to ``b`` and to
  arrays closed over by ``matvec`` are the implicit-function derivatives of
  ``x = A^{-1} b`` (another CG solve with the same settings, no backprop
  through the loop). They are exact when CG converged; for a truncated solve
  (``maxiter`` reached, negative curvature) they are the derivatives of the
  exact solution, not of the truncated iterate. ``x0``, ``tol``, ``atol`` and
  the preconditioner get zero derivatives; ``info`` is not differentiable.

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``b``; symmetric.
    b: right-hand side pytree of real floating arrays.
    x0: initial guess shaped like ``b`` (default zeros).
    maxiter: maximum number of iterations, >= 1; default the number of scalar
      entries in ``b`` (where exact-arithmetic CG terminates).
    tol: relative tolerance on the residual norm, >= 0.
    preconditioner: optional callable ``r -> M^{-1} r`` over pytrees.
    atol: absolute tolerance on the residual norm, >= 0.
    unroll: how the iteration is compiled; the iterates are the same either
      way (up to rounding). ``False``: one ``lax.while_loop``. ``True``:
      ``maxiter`` unrolled steps (each frozen once the solve has stopped, so
      every step pays its product); its compile time grows faster than
      linearly in ``maxiter`` (10 iterations on the 9,930-parameter digits CNN
      of ``experiments/bench_linalg.py``: 13-30 s). ``"host"``: the
      ``while_loop`` iterated from Python inside one ``jax.pure_callback``,
      each iteration one call of a separately jitted top-level CG step
      (arrays closed over by ``matvec``, e.g. parameters and a batch under an
      outer ``jit``, are passed to it as arguments, once per solve); costs
      about 0.5-1.5 ms of dispatch per iteration on a 2-core CPU, and under
      ``vmap`` runs the members one after another, each to its own stop.
      ``None`` (default): ``"host"`` when the backend is the CPU and
      ``matvec`` contains a convolution, else ``False``. XLA:CPU runs a
      convolution inside a loop body 15-30x slower than at top level (see
      ``mlmap._loops``); on that CNN 30 iterations cost 1.2x the 30 jitted
      products with ``"host"`` (rolled: 10-14x), compiling in about 1.3 s
      on the first call
      (``docs/linalg.md``).

  Returns:
    ``(x, info)``: the solution pytree (``b``'s structure and dtypes) and a
    :class:`CGInfo` (``converged``, ``status``, ``iterations``, ...).

  Examples:
    >>> import jax.numpy as jnp, mlmap as mm
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> x, info = mm.cg(lambda v: A @ v, jnp.array([1.0, 2.0]), tol=1e-8)
    >>> bool(jnp.allclose(A @ x, jnp.array([1.0, 2.0]), atol=1e-5)), int(info.iterations)
    (True, 2)
    >>> bool(info.converged), mm.CGStatus.NAMES[int(info.status)]
    (True, 'converged')
    >>> _, info = mm.cg(lambda v: jnp.array([1.0, 0.0]) * v, jnp.ones(2))  # singular
    >>> bool(info.converged), mm.CGStatus.NAMES[int(info.status)]
    (False, 'negative_curvature')

  References:
    Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
    systems", 1952. Nocedal & Wright, "Numerical Optimization", 2006, Alg. 5.3
    and 7.1 (CG-Steihaug / truncated Newton-CG). Martens, "Deep learning via
    Hessian-free optimization", ICML 2010.
  """
  fn = "cg"
  _check_floating(fn, "b", b)
  if x0 is not None:
    _checks.check_tree_like(fn, "x0", x0, b, ref_name="b")
    _check_floating(fn, "x0", x0)
    x0 = _tmap(lambda u, v: jnp.asarray(u, jnp.result_type(v)), x0, b)
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(b))
  maxiter = max(size, 1) if maxiter is None else _check_int(fn, "maxiter", maxiter, 1)
  _checks.check_nonnegative("tol", tol, fn)
  _checks.check_nonnegative("atol", atol, fn)
  precond = (lambda r: r) if preconditioner is None else preconditioner
  if _loops.check_unroll(fn, unroll, host=True) is None:
    unroll = "host" if _loops.conv_on_cpu(matvec, b) else False

  def solve(mv, rhs):
    return _cg_loop(mv, rhs, x0, maxiter, tol, atol, precond, unroll)

  x, info = lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)
  return x, info


# --- Lanczos --------------------------------------------------------------------

class LanczosResult(NamedTuple):
  """Output of :func:`lanczos`: ``V^T A V = T`` with ``T`` tridiagonal.

  Attributes:
    alphas: ``[m]`` diagonal of ``T``.
    betas: ``[m - 1]`` off-diagonal of ``T`` (``>= 0``; exactly 0 where the
      Krylov space became invariant and the iteration restarted).
    basis: ``[m, P]`` orthonormal Lanczos vectors as rows, flat in
      ``jax.flatten_util.ravel_pytree`` order of ``v0`` (unflatten a row with
      the ``unravel`` of ``ravel_pytree(v0)``).
    residual: ``beta_m = ||r_m||``, the norm of the part of ``A v_m`` outside the
      basis; the Ritz pair ``(theta_i, V^T s_i)`` has residual
      ``beta_m |s_{m,i}|``.
  """
  alphas: Any
  betas: Any
  basis: Any
  residual: Any


def _flat_operator(matvec, v0):
  flat, unravel = ravel_pytree(v0)
  dtype = flat.dtype

  def mv(x):
    out = matvec(unravel(x))
    _checks.check_tree_like("lanczos", "matvec(v)", out, v0, ref_name="v")
    return ravel_pytree(out)[0].astype(dtype)

  return flat, unravel, mv


def _orthogonalize(basis, w):
  """Classical Gram-Schmidt of ``w`` ``[P]`` against the rows of ``basis`` ``[m, P]``
  (or of each row ``w[i]`` of a batch ``[n, P]`` against ``basis[i]`` ``[n, m, P]``),
  repeated when needed.

  The second pass runs only when the first removed more than ``1 - 1/sqrt 2``
  of ``w``'s norm (the Daniel-Gragg-Kaufman-Stewart criterion); it restores
  orthogonality to rounding level ("twice is enough") at half the memory
  traffic when, as in Lanczos, the first pass removes little. Under a batch the
  test is one predicate (any row), so the pass stays a ``lax.cond`` that runs
  only when some probe needs it; on a row that did not need it, it changes the
  row by rounding only.
  """
  if w.ndim == 1:
    def cgs(u):
      return u - jnp.dot(jnp.dot(basis, u, precision=_HIGHEST), basis, precision=_HIGHEST)
  else:
    def cgs(u):
      c = jnp.einsum("nmp,np->nm", basis, u, precision=_HIGHEST)
      return u - jnp.einsum("nm,nmp->np", c, basis, precision=_HIGHEST)

  w0 = jnp.linalg.norm(w, axis=-1)
  w = cgs(w)
  return lax.cond(jnp.any(jnp.linalg.norm(w, axis=-1) < w0 / np.sqrt(2.0)), cgs,
                  lambda u: u, w)


def _hash_uniform(size, j):
  """Cheap deterministic pseudo-random entries in [-1/2, 1/2) (an integer hash).

  Used instead of ``jax.random`` inside the Lanczos loop, where a threefry call
  would dominate compile time for a vector that is almost never needed.
  """
  h = (jnp.arange(size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)
       + (jnp.asarray(j, jnp.uint32) + jnp.uint32(1)) * jnp.uint32(0x85EBCA77))
  h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
  h = (h ^ (h >> 12)) * jnp.uint32(0x297A2D39)
  h = h ^ (h >> 15)
  return (h >> 8).astype(jnp.float32) / 2.0 ** 24 - 0.5


def _lanczos_flat(mv, v0, num_steps, unroll=False):
  """Lanczos with full reorthogonalization on flat vectors (see :func:`lanczos`);
  ``unroll``: a Python loop of ``num_steps`` steps instead of ``fori_loop``.

  ``v0`` ``[P]``, or a batch ``[n, P]`` with ``mv`` the batched product
  ``[n, P] -> [n, P]`` (:func:`_lanczos_batch`).
  """
  if v0.ndim == 2:
    return _lanczos_batch(mv, v0, num_steps, unroll)
  size, dtype = v0.shape[0], v0.dtype
  eps = jnp.finfo(dtype).eps

  def restart(j, basis):
    # A deterministic direction orthogonal to the current basis: used when v0
    # is zero or the Krylov space is invariant (beta = 0), so T stays block
    # diagonal and its eigenvalues stay eigenvalues of A.
    u = _hash_uniform(size, j).astype(dtype)
    u = _orthogonalize(basis, u)
    n = jnp.linalg.norm(u)
    return u / jnp.where(n > 0, n, 1)

  basis0 = jnp.zeros((num_steps, size), dtype)
  n0 = jnp.linalg.norm(v0)
  v = lax.cond(n0 > 0, lambda: v0 / jnp.where(n0 > 0, n0, 1),
               lambda: restart(0, basis0))

  def body(j, s):
    basis, alphas, betas, v, v_prev, beta_prev = s
    basis = basis.at[j].set(v)
    w = mv(v)
    w_norm = jnp.linalg.norm(w)
    alpha = jnp.vdot(v, w, precision=_HIGHEST)
    w = _orthogonalize(basis, w - alpha * v - beta_prev * v_prev)
    beta = jnp.linalg.norm(w)
    breakdown = beta <= 10 * eps * w_norm
    beta = jnp.where(breakdown, 0, beta)
    v_next = lax.cond(breakdown, lambda: restart(j + 1, basis),
                      lambda: w / jnp.where(breakdown, 1, beta))
    return (basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v, beta)

  zeros = jnp.zeros((num_steps,), dtype)
  init = (basis0, zeros, zeros, v, jnp.zeros_like(v), jnp.zeros((), dtype))
  basis, alphas, betas, *_ = _loops.fori_loop(0, num_steps, body, init, unroll)
  return LanczosResult(alphas=alphas, betas=betas[:-1], basis=basis, residual=betas[-1])


def _lanczos_batch(mv, v0, num_steps, unroll):
  """:func:`_lanczos_flat` on a batch ``v0`` ``[n, P]``; fields with a leading ``n``.

  The probes of SLQ run as one loop whose restart and second Gram-Schmidt pass
  are ``lax.cond`` calls on any probe needing them, where ``jax.vmap`` of the
  one-vector loop turns them into selects that compute both branches at every
  step. The one-vector loop stays separate: with ``n = 1`` the batch layout's
  basis update ``basis.at[:, j]`` copies the whole basis at every step (about
  3x the one-vector loop on a P = 203,530 operator).
  """
  (n, size), dtype = v0.shape, v0.dtype
  eps = jnp.finfo(dtype).eps

  def restart(j, basis):
    # A deterministic direction orthogonal to the current basis: used when v0
    # is zero or the Krylov space is invariant (beta = 0), so T stays block
    # diagonal and its eigenvalues stay eigenvalues of A.
    u = jnp.broadcast_to(_hash_uniform(size, j).astype(dtype), (n, size))
    u = _orthogonalize(basis, u)
    norm = jnp.linalg.norm(u, axis=-1, keepdims=True)
    return u / jnp.where(norm > 0, norm, 1)

  def unit_or_restart(j, basis, w, beta, broken):
    """Rows ``w / beta``; rows where ``broken`` restart (computed only if any is)."""
    scaled = w / jnp.where(broken, 1, beta)[:, None]
    return lax.cond(jnp.any(broken),
                    lambda: jnp.where(broken[:, None], restart(j, basis), scaled),
                    lambda: scaled)

  basis0 = jnp.zeros((n, num_steps, size), dtype)
  n0 = jnp.linalg.norm(v0, axis=-1)
  v = unit_or_restart(0, basis0, v0, n0, ~(n0 > 0))

  def body(j, s):
    basis, alphas, betas, v, v_prev, beta_prev = s
    basis = basis.at[:, j].set(v)
    w = mv(v)
    w_norm = jnp.linalg.norm(w, axis=-1)
    alpha = jnp.einsum("np,np->n", v, w, precision=_HIGHEST)
    w = _orthogonalize(basis, w - alpha[:, None] * v - beta_prev[:, None] * v_prev)
    beta = jnp.linalg.norm(w, axis=-1)
    breakdown = beta <= 10 * eps * w_norm
    beta = jnp.where(breakdown, 0, beta)
    v_next = unit_or_restart(j + 1, basis, w, beta, breakdown)
    return (basis, alphas.at[:, j].set(alpha), betas.at[:, j].set(beta), v_next, v, beta)

  zeros = jnp.zeros((n, num_steps), dtype)
  init = (basis0, zeros, zeros, v, jnp.zeros_like(v), jnp.zeros((n,), dtype))
  basis, alphas, betas, *_ = _loops.fori_loop(0, num_steps, body, init, unroll)
  return LanczosResult(alphas=alphas, betas=betas[:, :-1], basis=basis,
                       residual=betas[:, -1])


def _check_steps(fn, v0, num_steps):
  _check_floating(fn, "v0", v0)
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(v0))
  num_steps = _check_int(fn, "num_steps", num_steps, 1)
  if num_steps > size:
    raise ValueError(f"{fn}: num_steps ({num_steps}) must be <= the number of "
                     f"scalar entries P ({size}) of the vector.")
  return num_steps


def lanczos(matvec: Callable, v0, num_steps: int, *,
            unroll: bool | str | None = None) -> LanczosResult:
  r"""``num_steps`` Lanczos steps with full reorthogonalization, on a pytree operator.

  Builds an orthonormal basis ``V = [v_1, ..., v_m]`` of the Krylov space
  ``span{v0, A v0, ..., A^{m-1} v0}`` (``v_1 = v0 / ||v0||``) and the
  tridiagonal ``T = V^T A V``:

  .. math::
    \beta_j v_{j+1} = A v_j - \alpha_j v_j - \beta_{j-1} v_{j-1},
    \qquad \alpha_j = v_j^\top A v_j,

  with every new vector re-orthogonalized against all previous ones
  (Gram-Schmidt with a conditional second pass), so the Ritz values
  (eigenvalues of ``T``) carry no spurious copies. When ``beta_j`` is at rounding level (the Krylov space is
  invariant) it is set to exactly 0 and the iteration continues from a
  deterministic vector orthogonal to the basis: ``T`` becomes block diagonal,
  its eigenvalues remain eigenvalues of ``A`` and nothing turns NaN (the same
  happens for a zero ``v0``). Works on the flat ``ravel_pytree`` vector
  (leaves promoted to their common dtype); ``A`` must be symmetric.
  Memory ``O(m P)``; cost ``m`` matvecs plus ``O(m^2 P)``. An estimator, not
  meant to be differentiated.

  Args:
    matvec: callable ``v -> A v`` over pytrees shaped like ``v0``; symmetric.
    v0: starting pytree of real floating arrays.
    num_steps: ``m``, with ``1 <= m <= P`` (the number of scalar entries).
    unroll: ``True`` unrolls the ``m`` steps (one compiled product per step),
      ``False`` runs ``lax.fori_loop``, ``"host"`` iterates the steps from the
      host (one jitted top-level step each, :func:`mlmap._loops.fori_loop`; not
      differentiable); ``None`` (default), when the backend is the CPU and
      ``matvec`` contains a convolution, unrolls ``m <= 64`` and takes
      ``"host"`` above (XLA:CPU runs a convolution inside a loop about 25x
      slower; see ``mlmap._loops``), and elsewhere runs ``lax.fori_loop``. The
      result is the same either way.

  Returns:
    A :class:`LanczosResult` (``alphas [m]``, ``betas [m-1]``, flat
    ``basis [m, P]``, ``residual``).

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators", 1950. Parlett, "The
    Symmetric Eigenvalue Problem", 1998, ch. 13. Golub & Van Loan, "Matrix
    Computations", 2013, sec. 10.1.
  """
  num_steps = _check_steps("lanczos", v0, num_steps)
  unroll = _loops.resolve_unroll("lanczos", unroll, num_steps, matvec, v0, host=True)
  flat, _, mv = _flat_operator(matvec, v0)
  return _lanczos_flat(mv, flat, num_steps, unroll)


def tridiagonal(result: LanczosResult):
  """The dense ``[m, m]`` tridiagonal matrix ``T`` of a :class:`LanczosResult`."""
  return (jnp.diag(result.alphas) + jnp.diag(result.betas, 1)
          + jnp.diag(result.betas, -1))


def _random_like(like, key, kind: str = "rademacher"):
  """A random pytree with ``like``'s structure, shapes and dtypes.

  ``kind="rademacher"``: i.i.d. +-1 entries (Hutchinson probes);
  ``kind="normal"``: i.i.d. standard normal entries.
  """
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = jax.random.split(key, len(leaves))
  draw = {"rademacher": jax.random.rademacher, "normal": jax.random.normal}[kind]
  return jax.tree_util.tree_unflatten(
      treedef, [draw(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])
