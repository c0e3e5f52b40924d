"""``mm.make_train_step``: a jitted step that skips non-finite updates.

It works with plain optax optimizers and with mlmap's second-order ones (which
receive the batch as ``batch=(inputs, targets)``), with or without model state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mlmap import _checks
from mlmap import _loops

_tmap = jax.tree_util.tree_map


def _value_and_grad(objective, params, inputs, targets):
  """``jax.value_and_grad`` that first checks the objective returns a real scalar.

  The check reads the traced output's shape (at trace time, no extra trace):
  without it a per-example loss vector fails deep inside JAX.
  """
  loss, vjp = jax.vjp(lambda p: objective(p, inputs, targets), params)
  if jnp.shape(loss) != ():
    raise ValueError(f"make_train_step: the objective must return a scalar, but it "
                     f"returned shape {jnp.shape(loss)} (sum or average per-example "
                     "terms, e.g. with jnp.sum).")
  if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
    raise TypeError(f"make_train_step: the objective must return a floating scalar, "
                    f"got dtype {jnp.result_type(loss)}.")
  (grads,) = vjp(lax.full_like(loss, 1))
  return loss, grads


def make_train_step(objective, tx, *, jit=True):
  r"""Build ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  .. math::
    \ell, g = f(w; X, T), \nabla_w f(w; X, T);\quad
    (u, s') = \mathrm{tx.update}(g, s, w, \mathrm{batch}=(X, T));\quad
    w' = w + u

  If ``ell`` or ``g`` is non-finite the optimizer is not called at all; if the
  update or the new optimizer state is non-finite it is discarded. In both cases
  ``params`` and ``opt_state`` come back unchanged and ``metrics["skipped"]`` is
  True, so one bad batch (an overflow, a corrupt example) cannot poison a run.

  (On the CPU, for an objective with a convolution, the update is computed and
  then discarded rather than skipped: XLA:CPU runs a convolution inside a
  ``lax.cond`` branch about 25x slower, see ``mlmap._loops``. The results are
  the same. An optimizer whose first update fills a lazily allocated state, such as
  ``mm.kfac`` built without ``example_inputs``, is the exception on that first
  step: the update runs, its own guards apply, and only ``params`` are kept when
  it is non-finite; the step retraces once for the filled state.)

  **Model state.** For an objective built with
  ``mm.negative_log_posterior(..., has_state=True)`` the step is
  ``step(params, opt_state, batch, model_state, rng) -> (params, opt_state,
  metrics, model_state)``: the loss and gradient are those of the training-mode
  network (dropout drawn from ``rng``, batch statistics), the new model state
  (running statistics) comes from the same forward pass, and it is kept or
  discarded together with the update. The transformation also receives
  ``model_state=`` and ``rng=``, and mlmap's curvature optimizers take their
  products of ``nlp.bind(model_state, rng)``: the same training-mode function,
  with the same dropout mask. Draw a fresh ``rng`` per step
  (``jax.random.fold_in(key, t)``; :func:`fit` does).

  The transformation receives the extra keyword arguments ``batch=(X, T)``
  (mlmap's curvature optimizers), ``value=ell`` and ``grad=g`` (at the old
  params) and ``value_fn = obj_fn = lambda w: f(w; X, T)`` (the objective bound
  to the batch), and ``full_params=params`` (the whole tree: mlmap's curvature
  optimizers need it when ``optax.multi_transform`` hands them part of it). So
  ``optax.lbfgs`` (its line search needs ``value``, ``grad``
  and ``value_fn``), ``optax.contrib.sophia`` (``obj_fn``, for its Hutchinson
  Hessian diagonal) and ``optax.contrib.reduce_on_plateau`` (``value``) work
  through it unchanged; a transformation that takes none of them ignores them.

  Args:
    objective: ``objective(params, inputs, targets) -> scalar`` (e.g. an nlp).
    tx: an ``optax.GradientTransformation``; plain ones ignore the extra args
      above via ``optax.with_extra_args_support``.
    jit: return the ``jax.jit``-compiled step (default) or the plain function.

  Returns:
    ``step``; ``metrics`` is a dict of scalars ``loss`` (at the old params),
    ``grad_norm`` (global L2 norm of ``g``) and ``skipped`` (bool).

  Raises:
    TypeError: ``objective`` is not callable or ``tx`` not a transformation;
      when ``step`` is traced, a non-floating leaf of ``params`` (named by its
      path) or an objective returning a non-floating value.
    ValueError: when ``step`` is traced, ``batch`` is not a pair, or the
      objective returns a non-scalar (the message gives its shape).

  Examples:
    >>> import jax.numpy as jnp, optax, mlmap as mm
    >>> f = lambda w, x, t: jnp.sum((x @ w - t) ** 2)
    >>> tx = optax.sgd(0.1); step = mm.make_train_step(f, tx)
    >>> w = jnp.zeros(2); s = tx.init(w)
    >>> w, s, m = step(w, s, (jnp.eye(2), jnp.ones(2)))
    >>> [round(float(v), 6) for v in w], bool(m["skipped"])
    ([0.2, 0.2], False)
  """
  if not callable(objective):
    raise TypeError(f"make_train_step: objective must be callable, got "
                    f"{type(objective).__name__}.")
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"make_train_step: tx must be an optax.GradientTransformation, "
                    f"got {type(tx).__name__}.")
  tx = optax.with_extra_args_support(tx)
  stateful = bool(getattr(objective, "has_state", False))

  def step(params, opt_state, batch, model_state=None, rng=None):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError(f"train step: batch must be a pair (inputs, targets), got "
                       f"{type(batch).__name__}.")
    _checks.check_float_leaves("make_train_step", params)
    inputs, targets = batch
    if stateful:
      _check_state_args(model_state, rng)
      bound = objective.bind(model_state, rng)
      loss, grads, new_model_state = _stateful_value_and_grad(
          objective, params, inputs, targets, model_state, rng)
      extra = {"model_state": model_state, "rng": rng}
    else:
      if model_state is not None or rng is not None:
        raise TypeError("train step: model_state / rng were given, but the objective "
                        "has no model state; build it with "
                        "mm.negative_log_posterior(..., has_state=True).")
      bound, extra, new_model_state = objective, {}, None
      loss, grads = _value_and_grad(objective, params, inputs, targets)
    new_params, new_state, new_model_state, metrics = _guarded_update(
        tx, bound, params, opt_state, (inputs, targets), loss, grads, extra,
        (model_state, new_model_state))
    if stateful:
      return new_params, new_state, metrics, new_model_state
    return new_params, new_state, metrics

  return jax.jit(step) if jit else step


def _check_state_args(model_state, rng):
  """A stateful step needs the model state and a key (``rng=None`` would train in
  evaluation mode: frozen statistics, no dropout)."""
  if model_state is None or rng is None:
    missing = " and ".join(n for n, v in (("model_state", model_state), ("rng", rng))
                           if v is None)
    raise TypeError(
        f"train step: the objective has model state (has_state=True), so the step is "
        f"step(params, opt_state, batch, model_state, rng) -> (params, opt_state, "
        f"metrics, model_state); {missing} missing (rng=None would be evaluation mode; "
        "a model without dropout still takes a key, which it ignores).")


def _stateful_value_and_grad(objective, params, inputs, targets, model_state, rng):
  """``(loss, grads, new_model_state)`` of the training-mode network in one pass."""
  def f(p):
    return objective.loss_and_state(p, inputs, targets, state=model_state, rng=rng)
  (loss, new_model_state), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, grads, new_model_state


def _guarded_update(tx, objective, params, opt_state, batch, loss, grads, extra,
                    model_states):
  """The optimizer's update, kept only when the inputs and results are finite.

  ``model_states`` is ``(old, new)`` (both None for a stateless objective): the
  new model state is kept with the update and is part of what must be finite.
  Returns ``(params, opt_state, model_state, metrics)``.
  """
  inputs, targets = batch
  old_ms, new_ms = model_states
  grad_norm = optax.tree.norm(grads)
  finite_in = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
               & _checks.tree_all_finite(new_ms))

  def apply(_):
    value_fn = functools.partial(_bound, objective, inputs, targets)
    updates, new_state = tx.update(grads, opt_state, params, batch=(inputs, targets),
                                   value=loss, grad=grads, value_fn=value_fn,
                                   obj_fn=value_fn, full_params=params, **extra)
    new_params = optax.apply_updates(params, updates)
    ok = _checks.tree_all_finite((new_params, new_state, updates))
    return new_params, new_state, ok

  def skip(_):
    return params, opt_state, jnp.asarray(False)

  lazy = _has_none(opt_state) and (jax.tree_util.tree_structure(
      jax.eval_shape(apply, None)[1]) != jax.tree_util.tree_structure(opt_state))
  if lazy or _loops.conv_on_cpu(objective, params, inputs, targets):
    # lazy: the first update fills a lazily allocated state (mm.kfac without
    # example_inputs), so there is no old state of its structure to fall back to;
    # the update runs unconditionally (its own NaN guards apply) and only the
    # params are kept when it is non-finite. The next call retraces once.
    # conv: XLA:CPU runs a convolution inside a cond branch ~25x slower than at
    # top level (mlmap._loops): compute the update unconditionally and select.
    new_params, new_state, ok = apply(None)
    ok = ok & finite_in
  else:
    new_params, new_state, ok = lax.cond(finite_in, apply, skip, None)
  new_params = _tmap(lambda n, o: jnp.where(ok, n, o), new_params, params)
  if not lazy:
    new_state = _tmap(lambda n, o: jnp.where(ok, n, o), new_state, opt_state)
  new_ms = _tmap(lambda n, o: jnp.where(ok, n, o), new_ms, old_ms)
  metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok}
  return new_params, new_state, new_ms, metrics


def _has_none(tree) -> bool:
  """A ``None`` field: a state that its first update may fill (``mm.kfac``)."""
  return any(x is None for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is None))


def _bound(objective, inputs, targets, params, batch=None, obj_fn=None, full_params=None,
           model_state=None, rng=None):
  """``objective(params, inputs, targets)``: the objective bound to one batch.

  It accepts (and ignores) the step's other extra arguments: optax's line
  searches forward every extra argument they do not consume to ``value_fn``
  and refuse any that it does not name. (A stateful objective arrives here
  already bound to its model state and key.)"""
  del batch, obj_fn, full_params, model_state, rng
  return objective(params, inputs, targets)
