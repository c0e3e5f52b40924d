"""``mm.fit``: epochs of minibatches with a progress bar and bit-exact resumable checkpoints.

``fit`` checkpoints ``(params, opt_state, step, key, history)`` (and the model
state and key of a stateful step) atomically, so that a resumed run continues
bit-for-bit as if it had never been interrupted: same parameters, optimizer
state and history, evaluations included. The step it drives is
:func:`mlmap.make_train_step`'s (``_step.py``); the checkpoints are written
by :func:`mlmap.save_checkpoint` (``_checkpoint.py``: no pickle, atomic, checked
on load). ``evidence_online`` reuses the batching, history and resume helpers.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import jax
import jax.numpy as jnp

from mlmap import _checks
from mlmap._checkpoint import _build, _read, _restore_like, save_checkpoint
from mlmap._step import make_train_step

CHECKPOINT_NAME = "checkpoint.ckpt"
_tmap = jax.tree_util.tree_map


class FitResult(NamedTuple):
  """Result of :func:`fit`.

  Attributes:
    params: final parameters.
    opt_state: final optimizer state.
    step: number of steps taken in total (including before a resume).
    history: dict of lists: ``step``, ``epoch``, ``loss``, ``grad_norm``,
      ``skipped`` per step, and ``eval`` as ``(step, value)`` pairs.
    model_state: the final model state (batch-norm statistics) of a stateful
      objective, else None.
  """
  params: Any
  opt_state: Any
  step: int
  history: dict
  model_state: Any = None


class StopTraining(Exception):
  """Raise from a ``callback`` to stop :func:`fit` (no further checkpoint is written)."""


_HISTORY_KEYS = (("step", np.int64), ("epoch", np.int64), ("loss", np.float64),
                 ("grad_norm", np.float64), ("skipped", np.bool_))


def _history_to_ckpt(history):
  """History as a few arrays (a leaf per step would bloat the header)."""
  out = {k: np.asarray(history[k], dtype) for k, dtype in _HISTORY_KEYS}
  out["eval_step"] = np.asarray([t for t, _ in history["eval"]], np.int64)
  out["eval_value"] = [v for _, v in history["eval"]]
  return out


def _history_from_ckpt(ckpt):
  """The history dict back from :func:`_history_to_ckpt` (or a pre-format pickle)."""
  out = {k: np.asarray(ckpt[k]).tolist() for k, _ in _HISTORY_KEYS}
  if "eval_step" in ckpt:
    out["eval"] = list(zip(np.asarray(ckpt["eval_step"]).tolist(), ckpt["eval_value"]))
  else:
    out["eval"] = [tuple(e) for e in ckpt["eval"]]
  return out


def resume_parts(fn, path, like, plain):
  """``{name: value}`` from the checkpoint ``path``, a dict with keys ``like | plain``.

  The ``like`` entries are restored through the given values (a checkpoint of
  another model or optimizer is refused, naming the leaf); the ``plain`` ones
  are rebuilt as saved (a ``key`` entry back into a PRNG key).
  """
  node, specs, values, _ = _read(path, False, fn)
  names = sorted([*like, *plain])
  if node["type"] != "dict" or node["keys"] != names:
    raise ValueError(f"{fn}: {path} is not a {fn} checkpoint (expected keys {names}, "
                     f"found {node.get('keys')}); pass resume=False or another "
                     "checkpoint_dir.")
  part = dict(zip(node["keys"], node["children"]))
  out = {k: _restore_like(part[k], ref, [k], specs, values, (fn, path, f"the given {k}"))
         for k, ref in like.items()}
  out.update({k: _build(part[k], specs, values) for k in plain})
  for name in ("key", "rng"):
    key = out.get(name)
    if isinstance(key, dict) and "typed" in key:  # a converted pre-format checkpoint
      out[name] = jax.random.wrap_key_data(jnp.asarray(key["typed"]), impl=key["impl"])
    elif isinstance(key, np.ndarray):
      out[name] = jnp.asarray(key)
  return out


def _resume(path, state):
  """``(state, step, key, history)`` from the fit checkpoint ``path``.

  ``state`` holds the given ``params``, ``opt_state`` (and ``model_state``, ``rng``
  of a stateful objective); the checkpoint's replace them, checked leaf by leaf.
  """
  like = {k: v for k, v in state.items() if k != "rng"}
  plain = ("step", "key", "history") + (("rng",) if "rng" in state else ())
  out = resume_parts("fit", path, like, plain)
  restored = {k: out[k] for k in state}
  return restored, int(out["step"]), out["key"], _history_from_ckpt(out["history"])


def _batches(data, batch_size, key, epoch):
  """Minibatches of the array pair ``data`` for one epoch (drop the remainder)."""
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  if key is not None:  # one gather per epoch, then contiguous slices
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    data = _tmap(lambda a: a[order], data)
  for i in range(n // batch_size):
    yield _tmap(lambda a: a[i * batch_size:(i + 1) * batch_size], data)


def _with_last(iterable):
  """``(item, is_last)`` pairs: one item of look-ahead tells the epoch's last batch."""
  it = iter(iterable)
  try:
    item = next(it)
  except StopIteration:
    return
  for following in it:
    yield item, False
    item = following
  yield item, True


def _num_examples(fn, data):
  """The shared leading size of the ``(inputs, targets)`` leaves, checked."""
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError(f"{fn}: data must be (inputs, targets) arrays or a callable "
                     f"epoch -> batches, got {type(data).__name__}.")
  leaves = jax.tree_util.tree_flatten_with_path(data)[0]
  if not leaves:
    raise ValueError(f"{fn}: data holds no arrays.")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(f"{fn}: data leaf '{_checks.leaf_path(path)}' is a scalar; every "
                       "leaf needs a leading example axis.")
    sizes.setdefault(shape[0], _checks.leaf_path(path))
  if len(sizes) > 1:
    listed = ", ".join(f"'{p}': {n}" for n, p in sizes.items())
    raise ValueError(f"{fn}: data leaves differ in their leading (example) size: {listed}.")
  return next(iter(sizes))


def num_and_batch_size(fn, data, batch_size):
  """``(n, batch_size)`` for the array pair ``data``: ``n`` when None, else checked in ``[1, n]``."""
  n = _num_examples(fn, data)
  batch_size = n if batch_size is None else int(batch_size)
  if not 1 <= batch_size <= n:
    raise ValueError(f"{fn}: batch_size must lie in [1, {n}] (n examples), got "
                     f"{batch_size}.")
  return n, batch_size


def _check_int(fn, name, value, low, optional):
  if optional and value is None:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < low):
    tail = " or None" if optional else ""
    raise ValueError(f"{fn}: {name} must be an integer >= {low}{tail}, got {value!r}.")


def fit(step, params, opt_state, data, *, epochs=1, batch_size=None, key=None,
        tx=None, eval_fn: Optional[Callable] = None, eval_every=None,
        checkpoint_dir=None, checkpoint_every=None, resume=True,
        callback: Optional[Callable] = None, progress=True, log_every=25,
        model_state=None, rng=None) -> FitResult:
  r"""Train for ``epochs`` over minibatches, with history, evaluation and checkpoints.

  Epoch ``e`` visits the examples in the order
  ``jax.random.permutation(jax.random.fold_in(key, e), n)`` (no shuffling when
  ``key`` is None) in ``n // batch_size`` batches; the remainder is dropped so
  every batch has one shape (one compilation). The order depends only on
  ``(key, e)``, so a run resumed from a checkpoint of
  ``(params, opt_state, step, key, history)`` replays exactly the batches it
  would have seen: its parameters, optimizer state and whole history
  (evaluations included) are bit-for-bit those of an uninterrupted run.

  After step ``t`` the order is: record the metrics, evaluate (if due at ``t``),
  checkpoint (if due at ``t``), call ``callback``. A checkpoint therefore holds
  every evaluation up to and including its own step, and a run killed at any
  point resumes from its last checkpoint without losing one.

  Args:
    step: a step from :func:`make_train_step`, or an objective
      ``f(params, inputs, targets)`` together with ``tx=`` (then the step is
      built here, and ``opt_state=None`` means ``tx.init(params)``).
    params: initial parameters.
    opt_state: initial optimizer state.
    data: ``(inputs, targets)`` arrays (pytrees allowed) with a shared leading
      example axis; or a callable ``data(epoch) -> iterable of (inputs, targets)``
      batches that yields the same batches for the same epoch (then
      ``batch_size`` and ``key`` are unused; one batch is read ahead to know
      the epoch's last).
    epochs: number of passes.
    batch_size: examples per batch; default all (full batch).
    key: PRNG key for shuffling, or None.
    tx: optimizer, when ``step`` is an objective.
    eval_fn: ``eval_fn(params) -> value`` (a scalar or a dict of scalars), run
      every ``eval_every`` steps (default: at the end of each epoch).
    eval_every: evaluation period in steps.
    checkpoint_dir: where ``checkpoint.ckpt`` is written; None for no checkpoints.
    checkpoint_every: checkpoint period in steps (default: each epoch's end).
    resume: continue from ``checkpoint_dir/checkpoint.ckpt`` if it exists; its
      params, opt_state, step, key and history replace the ones given. Its
      params and opt_state must match the given ones leaf by leaf (structure,
      shape, dtype class), else ``ValueError`` naming the leaf: a checkpoint of
      another model is never trained on.
    callback: ``callback(step, params, opt_state, metrics)`` after every step;
      returning True (or raising :class:`StopTraining`) stops training.
    progress: show a tqdm progress bar (the last loss and evaluation on it).
    log_every: steps between fetches of the metrics to the host (>= 1). The
      steps are dispatched without waiting for them in between, so an
      accelerator stays busy; the history still holds every step (fetched in
      one transfer), and it is complete before each evaluation, checkpoint
      and return. ``log_every=1`` fetches (and waits for) every step.
    model_state: the initial model state of a stateful objective
      (``has_state=True``: batch-norm statistics; ``{}`` for dropout alone).
      Step ``t`` (counted from 0) gets the key ``jax.random.fold_in(rng, t)``;
      the state is checkpointed with the params, so a resumed run is bit-exact.
      ``eval_fn`` is then called as ``eval_fn(params, model_state)``.
    rng: the PRNG key of the per-step keys (dropout); required with
      ``model_state``.

  Returns:
    A :class:`FitResult` ``(params, opt_state, step, history, model_state)``.
  """
  fn = "fit"
  if tx is not None:
    if opt_state is None:
      opt_state = tx.init(params)
    step = make_train_step(step, tx)
  if not callable(step):
    raise TypeError(f"{fn}: step must be a train step or an objective (with tx=), "
                    f"got {type(step).__name__}.")
  if opt_state is None:
    raise ValueError(f"{fn}: opt_state is None; pass tx.init(params), or pass the "
                     "objective as step together with tx=.")
  _check_int(fn, "epochs", epochs, 0, optional=False)
  if callable(data):
    epoch_batches, steps_per_epoch = data, None
  else:
    n, batch_size = num_and_batch_size(fn, data, batch_size)
    steps_per_epoch = n // batch_size
    epoch_batches = lambda e: _batches(data, batch_size, key, e)  # noqa: E731  (late-bound key)
  _check_int(fn, "checkpoint_every", checkpoint_every, 1, optional=True)
  _check_int(fn, "eval_every", eval_every, 1, optional=True)
  _check_int(fn, "log_every", log_every, 1, optional=False)
  if (model_state is None) != (rng is None):
    raise ValueError(f"{fn}: a stateful objective needs both model_state and rng "
                     f"(got model_state={'None' if model_state is None else '...'}, "
                     f"rng={'None' if rng is None else '...'}).")

  history = {"step": [], "epoch": [], "loss": [], "grad_norm": [], "skipped": [],
             "eval": []}
  start = 0
  path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_NAME)
  state = {"params": params, "opt_state": opt_state}
  if model_state is not None:
    state.update(model_state=model_state, rng=rng)
  if path is not None and resume and os.path.exists(path):
    state, start, key, history = _resume(path, state)
  plan = (eval_fn, eval_every, path, checkpoint_every, callback, log_every)
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    tqdm = None
  total = None if steps_per_epoch is None else steps_per_epoch * epochs
  bar = (tqdm(total=total, initial=start, disable=not progress, desc=fn)
         if tqdm is not None else None)
  try:
    t = _run_epochs(step, state, history, epoch_batches, steps_per_epoch, epochs,
                    start, key, plan, bar)
  finally:
    if bar is not None:
      bar.close()
  return FitResult(params=state["params"], opt_state=state["opt_state"],
                   step=max(t, start), history=history,
                   model_state=state.get("model_state"))


def _run_epochs(step, state, history, epoch_batches, steps_per_epoch, epochs, start,
                key, plan, bar):
  """The loop of :func:`fit`; updates ``state`` and ``history`` in place, returns t.

  Metrics stay on the device in ``pending``; every ``log_every`` steps the
  ones at least ``log_every`` steps old reach ``history`` (they are finished, so
  fetching them does not wait), and all of them before every evaluation,
  checkpoint and return."""
  eval_fn, eval_every, path, checkpoint_every, callback, log_every = plan
  t, pending, shown = 0, [], {}  # shown: the bar's postfix (loss, last evaluation)

  def flush(keep=0):
    # keep: the newest steps stay pending, so the fetch waits for nothing
    # still running and the dispatch queue never drains.
    done = len(pending) - keep
    _record_all(history, pending[:done], bar, shown)
    del pending[:done]

  try:
    for epoch in range(epochs):
      if steps_per_epoch is not None and (epoch + 1) * steps_per_epoch <= start:
        t = (epoch + 1) * steps_per_epoch
        continue
      for batch, last in _with_last(epoch_batches(epoch)):
        if t < start:
          t += 1
          continue
        params, opt_state, metrics = _take_step(step, state, tuple(batch), t)
        t += 1
        pending.append((t, epoch, metrics))
        if len(pending) >= 2 * log_every:
          flush(keep=log_every)
        if eval_fn is not None and (t % eval_every == 0 if eval_every else last):
          flush()
          value = (eval_fn(params) if "model_state" not in state
                   else eval_fn(params, state["model_state"]))
          history["eval"].append((t, jax.device_get(value)))
          _show_eval(bar, history["eval"][-1][1], shown)
        if path is not None and (t % checkpoint_every == 0 if checkpoint_every else last):
          flush()
          save_checkpoint(path, {**state, "step": t, "key": key,
                                 "history": _history_to_ckpt(history)})
        if callback is not None and callback(t, params, opt_state, metrics):
          return t
  except StopTraining:
    pass
  finally:
    flush()
  return t


def _take_step(step, state, batch, t):
  """One step on ``state`` (updated in place); a stateful one gets the key of step ``t``."""
  if "model_state" not in state:
    params, opt_state, metrics = step(state["params"], state["opt_state"], batch)
  else:
    rng_t = jax.random.fold_in(state["rng"], t)
    params, opt_state, metrics, state["model_state"] = step(
        state["params"], state["opt_state"], batch, state["model_state"], rng_t)
  state["params"], state["opt_state"] = params, opt_state
  return params, opt_state, metrics


def _record_all(history, pending, bar, shown):
  """Fetch the pending ``(t, epoch, metrics)`` in one transfer and record them."""
  if not pending:
    return
  fetched = jax.device_get([m for _, _, m in pending])
  for (t, epoch, _), m in zip(pending, fetched):
    _record(history, t, epoch, m)
  if bar is not None:
    shown["loss"] = f"{float(fetched[-1]['loss']):.4g}"
    bar.update(len(pending))
    bar.set_postfix(shown, refresh=False)


def _show_eval(bar, value, shown):
  """Put the evaluation (a scalar, or a dict of them) on the progress bar."""
  if bar is None:
    return
  values = value if isinstance(value, dict) else {"eval": value}
  shown.update({str(k): (f"{float(v):.4g}" if np.ndim(v) == 0 else str(v))
                for k, v in values.items()})
  bar.set_postfix(shown, refresh=True)


def _record(history, t, epoch, m, bar=None):
  """Append one step's host metrics ``m`` to ``history`` (and tick ``bar``)."""
  history["step"].append(t)
  history["epoch"].append(epoch)
  history["loss"].append(float(m["loss"]))
  history["grad_norm"].append(float(m["grad_norm"]))
  history["skipped"].append(bool(m["skipped"]))
  if bar is not None:
    bar.update(1)
    bar.set_postfix(loss=f"{float(m['loss']):.4g}", refresh=False)
