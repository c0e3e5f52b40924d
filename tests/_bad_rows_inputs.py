"""Bad-input rows for the inputs: likelihoods, priors and the objective ("in-" rows).

A concrete-value check has two rows: eager raises ``ValueError``; under ``jit``
(the value traced) the entry is NaN (or non-finite), never a plausible number.
Shape, dtype and structure checks raise in both modes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mlmap as mm
from _bad_rows import Case


def _nan_at(*idx):
  """Check: the entries at ``idx`` are NaN and the others finite."""
  def check(out):
    out = np.asarray(out, np.float64)
    bad = np.zeros(out.shape, bool)
    bad[list(idx)] = True
    return bool(np.all(np.isnan(out[bad])) and np.all(np.isfinite(out[~bad])))
  return check


def _all_nan(out):
  return bool(np.all(np.isnan(np.asarray(out, np.float64))))


def _not_finite(out):
  return not bool(np.any(np.isfinite(np.asarray(out, np.float64))))


_Z8, _T8 = jnp.zeros(8), jnp.ones(8)
_LIN = lambda w, x: x @ w  # noqa: E731


def _sigma_head_nlp(w, x, t):
  nlp = mm.negative_log_posterior(
      _LIN, lambda z, t: mm.gaussian_log_likelihood(z, t, jnp.ones((8, 1))))
  return nlp(w, x, t)


def _nlp(num_data=None, apply_fn=_LIN):
  return mm.negative_log_posterior(apply_fn, mm.gaussian_log_likelihood, num_data=num_data)


class _BN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
    return nn.Dense(1)(x)[:, 0]


_BN_MODEL = _BN()
_BN_X = jnp.ones((4, 2))
_BN_VARS = _BN_MODEL.init(jax.random.PRNGKey(0), _BN_X)


def _bn_whole_variables(variables, x, t):
  nlp = mm.negative_log_posterior(lambda v, x: _BN_MODEL.apply(v, x),
                                  mm.gaussian_log_likelihood)
  return nlp(variables, x, t)


def _bn_mutable(params, stats, x, t):
  nlp = mm.negative_log_posterior(
      lambda p, x: _BN_MODEL.apply({"params": p, "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"]), mm.gaussian_log_likelihood)
  return nlp(params, x, t)


_P = {"w": jnp.zeros(2), "step": jnp.array(1000)}

CASES = [
    # --- gaussian_log_likelihood: sigma (item 1), targets, sign ---------------------
    Case("in-gaussian-sigma-enlarges", mm.gaussian_log_likelihood, (_Z8, _T8, jnp.ones((8, 1))),
         raises=ValueError, match=r"sigma shape \(8, 1\).*\(8,\)"),
    Case("in-gaussian-sigma-enlarges-through-nlp", _sigma_head_nlp,
         (jnp.zeros(2), jnp.ones((8, 2)), _T8), raises=ValueError, match=r"\(8, 1\).*\(8,\)"),
    Case("in-gaussian-sigma-does-not-broadcast", mm.gaussian_log_likelihood,
         (_Z8, _T8, jnp.ones(3)), raises=ValueError, match=r"sigma shape \(3,\).*\(8,\)"),
    Case("in-gaussian-sigma-inf", mm.gaussian_log_likelihood, (_Z8, _T8, jnp.inf),
         raises=ValueError, match="sigma must be finite", modes=("eager",)),
    Case("in-gaussian-sigma-inf-traced", mm.gaussian_log_likelihood, (_Z8, _T8, jnp.inf),
         check=_not_finite, modes=("jit",)),
    Case("in-gaussian-sigma-nan", mm.gaussian_log_likelihood, (_Z8, _T8, jnp.nan),
         raises=ValueError, match="sigma must be finite", modes=("eager",)),
    Case("in-gaussian-sigma-nan-traced", mm.gaussian_log_likelihood, (_Z8, _T8, jnp.nan),
         check=_all_nan, modes=("jit",)),
    Case("in-gaussian-sigma-negative", mm.gaussian_log_likelihood,
         (_Z8, _T8, jnp.array([1.0, -2.0] * 4)), raises=ValueError, match="sigma must be > 0",
         modes=("eager",)),
    Case("in-gaussian-sigma-negative-traced", mm.gaussian_log_likelihood,
         (_Z8, _T8, jnp.array([1.0, -2.0] * 4)), check=_nan_at(1, 3, 5, 7), modes=("jit",)),
    Case("in-gaussian-targets-enlarge", mm.gaussian_log_likelihood,
         (jnp.zeros((4, 1)), jnp.zeros(4)), raises=ValueError, match=r"\(4, 1\).*\(4,\)"),
    # --- bernoulli_log_likelihood (item 5) -----------------------------------------
    Case("in-bernoulli-target-outside-unit", mm.bernoulli_log_likelihood,
         (jnp.array([-3.0, 1.0]), jnp.array([-1.0, 1.0])), raises=ValueError,
         match=r"targets must lie in \[0, 1\]", modes=("eager",)),
    Case("in-bernoulli-target-outside-unit-traced", mm.bernoulli_log_likelihood,
         (jnp.array([-3.0, 1.0, 0.0]), jnp.array([-1.0, 1.0, 1.5])), check=_nan_at(0, 2),
         modes=("jit",)),
    Case("in-bernoulli-targets-shape", mm.bernoulli_log_likelihood,
         (jnp.zeros(3), jnp.zeros(5)), raises=ValueError, match=r"\(3,\).*\(5,\)"),
    # --- categorical_log_likelihood (item 2) ---------------------------------------
    Case("in-categorical-negative-label", mm.categorical_log_likelihood,
         (jnp.zeros((3, 4)), jnp.array([-1, 0, 3])), raises=ValueError,
         match=r"labels must lie in \[0, 4\)", modes=("eager",)),
    Case("in-categorical-negative-label-traced", mm.categorical_log_likelihood,
         (jnp.zeros((3, 4)), jnp.array([-1, 0, 3])), check=_nan_at(0), modes=("jit",)),
    Case("in-categorical-label-too-large", mm.categorical_log_likelihood,
         (jnp.zeros((2, 4)), jnp.array([4, 1])), raises=ValueError, match=r"\[0, 4\)",
         modes=("eager",)),
    Case("in-categorical-label-too-large-traced", mm.categorical_log_likelihood,
         (jnp.zeros((2, 4)), jnp.array([4, 1])), check=_nan_at(0), modes=("jit",)),
    Case("in-categorical-float-labels", mm.categorical_log_likelihood,
         (jnp.zeros((3, 2)), jnp.zeros(3)), raises=TypeError,
         match="soft_categorical_log_likelihood"),
    Case("in-categorical-labels-shape", mm.categorical_log_likelihood,
         (jnp.zeros((4, 2)), jnp.zeros(3, jnp.int32)), raises=ValueError,
         match=r"\(4,\).*\(3,\)"),
    Case("in-categorical-no-class-axis", mm.categorical_log_likelihood,
         (jnp.zeros(()), jnp.zeros((), jnp.int32)), raises=ValueError, match="class axis"),
    # --- soft_categorical_log_likelihood (item 5) ----------------------------------
    Case("in-soft-categorical-negative-probs", mm.soft_categorical_log_likelihood,
         (jnp.zeros((2, 2)), jnp.array([[1.5, -0.5], [0.5, 0.5]])), raises=ValueError,
         match="probs must be >= 0", modes=("eager",)),
    Case("in-soft-categorical-negative-probs-traced", mm.soft_categorical_log_likelihood,
         (jnp.zeros((2, 2)), jnp.array([[1.5, -0.5], [0.5, 0.5]])), check=_nan_at(0),
         modes=("jit",)),
    Case("in-soft-categorical-row-sum", mm.soft_categorical_log_likelihood,
         (jnp.zeros((2, 3)), jnp.array([[1.0, 0, 0], [1.0, 2.0, 3.0]])), raises=ValueError,
         match=r"row \(1,\) sums to 6\.0", modes=("eager",)),
    Case("in-soft-categorical-row-sum-traced", mm.soft_categorical_log_likelihood,
         (jnp.zeros((2, 3)), jnp.array([[1.0, 0, 0], [1.0, 2.0, 3.0]])), check=_nan_at(1),
         modes=("jit",)),
    Case("in-soft-categorical-int-probs", mm.soft_categorical_log_likelihood,
         (jnp.zeros((2, 2)), jnp.array([[1, 0], [0, 1]])), raises=TypeError,
         match="probs must be a floating array"),
    # --- priors (item 3) and the weight-decay conversions ---------------------------
    Case("in-gaussian-prior-int-leaf", mm.gaussian_log_prior, (_P,), raises=TypeError,
         match=r"'step' \(int"),
    Case("in-laplace-prior-int-leaf", mm.laplace_log_prior, (_P,), raises=TypeError,
         match=r"'step' \(int"),
    Case("in-prior-bool-leaf-nested-path", lambda p: mm.gaussian_log_prior(p, {"l": 2.0}),
         ({"l": {"w": jnp.zeros(2), "mask": jnp.array([True])}},), raises=TypeError,
         match=r"'l/mask' \(bool\)"),
    Case("in-prior-int-leaf-marked-none",
         lambda p: mm.gaussian_log_prior(p, {"w": 1.0, "step": None}), (_P,),
         check=lambda out: abs(float(out) + np.log(2 * np.pi)) < 1e-12),
    Case("in-prior-not-a-prefix", lambda p: mm.gaussian_log_prior(p, {"b": 1.0}),
         ({"a": jnp.ones(2)},), raises=ValueError, match="not a prefix of params tree"),
    Case("in-prior-sigma-nonpositive", mm.gaussian_log_prior, ({"a": jnp.ones(2)}, -1.0),
         raises=ValueError, match="sigma must be > 0", modes=("eager",)),
    Case("in-prior-sigma-nonpositive-traced", mm.gaussian_log_prior,
         ({"a": jnp.ones(2)}, -1.0), check=_all_nan, modes=("jit",)),
    Case("in-weight-decay-prior-sigma-inf", mm.prior_sigma_to_weight_decay, (jnp.inf,),
         raises=ValueError, match="prior_sigma must be finite", modes=("eager",)),
    Case("in-weight-decay-prior-sigma-inf-traced", mm.prior_sigma_to_weight_decay, (jnp.inf,),
         check=_all_nan, modes=("jit",)),
    Case("in-optax-weight-decay-nan", mm.optax_weight_decay_to_prior_sigma, (jnp.nan, 10),
         raises=ValueError, match="weight_decay must be finite", modes=("eager",)),
    Case("in-optax-weight-decay-nan-traced", mm.optax_weight_decay_to_prior_sigma,
         (jnp.nan, 10), check=_all_nan, modes=("jit",)),
    Case("in-optax-weight-decay-num-data-zero",
         lambda: mm.prior_sigma_to_optax_weight_decay(1.0, 0), raises=ValueError,
         match="num_data must be > 0", modes=("eager",)),
    # --- negative_log_posterior (item 8, model state, construction) -----------------
    Case("in-nlp-num-data-below-batch", lambda w, x, t: _nlp(num_data=3)(w, x, t),
         (jnp.zeros(2), jnp.ones((8, 2)), _T8), raises=ValueError,
         match=r"num_data = 3 is smaller than the batch size B = 8"),
    Case("in-nlp-empty-batch", lambda w, x, t: _nlp(num_data=10)(w, x, t),
         (jnp.zeros(2), jnp.ones((0, 2)), jnp.ones(0)), raises=ValueError,
         match="batch is empty"),
    Case("in-nlp-inputs-no-batch-axis", lambda w, x, t: _nlp()(w, x, t),
         (jnp.zeros(()), jnp.ones(()), jnp.ones(())), raises=ValueError,
         match="leading batch axis"),
    Case("in-nlp-input-leaves-disagree",
         lambda w, x, t: _nlp(apply_fn=lambda w, x: x[0] @ w)(w, x, t),
         (jnp.zeros(2), (jnp.ones((4, 2)), jnp.ones(3)), jnp.ones(4)), raises=ValueError,
         match=r"disagree on the batch size: \[3, 4\]"),
    Case("in-nlp-num-data-not-integer", lambda: _nlp(num_data=2.5), raises=ValueError,
         match="num_data must be an integer >= 1", modes=("eager",)),
    Case("in-nlp-num-data-zero", lambda: _nlp(num_data=0), raises=ValueError,
         match="num_data must be an integer >= 1", modes=("eager",)),
    Case("in-nlp-apply-fn-not-callable",
         lambda: mm.negative_log_posterior("model", mm.gaussian_log_likelihood),
         raises=TypeError, match="must be callable, got str", modes=("eager",)),
    Case("in-nlp-log-prior-not-callable",
         lambda: mm.negative_log_posterior(_LIN, mm.gaussian_log_likelihood, 1.0),
         raises=TypeError, match="log_prior must be callable or None, got float",
         modes=("eager",)),
    Case("in-nlp-flax-batch-stats-in-params", _bn_whole_variables,
         (_BN_VARS, _BN_X, jnp.ones(4)), raises=TypeError,
         match=r"'batch_stats'.*has_state=True"),
    Case("in-nlp-flax-mutable-outputs", _bn_mutable,
         (_BN_VARS["params"], _BN_VARS["batch_stats"], _BN_X, jnp.ones(4)), raises=TypeError,
         match=r"apply_fn returned \(outputs, state\).*'batch_stats'"),
]
