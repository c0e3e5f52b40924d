r"""Online evidence maximization: weights and hyperparameters in one training run.

:func:`fit_evidence` trains the weights with any optax optimizer on minibatches
(as :func:`mlmap.fit`) and, after ``burn_in`` epochs and then every ``every``
epochs, builds the structured Laplace posterior at the current weights
(:func:`mlmap.laplace`, ``structure="kron"|"diag"|"lowrank"``, over the whole
training set in batches) and takes ``hyper_steps`` optimizer steps (Adam by default) on the log
evidence

.. math::
  \log p(D \mid \sigma_0, \sigma) \approx \log p(D \mid w, \sigma)
    + \log p(w \mid \sigma_0) + \frac P2 \log 2\pi
    - \frac12 \log\det\big(H(\sigma) + \mathrm{diag}(\sigma_0^{-2})\big)

in the logs of the prior scales :math:`\sigma_0` (one per group of the prefix
tree ``hyper[prior_key]``: per layer, per leaf or one) and of the Gaussian noise
:math:`\sigma`, at the fixed weights. Each step is ``O(P)``: the structure's
eigenvalues are kept, and the Gaussian curvature scales as :math:`1/\sigma^2`
(:mod:`mlmap._evidence_terms`). This is the online marginal-likelihood
training of Immer et al. (2021), laplace-torch's ``marglik_training``.

The hyperparameters enter the train step as traced arguments, so a run
compiles its step and its curvature pass once, whatever the hyperparameters do.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlmap import _evidence_terms as _terms
from mlmap import laplace_structured as _ls
from mlmap import _fit
from mlmap import _step
from mlmap._checkpoint import save_checkpoint

_FN = "fit_evidence"
CHECKPOINT_NAME = "fit_evidence.ckpt"


class FitEvidenceResult(NamedTuple):
  """Result of :func:`fit_evidence`.

  Attributes:
    params: the final weights.
    opt_state: the weights' final optimizer state.
    hyper: the final hyperparameters (same structure as given).
    step: weight steps taken in total (including before a resume).
    history: :func:`mlmap.fit`'s per-step lists (``step``, ``epoch``, ``loss``,
      ``grad_norm``, ``skipped``) and, per hyperparameter update,
      ``hyper_epoch`` (epochs done), ``log_evidence_before`` / ``log_evidence``
      (at the fixed weights, before and after the ``hyper_steps`` steps) and
      ``hyper`` (the values after it, as numpy).
    posterior: the structured posterior at the final weights and hyperparameters.
  """
  params: Any
  opt_state: Any
  hyper: dict
  step: int
  history: dict
  posterior: Any


def _train_step(make_nlp, tx):
  """``step(hyper, params, opt_state, batch)``: :func:`mlmap.make_train_step`'s step
  with the objective ``make_nlp(hyper)`` (``hyper`` traced: one compilation)."""
  def step(hyper, params, opt_state, batch):
    nlp = make_nlp(hyper)
    t = tx if isinstance(tx, optax.GradientTransformation) else tx(nlp)
    return _step.make_train_step(nlp, t, jit=False)(params, opt_state, batch)
  return jax.jit(step)


def _curvature_batches(data, n, size):
  """Every example once, in order, ``size`` at a time (the last batch may be smaller)."""
  return [jax.tree_util.tree_map(lambda a: a[i:i + size], data) for i in range(0, n, size)]


def _check(make_nlp, hyper, tx, n, opts):
  """The nlp at ``hyper``, after refusing what would give a wrong answer."""
  if not isinstance(hyper, dict):
    raise TypeError(f"{_FN}: hyper must be a dict, got {type(hyper).__name__}.")
  for name in ("prior_key", "noise_key"):
    k = opts[name]
    if k is not None and k not in hyper:
      raise ValueError(f"{_FN}: {name}={k!r} is not a key of hyper ({sorted(hyper)}).")
  if opts["prior_key"] is None:
    raise ValueError(f"{_FN}: prior_key=None: the evidence is ascended in the Gaussian "
                     "prior scales hyper[prior_key]; name that key.")
  noise = opts["noise_key"]
  if noise is not None and np.ndim(hyper[noise]) != 0:
    raise ValueError(f"{_FN}: hyper[{noise!r}] has shape {np.shape(hyper[noise])}; the "
                     "Gaussian noise scale must be one scalar (the curvature is moved "
                     "to a new noise as 1/sigma^2 times the data term).")
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      {k: hyper[k] for k in (opts["prior_key"], opts["noise_key"]) if k is not None})[0]:
    v = np.asarray(leaf)
    if v.size == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
      raise ValueError(f"{_FN}: hyper{jax.tree_util.keystr(path)} = {v!r}; the "
                       "hyperparameters must be finite and > 0.")
  if not (isinstance(tx, optax.GradientTransformation) or callable(tx)):
    raise TypeError(f"{_FN}: tx must be an optax.GradientTransformation or a callable "
                    f"nlp -> transformation, got {type(tx).__name__}.")
  for name, low in (("epochs", 0), ("burn_in", 0), ("every", 1), ("hyper_steps", 1)):
    _fit._check_int(_FN, name, opts[name], low, optional=False)
  nlp = make_nlp(hyper)
  if getattr(nlp, "num_data", None) != n:
    raise ValueError(f"{_FN}: make_nlp(hyper).num_data must be the number of training "
                     f"examples {n} (minibatches are scaled by num_data / B), got "
                     f"{getattr(nlp, 'num_data', None)!r}.")
  return nlp


def _update_hyper(run, params, hyper, hyper_state):
  """One hyperparameter update at ``params``: ``(hyper, hyper_state, (before, after))``."""
  o = run["opts"]
  post = _ls.laplace(run["nlp_ref"], params, data=run["curv_data"], map_tol=None,
                     **run["laplace_kw"])
  noise_key = o["noise_key"]
  ref_noise = None if noise_key is None else run["hyper0"][noise_key]
  terms = _terms.hyper_terms(_FN, post, run["curv_data"], ref_noise,
                             run["nlp_ref"].apply_fn, params)
  theta = _terms.log_hyper(hyper, o["prior_key"], noise_key)
  theta, hyper_state, values = _terms.ascend(
      o["prior_key"], noise_key, o["hyper_steps"], o["hyper_tx"], terms, theta,
      hyper_state)
  return _terms.from_log(theta, hyper), hyper_state, values


def _record_hyper(history, epoch, hyper, values, keys):
  history["hyper_epoch"].append(epoch)
  history["log_evidence_before"].append(float(values[0]))
  history["log_evidence"].append(float(values[1]))
  history["hyper"].append({k: jax.tree_util.tree_map(np.asarray, hyper[k]) for k in keys})


def fit_evidence(make_nlp: Callable, hyper: dict, params, tx, data, *, structure="kron",
                 epochs=1, batch_size=None, key=None, burn_in=0, every=1, hyper_steps=100,
                 hyper_tx=None, prior_key: Optional[str] = "prior_sigma",
                 noise_key: Optional[str] = None, subset=None, curvature="ggn", rank=None,
                 curvature_batch_size=None, max_bytes=None, checkpoint_dir=None,
                 resume=True, progress=False) -> FitEvidenceResult:
  r"""Train the weights and maximize the Laplace evidence over the hyperparameters.

  Epoch ``e`` trains on the minibatches of :func:`mlmap.fit` (the same order
  for the same ``(key, e)``; the remainder dropped) with ``make_nlp(hyper)`` as
  the objective and ``tx``. After epoch ``e`` (counted from 1) with
  ``e > burn_in`` and ``(e - burn_in) % every == 0``, the structured posterior
  is built at the current weights over every training example and
  ``hyper_steps`` steps of ``hyper_tx`` (default ``optax.adam(0.1)``) ascend its
  log evidence in ``log hyper[prior_key]`` (and ``log hyper[noise_key]``), in
  ``O(P)`` each (module docstring). Its state persists across updates (a
  decaying schedule decays over the whole run).

  At the end of each epoch (after its update) a checkpoint of the weights, both
  optimizer states, the hyperparameters, the key and the history is written to
  ``checkpoint_dir/fit_evidence.ckpt``; a resumed run continues bit-for-bit.

  This is the online approximation: the curvature is taken at weights that
  are not yet a MAP of the current hyperparameters (as in laplace-torch). The
  exact, refit-to-MAP fixed point is :func:`mlmap.maximize_evidence`.

  Args:
    make_nlp: ``make_nlp(hyper) -> NegativeLogPosterior`` with ``num_data`` the
      number of training examples, ``hyper[prior_key]`` as the ``sigma`` of
      :func:`mlmap.gaussian_log_prior` and ``hyper[noise_key]`` as the
      ``sigma`` of :func:`mlmap.gaussian_log_likelihood`; traceable in ``hyper``.
    hyper: dict of positive hyperparameters; ``hyper[prior_key]`` a scalar or a
      prefix tree of ``params`` (e.g. one scale per layer).
    params: initial weights.
    tx: an optax transformation, or ``nlp -> transformation`` for optimizers that
      need the objective (:func:`mlmap.hessian_free`, :func:`mlmap.natural_gradient`).
    data: ``(inputs, targets)`` arrays with a shared leading example axis.
    structure: ``"kron"`` (default), ``"diag"``, ``"lowrank"`` (``rank=``) or
      ``"full"`` (the dense ``P x P`` GGN: the exact reference for small models,
      refused above ``max_bytes``).
    epochs, batch_size, key: as in :func:`mlmap.fit`.
    burn_in: epochs before the first update.
    every: epochs between updates.
    hyper_steps: ``hyper_tx`` steps per update.
    hyper_tx: optax transformation of the log hyperparameters (default
      ``optax.adam(0.1)``, as laplace-torch); it sees the gradient of ``-log Z``.
    prior_key: key of the Gaussian prior scales.
    noise_key: key of the Gaussian noise scale, or None (classification).
    subset, curvature, rank: of the posterior (see :func:`mlmap.laplace`).
    curvature_batch_size: examples per batch of the curvature pass (default
      ``batch_size``).
    max_bytes: refuse a dense ``P x P`` array above this many bytes (default
      :func:`mlmap.laplace`'s); only ``structure="full"`` forms one.
    checkpoint_dir: where ``fit_evidence.ckpt`` is written; None for none.
    resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
    progress: show a tqdm bar of the weight steps.

  Returns:
    A :class:`FitEvidenceResult`.

  Raises:
    TypeError: ``hyper`` not a dict, ``tx`` neither a transformation nor callable.
    ValueError: a key missing from ``hyper``, a hyperparameter that is not finite
      and positive, ``structure="full"``, ``make_nlp(hyper).num_data`` not the
      number of training examples, a non-scalar noise, a noise key that is not
      the Gaussian likelihood's ``sigma``, bad counts, or a checkpoint of another
      run.

  References:
    Immer, Bauer, Fortuin, Ratsch and Khan, "Scalable marginal likelihood
    estimation for model selection in deep learning", ICML 2021,
    https://arxiv.org/abs/2104.04975.
  """
  opts = dict(structure=structure, epochs=epochs, burn_in=burn_in, every=every,
              hyper_steps=hyper_steps,
              hyper_tx=optax.adam(0.1) if hyper_tx is None else hyper_tx,
              prior_key=prior_key, noise_key=noise_key)
  n, batch_size = _fit.num_and_batch_size(_FN, data, batch_size)
  nlp_ref = _check(make_nlp, hyper, tx, n, opts)
  hyper = jax.tree_util.tree_map(lambda x: jnp.asarray(x, float), hyper)
  curv = batch_size if curvature_batch_size is None else int(curvature_batch_size)
  run = dict(opts=opts, nlp_ref=nlp_ref, hyper0=hyper, steps_per_epoch=n // batch_size,
             curv_data=_curvature_batches(data, n, curv),
             laplace_kw=dict(structure=structure, subset=subset, curvature=curvature,
                             rank=rank, **({} if max_bytes is None else
                                         {"max_bytes": max_bytes})))
  t0 = tx if isinstance(tx, optax.GradientTransformation) else tx(nlp_ref)
  state = dict(params=params, opt_state=t0.init(params), hyper=hyper,
               hyper_state=opts["hyper_tx"].init(
                   _terms.log_hyper(hyper, prior_key, noise_key)),
               epoch=0, step=0, key=key,
               history={k: [] for k in ("step", "epoch", "loss", "grad_norm", "skipped",
                                        "hyper_epoch", "log_evidence_before",
                                        "log_evidence", "hyper")})
  path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_NAME)
  if path is not None and resume and os.path.exists(path):
    state = _load(path, state)
  _epochs(run, _train_step(make_nlp, tx), state, data, batch_size, path, progress)
  post = _ls.laplace(make_nlp(state["hyper"]), state["params"], data=run["curv_data"],
                     map_tol=None, **run["laplace_kw"])
  return FitEvidenceResult(state["params"], state["opt_state"], state["hyper"],
                           state["step"], state["history"], post)


def _epochs(run, step, state, data, batch_size, path, progress):
  """The loop of :func:`fit_evidence`; updates ``state`` in place."""
  o = run["opts"]
  keys = [k for k in (o["prior_key"], o["noise_key"]) if k is not None]
  from tqdm.auto import tqdm
  with tqdm(total=run["steps_per_epoch"] * o["epochs"], initial=state["step"],
            disable=not progress, desc=_FN) as bar:
    for epoch in range(state["epoch"], o["epochs"]):
      for batch in _fit._batches(data, batch_size, state["key"], epoch):
        state["params"], state["opt_state"], m = step(
            state["hyper"], state["params"], state["opt_state"], tuple(batch))
        state["step"] += 1
        _fit._record(state["history"], state["step"], epoch, jax.device_get(m), bar)
      done = epoch + 1
      if done > o["burn_in"] and (done - o["burn_in"]) % o["every"] == 0:
        state["hyper"], state["hyper_state"], values = _update_hyper(
            run, state["params"], state["hyper"], state["hyper_state"])
        _record_hyper(state["history"], done, state["hyper"], values, keys)
      state["epoch"] = done
      if path is not None:
        save_checkpoint(path, _to_ckpt(state))


def _to_ckpt(state):
  out = dict(state)
  h = state["history"]
  out["history"] = dict(_fit._history_to_ckpt({**h, "eval": []}),
                        hyper_epoch=np.asarray(h["hyper_epoch"], np.int64),
                        log_evidence_before=np.asarray(h["log_evidence_before"]),
                        log_evidence=np.asarray(h["log_evidence"]),
                        hyper=list(h["hyper"]))
  return out


def _load(path, state):
  like = {k: state[k] for k in ("params", "opt_state", "hyper", "hyper_state")}
  out = _fit.resume_parts(_FN, path, like, ("epoch", "step", "key", "history"))
  ck = out["history"]
  history = _fit._history_from_ckpt(ck)
  del history["eval"]
  history.update(hyper_epoch=np.asarray(ck["hyper_epoch"]).tolist(),
                 log_evidence_before=np.asarray(ck["log_evidence_before"]).tolist(),
                 log_evidence=np.asarray(ck["log_evidence"]).tolist(),
                 hyper=list(ck["hyper"]))
  return dict(out, epoch=int(out["epoch"]), step=int(out["step"]), history=history)
