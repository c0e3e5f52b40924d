"""Unrolled loops over curvature products (``unroll=``; ``mlmap._loops``).

XLA:CPU runs convolutions in loop bodies and cond branches about 25x slower, so
CG, Lanczos and the probe loops unroll by default on the CPU when the operator
convolves, and ``make_train_step`` selects instead of branching. What must hold:
the unrolled loops give the same numbers as the rolled ones (float64, 1e-12;
the same iterates, so also the same CG stopping information), the automatic
choice (Lanczos and the probe loops unroll; CG iterates from the host,
``unroll="host"``, and unrolls only on request) is made exactly where the trap
is, and the lowered program then has no while loop (for CG: one callback and
no convolution). Speed is measured in ``experiments/bench_linalg.py``, not here.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import _loops


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(3, (3, 3), strides=2)(x))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def cnn():
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (6, 6, 6, 1))
  y = jax.random.randint(ky, (6,), 0, 4)
  model = _CNN()
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(1), x))  # flax inits float32
  nlp = mm.negative_log_posterior(model.apply, mm.categorical_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=2.0))
  return nlp, params, x, y


def _mlp():
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
  nlp = mm.negative_log_posterior(lambda p, a: jnp.tanh(a @ p["w"]) @ p["v"],
                                  mm.gaussian_log_likelihood)
  return nlp, {"w": jnp.ones((3, 4)) * 0.3, "v": jnp.ones((4, 2)) * 0.2}, x, jnp.zeros((5, 2))


def test_convolution_is_found_through_nested_jaxprs(cnn):
  nlp, params, x, y = cnn
  hvp = lambda v: mm.hvp(nlp, params, v, x, y)  # noqa: E731  (conv inside jvp/vjp/pjit)
  assert _loops.has_convolution(hvp, params)
  mnlp, mp, mx, my = _mlp()
  assert not _loops.has_convolution(lambda v: mm.hvp(mnlp, mp, v, mx, my), mp)
  assert jax.default_backend() != "cpu" or _loops.conv_on_cpu(hvp, params)
  limit = _loops.AUTO_UNROLL_LIMIT
  assert _loops.resolve_unroll("f", None, limit, hvp, params) == _loops.conv_on_cpu(hvp, params)
  assert not _loops.resolve_unroll("f", None, limit + 1, hvp, params)
  assert _loops.resolve_unroll("f", True, 10_000, hvp, params)
  with pytest.raises(TypeError, match="unroll must be True, False or None.*'yes'"):
    _loops.resolve_unroll("mm.cg", "yes", 3, hvp, params)


def _lowered(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_unrolled_lanczos_equals_rolled_and_has_no_while_loop(cnn):
  nlp, params, x, y = cnn
  v0 = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)

  def run(p, v, unroll):
    return mm.lanczos(lambda u: mm.hvp(nlp, p, u, x, y), v, 8, unroll=unroll)

  rolled = jax.jit(functools.partial(run, unroll=False))(params, v0)
  unrolled = jax.jit(functools.partial(run, unroll=True))(params, v0)
  for a, b in zip(rolled, unrolled):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)
  assert "while" in _lowered(functools.partial(run, unroll=False), params, v0)
  assert "while" not in _lowered(functools.partial(run, unroll=True), params, v0)
  if jax.default_backend() == "cpu":  # the default unrolls this convolutional operator
    assert "while" not in _lowered(functools.partial(run, unroll=None), params, v0)


def _assert_same_solve(reference, other, lam, tol):
  """The same iterate (1e-12, float64) and stopping information as the rolled CG
  of 6 iterations; the case is the one its parameters name."""
  (x0, i0), (x1, i1) = reference, other
  np.testing.assert_allclose(ravel_pytree(x1)[0], ravel_pytree(x0)[0],
                             rtol=1e-12, atol=1e-12)
  for field in ("iterations", "status", "converged", "negative_curvature"):
    assert int(getattr(i1, field)) == int(getattr(i0, field)), field
  np.testing.assert_allclose(float(i1.residual_norm), float(i0.residual_norm), rtol=1e-12)
  if lam < 0:
    assert bool(i0.negative_curvature)
  elif tol > 0:
    assert 0 < int(i0.iterations) < 6


@pytest.mark.parametrize("tol, lam", [pytest.param(0.0, 1.0, marks=pytest.mark.slow), (3e-2, 1.0),
                                      pytest.param(0.0, -5.0, marks=pytest.mark.slow)],
                         ids=["all-iterations", "early-stop", "negative-curvature"])
def test_unrolled_cg_takes_the_same_iterates_and_stops_the_same(cnn, tol, lam):
  nlp, params, x, y = cnn
  b = jax.tree_util.tree_map(lambda a: jnp.sin(1.0 + jnp.arange(a.size)).reshape(a.shape),
                             params)

  def run(p, b, unroll):
    def damped(u):
      return jax.tree_util.tree_map(lambda g, v: g + lam * v, mm.ggn_vp(nlp, p, u, x, y), u)
    return mm.cg(damped, b, maxiter=6, tol=tol, unroll=unroll)

  (x0, i0), (x1, i1) = (jax.jit(functools.partial(run, unroll=u))(params, b)
                        for u in (False, True))
  _assert_same_solve((x0, i0), (x1, i1), lam, tol)


@pytest.mark.parametrize("batch_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_unrolled_probe_loops_equal_rolled(cnn, batch_size):
  nlp, params, x, y = cnn
  key = jax.random.PRNGKey(3)

  def damped(p):
    return lambda u: jax.tree_util.tree_map(lambda g, v: g + 2.0 * v,
                                            mm.ggn_vp(nlp, p, u, x, y), u)

  def run(p, unroll):
    mv = damped(p)
    return (mm.hutchinson_trace(mv, p, key, 2, batch_size, unroll=unroll),
            mm.hutchinson_diagonal(mv, p, key, 2, batch_size, unroll=unroll),
            mm.slq_quadrature(mv, p, key, 2, 4, batch_size, unroll=unroll)[:2],
            mm.stochastic_logdet(mv, p, key, 2, 4, batch_size, unroll=unroll),
            mm.spectral_density(mv, p, key, 2, 4, jnp.linspace(0, 5, 7), 0.5, batch_size,
                                unroll=unroll))

  rolled = jax.jit(functools.partial(run, unroll=False))(params)
  unrolled = jax.jit(functools.partial(run, unroll=True))(params)
  for a, b in zip(jax.tree_util.tree_leaves(rolled), jax.tree_util.tree_leaves(unrolled)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-11, atol=1e-12)
  # The probe loops (5) and the Lanczos loops of the three SLQ calls (3) are gone;
  # what is left are jax.random.split's own loops.
  loops = [_lowered(functools.partial(run, unroll=u), params).count("stablehlo.while")
           for u in (False, True)]
  assert loops[0] - loops[1] == 8, loops


def test_host_probe_loops_and_lanczos_equal_rolled(cnn):
  """unroll="host" (the default on the CPU for a convolutional operator above
  AUTO_UNROLL_LIMIT products): Lanczos steps and Hutchinson chunks iterated from
  the host, SLQ's Lanczos loops from the host inside its rolled probe loop. Same
  numbers as the rolled loops; no convolution left in the outer computation."""
  nlp, params, x, y = cnn
  key = jax.random.PRNGKey(4)

  def run(p, unroll):
    mv = lambda u: jax.tree_util.tree_map(lambda g, v: g + 2.0 * v,  # noqa: E731
                                          mm.ggn_vp(nlp, p, u, x, y), u)
    return (mm.lanczos(mv, p, 6, unroll=unroll),
            mm.lanczos_eigenvalues(mv, p, key, k=2, num_steps=5, unroll=unroll),
            mm.hutchinson_trace(mv, p, key, 4, 2, unroll=unroll),
            mm.hutchinson_diagonal(mv, p, key, 2, unroll=unroll),
            mm.slq_quadrature(mv, p, key, 2, 4, unroll=unroll)[:2],
            mm.stochastic_logdet(mv, p, key, 4, 4, 2, unroll=unroll))

  rolled = jax.jit(functools.partial(run, unroll=False))(params)
  host = jax.jit(functools.partial(run, unroll="host"))(params)
  for a, b in zip(jax.tree_util.tree_leaves(rolled), jax.tree_util.tree_leaves(host)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-11, atol=1e-12)
  text = _lowered(functools.partial(run, unroll="host"), params)
  assert "callback" in text and "convolution" not in text
  assert "convolution" in _lowered(functools.partial(run, unroll=False), params)
  mv = lambda u: mm.hvp(nlp, params, u, x, y)  # noqa: E731
  limit = _loops.AUTO_UNROLL_LIMIT
  expect = "host" if jax.default_backend() == "cpu" else False
  assert _loops.resolve_unroll("f", None, limit + 1, mv, params, host=True) == expect
  with pytest.raises(TypeError, match="unroll must be True, False, 'host' or None.*'yes'"):
    mm.lanczos(mv, params, 3, unroll="yes")


def test_train_step_on_a_convolutional_model_selects_and_still_skips(cnn):
  """On the CPU the update of a convolutional objective runs outside ``lax.cond``
  (no branch in the lowered step); a good batch gives ``tx.update``'s step, a
  non-finite one leaves params and state bit-identical."""
  nlp, params, x, y = cnn
  tx = mm.hessian_free(nlp, damping=1.0, maxiter=5)
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  new_p, new_s, m = step(params, state, (x, y))
  g = jax.grad(nlp)(params, x, y)
  upd, want_s = jax.jit(lambda p, s: tx.update(g, s, p, batch=(x, y)))(params, state)
  want_p = optax.apply_updates(params, upd)
  for a, b in zip(jax.tree_util.tree_leaves((new_p, new_s)),
                  jax.tree_util.tree_leaves((want_p, want_s))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
  assert not bool(m["skipped"])
  bad = x.at[0, 0, 0, 0].set(jnp.nan)
  p2, s2, m2 = step(params, state, (bad, y))
  assert bool(m2["skipped"])
  for a, b in zip(jax.tree_util.tree_leaves((p2, s2)), jax.tree_util.tree_leaves((params, state))):
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
  text = step.lower(params, state, (x, y)).as_text()
  update_text = jax.jit(lambda p, s: tx.update(g, s, p, batch=(x, y))).lower(
      params, state).as_text()
  if jax.default_backend() == "cpu":  # no branch of make_train_step's own around the update
    assert text.count("stablehlo.case") == update_text.count("stablehlo.case")


def _damped_run(nlp, x, y, lam, tol, maxiter=6):
  def run(p, b, xs, ys, unroll):
    def damped(u):
      return jax.tree_util.tree_map(lambda g, v: g + lam * v, mm.ggn_vp(nlp, p, u, xs, ys), u)
    return mm.cg(damped, b, maxiter=maxiter, tol=tol, unroll=unroll)
  return run


@pytest.mark.parametrize("tol, lam", [(0.0, 1.0), (3e-2, 1.0), (0.0, -5.0)],
                         ids=["all-iterations", "early-stop", "negative-curvature"])
def test_host_cg_takes_the_same_iterates_and_stops_the_same(cnn, tol, lam):
  """``unroll="host"`` (the CPU default for a convolutional operator): the
  while_loop iterated from Python in one callback, each step a separately jitted
  computation. The batch is a jit argument here (traced, int labels), as in a
  train step."""
  nlp, params, x, y = cnn
  b = jax.tree_util.tree_map(lambda a: jnp.sin(1.0 + jnp.arange(a.size)).reshape(a.shape),
                             params)
  run = _damped_run(nlp, x, y, lam, tol)
  (x0, i0), (x1, i1) = (jax.jit(functools.partial(run, unroll=u))(params, b, x, y)
                        for u in (False, "host"))
  _assert_same_solve((x0, i0), (x1, i1), lam, tol)
  host_text = _lowered(functools.partial(run, unroll="host"), params, b, x, y)
  assert "callback" in host_text and "callback" not in _lowered(
      functools.partial(run, unroll=False), params, b, x, y)


def test_cg_default_is_host_for_convolutions_on_cpu_and_rolled_otherwise(cnn):
  nlp, params, x, y = cnn
  run = _damped_run(nlp, x, y, 1.0, 0.0, maxiter=3)
  text = _lowered(functools.partial(run, unroll=None), params, params, x, y)
  on_cpu = jax.default_backend() == "cpu"
  # On the CPU the whole loop is one callback: no while and no convolution left
  # in the outer computation; elsewhere the plain while_loop.
  assert ("callback" in text) == on_cpu
  assert ("while" in text) == ("convolution" in text) == (not on_cpu)
  mnlp, mp, mx, my = _mlp()
  mrun = _damped_run(mnlp, mx, my, 1.0, 0.0, maxiter=3)
  assert "callback" not in _lowered(functools.partial(mrun, unroll=None), mp, mp, mx, my)
  with pytest.raises(TypeError, match="unroll must be True, False, 'host' or None"):
    mm.cg(lambda v: v, jnp.ones(2), unroll="yes")


def _host_case(cnn):
  nlp, params, x, y = cnn
  b = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size)).reshape(a.shape), params)
  return params, b, x, y, _damped_run(nlp, x, y, 1.0, 0.0, maxiter=4)


def test_host_cg_differentiates_like_rolled(cnn):
  params, b, x, y, run = _host_case(cnn)

  def loss(p, bb, unroll):
    return ravel_pytree(run(p, bb, x, y, unroll)[0])[0].sum()

  g0, g1 = (jax.jit(jax.grad(functools.partial(loss, unroll=u), argnums=(0, 1)))(params, b)
            for u in (False, "host"))
  for a, c in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-10, atol=1e-12)


def test_host_cg_vmap_members_stop_at_their_own_iteration(cnn):
  """Under vmap each member runs its own host loop; the rolled while_loop runs
  until all stop and freezes the finished ones: the same iterates and info."""
  nlp, params, x, y = cnn
  run = _damped_run(nlp, x, y, 1.0, 3e-2, maxiter=8)
  b = jax.tree_util.tree_map(lambda a: jnp.sin(1.0 + jnp.arange(a.size)).reshape(a.shape),
                             params)
  bs = jax.tree_util.tree_map(lambda a, c: jnp.stack([a, jnp.ones_like(a), c]), b, params)
  (x0, i0), (x1, i1) = (jax.jit(jax.vmap(lambda bb, u=u: run(params, bb, x, y, u)))(bs)
                        for u in (False, "host"))
  assert len(set(np.asarray(i0.iterations).tolist())) > 1  # members stop apart
  for a, c in zip(jax.tree_util.tree_leaves((x0, i0)), jax.tree_util.tree_leaves((x1, i1))):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-11, atol=1e-12)


def test_host_cg_vmaps_like_rolled(cnn):
  params, b, x, y, run = _host_case(cnn)
  bs = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), b)
  v0, v1 = (jax.jit(jax.vmap(lambda bb, u=u: run(params, bb, x, y, u)))(bs)
            for u in (False, "host"))
  for a, c in zip(jax.tree_util.tree_leaves(v0), jax.tree_util.tree_leaves(v1)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-11, atol=1e-12)
