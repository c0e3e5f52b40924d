"""mm.cg, Lanczos, Hutchinson and SLQ against the products they repeat.

Part 1 (``operator_table``): on a 784-256-10 tanh MLP's damped Gauss-Newton
operator, float32, the loops against one matvec and ``jax.scipy``'s cg
(interleaved repetitions, medians).

Part 2, loops over convolutions:

XLA:CPU runs a convolution in a nested computation (a while-loop body or a
cond branch) about 25x slower than at top level (``mlmap._loops``). This script
measures, on the digits CNN of the issue (flax ``Conv(16, 3x3) -> Conv(32, 3x3,
stride 2) -> Dense(10)``, P = 9,930, batch 512) and on a digits MLP, float32:

* baseline: 30 calls of the jitted product from Python (``mm.hvp`` for Lanczos,
  the damped ``mm.ggn_vp`` for CG);
* ``mm.lanczos`` with 30 steps, rolled (``unroll=False``) and with the
  default (``unroll=None``: unrolled on the CPU when the operator convolves),
  and ``mm.cg`` with 10 iterations (``tol=0``, so all run), rolled and
  ``unroll=True``, and with 30 iterations rolled, default (``unroll=None``:
  ``"host"`` on the CPU when the operator convolves) and ``unroll="host"``
  (the issue's target: at most 1.3x the 30 jitted products);
* the same products unrolled at top level and inside one ``lax.cond`` branch;
* one ``mm.hessian_free`` train step (``maxiter=30``) against its cost model of
  standalone jitted calls (one ``value_and_grad`` + 32 GGN products + 1 loss).

Run times are medians of repeated calls after compilation; compile times are
reported apart. Ratios are loop time / baseline time.

  python experiments/bench_linalg.py [--reps 20] [--steps 30] [--out results]

writes ``results/bench_linalg.json`` (about 3 minutes on 2 cores).
``--long`` instead times the loops above 64 products (80 Lanczos steps,
``spectral_density`` 3 x 30, ``hutchinson_trace`` 90 probes; rolled against
the default, which iterates from the host on the CPU for the CNN) and writes
``results/bench_linalg_long.json`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from sklearn.datasets import load_digits

import mlmap as mm


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(16, (3, 3))(x))
    x = nn.tanh(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def problems(batch=512):
  xd, yd = load_digits(return_X_y=True)
  x = jnp.asarray(xd[:batch].reshape(-1, 8, 8, 1) / 16.0, jnp.float32)
  y = jnp.asarray(yd[:batch], jnp.int32)
  out = {}
  for name, model in (("CNN", CNN()), ("MLP", MLP())):
    params = model.init(jax.random.PRNGKey(0), x)
    nlp = mm.negative_log_posterior(model.apply, mm.categorical_log_likelihood)
    out[name] = (nlp, params, x, y)
  return out


def _median_time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def _compiled(fn, *args):
  t0 = time.perf_counter()
  c = jax.jit(fn).lower(*args).compile()
  return c, time.perf_counter() - t0


def _products(nlp, params, x, y, lam):
  hvp = jax.jit(lambda p, v: mm.hvp(nlp, p, v, x, y))
  gvp = jax.jit(lambda p, v: jax.tree_util.tree_map(
      lambda a, b: a + lam * b, mm.ggn_vp(nlp, p, v, x, y), v))
  return hvp, gvp


def _repeat(prod, steps):
  def run(p, v):
    for _ in range(steps):
      v = prod(p, v)
    return v
  return run


def measure_loops(nlp, params, x, y, steps, cg_steps, lam=1.0):
  """Loop / baseline ratios for Lanczos (Hessian; rolled and the default) and
  CG (damped GGN; rolled and ``unroll=True``)."""
  hvp, gvp = _products(nlp, params, x, y, lam)
  v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), params)
  res = dict(steps=steps, cg_steps=cg_steps,
             hvp_calls=_median_time(_repeat(hvp, steps), params, v),
             ggn_calls=_median_time(_repeat(gvp, cg_steps), params, v))

  def lanczos(p, v, unroll):
    return mm.lanczos(lambda u: mm.hvp(nlp, p, u, x, y), v, steps, unroll=unroll).alphas

  def cg(p, v, unroll):
    def damped(u):
      return jax.tree_util.tree_map(lambda a, b: a + lam * b, mm.ggn_vp(nlp, p, u, x, y), u)
    return mm.cg(damped, v, maxiter=cg_steps, tol=0.0, unroll=unroll)[0]

  res["ggn_calls_30"] = _median_time(_repeat(gvp, 30), params, v)

  def cg30(p, v, unroll):
    def damped(u):
      return jax.tree_util.tree_map(lambda a, b: a + lam * b, mm.ggn_vp(nlp, p, u, x, y), u)
    return mm.cg(damped, v, maxiter=30, tol=0.0, unroll=unroll)[0]

  for name, fn, base, variants in (("lanczos", lanczos, "hvp_calls", (False, None)),
                                   ("cg", cg, "ggn_calls", (False, True)),
                                   ("cg30", cg30, "ggn_calls_30", (False, None, "host"))):
    for unroll in variants:
      tag = {False: "rolled", None: "default", True: "unrolled", "host": "host"}[unroll]
      c, t_compile = _compiled(lambda p, v, u=unroll: fn(p, v, u), params, v)
      t0 = time.perf_counter()  # "host" compiles its product on the first call
      jax.block_until_ready(c(params, v))
      t_first = time.perf_counter() - t0
      t = _median_time(c, params, v)
      res[f"{name}_{tag}"] = dict(seconds=t, compile_seconds=t_compile,
                                  first_call_seconds=t_first, ratio=t / res[base])
  # The same products unrolled, at top level and inside one lax.cond branch.
  def in_cond(p, v, flag):
    return jax.lax.cond(flag, lambda u: _repeat(hvp_plain, steps)(p, u), lambda u: u, v)

  def hvp_plain(p, u):
    return mm.hvp(nlp, p, u, x, y)

  flag = jnp.asarray(True)  # a traced predicate: a Python True would fold the cond away
  for tag, fn in (("top", lambda p, v, f: _repeat(hvp_plain, steps)(p, v)),
                  ("cond", in_cond)):
    c, t_compile = _compiled(fn, params, v, flag)
    res[f"unrolled_products_{tag}"] = dict(seconds=_median_time(c, params, v, flag),
                                           compile_seconds=t_compile)
  return res


def measure_long_loops(nlp, params, x, y, repeats=3):
  """Loops above ``mlmap._loops.AUTO_UNROLL_LIMIT`` products, where the default on
  the CPU for a convolutional operator iterates from the host: 80 Lanczos steps,
  spectral_density with 3 probes x 30 steps (90 products, the issue's case) and
  hutchinson_trace with 90 probes, each against as many jitted Hessian-vector
  products called from Python, rolled (``unroll=False``) and default."""
  hvp, _ = _products(nlp, params, x, y, 1.0)
  v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), params)
  key, grid = jax.random.PRNGKey(0), jnp.linspace(-1.0, 10.0, 64)
  op = lambda p: (lambda u: mm.hvp(nlp, p, u, x, y))  # noqa: E731
  loops = {
      "lanczos 80": (80, lambda p, u: mm.lanczos(op(p), v, 80, unroll=u).alphas),
      "spectral_density 3x30": (90, lambda p, u: mm.spectral_density(
          op(p), p, key, 3, 30, grid, 0.1, unroll=u)),
      "hutchinson_trace 90": (90, lambda p, u: mm.hutchinson_trace(
          op(p), p, key, 90, unroll=u).estimate)}
  res = {}
  for name, (n, fn) in loops.items():
    base = _median_time(_repeat(hvp, n), params, v, repeats=repeats)
    for unroll, reps in ((False, 1), (None, repeats)):
      c, t_compile = _compiled(lambda p, u=unroll: fn(p, u), params)
      t0 = time.perf_counter()
      jax.block_until_ready(c(params))
      t_first = time.perf_counter() - t0
      t = _median_time(c, params, repeats=reps)
      res[f"{name} {'default' if unroll is None else 'rolled'}"] = dict(
          products=n, seconds=t, ratio=t / base, compile_seconds=t_compile,
          first_call_seconds=t_first)
  return res


def measure_hessian_free(nlp, params, x, y, maxiter):
  """One HF train step against its cost model of standalone jitted calls."""
  tx = mm.hessian_free(nlp, damping=1.0, maxiter=maxiter, tol=0.0)
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, state, (x, y)))
  t_compile = time.perf_counter() - t0
  t_step = _median_time(step, params, state, (x, y))
  vg = jax.jit(jax.value_and_grad(nlp))
  loss = jax.jit(nlp)
  _, gvp = _products(nlp, params, x, y, 1.0)
  v = jax.tree_util.tree_map(jnp.ones_like, params)
  t_vg = _median_time(vg, params, x, y)
  t_loss = _median_time(loss, params, x, y)
  t_gvp = _median_time(gvp, params, v)
  model = t_vg + (maxiter + 2) * t_gvp + t_loss
  return dict(maxiter=maxiter, step_seconds=t_step, compile_seconds=t_compile,
              model_seconds=model, ratio=t_step / model)


def operator_table(reps):
  """The MLP operator table: mm.cg, Lanczos, Hutchinson and SLQ against one damped
  Gauss-Newton matvec and jax.scipy's cg (interleaved repetitions)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k1, (784, 256)) / 28, "b1": jnp.zeros(256),
            "w2": jax.random.normal(k2, (256, 10)) / 16, "b2": jnp.zeros(10)}
  x = jax.random.normal(k3, (256, 784))
  net = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  def gn(p, v):  # damped Gauss-Newton (squared loss) J^T J v + 1e-3 v: SPD
    jv = jax.jvp(net, (p,), (v,))[1]
    return jax.tree_util.tree_map(lambda a, b: a + 1e-3 * b, jax.vjp(net, p)[1](jv)[0], v)
  b, key = jax.tree_util.tree_map(jnp.ones_like, params), jax.random.PRNGKey(1)
  fns = {  # params are jit arguments (closing over them makes XLA constant-fold)
    "gn matvec": jax.jit(gn),
    "jax.scipy cg, 50 it": jax.jit(lambda p, b: jax.scipy.sparse.linalg.cg(
        lambda v: gn(p, v), b, maxiter=50, tol=0.0)[0]),
    "mm.cg, 50 it": jax.jit(lambda p, b: mm.cg(lambda v: gn(p, v), b, maxiter=50, tol=0.0)[0]),
    "mm.lanczos_eigenvalues k=5 m=30": jax.jit(lambda p, b: mm.lanczos_eigenvalues(
        lambda v: gn(p, v), p, key, k=5, num_steps=30).eigenvalues),
    "mm.hutchinson_trace n=30": jax.jit(lambda p, b: mm.hutchinson_trace(
        lambda v: gn(p, v), p, key, 30, batch_size=10).estimate),
    "mm.stochastic_logdet n=10 m=30": jax.jit(lambda p, b: mm.stochastic_logdet(
        lambda v: gn(p, v), p, key, 10, 30).estimate),
    "mm.stochastic_logdet n=10 m=30 batch_size=10": jax.jit(lambda p, b: mm.stochastic_logdet(
        lambda v: gn(p, v), p, key, 10, 30, batch_size=10).estimate)}
  for f in fns.values(): jax.block_until_ready(f(params, b))
  ts = {k: [] for k in fns}
  for _ in range(reps):  # interleaved, so machine load hits all alike
    for name, f in fns.items():
      s = time.perf_counter(); jax.block_until_ready(f(params, b)); ts[name].append(time.perf_counter() - s)
  base = np.median(ts["gn matvec"])
  print("P =", sum(v.size for v in jax.tree_util.tree_leaves(params)), "float32", jax.devices()[0])
  print("| operation | median ms | min ms | median / matvec |\n|---|---|---|---|")
  for name, t in ts.items():
    print(f"| {name} | {1e3*np.median(t):.1f} | {1e3*min(t):.1f} | {np.median(t)/base:.1f} |")
  r = np.median(ts["mm.cg, 50 it"]) / np.median(ts["jax.scipy cg, 50 it"])
  print(f"mm.cg / jax.scipy.sparse.linalg.cg (median): {r:.2f}")
  return {"device": str(jax.devices()[0]), "reps": reps,
          "median_s": {k: float(np.median(t)) for k, t in ts.items()},
          "min_s": {k: float(min(t)) for k, t in ts.items()},
          "mm_cg_over_jax_cg": float(r)}


def _main_long(result, out):
  print("| model | loop | products | s | x its jitted products | compile s | first call s |\n"
        "|---|---|---|---|---|---|---|")
  for name, (nlp, params, x, y) in problems().items():
    rows = measure_long_loops(nlp, params, x, y)
    result["problems"][name] = {"long": rows}
    for loop, r in rows.items():
      print(f"| {name} | {loop} | {r['products']} | {r['seconds']:.3f} | {r['ratio']:.2f}x | "
            f"{r['compile_seconds']:.1f} | {r['first_call_seconds']:.2f} |", flush=True)
  path = pathlib.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "bench_linalg_long.json").write_text(json.dumps(result, indent=1))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=30, help="Lanczos steps")
  ap.add_argument("--cg-steps", type=int, default=10,
                  help="CG iterations (the unrolled CG's compile time grows fast)")
  ap.add_argument("--reps", type=int, default=20, help="repetitions of the operator table")
  ap.add_argument("--out", default="results", help="directory for bench_linalg.json")
  ap.add_argument("--long", action="store_true",
                  help="only the loops above 64 products (80 Lanczos steps, SLQ 3 x 30, "
                       "Hutchinson 90 probes), rolled and default")
  ap.add_argument("--hf-only", action="store_true",
                  help="only the Hessian-free step (runs on older mlmap versions too)")
  args = ap.parse_args(argv)
  result = dict(backend=jax.default_backend(), jax=jax.__version__, problems={})
  if args.long:
    return _main_long(result, args.out)
  if not args.hf_only:
    result.update(operator_table(args.reps))
  for name, (nlp, params, x, y) in problems().items():
    row = {} if args.hf_only else measure_loops(nlp, params, x, y, args.steps, args.cg_steps)
    row["hessian_free"] = measure_hessian_free(nlp, params, x, y, args.steps)
    result["problems"][name] = row
    print(name, json.dumps(row, indent=1), flush=True)
  if not args.hf_only:
    print("\n| model | loop | rolled: s (x its products) | unrolled: s (x products) | "
          "compile rolled / unrolled (s) |\n|---|---|---|---|---|")
    for name, row in result["problems"].items():
      for loop, other, n in (("lanczos", "default", args.steps), ("cg", "unrolled", args.cg_steps)):
        r, d = row[f"{loop}_rolled"], row[f"{loop}_{other}"]
        print(f"| {name} | {loop} {n} ({other}) | {r['seconds']:.3f} ({r['ratio']:.2f}x) | "
              f"{d['seconds']:.3f} ({d['ratio']:.2f}x) | {r['compile_seconds']:.1f} / "
              f"{d['compile_seconds']:.1f} |")
    print("\n| model | CG, 30 iterations, inside jit | s | x 30 jitted products | "
          "compile s | first call s |\n|---|---|---|---|---|---|")
    for name, row in result["problems"].items():
      for tag in ("rolled", "default", "host"):
        r = row[f"cg30_{tag}"]
        print(f"| {name} | {tag} | {r['seconds']:.3f} | {r['ratio']:.2f}x | "
              f"{r['compile_seconds']:.1f} | {r['first_call_seconds']:.2f} |")
    for name, row in result["problems"].items():
      top, cond = row["unrolled_products_top"], row["unrolled_products_cond"]
      print(f"{name}: {args.steps} unrolled products {top['seconds']:.3f} s at top level, "
            f"{cond['seconds']:.3f} s inside one lax.cond ({cond['seconds'] / top['seconds']:.1f}x)")
  for name, row in result["problems"].items():
    h = row["hessian_free"]
    print(f"{name}: Hessian-free step (maxiter {h['maxiter']}) {h['step_seconds']:.3f} s, "
          f"{h['ratio']:.2f}x its standalone cost model ({h['model_seconds']:.3f} s)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_linalg.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  sys.exit(main())
