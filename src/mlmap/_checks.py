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


def broadcasts_to(shape, target) -> bool:
  """True when ``shape`` broadcasts *to* ``target`` without enlarging it."""
  try:
    return jnp.broadcast_shapes(tuple(target), tuple(shape)) == tuple(target)
  except ValueError:
    return False


def check_targets_shape(fn: str, outputs, targets, what: str = "outputs") -> None:
  """Targets must broadcast *to* the outputs' shape, never enlarge it.

  This is stricter than numpy broadcasting on purpose: outputs of shape
  ``[B, 1]`` with targets of shape ``[B]`` would silently broadcast to
  ``[B, B]`` and sum B^2 terms.
  """
  o, t = jnp.shape(outputs), jnp.shape(targets)
  if not broadcasts_to(t, o):
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


def leaf_path(path) -> str:
  """A pytree key path as the user wrote it: ``['layer']['w']`` -> ``'layer/w'``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts) if parts else "<root>"


def non_float_leaves(tree) -> list:
  """``[(path, dtype), ...]`` of the leaves of ``tree`` that are not floating arrays."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
      bad.append((leaf_path(path), dt))
  return bad


def check_float_leaves(fn: str, tree, name: str = "params") -> None:
  """Raise ``TypeError`` naming every non-floating leaf of ``tree`` by its path.

  Integer or bool leaves in a parameter pytree (a step counter, a mask) are not
  weights: differentiating, penalizing or updating them is a silent mistake.
  """
  bad = non_float_leaves(tree)
  if bad:
    listed = ", ".join(f"'{p}' ({d})" for p, d in bad)
    raise TypeError(
        f"{fn}: {name} must have floating leaves only; non-floating leaves: {listed}. "
        f"Keep counters and masks out of {name} (close over them in apply_fn), or "
        "mark them None in the prior's scale tree where a prior is all that reads them.")
