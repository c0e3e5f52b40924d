"""Training: a jitted step that skips non-finite updates, and a resumable fit loop.

``make_train_step`` works with plain optax optimizers and with mlmap's
second-order ones (which receive the batch as ``batch=(inputs, targets)``).
``fit`` runs epochs of minibatches with a tqdm progress bar and checkpoints
``(params, opt_state, step, key)`` atomically, so that a resumed run continues
bit-for-bit as if it had never been interrupted.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mlmap import _checks

_tmap = jax.tree_util.tree_map
CHECKPOINT_NAME = "checkpoint.ckpt"


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

  Args:
    objective: ``objective(params, inputs, targets) -> scalar`` (e.g. an nlp).
    tx: an ``optax.GradientTransformation``; extra args are passed as
      ``batch=(inputs, targets)`` (plain optax transformations ignore them via
      ``optax.with_extra_args_support``).
    jit: return the ``jax.jit``-compiled step (default) or the plain function.

  Returns:
    ``step``; ``metrics`` is a dict of scalars ``loss`` (at the old params),
    ``grad_norm`` (global L2 norm of ``g``) and ``skipped`` (bool).

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

  def step(params, opt_state, batch):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
      raise ValueError(f"train step: batch must be a pair (inputs, targets), got "
                       f"{type(batch).__name__}.")
    inputs, targets = batch
    loss, grads = jax.value_and_grad(objective)(params, inputs, targets)
    grad_norm = optax.tree.norm(grads)
    finite_in = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, new_state = tx.update(grads, opt_state, params, batch=(inputs, targets))
      new_params = optax.apply_updates(params, updates)
      ok = _checks.tree_all_finite((new_params, new_state, updates))
      return new_params, new_state, ok

    def skip(_):
      return params, opt_state, jnp.asarray(False)

    new_params, new_state, ok = lax.cond(finite_in, apply, skip, None)
    new_params = _tmap(lambda n, o: jnp.where(ok, n, o), new_params, params)
    new_state = _tmap(lambda n, o: jnp.where(ok, n, o), new_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok}
    return new_params, new_state, metrics

  return jax.jit(step) if jit else step


# --- checkpoints -----------------------------------------------------------------

def save_checkpoint(path, tree) -> None:
  """Pickle ``tree`` (converted to numpy) to ``path`` atomically.

  Written to a temporary file in the same directory, flushed to disk, then
  renamed over ``path`` with ``os.replace``: a crash leaves either the old or the
  new checkpoint, never a partial one.
  """
  tree = jax.device_get(tree)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      pickle.dump(tree, f, protocol=pickle.HIGHEST_PROTOCOL)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_checkpoint(path, like=None):
  """Load a checkpoint; with ``like``, cast it onto that tree's structure and dtypes.

  Casting restores each leaf's dtype and JAX weak type exactly (a weak-typed
  scalar stays weak), so a jitted step sees the same argument types as before
  the interruption: no recompilation and identical arithmetic.
  """
  with open(path, "rb") as f:
    tree = pickle.load(f)
  return tree if like is None else _cast_like(tree, like)


def _cast_like(tree, like):
  ref_def, got_def = jax.tree_util.tree_structure(like), jax.tree_util.tree_structure(tree)
  if ref_def != got_def:
    raise ValueError(f"load_checkpoint: checkpoint tree {got_def} differs from the "
                     f"expected tree {ref_def} (written by another model or optimizer?).")

  def cast(ref, value):
    value = np.asarray(value)
    if getattr(ref, "weak_type", False) and value.ndim == 0:
      return jnp.zeros_like(ref) + value.item()  # stays weak-typed
    return jnp.asarray(value, dtype=jnp.result_type(ref))
  return _tmap(cast, like, tree)


def _key_to_numpy(key):
  if key is None:
    return None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return {"typed": np.asarray(jax.random.key_data(key)),
            "impl": str(jax.random.key_impl(key))}
  return np.asarray(key)


def _key_from_numpy(data):
  if data is None or not isinstance(data, dict):
    return None if data is None else jnp.asarray(data)
  return jax.random.wrap_key_data(jnp.asarray(data["typed"]), impl=data["impl"])


# --- fit -------------------------------------------------------------------------

class FitResult(NamedTuple):
  """Result of :func:`fit`.

  Attributes:
    params: final parameters.
    opt_state: final optimizer state.
    step: number of steps taken in total (including before a resume).
    history: dict of lists: ``step``, ``epoch``, ``loss``, ``grad_norm``,
      ``skipped`` per step, and ``eval`` as ``(step, value)`` pairs.
  """
  params: Any
  opt_state: Any
  step: int
  history: dict


class StopTraining(Exception):
  """Raise from a ``callback`` to stop :func:`fit` (no checkpoint is written)."""


def _batches(data, batch_size, key, epoch):
  """Minibatches of the array pair ``data`` for one epoch (drop the remainder)."""
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  if key is None:
    order = np.arange(n)
  else:
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
  for i in range(n // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield _tmap(lambda a: a[idx], data)


def fit(step, params, opt_state, data, *, epochs=1, batch_size=None, key=None,
        tx=None, eval_fn: Optional[Callable] = None, eval_every=None,
        checkpoint_dir=None, checkpoint_every=None, resume=True,
        callback: Optional[Callable] = None, progress=True) -> FitResult:
  r"""Train for ``epochs`` over minibatches, with history, evaluation and checkpoints.

  Epoch ``e`` visits the examples in the order
  ``jax.random.permutation(jax.random.fold_in(key, e), n)`` (no shuffling when
  ``key`` is None) in ``n // batch_size`` batches; the remainder is dropped so
  every batch has one shape (one compilation). The order depends only on
  ``(key, e)``, so a run resumed from a checkpoint of
  ``(params, opt_state, step, key)`` replays exactly the batches it would have
  seen and its parameters are bit-for-bit those of an uninterrupted run.

  Args:
    step: a step from :func:`make_train_step`, or an objective
      ``f(params, inputs, targets)`` together with ``tx=`` (then the step is
      built here, and ``opt_state=None`` means ``tx.init(params)``).
    params: initial parameters.
    opt_state: initial optimizer state.
    data: ``(inputs, targets)`` arrays (pytrees allowed) with a leading example
      axis; or a callable ``data(epoch) -> iterable of (inputs, targets)``
      batches that yields the same batches for the same epoch (then
      ``batch_size`` and ``key`` are unused).
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
      params, opt_state, step, key and history replace the ones given.
    callback: ``callback(step, params, opt_state, metrics)`` after every step;
      returning True (or raising :class:`StopTraining`) stops training.
    progress: show a tqdm progress bar.

  Returns:
    A :class:`FitResult` ``(params, opt_state, step, history)``.
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
  if not isinstance(epochs, (int, np.integer)) or epochs < 0:
    raise ValueError(f"{fn}: epochs must be an integer >= 0, got {epochs!r}.")
  if callable(data):
    epoch_batches = data
    steps_per_epoch = None
  else:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
      raise ValueError(f"{fn}: data must be (inputs, targets) arrays or a callable "
                       f"epoch -> batches, got {type(data).__name__}.")
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    batch_size = n if batch_size is None else int(batch_size)
    if not 1 <= batch_size <= n:
      raise ValueError(f"{fn}: batch_size must lie in [1, {n}] (n examples), got "
                       f"{batch_size}.")
    steps_per_epoch = n // batch_size
    epoch_batches = lambda e: _batches(data, batch_size, key, e)  # noqa: E731  (late-bound key)
  for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{fn}: {name} must be an integer >= 1 or None, got {value!r}.")

  history = {"step": [], "epoch": [], "loss": [], "grad_norm": [], "skipped": [],
             "eval": []}
  start = 0
  path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_NAME)
  if path is not None and resume and os.path.exists(path):
    ckpt = load_checkpoint(path)
    state = _cast_like({"params": ckpt["params"], "opt_state": ckpt["opt_state"]},
                       {"params": params, "opt_state": opt_state})
    params, opt_state = state["params"], state["opt_state"]
    start, history = int(ckpt["step"]), ckpt["history"]
    key = _key_from_numpy(ckpt["key"])

  def checkpoint(t):
    save_checkpoint(path, {"params": params, "opt_state": opt_state, "step": t,
                           "key": _key_to_numpy(key),
                           "history": history})

  def evaluate(t):
    history["eval"].append((t, jax.device_get(eval_fn(params))))

  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    tqdm = None
  total = None if steps_per_epoch is None else steps_per_epoch * epochs
  bar = (tqdm(total=total, initial=start, disable=not progress, desc=fn)
         if tqdm is not None else None)
  t = 0
  stop = False
  try:
    for epoch in range(epochs):
      if steps_per_epoch is not None and (epoch + 1) * steps_per_epoch <= start:
        t = (epoch + 1) * steps_per_epoch
        continue
      ran = False
      for batch in epoch_batches(epoch):
        if t < start:
          t += 1
          continue
        ran = True
        params, opt_state, metrics = step(params, opt_state, tuple(batch))
        t += 1
        m = jax.device_get(metrics)
        history["step"].append(t)
        history["epoch"].append(epoch)
        history["loss"].append(float(m["loss"]))
        history["grad_norm"].append(float(m["grad_norm"]))
        history["skipped"].append(bool(m["skipped"]))
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{float(m['loss']):.4g}", refresh=False)
        if eval_fn is not None and eval_every is not None and t % eval_every == 0:
          evaluate(t)
        if path is not None and checkpoint_every is not None and t % checkpoint_every == 0:
          checkpoint(t)
        if callback is not None and callback(t, params, opt_state, metrics):
          stop = True
          break
      if stop:
        break
      if ran:
        if eval_fn is not None and eval_every is None:
          evaluate(t)
        if path is not None and checkpoint_every is None:
          checkpoint(t)
  except StopTraining:
    pass
  finally:
    if bar is not None:
      bar.close()
  return FitResult(params=params, opt_state=opt_state, step=max(t, start),
                   history=history)

