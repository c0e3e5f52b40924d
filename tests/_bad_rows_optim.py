"""Bad-input rows for CG, Lanczos and the optimizers (see tests/_bad_rows.py).

Factory arguments (``damping``, ``maxiter``, ...) are closed over, so they stay
concrete under ``jit``; arrays (params, right-hand sides) are the traced args.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

import mlmap as mm
from _bad_rows import Case

_X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)))
_Y = (_X[:, 0] > 0).astype(_X.dtype)
_BATCH = (_X, _Y)
_NAN_BATCH = (_X.at[2, 1].set(jnp.nan), _Y)
_W = jnp.zeros(3)
_NLP = mm.negative_log_posterior(lambda w, x: x @ w, mm.bernoulli_log_likelihood,
                                 functools.partial(mm.gaussian_log_prior, sigma=1.0))
# A prior that forgot its sum: the objective is shape (3,), not a scalar.
_NLP_VEC = mm.negative_log_posterior(lambda w, x: x @ w, mm.bernoulli_log_likelihood,
                                     lambda w: -0.5 * w ** 2)
_F = lambda w, x, t: jnp.sum((x @ w - t) ** 2)  # noqa: E731
_F_VEC = lambda w, x, t: (x @ w - t) ** 2  # noqa: E731
_B = jnp.ones(3)
_TREE = {"a": jnp.ones(3), "b": jnp.ones(2)}
_INT_PARAMS = {"w": jnp.zeros(3), "step": jnp.array(1000)}
_A = jnp.asarray([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])


def _mv(v):
  return v


def _update(tx, params=None, grads=None, batch=_BATCH, objective=_NLP):
  """One ``tx.update`` from ``tx.init`` at ``params`` with the objective's gradient."""
  def run(w):
    g = jax.grad(objective)(w, *batch) if grads is None else grads(w)
    return tx.update(g, tx.init(w), w, batch=batch)
  return run


def _update_at(tx, **extra):
  """``tx.update`` with the given extra args (no batch, no params, ...)."""
  kwargs = {k: v for k, v in extra.items() if k != "params"}

  def run(w):
    params = extra["params"] if "params" in extra else w
    return tx.update(w, tx.init(w), params, **kwargs)
  return run


def _status(code):
  return lambda out: int(out[1].status) == code and not bool(out[1].converged)


def _state_status(code, zero_update=False):
  def check(out):
    ok = int(out[1].cg_status) == code
    if zero_update:
      ok = ok and all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(out[0]))
    return ok
  return check


def _finite_x(check):
  return lambda out: check(out) and bool(jnp.all(jnp.isfinite(out[0])))


_OPTIMIZERS = {
    "newton": lambda **kw: mm.newton(_NLP, **kw),
    "hf": lambda **kw: mm.hessian_free(_NLP, **kw),
    "ng": lambda **kw: mm.natural_gradient(_NLP, **kw),
    "ncg": lambda **kw: mm.nonlinear_cg(_NLP, **kw),
}
_FN = {"newton": "newton", "hf": "hessian_free", "ng": "natural_gradient",
       "ncg": "nonlinear_cg"}


CASES = [
    # --- cg: argument checks ------------------------------------------------------
    Case("opt-cg-maxiter-zero", lambda b: mm.cg(_mv, b, maxiter=0), (_B,),
         ValueError, r"cg: maxiter must be >= 1, got 0"),
    Case("opt-cg-maxiter-float", lambda b: mm.cg(_mv, b, maxiter=2.5), (_B,),
         TypeError, r"maxiter must be a Python int, got 2.5"),
    Case("opt-cg-tol-negative", lambda b: mm.cg(_mv, b, tol=-0.1), (_B,),
         ValueError, r"cg: tol must be >= 0, got -0.1"),
    Case("opt-cg-atol-negative", lambda b: mm.cg(_mv, b, atol=-1.0), (_B,),
         ValueError, r"cg: atol must be >= 0"),
    Case("opt-cg-x0-structure", lambda b: mm.cg(_mv, b, x0={"a": jnp.ones(3)}), (_TREE,),
         ValueError, r"x0 tree structure .* differs from b tree structure"),
    Case("opt-cg-x0-shapes",
         lambda b: mm.cg(_mv, b, x0={"a": jnp.ones(4), "b": jnp.ones(2)}), (_TREE,),
         ValueError, r"x0 leaf shapes \[\(4,\), \(2,\)\] differ from b leaf shapes"),
    Case("opt-cg-b-integer", lambda b: mm.cg(_mv, b), (jnp.arange(3),),
         TypeError, r"cg: b leaves must be real floating arrays"),
    Case("opt-cg-b-empty", lambda: mm.cg(_mv, {}), (),
         ValueError, r"cg: b has no array leaves"),
    Case("opt-cg-matvec-shape", lambda b: mm.cg(lambda v: v[:2], b), (_B,),
         ValueError, r"matvec\(\) output shapes must match b"),
    Case("opt-cg-preconditioner-structure",
         lambda b: mm.cg(_mv, b, preconditioner=lambda r: r["a"]), (_TREE,),
         ValueError, r"preconditioner\(r\) tree structure .* differs from b"),
    # --- cg: data-dependent failures are flagged (item 9) ----------------------------
    Case("opt-cg-nan-matvec-breakdown", lambda b: mm.cg(lambda v: v * jnp.nan, b), (_B,),
         check=_finite_x(_status(mm.CGStatus.BREAKDOWN))),
    Case("opt-cg-inconsistent-singular-flagged",
         lambda b: mm.cg(lambda v: jnp.array([1.0, 0.0]) * v, b), (jnp.ones(2),),
         check=_finite_x(_status(mm.CGStatus.NEGATIVE_CURVATURE))),
    Case("opt-cg-preconditioner-not-pd-breakdown",
         lambda b: mm.cg(lambda v: _A @ v, b, preconditioner=jnp.negative), (_B,),
         check=_finite_x(_status(mm.CGStatus.BREAKDOWN))),
    Case("opt-cg-maxiter-reached-flagged",
         lambda b: mm.cg(lambda v: _A @ v, b, maxiter=1, tol=1e-12), (_B,),
         check=_finite_x(_status(mm.CGStatus.MAX_ITERATIONS))),
    Case("opt-cg-indefinite-flagged",
         lambda b: mm.cg(lambda v: -(_A @ v), b), (_B,),
         check=_finite_x(_status(mm.CGStatus.NEGATIVE_CURVATURE))),
    # --- lanczos ---------------------------------------------------------------------
    Case("opt-lanczos-steps-above-size", lambda v: mm.lanczos(_mv, v, 4), (_B,),
         ValueError, r"num_steps \(4\) must be <= .* P \(3\)"),
    Case("opt-lanczos-steps-zero", lambda v: mm.lanczos(_mv, v, 0), (_B,),
         ValueError, r"num_steps must be >= 1, got 0"),
    Case("opt-lanczos-matvec-shape", lambda v: mm.lanczos(lambda x: x[:2], v, 2), (_B,),
         ValueError, r"matvec\(v\) leaf shapes \[\(2,\)\] differ from v"),
    Case("opt-lanczos-integer-v0", lambda v: mm.lanczos(_mv, v, 2), (jnp.arange(3),),
         TypeError, r"lanczos: v0 leaves must be real floating"),
    # --- newton ------------------------------------------------------------------------
    Case("opt-newton-objective-not-callable", lambda: mm.newton(3.0), (),
         TypeError, r"newton: objective must be callable"),
    Case("opt-newton-damping-factor", lambda: mm.newton(_F, damping_factor=1.0), (),
         ValueError, r"newton: damping_factor must be a number > 1, got 1.0"),
    Case("opt-newton-max-bytes-refused", lambda w: mm.newton(_F, max_bytes=64).init(w), (_W,),
         ValueError, r"^newton: the dense \(3, 3\) float64 .*max_bytes=64.*max_bytes= to newton"),
    Case("opt-newton-max-bytes-invalid", lambda: mm.newton(_F, max_bytes=0), (),
         ValueError, r"newton: max_bytes must be a positive number, got 0"),
    Case("opt-newton-batch-not-pair",
         _update_at(mm.newton(_F), batch=(_X,)), (_W,),
         ValueError, r"newton: batch must be a pair \(inputs, targets\), got tuple of length 1"),
    Case("opt-newton-no-params", _update_at(mm.newton(_F), params=None, batch=_BATCH), (_W,),
         ValueError, r"newton: tx.update needs params"),
    Case("opt-newton-grads-shape",
         _update(mm.newton(_F), grads=lambda w: jnp.zeros(4), objective=_F), (_W,),
         ValueError, r"newton: grads leaf shapes \[\(4,\)\] differ from params leaf shapes"),
    Case("opt-newton-plain-function-non-scalar",
         _update(mm.newton(_F_VEC), grads=jnp.zeros_like, objective=_F_VEC), (_W,),
         ValueError, r"newton: objective must return a scalar.*returned shape \(8,\)"),
    # --- hessian_free ------------------------------------------------------------------
    Case("opt-hf-curvature-name", lambda: mm.hessian_free(_NLP, curvature="fisher"), (),
         ValueError, r"curvature must be one of \('ggn', 'hessian'\), got 'fisher'"),
    Case("opt-hf-preconditioner-name",
         lambda: mm.hessian_free(_NLP, preconditioner="jacobi"), (),
         ValueError, r"preconditioner must be one of \(None, 'diagonal'\), got 'jacobi'"),
    Case("opt-hf-ggn-needs-nlp", lambda: mm.hessian_free(_F), (),
         TypeError, r"hessian_free: .*needs a negative_log_posterior"),
    Case("opt-hf-warm-start-range", lambda: mm.hessian_free(_NLP, warm_start=1.5), (),
         ValueError, r"warm_start must lie in \[0, 1\], got 1.5"),
    Case("opt-hf-tol-negative", lambda: mm.hessian_free(_NLP, tol=-1e-3), (),
         ValueError, r"hessian_free: tol must be >= 0"),
    Case("opt-hf-min-damping-negative", lambda: mm.hessian_free(_NLP, min_damping=-1.0), (),
         ValueError, r"hessian_free: min_damping must be >= 0"),
    Case("opt-hf-maxiter-float", lambda: mm.hessian_free(_NLP, maxiter=2.5), (),
         ValueError, r"hessian_free: maxiter must be an integer >= 1, got 2.5"),
    Case("opt-hf-hessian-plain-non-scalar",
         _update(mm.hessian_free(_F_VEC, curvature="hessian"), grads=jnp.zeros_like,
                 objective=_F_VEC), (_W,),
         ValueError, r"hessian_free: objective must return a scalar.*returned shape \(8,\)"),
    Case("opt-hf-nan-batch-breakdown",
         _update(mm.hessian_free(_NLP), batch=_NAN_BATCH), (_W,),
         check=_state_status(mm.CGStatus.BREAKDOWN, zero_update=True),
         modes=("jit",)),  # a flag is the jit answer; eager: test_optimizers
    Case("opt-hf-truncated-cg-flagged",
         _update(mm.hessian_free(_NLP, maxiter=1, tol=1e-14)), (_W,),
         check=_state_status(mm.CGStatus.MAX_ITERATIONS)),
    # --- natural_gradient ------------------------------------------------------------
    Case("opt-ng-needs-nlp", lambda: mm.natural_gradient(_F), (),
         TypeError, r"natural_gradient needs a negative_log_posterior"),
    Case("opt-ng-solver-name", lambda: mm.natural_gradient(_NLP, solver="lu"), (),
         ValueError, r"solver must be one of \('cg', 'dense'\), got 'lu'"),
    Case("opt-ng-maxiter-zero", lambda: mm.natural_gradient(_NLP, maxiter=0), (),
         ValueError, r"natural_gradient: maxiter must be an integer >= 1, got 0"),
    Case("opt-ng-dense-max-bytes-refused",
         lambda w: mm.natural_gradient(_NLP, solver="dense", max_bytes=71).init(w), (_W,),
         ValueError, r"^natural_gradient: the dense \(3, 3\).*max_bytes=71.*"
                     r"max_bytes= to natural_gradient"),
    Case("opt-ng-nan-batch-breakdown",
         _update(mm.natural_gradient(_NLP), batch=_NAN_BATCH), (_W,),
         check=_state_status(mm.CGStatus.BREAKDOWN, zero_update=True)),
    Case("opt-ng-dense-nan-batch-breakdown",
         _update(mm.natural_gradient(_NLP, solver="dense"), batch=_NAN_BATCH), (_W,),
         check=_state_status(mm.CGStatus.BREAKDOWN, zero_update=True)),
    # --- nonlinear_cg ------------------------------------------------------------------
    Case("opt-ncg-c1-c2", lambda: mm.nonlinear_cg(_NLP, c1=0.5, c2=0.1), (),
         ValueError, r"need 0 < c1 < c2 < 1, got c1=0.5, c2=0.1"),
    Case("opt-ncg-restart-every", lambda: mm.nonlinear_cg(_NLP, restart_every=0), (),
         ValueError, r"nonlinear_cg: restart_every \(or None\) must be an integer >= 1"),
    Case("opt-ncg-linesearch-steps",
         lambda: mm.nonlinear_cg(_NLP, max_linesearch_steps=-1), (),
         ValueError, r"nonlinear_cg: max_linesearch_steps must be an integer >= 1, got -1"),
]

# Checks every optimizer makes, one row each per optimizer.
_FACTORIES = {"newton": mm.newton, "hf": mm.hessian_free, "ng": mm.natural_gradient,
              "ncg": mm.nonlinear_cg}
for _key, _make in _OPTIMIZERS.items():
  _fn = _FN[_key]
  CASES += [
      Case(f"opt-{_key}-missing-batch", _update_at(_make()), (_W,),
           ValueError, rf"{_fn}: the update needs the minibatch.*batch=\(inputs, targets\)"),
      Case(f"opt-{_key}-int-leaf-init", lambda p, m=_make: m().init(p), (_INT_PARAMS,),
           TypeError, rf"^{_fn}: params must have floating leaves only; .*'step' \(int"),
      Case(f"opt-{_key}-int-leaf-update",
           lambda p, m=_make: m().update(p, m().init({"w": p["w"]}), p, batch=_BATCH),
           (_INT_PARAMS,), TypeError, rf"^{_fn}: params .*'step'"),
      Case(f"opt-{_key}-non-scalar-objective",
           _update(_FACTORIES[_key](_NLP_VEC), grads=jnp.zeros_like, objective=_NLP_VEC),
           (_W,), ValueError, rf"^{_fn}: objective must return a scalar.*returned shape \(3,\)"),
  ]
for _key in ("newton", "hf", "ng"):
  CASES += [
      Case(f"opt-{_key}-damping-negative", lambda m=_OPTIMIZERS[_key]: m(damping=-0.1), (),
           ValueError, rf"{_FN[_key]}: damping must be >= 0, got -0.1"),
      Case(f"opt-{_key}-learning-rate-negative",
           lambda m=_OPTIMIZERS[_key]: m(learning_rate=-1.0), (),
           ValueError, rf"{_FN[_key]}: learning_rate must be >= 0 .*-1.0"),
  ]
CASES.append(Case("opt-ncg-objective-not-callable", lambda: mm.nonlinear_cg(None), (),
                  TypeError, r"nonlinear_cg: objective must be callable"))
