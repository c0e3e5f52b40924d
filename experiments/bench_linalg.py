"""Benchmark of mm.cg, Lanczos, Hutchinson and SLQ against one matvec and jax.scipy's cg.

  python experiments/bench_linalg.py [--reps 20] [--out results/]

Writes results/bench_linalg.json. Ratios are to one damped Gauss-Newton matvec,
measured in the same process, interleaved.
"""
import argparse, json, pathlib, time
import jax, jax.numpy as jnp, numpy as np
import mlmap as mm
ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--out", default="results")
args = ap.parse_args()
REPS = args.reps
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
for _ in range(REPS):  # interleaved, so machine load hits all alike
  for name, f in fns.items():
    s = time.perf_counter(); jax.block_until_ready(f(params, b)); ts[name].append(time.perf_counter() - s)
base = np.median(ts["gn matvec"])
print("P =", sum(v.size for v in jax.tree_util.tree_leaves(params)), "float32", jax.devices()[0])
print("| operation | median ms | min ms | median / matvec |\n|---|---|---|---|")
for name, t in ts.items():
  print(f"| {name} | {1e3*np.median(t):.1f} | {1e3*min(t):.1f} | {np.median(t)/base:.1f} |")
r = np.median(ts["mm.cg, 50 it"]) / np.median(ts["jax.scipy cg, 50 it"])
print(f"mm.cg / jax.scipy.sparse.linalg.cg (median): {r:.2f}")
out = pathlib.Path(args.out); out.mkdir(parents=True, exist_ok=True)
(out / "bench_linalg.json").write_text(json.dumps({
    "device": str(jax.devices()[0]), "reps": REPS,
    "median_s": {k: float(np.median(t)) for k, t in ts.items()},
    "min_s": {k: float(min(t)) for k, t in ts.items()},
    "mm_cg_over_jax_cg": float(r)}, indent=2))
