"""Benchmark mlmap's second-order optimizers against SGD and Adam.

Problems (full-batch MAP, float64, sklearn data):
  (a) L2 logistic regression on breast_cancer,
  (b) a tanh MLP classifier on digits,
  (c) a deep autoencoder on digits (tanh, linear code, Bernoulli pixels):
      the classic test of Hessian-free (Martens 2010), scaled down.
Optimizers: SGD and Adam (optax; best of a small learning-rate grid), nonlinear
CG, Hessian-free (GGN and Hessian), natural gradient (CG), Newton (dense; only
where the P x P Hessian is small enough, see --newton-max-params).

SGD, Adam and natural gradient take the best of a 3-point learning-rate grid.
Every run stops at a step cap or a wall-time budget. For each run: loss per
step, wall time per step (compiled step, after a warm-up call,
block_until_ready each step), and gradient-equivalents of compute, both
modelled (passes counted from the optimizer state, see COST below) and measured
(elapsed time / median time of one jitted gradient in the same process). Then
steps / gradient-equivalents / seconds to reach two target losses:
``f_best + gap * (f_0 - f_best)`` (f_best: the lowest loss any run reached) and
the final loss of the best Adam run (the baseline; time ratios are to Adam's).
Writes JSON and a PNG (loss vs steps and vs time) to --out.

  python experiments/bench_optimizers.py            # --quick (default) sizes
  python experiments/bench_optimizers.py --full     # Martens-like sizes
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_breast_cancer, load_digits
from tqdm.auto import tqdm

jax.config.update("jax_enable_x64", True)

import mlmap as mm  # noqa: E402

# Modelled cost in gradient-equivalents (1 = one forward + backward pass over
# the batch): a forward pass ~1/3; a GGN / Fisher product (jvp + vjp of the
# linearized model) ~1; a Hessian-vector product (forward-over-reverse) ~2;
# linearizing the model ~1/3, linearizing the gradient ~1.
COST = """SGD/Adam 1; NCG 1 + 1/3 + linesearch_steps; HF-ggn 1 + 1/3 + (cg_it + 1) + 2/3;
HF-hessian 1 + 1 + 2 (cg_it + 1) + 2/3; NG 1 + 1/3 + cg_it; Newton 1 + 1 + 2 P + 2/3"""


def _dense_init(key, sizes):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)})
  return params


def _mlp_apply(params, x, code_layer=None):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1 and i != code_layer:
      x = jnp.tanh(x)
  return x


def make_problems(quick):
  key = jax.random.PRNGKey(0)
  problems = []
  x, y = load_breast_cancer(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  nlp = mm.negative_log_posterior(
      lambda p, inp: inp @ p["w"] + p["b"], mm.bernoulli_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  problems.append(dict(name="logistic (breast_cancer)", nlp=nlp,
                       params=({"w": jnp.zeros(30), "b": jnp.zeros(())}),
                       batch=(jnp.asarray(x), jnp.asarray(y, float)), convex=True))

  xd, yd = load_digits(return_X_y=True)
  n = 500 if quick else len(xd)
  xs = (xd[:n] - xd[:n].mean(0)) / np.where(xd[:n].std(0) > 0, xd[:n].std(0), 1.0)
  hidden = 16 if quick else 32
  nlp = mm.negative_log_posterior(
      _mlp_apply, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.0))
  problems.append(dict(name=f"MLP 64-{hidden}-10 tanh (digits, n={n})", nlp=nlp,
                       params=_dense_init(key, [64, hidden, 10]),
                       batch=(jnp.asarray(xs), jnp.asarray(yd[:n])), convex=False))

  sizes = [64, 16, 8, 16, 64] if quick else [64, 32, 16, 32, 64]
  pix = jnp.asarray(xd[:n] / 16.0)
  nlp = mm.negative_log_posterior(
      functools.partial(_mlp_apply, code_layer=len(sizes) // 2 - 1),
      mm.bernoulli_log_likelihood, functools.partial(mm.gaussian_log_prior, sigma=3.0))
  problems.append(dict(name=f"autoencoder {'-'.join(map(str, sizes))} (digits, n={n})",
                       nlp=nlp, params=_dense_init(jax.random.fold_in(key, 1), sizes),
                       batch=(pix, pix), convex=False))
  return problems


def make_optimizers(nlp, num_data, num_params, newton_max_params):
  """(name, tx, steps_factor) list; first-order methods get 10x the steps."""
  opts = []
  for lr in (0.03, 0.3, 3.0):  # per example: the objective is a sum over the batch
    opts.append((f"SGD lr={lr}/N", optax.sgd(lr / num_data), 10))
  for lr in (1e-3, 1e-2, 1e-1):
    opts.append((f"Adam lr={lr}", optax.adam(lr), 10))
  opts += [("nonlinear CG", mm.nonlinear_cg(nlp), 10),
           ("HF (GGN)", mm.hessian_free(nlp), 1),
           ("HF (Hessian)", mm.hessian_free(nlp, curvature="hessian"), 1)]
  for lr in (1.0, 0.3, 0.1):
    opts.append((f"natural gradient lr={lr}", mm.natural_gradient(nlp, learning_rate=lr), 1))
  if num_params <= newton_max_params:
    opts.append(("Newton", mm.newton(nlp), 1))
  return opts


def step_cost(name, state, num_params):
  if name.startswith(("SGD", "Adam")):
    return 1.0
  if name == "nonlinear CG":
    return 1 + 1 / 3 + float(state.linesearch.info.num_linesearch_steps)
  if name == "HF (GGN)":
    return 1 + 1 / 3 + float(state.cg_iterations) + 1 + 2 / 3 + float(state.fallback)
  if name == "HF (Hessian)":
    return 1 + 1 + 2 * (float(state.cg_iterations) + 1) + 2 / 3 + 2 * float(state.fallback)
  if name.startswith("natural gradient"):
    return 1 + 1 / 3 + float(state.cg_iterations)
  if name == "Newton":
    return 1 + 1 + 2 * num_params + 2 / 3
  raise ValueError(name)


def run(problem, name, tx, steps, time_budget):
  nlp, batch, params = problem["nlp"], problem["batch"], problem["params"]
  num_params = ravel_pytree(params)[0].size
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  jax.block_until_ready(step(params, state, batch))  # compile (warm-up)
  loss_fn = jax.jit(nlp)
  losses, times, costs, skipped = [float(loss_fn(params, *batch))], [0.0], [0.0], 0
  elapsed, cost = 0.0, 0.0
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state, metrics = step(params, state, batch)
    jax.block_until_ready(params)
    elapsed += time.perf_counter() - t0
    cost += step_cost(name, state, num_params)
    skipped += int(metrics["skipped"])
    losses.append(float(loss_fn(params, *batch)))
    times.append(elapsed)
    costs.append(cost)
    if elapsed > time_budget or not np.isfinite(losses[-1]):
      break
  return dict(loss=losses, time=times, grad_equiv_model=costs, skipped=skipped)


def grad_time(problem, repeats=20):
  g = jax.jit(jax.grad(problem["nlp"]))
  jax.block_until_ready(g(problem["params"], *problem["batch"]))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(g(problem["params"], *problem["batch"]))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def to_target(res, target, t_grad):
  for k, f in enumerate(res["loss"]):
    if f <= target:
      return dict(steps=k, grad_equiv_model=res["grad_equiv_model"][k],
                  seconds=res["time"][k], grad_equiv_wall=res["time"][k] / t_grad)
  return None


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", default=True)
  ap.add_argument("--full", dest="quick", action="store_false")
  ap.add_argument("--out", default="results")
  ap.add_argument("--time-budget", type=float, default=None,
                  help="seconds per run (default 4 quick, 60 full)")
  ap.add_argument("--newton-max-params", type=int, default=1500)
  ap.add_argument("--steps", type=int, default=None,
                  help="max steps of second-order runs (10x for SGD/Adam/NCG); "
                       "default 100 quick, 300 full")
  ap.add_argument("--gap", type=float, default=1e-2)
  args = ap.parse_args()
  budget = args.time_budget or (4.0 if args.quick else 60.0)
  max_steps = args.steps or (100 if args.quick else 300)
  os.makedirs(args.out, exist_ok=True)
  out = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                          cpu_count=os.cpu_count(), device=str(jax.devices()[0]),
                          jax=jax.__version__),
             quick=args.quick, time_budget_s=budget, cost_model=COST, problems=[])
  for problem in make_problems(args.quick):
    num_params = ravel_pytree(problem["params"])[0].size
    n = jax.tree.leaves(problem["batch"])[0].shape[0]
    t_grad = grad_time(problem)
    opts = make_optimizers(problem["nlp"], n, num_params, args.newton_max_params)
    runs = {}
    for name, tx, factor in tqdm(opts, desc=problem["name"][:30]):
      runs[name] = run(problem, name, tx, max_steps * factor, budget)
    grid_final = {k: r["loss"][-1] for k, r in runs.items()}
    for base in ("SGD", "Adam", "natural gradient"):  # best learning rate of each grid
      grid = {k: v for k, v in runs.items() if k.startswith(base)}
      best = min(grid, key=lambda k: np.nanmin(np.r_[grid[k]["loss"], np.inf]))
      for k in grid:
        if k != best:
          runs.pop(k)
    f0 = runs[next(iter(runs))]["loss"][0]
    f_best = min(np.nanmin(r["loss"]) for r in runs.values())
    adam = next(k for k in runs if k.startswith("Adam"))
    targets = {f"gap {args.gap:g}": f_best + args.gap * (f0 - f_best),
               "Adam's final loss": runs[adam]["loss"][-1]}
    entry = dict(name=problem["name"], num_params=int(num_params), num_data=int(n),
                 convex=problem["convex"], grad_seconds=t_grad, f0=f0,
                 f_best=float(f_best), newton_skipped=num_params > args.newton_max_params,
                 runs=runs, final_loss_all_runs=grid_final, targets=targets,
                 to_target={})
    print(f"\n{problem['name']}: P={num_params}, N={n}, f0={f0:.4f}, "
          f"f_best={f_best:.6f}, one gradient {1e3 * t_grad:.2f} ms"
          + (" (Newton skipped: P too big)" if entry["newton_skipped"] else ""))
    for tname, target in targets.items():
      reach = {k: to_target(r, target, t_grad) for k, r in runs.items()}
      entry["to_target"][tname] = reach
      print(f"  to {tname} = {target:.6g}:")
      base_s = reach[adam]["seconds"] if reach[adam] else None
      for k, v in reach.items():
        last = runs[k]["loss"][-1]
        ratio = (f"  {v['seconds'] / base_s:6.2f}x Adam's time"
                 if v is not None and base_s else "")
        print(f"    {k:26s} " + ("not reached" if v is None else
              f"steps {v['steps']:5d}  grad-eq(model) {v['grad_equiv_model']:8.0f}  "
              f"grad-eq(wall) {v['grad_equiv_wall']:8.0f}  {v['seconds']:7.3f} s" + ratio)
              + f"   [final {last:.6g} after {len(runs[k]['loss']) - 1} steps, "
              f"{runs[k]['time'][-1]:.2f} s]")
    print("  final loss of every run (incl. learning-rate grids): "
          + ", ".join(f"{k}: {v:.6g}" for k, v in grid_final.items()))
    out["problems"].append(entry)
  path = os.path.join(args.out, "bench_optimizers.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", path)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  probs = out["problems"]
  fig, axes = plt.subplots(len(probs), 2, figsize=(11, 3.6 * len(probs)), squeeze=False)
  for row, entry in zip(axes, probs):
    for name, r in entry["runs"].items():
      loss = np.asarray(r["loss"])
      y = np.maximum(loss - entry["f_best"], 1e-12) if entry["convex"] else loss
      y = np.where(np.isfinite(y) & (y < 100 * max(abs(entry["f0"]), 1)), y, np.nan)
      row[0].semilogy(np.arange(len(y)), y, label=name)
      row[1].semilogy(np.asarray(r["time"]) + 1e-4, y, label=name)
    ylabel = "loss - best loss" if entry["convex"] else "loss (divergent runs cut)"
    row[0].set(title=entry["name"], xlabel="step", ylabel=ylabel, xscale="symlog")
    row[1].set(title=entry["name"], xlabel="wall time [s]", xscale="log")
    row[0].legend(fontsize=7)
  fig.tight_layout()
  png = os.path.join(args.out, "bench_optimizers.png")
  fig.savefig(png, dpi=110)
  print("wrote", png)


if __name__ == "__main__":
  main()
