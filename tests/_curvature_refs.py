"""Independent dense references for the curvature tests (shared by two test files).

Everything here is built from ``jax.hessian`` / ``jax.jacfwd`` / ``jax.grad`` of
the flattened objective and from the likelihood functions called one example at
a time, never from ``mlmap.curvature``.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import mlmap as mm

B, D_IN, HIDDEN = 6, 3, 5
KINDS = ("gaussian", "bernoulli", "categorical")


def mlp_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer{i}": {"w": jax.random.normal(k, (m, n)) / np.sqrt(m),
                        "b": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (n,))}
          for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


SIGMA = jnp.array([0.5, 2.0])
LIKELIHOODS = {
    "gaussian": functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA),
    "bernoulli": mm.bernoulli_log_likelihood,
    "categorical": mm.categorical_log_likelihood,
}
NUM_OUT = {"gaussian": 2, "bernoulli": 2, "categorical": 3}


@functools.lru_cache(maxsize=None)
def problem(kind, scaled):
  """``(nlp, params, inputs, targets)``; ``scaled``: num_data=50 and a Gaussian prior."""
  k = jax.random.split(jax.random.PRNGKey(42), 3)
  params = mlp_init(k[0], (D_IN, HIDDEN, NUM_OUT[kind]))
  x = jax.random.normal(k[1], (B, D_IN))
  if kind == "gaussian":
    y = jax.random.normal(k[2], (B, 2))
  elif kind == "bernoulli":
    y = jax.random.bernoulli(k[2], 0.5, (B, 2)).astype(jnp.float64)
  else:
    y = jax.random.randint(k[2], (B,), 0, 3)
  prior = functools.partial(mm.gaussian_log_prior, sigma=1.5) if scaled else None
  nlp = mm.negative_log_posterior(mlp_apply, LIKELIHOODS[kind], prior,
                                  num_data=50 if scaled else None)
  return nlp, params, x, y


def flat(tree):
  return ravel_pytree(tree)[0]


def _example_nll(nlp, z_i, t_i):
  return -jnp.sum(nlp.log_likelihood(z_i[None], t_i[None]))


def _prior_hessian(nlp, params):
  f, unravel = ravel_pytree(params)
  if nlp.log_prior is None:
    return jnp.zeros((f.size, f.size))
  return jax.hessian(lambda w: -nlp.log_prior(unravel(w)))(f)


def _scale(nlp):
  return 1.0 if nlp.num_data is None else nlp.num_data / B


@functools.lru_cache(maxsize=None)
def references(kind, scaled):
  """Dict of dense ``hessian``, ``ggn``, ``fisher``, ``empirical`` references."""
  nlp, params, x, y = problem(kind, scaled)
  return _references(nlp, params, x, y, kind)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _references(nlp, params, x, y, kind):
  f, unravel = ravel_pytree(params)
  prior_h = _prior_hessian(nlp, params)
  scale = _scale(nlp)
  hessian = jax.hessian(lambda w: nlp(unravel(w), x, y))(f)

  z = nlp.apply_fn(params, x)
  jac = jax.jacfwd(lambda w: nlp.apply_fn(unravel(w), x))(f)  # [B, O, P]
  hz = jax.vmap(jax.hessian(lambda zi, ti: _example_nll(nlp, zi, ti)))(z, y)
  ggn = scale * jnp.einsum("iop,ioq,iqr->pr", jac, hz, jac) + prior_h

  # Per-example gradient of -log p(t | x_i), one example at a time.
  example_grad = jax.vmap(lambda xi, t: jax.grad(lambda w: _example_nll(
      nlp, nlp.apply_fn(unravel(w), xi[None])[0], t))(f))

  if kind == "gaussian":  # E[(t - z)(t - z)^T] / sigma^4 = I / sigma^2
    fisher = jnp.einsum("iop,o,ioq->pq", jac, 1.0 / SIGMA**2, jac)
  else:
    if kind == "categorical":  # enumerate the classes
      outcomes = jnp.arange(z.shape[1])
      probs = jax.nn.softmax(z)  # [B, K]
    else:  # enumerate the joint outcomes of both Bernoulli outputs
      outcomes = jnp.array(list(itertools.product((0.0, 1.0), repeat=z.shape[1])))
      p = jax.nn.sigmoid(z)[:, None, :]
      probs = jnp.prod(jnp.where(outcomes[None] == 1, p, 1 - p), axis=-1)  # [B, 2^O]
    num = outcomes.shape[0]
    xs = jnp.repeat(x, num, axis=0)
    ts = jnp.tile(outcomes, (B,) + (1,) * (outcomes.ndim - 1))
    g = example_grad(xs, ts)
    fisher = jnp.einsum("n,np,nq->pq", probs.reshape(-1), g, g)
  fisher = scale * fisher + prior_h

  grads = example_grad(x, y)
  empirical = scale * grads.T @ grads + prior_h
  return {"hessian": hessian, "ggn": ggn, "fisher": fisher, "empirical": empirical}


def assert_close(actual, expected, rtol=1e-10):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(np.max(np.abs(expected)), 1e-300)
  np.testing.assert_allclose(actual / scale, expected / scale, atol=rtol, rtol=0)


# --- structured outputs: a model returning (mean, extra head) --------------------

def _structured_apply(kind):
  def apply(params, x):
    z = mlp_apply(params, x)
    if kind == "tuple":
      return z[:, :2], z[:, 2]
    return {"mean": z[:, :2], "log_sigma": z[:, 2]}
  return apply


def _structured_log_likelihood(kind):
  def log_lik(outputs, targets):
    mean, log_sigma = outputs if kind == "tuple" else (outputs["mean"], outputs["log_sigma"])
    return mm.gaussian_log_likelihood(mean, targets, sigma=jnp.exp(log_sigma)[:, None])
  return log_lik


def structured_output_fisher(kind):
  """Output Fisher of (2 means sharing one log-sigma): diag(1/s^2, 1/s^2) and 2 * 2."""
  def ofvp(outputs, u):
    if kind == "tuple":
      return u[0] * jnp.exp(-2 * outputs[1])[:, None], 4.0 * u[1]
    return {"mean": u["mean"] * jnp.exp(-2 * outputs["log_sigma"])[:, None],
            "log_sigma": 4.0 * u["log_sigma"]}
  return ofvp


@functools.lru_cache(maxsize=None)
def structured_problem(kind):
  """``(nlp, params, inputs, targets)`` with outputs a tuple or dict of two heads."""
  k = jax.random.split(jax.random.PRNGKey(17), 3)
  params = mlp_init(k[0], (D_IN, HIDDEN, 3))
  x = jax.random.normal(k[1], (B, D_IN))
  y = jax.random.normal(k[2], (B, 2))
  nlp = mm.negative_log_posterior(_structured_apply(kind), _structured_log_likelihood(kind),
                                  functools.partial(mm.gaussian_log_prior, sigma=1.5),
                                  num_data=18)
  return nlp, params, x, y


@functools.lru_cache(maxsize=None)
def structured_references(kind):
  """Dense ``hessian``, ``ggn``, ``fisher``, ``empirical`` from flat outputs ``[B, 3]``."""
  nlp, params, x, y = structured_problem(kind)
  return _structured_references(kind, params, x, y)


@functools.partial(jax.jit, static_argnums=0)
def _structured_references(kind, params, x, y):
  nlp = structured_problem(kind)[0]
  f, unravel = ravel_pytree(params)

  def pack(z):  # flat [b, 3] -> the model's structured outputs
    return (z[:, :2], z[:, 2]) if kind == "tuple" else {"mean": z[:, :2], "log_sigma": z[:, 2]}

  def example_nll(zi, ti):
    return -jnp.sum(nlp.log_likelihood(pack(zi[None]), ti[None]))

  prior_h = jax.hessian(lambda w: -nlp.log_prior(unravel(w)))(f)
  scale = 18 / B
  hessian = jax.hessian(lambda w: nlp(unravel(w), x, y))(f)
  z = mlp_apply(params, x)  # [B, 3] = (mean, log sigma) side by side
  jac = jax.jacfwd(lambda w: mlp_apply(unravel(w), x))(f)
  hz = jax.vmap(jax.hessian(example_nll))(z, y)
  ggn = scale * jnp.einsum("iop,ioq,iqr->pr", jac, hz, jac) + prior_h
  fz = jax.vmap(lambda zi: jnp.diag(jnp.stack(
      [jnp.exp(-2 * zi[2]), jnp.exp(-2 * zi[2]), jnp.asarray(4.0)])))(z)
  fisher = scale * jnp.einsum("iop,ioq,iqr->pr", jac, fz, jac) + prior_h
  grads = jax.vmap(lambda xi, ti: jax.grad(
      lambda w: example_nll(mlp_apply(unravel(w), xi[None])[0], ti))(f))(x, y)
  empirical = scale * grads.T @ grads + prior_h
  return {"hessian": hessian, "ggn": ggn, "fisher": fisher, "empirical": empirical}


# --- model state and non-floating leaves -----------------------------------------

def bn_problem():
  """A flax model with BatchNorm: ``(model, variables, x, y)`` (flax is a dependency)."""
  import flax.linen as nn

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
      return nn.Dense(2)(jnp.tanh(x))

  model = BN()
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 3))
  y = jax.random.normal(jax.random.PRNGKey(6), (4, 2))
  return model, model.init(jax.random.PRNGKey(0), x), x, y


def bn_nlps(model, variables):
  """``{"mutable": (nlp, params), "variables": (nlp, all variables as params)}``."""
  stats = variables["batch_stats"]
  mutable = mm.negative_log_posterior(
      lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"]), mm.gaussian_log_likelihood)
  whole = mm.negative_log_posterior(lambda v, x: model.apply(v, x),
                                    mm.gaussian_log_likelihood)
  return {"mutable": (mutable, variables["params"]), "variables": (whole, dict(variables))}


def with_step_counter(params):
  """``params`` plus an int step counter and a bool mask (not weights)."""
  return {**params, "step": jnp.array(1000), "mask": jnp.ones(3, bool)}


# The dense forms and diagonals under one call shape ``(nlp, params, inputs, targets)``,
# for the tests that run a check over all of them.
DENSE_FORMS = {
    "hessian_matrix": lambda nlp, p, x, y: mm.hessian_matrix(nlp, p, x, y),
    "ggn_matrix": mm.ggn_matrix,
    "fisher_matrix": mm.fisher_matrix,
    "empirical_fisher_matrix": mm.empirical_fisher_matrix,
    "ggn_diagonal": mm.ggn_diagonal,
    "fisher_diagonal": mm.fisher_diagonal,
}
