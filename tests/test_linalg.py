"""Tests for mlmap.linalg: cg against np.linalg.solve, lanczos against eigvalsh."""

import numpy as np
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import pytest

import mlmap as mm


def _spd(n, seed=0, cond_shift=1.0, scales=None):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + cond_shift * np.eye(n)
  if scales is not None:
    a = scales[:, None] * a * scales[None, :]
  return a


def _numpy_cg(a, b, x0, maxiter):
  """Plain textbook CG stopping at p^T A p <= 0: the independent reference."""
  x, r = x0.copy(), b - a @ x0
  p, k = r.copy(), 0
  for _ in range(maxiter):
    ap = a @ p
    pap = p @ ap
    if pap <= 0:
      return x, k, True
    alpha = (r @ r) / pap
    x = x + alpha * p
    r_new = r - alpha * ap
    p = r_new + (r_new @ r_new) / (r @ r) * p
    r, k = r_new, k + 1
  return x, k, False


_solve = jax.jit(lambda a, b: mm.cg(lambda v: a @ v, b, tol=1e-13))


# --- cg -------------------------------------------------------------------------

def test_cg_matches_numpy_solve():
  for n, seed in [(5, 0), (20, 1)]:
    a = _spd(n, seed)
    b = np.random.default_rng(seed + 10).normal(size=n)
    x, info = _solve(a, b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=0, atol=1e-10)
    assert not info.negative_curvature
    assert bool(info.converged) and int(info.status) == mm.CGStatus.CONVERGED
    assert info.status.dtype == jnp.int32 and info.converged.dtype == jnp.bool_
    assert 0 < int(info.iterations) <= n
    assert float(info.residual_norm) <= 1e-13 * np.linalg.norm(b) * 1.0001
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ x), atol=1e-12)


def test_cg_jacobi_preconditioner():
  n = 30
  scales = np.logspace(0, 3, n)
  m = np.random.default_rng(2).normal(size=(n, n))
  a = scales[:, None] * (np.eye(n) + 0.05 * m @ m.T / n) * scales[None, :]
  b = np.random.default_rng(3).normal(size=n)
  inv_diag = 1.0 / np.diag(a)

  @jax.jit
  def both(b):
    plain = mm.cg(lambda v: a @ v, b, tol=1e-12)
    pre = mm.cg(lambda v: a @ v, b, tol=1e-12, preconditioner=lambda r: inv_diag * r)
    return plain, pre

  (x1, i1), (x2, i2) = both(b)
  ref = np.linalg.solve(a, b)
  np.testing.assert_allclose(x2, ref, rtol=1e-10, atol=0)
  assert int(i2.iterations) < 15 < int(i1.iterations)
  assert not i2.negative_curvature


def test_cg_x0_and_atol_and_maxiter():
  a = _spd(12, 4)
  b = np.random.default_rng(5).normal(size=12)
  ref = np.linalg.solve(a, b)
  x, info = mm.cg(lambda v: a @ v, b, x0=ref, tol=1e-10)
  assert int(info.iterations) == 0
  np.testing.assert_allclose(x, ref, atol=1e-12)
  x, info = mm.cg(lambda v: a @ v, b, tol=0.0, atol=1e-3)
  assert float(info.residual_norm) <= 1e-3
  assert float(np.linalg.norm(b - a @ x)) > 1e-13  # atol stopped it early
  x, info = jax.jit(lambda b: mm.cg(lambda v: a @ v, b, maxiter=3, tol=0.0))(b)
  xr, k, _ = _numpy_cg(a, b, np.zeros(12), 3)
  assert int(info.iterations) == 3 == k
  assert int(info.status) == mm.CGStatus.MAX_ITERATIONS and not bool(info.converged)
  np.testing.assert_allclose(x, xr, atol=1e-12)
  np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ x), rtol=1e-8)


@pytest.mark.parametrize("unroll", [False, True, "host"])
def test_cg_zero_start_takes_one_product_per_iteration(unroll):
  """x0=None starts from r0 = b without a product; an x0 costs one more."""
  a = _spd(8, 6)
  b = np.random.default_rng(7).normal(size=8)
  calls = []

  def mv(v):
    jax.debug.callback(lambda: calls.append(1))
    return a @ v

  for x0, extra in ((None, 0), (np.ones(8), 1)):
    calls.clear()
    x, info = jax.jit(lambda b: mm.cg(mv, b, x0=x0, maxiter=5, tol=0.0, unroll=unroll))(b)
    jax.effects_barrier()
    xr, k, _ = _numpy_cg(a, b, np.zeros(8) if x0 is None else x0, 5)
    assert int(info.iterations) == 5 == k and len(calls) == 5 + extra
    np.testing.assert_allclose(x, xr, atol=1e-10)


def test_cg_indefinite_flags_negative_curvature():
  rng = np.random.default_rng(6)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  a = q @ np.diag([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, -0.7, -3.0]) @ q.T
  b = rng.normal(size=8)
  x, info = jax.jit(lambda b: mm.cg(lambda v: a @ v, b, tol=1e-12))(b)
  xr, k, neg = _numpy_cg(a, b, np.zeros(8), 8)
  assert neg and bool(info.negative_curvature)
  assert int(info.status) == mm.CGStatus.NEGATIVE_CURVATURE and not bool(info.converged)
  assert int(info.iterations) == k >= 1
  assert np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_allclose(x, xr, atol=1e-10)
  np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ xr), rtol=1e-8)
  # Negative curvature at the very first step: x0 comes back unchanged.
  x0 = rng.normal(size=8)
  x, info = mm.cg(lambda v: -(a @ a) @ v, b, x0=x0)
  assert bool(info.negative_curvature) and int(info.iterations) == 0
  np.testing.assert_array_equal(x, x0)


def test_cg_dict_pytree_mixed_dtypes():
  rng = np.random.default_rng(7)
  like = {"w": np.zeros((3, 2)), "b": np.zeros(4), "c": {"s": np.zeros(())}}
  _, unravel = ravel_pytree(like)
  a = _spd(11, 8)

  def matvec(v):
    flat, _ = ravel_pytree(v)
    return unravel(a @ flat)

  b = unravel(rng.normal(size=11))
  x, info = jax.jit(lambda b: mm.cg(matvec, b, tol=1e-13))(b)
  assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(b)
  np.testing.assert_allclose(ravel_pytree(x)[0], np.linalg.solve(a, ravel_pytree(b)[0]),
                             atol=1e-10)
  # float32 leaves stay float32 (solution to float32 accuracy).
  a32 = np.asarray(a, np.float32)
  b32 = {"u": jnp.asarray(rng.normal(size=5), jnp.float32),
         "v": jnp.asarray(rng.normal(size=6), jnp.float32)}
  mv = lambda v: {"u": (a32[:5, :5] @ v["u"] + a32[:5, 5:] @ v["v"]),
                  "v": (a32[5:, :5] @ v["u"] + a32[5:, 5:] @ v["v"])}
  x32, info32 = jax.jit(lambda b: mm.cg(mv, b, tol=1e-6))(b32)
  assert x32["u"].dtype == jnp.float32 and x32["v"].dtype == jnp.float32
  assert info32.residual_norm.dtype == jnp.float32
  ref = np.linalg.solve(a, np.concatenate([b32["u"], b32["v"]]).astype(np.float64))
  np.testing.assert_allclose(np.concatenate([x32["u"], x32["v"]]), ref, atol=1e-4)


def test_cg_vmap_over_rhs_and_operator():
  a = np.stack([_spd(6, s) for s in range(3)])
  b = np.random.default_rng(9).normal(size=(3, 6))
  b[1] = 0.0
  x, info = jax.jit(jax.vmap(lambda a, b: mm.cg(lambda v: a @ v, b, tol=1e-13)))(a, b)
  ref = np.stack([np.linalg.solve(ai, bi) for ai, bi in zip(a, b)])
  np.testing.assert_allclose(x, ref, atol=1e-10)
  assert int(info.iterations[1]) == 0 and int(info.iterations[0]) > 0
  x, _ = jax.vmap(lambda b: mm.cg(lambda v: a[0] @ v, b, tol=1e-13))(b)
  np.testing.assert_allclose(x, np.linalg.solve(a[0], b.T).T, atol=1e-10)


def test_cg_gradients_match_dense_solve():
  a = jnp.asarray(_spd(7, 11))
  b = jnp.asarray(np.random.default_rng(12).normal(size=7))
  w = jnp.asarray(np.random.default_rng(13).normal(size=7))

  def loss_cg(a, b):
    return jnp.sin(mm.cg(lambda v: a @ v, b, tol=1e-13)[0]) @ w

  def loss_ref(a, b):
    return jnp.sin(jnp.linalg.solve(a, b)) @ w

  g = jax.jit(jax.grad(loss_cg, argnums=(0, 1)))(a, b)
  r = jax.grad(loss_ref, argnums=(0, 1))(a, b)
  np.testing.assert_allclose(g[1], r[1], atol=1e-10)
  np.testing.assert_allclose(g[0], r[0], atol=1e-10)
  # Forward mode too.
  t = jnp.asarray(np.random.default_rng(14).normal(size=7))
  _, jv = jax.jvp(lambda b: mm.cg(lambda v: a @ v, b, tol=1e-13)[0], (b,), (t,))
  np.testing.assert_allclose(jv, np.linalg.solve(a, t), atol=1e-10)


def test_cg_bad_inputs():
  mv = lambda v: v
  b = {"a": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="maxiter must be >= 1, got 0"):
    mm.cg(mv, b, maxiter=0)
  with pytest.raises(ValueError, match="tol must be >= 0, got -0.1"):
    mm.cg(mv, b, tol=-0.1)
  with pytest.raises(ValueError, match="atol must be >= 0"):
    mm.cg(mv, b, atol=-1.0)
  with pytest.raises(ValueError, match=r"x0 tree structure .* differs from b tree structure"):
    mm.cg(mv, b, x0={"a": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"x0 leaf shapes \[\(4,\), \(2,\)\] differ from b leaf "
                     r"shapes \[\(3,\), \(2,\)\]"):
    mm.cg(mv, b, x0={"a": jnp.ones(4), "b": jnp.ones(2)})
  with pytest.raises(TypeError, match="real floating"):
    mm.cg(mv, jnp.arange(3))
  with pytest.raises(TypeError, match="maxiter must be a Python int"):
    mm.cg(mv, b, maxiter=2.5)
  with pytest.raises(ValueError,
                     match=r"matvec\(\) output shapes must match b, got \[\(2,\)\] and \[\(3,\)\]"):
    mm.cg(lambda v: v[:2], jnp.ones(3))
  with pytest.raises(ValueError, match=r"preconditioner\(r\) tree structure .* differs from b"):
    mm.cg(mv, b, preconditioner=lambda r: r["a"])


# --- cg status (issue 10, item 9) -------------------------------------------------

def _status(info):
  return np.asarray(info.status).tolist(), np.asarray(info.converged).tolist()


def test_cg_nan_matvec_is_breakdown_with_finite_x():
  a = _spd(6, 40)
  b = np.random.default_rng(41).normal(size=6)
  x, info = jax.jit(lambda b: mm.cg(lambda v: v * jnp.nan, b))(b)
  assert _status(info) == (mm.CGStatus.BREAKDOWN, False)
  np.testing.assert_array_equal(x, np.zeros(6))
  # NaN only once a direction has a negative first entry: CG stops there and
  # returns the last good iterate, equal to textbook CG run up to that step.
  b = np.abs(b)
  mv = lambda v: a @ v + jnp.where(v[0] < 0, jnp.nan, 0.0)
  x, info = jax.jit(lambda b: mm.cg(mv, b, tol=1e-14))(b)
  k = int(info.iterations)
  assert int(info.status) == mm.CGStatus.BREAKDOWN and not bool(info.converged)
  assert bool(info.negative_curvature)  # as documented: non-finite p^T A p
  assert 1 <= k < 6 and np.all(np.isfinite(np.asarray(x)))
  xr, kr, _ = _numpy_cg(a, b, np.zeros(6), k)
  assert kr == k
  np.testing.assert_allclose(x, xr, atol=1e-12)
  np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ xr), rtol=1e-8)


def test_cg_inconsistent_singular_system_is_flagged_not_huge():
  # The case: diag(1, 0) x = (1, 1) has no solution.
  x, info = jax.jit(lambda b: mm.cg(lambda v: jnp.array([1.0, 0.0]) * v, b))(jnp.ones(2))
  assert int(info.status) == mm.CGStatus.NEGATIVE_CURVATURE and not bool(info.converged)
  np.testing.assert_allclose(x, [2.0, 2.0])  # textbook CG's first iterate
  # Rotated, so rounding makes p^T A p ~ 1e-17 > 0 (jax.scipy's cg returns ~1e16).
  rng = np.random.default_rng(42)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a = q @ np.diag([3.0, 2.0, 1.0, 1.0, 0.0, 0.0]) @ q.T
  b = rng.normal(size=6)
  x, info = jax.jit(lambda b: mm.cg(lambda v: a @ v, b, tol=1e-10))(b)
  assert int(info.status) in (mm.CGStatus.NEGATIVE_CURVATURE, mm.CGStatus.BREAKDOWN)
  assert not bool(info.converged)
  # CG residuals grow on an inconsistent system, so x is not the least-squares
  # solution; it must be finite and moderate, where unguarded CG divides by
  # rounding-level curvature.
  assert np.linalg.norm(np.asarray(x)) < 1e3
  x_jax, _ = jax.scipy.sparse.linalg.cg(lambda v: a @ v, jnp.asarray(b), tol=1e-10)
  assert np.linalg.norm(np.asarray(x_jax)) > 1e10
  np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ x), rtol=1e-6)
  # A consistent right-hand side of the same singular A still converges, to the
  # minimum-norm solution (the Krylov space lies in range(A)).
  bc = a @ rng.normal(size=6)
  x, info = jax.jit(lambda b: mm.cg(lambda v: a @ v, b, tol=1e-12))(bc)
  assert bool(info.converged) and int(info.status) == mm.CGStatus.CONVERGED
  np.testing.assert_allclose(x, np.linalg.pinv(a) @ bc, atol=1e-10)


def test_cg_preconditioner_not_positive_definite_is_breakdown():
  a = _spd(5, 43)
  b = np.random.default_rng(44).normal(size=5)
  x0 = np.random.default_rng(45).normal(size=5)
  x, info = mm.cg(lambda v: a @ v, b, x0=x0, preconditioner=lambda r: -r)
  assert int(info.status) == mm.CGStatus.BREAKDOWN and not bool(info.converged)
  assert int(info.iterations) == 0
  np.testing.assert_array_equal(x, x0)


def test_cg_vmap_members_have_their_own_status():
  good = _spd(4, 46)
  singular = np.diag([1.0, 1.0, 1.0, 0.0])
  nan = np.full((4, 4), np.nan)
  a = np.stack([good, singular, nan, good])
  b = np.ones((4, 4))
  solve = jax.jit(jax.vmap(lambda a, b, m: mm.cg(lambda v: a @ v, b, maxiter=m, tol=1e-12),
                           in_axes=(0, 0, None)), static_argnums=2)
  x, info = solve(a, b, 4)
  assert np.asarray(info.status).tolist() == [mm.CGStatus.CONVERGED,
                                              mm.CGStatus.NEGATIVE_CURVATURE,
                                              mm.CGStatus.BREAKDOWN, mm.CGStatus.CONVERGED]
  assert np.asarray(info.converged).tolist() == [True, False, False, True]
  assert np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_allclose(x[0], np.linalg.solve(good, b[0]), atol=1e-10)
  _, info = solve(a, b, 1)
  assert int(info.status[0]) == mm.CGStatus.MAX_ITERATIONS


def test_cg_info_positional_fields_kept_and_status_names():
  info = mm.CGInfo(1, 0.5, False)  # three positional fields still construct
  assert info.converged is None and info.status is None
  assert mm.CGInfo._fields[:3] == ("iterations", "residual_norm", "negative_curvature")
  assert mm.CGInfo._fields[3:] == ("converged", "status")
  assert [mm.CGStatus.NAMES[c] for c in (mm.CGStatus.CONVERGED, mm.CGStatus.MAX_ITERATIONS,
                                         mm.CGStatus.NEGATIVE_CURVATURE,
                                         mm.CGStatus.BREAKDOWN)] == list(mm.CGStatus.NAMES)


# --- lanczos --------------------------------------------------------------------

def _sym(n, seed):
  m = np.random.default_rng(seed).normal(size=(n, n))
  return (m + m.T) / 2


def test_lanczos_full_steps_eigenvalues_and_basis():
  n = 10
  a = _sym(n, 20)
  v0 = np.random.default_rng(21).normal(size=n)
  res = jax.jit(lambda v: mm.lanczos(lambda x: a @ x, v, n))(v0)
  assert res.alphas.shape == (n,) and res.betas.shape == (n - 1,) and res.basis.shape == (n, n)
  np.testing.assert_allclose(np.linalg.eigvalsh(mm.tridiagonal(res)), np.linalg.eigvalsh(a),
                             atol=1e-10)
  v = np.asarray(res.basis)
  np.testing.assert_allclose(v @ v.T, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(v @ a @ v.T, mm.tridiagonal(res), atol=1e-10)
  np.testing.assert_allclose(v[0], v0 / np.linalg.norm(v0), atol=1e-14)


def test_lanczos_partial_steps_match_krylov_qr():
  n, m = 30, 6
  a = _sym(n, 22)
  v0 = np.random.default_rng(23).normal(size=n)
  res = mm.lanczos(lambda x: a @ x, v0, m)
  krylov = np.stack([np.linalg.matrix_power(a, j) @ v0 for j in range(m)], 1)
  q, _ = np.linalg.qr(krylov)
  t_ref = q.T @ a @ q  # same basis up to column signs
  np.testing.assert_allclose(res.alphas, np.diag(t_ref), atol=1e-9)
  np.testing.assert_allclose(res.betas, np.abs(np.diag(t_ref, 1)), atol=1e-9)
  # Residual: ||(I - V^T V) A v_m||.
  vm = np.asarray(res.basis)
  r = a @ vm[-1] - vm.T @ (vm @ (a @ vm[-1]))
  np.testing.assert_allclose(res.residual, np.linalg.norm(r), atol=1e-9)


def test_lanczos_breakdown_no_nan_on_pytree():
  # 4 distinct eigenvalues: the Krylov space is invariant after 4 steps.
  d = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0])
  like = {"w": np.zeros((2, 3)), "b": np.zeros(6)}
  flat0, unravel = ravel_pytree(like)
  mv = lambda v: unravel(d * ravel_pytree(v)[0])
  res = jax.jit(lambda v: mm.lanczos(mv, v, 12))(unravel(np.ones(12)))
  assert np.all(np.isfinite(np.asarray(res.basis)))
  assert float(res.betas[3]) == 0.0
  np.testing.assert_allclose(np.linalg.eigvalsh(mm.tridiagonal(res)), np.sort(d), atol=1e-12)
  v = np.asarray(res.basis)
  np.testing.assert_allclose(v @ v.T, np.eye(12), atol=1e-12)
  np.testing.assert_allclose(v @ np.diag(d) @ v.T, mm.tridiagonal(res), atol=1e-12)
  # Zero starting vector: restarts instead of dividing by zero.
  res0 = mm.lanczos(mv, unravel(np.zeros(12)), 5)
  assert np.all(np.isfinite(np.asarray(res0.basis)))
  np.testing.assert_allclose(np.asarray(res0.basis) @ np.asarray(res0.basis).T, np.eye(5),
                             atol=1e-12)


def test_lanczos_vmap_over_start():
  a = _sym(8, 24)
  v0 = np.random.default_rng(25).normal(size=(3, 8))
  one = jax.jit(lambda v: mm.lanczos(lambda x: a @ x, v, 5))
  res = jax.jit(jax.vmap(one))(v0)
  for i in range(3):
    ri = one(v0[i])
    np.testing.assert_allclose(res.alphas[i], ri.alphas, atol=1e-12)
    np.testing.assert_allclose(res.betas[i], ri.betas, atol=1e-12)


def test_batched_lanczos_equals_one_vector_runs_with_restarts_in_some_rows():
  """The batch loop (SLQ's probes) takes each row's own iterates: one row starts
  at zero (restart at step 0), one in a 2-dimensional invariant subspace
  (restart at step 2), one generic; the restarts and the second Gram-Schmidt
  pass are lax.cond on any row, not selects computing both branches."""
  from mlmap.linalg import _lanczos_flat
  n, m = 7, 5
  a = np.diag(np.arange(1.0, n + 1))  # e0 + e3 spans an invariant plane, exactly
  v0 = np.stack([np.zeros(n), np.eye(n)[0] + np.eye(n)[3],
                 np.random.default_rng(3).normal(size=n)])
  mv = lambda v: a @ v
  batched = jax.jit(lambda v: _lanczos_flat(jax.vmap(mv), v, m))(v0)
  for i in range(3):
    one = _lanczos_flat(mv, jnp.asarray(v0[i]), m)
    for f in ("alphas", "betas", "basis", "residual"):
      np.testing.assert_allclose(getattr(batched, f)[i], getattr(one, f), atol=1e-12)
  assert float(batched.betas[1, 1]) == 0.0  # the invariant row restarted
  t = np.asarray(mm.tridiagonal(jax.tree_util.tree_map(lambda x: x[2], batched)))
  np.testing.assert_allclose(np.linalg.eigvalsh(t), np.sort(np.linalg.eigvalsh(
      np.asarray(batched.basis[2]) @ a @ np.asarray(batched.basis[2]).T)), atol=1e-10)
  text = str(jax.make_jaxpr(lambda v: _lanczos_flat(jax.vmap(mv), v, m))(v0))
  assert "cond[" in text


def test_lanczos_bad_inputs():
  with pytest.raises(ValueError, match=r"num_steps \(4\) must be <= .* P \(3\)"):
    mm.lanczos(lambda v: v, jnp.ones(3), 4)
  with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
    mm.lanczos(lambda v: v, jnp.ones(3), 0)
  with pytest.raises(ValueError, match=r"matvec\(v\) leaf shapes \[\(2,\)\] differ from v"):
    mm.lanczos(lambda v: v[:2], jnp.ones(3), 2)
  with pytest.raises(TypeError, match="real floating"):
    mm.lanczos(lambda v: v, jnp.arange(3), 2)


def test_cg_jit_traces_once_and_vmap_over_x0():
  import chex
  a = _spd(5, 30)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def solve(b, x0):
    return mm.cg(lambda v: a @ v, b, x0=x0, tol=1e-13)

  rng = np.random.default_rng(31)
  for _ in range(3):
    b = rng.normal(size=5)
    x, _ = solve(b, rng.normal(size=5))
    np.testing.assert_allclose(x, np.linalg.solve(a, b), atol=1e-10)
  b, x0 = rng.normal(size=5), rng.normal(size=(4, 5))
  x, info = jax.vmap(lambda x0: mm.cg(lambda v: a @ v, b, x0=x0, tol=1e-13))(x0)
  np.testing.assert_allclose(x, np.tile(np.linalg.solve(a, b), (4, 1)), atol=1e-10)
