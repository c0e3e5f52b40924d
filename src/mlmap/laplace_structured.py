r"""``mm.laplace`` and ``mm.log_evidence`` with structures, subsets and data loaders.

The structured Laplace approximation keeps the data term's GGN ``H`` in a form
that scales with the network, summed over the batches of a data set with the
prior counted once:

* ``"diag"``: the exact GGN (or Fisher) diagonal, or a Hutchinson estimate with
  its standard error;
* ``"kron"``: K-FAC ('expand', exact output factor; :mod:`mlmap.kron`) for every
  dense / convolution layer found in the traced model, the exact diagonal for
  every other leaf;
* ``"lowrank"``: the top-``rank`` eigenpairs of the exact GGN by Lanczos;
* ``"full"``: the dense GGN (with ``subset=`` / ``data=``; the plain call is
  :func:`mlmap.laplace_posterior.laplace`).

References:
  Ritter, Botev & Barber, "A scalable Laplace approximation for neural
  networks", ICLR 2018.
  Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
  NeurIPS 2021, https://arxiv.org/abs/2106.14806.
  Immer et al., "Scalable marginal likelihood estimation for model selection
  in deep learning", ICML 2021, https://arxiv.org/abs/2104.04975.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mlmap import _precisions
from mlmap import data as _data
from mlmap import dense as _dense
from mlmap import kron as _kron
from mlmap import laplace as _laplace
from mlmap import laplace_posterior as _lp
from mlmap import linalg as _linalg
from mlmap import posterior as _posterior
from mlmap import subset as _subset
from mlmap.structured_posterior import StructuredPosterior, gaussian_sigma

STRUCTURES = ("full", "diag", "kron", "lowrank")
DIAG_METHODS = ("exact", "hutchinson")


# --- arguments --------------------------------------------------------------------

def _check_options(fn, structure, curvature, rank, diag_method, num_samples, method):
  if structure not in STRUCTURES:
    raise ValueError(f"{fn}: structure must be one of {STRUCTURES}, got {structure!r}.")
  allowed = ("ggn", "fisher") if structure == "diag" else ("ggn",)
  if curvature not in allowed:
    raise ValueError(
        f"{fn}: structure={structure!r} (or a subset / data loader) supports curvature "
        f"in {allowed}, got {curvature!r}; the Hessian of a network is not positive "
        "semi-definite, so its structured forms have no Gaussian posterior.")
  if structure == "lowrank":
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
      raise ValueError(f"{fn}: structure='lowrank' needs rank=k, an integer >= 1, "
                       f"got rank={rank!r}.")
  elif rank is not None:
    raise ValueError(f"{fn}: rank={rank!r} is for structure='lowrank' only "
                     f"(structure={structure!r}).")
  if diag_method not in DIAG_METHODS:
    raise ValueError(f"{fn}: diag_method must be one of {DIAG_METHODS}, got "
                     f"{diag_method!r}.")
  if diag_method != "exact" and structure != "diag":
    raise ValueError(f"{fn}: diag_method={diag_method!r} is for structure='diag' only.")
  if diag_method == "hutchinson" and (isinstance(num_samples, bool) or not isinstance(
      num_samples, int) or num_samples < 2):
    raise ValueError(f"{fn}: diag_method='hutchinson' needs num_samples, an integer "
                     f">= 2 (a standard error needs two), got {num_samples!r}.")
  if method != "dense":
    raise ValueError(f"{fn}: method={method!r} is for structure='full' without "
                     "subset / data; a matrix-free posterior over a data loader is "
                     "structure='lowrank'.")


def _data_of(fn, nlp, inputs, targets, data):
  """``(nlp, data)``: one batch for ``inputs, targets``, with ``num_data`` set."""
  if data is not None:
    if inputs is not None or targets is not None:
      raise ValueError(f"{fn}: pass either inputs and targets or data=, not both.")
    _data._check_data(fn, data, "many")
    if nlp.num_data is None:
      raise ValueError(f"{fn}: with data= set nlp.num_data to the total number of "
                       "examples in the batches (mm.negative_log_posterior(..., "
                       "num_data=N)).")
    return nlp, data
  if inputs is None:
    raise ValueError(f"{fn}: pass inputs and targets, or data= (an iterable of "
                     "(inputs, targets) batches).")
  if nlp.num_data is None:
    nlp = dataclasses.replace(nlp, num_data=_posterior.batch_size(inputs))
  return nlp, [(inputs, targets)]


# --- the data term in each structure ----------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,))
def _kron_batch(nlp_batch, params, inputs, targets):
  return _kron.kron_factors(nlp_batch, params, inputs, targets)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_batch(nlp_batch, max_bytes, params, inputs, targets):
  return _dense.ggn_matrix(nlp_batch, params, inputs, targets, max_bytes=max_bytes)


def _flat_matvec(nlp_data, sub, data):
  """``v -> H v`` on flat vectors, the data term summed over ``data`` (no prior)."""
  mv = _data.dataset_matvec("ggn", nlp_data, sub, data)
  unravel = ravel_pytree(sub)[1]
  return lambda v: ravel_pytree(mv(unravel(v)))[0]


def _hutchinson(nlp_data, sub, data, key, num_samples):
  """Rademacher estimate of ``diag(H)`` and its standard error (a Python loop of
  data-set products: ``num_samples`` passes over ``data``)."""
  flat = ravel_pytree(sub)[0]
  mv = _flat_matvec(nlp_data, sub, data)
  draws = []
  for k in jax.random.split(key, num_samples):
    z = jax.random.rademacher(k, flat.shape, flat.dtype)
    draws.append(z * mv(z))
  draws = jnp.stack(draws)
  return jnp.mean(draws, 0), jnp.std(draws, 0, ddof=1) / math.sqrt(num_samples)


def _data_term(fn, structure, curvature, nlp_data, sub, data, opts):
  """``(precision, diag_stderr)``: the data term ``H`` of the sub-model."""
  flat = ravel_pytree(sub)[0]
  shapes = _precisions.leaf_shapes(sub)
  n = nlp_data.num_data
  batch_nlp = dataclasses.replace(nlp_data, num_data=None)
  if structure == "diag" and opts["diag_method"] == "hutchinson":
    key = jax.random.PRNGKey(0) if opts["key"] is None else opts["key"]
    d, se = _hutchinson(nlp_data, sub, data, key, opts["num_samples"])
    return _precisions.DiagPrecision(d, shapes), se
  if structure == "diag":
    d = _data.dataset_diagonal(curvature, nlp_data, sub, data)
    return _precisions.DiagPrecision(ravel_pytree(d)[0], shapes), None
  if structure == "kron":
    factors = _data.accumulate(functools.partial(_kron_batch, batch_nlp), data,
                               args=(sub,), num_data=n, fn=fn)
    return _kron_precision_jit(factors, sub), None
  if structure == "lowrank":
    rank = opts["rank"]
    if rank > flat.size:
      raise ValueError(f"{fn}: rank={rank} exceeds the number of covered parameters "
                       f"P = {flat.size}.")
    return _precisions.lowrank_precision(_flat_matvec(nlp_data, sub, data), flat.size,
                                         rank, flat.dtype, key=opts["key"],
                                         params_like=sub), None
  max_bytes = opts["max_bytes"]
  _dense.check_dense_bytes(fn, flat.size, flat.dtype, max_bytes)
  h = _data.accumulate(functools.partial(_dense_batch, batch_nlp, max_bytes), data,
                       args=(sub,), num_data=n, fn=fn)
  return _precisions.DensePrecision(h, shapes), None


# --- the posterior ----------------------------------------------------------------

# Compiled as whole programs: op by op, a cold kron build of a 3-layer MLP made
# 191 small compilations (8 s on 2 CPU cores); these three make a handful.
_kron_precision_jit = jax.jit(_precisions.kron_precision)


@functools.partial(jax.jit, static_argnums=(0,))
def _prior_value(nlp, params):
  return nlp.prior_term(params)


@jax.jit
def _decrement(precision, leaf_prec, g):
  """``(g^T Lambda^{-1} g / 2, log det and decrement finite)``; the traced prior
  precisions pick kron's branch by ``lax.cond`` (``_kron_precision._layer_spectrum``)."""
  decrement = 0.5 * jnp.dot(g, _precisions.solve(precision, leaf_prec, g))
  ok = jnp.isfinite(_precisions.logdet(precision, leaf_prec)) & jnp.isfinite(decrement)
  return decrement, ok


def structured_laplace(fn, nlp, params, inputs, targets, curvature, structure, subset,
                       data, opts):
  """Build a :class:`StructuredPosterior` (the checks are the caller's)."""
  _laplace.check_params(fn, params)
  nlp, data = _data_of(fn, nlp, inputs, targets, data)
  sigma = gaussian_sigma(fn, nlp, _laplace._builtin_prior)
  sel = _subset.make_subset(fn, params, subset)
  sub_nlp = nlp if sel is None else _subset.sub_nlp(nlp, sel, params)
  sub = params if sel is None else sel.split(params)
  _laplace.check_proper_prior(fn, sub_nlp, sub)
  value, grad = _data.dataset_value_and_grad(sub_nlp, sub, data)
  nll = value - _prior_value(sub_nlp, sub)
  precision, stderr = _data_term(fn, structure, curvature,
                                 dataclasses.replace(sub_nlp, log_prior=None), sub,
                                 data, opts)
  post = StructuredPosterior(
      mean=params, precision=precision, prior_sigma=sigma, nll=nll, grad_norm=None,
      newton_decrement=None, diag_stderr=stderr, optimize_info=None, nlp=nlp,
      sub_nlp=sub_nlp, subset=sel, structure=structure, curvature=curvature)
  g = ravel_pytree(grad)[0]
  leaf_prec = post._leaf_prec(fn)
  decrement, ok = _decrement(precision, leaf_prec, g)
  info = _laplace.EvidenceInfo(None, None, None, ok, jnp.linalg.norm(g), decrement,
                               jnp.asarray(_linalg.CGStatus.CONVERGED, jnp.int32))
  _laplace._report(fn, curvature, ok, info, opts["map_tol"])
  return dataclasses.replace(post, grad_norm=info.grad_norm, newton_decrement=decrement)


def _is_plain(structure, subset, data):
  return structure == "full" and subset is None and data is None


def laplace(nlp, params, inputs=None, targets=None, curvature="ggn", *, structure="full",
            subset=None, data=None, rank=None, diag_method="exact", num_samples=None,
            key=None, method="dense", map_tol=1e-2, cg_tol=1e-8, cg_maxiter=None,
            cg_preconditioner="ggn_diagonal", max_bytes=_dense.DEFAULT_MAX_BYTES):
  r"""Laplace approximation of the posterior at a MAP, in a structure that scales.

  .. math::
    p(w \mid D) \approx \mathcal N\big(w^*, \Lambda^{-1}\big), \qquad
    \Lambda = H + \mathrm{diag}(\sigma_0^{-2}),\quad
    H \approx \sum_{b}\sum_{i \in b} J_i^\top \Lambda_{z_i} J_i

  ``structure="full"`` without ``subset`` / ``data`` is the exact dense or
  matrix-free posterior (:func:`mlmap.laplace_posterior.laplace`, a
  :class:`LaplacePosterior`; ``method`` and the ``cg_*`` arguments are its).
  Every other call returns a :class:`mlmap.StructuredPosterior` whose ``H`` is

  * ``"full"``: the dense GGN (``O(P^2)`` memory; refused above ``max_bytes``);
  * ``"diag"``: the exact GGN (``curvature="ggn"``) or Fisher diagonal (``B*O``
    one-example backward passes), or with ``diag_method="hutchinson"`` the
    Rademacher estimate :math:`\frac1S\sum_s z_s \odot H z_s` of ``num_samples``
    data-set GGN products, its standard error in ``post.diag_stderr``;
  * ``"kron"``: per dense / convolution layer found in the traced model (flax
    ``nn.Dense`` / ``nn.Conv``, ``nnx.Linear`` / ``nnx.Conv``, dict MLPs; no
    registration), :math:`A_l \otimes G_l` with its bias folded in, the
    'expand' K-FAC of Eschenhagen et al. (2023) with the exact output factor;
    every other leaf its exact GGN diagonal (``post.structure_of()`` says which);
  * ``"lowrank"``: :math:`U \mathrm{diag}(\lambda) U^\top`, the top-``rank``
    eigenpairs of the exact GGN by Lanczos with full reorthogonalization
    (``min(P, max(2 rank, rank + 10))`` data-set products).

  ``data``: an iterable of ``(inputs, targets)`` batches (or a function
  returning one) in place of ``inputs, targets``; ``nlp.num_data`` must equal
  their total size. Each batch's data term counts once (scale 1) and the prior
  once, so batches that partition the data give the one-batch result.

  ``subset``: a pytree prefix of ``params`` with bool leaves (or bool arrays
  shaped like their leaf); only the ``True`` parameters are covered, the others
  stay at ``params`` and their prior is not part of the evidence
  (:func:`mlmap.last_layer_subset` selects the last layer).

  Structured posteriors need a Gaussian prior
  (``functools.partial(mm.gaussian_log_prior, sigma=...)``): they keep ``H`` apart
  from its precision, so ``post.log_evidence(prior_sigma=...)`` and
  ``post.optimize_prior()`` cost ``O(P)`` per evaluation.

  Args:
    nlp: an :class:`mlmap.NegativeLogPosterior` (a normalized negative log joint).
    params: the MAP (pytree of floating arrays).
    inputs, targets: the full data set (or ``data=``).
    curvature: ``"ggn"`` (``"hessian"`` for the plain full posterior;
      ``"fisher"`` for ``"diag"``).
    structure: ``"full"``, ``"diag"``, ``"kron"`` or ``"lowrank"``.
    subset: the covered parameters (see above), or None for all.
    data: batches, instead of ``inputs, targets``.
    rank: ``"lowrank"``'s number of eigenpairs ``k`` (1 <= k <= P).
    diag_method: ``"exact"`` or ``"hutchinson"`` (``"diag"`` only).
    num_samples: Hutchinson probes (>= 2).
    key: PRNG key of the Hutchinson probes / the Lanczos start vector.
    method, cg_tol, cg_maxiter, cg_preconditioner: of the plain full posterior.
    map_tol: warn when the Newton decrement ``g^T Lambda^{-1} g / 2`` (with the
      structured ``Lambda``) exceeds this many nats.
    max_bytes: refuse a dense ``(P, P)`` matrix above this many bytes.

  Returns:
    A :class:`LaplacePosterior` (plain full) or :class:`StructuredPosterior`.
    Both have ``mean``, ``sample(key, n)``, ``glm_moments(x)``,
    ``predictive(x, link_approx=..., pred_type=...)``,
    ``log_evidence(prior_sigma=...)`` and ``optimize_prior()``.

  Raises:
    ValueError: an unknown ``structure`` / ``curvature`` / ``diag_method``, a bad
      ``rank``, both ``data`` and ``inputs``, batches that do not sum to
      ``nlp.num_data``, a non-Gaussian or improper prior for a structure, a bad
      ``subset`` (see :func:`mlmap.subset.make_subset`), a dense matrix above
      ``max_bytes``.
    TypeError: non-floating ``params`` leaves, a one-shot iterator as ``data``.

  Examples:
    >>> import functools, jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...                                 functools.partial(mm.gaussian_log_prior, sigma=1.0))
    >>> x, t = jnp.eye(3), jnp.array([1.0, 2.0, 3.0])
    >>> post = mm.laplace(nlp, t / 2, x, t, structure="diag")
    >>> post.precision.diag.tolist()  # the data term; the prior adds 1 / sigma^2
    [1.0, 1.0, 1.0]
    >>> round(float(post.optimize_prior().prior_sigma), 4)  # argmax of the evidence
    1.3457

  References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015, https://arxiv.org/abs/1503.05671.
    Ritter, Botev & Barber, "A scalable Laplace approximation for neural
    networks", ICLR 2018.
    Daxberger et al., "Laplace Redux -- effortless Bayesian deep learning",
    NeurIPS 2021, https://arxiv.org/abs/2106.14806.
    Eschenhagen et al., "Kronecker-factored approximate curvature for modern
    neural network architectures", NeurIPS 2023, https://arxiv.org/abs/2311.00636.
  """
  fn = "laplace"
  if _is_plain(structure, subset, data):
    if rank is not None or diag_method != "exact":
      _check_options(fn, structure, curvature, rank, diag_method, num_samples, method)
    return _lp.laplace(nlp, params, inputs, targets, curvature, method=method,
                       map_tol=map_tol, cg_tol=cg_tol, cg_maxiter=cg_maxiter,
                       cg_preconditioner=cg_preconditioner, max_bytes=max_bytes)
  _check_options(fn, structure, curvature, rank, diag_method, num_samples, method)
  opts = dict(rank=rank, diag_method=diag_method, num_samples=num_samples, key=key,
              map_tol=map_tol, max_bytes=max_bytes)
  return structured_laplace(fn, nlp, params, inputs, targets, curvature, structure,
                            subset, data, opts)


def log_evidence(nlp, params, inputs=None, targets=None, curvature="ggn", *,
                 structure="full", subset=None, data=None, rank=None,
                 diag_method="exact", num_samples=None, method="dense", key=None,
                 num_probes=16, num_steps=30, map_tol=1e-2, return_info=False,
                 max_bytes=_dense.DEFAULT_MAX_BYTES):
  r"""Laplace log marginal likelihood at a MAP, exact or in a structure.

  .. math::
    \log p(D) \approx -\mathrm{nlp}(w^*) + \frac{P}{2}\log 2\pi
                      - \frac12 \log\det \Lambda

  ``structure="full"`` without ``subset`` / ``data`` is the exact dense or SLQ
  evidence (:func:`mlmap.laplace.log_evidence`: ``method``, ``key``,
  ``num_probes``, ``num_steps``, ``return_info`` are its). Otherwise this is
  ``mm.laplace(..., structure=..., subset=..., data=...).log_evidence()``: ``P``
  counts the covered parameters only and ``Lambda`` is the structured precision
  (see :func:`laplace`); with a subset the prior of the fixed parameters is not
  part of it.

  Args:
    nlp, params, inputs, targets, curvature: as in :func:`laplace`.
    structure, subset, data, rank, diag_method, num_samples: as in :func:`laplace`.
    method, key, num_probes, num_steps, return_info: of the plain full evidence.
    map_tol: warn when the Newton decrement exceeds this many nats.
    max_bytes: refuse a dense ``(P, P)`` matrix above this many bytes.

  Returns:
    The scalar log evidence (or ``(value, EvidenceInfo)`` for the plain call
    with ``return_info=True``).

  Examples:
    >>> import functools, jax.numpy as jnp, mlmap as mm
    >>> nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood,
    ...                                 functools.partial(mm.gaussian_log_prior, sigma=1.0))
    >>> x, t = jnp.eye(3), jnp.array([1.0, 2.0, 3.0])
    >>> a = mm.log_evidence(nlp, t / 2, x, t)
    >>> b = mm.log_evidence(nlp, t / 2, x, t, structure="diag")  # diagonal GGN: exact here
    >>> bool(jnp.allclose(a, b))
    True
  """
  fn = "log_evidence"
  if _is_plain(structure, subset, data):
    if rank is not None or diag_method != "exact":
      _check_options(fn, structure, curvature, rank, diag_method, num_samples, "dense")
    return _laplace.log_evidence(nlp, params, inputs, targets, curvature, method=method,
                                 key=key, num_probes=num_probes, num_steps=num_steps,
                                 map_tol=map_tol, return_info=return_info,
                                 max_bytes=max_bytes)
  _check_options(fn, structure, curvature, rank, diag_method, num_samples, method)
  if return_info:
    raise ValueError(f"{fn}: return_info is for the plain structure='full' evidence; "
                     "a structured posterior's fields (mm.laplace(...)) hold its parts.")
  opts = dict(rank=rank, diag_method=diag_method, num_samples=num_samples, key=key,
              map_tol=map_tol, max_bytes=max_bytes)
  post = structured_laplace(fn, nlp, params, inputs, targets, curvature, structure,
                            subset, data, opts)
  return post.log_evidence()
