"""The Laplace posterior at a MAP: samples and the linearized (GLM) predictive.

``laplace`` returns the Gaussian ``N(w*, A^{-1})`` of :mod:`mlmap.laplace`'s
expansion as a pytree object, dense for small models or matrix-free (curvature
products and conjugate-gradient solves), with the linearized predictive of
Immer et al. (2021): mean and variance for regression, and the probit
approximation for Bernoulli and categorical outputs (MacKay 1992).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _checks
from mlmap import linalg as _linalg
from mlmap._fisher import builtin_likelihood
from mlmap.laplace import (EvidenceInfo, _newton_decrement, _report, check_curvature,
                           curvature_vp_fn, dense_parts)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("mean", "precision", "scale_tril", "positive_definite",
                                "inputs", "targets"),
                   meta_fields=("nlp", "curvature", "cg_tol"))
@dataclasses.dataclass(frozen=True)
class LaplacePosterior:
  r"""Gaussian posterior ``N(mean, precision^{-1})``; see :func:`laplace`.

  A pytree (``nlp``, ``curvature``, ``cg_tol`` static), so it can be returned
  from and passed through ``jax.jit``. Dense (``precision`` set) or matrix-free
  (``precision`` None: ``A v`` products at ``mean`` on the stored data, and
  conjugate-gradient solves for the GLM moments).

  Attributes:
    mean: the MAP, a pytree.
    precision: dense ``(P, P)`` curvature ``A`` in ``ravel_pytree`` order, or None.
    scale_tril: lower Cholesky factor ``L``, ``A = L L^T`` (the identity when
      ``A`` is not positive definite), or None.
    positive_definite: whether ``A`` is positive definite (matrix-free: CG met
      no negative curvature).
    inputs, targets: the data (matrix-free only, else None).
    nlp: the negative log-posterior the approximation was built from.
    curvature: ``"ggn"`` or ``"hessian"``.
    cg_tol: relative residual of the matrix-free solves.
  """
  mean: Any
  precision: Any
  scale_tril: Any
  positive_definite: Any
  inputs: Any
  targets: Any
  nlp: Any
  curvature: str = "ggn"
  cg_tol: float = 1e-8

  @property
  def num_params(self) -> int:
    return ravel_pytree(self.mean)[0].size

  def _dense_only(self, what):
    if self.precision is None:
      raise ValueError(f"LaplacePosterior.{what} needs the dense precision; build the "
                       "posterior with mm.laplace(..., method='dense').")

  def _solve(self, rows):
    """``A^{-1} r`` for the rows of ``rows`` ``[M, P]``, by vmapped CG."""
    _, unravel = self._unravel()
    matvec = curvature_vp_fn(self.nlp, self.mean, self.inputs, self.targets,
                             self.curvature)
    def flat_mv(v):
      return ravel_pytree(matvec(unravel(v)))[0]
    return jax.vmap(lambda r: _linalg.cg(flat_mv, r, tol=self.cg_tol)[0])(rows)

  def _unravel(self):
    return ravel_pytree(self.mean)

  def covariance(self):
    """Dense posterior covariance ``A^{-1}`` (``O(P^3)``)."""
    self._dense_only("covariance")
    eye = jnp.eye(self.num_params, dtype=self.precision.dtype)
    return jax.scipy.linalg.cho_solve((self.scale_tril, True), eye)

  def precision_vp(self, vector):
    """``A v`` for a pytree ``v`` like the mean."""
    _checks.check_tree_like("LaplacePosterior.precision_vp", "vector", vector, self.mean,
                            ref_name="mean")
    if self.precision is None:
      return curvature_vp_fn(self.nlp, self.mean, self.inputs, self.targets,
                             self.curvature)(vector)
    flat, unravel = self._unravel()
    return unravel(self.precision @ ravel_pytree(vector)[0].astype(flat.dtype))

  def sample(self, key, n: int):
    r"""``n`` posterior samples, a pytree with a leading axis ``n``.

    .. math::
      w = w^* + L^{-\top} z,\quad z \sim \mathcal N(0, I)
      \ \Rightarrow\ \mathrm{Cov}[w] = L^{-\top}L^{-1} = A^{-1}
    """
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"LaplacePosterior.sample: n must be an integer >= 1, got {n!r}.")
    self._dense_only("sample")
    flat, unravel = self._unravel()
    z = jax.random.normal(key, (self.num_params, n), flat.dtype)
    x = jax.scipy.linalg.solve_triangular(self.scale_tril, z, lower=True, trans="T")
    return jax.vmap(unravel)(flat[None, :] + x.T)

  def glm_moments(self, inputs, full_cov=False):
    r"""Mean and variance of the linearized (GLM) network's outputs.

    .. math::
      f_{\mathrm{lin}}(x; w) = f(x; w^*) + J(x)(w - w^*),\quad
      \mathbb E[f] = f(x; w^*),\quad \mathrm{Cov}[f] = J(x) A^{-1} J(x)^\top

    Args:
      inputs: a batch of inputs (leading axis ``B``).
      full_cov: return the ``[B, O, O]`` covariance among each example's
        ``O`` outputs instead of the variances.

    Returns:
      ``(mean, var)``: ``mean`` shaped like ``apply_fn``'s outputs ``[B, ...]``,
      ``var`` the same shape (or ``[B, O, O]``).
    """
    flat, unravel = self._unravel()
    def f(p):
      return self.nlp.apply_fn(unravel(p), inputs)
    out = f(flat)
    num_out = out.size
    jac = (jax.jacrev if num_out < self.num_params else jax.jacfwd)(f)(flat)
    jac = jac.reshape(num_out, self.num_params)
    b = out.shape[0]
    if self.precision is None:  # matrix-free: one CG solve per output entry
      sol = self._solve(jac)
      if not full_cov:
        return out, jnp.sum(jac * sol, axis=1).reshape(out.shape)
      c = (jac @ sol.T).reshape(b, num_out // b, b, num_out // b)
      return out, jnp.einsum("bibj->bij", c)
    v = jax.scipy.linalg.solve_triangular(self.scale_tril, jac.T, lower=True)
    if not full_cov:
      return out, jnp.sum(v * v, axis=0).reshape(out.shape)
    v = v.reshape(self.num_params, b, num_out // b)
    return out, jnp.einsum("pbi,pbj->bij", v, v)

  def predictive(self, inputs, likelihood=None, sigma=None):
    r"""Linearized-Laplace predictive distribution of the targets.

    .. math::
      \text{gaussian:}\quad t \sim \mathcal N\big(f(x; w^*),\ J A^{-1} J^\top + \sigma^2\big)

      \text{bernoulli:}\quad p(t = 1) \approx \mathrm{sigmoid}\Big(
          \frac{\mu}{\sqrt{1 + \pi s^2 / 8}}\Big)

      \text{categorical:}\quad p(k) \approx \mathrm{softmax}_k\Big(
          \frac{\mu_k}{\sqrt{1 + \pi s_k^2 / 8}}\Big)

    with ``mu, s^2`` the GLM moments (:meth:`glm_moments`). The Bernoulli form is
    MacKay's probit approximation; the categorical one its mean-field extension.

    Args:
      inputs: batch of inputs.
      likelihood: ``"gaussian"``, ``"bernoulli"`` or ``"categorical"``; by default
        read off the built-in ``nlp.log_likelihood``.
      sigma: Gaussian noise scale added to the variance; by default the
        ``sigma`` bound in ``nlp.log_likelihood`` (1 when unbound).

    Returns:
      ``(mean, variance)`` for ``"gaussian"``; probabilities ``p(t = 1)``
      ``[B, ...]`` for ``"bernoulli"``; ``[B, ..., K]`` for ``"categorical"``.

    References:
      MacKay, "The evidence framework applied to classification networks",
      Neural Computation 1992.
      Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural nets via
      local linearization", AISTATS 2021, https://arxiv.org/abs/2008.08400.
      Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
      NeurIPS 2021, https://arxiv.org/abs/2106.14806.
    """
    fn = "LaplacePosterior.predictive"
    keywords = {}
    if likelihood is None:
      found = builtin_likelihood(self.nlp.log_likelihood)
      if found is None or found[0] == "soft_categorical":
        raise ValueError(f"{fn}: cannot tell the likelihood of {self.nlp.log_likelihood!r}; "
                         "pass likelihood='gaussian', 'bernoulli' or 'categorical'.")
      likelihood, keywords = found
    if likelihood not in ("gaussian", "bernoulli", "categorical"):
      raise ValueError(f"{fn}: likelihood must be 'gaussian', 'bernoulli' or "
                       f"'categorical', got {likelihood!r}.")
    mean, var = self.glm_moments(inputs)
    if likelihood == "gaussian":
      if sigma is None:
        sigma = keywords.get("sigma", 1.0)
      _checks.check_positive("sigma", sigma, fn)
      return mean, var + jnp.square(jnp.asarray(sigma, var.dtype))
    kappa = jax.lax.rsqrt(1.0 + (math.pi / 8.0) * var)
    if likelihood == "bernoulli":
      return jax.nn.sigmoid(kappa * mean)
    return jax.nn.softmax(kappa * mean, axis=-1)


def laplace(nlp, params, inputs, targets, curvature="ggn", *, method="dense",
            map_tol=1e-2, cg_tol=1e-8):
  r"""Laplace approximation of the posterior at a MAP.

  .. math::
    p(w \mid D) \approx \mathcal N\big(w^*, A^{-1}\big),
    \qquad A = \nabla^2_w\,\mathrm{nlp}(w^*)\ \text{(or the GGN)}

  ``method="dense"`` forms the precision (``P`` curvature products, ``O(P^2)``
  memory, ``O(P^3)`` Cholesky): for models up to a few thousand parameters.
  ``method="matvec"`` keeps only ``A v`` products on the stored data; the GLM
  moments then cost one CG solve per predicted output entry, and ``sample`` /
  ``covariance`` are unavailable. The GGN
  precision is positive definite whenever the prior is proper, even away from a
  MAP; its linearized (GLM) predictive is the consistent one to use with it
  (Immer et al. 2021).

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior` (a scalar
      ``fun(params, inputs, targets)`` with ``apply_fn`` for ``"hessian"``).
    params: the MAP (pytree).
    inputs: full data-set inputs.
    targets: full data-set targets.
    curvature: ``"ggn"`` or ``"hessian"``.
    method: ``"dense"`` or ``"matvec"``.
    map_tol: warn when the Newton decrement exceeds this many nats.
    cg_tol: relative residual of the matrix-free CG solves.

  Returns:
    A :class:`LaplacePosterior` with ``mean``, ``precision``, ``sample(key, n)``,
    ``glm_moments(inputs)`` and ``predictive(inputs)``.

  Raises:
    ValueError: a concrete curvature that is not positive definite.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...                                 functools.partial(mm.gaussian_log_prior, sigma=1.0))
    >>> x, t = jnp.eye(3), jnp.array([1.0, 2.0, 3.0])
    >>> post = mm.laplace(nlp, t / 2, x, t)  # MAP: w = t / (1 + 1)
    >>> post.covariance().diagonal().round(4).tolist()
    [0.5, 0.5, 0.5]

  References:
    MacKay, "A practical Bayesian framework for backpropagation networks",
    Neural Computation 1992.
    Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
    NeurIPS 2021, https://arxiv.org/abs/2106.14806.
  """
  fn = "laplace"
  check_curvature(fn, nlp, curvature)
  if method not in ("dense", "matvec"):
    raise ValueError(f"{fn}: method must be 'dense' or 'matvec', got {method!r}.")
  if not hasattr(nlp, "apply_fn"):
    raise TypeError(f"{fn}: nlp needs an apply_fn (an mlmap.NegativeLogPosterior), "
                    f"got {type(nlp).__name__}.")
  if method == "dense":
    _, a, chol, ok, g = dense_parts(nlp, params, inputs, targets, curvature)
    decrement, data = _newton_decrement(chol, g), (None, None)
  else:
    a = chol = None
    grads = jax.grad(nlp)(params, inputs, targets)
    matvec = curvature_vp_fn(nlp, params, inputs, targets, curvature)
    sol, cg_info = _linalg.cg(matvec, grads, tol=cg_tol)
    ok = ~cg_info.negative_curvature
    g = ravel_pytree(grads)[0]
    decrement, data = 0.5 * jnp.dot(g, ravel_pytree(sol)[0]), (inputs, targets)
  info = EvidenceInfo(None, None, None, ok, jnp.linalg.norm(g),
                      jnp.where(ok, decrement, jnp.inf))
  _report(fn, curvature, ok, info, map_tol, a)
  return LaplacePosterior(mean=params, precision=a, scale_tril=chol, positive_definite=ok,
                          inputs=data[0], targets=data[1], nlp=nlp, curvature=curvature,
                          cg_tol=cg_tol)
