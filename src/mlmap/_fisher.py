"""Built-in likelihoods recognized by the Fisher products (private).

The Fisher needs the likelihood's output-space Fisher, which no callable reveals;
the four built-ins are recognized (bare or bound with ``functools.partial``) and
get their closed forms and exact samplers. Anything else is ``None`` here, and
the public functions then ask the user instead of guessing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlmap import likelihoods

_KINDS = {
    likelihoods.gaussian_log_likelihood: "gaussian",
    likelihoods.bernoulli_log_likelihood: "bernoulli",
    likelihoods.categorical_log_likelihood: "categorical",
    likelihoods.soft_categorical_log_likelihood: "soft_categorical",
}
_ALLOWED_KEYWORDS = {"gaussian": {"sigma"}}


def builtin_likelihood(log_likelihood):
  """Recognize a built-in likelihood, bare or bound with ``functools.partial``.

  Args:
    log_likelihood: the ``nlp.log_likelihood`` callable.

  Returns:
    ``(kind, keywords)`` with ``kind`` one of ``"gaussian"``, ``"bernoulli"``,
    ``"categorical"``, ``"soft_categorical"``, or ``None`` when the callable is
    not a built-in (or binds arguments other than the Gaussian ``sigma``).
  """
  func, args, keywords = log_likelihood, (), {}
  while isinstance(func, functools.partial):
    args, keywords = func.args + args, {**func.keywords, **keywords}
    func = func.func
  try:
    kind = _KINDS.get(func)
  except TypeError:  # unhashable callable
    return None
  if kind is None or args or set(keywords) - _ALLOWED_KEYWORDS.get(kind, set()):
    return None
  return kind, keywords


def builtin_output_fisher_vp(kind, keywords):
  """Closed-form output-space Fisher product ``F_z u`` of a built-in likelihood."""
  if kind == "gaussian":
    sigma = keywords.get("sigma", 1.0)

    def gaussian(outputs, tangents):
      s = jnp.asarray(sigma, jnp.result_type(tangents))
      try:
        shape = jnp.broadcast_shapes(s.shape, tangents.shape)
      except ValueError:
        shape = None
      if shape != tangents.shape:
        raise ValueError(f"fisher_vp: Gaussian sigma shape {s.shape} does not "
                         f"broadcast to the outputs' shape {tangents.shape}.")
      return tangents / jnp.square(s)
    return gaussian
  # Bernoulli p(1-p), categorical diag(p) - p p^T: the Hessian of the log-partition.
  return functools.partial(_log_partition_hvp, log_partition(kind))


def _log_partition_hvp(log_partition_fn, z, u):
  return jax.jvp(jax.grad(log_partition_fn), (z,), (u,))[1]


def log_partition(kind):
  r"""Summed log-partition :math:`\sum_i A(z_i)` of a canonical-link built-in, or None.

  For the Bernoulli (:math:`A = \mathrm{softplus}`) and categorical
  (:math:`A = \mathrm{logsumexp}`) likelihoods in their natural parameters the
  output Fisher is :math:`\nabla^2 A` (``p(1-p)`` and ``diag(p) - p p^T``).
  Taken as a ``jvp`` of ``grad(A)`` it gives the explicit formulas' numbers, but
  jaxlib 0.10's XLA:CPU compiles the surrounding tangent pass about 2x faster in
  this form (the explicit formula lets a YNNPACK library fusion swallow the
  matmul chain; see ``experiments/bench_curvature.py``).
  """
  if kind == "bernoulli":
    return lambda z: jnp.sum(jax.nn.softplus(z))
  if kind in ("categorical", "soft_categorical"):
    return lambda z: jnp.sum(jax.nn.logsumexp(z, axis=-1))
  return None


def builtin_sampler(kind, keywords):
  """``sample_fn(key, outputs)``: a draw of targets from ``p(t | z)``."""
  if kind == "gaussian":
    sigma = keywords.get("sigma", 1.0)
    return lambda key, z: z + jnp.asarray(sigma, z.dtype) * jax.random.normal(
        key, z.shape, z.dtype)
  if kind == "bernoulli":
    return lambda key, z: jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
  if kind == "categorical":
    return lambda key, z: jax.random.categorical(key, z, axis=-1)
  return lambda key, z: jax.nn.one_hot(
      jax.random.categorical(key, z, axis=-1), z.shape[-1], dtype=z.dtype)
