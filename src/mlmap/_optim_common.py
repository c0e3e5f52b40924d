"""Helpers shared by the optax transformations of mlmap (private).

Used by :mod:`mlmap.optimizers`, :mod:`mlmap._hf` and :mod:`mlmap._ncg`; kept
apart so that those modules import this one and never each other (no cycle).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mlmap import _checks
from mlmap.dense import check_dense_bytes
from mlmap.posterior import NegativeLogPosterior, batch_size
from mlmap.spectral import hutchinson_trace

_tmap = jax.tree_util.tree_map


def get_batch(fn: str, params, extra_args):
  """The ``(inputs, targets)`` pair from the update's extra args, checked."""
  if params is None:
    raise ValueError(f"{fn}: tx.update needs params; call "
                     "tx.update(grads, state, params, batch=(inputs, targets)).")
  batch = extra_args.get("batch")
  if batch is None:
    raise ValueError(
        f"{fn}: the update needs the minibatch its objective is evaluated on; pass "
        f"batch=(inputs, targets) to tx.update(grads, state, params, "
        f"batch=(inputs, targets)) (got extra args {sorted(extra_args)}).")
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise ValueError(f"{fn}: batch must be a pair (inputs, targets), got "
                     f"{type(batch).__name__} of length "
                     f"{len(batch) if hasattr(batch, '__len__') else '?'}.")
  return batch[0], batch[1]


def check_factor(fn: str, name: str, value) -> None:
  """A concrete ``value`` must be a number > 1; a traced one (``optax.inject_hyperparams``
  rebuilds the transformation in ``update``) was checked concretely in ``init``."""
  if not _checks.is_concrete(value):
    return
  if not (np.ndim(value) == 0 and float(value) > 1.0):
    raise ValueError(f"{fn}: {name} must be a number > 1, got {value!r}.")


def scalar(value, dtype):
  return jnp.asarray(value, dtype=dtype)  # explicit dtype: never weak-typed


def lr_at(learning_rate, count, dtype):
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  return jnp.asarray(lr, dtype)


def where_tree(pred, a, b):
  return _tmap(lambda x, y: jnp.where(pred, x, y), a, b)


def noise(f0):
  """Rounding level of objective differences: below it a model is uninformative."""
  eps = jnp.finfo(jnp.result_type(f0)).eps
  return 10.0 * eps * (jnp.abs(f0) + 1.0)


def value_at(fn: str, objective, params, inputs, targets, extra_args):
  """The objective at ``params`` on the update's batch, for the reduction ratio.

  The ``value`` extra argument when given (``mm.make_train_step`` passes the
  loss it differentiated, on the same batch), which saves a forward pass; else
  computed. A non-scalar ``value`` is refused.
  """
  value = extra_args.get("value")
  if value is None:
    return objective(params, inputs, targets)
  value = jnp.asarray(value)
  if value.shape != ():
    raise ValueError(f"{fn}: value must be the objective's scalar at params, got shape "
                     f"{value.shape}.")
  return value


def reduction_ratio(f0, f1, predicted):
  r"""``rho = (f1 - f0) / predicted`` and whether to accept the step.

  ``predicted`` is the (negative) change of the quadratic model. A step is
  accepted when ``f1`` is finite and not above ``f0`` (up to rounding); when the
  model change is at rounding level, rho is 1 for an accepted step (converged:
  nothing to learn about the damping) and the most negative float otherwise (also
  for a non-finite ``f1``). rho stays finite: ``mm.make_train_step`` discards a
  non-finite optimizer state, which would undo the damping's growth.
  """
  tiny = noise(f0)
  accept = jnp.isfinite(f1) & jnp.isfinite(predicted) & (f1 <= f0 + tiny)
  informative = predicted < -tiny
  worst = -jnp.finfo(jnp.result_type(f0)).max
  rho = (f1 - f0) / jnp.where(informative, predicted, -1.0)
  rho = jnp.where(informative, rho, jnp.where(accept, 1.0, worst))
  rho = jnp.where(jnp.isfinite(rho), rho, worst)
  return rho, accept


def adapt_damping(damping, rho, accepted, factor, floor):
  """Levenberg-Marquardt rule: rho < 1/4 grows the damping, rho > 3/4 shrinks it.

  A rejected step (the loss rose) grows it by ``factor**3``: the step was far
  outside the region where the quadratic model holds, and every rejection
  costs a whole update.
  """
  cap = jnp.sqrt(jnp.finfo(jnp.result_type(damping)).max)
  grow = jnp.where(accepted, factor, factor ** 3)
  up = jnp.minimum(jnp.maximum(damping * grow, floor), cap)
  return jnp.where(rho < 0.25, up, jnp.where(rho > 0.75, damping / factor, damping))


def damped_cholesky(h, damping, max_tries=40):
  r"""Cholesky factor of ``h + lam I``, growing ``lam`` from ``damping`` until PD.

  Nocedal & Wright (2006), Alg. 3.3: on failure ``lam <- max(10 lam, floor,
  -min_i h_ii + floor)`` with ``floor = 1e-6 mean|h_ii|``. A failed
  factorization shows up as NaN entries (jax's ``cholesky`` does not raise).

  Returns:
    ``(chol, lam, ok, floor)``; ``ok`` is False after ``max_tries`` failures
    (a non-finite ``h``).
  """
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  diag = jnp.diagonal(h)
  scale = jnp.mean(jnp.abs(diag))
  floor = 1e-6 * jnp.where(scale > 0, scale, 1.0)

  def factor(lam):
    chol = jnp.linalg.cholesky(h + lam * eye)
    return chol, jnp.all(jnp.isfinite(chol))

  def cond(c):
    return ~c[2] & (c[3] < max_tries)

  def body(c):
    lam = jnp.maximum(jnp.maximum(10.0 * c[1], floor), floor - jnp.min(diag))
    chol, ok = factor(lam)
    return chol, lam, ok, c[3] + 1

  chol0, ok0 = factor(damping)
  chol, lam, ok, _ = lax.while_loop(cond, body, (chol0, damping, ok0, 0))
  return chol, lam, ok, floor


# --- trace-time checks of the optimizers' arguments -----------------------------

def check_count(fn: str, name: str, value) -> int:
  """``value`` as an int >= 1 (an integral float or 0-d array is accepted, 2.5 is not).

  A count sets a loop length, so a traced one is refused with the remedy (with
  ``optax.inject_hyperparams`` it must be one of the ``static_args``)."""
  if not _checks.is_concrete(value):
    raise ValueError(f"{fn}: {name} is traced ({value}); it sets a loop length, so it "
                     f"must be a Python int. With optax.inject_hyperparams, list it in "
                     f"static_args, e.g. static_args=('objective', {name!r}).")
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
    value = np.asarray(value).item()
  ok = (not isinstance(value, (bool, np.bool_))
        and isinstance(value, (int, np.integer, float, np.floating))
        and float(value).is_integer() and value >= 1)
  if not ok:
    raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}.")
  return int(value)


def check_params(fn: str, params) -> None:
  """Params must be a pytree of floating arrays; names every other leaf by path."""
  _checks.check_float_leaves(fn, params)


def check_scalar_objective(fn: str, objective, params, inputs, targets) -> None:
  """Raise ``ValueError`` unless ``objective(params, inputs, targets)`` is a scalar.

  Uses ``jax.eval_shape`` (no FLOPs), so a per-example loss vector is reported
  at trace time with its shape instead of failing later inside a product.
  """
  out = jax.eval_shape(objective, params, inputs, targets)
  shape = getattr(out, "shape", None)
  if shape != ():
    got = (f"shape {tuple(shape)}" if shape is not None
           else f"a {type(out).__name__} {jax.tree_util.tree_structure(out)}")
    raise ValueError(
        f"{fn}: objective must return a scalar (the summed loss), but "
        f"objective(params, inputs, targets) returned {got}. Sum (or mean) the "
        "per-example losses inside the objective.")


def check_dense(fn: str, params, max_bytes) -> None:
  """Refuse a dense ``P x P`` matrix of ``params`` above ``max_bytes`` (see dense.py)."""
  leaves = jax.tree_util.tree_leaves(params)
  size = sum(int(np.prod(jnp.shape(x))) for x in leaves)
  dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
  check_dense_bytes(fn, size, dtype, max_bytes)


def check_update(fn: str, objective, grads, params, extra_args):
  """The checks every ``update`` makes at trace time; returns ``(inputs, targets)``.

  Params must be given and floating, ``grads`` shaped like them, the batch a
  pair, and the objective scalar on it.
  """
  inputs, targets = get_batch(fn, params, extra_args)
  check_params(fn, params)
  _checks.check_tree_like(fn, "grads", grads, params)
  check_scalar_objective(fn, objective, params, inputs, targets)
  return inputs, targets


# --- damping on the objective's scale ---------------------------------------------

def check_damping(fn: str, damping) -> None:
  """``damping`` must be ``"auto"`` or a number >= 0 (a traced number is not checked)."""
  if isinstance(damping, str):
    if damping != "auto":
      raise ValueError(f"{fn}: damping must be 'auto' or a number >= 0, got {damping!r}.")
    return
  if damping is None or callable(damping) or isinstance(damping, bool):
    raise ValueError(f"{fn}: damping must be 'auto' or a number >= 0, got {damping!r}.")
  _checks.check_nonnegative("damping", damping, fn)


def initial_damping(damping, dtype):
  """The state's first ``lambda``: NaN stands for ``"auto"`` (set by the first update)."""
  return scalar(jnp.nan if isinstance(damping, str) else damping, dtype)


def positive_scale(value, floor):
  """``max(value, floor)``; 1 when ``value`` is not finite (no scale to read)."""
  value = jnp.asarray(value)
  floor = jnp.asarray(floor, value.dtype)
  return jnp.where(jnp.isfinite(value), jnp.maximum(value, floor), jnp.ones_like(value))


def hutchinson_scale(matvec, like, num_probes: int = 4):
  r""":math:`|\mathrm{tr}(B)| / P` from :func:`mlmap.spectral.hutchinson_trace`
  (``num_probes`` Rademacher probes, fixed key ``PRNGKey(0)``)."""
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(like))
  est = hutchinson_trace(matvec, like, jax.random.PRNGKey(0), num_probes).estimate
  return jnp.abs(est) / max(size, 1)


def resolve_damping(lam, estimate, floor):
  """``lam``, or (while ``lam`` is NaN: the first update of ``damping="auto"``) the
  curvature's scale ``estimate()``, floored at ``floor``; the estimate is computed
  only on that update (``lax.cond``)."""
  return lax.cond(jnp.isnan(lam),
                  lambda _: positive_scale(estimate(), floor).astype(lam.dtype),
                  lambda _: lam, None)


# --- the problem an update works on: masked parameters, curvature batch -------------

def check_fraction(fn: str, fraction) -> None:
  """``curvature_fraction`` must be None or a number in (0, 1]."""
  if fraction is None:
    return
  ok = (not isinstance(fraction, (bool, str)) and np.ndim(fraction) == 0
        and np.isfinite(float(fraction)) and 0.0 < float(fraction) <= 1.0)
  if not ok:
    raise ValueError(f"{fn}: curvature_fraction must be None or a number in (0, 1], "
                     f"got {fraction!r}.")


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def has_masked(params) -> bool:
  """``params`` holds ``optax.MaskedNode`` leaves (inside ``optax.multi_transform``)."""
  return any(_is_masked(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_masked))


def _merge(sub, full):
  """``full`` with the leaves of ``sub`` put in; ``MaskedNode`` keeps ``full``'s subtree."""
  return jax.tree_util.tree_map(lambda s, f: f if _is_masked(s) else s, sub, full,
                                is_leaf=_is_masked)


def masked_objective(fn: str, objective, params, extra_args):
  """The objective as a function of the unmasked part of ``params``.

  ``optax.multi_transform`` and ``optax.masked`` hand a transformation only its
  part of the tree (the rest ``optax.MaskedNode``). A curvature optimizer must
  evaluate the model on the whole tree, so the update needs ``full_params=``
  (``mm.make_train_step`` passes it). The frozen leaves are constants: the
  curvature is the block of the unmasked leaves.
  """
  if not has_masked(params):
    return objective
  full = extra_args.get("full_params")
  if full is None:
    raise ValueError(
        f"{fn}: params holds optax.MaskedNode leaves (the optimizer runs on part of the "
        "tree, inside optax.multi_transform or optax.masked), but the model needs the "
        "whole tree: pass full_params=params to tx.update(grads, state, params, "
        "batch=..., full_params=params); mm.make_train_step does this for you.")
  _checks.check_float_leaves(fn, full, "full_params")
  try:
    _merge(params, full)
  except ValueError as err:
    raise ValueError(f"{fn}: full_params does not have the tree structure of params "
                     f"(with its MaskedNode subtrees filled): {err}") from None
  if isinstance(objective, NegativeLogPosterior):
    apply_fn, log_prior = objective.apply_fn, objective.log_prior
    return dataclasses.replace(
        objective, apply_fn=lambda p, x: apply_fn(_merge(p, full), x),
        log_prior=None if log_prior is None else (lambda p: log_prior(_merge(p, full))))
  return lambda p, x, t: objective(_merge(p, full), x, t)


def bound_objective(fn: str, objective, extra_args):
  """A stateful nlp bound to the update's ``model_state`` and ``rng``; others as given.

  ``mm.make_train_step`` passes the state and the step's key, so the curvature
  is that of the training-mode network whose gradient the step took (the same
  dropout mask, the batch's statistics). Without a ``model_state`` the update
  cannot evaluate the model: ``ValueError`` naming the remedy.
  """
  if not getattr(objective, "has_state", False):
    return objective
  if extra_args.get("model_state") is None:
    raise ValueError(
        f"{fn}: the objective has model state (has_state=True), so the update needs "
        "it: pass model_state=... and rng=key (None: evaluation mode) to "
        "tx.update(grads, state, params, batch=..., model_state=..., rng=...); "
        "mm.make_train_step does this for you.")
  return objective.bind(extra_args["model_state"], extra_args.get("rng"))


def update_problem(fn: str, objective, grads, params, extra_args):
  """:func:`check_update` after :func:`masked_objective`: ``(objective, inputs, targets)``.

  A stateful objective is first bound to the update's state (:func:`bound_objective`)."""
  get_batch(fn, params, extra_args)  # no params / no batch: the error names the remedy
  objective = bound_objective(fn, objective, extra_args)
  objective = masked_objective(fn, objective, params, extra_args)
  return (objective,) + check_update(fn, objective, grads, params, extra_args)


def curvature_problem(fn: str, objective, params, inputs, targets, extra_args, fraction):
  """``(objective_c, inputs_c, targets_c)``: where the curvature products are taken.

  ``curvature_batch=(xc, yc)`` in the extra args, else the first
  ``ceil(fraction * B)`` examples of the batch (``fraction`` not None), else the
  batch itself. A separate curvature batch stands for the same data as the
  gradient batch: ``objective_c`` is the negative log-posterior with
  ``num_data = N`` (``B`` when the objective's ``num_data`` is None), so its
  curvature is on the scale of the gradient's objective and the prior counts once.
  """
  batch = extra_args.get("curvature_batch")
  if batch is None and fraction is None:
    return objective, inputs, targets
  what = "curvature_batch" if batch is not None else "curvature_fraction"
  if not isinstance(objective, NegativeLogPosterior):
    raise TypeError(
        f"{fn}: {what} needs a negative_log_posterior (mm.negative_log_posterior(...)): "
        "a curvature batch is rescaled to the data set's size, which needs the "
        f"likelihood and the prior apart; got {type(objective).__name__}.")
  b = batch_size(inputs)
  if batch is not None:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError(f"{fn}: curvature_batch must be a pair (inputs, targets), got "
                       f"{type(batch).__name__}.")
    xc, tc = batch
  else:
    m = max(1, math.ceil(float(fraction) * b))
    xc, tc = _tmap(lambda a: a[:m], (inputs, targets))
  objective_c = dataclasses.replace(objective, num_data=objective.num_data or b)
  try:
    check_scalar_objective(fn, objective_c, params, xc, tc)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{fn}: the objective cannot be evaluated on the {what}: {err}") from None
  return objective_c, xc, tc
