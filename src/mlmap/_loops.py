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
``AUTO_UNROLL_LIMIT`` products, and above that iterate from the host
(:func:`fori_loop` with ``"host"``; SLQ keeps its probe loop rolled and runs
each chunk's Lanczos steps from the host); elsewhere (GPU, TPU, dense models)
they stay rolled, which compiles faster. ``mm.cg`` unrolls only on
request (``unroll=True``): its unrolled compile time grows faster than
linearly (the early-stop selects between unrolled steps; see
``docs/linalg.md``). By default it instead iterates its ``while_loop`` from the
host (:func:`host_while_loop`): one ``jax.pure_callback`` that calls a
separately jitted CG step per iteration, so the convolution is compiled at top
level. ``mm.make_train_step`` selects instead of branching for such objectives.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

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


def _closed(fn, leaves):
  """``fn``'s jaxpr at ``leaves``' shapes, and its constants (outer tracers included)."""
  closed = jax.make_jaxpr(fn)(*leaves)
  return closed.jaxpr, list(closed.consts)


def host_while_loop(cond_fun, body_fun, init_val):
  """``lax.while_loop(cond_fun, body_fun, init_val)``, iterated from Python.

  The whole loop is one ``jax.pure_callback``; inside it each iteration is one
  call of a separately ``jax.jit``-compiled step (``body_fun`` followed by
  ``cond_fun`` of its result) and one host read of the predicate. The step is a
  top-level XLA computation, where XLA:CPU runs convolutions through Eigen
  (inside a ``while`` body it does not; see the module docstring), and no work
  runs between the steps but the dispatch. ``cond_fun`` and ``body_fun`` are
  traced once at ``init_val``'s shapes; whatever they close over (outer ``jit``
  tracers such as parameters and a batch, and concrete arrays) is passed to the
  callback as arguments, once per loop. Same iterates as ``lax.while_loop``.
  Under ``vmap`` each member runs its own loop (``vmap_method="sequential"``),
  so each stops at its own iteration. Not differentiable (``mm.cg`` runs it
  inside ``lax.custom_linear_solve``'s solve). The step compiles on the first
  call.
  """
  leaves, tree = jax.tree_util.tree_flatten(init_val)
  avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]

  def state(xs):
    return jax.tree_util.tree_unflatten(tree, list(xs))

  def flat_body(*xs):
    new = body_fun(state(xs))
    new_leaves, new_tree = jax.tree_util.tree_flatten(new)
    new_avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in new_leaves]
    if new_tree != tree or new_avals != avals:
      raise TypeError("host_while_loop: body_fun must return the carry's structure, "
                      f"shapes and dtypes: got {new_tree} {new_avals}, expected {tree} "
                      f"{avals}.")
    return new_leaves, cond_fun(new)

  body, body_consts = _closed(flat_body, leaves)
  cond, cond_consts = _closed(lambda *xs: cond_fun(state(xs)), leaves)

  @functools.partial(jax.jit, donate_argnums=0)  # the carry is the loop's own
  def step(xs, cs):
    out = jax.core.eval_jaxpr(body, cs, *xs)
    return out[:-1], out[-1]

  @jax.jit
  def first(xs, cs):
    return jax.core.eval_jaxpr(cond, cs, *xs)[0]

  def run(xs, bcs, ccs):
    go = bool(first(xs, ccs))
    # The step donates its carry (no copy of e.g. a Lanczos basis per iteration);
    # the callback's own arguments may share buffers with the outer program.
    xs = [jnp.array(x, copy=True) for x in xs]
    while go:
      xs, go = step(xs, bcs)
      go = bool(go)
    return [np.asarray(x) for x in xs]

  out = jax.pure_callback(run, avals, leaves, body_consts, cond_consts,
                          vmap_method="sequential")
  return state(out)


def fori_loop(lower: int, upper: int, body_fun, init_val, unroll):
  """``lax.fori_loop`` over Python-int bounds (``unroll=False``), the same steps as
  a Python loop (``True``), or iterated from the host (``"host"``:
  :func:`host_while_loop`, one jitted top-level step per iteration), so that no
  body lands in a nested computation. Same iterates in every mode."""
  if unroll == "host":
    def body(carry):
      i, val = carry
      return i + 1, body_fun(i, val)
    return host_while_loop(lambda c: c[0] < upper, body,
                           (jnp.asarray(lower, jnp.int32), init_val))[1]
  if not unroll:
    return lax.fori_loop(lower, upper, body_fun, init_val)
  val = init_val
  for i in range(lower, upper):
    val = body_fun(i, val)
  return val


def check_unroll(fn_name: str, unroll, host: bool = False):
  """``unroll`` if it is ``True``, ``False``, ``None`` or (where ``host``) ``"host"``;
  else a ``TypeError`` naming ``fn_name`` and the value."""
  if unroll is None or isinstance(unroll, bool) or (
      host and isinstance(unroll, str) and unroll == "host"):
    return unroll
  options = "True, False, 'host'" if host else "True, False"
  raise TypeError(f"{fn_name}: unroll must be {options} or None (automatic), got "
                  f"{unroll!r}.")


def resolve_unroll(fn_name: str, unroll, iterations: int, matvec, *args,
                   host: bool = False):
  """``unroll`` (True / False, or ``"host"`` where ``host``; see
  :func:`check_unroll`), or for ``None`` the automatic choice: when
  :func:`conv_on_cpu`, unroll if ``iterations <= AUTO_UNROLL_LIMIT``, else
  iterate from the host where the loop allows it (``host``); otherwise rolled."""
  if check_unroll(fn_name, unroll, host) is not None:
    return unroll
  if not conv_on_cpu(matvec, *args):
    return False
  if iterations <= AUTO_UNROLL_LIMIT:
    return True
  return "host" if host else False
