"""Bad-input rows for curvature products, dense forms and spectra ("cv-" rows).

Structure, dtype and option checks raise in both modes (they read shapes, dtypes
and Python values, which ``jit`` keeps static); the rows that must return give a
value checked against a dense reference or NaN.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import mlmap as mm
from mlmap import dense as _dense
from _bad_rows import Case
from _curvature_refs import (DENSE_FORMS, bn_nlps, bn_problem, mlp_apply, mlp_init, problem,
                             structured_output_fisher, structured_problem,
                             structured_references, with_step_counter)

_NLP, _PARAMS, _X, _Y = problem("gaussian", True)
_CAT = problem("categorical", False)
_BAD = with_step_counter(_PARAMS)  # an int 'step' and a bool 'mask' leaf
_INT = r"params must have floating leaves only.*'mask' \(bool\), 'step' \(int"
_KEY = jax.random.PRNGKey(0)
_LIKE_BAD = {"w": jnp.zeros(4), "n": jnp.arange(2)}
_ID = lambda v: v  # noqa: E731


def _shape_wrong(params):
  out = jax.tree_util.tree_map(jnp.zeros_like, params)
  out["layer1"]["b"] = jnp.zeros(7)
  return out


_WRONG = _shape_wrong(_PARAMS)


def _int_leaf_row(name, call):
  """``call(nlp, params, x, y)`` with a step counter in params: TypeError naming it."""
  return Case(f"cv-{name.replace('_', '-')}-int-leaf",
              lambda p, x, y: call(_NLP, p, x, y), (_BAD, _X, _Y),
              raises=TypeError, match=rf"{name}: {_INT}")


_INT_LEAF_CALLS = {
    "hvp": lambda nlp, p, x, y: mm.hvp(nlp, p, p, x, y),
    "hvp_fn": lambda nlp, p, x, y: mm.hvp_fn(nlp, p, x, y),
    "ggn_vp": lambda nlp, p, x, y: mm.ggn_vp(nlp, p, p, x, y),
    "ggn_vp_fn": lambda nlp, p, x, y: mm.ggn_vp_fn(nlp, p, x, y),
    "fisher_vp": lambda nlp, p, x, y: mm.fisher_vp(nlp, p, p, x, y),
    "fisher_vp_fn": lambda nlp, p, x, y: mm.fisher_vp_fn(nlp, p, x, y),
    "empirical_fisher_vp": lambda nlp, p, x, y: mm.empirical_fisher_vp(nlp, p, p, x, y),
    "empirical_fisher_vp_fn": lambda nlp, p, x, y: mm.empirical_fisher_vp_fn(nlp, p, x, y),
    "mc_fisher_vp": lambda nlp, p, x, y: mm.mc_fisher_vp(nlp, p, p, x, y, _KEY),
    **DENSE_FORMS,
}

_SPECTRAL_CALLS = {
    "hutchinson_trace": lambda like, k: mm.hutchinson_trace(_ID, like, k, 2),
    "hutchinson_diagonal": lambda like, k: mm.hutchinson_diagonal(_ID, like, k, 2),
    "lanczos_eigenvalues": lambda like, k: mm.lanczos_eigenvalues(_ID, like, k, k=1),
    "slq_quadrature": lambda like, k: mm.slq_quadrature(_ID, like, k, 1, 2),
    "spectral_density": lambda like, k: mm.spectral_density(_ID, like, k, 1, 2,
                                                            jnp.zeros(3), 1.0),
    "stochastic_logdet": lambda like, k: mm.stochastic_logdet(_ID, like, k, 2, 2),
}


# --- structured outputs: the rows return, checked against dense references -------

def _close_to(expected, rtol=1e-10):
  def check(out):
    out, exp = np.asarray(ravel_pytree(out)[0]), np.asarray(expected())
    return bool(np.max(np.abs(out - exp)) <= rtol * max(np.max(np.abs(exp)), 1e-300))
  return check


def _sv(kind):
  params = structured_problem(kind)[1]
  f, unravel = ravel_pytree(params)
  return unravel(jnp.linspace(-1.0, 1.0, f.size))


def _structured_call(kind, call):
  nlp, params, x, y = structured_problem(kind)
  return lambda p, v: call(nlp, p, v, x, y)


def _structured_expected(kind, name, with_vector):
  def expected():
    ref = structured_references(kind)[name]
    return ref @ ravel_pytree(_sv(kind))[0] if with_vector else jnp.diag(ref)
  return expected


_OFVP = structured_output_fisher("dict")


def _batch_mismatch(p, x, y):
  nlp = mm.negative_log_posterior(lambda w, x: (mlp_apply(w, x), mlp_apply(w, x)[0]),
                                  lambda z, t: mm.gaussian_log_likelihood(z[0], t))
  return mm.ggn_diagonal(nlp, p, x, y)


# --- flax model state --------------------------------------------------------------

_BN = bn_problem()
_BN_NLPS = bn_nlps(_BN[0], _BN[1])


def _state_row(name, how, call):
  nlp, params = _BN_NLPS[how]
  x, y = _BN[2], _BN[3]
  return Case(f"cv-{name.replace('_', '-')}-flax-{how}", lambda p: call(nlp, p, x, y),
              (params,), raises=TypeError, match=rf"{name}: .*'batch_stats'.*has_state=True")


# --- options -------------------------------------------------------------------------

def _unknown_nlp():
  return mm.negative_log_posterior(mlp_apply, lambda z, t: -(z - t) ** 4)


def _sigma3_nlp():
  return mm.negative_log_posterior(
      mlp_apply, functools.partial(mm.gaussian_log_likelihood, sigma=jnp.ones(3)))


def _is_nan_estimate(out):
  return bool(np.isnan(np.asarray(out.estimate)))


_ROWS = [
    *[_int_leaf_row(n, c) for n, c in _INT_LEAF_CALLS.items()],
    *[Case(f"cv-{n.replace('_', '-')}-int-like", c, (_LIKE_BAD, _KEY), raises=TypeError,
           match=rf"{n}: like must have floating leaves only.*'n' \(int")
      for n, c in _SPECTRAL_CALLS.items()],
    Case("cv-spectral-density-bad-key", _SPECTRAL_CALLS["spectral_density"],
         (jnp.zeros(4), jnp.zeros(3, jnp.uint32)), raises=TypeError,
         match=r"spectral_density: key must be a jax.random key.*shape \(3,\)"),
    Case("cv-hutchinson-trace-int-key", lambda like: mm.hutchinson_trace(_ID, like, 0, 2),
         (jnp.zeros(4),), raises=TypeError, match="hutchinson_trace: key must be"),
    # Structured (tuple / dict) model outputs: supported, equal to dense references.
    Case("cv-empirical-fisher-vp-tuple-outputs",
         _structured_call("tuple", mm.empirical_fisher_vp),
         (structured_problem("tuple")[1], _sv("tuple")),
         check=_close_to(_structured_expected("tuple", "empirical", True)),
         modes=("jit",)),  # eager: test_curvature's structured-output tests
    Case("cv-empirical-fisher-vp-dict-outputs",
         _structured_call("dict", mm.empirical_fisher_vp),
         (structured_problem("dict")[1], _sv("dict")),
         check=_close_to(_structured_expected("dict", "empirical", True))),
    Case("cv-ggn-diagonal-tuple-outputs",
         _structured_call("tuple", lambda nlp, p, v, x, y: mm.ggn_diagonal(nlp, p, x, y)),
         (structured_problem("tuple")[1], _sv("tuple")),
         check=_close_to(_structured_expected("tuple", "ggn", False)),
         modes=("jit",)),
    Case("cv-fisher-diagonal-dict-outputs",
         _structured_call("dict", lambda nlp, p, v, x, y: mm.fisher_diagonal(
             nlp, p, x, y, output_fisher_vp=_OFVP)),
         (structured_problem("dict")[1], _sv("dict")),
         check=_close_to(_structured_expected("dict", "fisher", False))),
    Case("cv-ggn-diagonal-output-leaves-batch-mismatch", _batch_mismatch,
         (_PARAMS, _X, _Y), raises=ValueError,
         match=r"ggn_diagonal: every leaf of the model's outputs needs the same leading "
               r"batch axis, got leaf shapes \[\(6, 2\), \(2,\)\]"),
    # Model state (flax BatchNorm): refused naming the collection.
    _state_row("ggn_vp", "mutable", lambda nlp, p, x, y: mm.ggn_vp(nlp, p, p, x, y)),
    _state_row("fisher_vp_fn", "mutable", lambda nlp, p, x, y: mm.fisher_vp_fn(nlp, p, x, y)),
    _state_row("empirical_fisher_vp", "variables",
               lambda nlp, p, x, y: mm.empirical_fisher_vp(nlp, p, p, x, y)),
    _state_row("ggn_diagonal", "mutable", mm.ggn_diagonal),
    _state_row("ggn_diagonal", "variables", mm.ggn_diagonal),
    _state_row("fisher_matrix", "variables", mm.fisher_matrix),
    # vector against params.
    Case("cv-ggn-vp-vector-structure", lambda p, v: mm.ggn_vp(_NLP, p, v, _X, _Y),
         (_PARAMS, {"layer0": _PARAMS["layer0"]}), raises=ValueError,
         match="ggn_vp: vector tree structure .* differs from params tree structure"),
    Case("cv-hvp-vector-leaf-shape", lambda p, v: mm.hvp(_NLP, p, v, _X, _Y),
         (_PARAMS, _WRONG), raises=ValueError,
         match=r"hvp: vector leaf shapes .*\(7,\).* differ from params leaf shapes"),
    Case("cv-fisher-vp-fn-matvec-vector-shape",
         lambda p, v: mm.fisher_vp_fn(_NLP, p, _X, _Y)(v), (_PARAMS, _WRONG),
         raises=ValueError, match=r"fisher_vp_fn: vector leaf shapes .*\(7,\)"),
    Case("cv-empirical-fisher-vp-vector-shape",
         lambda p, v: mm.empirical_fisher_vp(_NLP, p, v, _X, _Y), (_PARAMS, _WRONG),
         raises=ValueError, match=r"empirical_fisher_vp: vector leaf shapes"),
    Case("cv-mc-fisher-vp-vector-shape",
         lambda p, v: mm.mc_fisher_vp(_NLP, p, v, _X, _Y, _KEY), (_PARAMS, _WRONG),
         raises=ValueError, match=r"mc_fisher_vp: vector leaf shapes"),
    # Likelihoods the Fisher cannot guess, and the options of the products.
    Case("cv-fisher-vp-unknown-likelihood",
         lambda p: mm.fisher_vp(_unknown_nlp(), p, p, _X, _Y), (_PARAMS,),
         raises=ValueError, match="fisher_vp: no closed-form Fisher.*output_fisher_vp="),
    Case("cv-fisher-diagonal-unknown-likelihood",
         lambda p: mm.fisher_diagonal(_unknown_nlp(), p, _X, _Y), (_PARAMS,),
         raises=ValueError, match="fisher_diagonal: no closed-form Fisher"),
    Case("cv-fisher-vp-output-fisher-not-callable",
         lambda p: mm.fisher_vp(_NLP, p, p, _X, _Y, output_fisher_vp="exact"), (_PARAMS,),
         raises=TypeError, match="output_fisher_vp must be callable"),
    Case("cv-fisher-vp-gaussian-sigma-shape",
         lambda p: mm.fisher_vp(_sigma3_nlp(), p, p, _X, _Y), (_PARAMS,),
         raises=ValueError, match=r"sigma shape \(3,\) does not broadcast"),
    Case("cv-ggn-vp-not-an-nlp",
         lambda p: mm.ggn_vp(lambda p, x, y: 0.0, p, p, _X, _Y), (_PARAMS,),
         raises=TypeError, match="ggn_vp needs an mlmap.NegativeLogPosterior"),
    Case("cv-ggn-diagonal-not-an-nlp",
         lambda p: mm.ggn_diagonal(print, p, _X, _Y), (_PARAMS,),
         raises=TypeError, match="ggn_diagonal needs an mlmap.NegativeLogPosterior"),
    Case("cv-mc-fisher-vp-num-samples-zero",
         lambda p: mm.mc_fisher_vp(_NLP, p, p, _X, _Y, _KEY, num_samples=0), (_PARAMS,),
         raises=ValueError, match="num_samples must be an integer >= 1, got 0"),
    Case("cv-mc-fisher-vp-num-samples-bool",
         lambda p: mm.mc_fisher_vp(_NLP, p, p, _X, _Y, _KEY, num_samples=True), (_PARAMS,),
         raises=ValueError, match="num_samples must be an integer >= 1, got True"),
    Case("cv-mc-fisher-vp-no-sampler",
         lambda p: mm.mc_fisher_vp(_unknown_nlp(), p, p, _X, _Y, _KEY), (_PARAMS,),
         raises=ValueError, match="mc_fisher_vp: pass sample_fn"),
    Case("cv-mc-fisher-vp-sample-fn-not-callable",
         lambda p: mm.mc_fisher_vp(_NLP, p, p, _X, _Y, _KEY, sample_fn=3), (_PARAMS,),
         raises=TypeError, match="sample_fn must be callable"),
    Case("cv-mc-fisher-vp-bad-key", lambda p, k: mm.mc_fisher_vp(_NLP, p, p, _X, _Y, k),
         (_PARAMS, jnp.zeros(3, jnp.uint32)), raises=TypeError,
         match=r"mc_fisher_vp: key must be a jax.random key.*uint32 array of shape \(3,\)"),
    # Dense options: chunk_size, max_bytes (bool / NaN / inf included).
    Case("cv-ggn-matrix-chunk-size-zero",
         lambda p: mm.ggn_matrix(_NLP, p, _X, _Y, chunk_size=0), (_PARAMS,),
         raises=ValueError, match="ggn_matrix: chunk_size must be an integer >= 1, got 0"),
    Case("cv-hessian-matrix-chunk-size-bool",
         lambda p: mm.hessian_matrix(_NLP, p, _X, _Y, chunk_size=True), (_PARAMS,),
         raises=ValueError, match="chunk_size must be an integer >= 1, got True"),
    Case("cv-ggn-diagonal-chunk-size-float",
         lambda p: mm.ggn_diagonal(_NLP, p, _X, _Y, chunk_size=2.5), (_PARAMS,),
         raises=ValueError, match="ggn_diagonal: chunk_size must be an integer >= 1"),
    Case("cv-ggn-matrix-max-bytes-too-small",
         lambda p: mm.ggn_matrix(_NLP, p, _X, _Y, max_bytes=1000), (_PARAMS,),
         raises=ValueError, match=r"ggn_matrix: the dense .* needs \d+ bytes.*max_bytes= "
                                  r"to ggn_matrix"),
    *[Case(f"cv-{name}-max-bytes-{tag}",
           functools.partial(lambda p, fn, mb: fn(_NLP, p, _X, _Y, max_bytes=mb), fn=fn, mb=mb),
           (_PARAMS,), raises=ValueError,
           match=rf"{name.replace('-', '_')}: max_bytes must be a positive number, got")
      for name, fn, tag, mb in (
          ("hessian-matrix", mm.hessian_matrix, "nan", float("nan")),
          ("fisher-matrix", mm.fisher_matrix, "inf", float("inf")),
          ("empirical-fisher-matrix", mm.empirical_fisher_matrix, "bool", True),
          ("ggn-matrix", mm.ggn_matrix, "negative", -1.0))],
    Case("cv-check-dense-bytes-np-bool",
         lambda: _dense.check_dense_bytes("laplace", 10, jnp.float64, np.True_),
         raises=ValueError, match=r"laplace: max_bytes must be a positive number, got (np\.)?True",
         modes=("eager",)),
    # Spectral options.
    Case("cv-hutchinson-trace-one-probe", lambda like: mm.hutchinson_trace(_ID, like, _KEY, 1),
         (jnp.zeros(5),), raises=ValueError, match="num_probes must be >= 2, got 1"),
    Case("cv-hutchinson-diagonal-batch-size-divides",
         lambda like: mm.hutchinson_diagonal(_ID, like, _KEY, 10, batch_size=3),
         (jnp.zeros(5),), raises=ValueError,
         match=r"batch_size \(3\) must divide num_probes \(10\)"),
    Case("cv-slq-quadrature-num-steps-too-large",
         lambda like: mm.slq_quadrature(_ID, like, _KEY, 2, 6), (jnp.zeros(5),),
         raises=ValueError, match=r"num_steps \(6\) must be <= .* P \(5\)"),
    Case("cv-slq-quadrature-matvec-structure",
         lambda like: mm.slq_quadrature(lambda v: {"a": v}, like, _KEY, 2, 2),
         (jnp.zeros(5),), raises=ValueError, match=r"matvec\(v\) tree structure"),
    Case("cv-lanczos-eigenvalues-which",
         lambda like: mm.lanczos_eigenvalues(_ID, like, _KEY, k=2, which="BE"),
         (jnp.zeros(5),), raises=ValueError, match="which must be 'LA', 'SA' or 'LM'"),
    Case("cv-lanczos-eigenvalues-k-above-steps",
         lambda like: mm.lanczos_eigenvalues(_ID, like, _KEY, k=4, num_steps=3),
         (jnp.zeros(5),), raises=ValueError, match=r"k \(4\) must be <= num_steps \(3\)"),
    Case("cv-spectral-density-sigma-zero",
         lambda like: mm.spectral_density(_ID, like, _KEY, 2, 3, jnp.zeros(4), 0.0),
         (jnp.zeros(5),), raises=ValueError, match="sigma must be > 0"),
    Case("cv-spectral-density-sigma-inf",
         lambda like: mm.spectral_density(_ID, like, _KEY, 2, 3, jnp.zeros(4), float("inf")),
         (jnp.zeros(5),), raises=ValueError, match="sigma must be finite"),
    Case("cv-spectral-density-int-grid",
         lambda like: mm.spectral_density(_ID, like, _KEY, 2, 3, jnp.arange(4), 1.0),
         (jnp.zeros(5),), raises=TypeError, match="grid must be a floating array"),
    Case("cv-stochastic-logdet-indefinite-is-nan",
         lambda like: mm.stochastic_logdet(lambda v: -v, like, _KEY, 2, 3),
         (jnp.ones(5),), check=_is_nan_estimate),
]

CASES = list(_ROWS)
