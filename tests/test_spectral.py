"""Tests for mlmap.spectral: Lanczos eigenpairs, Hutchinson, SLQ, densities, logdet."""

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import pytest

import mlmap as mm
from mlmap.linalg import _random_like

KEY = jax.random.PRNGKey(42)


def _sym(n, seed):
  m = np.random.default_rng(seed).normal(size=(n, n))
  return (m + m.T) / 2


def _spd(n, seed, shift):
  m = np.random.default_rng(seed).normal(size=(n, n))
  return m @ m.T / n + shift * np.eye(n)


def _probes(like, key, num):
  """The probes the estimators draw: same key splitting, same per-leaf draws."""
  draw = jax.jit(jax.vmap(lambda k: ravel_pytree(_random_like(like, k, "rademacher"))[0]))
  return np.asarray(draw(jax.random.split(key, num)))


# --- a tiny MLP: its Hessian as operator (forward-over-reverse, own code) --------

@functools.lru_cache(maxsize=None)
def _mlp_problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 4)) * 0.7, "b1": rng.normal(size=4) * 0.1,
            "w2": rng.normal(size=(4, 2)) * 0.7, "b2": np.zeros(2)}
  x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return 0.5 * jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2)

  def matvec(v):
    return jax.jvp(jax.grad(loss), (params,), (v,))[1]

  flat, unravel = ravel_pytree(params)
  h = jax.hessian(lambda f: loss(unravel(f)))(flat)
  return params, matvec, np.asarray(h), unravel


@pytest.mark.slow  # long; CI runs -m slow too
def test_lanczos_eigenvalues_mlp_hessian_full_steps():
  params, matvec, h, unravel = _mlp_problem()
  p = h.shape[0]
  ref = np.linalg.eigvalsh(h)
  la = jax.jit(lambda key: mm.lanczos_eigenvalues(matvec, params, key, k=p, num_steps=p))(KEY)
  np.testing.assert_allclose(la.eigenvalues, ref[::-1], atol=1e-8)
  # Orderings, on a small diagonal operator with mixed signs.
  d = np.array([0.5, -4.0, 3.0, -1.0, 2.0])
  sa = mm.lanczos_eigenvalues(lambda v: d * v, jnp.zeros(5), KEY, k=3, num_steps=5, which="SA")
  np.testing.assert_allclose(sa.eigenvalues, [-4.0, -1.0, 0.5], atol=1e-12)
  lm = mm.lanczos_eigenvalues(lambda v: d * v, jnp.zeros(5), KEY, k=3, num_steps=5, which="LM")
  np.testing.assert_allclose(lm.eigenvalues, [-4.0, 3.0, 2.0], atol=1e-12)
  # Ritz vectors are pytrees with a leading k axis and are eigenvectors of H.
  assert jax.tree_util.tree_structure(la.eigenvectors) == jax.tree_util.tree_structure(params)
  vecs = np.stack([ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], la.eigenvectors))[0]
                   for i in range(p)])
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-10)
  np.testing.assert_allclose(vecs @ h, la.eigenvalues[:, None] * vecs, atol=1e-7)
  assert np.all(np.asarray(la.residual_norms) < 1e-7)


def test_lanczos_eigenvalues_partial_steps_error_bound():
  n = 80
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  lam = np.concatenate([[50.0, 30.0, 20.0], rng.uniform(-1, 1, n - 3)])
  a = q @ np.diag(lam) @ q.T
  res = jax.jit(lambda k: mm.lanczos_eigenvalues(lambda v: a @ v, jnp.zeros(n), k, k=3,
                                                 num_steps=20))(KEY)
  err = np.abs(np.asarray(res.eigenvalues) - np.array([50.0, 30.0, 20.0]))
  assert np.all(err < 1e-8)
  # Ritz bound: an eigenvalue of A within residual_norm of each Ritz value.
  dist = np.min(np.abs(np.asarray(res.eigenvalues)[:, None] - lam[None]), axis=1)
  assert np.all(dist <= np.asarray(res.residual_norms) + 1e-12)


# --- Hutchinson -------------------------------------------------------------------

def test_hutchinson_trace_unbiased_and_standard_error():
  n = 12
  a = _sym(n, 3)
  est = jax.jit(lambda k: mm.hutchinson_trace(lambda v: a @ v, jnp.zeros(n), k, 4000,
                                              batch_size=200))(KEY)
  assert abs(float(est.estimate) - np.trace(a)) < 4 * float(est.standard_error)
  off = a - np.diag(np.diag(a))
  se_theory = math.sqrt(2 * np.sum(off ** 2) / 4000)
  np.testing.assert_allclose(est.standard_error, se_theory, rtol=0.1)
  # Against the explicit sample mean / std of the same probes (moment merging).
  z = _probes(jnp.zeros(n), KEY, 4000)
  samples = np.einsum("li,ij,lj->l", z, a, z)
  np.testing.assert_allclose(est.estimate, samples.mean(), atol=1e-10)
  np.testing.assert_allclose(est.standard_error, samples.std(ddof=1) / math.sqrt(4000),
                             atol=1e-10)
  # Diagonal operator: Rademacher probes are exact, zero error.
  d = np.arange(1.0, n + 1)
  ex = mm.hutchinson_trace(lambda v: d * v, jnp.zeros(n), KEY, 3)
  np.testing.assert_allclose(ex.estimate, d.sum(), atol=1e-12)
  np.testing.assert_allclose(ex.standard_error, 0.0, atol=1e-12)


def test_hutchinson_diagonal_unbiased_on_mlp_hessian():
  params, matvec, h, unravel = _mlp_problem()
  run = jax.jit(lambda k: mm.hutchinson_diagonal(matvec, params, k, 2000, batch_size=100))
  est = run(KEY)
  mean = ravel_pytree(est.estimate)[0]
  se = ravel_pytree(est.standard_error)[0]
  assert jax.tree_util.tree_structure(est.estimate) == jax.tree_util.tree_structure(params)
  # Every entry within 4.5 standard errors of the exact diagonal.
  assert np.all(np.abs(mean - np.diag(h)) <= 4.5 * se + 1e-10)
  off = h - np.diag(np.diag(h))
  np.testing.assert_allclose(se, np.sqrt(np.sum(off ** 2, 1) / 2000), rtol=0.15, atol=1e-12)
  # Same probes, explicit moments; and batch_size does not change the result.
  z = _probes(params, KEY, 2000)
  samples = z * (z @ h)
  np.testing.assert_allclose(mean, samples.mean(0), atol=1e-10)
  np.testing.assert_allclose(se, samples.std(0, ddof=1) / math.sqrt(2000), atol=1e-10)


def test_hutchinson_batch_size_invariance_and_float32():
  n = 9
  a = _sym(n, 4)
  one = mm.hutchinson_trace(lambda v: a @ v, jnp.zeros(n), KEY, 30)
  ten = mm.hutchinson_trace(lambda v: a @ v, jnp.zeros(n), KEY, 30, batch_size=10)
  np.testing.assert_allclose(one.estimate, ten.estimate, atol=1e-12)
  np.testing.assert_allclose(one.standard_error, ten.standard_error, atol=1e-12)
  a32 = jnp.asarray(a, jnp.float32)
  e32 = mm.hutchinson_diagonal(lambda v: a32 @ v, jnp.zeros(n, jnp.float32), KEY, 30,
                               batch_size=10)
  e64 = mm.hutchinson_diagonal(lambda v: a @ v, jnp.zeros(n), KEY, 30, batch_size=10)
  assert e32.estimate.dtype == jnp.float32 and e32.standard_error.dtype == jnp.float32
  np.testing.assert_allclose(e32.estimate, e64.estimate, atol=1e-4)


# --- stochastic Lanczos quadrature ------------------------------------------------

def test_slq_full_steps_is_exact_gauss_quadrature():
  n, num = 10, 6
  a = _sym(n, 5)
  rule = jax.jit(lambda k: mm.slq_quadrature(lambda v: a @ v, jnp.zeros(n), k, num, n))(KEY)
  assert rule.nodes.shape == (num, n) and rule.dimension == n
  np.testing.assert_allclose(rule.weights.sum(1), 1.0, atol=1e-12)
  z = _probes(jnp.zeros(n), KEY, num)
  for j in (0, 1, 2, 5):  # P sum_k w theta^j = z^T A^j z for every probe
    quad = n * np.sum(rule.weights * np.asarray(rule.nodes) ** j, 1)
    exact = np.einsum("li,ij,lj->l", z, np.linalg.matrix_power(a, j), z)
    np.testing.assert_allclose(quad, exact, rtol=1e-9, atol=1e-9)
  # Fewer steps: still exact for degree <= 2m - 1.
  m = 3
  rule3 = mm.slq_quadrature(lambda v: a @ v, jnp.zeros(n), KEY, num, m, batch_size=2)
  quad = n * np.sum(rule3.weights * np.asarray(rule3.nodes) ** 5, 1)
  exact = np.einsum("li,ij,lj->l", z, np.linalg.matrix_power(a, 5), z)
  np.testing.assert_allclose(quad, exact, rtol=1e-9)


@pytest.mark.slow  # long; CI runs -m slow too
def test_stochastic_logdet_matches_slogdet():
  n = 40
  a = _spd(n, 6, shift=0.5)
  exact = np.linalg.slogdet(a)[1]
  run = jax.jit(lambda k, m: mm.stochastic_logdet(lambda v: a @ v, jnp.zeros(n), k, 200, m,
                                                  batch_size=20), static_argnums=1)
  est = run(KEY, 20)  # kappa ~ 10: quadrature bias ~1e-10 at m = 20
  assert abs(float(est.estimate) - exact) < 4 * float(est.standard_error)
  assert float(est.standard_error) < 0.05 * abs(exact)
  # With m = P the quadrature is exact: the mean of z^T log(A) z for the same probes.
  full = run(KEY, n)
  w, u = np.linalg.eigh(a)
  z = _probes(jnp.zeros(n), KEY, 200)
  samples = np.einsum("li,ij,lj->l", z, (u * np.log(w)) @ u.T, z)
  np.testing.assert_allclose(full.estimate, samples.mean(), rtol=1e-10)
  np.testing.assert_allclose(full.standard_error, samples.std(ddof=1) / math.sqrt(200),
                             rtol=1e-8)
  np.testing.assert_allclose(est.estimate, full.estimate, atol=1e-6)
  # Not positive definite: NaN, not a silent number.
  bad = mm.stochastic_logdet(lambda v: -(a @ v), jnp.zeros(n), KEY, 2, 5)
  assert np.isnan(float(bad.estimate))


def test_spectral_density_integrates_to_one_and_matches_exact():
  n = 8
  lam = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 7.0])
  grid = np.linspace(-10, 14, 4001)
  run = jax.jit(lambda k, g: mm.spectral_density(lambda v: lam * v, jnp.zeros(n), k, 4, n, g,
                                                 0.4))
  dens = run(KEY, grid)
  assert dens.shape == grid.shape
  np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, atol=1e-8)
  # Diagonal A, Rademacher probes: weights are exactly 1/P, so the density is exact.
  gauss = np.exp(-0.5 * ((grid[:, None] - lam) / 0.4) ** 2) / (0.4 * math.sqrt(2 * math.pi))
  ref = np.mean(gauss, 1)
  np.testing.assert_allclose(dens, ref, atol=1e-10)
  # A dense symmetric matrix with partial steps: still a probability density.
  a = _sym(30, 7)
  d2 = mm.spectral_density(lambda v: a @ v, jnp.zeros(30), KEY, 5, 12, grid, 0.3)
  np.testing.assert_allclose(np.trapezoid(d2, grid), 1.0, atol=1e-6)
  assert np.all(np.asarray(d2) >= 0)


def test_spectral_bad_inputs():
  mv, like = (lambda v: v), jnp.zeros(5)
  with pytest.raises(ValueError, match="num_probes must be >= 2, got 1"):
    mm.hutchinson_trace(mv, like, KEY, 1)
  with pytest.raises(ValueError, match=r"batch_size \(3\) must divide num_probes \(10\)"):
    mm.hutchinson_diagonal(mv, like, KEY, 10, batch_size=3)
  with pytest.raises(ValueError, match=r"num_steps \(6\) must be <= .* P \(5\)"):
    mm.slq_quadrature(mv, like, KEY, 2, 6)
  with pytest.raises(ValueError, match="sigma must be > 0"):
    mm.spectral_density(mv, like, KEY, 2, 3, jnp.linspace(0, 1, 5), 0.0)
  with pytest.raises(ValueError, match="which must be 'LA', 'SA' or 'LM', got 'BE'"):
    mm.lanczos_eigenvalues(mv, like, KEY, k=2, which="BE")
  with pytest.raises(ValueError, match=r"k \(4\) must be <= num_steps \(3\)"):
    mm.lanczos_eigenvalues(mv, like, KEY, k=4, num_steps=3)
  with pytest.raises(TypeError, match="like must have floating leaves only.*'<root>'"):
    mm.stochastic_logdet(mv, jnp.arange(5), KEY, 4, 2)
  with pytest.raises(ValueError, match=r"matvec\(v\) tree structure"):
    mm.slq_quadrature(lambda v: {"a": v}, like, KEY, 2, 2)


def test_spectral_names_non_floating_like_leaf_and_checks_key():
  """Item 3: a step counter or mask in ``like`` is named by its path."""
  like = {"w": jnp.zeros(3), "state": {"step": jnp.array(7), "mask": jnp.ones(2, bool)}}
  mv = lambda v: v  # noqa: E731
  calls = {
      "hutchinson_trace": lambda: mm.hutchinson_trace(mv, like, KEY, 2),
      "hutchinson_diagonal": lambda: mm.hutchinson_diagonal(mv, like, KEY, 2),
      "lanczos_eigenvalues": lambda: mm.lanczos_eigenvalues(mv, like, KEY, k=1),
      "slq_quadrature": lambda: mm.slq_quadrature(mv, like, KEY, 1, 2),
      "spectral_density": lambda: mm.spectral_density(mv, like, KEY, 1, 2, jnp.zeros(3), 1.0),
      "stochastic_logdet": lambda: mm.stochastic_logdet(mv, like, KEY, 2, 2),
  }
  for name, call in calls.items():
    with pytest.raises(TypeError, match=rf"{name}: like .*'state/mask' \(bool\), "
                                        r"'state/step' \(int"):
      call()
  ok = jnp.zeros(4)
  with pytest.raises(TypeError, match="key must be a jax.random key"):
    mm.hutchinson_trace(mv, ok, 0, 2)
  with pytest.raises(TypeError, match=r"key must be a jax.random key.*shape \(3,\)"):
    mm.lanczos_eigenvalues(mv, ok, jnp.zeros(3, jnp.uint32), k=1)
  with pytest.raises(ValueError, match="sigma must be finite"):
    mm.spectral_density(mv, ok, KEY, 1, 2, jnp.zeros(3), float("inf"))
  # A new-style typed key is accepted.
  est = mm.hutchinson_trace(mv, ok, jax.random.key(0), 2)
  np.testing.assert_allclose(est.estimate, 4.0)



def test_lanczos_matches_matfree():
  """An independent implementation (matfree, Krämer et al.; optional, skipped when
  not installed): the same tridiagonal matrix from the same start vector."""
  decomp = pytest.importorskip("matfree.decomp")
  a = jax.random.normal(jax.random.PRNGKey(7), (40, 40), jnp.float64)
  a = a @ a.T / 40 + jnp.eye(40)
  v0 = jax.random.normal(jax.random.PRNGKey(8), (40,), jnp.float64)
  ours = jax.jit(lambda v: mm.lanczos(lambda u: a @ u, v, 15))(v0)
  theirs = decomp.tridiag_sym(15, reortho="full", custom_vjp=False, materialize=False)(
      lambda u: a @ u, v0)
  diag, off = theirs.J_small
  np.testing.assert_allclose(ours.alphas, diag, rtol=1e-10)
  np.testing.assert_allclose(ours.betas, off, rtol=1e-10)


def test_slq_batch_size_does_not_change_the_rules():
  """batch_size 1 runs the one-vector Lanczos loop per probe, batch_size 5 the
  batched loop (mlmap.linalg._lanczos_batch): the same probes give the same
  nodes and weights, and the same logdet estimate."""
  n, num, m = 12, 10, 6
  a = _spd(n, 2, shift=0.5)
  run = jax.jit(lambda b: mm.slq_quadrature(lambda v: a @ v, jnp.zeros(n), KEY, num, m,
                                            batch_size=b), static_argnums=0)
  one, five = run(1), run(5)
  np.testing.assert_allclose(five.nodes, one.nodes, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(five.weights, one.weights, rtol=1e-9, atol=1e-12)
  logdet = jax.jit(lambda b: mm.stochastic_logdet(lambda v: a @ v, jnp.zeros(n), KEY, num, m,
                                                  batch_size=b).estimate, static_argnums=0)
  np.testing.assert_allclose(logdet(5), logdet(1), rtol=1e-10)
