"""Structured precisions H + D (mlmap._precisions).

References: dense numpy on ``to_dense(prec) + diag(flat_prior)``:
``np.linalg.slogdet``, ``np.linalg.solve``, ``np.linalg.inv`` (sample
covariance ``S S^T`` from ``sample`` applied to the identity's columns),
``np.linalg.eigh`` (Lanczos), and ``kron.kron_to_dense`` for the Kronecker
index map; gradients in the prior against the trace formula
``d logdet / d delta_j = sum_{i in leaf j} [(H + D)^{-1}]_{ii}``.

Only under ``-m slow`` (variants of checks the default suite keeps): the
Kronecker index map and ops on the linen model (the dict model has the
non-identity weight_perm; linen stays in the default suite through the
non-scalar-prior error test), and the dict ops cases ``scalar`` and
``weight_ne_bias`` (both ``lax.cond`` branches run traced in the default
``test_kron_jit_both_branches_and_prior_gradient``; ``weight_ne_bias`` adds the
eager general branch, a few seconds of op-by-op ``eigh`` dispatch). Also slow:
the Lanczos gap / numpy-matvec and invariant-subspace tests (each compiles the
Lanczos step for its own size; Lanczos against ``eigh`` stays in the default
suite through ``test_lanczos_full_rank_is_exact``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import _precisions as pr
from mlmap import kron

F64 = jnp.float64
TOL = 1e-10


def _close(a, b, tol=TOL):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


@jax.jit
def _ops(prec, leaf_prec, v, vs):
  """Every operation at once, jitted with the prior traced (one compile a case)."""
  p = v.shape[0]
  return dict(
      logdet=pr.logdet(prec, leaf_prec), solve=pr.solve(prec, leaf_prec, v),
      matvec=pr.matvec(prec, leaf_prec, v), hv=pr.matvec(prec, None, v),
      # Columns S e_i: S S^T must be the covariance exactly.
      s=jax.vmap(lambda z: pr.sample(prec, leaf_prec, z))(jnp.eye(p, dtype=v.dtype)).T,
      # Rows S^T e_i, stacked: the same S.
      w=jax.vmap(lambda e: pr.whiten(prec, leaf_prec, e))(jnp.eye(p, dtype=v.dtype)),
      vsolve=jax.vmap(lambda x: pr.solve(prec, leaf_prec, x))(vs),
      diag=pr.data_diagonal(prec))


def _check_ops(prec, leaf_prec, h_dense, d, seed=0):
  """logdet / solve / matvec / sample covariance against dense numpy."""
  h_dense, d = np.asarray(h_dense), np.asarray(d)
  lam = h_dense + np.diag(d)
  p = lam.shape[0]
  rng = np.random.default_rng(seed)
  v, vs = rng.normal(size=p), rng.normal(size=(3, p))
  out = _ops(prec, leaf_prec, v, vs)
  sign, ref = np.linalg.slogdet(lam)
  assert sign > 0
  _close(out["logdet"], ref)
  _close(out["solve"], np.linalg.solve(lam, v))
  _close(out["matvec"], lam @ v)
  _close(out["hv"], h_dense @ v)
  s = np.asarray(out["s"])
  _close(s @ s.T, np.linalg.inv(lam))
  _close(out["w"], s)  # whiten is S^T for the same S as sample
  _close(out["vsolve"], np.linalg.solve(lam, vs.T).T)
  _close(out["diag"], np.diag(h_dense))


def _prior_grad_ref(h_dense, d, shapes):
  """d logdet(H + D) / d delta_j for leaf-wise scalar priors: a trace formula."""
  diag_inv = np.diag(np.linalg.inv(np.asarray(h_dense) + np.diag(d)))
  out, o = [], 0
  for s in shapes.shapes:
    n = int(np.prod(s))
    out.append(diag_inv[o:o + n].sum())
    o += n
  return np.array(out)


SHAPES = pr.LeafShapes(((3, 4), (4,), (), (5,)), ("w", "b", "t", "s"))  # P = 22
PRIOR = (2.0, jnp.full((4,), 0.5), 3.0, jnp.arange(1.0, 6.0))


def _psd(p, rank=None, seed=0):
  x = np.random.default_rng(seed).normal(size=(p, rank or p))
  return x @ x.T / p


# --- the prior ------------------------------------------------------------------

def test_flat_prior_and_errors():
  d = pr.flat_prior(PRIOR, SHAPES)
  ref = np.concatenate([np.full(12, 2.0), np.full(4, 0.5), [3.0], np.arange(1.0, 6.0)])
  _close(d, ref)
  params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
  _close(pr.flat_prior(0.7, params), np.full(7, 0.7))
  with pytest.raises(ValueError, match="3 entries, params has 2"):
    pr.flat_prior((1.0, 1.0, 1.0), params)
  with pytest.raises(ValueError, match=r"leaf 'b' has shape \(2,\).*\(3,\)"):
    pr.flat_prior((1.0, jnp.ones(2)), params)
  with pytest.raises(ValueError, match="leaf 'a' must be > 0"):
    pr.flat_prior((-1.0, 1.0), params)
  with pytest.raises(ValueError, match="scalar or a tuple"):
    pr.flat_prior(jnp.ones(7), params)
  prec = pr.DiagPrecision(jnp.ones(7))  # no shapes: scalar or flat only
  with pytest.raises(ValueError, match="needs the leaf shapes"):
    pr.logdet(prec, (1.0, 1.0))
  _close(pr.logdet(prec, jnp.full(7, 2.0)), 7 * np.log(3.0))
  _close(pr.logdet(prec, 2.0), 7 * np.log(3.0))
  with pytest.raises(ValueError, match=r"shape \(7,\), got \(6,\)"):
    pr.logdet(prec, jnp.ones(6))
  with pytest.raises(ValueError, match="flat \\[P\\] vector with P = 7"):
    pr.solve(prec, 1.0, jnp.ones(6))
  with pytest.raises(TypeError, match="prec must be one of"):
    pr.logdet(jnp.eye(3), 1.0)


# --- diagonal and dense ---------------------------------------------------------

def test_diag_precision():
  h = np.random.default_rng(1).uniform(0, 2, size=SHAPES.size)
  h[3] = 0.0
  prec = pr.DiagPrecision(jnp.asarray(h), SHAPES)
  d = pr.flat_prior(PRIOR, SHAPES)
  _check_ops(prec, PRIOR, np.diag(h), d)
  v = np.random.default_rng(2).normal(size=SHAPES.size)
  hd = h + np.asarray(d)
  _close(pr.logdet(prec, PRIOR), np.sum(np.log(hd)))  # eager
  _close(pr.solve(prec, PRIOR, v), v / hd)
  _close(pr.sample(prec, PRIOR, v), v / np.sqrt(hd))
  _close(pr.matvec(prec, PRIOR, v), v * hd)


def test_dense_precision_and_non_pd_is_nan():
  h = _psd(SHAPES.size, rank=7, seed=2)
  prec = pr.DensePrecision(jnp.asarray(h), SHAPES)
  d = pr.flat_prior(PRIOR, SHAPES)
  _check_ops(prec, PRIOR, h, d)
  _close(jax.jit(pr.logdet)(prec, PRIOR), np.linalg.slogdet(h + np.diag(d))[1])
  bad = pr.DensePrecision(-jnp.eye(SHAPES.size) * 10.0, SHAPES)
  assert np.isnan(np.asarray(jax.jit(pr.logdet)(bad, 1.0)))
  assert np.isnan(np.asarray(jax.jit(pr.solve)(bad, 1.0, jnp.ones(SHAPES.size)))).any()


# --- low rank ---------------------------------------------------------------------

def _random_lowrank(p, k, seed=3):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(p, k)))
  lam = rng.uniform(0.5, 5.0, size=k)
  lam[-1] = 0.0  # a zero eigenvalue: Woodbury must stay finite
  return u, lam


def test_lowrank_ops_general_diagonal():
  u, lam = _random_lowrank(SHAPES.size, 5)
  prec = pr.LowRankPrecision(jnp.asarray(u), jnp.asarray(lam), SHAPES)
  d = pr.flat_prior(PRIOR, SHAPES)
  _check_ops(prec, PRIOR, (u * lam) @ u.T, d)
  flat = np.random.default_rng(4).uniform(0.1, 3.0, size=SHAPES.size)
  _check_ops(prec, jnp.asarray(flat), (u * lam) @ u.T, flat)


def test_prior_gradients_dense_lowrank_diag():
  """Under jit with the prior traced: d logdet / d delta_j = tr of (H + D)^{-1} on leaf j."""
  u, lam = _random_lowrank(SHAPES.size, 5)
  h = (u * lam) @ u.T
  deltas = jnp.array([2.0, 0.5, 3.0, 1.5])
  d = pr.flat_prior(tuple(deltas), SHAPES)
  cases = ((pr.LowRankPrecision(jnp.asarray(u), jnp.asarray(lam), SHAPES), h),
           (pr.DensePrecision(jnp.asarray(h), SHAPES), h),
           (pr.DiagPrecision(jnp.asarray(np.diag(h)), SHAPES), np.diag(np.diag(h))))
  for prec, h_ref in cases:
    g = jax.jit(jax.grad(lambda dl, prec=prec: pr.logdet(prec, tuple(dl))))(deltas)
    _close(g, _prior_grad_ref(h_ref, d, SHAPES))


def test_lanczos_full_rank_is_exact():
  p = 14
  h = _psd(p, seed=5)
  prec = pr.lowrank_precision(lambda v: jnp.asarray(h) @ v, p, p, F64)
  ref = np.linalg.eigh(h)[0][::-1]
  _close(prec.eigvals, ref)
  _close(pr.to_dense(prec), h)
  _close(prec.eigvecs.T @ prec.eigvecs, np.eye(p))


@pytest.mark.slow  # Lanczos vs eigh stays in default: test_lanczos_full_rank_is_exact
def test_lanczos_gap_numpy_matvec_and_shapes():
  """Top eigenpairs past a clear gap; a matvec that leaves JAX (numpy) is fine."""
  p, k = 60, 5
  rng = np.random.default_rng(6)
  q, _ = np.linalg.qr(rng.normal(size=(p, p)))
  lam = np.concatenate([[100.0, 90.0, 80.0, 70.0, 60.0], rng.uniform(0, 1, p - k)])
  h = (q * lam) @ q.T
  calls = []

  def mv(v):
    calls.append(1)
    return h @ np.asarray(v)   # np.asarray: not traceable

  prec = pr.lowrank_precision(mv, p, k, F64, key=jax.random.PRNGKey(1),
                              params_like=jnp.zeros((6, 10)))
  assert len(calls) == 15  # default min(P, max(2k, k + 10))
  np.testing.assert_allclose(prec.eigvals, lam[:k], rtol=0, atol=1e-8)
  overlap = np.abs(np.asarray(prec.eigvecs).T @ q[:, :k])
  np.testing.assert_allclose(overlap, np.eye(k), atol=1e-6)
  assert prec.shapes.shapes == ((6, 10),)


@pytest.mark.slow  # Lanczos vs eigh stays in default: test_lanczos_full_rank_is_exact
def test_lanczos_invariant_subspace_restarts():
  """rank(H) = 3 < steps: the Krylov space closes; restarts keep T exact and finite."""
  p = 20
  rng = np.random.default_rng(7)
  x = rng.normal(size=(p, 3))
  h = x @ x.T
  prec = pr.lowrank_precision(lambda v: jnp.asarray(h) @ v, p, 6, F64, num_steps=12)
  ref = np.linalg.eigh(h)[0][::-1][:6]
  _close(prec.eigvals, ref, tol=1e-9)
  _close(prec.eigvecs.T @ prec.eigvecs, np.eye(6), tol=1e-9)
  _close(pr.to_dense(prec), h, tol=1e-9)
  # A multiple of the identity: breakdown after one step, every step.
  ident = pr.lowrank_precision(lambda v: 2.0 * v, p, 6, F64, num_steps=12)
  _close(ident.eigvals, np.full(6, 2.0))
  _close(ident.eigvecs.T @ ident.eigvecs, np.eye(6))


def test_lanczos_argument_errors():
  mv = lambda v: v  # noqa: E731
  with pytest.raises(ValueError, match=r"rank must be in \[1, 5\], got 6"):
    pr.lowrank_precision(mv, 5, 6, F64)
  with pytest.raises(ValueError, match=r"num_steps must be in \[3, 5\], got 2"):
    pr.lowrank_precision(mv, 5, 3, F64, num_steps=2)
  with pytest.raises(ValueError, match=r"\[5\] vector, got shape \(4,\)"):
    pr.lowrank_precision(lambda v: v[:4], 5, 2, F64)
  with pytest.raises(ValueError, match="params_like has 4 parameters"):
    pr.lowrank_precision(mv, 5, 2, F64, params_like=jnp.zeros(4))


# --- Kronecker --------------------------------------------------------------------

def _mlp(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  # w2 stored [out, in]: the layer's weight_perm is not the identity.
  return (h @ p["w2"].T + p["b2"]) * p["scale"] * p["temp"]


def _mlp_params():
  k = jax.random.split(jax.random.PRNGKey(11), 4)
  return {"w1": jax.random.normal(k[0], (3, 5)) / np.sqrt(3),
          "b1": 0.3 * jax.random.normal(k[1], (5,)),
          "w2": jax.random.normal(k[2], (3, 5)) / np.sqrt(5),
          "b2": 0.3 * jax.random.normal(k[3], (3,)),
          "scale": jnp.array([1.0, 0.8, 1.2]), "temp": jnp.asarray(0.9)}


class _Linen(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, param_dtype=F64)(x))
    temp = self.param("temp", nn.initializers.ones, (), F64)
    return nn.Dense(3, param_dtype=F64)(h) * temp


def _data(n, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return jax.random.normal(k[0], (n, 3)), jax.random.randint(k[1], (n,), 0, 3)


@functools.lru_cache(maxsize=None)
def _kron_model(kind, n=4):
  """Factors, params and precision of a 2-layer model (cached, jitted; no dense)."""
  x, t = _data(n)
  if kind == "dict":
    apply_fn, params = _mlp, _mlp_params()
  else:
    mod = _Linen()
    params = mod.init(jax.random.PRNGKey(3), x)["params"]
    apply_fn = lambda p, x: mod.apply({"params": p}, x)  # noqa: E731
  nlp = mm.negative_log_posterior(apply_fn, mm.categorical_log_likelihood,
                                  num_data=40)
  f = jax.jit(kron.kron_factors, static_argnums=0)(nlp, params, x, t)
  prec = jax.jit(pr.kron_precision)(f, params)
  return f, params, prec


@functools.lru_cache(maxsize=None)
def _model(kind, n=4):
  """Factors, params, precision and dense K-FAC of a 2-layer model (cached, jitted).

  ``n = 4`` examples: the first layer's ``A`` (4 x 4) has full rank, the second's
  (6 x 6 or 5 x 5) is rank deficient, so ``A~`` has repeated zero eigenvalues.
  """
  f, params, prec = _kron_model(kind, n)
  return f, params, prec, np.asarray(jax.jit(kron.kron_to_dense)(f, params))


def _kron_prior(params, weight, bias, uncovered):
  """Per-leaf priors: ``weight``/``bias`` on layer leaves, ``uncovered(path, leaf)`` else."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "'w" in name:
      out.append(weight)
    elif "bias" in name or "'b" in name:
      out.append(bias)
    else:
      out.append(uncovered(name, leaf))
  return tuple(out)


@pytest.mark.parametrize("kind", ["dict", pytest.param("linen", marks=pytest.mark.slow)])
def test_kron_index_map_matches_kron_to_dense(kind):
  f, params, prec, h = _model(kind)
  assert len(prec.index.layers) == 2 and len(prec.index.uncovered_index) >= 1
  if kind == "dict":
    assert prec.index.layers[1].weight_perm is not None
  _close(jax.jit(pr.to_dense)(prec), h)
  _close(jax.jit(pr.data_diagonal)(prec), np.diag(h))
  v = np.random.default_rng(8).normal(size=h.shape[0])
  unravel = ravel_pytree(params)[1]
  # The reference kron_vp jitted too: op by op it costs over a second here.
  ref = jax.jit(lambda v: ravel_pytree(kron.kron_vp(f, params, unravel(v)))[0])
  _close(jax.jit(pr.matvec)(prec, None, v), ref(jnp.asarray(v)))


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind, case", [
    # Default: array priors on the uncovered leaves (eager: the uniform branch).
    # Both branches under a traced prior: test_kron_jit_both_branches_...
    ("dict", "uncovered_arrays"),
    pytest.param("dict", "weight_ne_bias", marks=_SLOW),  # eager general branch
    pytest.param("dict", "scalar", marks=_SLOW),
    pytest.param("linen", "scalar", marks=_SLOW),
    pytest.param("linen", "weight_ne_bias", marks=_SLOW),
    pytest.param("linen", "uncovered_arrays", marks=_SLOW)])
def test_kron_ops_against_dense(kind, case):
  _, params, prec, h = _model(kind)
  if case == "scalar":
    leaf_prec = 0.7
  elif case == "weight_ne_bias":
    leaf_prec = _kron_prior(params, 1.3, 0.2, lambda n, x: 0.9)
  else:
    leaf_prec = _kron_prior(params, 0.8, 0.8,
                            lambda n, x: 0.5 + jnp.arange(x.size, dtype=F64).reshape(x.shape))
  d = pr.flat_prior(leaf_prec, params)
  _check_ops(prec, leaf_prec, h, d)
  if kind != "dict":
    return
  # Eager: the branch is chosen in Python from the concrete priors.
  lam = h + np.diag(d)
  v = np.random.default_rng(10).normal(size=h.shape[0])
  _close(pr.logdet(prec, leaf_prec), np.linalg.slogdet(lam)[1])
  _close(pr.solve(prec, leaf_prec, v), np.linalg.solve(lam, v))


def test_kron_jit_both_branches_and_prior_gradient():
  """One jitted logdet/solve with a traced prior takes both lax.cond branches.

  The second layer's A~ has repeated zero eigenvalues (see ``_model``), where
  eigh's own gradient is undefined; at equal weight and bias priors the
  gradient in each must still be the trace formula's.
  """
  _, params, prec, h = _model("dict")
  shapes = pr.leaf_shapes(params)
  traces = []

  @jax.jit
  def ops(prec, deltas, v):
    traces.append(1)
    lp = tuple(deltas)
    return pr.logdet(prec, lp), pr.solve(prec, lp, v), pr.sample(prec, lp, v)

  grad = jax.jit(jax.grad(lambda dl: pr.logdet(prec, tuple(dl))))
  rng = np.random.default_rng(9)
  v, u = rng.normal(size=h.shape[0]), rng.normal(size=h.shape[0])
  grad_solve = jax.jit(jax.grad(lambda dl: u @ pr.solve(prec, tuple(dl), v)))
  # leaves: b1, b2, scale, temp, w1, w2
  for deltas in ([0.4, 0.4, 1.0, 2.0, 0.4, 0.4], [0.4, 1.7, 1.0, 2.0, 0.3, 0.9]):
    deltas = jnp.asarray(deltas)
    d = np.asarray(pr.flat_prior(tuple(deltas), params))
    lam = h + np.diag(d)
    ld, x, _ = ops(prec, deltas, v)
    _close(ld, np.linalg.slogdet(lam)[1])
    _close(x, np.linalg.solve(lam, v))
    g = grad(deltas)
    assert np.all(np.isfinite(np.asarray(g)))
    _close(g, _prior_grad_ref(h, d, shapes), tol=1e-8)
    # d/d delta_j u^T (H + D)^{-1} v = -sum_{i in leaf j} (Lam^-1 u)_i (Lam^-1 v)_i.
    prod = np.split(np.linalg.solve(lam, u) * np.linalg.solve(lam, v),
                    np.cumsum([int(np.prod(s)) for s in shapes.shapes])[:-1])
    _close(grad_solve(deltas), [-x.sum() for x in prod], tol=1e-8)
  assert len(traces) == 1
  s = np.asarray(jax.vmap(lambda z: ops(prec, deltas, z)[2])(jnp.eye(h.shape[0]))).T
  _close(s @ s.T, np.linalg.inv(lam))


def test_kron_float32_precision_with_traced_float64_priors():
  """A float32 model's kron precision, jitted with float64 traced priors (x64 on):
  both lax.cond branches return one dtype (they once disagreed, float32 against
  float64, a TypeError at trace time) and equal the eager, concrete-branch values."""
  x, t = _data(4)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), _mlp_params())
  nlp = mm.negative_log_posterior(_mlp, mm.categorical_log_likelihood, num_data=40)
  f = kron.kron_factors(nlp, params, x.astype(jnp.float32), t)
  prec = jax.jit(pr.kron_precision)(f, params)
  v = jnp.linspace(-1.0, 1.0, sum(a.size for a in jax.tree.leaves(params)))
  ops = jax.jit(lambda lp, v: (pr.logdet(prec, lp), pr.solve(prec, lp, v)))
  for deltas in ([0.4, 0.4, 1.0, 2.0, 0.4, 0.4], [0.4, 1.7, 1.0, 2.0, 0.3, 0.9]):
    lp = tuple(jnp.asarray(d, jnp.float64) for d in deltas)
    ld, sol = ops(lp, v)
    eager = (pr.logdet(prec, tuple(deltas)), pr.solve(prec, tuple(deltas), v))
    np.testing.assert_allclose(ld, eager[0], rtol=1e-5)
    np.testing.assert_allclose(sol, eager[1], rtol=1e-4, atol=1e-5)


def test_kron_non_scalar_prior_on_covered_leaf_raises():
  _, params, prec = _kron_model("linen")
  lp = list(_kron_prior(params, 1.0, 1.0, lambda n, x: 1.0))
  paths = pr.leaf_shapes(params).paths
  j = paths.index("Dense_0/kernel")
  lp[j] = jnp.ones((3, 4))
  with pytest.raises(ValueError,
                     match=r"'Dense_0/kernel'.*must be a scalar, got shape \(3, 4\)"):
    pr.logdet(prec, tuple(lp))
  lp[j] = 1.0
  jb = paths.index("Dense_1/bias")
  lp[jb] = jnp.ones(3)
  with pytest.raises(ValueError, match=r"'Dense_1/bias'.*layer 'Dense_1/kernel'.*\(3,\)"):
    jax.jit(pr.solve)(prec, tuple(lp), jnp.ones(pr.leaf_shapes(params).size))
  with pytest.raises(ValueError, match="scalar or a per-leaf tuple"):
    pr.logdet(prec, jnp.ones(pr.leaf_shapes(params).size))
  with pytest.raises(TypeError, match="factors must be KronFactors"):
    pr.kron_precision(prec, params)


def test_spectrum_is_the_dense_eigenvalues():
  """``spectrum`` of each structure equals numpy's ``eigvalsh`` of its dense ``H``
  (sorted), and ``sum log(s + delta)`` is the dense ``logdet`` at a scalar prior:
  the one-scale prior search relies on both."""
  h = np.random.default_rng(1).uniform(0, 2, size=SHAPES.size)
  u, lam = _random_lowrank(SHAPES.size, 5)
  _, _, kron_prec, kron_h = _model("dict")
  cases = [(pr.DiagPrecision(jnp.asarray(h), SHAPES), np.diag(h)),
           (pr.DensePrecision(jnp.asarray(_psd(SHAPES.size, 7, 2)), SHAPES),
            _psd(SHAPES.size, 7, 2)),
           (pr.LowRankPrecision(jnp.asarray(u), jnp.asarray(lam), SHAPES), (u * lam) @ u.T),
           (kron_prec, kron_h)]
  for prec, dense in cases:
    s = np.sort(np.asarray(jax.jit(pr.spectrum)(prec)))
    ref = np.linalg.eigvalsh(dense)
    assert s.shape == ref.shape, type(prec).__name__
    np.testing.assert_allclose(s, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    _close(np.sum(np.log(s + 0.3)), pr.logdet(prec, 0.3))
