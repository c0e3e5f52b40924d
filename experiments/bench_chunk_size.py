"""Per-example vmapped chunks on XLA:CPU: the cost of ``chunk_size`` in the exact diagonal and the GLM predictive.

``mm.ggn_diagonal`` and ``StructuredPosterior.glm_moments`` vmap a per-example
computation (``O`` vector-Jacobian products of one example) over ``chunk_size``
examples at a time. On XLA:CPU a larger chunk is not faster: past a few
examples it is slower, and for convolutions much slower (a vmapped per-example
kernel gradient is a grouped convolution, which XLA:CPU runs poorly). This
prints, for the digits MLP 64-128-128-10 (tanh, 26,122 parameters) and CNN
(Conv 8 3x3, Conv 16 3x3, Dense 10: 3,818 parameters) of
``laplace_calibration.py`` at random weights (float64), 256 examples:

- ``ggn_diagonal`` per ``chunk_size`` (jitted, second call; the first compiles),
  as a ratio to one ``jax.grad`` of the same 256-example loss;
- ``glm_moments`` of a diagonal, a Kronecker and a dense last-layer posterior
  on 256 inputs, same.

The CPU default (``chunk_size=None``) is 2 examples except for a dense
precision, whose Cholesky factor the triangular solve reads once per block (so
there wide blocks win); it should be near the smallest cost of each column.

Usage::

  python experiments/bench_chunk_size.py   # about a minute on 2 cores
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (float64)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import laplace_calibration as lc  # noqa: E402
import mlmap as mm  # noqa: E402

CHUNKS = (1, 2, 4, 8, 32, None)


def _seconds(f, reps: int = 3) -> float:
  """Median wall time of ``f()`` after one warm-up call."""
  jax.block_until_ready(jax.tree_util.tree_leaves(f()))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(f()))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main() -> int:
  data = lc.load_data(1280)
  x, y = jnp.asarray(data["x_train"][:256]), jnp.asarray(data["y_train"][:256])
  rows = []
  for name, model in (("MLP", lc.MLP()), ("CNN", lc.CNN())):
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    model.init(jax.random.key(0), x[:1])["params"])
    nlp = lc.make_nlp(model, 1.0, 256)
    grad = jax.jit(jax.grad(lambda p: nlp(p, x, y)))
    base = _seconds(lambda: grad(params))
    posts = {s: mm.laplace(nlp, params, x, y, structure=s, map_tol=None)
             for s in ("diag", "kron")}
    posts["last"] = mm.laplace(nlp, params, x, y, structure="full", map_tol=None,
                               subset=mm.last_layer_subset(params))
    for cs in CHUNKS:
      diag = jax.jit(lambda p, cs=cs: mm.ggn_diagonal(nlp, p, x, y, chunk_size=cs))
      cells = [_seconds(lambda: diag(params)) / base]
      for s in ("diag", "kron", "last"):
        cells.append(_seconds(lambda s=s, cs=cs: posts[s].glm_moments(x, chunk_size=cs)) / base)
      rows.append([name, "default" if cs is None else cs] + [f"{c:.0f}x" for c in cells])
      print(*rows[-1], flush=True)
  print("\n".join(_common.md_table(
      ["model", "chunk_size", "ggn_diagonal / grad", "glm_moments diag / grad",
       "glm_moments kron / grad", "glm_moments last-layer dense / grad"], rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
