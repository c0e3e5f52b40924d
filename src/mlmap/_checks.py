"""Trace-time argument checks and small pytree helpers shared by the modules (private)."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def is_concrete(x) -> bool:
  """True when ``x`` holds known values at trace time (not a jax Tracer)."""
  return not isinstance(x, jax.core.Tracer)


def check_positive(name: str, value, fn: str) -> None:
  """Raise ``ValueError`` if a concrete ``value`` has an entry <= 0 (or NaN)."""
  if value is None or not is_concrete(value):
    return
  arr = np.asarray(value)
  if arr.dtype.kind not in "biuf" or arr.size == 0:
    return
  if not np.all(arr > 0):
    bad = arr if arr.ndim == 0 else arr[~(arr > 0)].ravel()[:3]
    raise ValueError(f"{fn}: {name} must be > 0, got {bad}.")


def check_nonnegative(name: str, value, fn: str) -> None:
  """Raise ``ValueError`` if a concrete ``value`` is not a number >= 0.

  ``None``, callables (an optax schedule as ``learning_rate``) and traced values
  pass unchecked.
  """
  if value is None or callable(value) or not is_concrete(value):
    return
  arr = np.asarray(value)
  if arr.dtype.kind not in "biuf" or not np.all(arr >= 0):
    hint = " (a number or an optax schedule)" if name == "learning_rate" else ""
    raise ValueError(f"{fn}: {name} must be >= 0{hint}, got {value!r}.")


def tree_float_dtype(tree):
  """The dtype of ``tree``'s leaves promoted with Python ``float`` (weak)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.result_type(*leaves, float) if leaves else jnp.result_type(float)


def tree_all_finite(tree):
  """Scalar bool: every floating leaf of ``tree`` is finite (integer leaves always are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def check_targets_shape(fn: str, outputs, targets, what: str = "outputs") -> None:
  """Targets must broadcast *to* the outputs' shape, never enlarge it.

  This is stricter than numpy broadcasting on purpose: outputs of shape
  ``[B, 1]`` with targets of shape ``[B]`` would silently broadcast to
  ``[B, B]`` and sum B^2 terms.
  """
  o, t = jnp.shape(outputs), jnp.shape(targets)
  try:
    b = jnp.broadcast_shapes(o, t)
  except ValueError:
    b = None
  if b != tuple(o):
    raise ValueError(
        f"{fn}: {what} shape {tuple(o)} and targets shape {tuple(t)} do not "
        f"match (targets must broadcast to the {what}' shape).")


def check_float(fn: str, name: str, x) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    raise TypeError(f"{fn}: {name} must be a floating array, got dtype "
                    f"{jnp.result_type(x)}.")


def check_tree_like(fn: str, name: str, tree, ref, ref_name: str = "params") -> None:
  """Raise ``ValueError`` unless ``tree`` has the structure and leaf shapes of ``ref``."""
  t_def, r_def = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(ref)
  if t_def != r_def:
    raise ValueError(f"{fn}: {name} tree structure {t_def} differs from "
                     f"{ref_name} tree structure {r_def}.")
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
          f"{fn}: {name} leaf shapes {[jnp.shape(x) for x in jax.tree_util.tree_leaves(tree)]} "
          f"differ from {ref_name} leaf shapes "
          f"{[jnp.shape(x) for x in jax.tree_util.tree_leaves(ref)]}.")
