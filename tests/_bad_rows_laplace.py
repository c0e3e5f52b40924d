"""Bad-input rows of the Laplace area: log_evidence, laplace / LaplacePosterior,
maximize_evidence and log_evidence_grad (names prefixed ``lp-``).

Concrete-value checks cannot fire under ``jit`` (the row's arrays are traced):
those rows expect ``-inf``, NaN or a flag there instead. Structural checks (an
improper prior, non-floating leaves, sizes, names) raise in both modes.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp

import mlmap as mm
from _bad_rows import Case
from _laplace_refs import SIGMA, blr_data, blr_nlp, custom_prior_ignoring_b, dict_linear

_X, _Y, _W, _ = blr_data()
_W = jnp.asarray(_W)
_NLP = blr_nlp()
_KEY = jax.random.PRNGKey(0)
_LIK = functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA)


def _dict_nlp(log_prior):
  return mm.negative_log_posterior(dict_linear, _LIK, log_prior)


_P = {"w": _W[:4], "b": _W[4]}
_XD = _X[:, :4]
_FLAT = mm.negative_log_posterior(blr_nlp().apply_fn, _LIK, None)
# A parameter no datum touches: the flat-prior curvature is singular.
_X0 = np.concatenate([_X, np.zeros((len(_Y), 1))], axis=1)
_W0 = jnp.concatenate([_W, jnp.zeros(1)])
# f(x; w) = w0 w1 x at w = 0: the Hessian is indefinite.
_PRODUCT = mm.negative_log_posterior(lambda w, x: x[:, 0] * w[0] * w[1], _LIK,
                                     functools.partial(mm.gaussian_log_prior, sigma=1.0))
_INT_PRIOR = functools.partial(mm.gaussian_log_prior, sigma={"w": 1.0, "step": None})
_INT_NLP = mm.negative_log_posterior(lambda p, x: x @ p["w"], _LIK, _INT_PRIOR)


def _ev(**kw):
  return lambda w: mm.log_evidence(_NLP, w, _X, _Y, **kw)


def _lin_nlp(h):
  return mm.negative_log_posterior(
      lambda w, x: x @ w, functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]),
      functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]))


def _maxev(hyper, params=None, **kw):
  params = jnp.zeros(5) if params is None else params
  return lambda: mm.maximize_evidence(_lin_nlp, hyper, params, _X, _Y, num_iterations=2,
                                      fit_steps=1, **kw)


def _post(method="dense", **kw):
  return mm.laplace(_NLP, _W, _X, _Y, method=method, **kw)


_H = {"sigma": 1.0, "prior_sigma": 1.0}
_PD = r"not \(numerically\) positive definite"
_PROPER = r"unpenalized .*needs a proper prior"

CASES = [
    # log_evidence
    Case("lp-evidence-curvature-name", _ev(curvature="fisher_diag"), (_W,), ValueError,
         "curvature must be one of"),
    Case("lp-evidence-method-name", _ev(method="lanczos"), (_W,), ValueError,
         "method must be one of"),
    Case("lp-evidence-slq-needs-key", _ev(method="slq"), (_W,), ValueError,
         "method='slq' needs a PRNG key"),
    Case("lp-evidence-ggn-needs-nlp",
         lambda w: mm.log_evidence(lambda p, x, t: jnp.sum(p**2), w, _X, _Y), (_W,),
         TypeError, "NegativeLogPosterior"),
    Case("lp-evidence-not-pd", lambda w: mm.log_evidence(_PRODUCT, w, _X, _Y, "hessian"),
         (jnp.zeros(2),), ValueError, "hessian curvature at params is " + _PD,
         modes=("eager",)),
    Case("lp-evidence-not-pd-flagged",
         lambda w: mm.log_evidence(_PRODUCT, w, _X, _Y, "hessian", return_info=True),
         (jnp.zeros(2),), check=lambda out: float(out[0]) == -np.inf
         and not bool(out[1].positive_definite), modes=("jit",)),
    Case("lp-evidence-log-prior-none", lambda w: mm.log_evidence(_FLAT, w, _X, _Y), (_W,),
         ValueError, "nlp.log_prior is None.*" + _PROPER),
    Case("lp-evidence-flat-log-prior",
         lambda p: mm.log_evidence(_dict_nlp(mm.flat_log_prior), p, _XD, _Y), (_P,),
         ValueError, r"mm.flat_log_prior leaves 2 parameter leaves unpenalized \('b', 'w'\)"),
    Case("lp-evidence-none-sigma-leaf",
         lambda p: mm.log_evidence(_dict_nlp(functools.partial(
             mm.gaussian_log_prior, sigma={"w": 1.0, "b": None})), p, _XD, _Y), (_P,),
         ValueError, r"sigma tree \(None leaves\) leaves 1 parameter leaves unpenalized "
         r"\('b'\)"),
    Case("lp-evidence-slq-none-scale-leaf",
         lambda p: mm.log_evidence(_dict_nlp(functools.partial(
             mm.laplace_log_prior, scale={"w": None, "b": 1.0})), p, _XD, _Y,
             method="slq", key=_KEY), (_P,), ValueError, r"scale tree.*\('w'\)"),
    Case("lp-evidence-custom-prior-flat-leaf",
         lambda p: mm.log_evidence(_dict_nlp(custom_prior_ignoring_b), p, _XD, _Y), (_P,),
         ValueError, r"unpenalized \('b'\).*proper prior", modes=("eager",)),
    Case("lp-evidence-custom-prior-flat-leaf-nan",
         lambda p: mm.log_evidence(_dict_nlp(custom_prior_ignoring_b), p, _XD, _Y), (_P,),
         check=lambda out: bool(jnp.isnan(out)), modes=("jit",)),
    Case("lp-evidence-max-bytes", _ev(max_bytes=100), (_W,), ValueError,
         r"^log_evidence: the dense \(5, 5\) float64 .*max_bytes= to log_evidence"),
    Case("lp-evidence-max-bytes-invalid", _ev(max_bytes=-1), (_W,), ValueError,
         "max_bytes must be a positive number"),
    Case("lp-evidence-int-leaf",
         lambda w: mm.log_evidence(_INT_NLP, {"w": w, "step": jnp.asarray(7)}, _X, _Y),
         (_W,), TypeError, r"^log_evidence: params .*non-floating leaves: 'step' \(int"),
    Case("lp-evidence-slq-cg-status",
         _ev(method="slq", key=_KEY, num_steps=1, map_tol=None, return_info=True),
         (_W + 0.5,), check=lambda out: int(out[1].cg_status) == mm.CGStatus.MAX_ITERATIONS),
    # laplace and LaplacePosterior
    Case("lp-laplace-method-name", lambda w: mm.laplace(_NLP, w, _X, _Y, method="slq"),
         (_W,), ValueError, "method must be 'dense' or 'matvec'"),
    Case("lp-laplace-needs-apply-fn",
         lambda w: mm.laplace(lambda p, x, t: jnp.sum(p**2), w, _X, _Y, "hessian"), (_W,),
         TypeError, "nlp needs an apply_fn"),
    Case("lp-laplace-max-bytes", lambda w: mm.laplace(_NLP, w, _X, _Y, max_bytes=100),
         (_W,), ValueError, r"^laplace: the dense \(5, 5\).*max_bytes= to laplace"),
    Case("lp-laplace-int-leaf",
         lambda w: mm.laplace(_INT_NLP, {"w": w, "step": jnp.asarray(7)}, _X, _Y), (_W,),
         TypeError, r"^laplace: params .*'step' \(int"),
    Case("lp-laplace-cg-maxiter", lambda w: mm.laplace(_NLP, w, _X, _Y, method="matvec",
                                                       cg_maxiter=0), (_W,), ValueError,
         "cg_maxiter must be an integer >= 1"),
    Case("lp-laplace-cg-preconditioner",
         lambda w: mm.laplace(_NLP, w, _X, _Y, method="matvec", cg_preconditioner="jacobi"),
         (_W,), ValueError, "cg_preconditioner must be one of"),
    Case("lp-laplace-cg-tol", lambda w: mm.laplace(_NLP, w, _X, _Y, method="matvec",
                                                   cg_tol=-1.0), (_W,), ValueError,
         "cg_tol must be >= 0"),
    Case("lp-laplace-flat-prior-singular",
         lambda w: mm.laplace(_FLAT, w, _X0, _Y), (_W0,), ValueError, _PD, modes=("eager",)),
    Case("lp-laplace-flat-prior-singular-flagged",
         lambda w: mm.laplace(_FLAT, w, _X0, _Y), (_W0,),
         check=lambda post: not bool(post.positive_definite), modes=("jit",)),
    Case("lp-laplace-matvec-flat-prior-singular",
         lambda w: mm.laplace(_FLAT, w, _X0, _Y, method="matvec"), (_W0,), ValueError, _PD,
         modes=("eager",)),
    Case("lp-laplace-matvec-flat-prior-singular-flagged",
         lambda w: mm.laplace(_FLAT, w, _X0, _Y, method="matvec"), (_W0,),
         check=lambda post: not bool(post.positive_definite), modes=("jit",)),
    Case("lp-glm-moments-cg-not-converged",
         lambda w: mm.laplace(_NLP, w, _X, _Y, method="matvec", cg_maxiter=1,
                              cg_preconditioner=None, map_tol=None).glm_moments(
                                  _X[:3], return_info=True), (_W,),
         check=lambda out: bool(np.all(np.asarray(out[2].status)
                                       == mm.CGStatus.MAX_ITERATIONS))),
    Case("lp-posterior-sample-n", lambda: _post().sample(_KEY, 0), (), ValueError,
         "n must be an integer >= 1"),
    Case("lp-posterior-sample-matvec", lambda: _post("matvec").sample(_KEY, 2), (),
         ValueError, "needs the dense precision"),
    Case("lp-posterior-precision-vp-structure",
         lambda: _post().precision_vp({"w": _W}), (), ValueError, "tree structure"),
    Case("lp-predictive-likelihood-name",
         lambda: _post().predictive(_X[:2], likelihood="poisson"), (), ValueError,
         "likelihood must be"),
    Case("lp-predictive-sigma-nonpositive",
         lambda: _post().predictive(_X[:2], sigma=-1.0), (), ValueError,
         "sigma must be > 0"),
    # maximize_evidence and log_evidence_grad
    Case("lp-maxev-hyper-not-dict", _maxev((1.0, 1.0)), (), TypeError,
         "hyper must be a dict"),
    Case("lp-maxev-hyper-nonpositive", _maxev({"sigma": 1.0, "prior_sigma": -1.0}), (),
         ValueError, r"hyper\['prior_sigma'\] must be > 0"),
    Case("lp-maxev-noise-not-scalar", _maxev({"sigma": jnp.ones(2), "prior_sigma": 1.0}),
         (), ValueError, "noise scale .* must be a scalar"),
    Case("lp-maxev-prior-tree-prefix", _maxev({"sigma": 1.0, "prior_sigma": {"a": 1.0}}),
         (), ValueError, "not a prefix of params"),
    Case("lp-maxev-num-iterations",
         lambda: mm.maximize_evidence(_lin_nlp, _H, jnp.zeros(5), _X, _Y, num_iterations=0),
         (), ValueError, "num_iterations must be a positive integer"),
    Case("lp-maxev-prior-key-missing",
         lambda: mm.maximize_evidence(lambda h: _lin_nlp({"sigma": 1.0, "prior_sigma":
                                                          h["prior_precision"] ** -0.5}),
                                      {"prior_precision": 1.0}, jnp.zeros(5), _X, _Y),
         (), ValueError, r"prior_key='prior_sigma' is not a key of hyper "
         r"\(keys \['prior_precision'\]\).*prior_key=None"),
    Case("lp-maxev-noise-key-missing",
         lambda: mm.maximize_evidence(lambda h: _lin_nlp({"sigma": h["noise"], **h}),
                                      {"noise": 1.0, "prior_sigma": 1.0}, jnp.zeros(5),
                                      _X, _Y), (), ValueError,
         r"noise_key='sigma' is not a key of hyper .*\['noise'\]"),
    Case("lp-maxev-none-prior-leaf",
         lambda: mm.maximize_evidence(
             lambda h: mm.negative_log_posterior(
                 dict_linear, _LIK, functools.partial(mm.gaussian_log_prior,
                                                      sigma=h["prior_sigma"])),
             {"prior_sigma": {"w": 1.0, "b": None}}, _P, _XD, _Y), (), ValueError,
         r"^maximize_evidence: .*unpenalized \('b'\)"),
    Case("lp-maxev-flat-prior",
         lambda: mm.maximize_evidence(lambda h: _FLAT, {"sigma": 1.0}, _W, _X, _Y,
                                      prior_key=None, noise_key=None), (), ValueError,
         "maximize_evidence: nlp.log_prior is None"),
    Case("lp-maxev-max-bytes", _maxev(_H, max_bytes=100), (), ValueError,
         r"^maximize_evidence: the dense \(5, 5\).*max_bytes= to maximize_evidence"),
    Case("lp-maxev-int-leaf",
         lambda: mm.maximize_evidence(
             lambda h: mm.negative_log_posterior(lambda p, x: x @ p["w"], _LIK, _INT_PRIOR),
             {"prior_sigma": 1.0}, {"w": _W, "step": jnp.asarray(3)}, _X, _Y,
             prior_key=None), (), TypeError, r"^maximize_evidence: params .*'step'"),
    Case("lp-maxev-traced-nonpositive-flagged",
         lambda s: mm.maximize_evidence(_lin_nlp, {"sigma": 1.0, "prior_sigma": s},
                                        jnp.zeros(5), _X, _Y, num_iterations=2,
                                        fit_steps=1)[2], (jnp.asarray(-1.0),),
         check=lambda info: not np.any(np.asarray(info.valid_update))
         and not bool(info.converged), modes=("jit",)),
    Case("lp-evgrad-max-bytes",
         lambda w: mm.log_evidence_grad(_lin_nlp, _H, w, _X, _Y, max_bytes=100), (_W,),
         ValueError, r"^log_evidence_grad: the dense \(5, 5\).*max_bytes= to log_evidence_grad"),
    Case("lp-evgrad-none-prior-leaf",
         lambda p: mm.log_evidence_grad(
             lambda h: mm.negative_log_posterior(
                 dict_linear, _LIK, functools.partial(mm.gaussian_log_prior,
                                                      sigma=h["prior_sigma"])),
             {"prior_sigma": {"w": 1.0, "b": None}}, p, _XD, _Y), (_P,), ValueError,
         r"^log_evidence_grad: .*unpenalized \('b'\)"),
]
