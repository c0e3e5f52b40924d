"""Data parallelism: place a batch across devices and let JAX's SPMD partitioner run mlmap.

Nothing in mlmap needs a parallel version. Every function is a pure ``jit``-able
function of global arrays: the batch size ``B`` in ``N / B`` is the *global*
leading dimension, and sums over examples are ordinary ``jnp.sum`` calls. When the
batch arrives sharded along a mesh axis and the parameters replicated,
``jax.jit`` (the GSPMD partitioner) keeps each example on its device and turns
every sum over examples (the loss, the gradient, ``J^T H J v``, the CG inner
products) into a local sum followed by an all-reduce. The result equals the
single-device result up to float reassociation; the batch is never gathered.

This module only places data: :func:`shard_batch` splits the leading axis of
every leaf over a mesh axis with :class:`jax.sharding.NamedSharding` and
:func:`jax.device_put` (or :func:`jax.make_array_from_process_local_data` when
each host holds only its own slice), :func:`replicate` copies parameters to every
device, and :func:`make_mesh` builds a one-axis mesh. No collective is written by
hand.

Meshes here use :attr:`jax.sharding.AxisType.Auto` axes (sharding propagated by
the compiler). Under ``AxisType.Explicit`` axes (the default of
:func:`jax.make_mesh`) even ``jax.grad`` of a plain MLP raises a
``ShardingTypeError`` on the batch contraction, so sharding a batch over an
explicit axis is refused with a ``ValueError`` that says how to build an auto
mesh.

References:
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation
  Graphs", 2021, https://arxiv.org/abs/2105.04663.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mlmap import _checks

Axis = Union[str, Sequence[str]]


def make_mesh(num_devices: Optional[int] = None, axis: str = "data", *,
              devices=None) -> Mesh:
  r"""A one-axis device mesh for data parallelism, with compiler-propagated sharding.

  .. math::
    \text{mesh}[\text{axis}] = (d_0, d_1, \dots, d_{n-1}),
    \quad n = \text{num\_devices}

  Args:
    num_devices: how many devices ``n`` to use, ``1 <= n <= len(devices)``;
      ``None`` uses all of them.
    axis: the axis name that :func:`shard_batch` splits the batch over.
    devices: the devices to draw from; default ``jax.devices()`` (every device of
      every process, as multi-host data parallelism needs).

  Returns:
    A :class:`jax.sharding.Mesh` of shape ``(n,)`` with ``AxisType.Auto``.

  Examples:
    >>> import mlmap as mm
    >>> mesh = mm.make_mesh(1)
    >>> mesh.axis_names, mesh.devices.shape
    (('data',), (1,))
  """
  fn = "make_mesh"
  if not isinstance(axis, str):
    raise TypeError(f"{fn}: axis must be a string, got {axis!r}.")
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(devices)
  if (not _checks.is_concrete(num_devices) or int(num_devices) != num_devices
      or not 1 <= num_devices <= len(devices)):
    raise ValueError(f"{fn}: num_devices must be an integer in [1, {len(devices)}] "
                     f"(the available devices), got {num_devices!r}.")
  return jax.make_mesh((int(num_devices),), (axis,), axis_types=(AxisType.Auto,),
                       devices=devices[:int(num_devices)])


def _axis_tuple(fn: str, mesh, axis) -> tuple:
  """Validate ``mesh`` and ``axis``; return the axis names as a tuple."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh, got "
                    f"{type(mesh).__name__}.")
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(f"{fn}: axis must be a mesh axis name or a tuple of names, "
                    f"got {axis!r}.")
  missing = [n for n in names if n not in mesh.axis_names]
  if missing:
    raise ValueError(f"{fn}: axis {missing[0]!r} is not a mesh axis; the mesh "
                     f"has axes {tuple(mesh.axis_names)}.")
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
  explicit = [n for n in names if types.get(n) == AxisType.Explicit]
  if explicit:
    raise ValueError(
        f"{fn}: mesh axis {explicit[0]!r} has AxisType.Explicit; mlmap relies on "
        "compiler-propagated sharding of the batch. Build the mesh with "
        "mm.make_mesh or jax.make_mesh(shape, names, "
        "axis_types=(AxisType.Auto,) * len(names)).")
  return names


def _spec_entry(names: tuple):
  return names[0] if len(names) == 1 else names


def batch_sharding(mesh: Mesh, axis: Axis = "data") -> NamedSharding:
  r"""The sharding that splits a leading (batch) axis over mesh axis ``axis``.

  .. math::
    x[i] \text{ lives on device } \lfloor i \, n / B \rfloor,
    \quad n = \prod_{a \in \text{axis}} |\text{mesh}_a|

  Use it for ``jax.jit(..., in_shardings=...)`` or
  :func:`jax.make_array_from_process_local_data`.

  Args:
    mesh: a :class:`jax.sharding.Mesh` with ``AxisType.Auto`` axes.
    axis: a mesh axis name, or a tuple of names to split over their product.

  Returns:
    ``NamedSharding(mesh, PartitionSpec(axis))``.
  """
  names = _axis_tuple("batch_sharding", mesh, axis)
  return NamedSharding(mesh, PartitionSpec(_spec_entry(names)))


def _local_axis_size(mesh: Mesh, names: tuple) -> int:
  """Distinct batch shards (mesh coordinates along ``names``) this process holds."""
  dims = [mesh.axis_names.index(n) for n in names]
  pid = jax.process_index()
  coords = {tuple(idx[d] for d in dims)
            for idx, dev in np.ndenumerate(mesh.devices) if dev.process_index == pid}
  return len(coords)


def shard_batch(batch, mesh: Mesh, axis: Axis = "data", *, process_local: bool = False):
  r"""Split the leading axis of every leaf of ``batch`` across mesh axis ``axis``.

  .. math::
    X = [X^{(0)}; X^{(1)}; \dots; X^{(n-1)}], \quad X^{(k)} \in
    \mathbb{R}^{(B/n) \times \dots} \text{ on device } k

  Each leaf gets ``NamedSharding(mesh, PartitionSpec(axis))``; its other axes are
  replicated. Any mlmap function applied under ``jax.jit`` to the result (with
  parameters replicated, see :func:`replicate`) then runs data-parallel and
  returns the single-device value: ``B`` in ``N / B`` is the global batch size.

  Args:
    batch: a pytree of arrays (e.g. ``(inputs, targets)``), each with the same
      kind of leading batch axis. Host (numpy) or device arrays.
    mesh: a :class:`jax.sharding.Mesh` with ``AxisType.Auto`` axes, e.g. from
      :func:`make_mesh`.
    axis: the mesh axis name to split over, or a tuple of names (their product).
    process_local: ``False``: every process passes the whole global batch (or a
      single process holds all devices). ``True``: each process passes only its
      own slice, and the global batch is the concatenation over processes, built
      with :func:`jax.make_array_from_process_local_data` (multi-host input
      pipelines).

  Returns:
    The same pytree of global :class:`jax.Array` s, sharded along ``axis``.

  Raises:
    ValueError: a leaf's leading dimension is not divisible by the number of
      shards (both sizes in the message), a leaf is a scalar, or ``axis`` is not
      a mesh axis (the mesh's axes in the message).
    TypeError: ``mesh`` is not a Mesh.

  Examples:
    >>> import jax, numpy as np, mlmap as mm
    >>> mesh = mm.make_mesh(1)
    >>> x, t = mm.shard_batch((np.ones((4, 3)), np.zeros(4)), mesh)
    >>> x.sharding.spec == jax.sharding.PartitionSpec("data")
    True
  """
  fn = "shard_batch"
  names = _axis_tuple(fn, mesh, axis)
  n = int(np.prod([mesh.shape[a] for a in names]))
  sharding = NamedSharding(mesh, PartitionSpec(_spec_entry(names)))
  n_check = _local_axis_size(mesh, names) if process_local else n
  where = "this process's slice of the batch" if process_local else "batch"

  def put(path, leaf):
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path) or "batch"
    if len(shape) == 0:
      raise ValueError(f"{fn}: leaf {name} is a scalar; every leaf needs a leading "
                       "batch axis to shard.")
    if n_check == 0 or shape[0] % n_check:
      raise ValueError(
          f"{fn}: leaf {name} has leading dimension {shape[0]} (shape {shape}), "
          f"not divisible by {n_check}, the number of shards of the {where} along "
          f"mesh axis {names if len(names) > 1 else names[0]!r}. Drop or pad "
          "examples so that it divides.")
    if process_local:
      return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    return jax.device_put(leaf, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree, mesh: Mesh):
  r"""Place a full copy of every leaf of ``tree`` (e.g. parameters) on every mesh device.

  .. math::
    w \text{ on device } k = w \quad \forall k

  Args:
    tree: a pytree of arrays (parameters, optimizer state). Every process must
      pass the same values.
    mesh: a :class:`jax.sharding.Mesh`.

  Returns:
    The pytree with ``NamedSharding(mesh, PartitionSpec())`` on every leaf.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"replicate: mesh must be a jax.sharding.Mesh, got "
                    f"{type(mesh).__name__}.")
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
