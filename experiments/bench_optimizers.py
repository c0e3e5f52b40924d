"""Benchmark mlmap's second-order optimizers against Adam, SGD, Sophia and Muon.

Problems (float32, the dtype users train in; every array is made float32
explicitly, so the benchmark means the same inside the main job, which turns
x64 on):
  (a) autoencoder: the Martens (2010) deep autoencoder scaled to sklearn's
      digits, 64-48-32-8-32-48-64 (6 weight layers, tanh, linear code, Bernoulli
      pixels), full batch;
  (b) curves: a CURVES-like autoencoder (Hinton & Salakhutdinov 2006) on 28x28
      random cubic curves made by ``_curves.make_curves`` (seeded),
      784-128-32-8-32-128-784, P = 210,520, full batch;
  (c) classifier: a digits MLP 64-320-256-10 (tanh), P = 105,546, in
      minibatches of 128 (test accuracy on a held-out split).
Optimizers: Adam and SGD with momentum 0.9 (each on a 3-point learning-rate
grid; every run is reported, the best by final training loss is the baseline),
optax.contrib.sophia, optax.contrib.muon, mlmap's Hessian-free (GGN,
damping="auto", curvature minibatch), natural gradient (adaptive, "auto"),
K-FAC (sampled output factor) and, on the full-batch problems, nonlinear CG.

Every run on a problem gets the same wall-time budget (and a step cap). Steps
are the compiled ``mm.make_train_step``, timed after a warm-up call with
``block_until_ready``; evaluations are outside the clock. Gradient-equivalents
are elapsed time / the median time of one jitted ``jax.value_and_grad`` of the
objective on the same batch, in the same process. Targets: T1 = the best Adam
run's final training loss, T2 = best loss any run reached + 10% of (T1 - best)
(when some run went below T1). Times to target are reported as ratios to
Adam's. ``verdict()`` states the rule that turns these into the lecture's
verdict per problem.

  python experiments/bench_optimizers.py --quick   # < 5 min on a 2-core CPU
  python experiments/bench_optimizers.py --full    # 4x the budgets, more data
  python experiments/bench_optimizers.py --tiny    # seconds (the test's mode)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _curves import make_curves  # noqa: E402

import mlmap as mm  # noqa: E402

F32 = jnp.float32
MLMAP = ("Hessian-free", "natural gradient", "K-FAC", "nonlinear CG")

# mode -> sizes and budgets (seconds per run, step cap per run).
MODES = {
    "tiny": dict(n_digits=200, n_curves=64, curve_size=12, widths_c=(32, 16),
                 budget=(0.3, 0.3, 0.3), cap=10, batch=32, hf_iter=5),
    "quick": dict(n_digits=1500, n_curves=1000, curve_size=28, widths_c=(320, 256),
                  budget=(2.0, 4.0, 2.0), cap=3000, batch=128, hf_iter=20),
    "full": dict(n_digits=1500, n_curves=5000, curve_size=28, widths_c=(320, 256),
                 budget=(20.0, 60.0, 20.0), cap=50000, batch=128, hf_iter=30),
}


# --- models ----------------------------------------------------------------------

def _init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n), F32) / np.float32(np.sqrt(m)),
           "b": jnp.zeros((n,), F32)} for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def _mlp(params, x, linear=()):
  """tanh MLP; layers listed in ``linear`` (and the last) have no nonlinearity."""
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1 and i not in linear:
      x = jnp.tanh(x)
  return x


def make_problems(mode):
  """The three problems as dicts (float32 data, params, objective, test metric)."""
  cfg = MODES[mode]
  xd, yd = load_digits(return_X_y=True)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(xd))
  xd, yd = (xd[order] / 16.0).astype(np.float32), yd[order].astype(np.int32)
  n = min(cfg["n_digits"], 1500)
  xtr, xte, ytr, yte = xd[:n], xd[1500:], yd[:n], yd[1500:]
  problems = []

  sizes = [64, 48, 32, 8, 32, 48, 64]
  code = (len(sizes) - 2) // 2  # the 8-unit code layer is linear
  ae = functools.partial(_mlp, linear=(code,))
  nlp = mm.negative_log_posterior(ae, mm.bernoulli_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=10.0))
  problems.append(dict(name="autoencoder", title="(a) digits autoencoder 64-48-32-8-32-48-64",
                       nlp=nlp, params=_init(jax.random.PRNGKey(0), sizes),
                       train=(jnp.asarray(xtr), jnp.asarray(xtr)),
                       test=(jnp.asarray(xte), jnp.asarray(xte)), minibatch=None,
                       metric="test loss / example"))

  s = cfg["curve_size"]
  xc = make_curves(cfg["n_curves"] + 500, seed=0, size=s)
  sizes = [s * s, 128, 32, 8, 32, 128, s * s]
  nlp = mm.negative_log_posterior(ae, mm.bernoulli_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=10.0))
  tr, te = jnp.asarray(xc[:cfg["n_curves"]]), jnp.asarray(xc[cfg["n_curves"]:])
  problems.append(dict(name="curves", title=f"(b) curves autoencoder {s * s}-128-32-8-32-128-{s * s}",
                       nlp=nlp, params=_init(jax.random.PRNGKey(1), sizes), train=(tr, tr),
                       test=(te, te), minibatch=None, metric="test loss / example"))

  sizes = [64, *cfg["widths_c"], 10]
  nlp = mm.negative_log_posterior(_mlp, mm.categorical_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=1.0),
                                  num_data=n)
  problems.append(dict(name="classifier",
                       title=f"(c) digits MLP 64-{'-'.join(map(str, cfg['widths_c']))}-10, "
                             f"minibatch {cfg['batch']}",
                       nlp=nlp, params=_init(jax.random.PRNGKey(2), sizes),
                       train=(jnp.asarray(xtr), jnp.asarray(ytr)),
                       test=(jnp.asarray(xte), jnp.asarray(yte)), minibatch=cfg["batch"],
                       metric="test accuracy"))
  for p in problems:
    p["num_params"] = int(sum(v.size for v in jax.tree_util.tree_leaves(p["params"])))
  return problems


def make_optimizers(problem, cfg):
  """``[(name, family, tx)]``: the grids and the mlmap methods for one problem.

  A grid's ``tx`` is a pair ``(shared, learning_rate)``: one
  ``optax.inject_hyperparams`` transformation for the whole grid and the rate
  its run starts with (see :func:`_step_and_state`)."""
  nlp, x = problem["nlp"], problem["train"][0]
  n = x.shape[0]
  full = problem["minibatch"] is None
  frac = 0.2 if full else 0.5
  # One transformation per grid, its learning rate injected into the state, so
  # the grid's runs share one compiled step (compiling is most of --quick's time).
  adam = optax.inject_hyperparams(optax.adam, hyperparam_dtype=F32)(learning_rate=1e-3)
  out = [(f"Adam lr {lr:g}", "Adam", (adam, lr)) for lr in (1e-3, 3e-3, 1e-2)]
  # SGD on the summed loss: rates per example.
  sgd = optax.inject_hyperparams(optax.sgd, hyperparam_dtype=F32)(
      learning_rate=0.1 / n, momentum=0.9)
  out += [(f"SGD+momentum lr {lr:g}/N", "SGD", (sgd, lr / n)) for lr in (0.03, 0.1, 0.3)]
  out.append(("Sophia lr 1e-3", "Sophia", optax.contrib.sophia(1e-3)))
  out.append(("Muon lr 0.02", "Muon", optax.contrib.muon(0.02)))
  it = cfg["hf_iter"]
  out.append(("Hessian-free", "Hessian-free",
              mm.hessian_free(nlp, damping="auto", maxiter=it, curvature_fraction=frac)))
  out.append(("natural gradient", "natural gradient",
              mm.natural_gradient(nlp, damping="auto", maxiter=it, curvature_fraction=frac)))
  ex = x[:cfg["batch"]] if not full else x
  # Full batch: fast-moving factor averages and frequent inverses (decay 0.5,
  # every 5 updates) beat the defaults (0.95, 20), which stall on (b) while the
  # parameters move fast; minibatches keep 0.95 to average the batch noise.
  out.append(("K-FAC", "K-FAC", mm.kfac(nlp, damping="auto", inverse_every=5,
                                         decay=0.5 if full else 0.95, mc_samples=1,
                                         curvature_fraction=frac, example_inputs=ex)))
  if full:
    out.append(("nonlinear CG", "nonlinear CG", mm.nonlinear_cg(nlp)))
  return out


# --- running -----------------------------------------------------------------------

def _batches(problem, seed):
  """Endless minibatches (reshuffled every epoch), or the full batch."""
  x, y = problem["train"]
  if problem["minibatch"] is None:
    while True:
      yield x, y
  b, rng = problem["minibatch"], np.random.default_rng(seed)
  while True:
    idx = rng.permutation(x.shape[0])
    for i in range(0, x.shape[0] - b + 1, b):
      j = jnp.asarray(idx[i:i + b])
      yield x[j], y[j]


def full_loss_fn(problem):
  """``(loss, offset)``: the training objective per example on the whole training
  set, without the Gaussian prior's normalizing constant (``P/2 log(2 pi
  sigma^2)``, which would dominate the per-example numbers of a 100k-parameter
  model); ``(nlp(...) - offset) / N`` converts a train step's full-batch loss."""
  nlp = problem["nlp"]
  x, y = problem["train"]
  const = float(-mm.gaussian_log_prior(
      jax.tree_util.tree_map(jnp.zeros_like, problem["params"]), **nlp.log_prior.keywords))
  return jax.jit(lambda p: (nlp(p, x, y) - const) / x.shape[0]), const


def _step_and_state(problem, tx, steps):
  """The compiled train step for ``tx`` (one per transformation, cached in
  ``steps``) and its initial state; a grid's ``(shared, lr)`` sets the injected
  learning rate in the state."""
  tx, lr = tx if type(tx) is tuple else (tx, None)  # a transformation is a NamedTuple
  if id(tx) not in steps:
    steps[id(tx)] = (tx, mm.make_train_step(problem["nlp"], tx))
  state = tx.init(problem["params"])
  if lr is not None:
    state = state._replace(hyperparams={**state.hyperparams,
                                        "learning_rate": jnp.asarray(lr, F32)})
  return steps[id(tx)][1], state


def run_one(problem, tx, budget, cap, full_loss, steps=None):
  """Loss per step (per example, full training set), wall clock, and the test metric.

  Full batch: the train step's own loss (at the params before the step) is the
  curve, so evaluation costs nothing. Minibatches: the full training loss every
  5 steps, outside the clock. ``steps`` caches compiled steps across runs.
  """
  (loss_fn, const) = full_loss
  n = problem["train"][0].shape[0]
  step, state = _step_and_state(problem, tx, {} if steps is None else steps)
  batches = _batches(problem, seed=0)
  params = problem["params"]
  jax.block_until_ready(step(params, state, next(_batches(problem, seed=1))))  # compile
  full = problem["minibatch"] is None
  losses, times, steps = ([], [], []) if full else ([float(loss_fn(params))], [0.0], [0])
  clock, k = 0.0, 0
  while clock < budget and k < cap:
    batch = next(batches)
    t0 = time.perf_counter()
    params, state, m = step(params, state, batch)
    jax.block_until_ready(params)
    before = clock
    clock += time.perf_counter() - t0
    k += 1
    if full:
      losses.append((float(m["loss"]) - const) / n)
      times.append(before)
      steps.append(k - 1)
    elif k % 5 == 0 or clock >= budget or k == cap:
      losses.append(float(loss_fn(params)))
      times.append(clock)
      steps.append(k)
  if full:
    losses.append(float(loss_fn(params)))
    times.append(clock)
    steps.append(k)
  return dict(loss=losses, time=times, steps=steps, test=test_metric(problem, params))


def test_metric(problem, params):
  nlp, (x, y) = problem["nlp"], problem["test"]
  out = nlp.apply_fn(params, x)
  if problem["minibatch"] is None:
    return float(-jnp.sum(mm.bernoulli_log_likelihood(out, y)) / x.shape[0])
  return float(jnp.mean(jnp.argmax(out, -1) == y))


def grad_time(problem, repeats=10):
  nlp = problem["nlp"]
  x, y = next(_batches(problem, seed=2))
  vg = jax.jit(jax.value_and_grad(nlp))
  jax.block_until_ready(vg(problem["params"], x, y))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(vg(problem["params"], x, y))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def first_reach(run, target):
  """``(steps, seconds)`` when the run's loss first reaches ``target``, or None."""
  if target is None:
    return None
  for loss, t, k in zip(run["loss"], run["time"], run["steps"]):
    if loss <= target:
      return k, t
  return None


def summarize(runs, families, t_grad):
  """Per run: final loss, test metric, steps / grad-eq / seconds to T1 and T2."""
  adam = [n for n in runs if families[n] == "Adam"]
  best_adam = min(adam, key=lambda n: runs[n]["loss"][-1])
  t1 = runs[best_adam]["loss"][-1]
  best = min(min(r["loss"]) for r in runs.values())
  t2 = best + 0.1 * (t1 - best) if best < t1 else None
  adam_t1 = first_reach(runs[best_adam], t1)[1]
  rows = {}
  for name, r in runs.items():
    row = dict(family=families[name], final_loss=r["loss"][-1], best_loss=min(r["loss"]),
               test=r["test"], steps_run=r["steps"][-1], seconds=r["time"][-1])
    for tag, target in (("T1", t1), ("T2", t2)):
      hit = first_reach(r, target)
      row[tag] = None if hit is None else dict(
          steps=hit[0], seconds=hit[1], grad_equivalents=hit[1] / t_grad,
          time_vs_adam=hit[1] / adam_t1 if adam_t1 > 0 else None)
    rows[name] = row
  return dict(T1=t1, T2=t2, best_adam=best_adam, adam_seconds_to_T1=adam_t1, rows=rows,
              adam_best_loss=min(runs[best_adam]["loss"]))


def verdict(summary) -> dict:
  """The lecture's "Adam gives similar benefits at low computational cost", per problem.

  Rule (applied to one problem's :func:`summarize` output, best Adam run = baseline):
    * **refuted** when some mlmap method (Hessian-free, natural gradient, K-FAC,
      nonlinear CG) reaches T1 (Adam's final loss) in at most 1/3 of Adam's wall
      time to T1 AND reaches a loss below the lowest Adam ever reached in its
      budget (the issue's goal);
    * **confirmed** when no mlmap method reaches T1 within Adam's wall time;
    * **mixed** otherwise (an mlmap method is faster but not 3x, or 3x faster but
      ends no lower than Adam).

  Returns:
    ``dict(verdict, goal_met, fastest, ratio, lower_than_adam)``.
  """
  rows, adam_low = summary["rows"], summary["adam_best_loss"]
  ratios = {n: r["T1"]["time_vs_adam"] for n, r in rows.items()
            if r["family"] in MLMAP and r["T1"] is not None
            and r["T1"]["time_vs_adam"] is not None}
  lower = {n: rows[n]["best_loss"] < adam_low for n in rows if rows[n]["family"] in MLMAP}
  fastest = min(ratios, key=ratios.get) if ratios else None
  goal = any(ratios[n] <= 1 / 3 and lower[n] for n in ratios)
  if goal:
    word = "refuted"
  elif not ratios or min(ratios.values()) > 1.0:
    word = "confirmed"
  else:
    word = "mixed"
  return dict(verdict=word, goal_met=goal, fastest=fastest,
              ratio=None if fastest is None else ratios[fastest],
              lower_than_adam=sorted(n for n, v in lower.items() if v))


# --- report ------------------------------------------------------------------------

def _plot(problem, runs, families, summary, t_grad, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
  colors = {}
  for i, name in enumerate(runs):
    colors[name] = f"C{i % 10}"
  for name, r in runs.items():
    ls = "-" if families[name] in MLMAP else "--"
    steps = np.maximum(np.asarray(r["steps"]), 1)
    t = np.maximum(np.asarray(r["time"]), 1e-4)
    for ax, xs in zip(axes, (steps, t / t_grad, t)):
      ax.plot(xs, r["loss"], ls, color=colors[name], label=name, lw=1.3)
  for ax, xl in zip(axes, ("steps", "gradient-equivalents (wall / one gradient)",
                           "wall time (s, compiled steps)")):
    ax.axhline(summary["T1"], color="0.5", ls=":", lw=1)
    if summary["T2"] is not None:
      ax.axhline(summary["T2"], color="0.3", ls="-.", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel=xl, ylabel="training loss / example")
  axes[0].set_title(problem["title"], loc="left", fontsize=10)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=7,
             fontsize=7)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(problem, summary, t_grad):
  lines = [f"{problem['title']}, P = {problem['num_params']:,}, one gradient "
           f"{t_grad * 1e3:.2f} ms; T1 = {summary['T1']:.5g} "
           f"(best Adam: {summary['best_adam']}), T2 = "
           + ("-" if summary["T2"] is None else f"{summary['T2']:.5g}"), "",
           f"| optimizer | steps run | final loss | {problem['metric']} | T1: grad-eq | "
           "T1: x Adam's time | T2: grad-eq | T2: x Adam's time |", "|---|---|---|---|---|---|---|---|"]
  for name, r in summary["rows"].items():
    cells = []
    for tag in ("T1", "T2"):
      hit = r[tag]
      cells += (["-", "-"] if hit is None else
                [f"{hit['grad_equivalents']:.0f}", f"{hit['time_vs_adam']:.2f}"])
    lines.append(f"| {name} | {r['steps_run']} | {r['final_loss']:.5g} | {r['test']:.4g} | "
                 + " | ".join(cells) + " |")
  return lines


def run_benchmark(mode, out_dir, progress=True, problems=None, families=None):
  """Run every optimizer on every problem; write JSON, PNGs and markdown; return the dict.

  ``problems`` (names) and ``families`` (e.g. ``("Adam", "K-FAC")``; Adam, the
  baseline, is always run) restrict the run, for tests.
  """
  if mode not in MODES:
    raise ValueError(f"run_benchmark: mode must be one of {sorted(MODES)}, got {mode!r}.")
  from tqdm.auto import tqdm
  cfg = MODES[mode]
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result = dict(mode=mode, machine=f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}",
                step_cap=cfg["cap"], problems={})
  md = [f"Mode {mode}: {'/'.join(f'{b:g}' for b in cfg['budget'])} s (problems a/b/c) and "
        f"at most {cfg['cap']} steps per run, float32, {result['machine']}.", ""]
  for problem, budget in zip(make_problems(mode), cfg["budget"]):
    if problems is not None and problem["name"] not in problems:
      continue
    t_grad = grad_time(problem)
    full_loss = full_loss_fn(problem)
    opts = [o for o in make_optimizers(problem, cfg)
            if families is None or o[1] in families or o[1] == "Adam"]
    fam = {n: f for n, f, _ in opts}
    runs, steps = {}, {}
    for name, _, tx in tqdm(opts, desc=problem["name"], leave=False, disable=not progress):
      runs[name] = run_one(problem, tx, budget, cfg["cap"], full_loss, steps)
    summary = summarize(runs, fam, t_grad)
    v = verdict(summary)
    png = out_dir / f"bench_optimizers_{problem['name']}.png"
    _plot(problem, runs, fam, summary, t_grad, png)
    result["problems"][problem["name"]] = dict(
        title=problem["title"], num_params=problem["num_params"], grad_seconds=t_grad,
        budget_seconds=budget,
        metric=problem["metric"], summary=summary, verdict=v, figure=png.name,
        curves={n: dict(loss=r["loss"], time=r["time"], steps=r["steps"])
                for n, r in runs.items()})
    md += table(problem, summary, t_grad)
    md += ["", f"Verdict: **{v['verdict']}** (goal met: {v['goal_met']}; fastest mlmap "
           f"method to T1: {v['fastest']}"
           + ("" if v["ratio"] is None else f" at {v['ratio']:.2f}x Adam's time")
           + f"; below Adam's lowest loss: {', '.join(v['lower_than_adam']) or 'none'}).", ""]
  result["markdown"] = "\n".join(md)
  (out_dir / "bench_optimizers.json").write_text(json.dumps(result, indent=1, default=float))
  (out_dir / "bench_optimizers.md").write_text(result["markdown"])
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  g = ap.add_mutually_exclusive_group()
  for m in MODES:
    g.add_argument(f"--{m}", dest="mode", action="store_const", const=m)
  ap.add_argument("--out", default="results")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  res = run_benchmark(args.mode or "quick", args.out)
  print(res["markdown"])
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
