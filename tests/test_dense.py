"""Tests for mlmap.dense: dense curvature matrices and exact diagonals."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mlmap as mm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _curvature_refs import (DENSE_FORMS, KINDS, assert_close, bn_nlps, bn_problem, flat,  # noqa: E402
                             mlp_apply, mlp_init, problem, references,
                             structured_output_fisher, structured_problem,
                             structured_references, with_step_counter)
from mlmap import dense as dense_lib  # noqa: E402


@functools.partial(jax.jit, static_argnums=0)
def _all_dense(nlp, params, x, y):
  return {
      "hessian": mm.hessian_matrix(nlp, params, x, y, chunk_size=7),
      "ggn": mm.ggn_matrix(nlp, params, x, y, chunk_size=16),
      "fisher": mm.fisher_matrix(nlp, params, x, y),
      "empirical": mm.empirical_fisher_matrix(nlp, params, x, y, chunk_size=1),
      "ggn_diagonal": flat(mm.ggn_diagonal(nlp, params, x, y, chunk_size=4)),
      "fisher_diagonal": flat(mm.fisher_diagonal(nlp, params, x, y)),
  }


# The num_data + prior scaling does not depend on the likelihood: every kind runs
# plain by default, the scaled case by default for categorical only; the scaled
# gaussian and bernoulli cases run with -m slow.
_SCALED_CASES = [pytest.param(kind, scaled, id=f"{kind}-{'num_data+prior' if scaled else 'plain'}",
                              marks=pytest.mark.slow if scaled and kind != "categorical" else ())
                 for kind in KINDS for scaled in (False, True)]


@pytest.mark.parametrize("kind, scaled", _SCALED_CASES)
def test_dense_forms_and_diagonals_equal_references(kind, scaled):
  nlp, params, x, y = problem(kind, scaled)
  ref = references(kind, scaled)
  got = _all_dense(nlp, params, x, y)
  for name in ("hessian", "ggn", "fisher", "empirical"):
    assert got[name].shape == ref[name].shape
    assert_close(got[name], ref[name])
  assert_close(got["ggn_diagonal"], jnp.diag(ref["ggn"]))
  assert_close(got["fisher_diagonal"], jnp.diag(ref["fisher"]))
  # The Hessian is not the GGN here (the tests can tell them apart).
  assert not np.allclose(ref["hessian"], ref["ggn"], rtol=1e-3)


@pytest.mark.slow  # long; CI runs -m slow too
def test_hessian_matrix_eager_chunk_sizes_and_args():
  def fun(params, a, b):
    return jnp.sum(jnp.sin(params["u"]) * a) * jnp.sum(params["v"] ** 3) + b * jnp.sum(
        params["u"] ** 2)
  params = {"u": jnp.array([0.3, -1.2, 0.7]), "v": jnp.array([[0.5, 2.0], [1.0, -0.4]])}
  a = jnp.array([1.0, 2.0, 3.0])
  f, unravel = ravel_pytree(params)
  ref = jax.hessian(lambda w: fun(unravel(w), a, 0.5))(f)
  for chunk in (None, 3, 100):
    assert_close(mm.hessian_matrix(fun, params, a, 0.5, chunk_size=chunk), ref)


def test_diagonal_with_non_separable_prior_and_output_fisher():
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  params = mlp_init(k[0], (3, 4, 2))
  x = jax.random.normal(k[1], (5, 3))
  y = jax.random.normal(k[2], (5,))

  def log_lik(outputs, targets):  # Gaussian, mean outputs[:, 0], log sigma outputs[:, 1]
    return mm.gaussian_log_likelihood(outputs[:, 0], targets, sigma=jnp.exp(outputs[:, 1]))

  def output_fisher(outputs, u):
    return jnp.stack([u[:, 0] * jnp.exp(-2 * outputs[:, 1]), 2 * u[:, 1]], -1)

  def coupled_prior(p):  # not separable: its Hessian is not diagonal
    w = flat(p)
    return -0.5 * jnp.sum(w**2) - 0.3 * jnp.sum(w) ** 2 - 0.1 * jnp.sum(jnp.sin(w) * w[::-1])

  nlp = mm.negative_log_posterior(mlp_apply, log_lik, coupled_prior, num_data=20)

  @jax.jit
  def compute(params):
    f, unravel = ravel_pytree(params)
    prior_h = jax.hessian(lambda w: -coupled_prior(unravel(w)))(f)
    jac = jax.jacfwd(lambda w: mlp_apply(unravel(w), x))(f)
    z = mlp_apply(params, x)
    fz = jax.vmap(lambda zi: jnp.diag(jnp.array([jnp.exp(-2 * zi[1]), 2.0])))(z)
    hz = jax.vmap(jax.hessian(lambda zi, ti: -log_lik(zi[None], ti[None])[0]))(z, y)
    fisher = 4.0 * jnp.einsum("iop,ioq,iqr->pr", jac, fz, jac) + prior_h
    ggn = 4.0 * jnp.einsum("iop,ioq,iqr->pr", jac, hz, jac) + prior_h
    return (fisher, ggn,
            mm.fisher_matrix(nlp, params, x, y, output_fisher_vp=output_fisher),
            flat(mm.fisher_diagonal(nlp, params, x, y, output_fisher_vp=output_fisher,
                                    chunk_size=2)),
            flat(mm.ggn_diagonal(nlp, params, x, y)), mm.ggn_matrix(nlp, params, x, y))

  fisher, ggn, fisher_dense, fisher_diag, ggn_diag, ggn_dense = compute(params)
  assert_close(fisher_dense, fisher)
  assert_close(fisher_diag, jnp.diag(fisher))
  assert_close(ggn_dense, ggn)
  assert_close(ggn_diag, jnp.diag(ggn))  # an indefinite H_z: signed eigenvalues
  assert not np.allclose(jnp.diag(ggn), jnp.diag(fisher), rtol=1e-2)


def test_float32_diagonal_and_matrix():
  nlp, params, x, y = problem("categorical", True)
  p32, x32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, x))
  ref = references("categorical", True)
  g, d = jax.jit(lambda p, x: (mm.ggn_matrix(nlp, p, x, y),
                               flat(mm.ggn_diagonal(nlp, p, x, y))))(p32, x32)
  assert g.dtype == d.dtype == jnp.float32
  np.testing.assert_allclose(g, ref["ggn"], atol=1e-4 * np.abs(ref["ggn"]).max())
  np.testing.assert_allclose(d, jnp.diag(ref["ggn"]), atol=1e-4 * np.abs(ref["ggn"]).max())


def test_dense_refuses_over_max_bytes_and_bad_options():
  nlp, params, x, y = problem("gaussian", False)
  num = flat(params).size
  need = num * num * 8
  with pytest.raises(ValueError, match=rf"needs {need} bytes .*max_bytes=1000"):
    mm.ggn_matrix(nlp, params, x, y, max_bytes=1000)
  with pytest.raises(ValueError, match=rf"\({num}, {num}\) float64 matrix needs"):
    mm.hessian_matrix(nlp, params, x, y, max_bytes=need - 1)
  big = {"w": jnp.zeros(200_000, jnp.float32)}  # a 149 GiB Hessian
  with pytest.raises(ValueError, match=r"160000000000 bytes \(149 GiB\)"):
    mm.hessian_matrix(lambda p: jnp.sum(p["w"] ** 2), big)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
      mm.fisher_matrix(nlp, params, x, y, chunk_size=bad)
  with pytest.raises(ValueError, match="max_bytes must be a positive number"):
    mm.empirical_fisher_matrix(nlp, params, x, y, max_bytes=-1)
  with pytest.raises(ValueError, match="chunk_size"):
    mm.ggn_diagonal(nlp, params, x, y, chunk_size=0)
  hetero = mm.negative_log_posterior(mlp_apply, lambda z, t: -(z - t) ** 4)
  with pytest.raises(ValueError, match="output_fisher_vp"):
    mm.fisher_diagonal(hetero, params, x, y)
  with pytest.raises(ValueError, match="output_fisher_vp"):
    mm.fisher_matrix(hetero, params, x, y)


# --- issue 10: structured outputs, non-floating leaves, model state, max_bytes ---

@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_structured_outputs_diagonals_and_matrices(kind):
  """ggn_diagonal / fisher_diagonal on (mean, extra head) outputs, against references."""
  nlp, params, x, y = structured_problem(kind)
  ref = structured_references(kind)
  ofvp = structured_output_fisher(kind)

  @jax.jit
  def compute(params):
    return {
        "ggn": mm.ggn_matrix(nlp, params, x, y),
        "fisher": mm.fisher_matrix(nlp, params, x, y, output_fisher_vp=ofvp),
        "empirical": mm.empirical_fisher_matrix(nlp, params, x, y, chunk_size=5),
        "ggn_diagonal": flat(mm.ggn_diagonal(nlp, params, x, y, chunk_size=4)),
        "fisher_diagonal": flat(mm.fisher_diagonal(nlp, params, x, y,
                                                   output_fisher_vp=ofvp)),
    }

  got = compute(params)
  for name in ("ggn", "fisher", "empirical"):
    assert_close(got[name], ref[name])
  assert_close(got["ggn_diagonal"], jnp.diag(ref["ggn"]))
  assert_close(got["fisher_diagonal"], jnp.diag(ref["fisher"]))
  assert not np.allclose(jnp.diag(ref["ggn"]), jnp.diag(ref["fisher"]), rtol=1e-2)


def test_output_blocks_of_a_tuple_match_the_flat_blocks():
  outputs = (jnp.arange(6.0).reshape(3, 2), jnp.arange(3.0))
  blocks = dense_lib._output_blocks(lambda u: (2.0 * u[0], 3.0 * u[1]), outputs)
  np.testing.assert_array_equal(blocks, jnp.broadcast_to(jnp.diag(jnp.array([2., 2, 3])),
                                                         (3, 3, 3)))
  with pytest.raises(ValueError, match=r"ggn_diagonal: every leaf .*\[\(3, 2\), \(4,\)\]"):
    dense_lib._batch_ravel("ggn_diagonal", (jnp.zeros((3, 2)), jnp.zeros(4)))


_DENSE = DENSE_FORMS


@pytest.mark.parametrize("name", sorted(_DENSE))
def test_dense_names_non_floating_params_leaf(name):
  nlp, params, x, y = problem("categorical", True)
  bad = with_step_counter(params)
  pattern = rf"{name}: params must have floating leaves only.*'mask' \(bool\), 'step' \(int"
  with pytest.raises(TypeError, match=pattern):
    _DENSE[name](nlp, bad, x, y)
  with pytest.raises(TypeError, match=pattern):
    jax.jit(lambda p: _DENSE[name](nlp, p, x, y))(bad)


@pytest.mark.parametrize("name", sorted(set(_DENSE) - {"hessian_matrix"}))
@pytest.mark.parametrize("how", ["mutable", "variables"])
def test_dense_refuses_flax_model_state(name, how):
  model, variables, x, y = bn_problem()
  nlp, params = bn_nlps(model, variables)[how]
  with pytest.raises(TypeError, match=rf"{name}: .*'batch_stats'.*has_state=True"):
    _DENSE[name](nlp, params, x, y)


@pytest.mark.parametrize("bad", [True, np.True_, float("nan"), float("inf"), -float("inf"),
                                 0, -1.0, "2e9", None, jnp.array(1e9)])
def test_check_dense_bytes_rejects_bool_nan_inf(bad):
  with pytest.raises(ValueError, match=r"laplace: max_bytes must be a positive number, got"):
    dense_lib.check_dense_bytes("laplace", 10, jnp.float64, bad)


def test_check_dense_bytes_accepts_numbers_and_refuses_by_name():
  for ok in (800, 800.0, np.int64(800), np.float32(1e9)):
    dense_lib.check_dense_bytes("newton", 10, jnp.float64, ok)
  with pytest.raises(ValueError, match=r"newton: the dense \(10, 10\) float64 matrix needs "
                                       r"800 bytes .*max_bytes= to newton"):
    dense_lib.check_dense_bytes("newton", 10, jnp.float64, 799)
  nlp, params, x, y = problem("gaussian", False)
  with pytest.raises(ValueError, match=r"ggn_matrix: max_bytes .*got nan"):
    mm.ggn_matrix(nlp, params, x, y, max_bytes=float("nan"))
