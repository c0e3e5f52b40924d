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
linearly. ``mm.make_train_step`` selects instead of branching for such
objectives.
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


def resolve_unroll(fn_name: str, unroll, iterations: int, matvec, *args) -> bool:
  """``unroll`` (True / False), or for ``None`` the automatic choice: unroll when
  :func:`conv_on_cpu` and ``iterations <= AUTO_UNROLL_LIMIT``."""
  if unroll is None:
    return iterations <= AUTO_UNROLL_LIMIT and conv_on_cpu(matvec, *args)
  if not isinstance(unroll, bool):
    raise TypeError(f"{fn_name}: unroll must be True, False or None (automatic), got "
                    f"{unroll!r}.")
  return unroll
