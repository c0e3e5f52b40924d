"""Find the dense and convolution layers of a model from its jaxpr (private).

No registration and no annotation: ``jax.make_jaxpr(apply_fn)(params, inputs)``
is read once, and a layer is a ``dot_general`` or ``conv_general_dilated`` one of
whose operands is a single parameter leaf, seen through index-only operations
(``reshape``, ``transpose``, ``convert_element_type``, ``broadcast_in_dim``,
``squeeze``, ``expand_dims``, ``copy``) that move its entries without
duplicating them. Its bias is the parameter leaf added to the op's output
(flax ``Dense``/``Conv``, ``nnx.Linear``/``nnx.Conv``, ``x @ p["w"] + p["b"]``).

Sub-jaxprs of ``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``,
``checkpoint`` and ``closed_call`` are inlined when they contain a
``dot_general`` or a convolution (flax wraps calls in them); others (e.g.
``jax.nn.relu``'s ``custom_jvp``) are evaluated as they are, with their own
derivative rules. Control flow (``scan``, ``while``, ``cond``) is not entered:
a layer inside ``nn.scan`` is not found and its leaves get diagonal blocks.

A leaf is a layer weight only when that op is its one use. A leaf used by two
ops (weight sharing, tied embeddings), used elsewhere as well (a penalty inside
``apply_fn``, a scalar temperature), or reaching the op through a broadcast
that repeats its entries, is *uncovered*: the Kronecker machinery gives it an
exact diagonal block instead. A bias is folded only when the op's output has the
bias ``add`` as its single consumer and the bias leaf has no other use.

:func:`trace_model` returns a :class:`TracedModel` that re-evaluates the model
with a small interpreter, recording each layer's input ``a`` and adding a
perturbation ``e_l`` to each layer's pre-activation ``s_l`` (after the bias), so
``jax.vjp`` in the perturbations gives :math:`\\partial z / \\partial s_l`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util
from jax.extend import core as _jcore

from mlmap import _checks

_CHAIN = frozenset({"reshape", "transpose", "convert_element_type",
                    "broadcast_in_dim", "squeeze", "expand_dims", "copy", "copy_p"})
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                     "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint",
                     "remat", "remat2"})
_LAYER_OPS = frozenset({"dot_general", "conv_general_dilated"})


@tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer found in the traced model (batch-size independent, hashable).

  The layer computes ``s = a @ M (+ b)`` row by row, where ``M`` is the weight
  leaf viewed as a ``(in_dim, out_dim)`` matrix: ``M.ravel()[r] =
  leaf.ravel()[weight_perm[r]]`` (``weight_perm`` is ``None`` for the common
  row-major identity, e.g. flax ``kernel`` ``[in, out]``), and ``b[j] =
  bias_leaf.ravel()[bias_perm[j]]``. For a convolution ``a`` is the image patch
  at one output position, ordered (window position..., input channel) so that a
  flax ``HWIO`` kernel is ``M = kernel.reshape(-1, C_out)``, and
  ``in_dim = prod(window) * C_in``.

  Attributes:
    kind: ``"dense"`` or ``"conv"``.
    weight: the weight leaf's path (``_checks.leaf_path`` form, e.g. ``"Dense_0/kernel"``).
    bias: the bias leaf's path, or ``None``.
    weight_index: the weight's position in ``jax.tree_util.tree_leaves(params)``.
    bias_index: the bias's position, or ``None``.
    in_dim: rows of ``M`` (without the folded bias row).
    out_dim: columns of ``M``.
    weight_perm: ``None`` or a tuple mapping ``M``'s row-major entries to the leaf's.
    bias_perm: ``None`` or a tuple mapping the output index to the bias leaf's.
  """
  kind: str
  weight: str
  bias: Optional[str]
  weight_index: int
  bias_index: Optional[int]
  in_dim: int
  out_dim: int
  weight_perm: Optional[tuple] = None
  bias_perm: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class _Site:
  """Per-trace details of a layer (they depend on the batch shape)."""
  op_eqn: int            # index of the dot/conv in the flat program
  out_id: int            # the var the perturbation is added to
  x_pos: int             # operand position of the input ``a``
  a_perm: tuple          # dense: transpose of ``a`` to [rows..., in...]
  s_perm: tuple          # transpose of ``s`` to [rows..., out...]
  s_shape: tuple
  s_dtype: Any
  conv: Optional[dict]   # conv_general_dilated parameters for the patches


@dataclasses.dataclass
class _Eqn:
  prim: Any
  params: dict
  ins: list        # ("var", id) | ("val", value)
  outs: list       # ids
  out_avals: list
  eqn: Any         # the original JaxprEqn (for get_bind_params / ctx)


def _sub_jaxpr(eqn):
  """``(jaxpr, consts)`` of a call-like equation to inline, else ``None``."""
  if eqn.primitive.name not in _INLINE:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if sub is None:
      continue
    if isinstance(sub, _jcore.ClosedJaxpr):
      return sub.jaxpr, list(sub.consts)
    if isinstance(sub, _jcore.Jaxpr):
      return sub, []
  return None


def _has_layer_op(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _LAYER_OPS:
      return True
    sub = _sub_jaxpr(eqn)
    if sub is not None and _has_layer_op(sub[0]):
      return True
    for v in eqn.params.values():  # control flow: look, but it is not entered
      if isinstance(v, _jcore.ClosedJaxpr) and _has_layer_op(v.jaxpr):
        return True
  return False


class _Flattener:
  """Inline call-like sub-jaxprs that hold layer ops into one flat program."""

  def __init__(self):
    self.eqns: list[_Eqn] = []
    self.count = 0

  def new(self):
    self.count += 1
    return self.count - 1

  def run(self, jaxpr, consts, in_atoms):
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = ("val", c)
    for v, a in zip(jaxpr.invars, in_atoms):
      env[v] = a

    def read(v):
      if isinstance(v, _jcore.Literal):
        return ("val", v.val)
      return env[v]

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      sub = _sub_jaxpr(eqn)
      if sub is not None and _has_layer_op(sub[0]):
        sub_jaxpr, sub_consts = sub
        outs = self.run(sub_jaxpr, sub_consts, ins)
        for v, a in zip(eqn.outvars, outs):
          env[v] = a
        continue
      out_ids = [self.new() for _ in eqn.outvars]
      self.eqns.append(_Eqn(eqn.primitive, eqn.params, ins, out_ids,
                            [v.aval for v in eqn.outvars], eqn))
      for v, i in zip(eqn.outvars, out_ids):
        env[v] = ("var", i)
    return [read(v) for v in jaxpr.outvars]


def _chain_index(leaf_shape, chain):
  """Apply an index-only chain to an iota of the leaf: where each entry came from."""
  idx = np.arange(math.prod(leaf_shape), dtype=np.int64).reshape(leaf_shape)
  for prim, params in chain:
    name = prim.name
    if name in ("convert_element_type", "copy", "copy_p"):
      continue
    if name == "reshape":
      idx = idx.reshape(params["new_sizes"])
    elif name == "transpose":
      idx = np.transpose(idx, params["permutation"])
    elif name == "squeeze":
      idx = np.squeeze(idx, axis=tuple(params["dimensions"]))
    elif name == "expand_dims":
      idx = np.expand_dims(idx, tuple(params["dimensions"]))
    elif name == "broadcast_in_dim":
      shape, dims = params["shape"], params["broadcast_dimensions"]
      expanded = np.reshape(idx, [idx.shape[dims.index(d)] if d in dims else 1
                                  for d in range(len(shape))])
      idx = np.broadcast_to(expanded, shape)
    else:  # pragma: no cover - _CHAIN lists exactly the cases above
      raise AssertionError(name)
  return idx


def _as_perm(idx, size):
  """Row-major map as a tuple, ``None`` for the identity; raise if not a bijection."""
  flat = np.asarray(idx).reshape(-1)
  if flat.size != size or not np.array_equal(np.sort(flat), np.arange(size)):
    raise ValueError("not a permutation")
  return None if np.array_equal(flat, np.arange(size)) else tuple(int(i) for i in flat)


@dataclasses.dataclass
class TracedModel:
  """A model read as a flat program, with its layers (see :func:`trace_model`).

  Attributes:
    layers: the :class:`Layer` s found, in program order.
    uncovered: indices (into ``tree_leaves(params)``) of the leaves that are
      neither a layer's weight nor its folded bias.
    uncovered_paths: their paths.
    shared: paths of the leaves used by more than one op (weight sharing).
    paths: every leaf's path, in ``tree_leaves`` order.
  """
  layers: tuple
  uncovered: tuple
  uncovered_paths: tuple
  shared: tuple
  paths: tuple
  _sites: tuple
  _program: list
  _in_ids: list
  _out_atoms: list
  _out_tree: Any
  _params_tree: Any
  _inputs_tree: Any

  def zero_perturbations(self):
    """Zeros shaped like each layer's pre-activation ``s_l``."""
    return tuple(jnp.zeros(s.s_shape, s.s_dtype) for s in self._sites)

  def evaluate(self, params, inputs, perturbations):
    """``(outputs, activations)``: the model with ``s_l + e_l``, and each layer's ``a``.

    Equal to ``apply_fn(params, inputs)`` at zero perturbations; linear in
    ``e_l`` to first order, so ``jax.vjp`` in ``perturbations`` gives the
    output-to-pre-activation Jacobian transposed.
    """
    leaves = tree_util.tree_leaves(params) + tree_util.tree_leaves(inputs)
    env = dict(zip(self._in_ids, leaves))
    site_at_op = {s.op_eqn: l for l, s in enumerate(self._sites)}
    site_at_out = {s.out_id: l for l, s in enumerate(self._sites)}
    acts = [None] * len(self._sites)

    def read(atom):
      return atom[1] if atom[0] == "val" else env[atom[1]]

    for k, e in enumerate(self._program):
      invals = [read(a) for a in e.ins]
      if k in site_at_op:
        l = site_at_op[k]
        acts[l] = invals[self._sites[l].x_pos]
      bind_params = e.prim.get_bind_params(e.params)
      subfuns = ()
      if isinstance(bind_params, tuple):  # jax < 0.7: (subfuns, params)
        subfuns, bind_params = bind_params
      with e.eqn.ctx.manager:
        ans = e.prim.bind(*subfuns, *invals, **bind_params)
      if not e.prim.multiple_results:
        ans = [ans]
      for i, val in zip(e.outs, ans):
        if i in site_at_out:
          val = val + perturbations[site_at_out[i]].astype(val.dtype)
        env[i] = val
    outs = [read(a) for a in self._out_atoms]
    return tree_util.tree_unflatten(self._out_tree, outs), tuple(acts)

  def a_rows(self, l, a):
    """Layer ``l``'s inputs as ``[rows, in_dim]`` (rows: examples x shared positions)."""
    site, layer = self._sites[l], self.layers[l]
    if site.conv is None:
      return jnp.transpose(a, site.a_perm).reshape(-1, layer.in_dim)
    c = site.conv
    patches = jax.lax.conv_general_dilated_patches(
        a, c["filter_shape"], c["window_strides"], c["padding"],
        lhs_dilation=c["lhs_dilation"], rhs_dilation=c["rhs_dilation"],
        dimension_numbers=c["dimension_numbers"],
        precision=jax.lax.Precision.HIGHEST)
    # The patches' features are C_in-major; reorder them to M's (window..., C_in).
    rows = jnp.transpose(patches, site.s_perm)
    rows = rows.reshape(-1, a.shape[c["dimension_numbers"].lhs_spec[1]],
                        math.prod(c["filter_shape"]))
    return jnp.swapaxes(rows, 1, 2).reshape(-1, layer.in_dim)

  def s_rows(self, l, s):
    """An ``s_l``-shaped array (output or cotangent) as ``[rows, out_dim]``."""
    return jnp.transpose(s, self._sites[l].s_perm).reshape(-1, self.layers[l].out_dim)


def _spec(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def trace_model(apply_fn, params, inputs) -> TracedModel:
  """Trace ``apply_fn(params, inputs)`` and find its layers (see the module doc).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    params: parameter pytree (only shapes and dtypes are read).
    inputs: a batch of inputs (only shapes and dtypes are read).

  Returns:
    A :class:`TracedModel`.
  """
  p_leaves_paths, p_tree = tree_util.tree_flatten_with_path(params)
  p_leaves = [x for _, x in p_leaves_paths]
  paths = tuple(_checks.leaf_path(p) for p, _ in p_leaves_paths)
  i_leaves, i_tree = tree_util.tree_flatten(inputs)
  num_p = len(p_leaves)
  out_tree_box = []

  def flat_fn(*leaves):
    out = apply_fn(tree_util.tree_unflatten(p_tree, leaves[:num_p]),
                   tree_util.tree_unflatten(i_tree, leaves[num_p:]))
    out_leaves, out_tree = tree_util.tree_flatten(out)
    out_tree_box.append(out_tree)
    return out_leaves

  closed = jax.make_jaxpr(flat_fn)(*map(_spec, p_leaves + i_leaves))
  fl = _Flattener()
  in_ids = [fl.new() for _ in closed.jaxpr.invars]
  out_atoms = fl.run(closed.jaxpr, list(closed.consts), [("var", i) for i in in_ids])
  program = fl.eqns

  # Provenance: var -> (leaf, chain of index-only ops); uses of every leaf and var.
  origin = {in_ids[j]: (j, ()) for j in range(num_p)}
  leaf_uses = {j: [] for j in range(num_p)}
  var_uses: dict[int, list] = {}
  for k, e in enumerate(program):
    for pos, a in enumerate(e.ins):
      if a[0] == "var":
        var_uses.setdefault(a[1], []).append((k, pos))
    src = [a for a in e.ins if a[0] == "var" and a[1] in origin]
    if (e.prim.name in _CHAIN and len(e.ins) == 1 and len(src) == 1
        and not e.prim.multiple_results):
      leaf, chain = origin[src[0][1]]
      origin[e.outs[0]] = (leaf, chain + ((e.prim, e.params),))
      continue
    for pos, a in enumerate(e.ins):
      if a[0] == "var" and a[1] in origin:
        leaf_uses[origin[a[1]][0]].append((k, pos))
  for a in out_atoms:
    if a[0] == "var":
      var_uses.setdefault(a[1], []).append((None, None))
      if a[1] in origin:
        leaf_uses[origin[a[1]][0]].append((None, None))

  shared = tuple(paths[j] for j in range(num_p)
                 if sum(1 for k, _ in leaf_uses[j]
                        if k is not None and program[k].prim.name in _LAYER_OPS) > 1)
  layers, sites, used = [], [], set()
  for k, e in enumerate(program):
    if e.prim.name not in _LAYER_OPS:
      continue
    found = _layer_at(k, e, program, origin, leaf_uses, var_uses, p_leaves, paths, used)
    if found is not None:
      layer, site = found
      layers.append(layer)
      sites.append(site)
      used.add(layer.weight_index)
      if layer.bias_index is not None:
        used.add(layer.bias_index)
  uncovered = tuple(j for j in range(num_p) if j not in used)
  return TracedModel(tuple(layers), uncovered, tuple(paths[j] for j in uncovered),
                     shared, paths, tuple(sites), program, in_ids, out_atoms,
                     out_tree_box[0], p_tree, i_tree)


def _layer_at(k, e, program, origin, leaf_uses, var_uses, p_leaves, paths, used):
  """The :class:`Layer` and :class:`_Site` of op ``k``, or ``None``."""
  ins = e.ins
  from_leaf = [a[0] == "var" and a[1] in origin for a in ins[:2]]
  if sum(from_leaf) != 1:
    return None
  w_pos = from_leaf.index(True)
  x_pos = 1 - w_pos
  leaf, chain = origin[ins[w_pos][1]]
  if leaf in used or leaf_uses[leaf] != [(k, w_pos)]:
    return None
  leaf_shape = tuple(np.shape(p_leaves[leaf]))
  w_idx = _chain_index(leaf_shape, chain)
  s_shape = tuple(e.out_avals[0].shape)
  conv = None
  if e.prim.name == "dot_general":
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    if lb or rb:
      return None
    wc, xc = (lc, rc) if w_pos == 0 else (rc, lc)
    w_nd = w_idx.ndim
    x_nd = len(e.eqn.invars[x_pos].aval.shape)
    wf = tuple(d for d in range(w_nd) if d not in wc)
    xf = tuple(d for d in range(x_nd) if d not in xc)
    m_idx = np.transpose(w_idx, tuple(wc) + wf)
    a_perm = xf + tuple(xc)
    if w_pos == 1:   # out = [x free..., w free...]
      s_perm = tuple(range(len(s_shape)))
    else:            # out = [w free..., x free...]
      s_perm = tuple(range(len(wf), len(s_shape))) + tuple(range(len(wf)))
    in_dim = math.prod(w_idx.shape[d] for d in wc)
    out_dim = math.prod(w_idx.shape[d] for d in wf)
    kind = "dense"
  else:
    p = e.params
    if w_pos != 1 or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      return None
    dn = p["dimension_numbers"]
    rs, os_ = dn.rhs_spec, dn.out_spec
    # Rows of M in (window..., C_in) order: the identity view of a flax HWIO kernel.
    m_idx = np.transpose(w_idx, tuple(rs[2:]) + (rs[1], rs[0]))
    filter_shape = tuple(w_idx.shape[d] for d in rs[2:])
    in_dim = w_idx.shape[rs[1]] * math.prod(filter_shape)
    out_dim = w_idx.shape[rs[0]]
    a_perm = ()
    s_perm = (os_[0],) + tuple(os_[2:]) + (os_[1],)
    conv = dict(filter_shape=filter_shape, window_strides=p["window_strides"],
                padding=p["padding"], lhs_dilation=p["lhs_dilation"],
                rhs_dilation=p["rhs_dilation"], dimension_numbers=dn)
    kind = "conv"
  try:
    weight_perm = _as_perm(m_idx.reshape(in_dim, out_dim), math.prod(leaf_shape))
  except ValueError:
    return None

  out_id = e.outs[0]
  bias = _bias_of(out_id, s_shape, s_perm, out_dim, program, origin, leaf_uses,
                  var_uses, p_leaves, used | {leaf})
  b_index, b_perm = None, None
  if bias is not None:
    b_index, b_perm, out_id = bias
  layer = Layer(kind, paths[leaf], None if b_index is None else paths[b_index], leaf,
                b_index, int(in_dim), int(out_dim), weight_perm, b_perm)
  site = _Site(k, out_id, x_pos, a_perm, s_perm, s_shape, e.out_avals[0].dtype, conv)
  return layer, site


def _bias_of(s_id, s_shape, s_perm, out_dim, program, origin, leaf_uses, var_uses,
             p_leaves, taken):
  """``(bias leaf, bias_perm, add output id)`` when ``s`` feeds a bias add only."""
  uses = var_uses.get(s_id, [])
  if len(uses) != 1 or uses[0][0] is None:
    return None
  k, pos = uses[0]
  e = program[k]
  if e.prim.name not in ("add", "add_any") or len(e.ins) != 2:
    return None
  other = e.ins[1 - pos]
  if other[0] != "var" or other[1] not in origin:
    return None
  leaf, chain = origin[other[1]]
  if leaf in taken or leaf_uses[leaf] != [(k, 1 - pos)]:
    return None
  if tuple(e.out_avals[0].shape) != s_shape:
    return None
  b_idx = _chain_index(tuple(np.shape(p_leaves[leaf])), chain)
  try:
    b_idx = np.broadcast_to(b_idx, s_shape)
  except ValueError:
    return None
  rows = np.transpose(b_idx, s_perm).reshape(-1, out_dim)
  if not (rows == rows[:1]).all():
    return None
  try:
    perm = _as_perm(rows[0], int(np.size(p_leaves[leaf])))
  except ValueError:
    return None
  return leaf, perm, e.outs[0]
