"""Property tests: likelihoods and priors against scipy on random shapes and values.

hypothesis draws shapes, scales, logits and soft targets in float64; every
example is compared with an independent scipy reference, under ``jax.jit`` (which
is also faster here than op-by-op dispatch on ever-new shapes). ``derandomize=True``
makes the examples the same on every run (reproducible CI).
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import mlmap as mm

_SETTINGS = settings(derandomize=True, deadline=None, max_examples=20, database=None)
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def _floats(lo, hi):
  return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _gaussian_case(draw):
  shape = draw(_SHAPES)
  z = draw(hnp.arrays(np.float64, shape, elements=_floats(-10, 10)))
  t = draw(hnp.arrays(np.float64, shape, elements=_floats(-10, 10)))
  # sigma: a scalar, or an array broadcasting to the outputs (unit or dropped axes).
  kind = draw(st.sampled_from(["scalar", "full", "unit", "trailing"]))
  if kind == "scalar":
    sigma = draw(_floats(1e-2, 1e2))
  else:
    s_shape = {"full": shape, "unit": tuple(d if draw(st.booleans()) else 1 for d in shape),
               "trailing": shape[1:]}[kind]
    sigma = draw(hnp.arrays(np.float64, s_shape, elements=_floats(1e-2, 1e2)))
  return z, t, sigma


@_SETTINGS
@given(_gaussian_case())
def test_gaussian_matches_norm_logpdf_under_jit(case):
  z, t, sigma = case
  got = jax.jit(mm.gaussian_log_likelihood)(z, t, sigma)
  assert got.shape == z.shape
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(t, z, sigma), rtol=1e-10, atol=1e-12)


@_SETTINGS
@given(_SHAPES.flatmap(lambda s: st.tuples(
    hnp.arrays(np.float64, s, elements=_floats(-40, 40)),
    hnp.arrays(np.float64, s, elements=_floats(0, 1)))))
def test_bernoulli_soft_targets_match_log_expit(case):
  s, t = case
  got = jax.jit(mm.bernoulli_log_likelihood)(s, t)
  ref = t * scipy.special.log_expit(s) + (1 - t) * scipy.special.log_expit(-s)
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@st.composite
def _categorical_case(draw):
  batch = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
  k = draw(st.integers(1, 6))
  logits = draw(hnp.arrays(np.float64, batch + (k,), elements=_floats(-30, 30)))
  labels = draw(hnp.arrays(np.int64, batch, elements=st.integers(0, k - 1)))
  return logits, labels


@_SETTINGS
@given(_categorical_case())
def test_categorical_matches_log_softmax_under_jit(case):
  logits, labels = case
  got = jax.jit(mm.categorical_log_likelihood)(logits, labels)
  ref = np.take_along_axis(scipy.special.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@_SETTINGS
@given(_categorical_case(), st.integers(0, 2**31 - 1))
def test_soft_categorical_matches_expected_log_softmax(case, seed):
  logits, _ = case
  # Soft targets: a random distribution per row (some entries exactly zero).
  raw = np.random.default_rng(seed).exponential(size=logits.shape)
  raw[raw < 0.3] = 0.0
  raw[..., 0] += 1e-3
  probs = raw / raw.sum(-1, keepdims=True)
  got = jax.jit(mm.soft_categorical_log_likelihood)(logits, probs)
  ref = np.sum(probs * scipy.special.log_softmax(logits, -1), -1)
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


@st.composite
def _params_case(draw):
  names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4,
                        unique=True))
  params = {n: draw(hnp.arrays(np.float64, draw(hnp.array_shapes(min_dims=0, max_dims=2,
                                                                    max_side=4)),
                               elements=_floats(-5, 5))) for n in names}
  scales = {n: draw(_floats(1e-1, 1e1) | st.none()) for n in names}
  return params, scales


@_SETTINGS
@given(_params_case())
def test_gaussian_prior_matches_norm_logpdf_summed(case):
  params, sigma = case
  got = jax.jit(mm.gaussian_log_prior)(params, sigma)
  ref = sum(scipy.stats.norm.logpdf(w, 0, sigma[n]).sum()
            for n, w in params.items() if sigma[n] is not None)
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


@_SETTINGS
@given(_params_case())
def test_laplace_prior_matches_laplace_logpdf_summed(case):
  params, scale = case
  got = jax.jit(mm.laplace_log_prior)(params, scale)
  ref = sum(scipy.stats.laplace.logpdf(w, 0, scale[n]).sum()
            for n, w in params.items() if scale[n] is not None)
  np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
  # A scalar scale is the same as that scale on every leaf.
  np.testing.assert_allclose(jax.jit(mm.laplace_log_prior)(params, 0.7),
                             sum(scipy.stats.laplace.logpdf(w, 0, 0.7).sum()
                                 for w in params.values()), rtol=1e-10, atol=1e-10)
