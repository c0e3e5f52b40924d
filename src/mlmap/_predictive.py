r"""Predictive link approximations: from Gaussian output moments to probabilities.

The linearized (GLM) Laplace predictive gives, for each example, a Gaussian
over the network outputs :math:`f \sim \mathcal N(m, S)` (Immer et al. 2021).
For a Gaussian likelihood the predictive is then closed form, ``(m, diag S +
sigma^2)``; for a Bernoulli or categorical likelihood the predictive
probability :math:`\mathbb E[\mathrm{sigmoid}(f)]` /
:math:`\mathbb E[\mathrm{softmax}(f)]` has no closed form and is approximated
here:

* :func:`probit` -- MacKay's (1992) probit approximation, per-output variances.
* :func:`monte_carlo` -- the sample mean over ``f`` drawn from the Gaussian,
  with its standard error.
* :func:`laplace_bridge` -- the Dirichlet of Hobbhahn, Kristiadi & Hennig
  (2022) (categorical only).
* :func:`sample_mixture` -- the ``pred_type="nn"`` predictive: the average over
  network outputs at sampled *weights* (no linearization).

:func:`check_link` validates the ``link_approx`` / ``pred_type`` combination a
posterior's ``predictive(...)`` was called with. All functions are pure and
work under ``jax.jit`` (``num_samples`` and ``batch_size`` static).

References:
  MacKay, "The evidence framework applied to classification networks",
  Neural Computation 1992.
  Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via
  local linearization", AISTATS 2021, https://arxiv.org/abs/2008.08400.
  Hobbhahn, Kristiadi & Hennig, "Fast predictive uncertainty for
  classification with Bayesian deep networks", UAI 2022,
  https://arxiv.org/abs/2003.01227.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from mlmap import _checks


LIKELIHOODS = ("gaussian", "bernoulli", "categorical")
LINK_APPROXES = ("probit", "mc", "bridge")
PRED_TYPES = ("glm", "nn")
DEFAULT_LINK = "probit"

_HI = jax.lax.Precision.HIGHEST


def _float_dtype(*xs):
  return jnp.result_type(*xs, float)


def _check_likelihood(fn, likelihood, allowed):
  if likelihood not in allowed:
    raise ValueError(f"{fn}: likelihood must be one of {allowed}, got {likelihood!r}.")


def _check_int(fn, name, value, minimum):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}.")


def _categorical_cov(fn, mean, cov, name="cov"):
  """``cov`` as ``[..., K, K]`` (full) or ``[..., K]`` (variances): returns (cov, is_full)."""
  m, c = jnp.shape(mean), jnp.shape(cov)
  if len(m) >= 1 and c == m:
    return cov, False
  if len(m) >= 1 and c == m + m[-1:]:
    return cov, True
  raise ValueError(f"{fn}: {name} shape {tuple(c)} must be the mean shape {tuple(m)} "
                   f"(per-class variances) or {tuple(m) + tuple(m[-1:])} (full output "
                   "covariance per example).")


def probit(likelihood, mean, var):
  r"""MacKay's probit approximation of the Bernoulli / categorical predictive.

  .. math::
    \kappa(s^2) = \big(1 + \tfrac{\pi}{8} s^2\big)^{-1/2}, \qquad
    p(t = 1) \approx \mathrm{sigmoid}\big(\kappa(s^2)\, m\big), \qquad
    p(k) \approx \mathrm{softmax}_k\big(\kappa(s_k^2)\, m_k\big)

  The Bernoulli form matches :math:`\int \mathrm{sigmoid}(f)\,\mathcal N(f;
  m, s^2)\,df` by replacing the sigmoid with the probit function of equal
  slope at 0 (MacKay 1992). The categorical form applies the same scaling to
  each logit with its own marginal variance :math:`s_k^2` and ignores the
  correlations between logits (Daxberger et al. 2021 use the same
  "extended MacKay" form). Negative variances (rounding) are read as 0.

  Args:
    likelihood: ``"bernoulli"`` or ``"categorical"``.
    mean: output means, ``[B, ...]`` (Bernoulli logits) or ``[..., K]``.
    var: Bernoulli: variances of the same shape as ``mean``. Categorical:
      per-class variances ``[..., K]``, or a full output covariance ``[..., K,
      K]`` whose diagonal is used.

  Returns:
    ``p(t = 1)`` of ``mean``'s shape (Bernoulli); class probabilities
    ``[..., K]`` summing to 1 (categorical).

  Raises:
    ValueError: another likelihood, or ``var`` of a shape that does not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> float(probit("bernoulli", jnp.array(2.0), jnp.array(8.0 / jnp.pi)).round(6))
    0.80443

  References:
    MacKay, "The evidence framework applied to classification networks",
    Neural Computation 1992.
    Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
    NeurIPS 2021, https://arxiv.org/abs/2106.14806.
  """
  fn = "probit"
  _check_likelihood(fn, likelihood, ("bernoulli", "categorical"))
  dtype = _float_dtype(mean, var)
  mean, var = jnp.asarray(mean, dtype), jnp.asarray(var, dtype)
  if likelihood == "bernoulli":
    if jnp.shape(var) != jnp.shape(mean):
      raise ValueError(f"{fn}: var shape {jnp.shape(var)} must equal the mean shape "
                       f"{jnp.shape(mean)} (Bernoulli outputs are independent).")
  else:
    var, full = _categorical_cov(fn, mean, var, "var")
    if full:
      var = jnp.diagonal(var, axis1=-2, axis2=-1)
  kappa = jax.lax.rsqrt(1.0 + (math.pi / 8.0) * jnp.maximum(var, 0.0))
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(kappa * mean)
  return jax.nn.softmax(kappa * mean, axis=-1)


def _sqrt_factor(cov, full):
  """``R`` with ``R R^T = cov`` (PSD part), via ``eigh``; variances: ``sqrt``."""
  if not full:
    return jnp.sqrt(jnp.maximum(cov, 0.0))
  sym = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
  lam, vec = jnp.linalg.eigh(sym)
  return vec * jnp.sqrt(jnp.maximum(lam, 0.0))[..., None, :]


def _chunk_stats(link, categorical, mean, factor, full, p0, keys, valid):
  """Count, mean and sum of squared deviations of ``link(f) - link(mean)`` in a chunk."""
  def draw(k):
    z = jax.random.normal(k, jnp.shape(mean), mean.dtype)
    if full:
      return jnp.einsum("...ij,...j->...i", factor, z, precision=_HI)
    return factor * z
  z = jax.vmap(draw)(keys)
  # A draw at the mean deviates by exactly 0 (a zero covariance: link(mean),
  # standard error 0), whatever rounding the fused link would add.
  at_mean = (z == 0) if not categorical else jnp.all(z == 0, axis=-1, keepdims=True)
  d = jnp.where(at_mean, 0.0, link(mean + z) - p0)
  w = valid.astype(d.dtype).reshape((-1,) + (1,) * (d.ndim - 1))
  n = jnp.sum(valid).astype(d.dtype)
  m = jnp.sum(w * d, axis=0) / jnp.maximum(n, 1.0)
  m2 = jnp.sum(w * jnp.square(d - m), axis=0)
  return n, m, m2


def monte_carlo(likelihood, key, mean, cov, num_samples, *, batch_size=None):
  r"""Monte Carlo predictive of a Gaussian over the outputs, with its standard error.

  .. math::
    f^{(s)} = m + R\,z^{(s)},\quad z^{(s)} \sim \mathcal N(0, I),\quad R R^\top = S,
    \qquad \hat p = \frac1{N_s}\sum_s \mathrm{link}\big(f^{(s)}\big), \qquad
    \mathrm{se} = \frac{\mathrm{std}_s\big(\mathrm{link}(f^{(s)})\big)}{\sqrt{N_s}}

  with ``link`` = softmax (categorical) or sigmoid (Bernoulli) and ``std``
  the sample standard deviation (``ddof=1``), each entry separately. The
  square root ``R`` is :math:`V \mathrm{diag}(\sqrt{\max(\lambda, 0)})` from
  ``eigh`` of the symmetrized covariance: exact for a PSD covariance, also a
  singular one (no jitter; a zero covariance gives ``link(mean)`` exactly with
  standard error 0), with negative eigenvalues (rounding of an only-PSD
  matrix) clipped to 0. The samples for sample index ``s`` come from
  ``jax.random.split(key, num_samples)[s]``, so the estimate does not depend
  on ``batch_size``. The statistics are accumulated as deviations from
  ``link(mean)`` and merged over chunks with the pairwise (Chan et al.) update,
  which keeps the variance free of the cancellation of
  :math:`E[p^2] - E[p]^2`.

  Args:
    likelihood: ``"bernoulli"`` or ``"categorical"``.
    key: a ``jax.random`` key.
    mean: Bernoulli ``[B, ...]``; categorical ``[..., K]`` logits.
    cov: Bernoulli: variances of ``mean``'s shape. Categorical: the full
      output covariance ``[..., K, K]`` of each example, or per-class
      variances ``[..., K]`` (independent logits).
    num_samples: ``N_s``, a static int >= 2 (a standard error needs 2).
    batch_size: ``None`` draws all samples at once (memory ``N_s`` times
      ``mean``); an int >= 1 draws them ``batch_size`` at a time with
      ``lax.map`` (memory ``batch_size`` times ``mean``).

  Returns:
    ``(probs, stderr)``, both of ``mean``'s shape.

  Raises:
    ValueError: another likelihood, a ``cov`` shape that does not fit, or a
      bad ``num_samples`` / ``batch_size``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> p, se = monte_carlo("categorical", jax.random.PRNGKey(0), jnp.zeros(3),
    ...                     jnp.eye(3), 1000)
    >>> float(p.sum().round(12)), bool((se > 0).all())
    (1.0, True)

  References:
    Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via
    local linearization", AISTATS 2021, https://arxiv.org/abs/2008.08400.
    Chan, Golub & LeVeque, "Algorithms for computing the sample variance:
    analysis and recommendations", The American Statistician 1983.
  """
  fn = "monte_carlo"
  _check_likelihood(fn, likelihood, ("bernoulli", "categorical"))
  _check_int(fn, "num_samples", num_samples, 2)
  if batch_size is not None:
    _check_int(fn, "batch_size", batch_size, 1)
  dtype = _float_dtype(mean, cov)
  mean, cov = jnp.asarray(mean, dtype), jnp.asarray(cov, dtype)
  if likelihood == "bernoulli":
    if jnp.shape(cov) != jnp.shape(mean):
      raise ValueError(f"{fn}: cov shape {jnp.shape(cov)} must equal the mean shape "
                       f"{jnp.shape(mean)} (Bernoulli: per-output variances).")
    full = False
  else:
    cov, full = _categorical_cov(fn, mean, cov)
  size = num_samples if batch_size is None else min(batch_size, num_samples)
  # link(mean) outside the compiled core: a zero covariance returns exactly
  # the caller's jax.nn.softmax(mean) / jax.nn.sigmoid(mean).
  p0 = (jax.nn.softmax(mean, axis=-1) if likelihood == "categorical"
        else jax.nn.sigmoid(mean))
  return _monte_carlo(likelihood, full, num_samples, size, key, mean, cov, p0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _monte_carlo(likelihood, full, num_samples, size, key, mean, cov, p0):
  """:func:`monte_carlo` after its checks, compiled once per static setting."""
  categorical = likelihood == "categorical"
  link = (lambda f: jax.nn.softmax(f, axis=-1)) if categorical else jax.nn.sigmoid
  factor = _sqrt_factor(cov, full)
  chunks = -(-num_samples // size)
  keys = jax.random.split(key, num_samples)
  pad = chunks * size - num_samples
  keys = jnp.concatenate([keys, keys[:pad]]) if pad else keys
  keys = keys.reshape((chunks, size) + keys.shape[1:])
  valid = (jnp.arange(chunks * size) < num_samples).reshape(chunks, size)
  stats = functools.partial(_chunk_stats, link, categorical, mean, factor, full, p0)
  n, m, m2 = jax.lax.map(lambda kv: stats(*kv), (keys, valid))
  m_all = jnp.tensordot(n, m, axes=1) / num_samples
  shape = (-1,) + (1,) * m_all.ndim
  m2_all = jnp.sum(m2, axis=0) + jnp.sum(n.reshape(shape) * jnp.square(m - m_all), axis=0)
  stderr = jnp.sqrt(m2_all / (num_samples - 1) / num_samples)
  return p0 + m_all, stderr


def _zero_sum_correction(mean, cov, full):
  """Condition ``N(mean, cov)`` on ``1^T f = 0``: the corrected mean and diagonal."""
  if full:
    s1 = jnp.sum(cov, axis=-1)                        # Sigma 1
    diag = jnp.diagonal(cov, axis1=-2, axis2=-1)
  else:
    s1, diag = cov, cov
  total = jnp.sum(s1, axis=-1, keepdims=True)        # 1^T Sigma 1
  ok = total > 0
  safe = jnp.where(ok, total, 1.0)
  # 1^T Sigma 1 = 0 means Sigma 1 = 0 (PSD): the sum is deterministic and
  # conditioning is the shift to zero sum, which leaves the covariance alone.
  mu = jnp.where(ok, mean - s1 * jnp.sum(mean, axis=-1, keepdims=True) / safe,
                 mean - jnp.mean(mean, axis=-1, keepdims=True))
  diag = jnp.where(ok, diag - jnp.square(s1) / safe, diag)
  return mu, diag


def laplace_bridge(mean, cov):
  r"""Laplace-bridge Dirichlet over the class probabilities of Gaussian logits.

  Step 1, the correction (Hobbhahn et al. 2022): the bridge maps a Dirichlet
  to a Gaussian whose logits sum to zero, so the Gaussian is first
  conditioned on :math:`\mathbf 1^\top f = 0` (softmax is invariant to adding
  a constant to all logits):

  .. math::
    \mu' = \mu - \frac{\Sigma\mathbf 1\,\mathbf 1^\top\mu}{\mathbf 1^\top\Sigma\mathbf 1},
    \qquad
    \Sigma' = \Sigma - \frac{\Sigma\mathbf 1\,\mathbf 1^\top\Sigma}{\mathbf 1^\top\Sigma\mathbf 1}.

  Step 2, the bridge (MacKay 1998; Hobbhahn et al. 2022), which uses **only
  the diagonal** of :math:`\Sigma'`:

  .. math::
    \alpha_k = \frac{1}{\Sigma'_{kk}}\Big(1 - \frac2K
      + \frac{e^{\mu'_k}}{K^2}\sum_{l=1}^K e^{-\mu'_l}\Big), \qquad
    p(k) = \frac{\alpha_k}{\sum_l \alpha_l}.

  ``alpha`` is computed in log space (``logaddexp`` and ``logsumexp``) and the
  probabilities as ``softmax(log alpha)``, so they stay finite for logits of
  any size even where ``alpha`` itself overflows to ``inf``. Where
  :math:`\mathbf 1^\top\Sigma\mathbf 1 = 0` (then :math:`\Sigma\mathbf 1 = 0`)
  the correction reduces to centering the mean. A corrected variance
  :math:`\Sigma'_{kk}` below ``eps * max_k Sigma_kk`` (``eps`` the dtype's
  machine epsilon; the smallest normal number when the covariance is 0) is
  raised to that floor: rounding noise, or the limit
  :math:`\alpha_k \to \infty`. The bridge is not the softmax-Gaussian integral;
  even as the covariance goes to 0 its mean does not tend to
  ``softmax(mean)`` (the blog and paper discuss its approximation quality).

  Args:
    mean: logits ``[..., K]``, ``K >= 2``.
    cov: the full output covariance ``[..., K, K]``, or per-class variances
      ``[..., K]`` (a diagonal covariance).

  Returns:
    ``(probs, alpha)``, both ``[..., K]``: the Dirichlet's mean and its
    concentration parameters (> 0).

  Raises:
    ValueError: ``K < 2`` or a ``cov`` shape that does not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> probs, alpha = laplace_bridge(jnp.zeros(2), jnp.eye(2))
    >>> probs.tolist(), alpha.tolist()
    ([0.5, 0.5], [1.0, 1.0])

  References:
    Hobbhahn, Kristiadi & Hennig, "Fast predictive uncertainty for
    classification with Bayesian deep networks", UAI 2022,
    https://arxiv.org/abs/2003.01227.
    MacKay, "Choice of basis for Laplace approximation", Machine Learning 1998.
  """
  fn = "laplace_bridge"
  dtype = _float_dtype(mean, cov)
  mean, cov = jnp.asarray(mean, dtype), jnp.asarray(cov, dtype)
  cov, full = _categorical_cov(fn, mean, cov)
  k = jnp.shape(mean)[-1]
  if k < 2:
    raise ValueError(f"{fn}: needs K >= 2 classes, got mean shape {jnp.shape(mean)}.")
  return _laplace_bridge(full, mean, cov)


@functools.partial(jax.jit, static_argnums=0)
def _laplace_bridge(full, mean, cov):
  """:func:`laplace_bridge` after its checks."""
  k = mean.shape[-1]
  mu, diag = _zero_sum_correction(mean, cov, full)
  raw = jnp.diagonal(cov, axis1=-2, axis2=-1) if full else cov
  finfo = jnp.finfo(mean.dtype)
  floor = jnp.maximum(finfo.eps * jnp.max(raw, axis=-1, keepdims=True), finfo.tiny)
  diag = jnp.maximum(diag, floor)
  # log(1 - 2/K + e^{mu_k} sum_l e^{-mu_l} / K^2); 1 - 2/K is 0 for K = 2.
  base = math.log(1.0 - 2.0 / k) if k > 2 else -math.inf
  log_num = jnp.logaddexp(
      base, mu + jax.nn.logsumexp(-mu, axis=-1, keepdims=True) - 2.0 * math.log(k))
  log_alpha = log_num - jnp.log(diag)
  return jax.nn.softmax(log_alpha, axis=-1), jnp.exp(log_alpha)


def sample_mixture(likelihood, outputs, sigma=None):
  r"""Predictive of network outputs at sampled weights (``pred_type="nn"``).

  With :math:`f^{(s)} = f(x; w^{(s)})`, :math:`w^{(s)} \sim q(w)`,
  :math:`s = 1..S`:

  .. math::
    p(k) \approx \frac1S\sum_s \mathrm{softmax}_k\big(f^{(s)}\big), \qquad
    p(t=1) \approx \frac1S\sum_s \mathrm{sigmoid}\big(f^{(s)}\big),

  and for a Gaussian likelihood the moments of the mixture
  :math:`\frac1S\sum_s \mathcal N(f^{(s)}, \sigma^2)` (law of total variance):

  .. math::
    \bar f = \frac1S\sum_s f^{(s)}, \qquad
    \mathrm{Var} = \frac1S\sum_s \big(f^{(s)} - \bar f\big)^2 + \sigma^2 .

  The variance is the mixture's own (``ddof=0``), not the unbiased estimate.
  Sampling the network itself rather than its linearization is inconsistent
  with a GGN posterior and underfits (Immer et al. 2021); the GLM predictive
  is the default for that reason.

  Args:
    likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``.
    outputs: network outputs ``[S, B, ...]`` (categorical: logits last).
    sigma: the Gaussian noise scale (scalar or broadcasting to ``[B, ...]``);
      ``None`` means 1, the default of :func:`mlmap.gaussian_log_likelihood`.
      Must be ``None`` for the other likelihoods.

  Returns:
    Probabilities ``[B, ...]`` (Bernoulli, categorical), or ``(mean, var)``
    (Gaussian).

  Raises:
    ValueError: an unknown likelihood, ``outputs`` without a sample axis, a
      ``sigma`` that is not > 0, or a ``sigma`` with a non-Gaussian likelihood.

  References:
    Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via
    local linearization", AISTATS 2021, https://arxiv.org/abs/2008.08400.
  """
  fn = "sample_mixture"
  _check_likelihood(fn, likelihood, LIKELIHOODS)
  outputs = jnp.asarray(outputs, _float_dtype(outputs))
  if outputs.ndim < 2:
    raise ValueError(f"{fn}: outputs must be [S, B, ...] (a leading sample axis), got "
                     f"shape {outputs.shape}.")
  if likelihood != "gaussian":
    if sigma is not None:
      raise ValueError(f"{fn}: sigma applies to likelihood 'gaussian' only, got "
                       f"sigma={sigma!r} with likelihood {likelihood!r}.")
    link = jax.nn.sigmoid if likelihood == "bernoulli" else (
        lambda f: jax.nn.softmax(f, axis=-1))
    return jnp.mean(link(outputs), axis=0)
  sigma = 1.0 if sigma is None else sigma
  _checks.check_positive("sigma", sigma, fn)
  mean = jnp.mean(outputs, axis=0)
  var = jnp.mean(jnp.square(outputs - mean), axis=0)
  return mean, var + jnp.square(jnp.asarray(sigma, outputs.dtype))


def _check_key(fn, key, why):
  if key is None:
    raise TypeError(f"{fn}: {why} needs key=, a jax.random key; got key=None.")
  dtype, shape = getattr(key, "dtype", None), jnp.shape(key)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if not (typed and shape == ()) and not (dtype == jnp.uint32 and shape == (2,)):
    raise TypeError(f"{fn}: key must be one jax.random key (jax.random.key(0) or "
                    f"jax.random.PRNGKey(0)), got dtype {dtype} shape {tuple(shape)}.")


def check_link(fn, link_approx, pred_type, likelihood, num_samples, key):
  r"""Validate a ``predictive(..., link_approx=, pred_type=)`` call; return the link.

  Valid combinations:

  * ``pred_type="glm"`` (default): the linearized predictive. ``"gaussian"``:
    closed form :math:`(m, \mathrm{diag}\,S + \sigma^2)`, so ``link_approx``
    must be left at its default (``None`` or ``"probit"``). ``"bernoulli"`` /
    ``"categorical"``: ``"probit"`` (:func:`probit`), ``"mc"``
    (:func:`monte_carlo`, needs ``num_samples`` and ``key``) or, categorical
    only, ``"bridge"`` (:func:`laplace_bridge`).
  * ``pred_type="nn"``: network outputs at sampled weights
    (:func:`sample_mixture`, needs ``num_samples`` and ``key``); the link is
    averaged over the samples, so ``link_approx`` must be the default or
    ``"mc"``.

  Args:
    fn: the caller's name, the prefix of the messages.
    link_approx: ``None``, ``"probit"``, ``"mc"`` or ``"bridge"``.
    pred_type: ``"glm"`` or ``"nn"``.
    likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``.
    num_samples: for sampling predictives, a Python int >= 2 (a standard
      error needs 2); otherwise ignored.
    key: for sampling predictives, one ``jax.random`` key (may be traced);
      otherwise ignored.

  Returns:
    The link to use: ``"probit"``, ``"mc"`` or ``"bridge"`` for ``"glm"``
    classification, ``None`` for the Gaussian GLM (closed form), ``"nn"`` for
    ``pred_type="nn"``.

  Raises:
    ValueError: an unknown ``link_approx`` / ``pred_type`` / ``likelihood``, a
      combination not listed above, or a bad ``num_samples``.
    TypeError: a sampling predictive without a (single) key.
  """
  if pred_type not in PRED_TYPES:
    raise ValueError(f"{fn}: pred_type must be one of {PRED_TYPES}, got {pred_type!r}.")
  if link_approx is not None and link_approx not in LINK_APPROXES:
    raise ValueError(f"{fn}: link_approx must be one of {LINK_APPROXES}, got "
                     f"{link_approx!r}.")
  _check_likelihood(fn, likelihood, LIKELIHOODS)
  default = link_approx in (None, DEFAULT_LINK)
  if pred_type == "nn":
    if not (default or link_approx == "mc"):
      raise ValueError(f"{fn}: link_approx={link_approx!r} applies to pred_type='glm'; "
                       "pred_type='nn' averages the link over weight samples.")
    resolved = "nn"
  elif likelihood == "gaussian":
    if not default:
      raise ValueError(f"{fn}: link_approx={link_approx!r} does not apply to likelihood "
                       "'gaussian': its GLM predictive is closed form (mean, var + "
                       "sigma^2); leave link_approx at its default.")
    return None
  else:
    resolved = DEFAULT_LINK if link_approx is None else link_approx
    if resolved == "bridge" and likelihood != "categorical":
      raise ValueError(f"{fn}: link_approx='bridge' needs likelihood 'categorical', got "
                       f"{likelihood!r}.")
  if resolved in ("mc", "nn"):
    why = "pred_type='nn'" if resolved == "nn" else "link_approx='mc'"
    _check_int(fn, "num_samples", num_samples, 2)
    _check_key(fn, key, why)
  return resolved
