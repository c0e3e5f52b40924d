"""When to unroll a loop over curvature products (private).

XLA:CPU runs a convolution placed in a nested computation (the body of a
``lax.while_loop`` / ``fori_loop`` / rolled ``scan``, or a ``lax.cond`` branch)
through its generic loop emitter instead of its Eigen convolution kernels: the
kernel-gradient convolutions of a backward pass keep their non-canonical
dimension order there (``f01b_i01o->01bf`` in the compiled HLO), which the
top-level computation rewrites into the canonical ``b01f_01io->b01f``. On the
digits CNN of ``experiments/bench_linalg.py`` 30 Hessian-vector products take
about 25x longer inside a ``fori_loop`` or a ``cond`` than as 30 calls
(jax-ml/jax#12868 reports the same effect). Lanczos and the probe loops of
Hutchinson and SLQ therefore unroll, by default, when the backend is the CPU,
the operator contains a convolution and there are at most
``AUTO_UNROLL_LIMIT`` products; elsewhere (GPU, TPU, dense models, longer
loops) they stay rolled, which compiles faster. ``mm.cg`` unrolls only on
request (``unroll=True``): its unrolled compile time grows faster than
linearly (the early-stop selects between unrolled steps; see
``docs/linalg.md``). By default it instead runs its rolled ``while_loop`` with
the product lowered to a host callback (:func:`host_lowered`): the loop body
calls, through ``jax.pure_callback``, a separately jitted computation of the
product, so the convolution is compiled at top level. ``mm.make_train_step``
selects instead of branching for such objectives.
"""

from __future__ import annotations

import jax

# Iterations beyond which the automatic choice keeps a loop rolled: an unrolled
# loop compiles one copy of the product per iteration (about 0.1 s each for the
# bench_linalg CNN's Hessian-vector product, 0.5 s per Lanczos step).
AUTO_UNROLL_LIMIT = 64


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (a jaxpr, closed jaxpr or a sequence)."""
  items = value if isinstance(value, (tuple, list)) else (value,)
  for item in items:
    inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
    if hasattr(inner, "eqns"):
      yield inner


def jaxpr_has_convolution(jaxpr) -> bool:
  """Whether ``jaxpr`` (or any jaxpr nested in its equations) has a convolution."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    for value in eqn.params.values():
      if any(jaxpr_has_convolution(sub) for sub in _sub_jaxprs(value)):
        return True
  return False


def has_convolution(fn, *args) -> bool:
  """Whether ``fn(*args)`` runs a convolution (traced abstractly; nothing is computed)."""
  return jaxpr_has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def conv_on_cpu(fn, *args) -> bool:
  """The XLA:CPU trap above: the default backend is the CPU and ``fn`` convolves."""
  return jax.default_backend() == "cpu" and has_convolution(fn, *args)


def host_lowered(fn, like):
  """``fn`` (a pytree -> pytree function, possibly closing over traced arrays)
  as a ``jax.pure_callback`` to a separately ``jax.jit``-compiled copy of it.

  ``fn`` is traced once at ``like``'s shapes; everything its jaxpr closes over
  (outer ``jit`` tracers such as parameters and a batch, and concrete arrays)
  is passed through the callback as explicit arguments, so the callee is a
  top-level XLA computation (where XLA:CPU runs convolutions through Eigen) and
  nothing traced leaks into it. The callee is compiled on its first call.
  Under ``vmap`` the callback runs once per batch member. Not differentiable
  (``mm.cg`` only calls it inside ``lax.custom_linear_solve``'s solve).
  """
  leaves, in_tree = jax.tree_util.tree_flatten(like)
  closed, out_shape = jax.make_jaxpr(
      lambda *xs: fn(jax.tree_util.tree_unflatten(in_tree, list(xs))),
      return_shape=True)(*leaves)
  jaxpr, consts = closed.jaxpr, list(closed.consts)
  out_leaves, out_tree = jax.tree_util.tree_flatten(out_shape)
  out_avals = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_leaves]

  @jax.jit
  def callee(xs, cs):
    return jax.core.eval_jaxpr(jaxpr, cs, *xs)

  def call(xs, cs):
    return callee(xs, cs)

  def lowered(v):
    xs, tree = jax.tree_util.tree_flatten(v)
    if tree != in_tree:
      raise TypeError(f"host_lowered: expected a pytree {in_tree}, got {tree}.")
    out = jax.pure_callback(call, out_avals, xs, consts, vmap_method="sequential")
    return jax.tree_util.tree_unflatten(out_tree, out)

  return lowered


def resolve_unroll(fn_name: str, unroll, iterations: int, matvec, *args) -> bool:
  """``unroll`` (True / False), or for ``None`` the automatic choice: unroll when
  :func:`conv_on_cpu` and ``iterations <= AUTO_UNROLL_LIMIT``."""
  if unroll is None:
    return iterations <= AUTO_UNROLL_LIMIT and conv_on_cpu(matvec, *args)
  if not isinstance(unroll, bool):
    raise TypeError(f"{fn_name}: unroll must be True, False or None (automatic), got "
                    f"{unroll!r}.")
  return unroll
