"""Exact curvature-vector products: Hessian, GGN, Fisher and empirical Fisher.

Every product is matrix-free (pytree in, pytree out), exact, and a pure function
of its arguments, so it composes with ``jax.jit`` and ``jax.vmap`` (e.g. vmapped
over a batch of vectors). The ``*_vp_fn`` builders linearize the model once and
return a ``matvec`` closure: repeated products (conjugate-gradient iterations,
Lanczos, dense matrices) then pay only for the linear (tangent / transpose)
passes, not for the primal forward pass again.

Notation: ``f(w, X)`` is ``nlp.apply_fn``, ``z_i`` its output for example ``i``,
``J_i = dz_i/dw``, ``l_i = -log p(t_i | z_i)``, ``N/B = nlp.scale(inputs)``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from mlmap import _checks
from mlmap import _fisher
from mlmap import linalg
from mlmap import posterior


def _as_vector(fn, vector, params):
  """Check ``vector`` against ``params`` and cast its leaves to the params' dtypes."""
  _checks.check_tree_like(fn, "vector", vector, params)
  return jax.tree_util.tree_map(
      lambda v, p: jnp.asarray(v, jnp.result_type(p)), vector, params)


def _check_params(fn, params):
  """Non-floating leaves (a step counter, a mask) are not weights: name them."""
  _checks.check_float_leaves(fn, params)


def _check_nlp(fn, nlp):
  if not all(hasattr(nlp, a) for a in ("apply_fn", "log_likelihood", "scale",
                                       "per_example_nll", "prior_term")):
    raise TypeError(f"{fn} needs an mlmap.NegativeLogPosterior (the model and the "
                    f"likelihood apart), got {type(nlp).__name__}; build one with "
                    "mm.negative_log_posterior, or use mm.hvp for the Hessian of "
                    "any scalar function.")


def _linearize_model(fn, nlp, params, inputs):
  """Outputs, ``v -> J v`` and ``u -> J^T u``, with the primal pass run once.

  ``outputs`` may be any pytree (a tuple ``(mean, extra head)``, a dict of
  heads); model state (flax ``batch_stats``, ``mutable=``) is refused, naming
  ``fn``, before anything is differentiated.
  """
  posterior.check_stateless_model(fn, params, None)
  outputs, jvp_fn = jax.linearize(lambda p: nlp.apply_fn(p, inputs), params)
  posterior.check_stateless_model(fn, params, outputs)
  transpose = jax.linear_transpose(jvp_fn, params)
  return outputs, jvp_fn, lambda u: transpose(u)[0]


def _sum_nll(nlp, targets):
  return lambda z: jnp.sum(nlp.per_example_nll(z, targets))


def _prior_hvp_fn(nlp, params):
  """``v -> Hessian(-log p(w)) v``; zero for the flat prior."""
  if nlp.log_prior is None:
    return lambda v: jax.tree_util.tree_map(jnp.zeros_like, v)
  _, lin = jax.linearize(jax.grad(nlp.prior_term), params)
  return lin


def _combine(scale, data, prior):
  if isinstance(scale, float) and scale == 1.0:
    return jax.tree_util.tree_map(jnp.add, data, prior)
  return jax.tree_util.tree_map(
      lambda d, q: jnp.asarray(scale, d.dtype) * d + q, data, prior)


def _output_space_vp_fn(fn, nlp, params, inputs, output_vp):
  """``v -> (N/B) J^T M(outputs) J v + prior Hessian v`` for an output-space ``M``."""
  outputs, jvp_fn, vjp_fn = _linearize_model(fn, nlp, params, inputs)
  m_vp = output_vp(outputs)
  prior = _prior_hvp_fn(nlp, params)
  scale = nlp.scale(inputs)

  def matvec(vector):
    v = _as_vector(fn, vector, params)
    return _combine(scale, vjp_fn(m_vp(jvp_fn(v))), prior(v))
  return matvec


def _hvp_fn(fn, fun, params, *args):
  _check_params(fn, params)
  _, lin = jax.linearize(lambda p: jax.grad(fun)(p, *args), params)

  def matvec(vector):
    return lin(_as_vector(fn, vector, params))
  return matvec


def hvp_fn(fun, params, *args):
  r"""Linearize ``grad(fun)`` at ``params`` once; return ``v -> H v``.

  .. math::
    H v = \frac{\partial^2 \mathrm{fun}(w, \ldots)}{\partial w^2}\Big|_{w=\mathrm{params}} v

  Args:
    fun: scalar ``fun(params, *args)``.
    params: pytree where the Hessian is taken.
    *args: further (non-differentiated) arguments of ``fun``.

  Returns:
    ``matvec(vector) -> pytree`` (same structure as ``params``).

  Raises:
    TypeError: a non-floating leaf in ``params``, named by its path.
    ValueError: (from ``matvec``) ``vector``'s tree or leaf shapes differ from
      ``params``.
  """
  return _hvp_fn("hvp_fn", fun, params, *args)


def hvp(fun, params, vector, *args):
  r"""Hessian-vector product by forward-over-reverse differentiation.

  .. math::
    H v = \frac{d}{d\epsilon}\,\nabla_w \mathrm{fun}(w + \epsilon v, \ldots)\Big|_{\epsilon=0}

  One ``jvp`` of ``grad(fun)``: about twice the cost of a gradient, exact, and
  never forms ``H``. ``fun`` may be any scalar function, e.g. an ``nlp``.

  Args:
    fun: scalar ``fun(params, *args)``.
    params: pytree where the Hessian is taken.
    vector: pytree with the structure and leaf shapes of ``params``.
    *args: further arguments of ``fun`` (e.g. ``inputs, targets``).

  Returns:
    ``H v``, a pytree like ``params``.

  Raises:
    ValueError: ``vector``'s tree or leaf shapes differ from ``params``.
    TypeError: a non-floating leaf in ``params`` (an integer step counter, a
      bool mask), named by its path: it cannot be differentiated.

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", 1994.
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  _check_params("hvp", params)
  v = _as_vector("hvp", vector, params)
  return jax.jvp(lambda p: jax.grad(fun)(p, *args), (params,), (v,))[1]


def _ggn_vp_fn(fn, nlp, params, inputs, targets):
  _check_nlp(fn, nlp)
  _check_params(fn, params)

  def output_hessian(outputs):
    return jax.linearize(jax.grad(_sum_nll(nlp, targets)), outputs)[1]
  return _output_space_vp_fn(fn, nlp, params, inputs, output_hessian)


def ggn_quadratic_forms(nlp, params, inputs, targets, vectors):
  r"""The Gram matrix :math:`[v_i^\top G v_j]_{ij}` of the GGN over a few vectors.

  Private to the package (``mm.kfac``'s adaptive step): one JVP per vector and
  output-space products, no transposed (backward) pass, so it is cheaper than
  ``len(vectors)`` calls of :func:`ggn_vp`. Returns a ``(k, k)`` array.
  """
  _check_nlp("ggn_quadratic_forms", nlp)
  outputs, jvp_fn = jax.linearize(lambda p: nlp.apply_fn(p, inputs), params)
  h_vp = jax.linearize(jax.grad(_sum_nll(nlp, targets)), outputs)[1]
  prior = _prior_hvp_fn(nlp, params)
  scale = nlp.scale(inputs)
  jv = [jvp_fn(v) for v in vectors]
  hjv = [h_vp(u) for u in jv]
  pv = [prior(v) for v in vectors]
  k = len(vectors)
  rows = [[scale * linalg.tree_vdot(jv[i], hjv[j]) + linalg.tree_vdot(vectors[i], pv[j])
           for j in range(k)] for i in range(k)]
  return jnp.stack([jnp.stack(r) for r in rows])


def ggn_vp_fn(nlp, params, inputs, targets):
  """Linearize the model once; return ``v -> G v`` (see :func:`ggn_vp`).

  Checks as :func:`ggn_vp` (``params`` and the model's state when built, the
  vector when ``matvec`` is called).
  """
  return _ggn_vp_fn("ggn_vp_fn", nlp, params, inputs, targets)


def ggn_vp(nlp, params, vector, inputs, targets):
  r"""Generalized Gauss-Newton-vector product of a negative log-posterior.

  .. math::
    G v = \frac{N}{B}\sum_{i=1}^{B} J_i^\top H_{z_i} J_i v
          + \nabla^2_w\big(-\log p(w)\big)\, v,
    \qquad H_{z_i} = \frac{\partial^2 (-\log p(t_i \mid z_i))}{\partial z_i^2}

  The Hessian with the model linearized: it drops the term with the second
  derivative of the network, so it is positive semi-definite whenever ``-log p``
  is convex in the outputs (all built-in likelihoods). Computed with one
  linearization of ``apply_fn`` (``J v``), an output-space Hessian product and
  its transpose (``J^T u``); the primal forward pass runs once.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`.
    params: pytree where the GGN is taken.
    vector: pytree like ``params``.
    inputs: batch of inputs (leading axis ``B``).
    targets: batch of targets.

  Returns:
    ``G v``, a pytree like ``params``.

  ``apply_fn`` may return any pytree (a tuple ``(mean, extra head)``, a dict of
  heads) that ``log_likelihood`` takes; :math:`H_{z_i}` is then the Hessian in
  all of example ``i``'s outputs together.

  Raises:
    ValueError: ``vector``'s tree or leaf shapes differ from ``params``.
    TypeError: ``nlp`` is not a negative log-posterior; a non-floating leaf in
      ``params`` (named by its path); model state (flax ``batch_stats`` in
      ``params`` or a ``mutable=`` result from ``apply_fn``, named by collection).

  Examples:
    A linear model with unit Gaussian noise has :math:`G = X^\top X`:

    >>> import jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood)
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> mm.ggn_vp(nlp, jnp.zeros(2), jnp.array([1.0, 0.0]), x, jnp.zeros(2)).tolist()
    [10.0, 14.0]

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation 2002.
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, https://arxiv.org/abs/1412.1193.
  """
  _checks.check_tree_like("ggn_vp", "vector", vector, params)
  return _ggn_vp_fn("ggn_vp", nlp, params, inputs, targets)(vector)


def _check_key(fn, key):
  """A ``jax.random`` key: a new-style typed key or a legacy ``uint32[2]``."""
  dt = jnp.result_type(key)
  if jnp.issubdtype(dt, jax.dtypes.prng_key):
    return
  if dt != jnp.uint32 or jnp.shape(key)[-1:] != (2,) or jnp.ndim(key) != 1:
    raise TypeError(f"{fn}: key must be a jax.random key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {dt} array of shape "
                    f"{jnp.shape(key)}.")


def _output_fisher(fn, nlp, output_fisher_vp):
  """The output-space Fisher product ``(outputs, u) -> F_z u`` to use."""
  if output_fisher_vp is not None:
    if not callable(output_fisher_vp):
      raise TypeError(f"{fn}: output_fisher_vp must be callable "
                      f"(outputs, tangents) -> F_z tangents, got "
                      f"{type(output_fisher_vp).__name__}.")
    return output_fisher_vp
  found = _fisher.builtin_likelihood(nlp.log_likelihood)
  if found is None:
    raise ValueError(
        f"{fn}: no closed-form Fisher for the log-likelihood {nlp.log_likelihood!r}; "
        "the built-ins (mm.gaussian_log_likelihood, optionally "
        "functools.partial(..., sigma=...), mm.bernoulli_log_likelihood, "
        "mm.categorical_log_likelihood, mm.soft_categorical_log_likelihood) are "
        "recognized. Pass output_fisher_vp=lambda outputs, u: F(outputs) @ u "
        "(the per-example output-space Fisher), use mm.mc_fisher_vp with a "
        "sample_fn(key, outputs) for a Monte-Carlo Fisher, or mm.ggn_vp if your "
        "likelihood is an exponential family in its natural parameters (then "
        "GGN = Fisher).")
  return _fisher.builtin_output_fisher_vp(*found)


def _fisher_vp_fn(fn, nlp, params, inputs, output_fisher_vp):
  _check_nlp(fn, nlp)
  _check_params(fn, params)
  ofvp = _output_fisher(fn, nlp, output_fisher_vp)
  return _output_space_vp_fn(fn, nlp, params, inputs,
                             lambda outputs: functools.partial(ofvp, outputs))


def fisher_vp_fn(nlp, params, inputs, targets, output_fisher_vp=None):
  """Linearize the model once; return ``v -> F v`` (see :func:`fisher_vp`).

  Checks as :func:`fisher_vp`.
  """
  del targets  # the Fisher takes its expectation over the model's predictions
  return _fisher_vp_fn("fisher_vp_fn", nlp, params, inputs, output_fisher_vp)


def fisher_vp(nlp, params, vector, inputs, targets, output_fisher_vp=None):
  r"""Fisher-vector product of the likelihood term, plus the prior Hessian.

  .. math::
    F v = \frac{N}{B}\sum_{i=1}^{B} J_i^\top F_{z_i} J_i v
          + \nabla^2_w\big(-\log p(w)\big)\, v,
    \qquad F_{z} = \mathbb{E}_{t\sim p(t\mid z)}\big[\nabla_z \log p\,
                   \nabla_z \log p^\top\big]

  The expectation is over the model's own predictive distribution, never the
  observed targets (``targets`` is unused but kept for a uniform signature).
  Closed forms are used for the built-ins: Gaussian :math:`F_z = I/\sigma^2`
  (``sigma`` scalar or array, bound with ``functools.partial``), Bernoulli
  :math:`F_z = \mathrm{diag}(p(1-p))`, categorical (and soft categorical)
  :math:`F_z = \mathrm{diag}(p) - p p^\top`. These are canonical links, so
  :math:`F_z = H_z` and the Fisher equals the GGN. For any other likelihood pass
  ``output_fisher_vp`` or use :func:`mc_fisher_vp`; it is never guessed.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`.
    params: pytree where the Fisher is taken.
    vector: pytree like ``params``.
    inputs: batch of inputs.
    targets: batch of targets (unused by the Fisher itself).
    output_fisher_vp: optional ``(outputs, tangents) -> F_z tangents`` for the
      whole batch (``F_z`` block diagonal over examples), overriding the
      built-in closed form.

  Returns:
    ``F v``, a pytree like ``params``.

  Raises:
    ValueError: unrecognized likelihood and no ``output_fisher_vp``; ``vector``
      unlike ``params``.
    TypeError: a non-floating leaf in ``params`` (named by its path); model
      state in ``params`` or ``apply_fn``'s result (named by collection).

  References:
    Amari, "Natural gradient works efficiently in learning", Neural
    Computation 1998.
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, https://arxiv.org/abs/1412.1193.
  """
  _checks.check_tree_like("fisher_vp", "vector", vector, params)
  del targets
  return _fisher_vp_fn("fisher_vp", nlp, params, inputs, output_fisher_vp)(vector)


def _per_example_dot(r, u, batch_axes=1):
  """``s_i = sum over all output leaves of <r_i, u_i>``, shape ``r``'s leading axes."""
  parts = [jnp.sum((a * b).reshape(a.shape[:batch_axes] + (-1,)), axis=-1)
           for a, b in zip(jax.tree_util.tree_leaves(r), jax.tree_util.tree_leaves(u))]
  return functools.reduce(jnp.add, parts)


def _scale_rows(s, r):
  """``s_i * r_i`` for every output leaf of ``r`` (``s`` over ``r``'s leading axes)."""
  return jax.tree_util.tree_map(
      lambda a: s.reshape(s.shape + (1,) * (a.ndim - s.ndim)).astype(a.dtype) * a, r)


def _empirical_fisher_vp_fn(fn, nlp, params, inputs, targets):
  _check_nlp(fn, nlp)
  _check_params(fn, params)

  def output_outer(outputs):
    r = jax.grad(_sum_nll(nlp, targets))(outputs)  # example i: d l_i / d z_i

    def vp(u):
      return _scale_rows(_per_example_dot(r, u), r)  # (g_i^T v) r_i
    return vp
  return _output_space_vp_fn(fn, nlp, params, inputs, output_outer)


def empirical_fisher_vp_fn(nlp, params, inputs, targets):
  """Linearize the model once; return ``v -> F_emp v`` (see :func:`empirical_fisher_vp`).

  Checks as :func:`empirical_fisher_vp`.
  """
  return _empirical_fisher_vp_fn("empirical_fisher_vp_fn", nlp, params, inputs, targets)


def empirical_fisher_vp(nlp, params, vector, inputs, targets):
  r"""Empirical-Fisher-vector product: per-example gradient outer products.

  .. math::
    \tilde F v = \frac{N}{B}\sum_{i=1}^{B} g_i\,(g_i^\top v)
                 + \nabla^2_w\big(-\log p(w)\big)\, v,
    \qquad g_i = \nabla_w\big(-\log p(t_i \mid f(x_i; w))\big) = J_i^\top r_i

  The per-example gradients are never formed: :math:`g_i^\top v = r_i^\top (J v)_i`
  for all ``i`` from one linearized forward pass, then
  :math:`\sum_i s_i g_i = J^\top (s \odot r)` from one transpose, so it costs
  about one GGN product.

  This is *not* the Fisher: it uses the observed targets instead of an
  expectation over the model's predictive distribution. The two agree only for
  a well-specified model with many data, at the optimum. Elsewhere it can be
  badly misscaled and misdirected as curvature (an example fit exactly adds
  nothing, however curved its loss), and preconditioning with it does not give
  the natural gradient (Kunstner et al. 2019).

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`.
    params: pytree.
    vector: pytree like ``params``.
    inputs: batch of inputs.
    targets: batch of targets.

  ``apply_fn`` may return any pytree of outputs, each leaf with its own leading
  batch axis: :math:`r_i` is then example ``i``'s slice of every leaf.

  Returns:
    ``F_emp v``, a pytree like ``params``.

  Raises:
    ValueError: ``vector``'s tree or leaf shapes differ from ``params``.
    TypeError: ``nlp`` is not a negative log-posterior; a non-floating leaf in
      ``params`` (named by its path); model state (named by collection).

  References:
    Kunstner, Balles and Hennig, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019,
    https://arxiv.org/abs/1905.12558.
  """
  _checks.check_tree_like("empirical_fisher_vp", "vector", vector, params)
  return _empirical_fisher_vp_fn("empirical_fisher_vp", nlp, params, inputs,
                                 targets)(vector)


def mc_fisher_vp(nlp, params, vector, inputs, targets, key, num_samples=1,
                 sample_fn=None):
  r"""Monte-Carlo Fisher-vector product: sampled targets, gradient outer products.

  .. math::
    \hat F v = \frac{N}{B}\sum_{i=1}^{B}\frac{1}{S}\sum_{s=1}^{S}
               g_{is}\,(g_{is}^\top v) + \nabla^2_w\big(-\log p(w)\big)\, v,
    \qquad g_{is} = \nabla_w\big(-\log p(\tilde t_{is} \mid z_i)\big),\;
    \tilde t_{is} \sim p(t \mid z_i)

  An unbiased estimate of :func:`fisher_vp` for any likelihood one can sample
  from. The model is linearized once for all ``S`` samples (the samples only
  touch the output space), so the cost is about one GGN product.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior`.
    params: pytree.
    vector: pytree like ``params``.
    inputs: batch of inputs.
    targets: observed targets (unused; the samples replace them).
    key: a ``jax.random`` key.
    num_samples: ``S`` >= 1 target draws per example.
    sample_fn: ``sample_fn(key, outputs) -> targets`` drawing all examples at
      once; defaults to the exact sampler for the built-in likelihoods.

  Returns:
    ``F_hat v``, a pytree like ``params``.

  Raises:
    ValueError: ``num_samples`` < 1, or no ``sample_fn`` for a likelihood that is
      not a built-in; ``vector`` unlike ``params``.
    TypeError: a non-floating leaf in ``params`` (named by its path); ``key``
      not a ``jax.random`` key; model state (named by collection).

  References:
    Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, https://arxiv.org/abs/1412.1193.
    Kunstner, Balles and Hennig, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019,
    https://arxiv.org/abs/1905.12558.
  """
  fn = "mc_fisher_vp"
  _check_nlp(fn, nlp)
  _check_params(fn, params)
  _checks.check_tree_like(fn, "vector", vector, params)
  _check_key(fn, key)
  if (not isinstance(num_samples, numbers.Integral) or isinstance(num_samples, bool)
      or num_samples < 1):
    raise ValueError(f"{fn}: num_samples must be an integer >= 1, got {num_samples!r}.")
  if sample_fn is None:
    found = _fisher.builtin_likelihood(nlp.log_likelihood)
    if found is None:
      raise ValueError(f"{fn}: pass sample_fn(key, outputs) -> targets drawn from "
                       f"p(t | outputs); {nlp.log_likelihood!r} is not a built-in "
                       "likelihood with a known sampler.")
    sample_fn = _fisher.builtin_sampler(*found)
  elif not callable(sample_fn):
    raise TypeError(f"{fn}: sample_fn must be callable, got {type(sample_fn).__name__}.")

  def output_mc(outputs):
    samples = jax.vmap(sample_fn, (0, None))(jax.random.split(key, num_samples),
                                            outputs)
    r = jax.vmap(lambda t: jax.grad(_sum_nll(nlp, t))(outputs))(samples)

    def vp(u):
      u = jax.tree_util.tree_map(lambda a: a[None], u)
      s = _per_example_dot(r, u, batch_axes=2)  # [S, B]
      return jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), _scale_rows(s, r))
    return vp
  return _output_space_vp_fn(fn, nlp, params, inputs, output_mc)(vector)
