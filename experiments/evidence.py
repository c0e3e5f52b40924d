"""Does the Laplace evidence choose the weight decay that predicts best?

For a small MLP on a real regression data set (sklearn diabetes) and a real
classification data set (sklearn breast_cancer), fit the MAP on a training
split for a grid of weight-decay coefficients lambda, and plot against
log10 lambda

* the Laplace log evidence of the training data (GGN curvature, per example),
* the held-out log-likelihood per example of the linearized-Laplace (GLM)
  predictive, and of the MAP plug-in predictive.

The evidence-chosen lambda (grid argmax) and the held-out-best lambda are
marked; their distance in log10 lambda and the held-out log-likelihood lost by
trusting the evidence are reported. ``mm.maximize_evidence`` is run too, and
its lambda is marked. Regression: lambda = sigma^2 / sigma_0^2 with the noise
sigma held at the value maximize_evidence finds; classification:
lambda = 1 / sigma_0^2.

Usage:
  python experiments/evidence.py            # --quick (default): < 60 s
  python experiments/evidence.py --full     # finer grid, more hidden units
  python experiments/evidence.py --out results/
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time

import numpy as np
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split
from tqdm import tqdm

jax.config.update("jax_enable_x64", True)

import mlmap as mm  # noqa: E402


def mlp(params, x):
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return h @ params["l2"]["w"] + params["l2"]["b"]


def init(key, d_in, hidden):
  k1, k2 = jax.random.split(key)
  return {"l1": {"w": jax.random.normal(k1, (d_in, hidden)) / math.sqrt(d_in),
                 "b": jnp.zeros(hidden)},
          "l2": {"w": jax.random.normal(k2, (hidden, 1)) / math.sqrt(hidden),
                 "b": jnp.zeros(1)}}


def standardized_split(x, y, seed, standardize_y):
  xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed)
  mu, sd = xtr.mean(0), xtr.std(0)
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  if standardize_y:
    m, s = ytr.mean(), ytr.std()
    ytr, yte = (ytr - m) / s, (yte - m) / s
  return xtr, xte, ytr[:, None].astype(float), yte[:, None].astype(float)


def sweep(kind, xtr, ytr, xte, yte, hidden, log_lams, fit_steps, seed, total,
          slq=False):
  """Evidence and held-out log-likelihood over the grid; maximize_evidence's pick."""
  n = len(ytr)
  if kind == "regression":
    def make_nlp(h):
      return mm.negative_log_posterior(
          mlp, functools.partial(mm.gaussian_log_likelihood, sigma=h["sigma"]),
          functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]))
    hyper0 = {"sigma": 1.0, "prior_sigma": 1.0}
  else:
    def make_nlp(h):
      return mm.negative_log_posterior(
          mlp, mm.bernoulli_log_likelihood,
          functools.partial(mm.gaussian_log_prior, sigma=h["prior_sigma"]))
    hyper0 = {"prior_sigma": 1.0}
  params0 = init(jax.random.PRNGKey(seed), xtr.shape[1], hidden)
  t0 = time.perf_counter()
  hyper, params_me, info = mm.maximize_evidence(
      make_nlp, hyper0, params0, xtr, ytr, num_iterations=60, fit_steps=fit_steps,
      tol=1e-6)
  me_seconds = time.perf_counter() - t0
  sigma = float(hyper.get("sigma", 1.0))
  log_lam_me = math.log10(sigma**2 / float(hyper["prior_sigma"]) ** 2)
  # The same, by gradient ascent on the evidence along the MAP path (implicit
  # function theorem term included), started from MacKay's fixed point.
  t0 = time.perf_counter()
  hyper_t, params_t, info_t = mm.maximize_evidence(
      make_nlp, hyper, params_me, xtr, ytr, num_iterations=total["iterations"],
      fit_steps=total["fit_steps"], prior_key=None, noise_key=None, total_derivative=True,
      learning_rate=total["learning_rate"], tol=1e-6)
  total_seconds = time.perf_counter() - t0
  log_lam_t = math.log10(float(hyper_t.get("sigma", 1.0)) ** 2
                         / float(hyper_t["prior_sigma"]) ** 2)

  def hyper_at(log_lam):
    h = {"prior_sigma": sigma / jnp.sqrt(10.0**log_lam)}
    if kind == "regression":
      h["sigma"] = jnp.asarray(sigma)
    return h

  @jax.jit
  def fit(params, log_lam):
    nlp = make_nlp(hyper_at(log_lam))
    tx = mm.newton(nlp)

    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(nlp)(p, xtr, ytr), s, p, batch=(xtr, ytr))
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=fit_steps)[0][0]

  @jax.jit
  def evaluate(params, log_lam):
    nlp = make_nlp(hyper_at(log_lam))
    ev, ev_info = mm.log_evidence(nlp, params, xtr, ytr, return_info=True)
    post = mm.laplace(nlp, params, xtr, ytr)
    if kind == "regression":
      mean, var = post.predictive(xte)
      glm = jax.scipy.stats.norm.logpdf(yte, mean, jnp.sqrt(var))
      plug = jax.scipy.stats.norm.logpdf(yte, mean, sigma)
    else:
      prob = post.predictive(xte)
      glm = yte * jnp.log(prob) + (1 - yte) * jnp.log1p(-prob)
      plug = mm.bernoulli_log_likelihood(mlp(params, xte), yte)
    return ev, ev_info.newton_decrement, jnp.mean(glm), jnp.mean(plug)

  # Warm starts walk outward from maximize_evidence's MAP in both directions:
  # starting at strong decay would stay at the w = 0 saddle of a tanh MLP.
  start = int(np.argmin(np.abs(log_lams - log_lam_me)))
  rows = {}
  for order in (range(start, len(log_lams)), range(start - 1, -1, -1)):
    params = params_me
    for i in tqdm(order, desc=kind, leave=False):
      params = fit(params, log_lams[i])
      ev, dec, glm, plug = (float(v) for v in evaluate(params, log_lams[i]))
      rows[i] = {"log10_lambda": float(log_lams[i]), "log_evidence_per_example": ev / n,
                 "newton_decrement": dec, "test_ll_glm": glm, "test_ll_map": plug}
  rows = [rows[i] for i in range(len(log_lams))]
  ev = np.array([r["log_evidence_per_example"] for r in rows])
  glm = np.array([r["test_ll_glm"] for r in rows])
  plug = np.array([r["test_ll_map"] for r in rows])
  i_ev, i_te = int(np.nanargmax(ev)), int(np.nanargmax(glm))
  glm_me = float(evaluate(params_me, log_lam_me)[2])
  # Held-out LL at the total-derivative optimum, with its own noise sigma.
  post_t = mm.laplace(make_nlp(hyper_t), params_t, xtr, ytr)
  if kind == "regression":
    m, v = post_t.predictive(xte)
    glm_t = float(jnp.mean(jax.scipy.stats.norm.logpdf(yte, m, jnp.sqrt(v))))
  else:
    prob = post_t.predictive(xte)
    glm_t = float(jnp.mean(yte * jnp.log(prob) + (1 - yte) * jnp.log1p(-prob)))
  return {
      "slq": slq_accuracy(make_nlp, hyper, params_me, xtr, ytr) if slq else None,
      "kind": kind, "num_train": n, "num_test": len(yte),
      "num_params": int(ravel_pytree(params0)[0].size),
      "hidden": hidden, "sigma": sigma, "grid": rows,
      "evidence_choice": {"log10_lambda": float(log_lams[i_ev]), "test_ll_glm": float(glm[i_ev]),
                          "test_ll_map": float(plug[i_ev])},
      "heldout_best": {"log10_lambda": float(log_lams[i_te]), "test_ll_glm": float(glm[i_te]),
                       "test_ll_map": float(plug[int(np.nanargmax(plug))]),
                       "log10_lambda_map": float(log_lams[int(np.nanargmax(plug))])},
      "gap_log10_lambda": float(log_lams[i_ev] - log_lams[i_te]),
      "test_ll_lost_glm": float(glm[i_te] - glm[i_ev]),
      "maximize_evidence": {"log10_lambda": log_lam_me, "hyper": {k: float(v) for k, v in
                                                                 hyper.items()},
                            "test_ll_glm": glm_me, "iterations": info.num_iterations,
                            "converged": bool(info.converged),
                            "log_evidence_per_example": float(info.log_evidence[-1]) / n,
                            "gamma": float(info.gamma[-1]), "seconds": me_seconds},
      "maximize_evidence_total_derivative": {
          "log10_lambda": log_lam_t, "hyper": {k: float(v) for k, v in hyper_t.items()},
          "test_ll_glm": glm_t, "iterations": info_t.num_iterations,
          "converged": bool(info_t.converged),
          "log_evidence_per_example": float(info_t.log_evidence[-1]) / n,
          "best_log_evidence_per_example": float(jnp.max(info_t.log_evidence)) / n,
          "seconds": total_seconds},
  }


def slq_accuracy(make_nlp, hyper, params, x, y, seeds=5):
  """SLQ log-det (and so log-evidence) error against the dense Cholesky value."""
  nlp = make_nlp(hyper)
  dense, dinfo = mm.log_evidence(nlp, params, x, y, return_info=True, map_tol=None)
  size = int(ravel_pytree(params)[0].size)
  rows = []
  for probes, steps in [(8, 10), (8, 30), (32, 10), (32, 30), (32, size)]:
    f = jax.jit(lambda k: mm.log_evidence(nlp, params, x, y, method="slq", key=k,
                                          num_probes=probes, num_steps=steps,
                                          return_info=True, map_tol=None))
    errs, ses, secs = [], [], []
    for seed in range(seeds):
      t0 = time.perf_counter()
      value, info = jax.block_until_ready(f(jax.random.PRNGKey(seed)))
      secs.append(time.perf_counter() - t0)
      errs.append(float(info.logdet - dinfo.logdet))
      ses.append(float(info.logdet_stderr))
    rows.append({"num_probes": probes, "num_steps": min(steps, size),
                 "logdet_dense": float(dinfo.logdet),
                 "mean_abs_error": float(np.mean(np.abs(errs))),
                 "max_abs_error": float(np.max(np.abs(errs))),
                 "mean_stderr": float(np.mean(ses)),
                 "max_abs_z": float(np.max(np.abs(np.array(errs) / np.array(ses)))),
                 "log_evidence_error_per_example": float(np.max(np.abs(errs))) / 2 / len(y),
                 "seconds_after_compile": float(np.median(secs[1:]))})
  return rows


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5.4))
  for ax, res in zip(np.atleast_1d(axes), results):
    lam = [r["log10_lambda"] for r in res["grid"]]
    ax.plot(lam, [r["log_evidence_per_example"] for r in res["grid"]], "o-", color="C0",
            label="log evidence / N (train)")
    ax.set_xlabel("log10 lambda")
    ax.set_ylabel("log evidence per training example", color="C0")
    ax2 = ax.twinx()
    ax2.plot(lam, [r["test_ll_glm"] for r in res["grid"]], "s-", color="C1",
             label="held-out LL, GLM predictive")
    ax2.plot(lam, [r["test_ll_map"] for r in res["grid"]], "^--", color="C2",
             label="held-out LL, MAP plug-in")
    ax2.set_ylabel("held-out log-likelihood per example", color="C1")
    ax.axvline(res["evidence_choice"]["log10_lambda"], color="C0", ls=":",
               label="evidence argmax")
    ax.axvline(res["heldout_best"]["log10_lambda"], color="C1", ls=":",
               label="held-out best (GLM)")
    ax.axvline(res["maximize_evidence"]["log10_lambda"], color="k", ls="--", lw=0.8,
               label="maximize_evidence (MacKay fixed point)")
    ax.axvline(res["maximize_evidence_total_derivative"]["log10_lambda"], color="C3",
               ls="-.", lw=0.8, label="maximize_evidence (total derivative)")
    ax.set_title(f"{res['dataset']} ({res['kind']}, MLP P={res['num_params']}): "
                 f"gap {res['gap_log10_lambda']:+.2f} decades")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, ncol=2,
              loc="upper center", bbox_to_anchor=(0.5, -0.15))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", default=True,
                      help="small grid (default)")
  parser.add_argument("--full", dest="quick", action="store_false", help="finer grid")
  parser.add_argument("--out", default="results/")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--slq", action="store_true",
                      help="also measure SLQ log-det accuracy against the dense value")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  num = 7 if args.quick else 31
  hidden = (8, 4) if args.quick else (16, 8)
  fit_steps = 15 if args.quick else 30
  # Gradient ascent with the total derivative, started at MacKay's fixed point.
  total = ({"iterations": 25, "fit_steps": 5, "learning_rate": 0.1} if args.quick else
           {"iterations": 150, "fit_steps": 30, "learning_rate": 0.05})
  start = time.perf_counter()
  results = []
  x, y = load_diabetes(return_X_y=True)
  xtr, xte, ytr, yte = standardized_split(x, y, args.seed, standardize_y=True)
  res = sweep("regression", xtr, ytr, xte, yte, hidden[0], np.linspace(-2, 4, num),
              fit_steps, args.seed, total, slq=args.slq)
  results.append({"dataset": "diabetes", **res})
  slq = res.pop("slq")
  x, y = load_breast_cancer(return_X_y=True)
  xtr, xte, ytr, yte = standardized_split(x, y, args.seed, standardize_y=False)
  res = sweep("classification", xtr, ytr, xte, yte, hidden[1], np.linspace(-3, 3, num),
              fit_steps, args.seed, total)
  res.pop("slq")
  results.append({"dataset": "breast_cancer", **res})
  seconds = time.perf_counter() - start
  out = {"command": "python experiments/evidence.py" + ("" if args.quick else " --full"),
         "quick": args.quick, "seed": args.seed, "seconds": seconds,
         "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores), "
                    f"jax {jax.__version__} {jax.default_backend()}",
         "results": results, "slq_accuracy_diabetes_mlp": slq}
  with open(os.path.join(args.out, "evidence.json"), "w") as f:
    json.dump(out, f, indent=1)
  plot(results, os.path.join(args.out, "evidence.png"))
  for r in results:
    print(f"{r['dataset']:14s} evidence argmax log10 lambda = "
          f"{r['evidence_choice']['log10_lambda']:+.2f}, held-out best = "
          f"{r['heldout_best']['log10_lambda']:+.2f} (gap {r['gap_log10_lambda']:+.2f}); "
          f"held-out LL lost {r['test_ll_lost_glm']:.4f} nats/example; "
          f"maximize_evidence: {r['maximize_evidence']['log10_lambda']:+.2f} "
          f"(test LL {r['maximize_evidence']['test_ll_glm']:.4f}), total derivative: "
          f"{r['maximize_evidence_total_derivative']['log10_lambda']:+.2f} "
          f"(test LL {r['maximize_evidence_total_derivative']['test_ll_glm']:.4f})")
  for row in slq or []:
    print(f"SLQ probes={row['num_probes']:3d} steps={row['num_steps']:3d}: max |err| "
          f"{row['max_abs_error']:.3f} (logdet {row['logdet_dense']:.2f}), mean stderr "
          f"{row['mean_stderr']:.3f}, max |z| {row['max_abs_z']:.2f}")
  print(f"total {seconds:.1f} s; wrote {args.out}evidence.json and evidence.png")


if __name__ == "__main__":
  main()
