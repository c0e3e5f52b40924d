"""Checkpoints that are safe to load: save_checkpoint / load_checkpoint (private module).

Checkpoint format. A checkpoint is one file: a JSON header (format name, format
version, the tree's structure and every leaf's path, shape, dtype and weak type),
a ``flax.serialization`` msgpack payload of the leaves as numpy arrays, and a
SHA-256 digest. The choice, against pickle and orbax-checkpoint:

* msgpack holds data only, so loading a checkpoint cannot execute code (a
  pickle runs whatever its file holds); the header lets ``load_checkpoint``
  check the structure, shapes and dtypes before any value is used;
* one file keeps the atomic-rename guarantee: written to a temporary file in the
  same directory, fsync'd, published by ``os.replace`` (a directory of files, as
  orbax writes, cannot be renamed into place atomically over an old one);
* it needs no asynchronous machinery (orbax writes directories asynchronously,
  with threads and a commit protocol); a checkpoint here is written when
  ``save_checkpoint`` returns.

Pre-format (pickle) checkpoints are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle  # only for allow_pickle=True: converting pre-format checkpoints
import socket
import struct
import tempfile

import numpy as np
import jax
import jax.numpy as jnp
from flax import serialization
from jax import lax

from mlmap import _checks

_tmap = jax.tree_util.tree_map


# --- checkpoints -----------------------------------------------------------------
#
# File layout (one file, so that a single os.replace publishes it atomically):
#   _MAGIC | header length (uint64, little endian) | JSON header | msgpack payload
#   | SHA-256 of everything before it (32 bytes)
# The header names the format and its version and describes the tree: every node
# (dict keys, list/tuple, namedtuple fields, other pytree nodes) and every leaf's
# path, kind, shape, dtype and weak type. The payload is
# ``flax.serialization.msgpack_serialize({"0": leaf0, "1": leaf1, ...})`` of numpy
# arrays and Python scalars.

_FORMAT = "mlmap-checkpoint"
_FORMAT_VERSION = 1
_MAGIC = b"MLMAP-CKPT\n"
_DIGEST = 32
_PICKLE_HINT = (
    "Convert a file you trust once with "
    "mm.save_checkpoint(path, mm.load_checkpoint(path, allow_pickle=True)); "
    "never pass allow_pickle=True for a file you did not write yourself: loading a "
    "pickle runs any code it holds.")


def _tmp_prefix(name: str) -> str:
  return f".{name}.tmp-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except (OverflowError, ValueError, OSError):
    return False
  return True


def _remove_stale_temps(directory: str, name: str) -> None:
  """Remove temp files of checkpoint ``name`` left by writers that died (killed mid-write).

  Temp files are named ``.{name}.tmp-{host}.{pid}.{random}``; one is stale when
  it was written on this host by a process that no longer exists. Files of live
  writers and of other hosts (a shared file system) are left alone. Off POSIX,
  where liveness cannot be probed safely, nothing is removed.
  """
  if os.name != "posix":
    return
  prefix, host = _tmp_prefix(name), socket.gethostname()
  for entry in os.listdir(directory):
    if not entry.startswith(prefix):
      continue
    parts = entry[len(prefix):].rsplit(".", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
      continue
    if not _pid_alive(int(parts[1])):
      try:
        os.remove(os.path.join(directory, entry))
      except FileNotFoundError:  # another saver removed it first
        pass


def _one_level(x):
  """``(kind, name, keys, children, treedef)`` of the top node of pytree ``x``."""
  if x is None:
    return "none", None, [], [], None
  tdef = jax.tree_util.tree_structure(x)
  if tdef.num_nodes == 1 and tdef.num_leaves == 1:
    return "leaf", None, [], [], None
  pairs, tdef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  kids = [c for _, c in pairs]
  keys = [_checks.leaf_path(k) for k, _ in pairs]
  if type(x) is dict:
    return "dict", None, [k[0].key for k, _ in pairs], kids, tdef
  if type(x) in (list, tuple):
    return type(x).__name__, None, [], kids, tdef
  if isinstance(x, tuple) and hasattr(x, "_fields"):
    return "namedtuple", type(x).__name__, list(x._fields), kids, tdef
  return "node", f"{type(x).__module__}.{type(x).__qualname__}", keys, kids, tdef


def _leaf_record(path: str, x):
  """``(spec, value)``: the header entry of one leaf and what the payload stores."""
  spec = {"path": path}
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise ValueError(
          f"save_checkpoint: leaf '{path}' is not fully addressable from this process "
          "(a multi-host array); gather it first with "
          "jax.experimental.multihost_utils.process_allgather.")
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      value = np.asarray(jax.device_get(jax.random.key_data(x)))
      spec.update(kind="key", shape=list(x.shape), dtype=str(x.dtype),
                  impl=str(jax.random.key_impl(x)), weak_type=False)
      return spec, value
    value = np.asarray(jax.device_get(x))
    if _dtype_class(value.dtype) not in ("bool", "integer", "floating", "complexfloating"):
      raise TypeError(f"save_checkpoint: leaf '{path}' has dtype {value.dtype}; a "
                      "checkpoint holds boolean, integer, floating and complex arrays.")
    spec.update(kind="scalar" if isinstance(x, np.generic) else "array",
                shape=list(value.shape), dtype=value.dtype.name,
                weak_type=bool(getattr(x, "weak_type", False)))
    return spec, np.array(value, order="C", copy=not value.flags.c_contiguous)
  for kind in (bool, int, float, complex, str):
    if isinstance(x, kind):
      spec.update(kind=kind.__name__, shape=[], dtype=kind.__name__, weak_type=False)
      return spec, (np.asarray(x) if kind is complex else x)
  raise TypeError(
      f"save_checkpoint: leaf '{path}' is a {type(x).__name__}; a checkpoint holds "
      "arrays, PRNG keys, Python numbers, strings and None only (data, never code).")


def _describe(x, path, specs, values):
  """JSON description of pytree ``x``; appends leaf specs and payload values."""
  kind, name, keys, kids, _ = _one_level(x)
  where = "/".join(path) or "<root>"
  if kind == "leaf":
    spec, value = _leaf_record(where, x)
    specs.append(spec)
    values.append(value)
    return {"type": "leaf", "index": len(specs) - 1}
  if kind == "dict":
    for k in keys:
      if not isinstance(k, (str, int)):
        raise TypeError(f"save_checkpoint: dict key {k!r} at '{where}' is a "
                        f"{type(k).__name__}; only str and int keys are stored.")
  labels = [str(k) for k in keys] if keys else [str(i) for i in range(len(kids))]
  children = [_describe(c, path + [lab], specs, values) for c, lab in zip(kids, labels)]
  return {"type": kind, "name": name, "keys": keys, "children": children}


def _build(node, specs, values):
  """The tree a checkpoint holds, without ``like``: dicts, lists, tuples, namedtuples."""
  kind = node["type"]
  if kind == "leaf":
    return _plain_leaf(specs[node["index"]], values[node["index"]])
  if kind == "none":
    return None
  kids = [_build(c, specs, values) for c in node["children"]]
  if kind == "list":
    return kids
  if kind == "tuple":
    return tuple(kids)
  if kind == "namedtuple":
    try:
      return collections.namedtuple(node["name"], node["keys"])(*kids)
    except (ValueError, TypeError):  # not valid identifiers: fall back to a dict
      pass
  return dict(zip(node["keys"], kids))


def _plain_leaf(spec, value):
  if spec["kind"] == "key":
    return jax.random.wrap_key_data(jnp.asarray(value), impl=spec["impl"])
  if spec["kind"] in ("array", "scalar"):
    value = np.array(value)  # a writable copy of the payload's buffer
    return value[()] if spec["kind"] == "scalar" else value
  if spec["kind"] == "complex":
    return complex(value)
  return value


# Python scalar leaves: (kind, type, dtype); bool before int, which it subclasses.
_PY_SCALARS = (("bool", bool, np.bool_), ("int", int, np.int64),
               ("float", float, np.float64), ("complex", complex, np.complex128))


def _dtype_class(dtype) -> str:
  """bool, integer, floating, complexfloating or key: what a cast must keep."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return "key"
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:  # object, str, datetime: not a number
    return str(np.dtype(dtype))
  for cls in (np.bool_, np.integer, np.floating, np.complexfloating):
    if jnp.issubdtype(dtype, cls):
      return cls.__name__
  return str(dtype)


def _spec_class(spec) -> str:
  if spec["kind"] in ("key", "str"):
    return spec["kind"]
  py = {kind: dtype for kind, _, dtype in _PY_SCALARS}
  return _dtype_class(py.get(spec["kind"], spec["dtype"]))


def _like_dtype(ref):
  if isinstance(ref, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
    return ref.dtype
  for _, typ, dtype in _PY_SCALARS:
    if isinstance(ref, typ):
      return np.dtype(dtype)
  return None


def _like_class(ref) -> str:
  if isinstance(ref, str):
    return "str"
  dtype = _like_dtype(ref)
  return type(ref).__name__ if dtype is None else _dtype_class(dtype)


def _as_weak(x, ref):
  """``x`` with ``ref``'s weak type (``lax.full_like`` keeps the reference's weak type)."""
  zero = lax.full_like(ref, 0, shape=())
  flat = jax.vmap(lambda v: lax.full_like(zero, v))(x.reshape(-1))
  return flat.reshape(x.shape)


def _cast_leaf(spec, value, ref, where, ctx):
  """The checkpoint leaf ``value`` as the type, dtype, weak type and sharding of ``ref``."""
  fn, file, label = ctx
  got, want = tuple(spec["shape"]), tuple(np.shape(ref))
  if got != want:
    raise ValueError(f"{fn}: checkpoint {file} leaf '{where}' has shape {got}, "
                     f"{label} has shape {want} (a checkpoint of another model?).")
  if _spec_class(spec) != _like_class(ref):
    raise ValueError(
        f"{fn}: checkpoint {file} leaf '{where}' has dtype {spec['dtype']} "
        f"({_spec_class(spec)}), {label} has dtype {_like_dtype(ref) or type(ref).__name__} "
        f"({_like_class(ref)}).")
  if isinstance(ref, (jax.Array, jax.ShapeDtypeStruct)):
    if spec["kind"] == "key":
      out = jax.random.wrap_key_data(jnp.asarray(value), impl=spec["impl"])
    else:
      out = jnp.asarray(np.asarray(value).astype(ref.dtype, copy=False))
      if getattr(ref, "weak_type", False):
        out = _as_weak(out, ref if isinstance(ref, jax.Array) else jnp.zeros((), ref.dtype))
    sharding = getattr(ref, "sharding", None)
    return out if sharding is None else jax.device_put(out, sharding)
  if isinstance(ref, np.ndarray):
    return np.array(value, dtype=ref.dtype)
  if isinstance(ref, np.generic):
    return ref.dtype.type(value)
  return type(ref)(value.item() if isinstance(value, np.ndarray) else value)


def _node_words(kind, name, keys) -> str:
  if kind in ("leaf", "none"):
    return "a leaf" if kind == "leaf" else "None"
  if kind in ("list", "tuple"):
    return f"a {kind}"
  what = {"dict": "a dict", "namedtuple": f"a namedtuple {name}", "node": f"a {name}"}[kind]
  return f"{what} with keys {list(keys)}"


def _restore_like(node, like, path, specs, values, ctx):
  """Rebuild ``node`` on the structure, dtypes, weak types and shardings of ``like``."""
  fn, file, label = ctx
  where = "/".join(path) or "<root>"
  kind, name, keys, kids, tdef = _one_level(like)
  ck_kind = node["type"]
  same = (ck_kind == kind and node.get("name") == name and list(node.get("keys") or []) == keys
          and len(node.get("children", [])) == len(kids))
  if not same:
    ck = _node_words(ck_kind, node.get("name"), node.get("keys") or [])
    if ck_kind in ("list", "tuple"):
      ck += f" of {len(node['children'])}"
    mine = _node_words(kind, name, keys) + (f" of {len(kids)}" if kind in ("list", "tuple")
                                            else "")
    raise ValueError(
        f"{fn}: checkpoint {file}: the checkpoint tree differs from the expected tree "
        f"({label}) at '{where}': the checkpoint has {ck}, {label} has {mine} "
        "(written by another model or optimizer?).")
  if kind == "leaf":
    i = node["index"]
    return _cast_leaf(specs[i], values[i], like, specs[i]["path"], ctx)
  if kind == "none":
    return None
  labels = [str(k) for k in keys] if keys else [str(i) for i in range(len(kids))]
  rebuilt = [_restore_like(c, r, path + [lab], specs, values, ctx)
             for c, r, lab in zip(node["children"], kids, labels)]
  return jax.tree_util.tree_unflatten(tdef, rebuilt)


def save_checkpoint(path, tree) -> None:
  """Write ``tree`` to ``path`` atomically, in a format that holds data only.

  The file is a JSON header (format name and version, the tree's structure,
  every leaf's path, shape, dtype and weak type), a
  ``flax.serialization.msgpack`` payload of the leaves as numpy arrays, and a
  SHA-256 digest of both. Sharded ``jax.Array`` leaves are gathered to the host.
  Leaves may be arrays, typed PRNG keys, Python numbers and strings; nodes dicts
  (str or int keys), lists, tuples, namedtuples, None and other registered
  pytree nodes.

  The bytes go to a temporary file ``.{name}.tmp-{host}.{pid}.*`` in the same
  directory, are fsync'd, and are renamed over ``path`` with ``os.replace``: a
  crash leaves either the old or the new checkpoint, never a partial one.
  Temporary files of ``path`` left by a writer that was killed are removed first.

  Args:
    path: file to write; its directory is created if needed.
    tree: the pytree to store.

  Raises:
    TypeError: a leaf that is not data (a callable, an object array), naming its
      path.
  """
  specs, values = [], []
  node = _describe(tree, [], specs, values)
  header = json.dumps({"format": _FORMAT, "version": _FORMAT_VERSION, "tree": node,
                       "leaves": specs}).encode()
  payload = serialization.msgpack_serialize({str(i): v for i, v in enumerate(values)})
  parts = [_MAGIC, struct.pack("<Q", len(header)), header, payload]
  digest = hashlib.sha256()
  for p in parts:
    digest.update(p)
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  _remove_stale_temps(directory, name)
  fd, tmp = tempfile.mkstemp(
      prefix=f"{_tmp_prefix(name)}{socket.gethostname()}.{os.getpid()}.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      for p in parts + [digest.digest()]:
        f.write(p)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Make the rename itself durable (POSIX); best effort elsewhere."""
  if not hasattr(os, "O_DIRECTORY"):
    return
  fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _looks_like_pickle(data: bytes) -> bool:
  # Protocol 2+ pickles start with PROTO (0x80) and the protocol number.
  return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _unreadable(fn, path, why):
  return ValueError(f"{fn}: checkpoint {path} is unreadable: {why}.")


def _read(path, allow_pickle, fn):
  """``(node, specs, values, pickled)`` of the checkpoint file ``path``, verified.

  ``pickled`` is ``(tree,)`` for a pre-format file unpickled with
  ``allow_pickle``, else None.
  """
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(_MAGIC):
    if allow_pickle:
      try:
        tree = pickle.loads(data)  # the caller vouched for this file  # noqa: S301
      except Exception as e:
        raise _unreadable(fn, path, f"not an mlmap checkpoint, nor a pickle ({e})") from e
      return None, None, None, (tree,)
    if _looks_like_pickle(data):
      raise ValueError(
          f"{fn}: {path} is a pre-format (pickle) checkpoint, written by mlmap before "
          f"checkpoint format version 1; it is refused because loading a pickle can "
          f"run code. {_PICKLE_HINT}")
    raise _unreadable(fn, path, "it does not start with the mlmap checkpoint header "
                      "(an empty, truncated or foreign file; a pickle of another "
                      "protocol loads only with allow_pickle=True)")
  start = len(_MAGIC) + 8
  if len(data) < start + _DIGEST:
    raise _unreadable(fn, path, f"it is truncated ({len(data)} bytes)")
  (hlen,) = struct.unpack("<Q", data[len(_MAGIC):start])
  try:
    header = json.loads(data[start:start + hlen].decode())
    version, node, specs = header["version"], header["tree"], header["leaves"]
    if header["format"] != _FORMAT:
      raise ValueError(f"format {header['format']!r}")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise _unreadable(fn, path, f"its header is corrupt ({e})") from e
  if not isinstance(version, int) or version > _FORMAT_VERSION:
    raise ValueError(f"{fn}: checkpoint {path} has format version {version!r}; this "
                     f"mlmap reads versions up to {_FORMAT_VERSION}. Upgrade mlmap.")
  body = data[:-_DIGEST]
  if hashlib.sha256(body).digest() != data[-_DIGEST:]:
    raise _unreadable(fn, path, "its SHA-256 digest does not match (truncated or "
                      "corrupt)")
  try:
    state = serialization.msgpack_restore(body[start + hlen:])
    values = [state[str(i)] for i in range(len(specs))]
    for spec, value in zip(specs, values):
      _check_payload_leaf(spec, value)
  except Exception as e:  # the digest matched: a writer bug, still say which file
    raise _unreadable(fn, path, f"its payload does not decode ({e})") from e
  return node, specs, values, None


def _check_payload_leaf(spec, value):
  """The payload value of a leaf must be what its header entry says."""
  if spec["kind"] in ("array", "scalar", "key"):
    dtype = "uint32" if spec["kind"] == "key" else spec["dtype"]
    ok = isinstance(value, np.ndarray) and (spec["kind"] == "key" or (
        list(value.shape) == spec["shape"] and value.dtype.name == dtype))
  else:
    ok = type(value).__name__ == spec["kind"] or (
        spec["kind"] == "complex" and isinstance(value, np.ndarray))
  if not ok:
    raise ValueError(f"leaf '{spec['path']}' holds {type(value).__name__} "
                     f"{getattr(value, 'shape', '')} where the header says {spec['kind']} "
                     f"{spec['shape']} {spec['dtype']}")


def load_checkpoint(path, like=None, *, allow_pickle=False):
  """Load a checkpoint written by :func:`save_checkpoint`; never runs code from it.

  Without ``like`` the tree comes back with numpy arrays, Python scalars and
  typed PRNG keys as leaves, and dicts, lists, tuples and namedtuples (re-made
  from their recorded names; other pytree nodes become dicts) as nodes.

  With ``like`` (a pytree of arrays, ``jax.ShapeDtypeStruct``, numpy arrays or
  Python scalars), the checkpoint must have ``like``'s tree structure and, leaf by
  leaf, its shape and dtype class (bool, integer, floating, complex, key). Each
  leaf then takes ``like``'s node classes, dtype, JAX weak type (a weak-typed
  scalar stays weak) and sharding (``jax.device_put`` onto the ``like`` leaf's
  sharding), so a jitted step sees the argument types it had before the
  interruption: no recompilation and identical arithmetic.

  Args:
    path: the checkpoint file.
    like: optional reference pytree (see above).
    allow_pickle: also load a pickle (a checkpoint of mlmap before format
      version 1). Only for a file you trust: a pickle can run any code.

  Returns:
    The stored tree.

  Raises:
    ValueError: the file is corrupt or truncated ("unreadable", naming the path);
      it is a pickle and ``allow_pickle`` is False; its format version is newer
      than this mlmap reads; or it does not match ``like`` (naming the leaf path
      and both shapes, or both dtypes).
  """
  node, specs, values, pickled = _read(path, allow_pickle, "load_checkpoint")
  if pickled is not None:
    if like is None:
      return pickled[0]
    specs, values = [], []
    node = _describe(pickled[0], [], specs, values)
  if like is None:
    return _build(node, specs, values)
  return _restore_like(node, like, [], specs, values, ("load_checkpoint", path, "like="))
