"""Checks of likelihood and prior arguments (private; used by likelihoods and priors).

Concrete values are checked when the Python call is made and raise; traced values
cannot be, so the likelihoods mark an out-of-range entry NaN instead (see
:func:`nan_where_invalid`): never a plausible number.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mlmap import _checks


def check_finite_positive(name: str, value, fn: str) -> None:
  """Raise ``ValueError`` if a concrete ``value`` has an entry <= 0, ``inf`` or NaN."""
  if value is not None and _checks.is_concrete(value):
    arr = np.asarray(value)
    if arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
      bad = arr if arr.ndim == 0 else arr[~np.isfinite(arr)].ravel()[:3]
      raise ValueError(f"{fn}: {name} must be finite, got {bad}.")
  _checks.check_positive(name, value, fn)


def check_broadcasts_to(fn: str, name: str, x, outputs, what: str = "outputs") -> None:
  """``x`` must broadcast *to* ``outputs``' shape, never enlarge it (nor fail to broadcast).

  Like :func:`mlmap._checks.check_targets_shape`, for an argument other than the
  targets (a noise scale): ``sigma`` of shape ``[B, 1]`` with outputs ``[B]``
  would silently give a ``[B, B]`` result.
  """
  o, s = tuple(jnp.shape(outputs)), tuple(jnp.shape(x))
  if not _checks.broadcasts_to(s, o):
    raise ValueError(
        f"{fn}: {name} shape {s} does not broadcast to the {what}' shape {o} "
        f"({name} may have the {what}' shape or fewer/unit axes, never more).")


def concrete_range(fn: str, name: str, x, low, high, closed_high: bool = True) -> None:
  """Raise ``ValueError`` if a concrete ``x`` has an entry outside ``[low, high]``.

  ``closed_high=False`` checks ``[low, high)``. NaN entries are outside. Traced
  ``x`` passes (the caller marks its bad entries NaN).
  """
  if not _checks.is_concrete(x):
    return
  arr = np.asarray(x)  # numpy: jnp ops would be staged inside a trace
  if arr.size == 0:
    return
  upper_ok = arr <= high if closed_high else arr < high
  ok = (arr >= low) & upper_ok
  if not np.all(ok):
    bracket = "]" if closed_high else ")"
    bad = arr[~ok].ravel()
    raise ValueError(f"{fn}: {name} must lie in [{low}, {high}{bracket}; {bad.size} "
                     f"entries do not, e.g. {bad[:3].tolist()}.")


def nan_where_invalid(valid, values):
  """``values`` where ``valid``, NaN elsewhere (in ``values``' dtype; gradients stay finite)."""
  return jnp.where(valid, values, jnp.asarray(jnp.nan, values.dtype))


def nan_unless_finite_positive(result, *values):
  """``result``, or NaN where any of ``values`` (traced scales, counts) is not finite and > 0.

  The traced twin of :func:`check_finite_positive`: under ``jit`` a bad scale
  gives NaN, never a plausible number (an ``inf`` prior sigma would give a
  weight decay of exactly 0).
  """
  result = jnp.asarray(result)
  valid = jnp.asarray(True)
  for v in values:
    v = jnp.asarray(v)
    valid = valid & jnp.all(jnp.isfinite(v) & (v > 0))
  return nan_where_invalid(valid, result)
