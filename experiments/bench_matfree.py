"""mlmap's Lanczos and SLQ log-determinant against the ``matfree`` library's.

On the two operators of ``bench_linalg.py`` (the digits CNN, P = 9,930, and the
digits MLP, P = 9,610, batch 512, float32), with the same products:

* the Hessian, 30 Lanczos steps from one vector: ``mm.lanczos`` (its default
  ``unroll``) against ``matfree.decomp.tridiag_sym(30, reortho="full")``;
* the damped GGN ``G + I``, log-determinant by SLQ with 10 Rademacher probes x 30
  steps, all probes vmapped: ``mm.stochastic_logdet(..., batch_size=10)``
  against ``matfree.stochtrace.estimator_monte_carlo(
  matfree.funm.monte_carlo_funm_sym_logdet(tridiag_sym(30)), sampler_signs)``.

Each time is the median of repeated jitted calls after compilation; ratios are to
30 (Lanczos) or 300 (SLQ) standalone jitted products called from Python, and
compile times are reported apart. The two libraries' tridiagonal matrices agree
(``tests/test_spectral.py::test_lanczos_matches_matfree`` checks it in float64
when matfree is installed).

matfree is not a dependency of mlmap. To run this:

  pip install matfree && python experiments/bench_matfree.py [--reps 5] [--out results]

writes ``results/bench_matfree.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import mlmap as mm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_linalg import _compiled, _median_time, _products, _repeat, problems  # noqa: E402

STEPS, PROBES = 30, 10


def _timed(fn, args, reps):
  c, t_compile = _compiled(fn, *args)
  return dict(seconds=_median_time(c, *args, repeats=reps), compile_seconds=t_compile)


def measure(nlp, params, x, y, reps):
  from matfree import decomp, funm, stochtrace
  hvp, gvp = _products(nlp, params, x, y, 1.0)
  v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), params)
  res = dict(hvp_calls=_median_time(_repeat(hvp, STEPS), params, v, repeats=reps),
             ggn_calls=_median_time(_repeat(gvp, STEPS * PROBES), params, v, repeats=reps))

  def hv(p, u):
    return mm.hvp(nlp, p, u, x, y)

  def damped(p, u):
    return jax.tree_util.tree_map(lambda a, b: a + b, mm.ggn_vp(nlp, p, u, x, y), u)

  def mm_lanczos(p, u):
    return mm.lanczos(lambda w: hv(p, w), u, STEPS).alphas

  tridiag = decomp.tridiag_sym(STEPS, reortho="full", custom_vjp=False, materialize=False)

  def mf_lanczos(p, u):
    flat, unravel = ravel_pytree(u)
    out = tridiag(lambda w: ravel_pytree(hv(p, unravel(w)))[0], flat)
    return out.J_small[0]

  key = jax.random.PRNGKey(0)

  def mm_logdet(p, k):
    return mm.stochastic_logdet(lambda w: damped(p, w), p, k, PROBES, STEPS,
                                batch_size=PROBES).estimate

  logdet = stochtrace.estimator_monte_carlo(
      funm.monte_carlo_funm_sym_logdet(decomp.tridiag_sym(STEPS, custom_vjp=False)),
      stochtrace.sampler_signs(params, num=PROBES))

  def mf_logdet(p, k):
    return logdet(lambda w: damped(p, w), k)

  for name, fn, args, base in (("mlmap_lanczos", mm_lanczos, (params, v), "hvp_calls"),
                               ("matfree_lanczos", mf_lanczos, (params, v), "hvp_calls"),
                               ("mlmap_slq_logdet", mm_logdet, (params, key), "ggn_calls"),
                               ("matfree_slq_logdet", mf_logdet, (params, key), "ggn_calls")):
    r = _timed(fn, args, reps)
    r["ratio"] = r["seconds"] / res[base]
    r["value"] = np.asarray(jax.jit(fn)(*args)).tolist()
    res[name] = r
  a, b = np.asarray(res["mlmap_lanczos"]["value"]), np.asarray(res["matfree_lanczos"]["value"])
  res["lanczos_alphas_max_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default="results")
  args = ap.parse_args(argv)
  try:
    import matfree  # noqa: F401
  except ImportError:
    print("matfree is not installed: pip install matfree")
    return 1
  out = {"backend": jax.default_backend(), "jax": jax.__version__,
         "matfree": importlib.metadata.version("matfree")}
  for name, (nlp, params, x, y) in problems().items():
    out[name] = measure(nlp, params, x, y, args.reps)
    r = out[name]
    print(f"{name}: 30 hvp calls {r['hvp_calls']:.3f} s, 300 GGN calls {r['ggn_calls']:.3f} s")
    for k in ("mlmap_lanczos", "matfree_lanczos", "mlmap_slq_logdet", "matfree_slq_logdet"):
      print(f"  {k:20s} {r[k]['seconds']:.3f} s  ratio {r[k]['ratio']:.2f}  "
            f"compile {r[k]['compile_seconds']:.1f} s")
    print(f"  Lanczos alphas max rel. difference {r['lanczos_alphas_max_rel_diff']:.1e}; "
          f"logdet mlmap {r['mlmap_slq_logdet']['value']:.1f}, "
          f"matfree {r['matfree_slq_logdet']['value']:.1f} (different probes)")
  path = pathlib.Path(args.out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "bench_matfree.json").write_text(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
