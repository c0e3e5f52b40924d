"""Claim 3: cross-entropy keeps outliers correctly classified more often than SSE (unbalanced task).

An unbalanced binary task in 2-D: many negatives ``N(0, I)``, few positives in a
main cluster, and a handful of *outlier* positives in a small pocket at the edge
of the negatives, far from the main positive cluster. The same tanh MLP, from the
same initialization, full batch, fixed steps, is trained on the sum-squared error
of ``sigmoid(s)`` and on the cross-entropy ``-mm.bernoulli_log_likelihood(s, t)``,
for many seeds (a fresh data set and initialization each), once with plain SGD
(the lecture's backprop; also SSE with a 4x learning rate) and once with Adam.
Reported as mean +- std over seeds, with the paired difference CE - SSE:

* minority recall: fraction of fresh test positives classified positive;
* outlier accuracy: fraction of the training outliers classified correctly
  (the lecture: "Cross Entropy is more likely to keep outliers correctly
  classified");
* test outlier recall (fresh points from the pocket) and balanced test accuracy.

Run: ``python experiments/claim_outliers.py --out results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mlmap as mm  # noqa: E402

NAME = "outliers"
TITLE = "3. Cross-entropy and outliers on an unbalanced task"
CLAIM = ("SSE is more likely to misclassify outliers, because its per-item loss is bounded; "
         "cross-entropy keeps outliers correctly classified more often, because its loss grows "
         "without bound as the output approaches the wrong label; so cross-entropy works well "
         "for unbalanced tasks (negatives vastly outnumber positives).")
N_NEG, N_POS, N_OUT = 400, 20, 4
POS_CENTER = np.array([2.0, 2.0])
OUT_CENTER = np.array([0.0, -2.2])  # at the edge of the negative cloud, far from the positives
WIDTH = 16


def make_data(key, n_neg=N_NEG, n_pos=N_POS, n_out=N_OUT):
  """Inputs ``[n, 2]``, labels ``[n]`` and a mask of the outlier positives."""
  k1, k2, k3 = jax.random.split(key, 3)
  neg = jax.random.normal(k1, (n_neg, 2))
  pos = POS_CENTER + 0.6 * jax.random.normal(k2, (n_pos, 2))
  out = OUT_CENTER + 0.2 * jax.random.normal(k3, (n_out, 2))
  x = jnp.concatenate([neg, pos, out])
  t = jnp.concatenate([jnp.zeros(n_neg), jnp.ones(n_pos + n_out)])
  is_out = jnp.concatenate([jnp.zeros(n_neg + n_pos, bool), jnp.ones(n_out, bool)])
  return x, t, is_out


def init_mlp(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (2, WIDTH)), "b1": jnp.zeros(WIDTH),
          "w2": jax.random.normal(k2, (WIDTH, 1)) / jnp.sqrt(WIDTH), "b2": jnp.zeros(1)}


def logits_fn(p, x):
  return (jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])[:, 0]


def sse_loss(p, x, t):
  return 0.5 * jnp.mean((jax.nn.sigmoid(logits_fn(p, x)) - t) ** 2)


def ce_loss(p, x, t):
  return -jnp.mean(mm.bernoulli_log_likelihood(logits_fn(p, x), t))


def _metrics(p, x, t, is_out, xt, tt, out_t):
  pred_train = logits_fn(p, x) > 0
  pred_test = logits_fn(p, xt) > 0
  pos_t = tt == 1
  recall = jnp.sum(pred_test & pos_t) / jnp.sum(pos_t)
  specificity = jnp.sum(~pred_test & ~pos_t) / jnp.sum(~pos_t)
  return dict(minority_recall=recall,
              outlier_accuracy=jnp.sum(pred_train & is_out) / jnp.sum(is_out),
              test_outlier_recall=jnp.sum(pred_test & out_t) / jnp.sum(out_t),
              balanced_accuracy=0.5 * (recall + specificity),
              train_accuracy=jnp.mean(pred_train == (t == 1)))


# (run name, loss, optimizer, learning rate). The lecture's argument is about the
# size of the backpropagated gradient, which plain SGD passes on and Adam
# normalizes away, so both are run; "SSE, 4x lr" asks whether SSE only needs a
# bigger step (its output gradient is at most 1/4 of cross-entropy's).
RUNS = (("sgd/ce", ce_loss, optax.sgd, 3.0), ("sgd/sse", sse_loss, optax.sgd, 3.0),
        ("sgd/sse_4x_lr", sse_loss, optax.sgd, 12.0),
        ("adam/ce", ce_loss, optax.adam, 0.01), ("adam/sse", sse_loss, optax.adam, 0.01))


def _one_seed(key, checkpoints, every):
  """Train every run of :data:`RUNS` from one init on one data set; metrics every ``every`` steps."""
  kd, ki, kt = jax.random.split(key, 3)
  x, t, is_out = make_data(kd)
  test = make_data(kt, n_neg=4000, n_pos=200, n_out=40)
  p0 = init_mlp(ki)
  res, final = {}, {}
  for name, loss, make_tx, lr in RUNS:
    tx = make_tx(lr)

    def inner(carry, _, loss=loss, tx=tx):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p, x, t), s, p)
      return (optax.apply_updates(p, u), s), None

    def outer(carry, _, inner=inner):
      carry, _ = jax.lax.scan(inner, carry, None, length=every)
      return carry, _metrics(carry[0], x, t, is_out, *test)
    (p, _), curve = jax.lax.scan(outer, (p0, tx.init(p0)), None, length=checkpoints)
    res[name], final[name] = curve, p
  return res, final


def _compare(ce, sse):
  """Paired comparison over seeds: +1 CE significantly higher, -1 lower, 0 neither (2 s.e.)."""
  d = ce - sse
  se = d.std(ddof=1) / np.sqrt(d.size)
  sign = 1 if d.mean() > 2 * se and d.mean() > 0 else (-1 if d.mean() < -2 * se and d.mean() < 0 else 0)
  return dict(diff_mean=d.mean(), diff_se=se, ce_better_seeds=int(np.sum(d > 0)),
              sse_better_seeds=int(np.sum(d < 0)), significant=sign)


def _verdict(outl, rec):
  # Confirmed: CE significantly better on the outliers and not worse on recall;
  # not confirmed: CE significantly better on neither; mixed: anything between.
  if outl == 1 and rec >= 0:
    return "confirmed"
  if outl <= 0 and rec <= 0:
    return "not confirmed"
  return "mixed"


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  seeds = 12 if quick else 50
  checkpoints, every = (10, 100) if quick else (30, 100)
  steps = checkpoints * every
  keys = jax.random.split(jax.random.PRNGKey(3), seeds)
  curves, final = jax.jit(jax.vmap(lambda k: _one_seed(k, checkpoints, every)))(keys)
  curves = jax.tree_util.tree_map(np.asarray, curves)
  res = jax.tree_util.tree_map(lambda a: a[:, -1], curves)
  metrics = ["minority_recall", "outlier_accuracy", "test_outlier_recall",
             "balanced_accuracy", "train_accuracy"]
  stats = {name: {m: dict(mean=res[name][m].mean(), std=res[name][m].std(ddof=1),
                          per_seed=res[name][m]) for m in metrics} for name, *_ in RUNS}
  comparisons, verdicts = {}, {}
  for opt in ("sgd", "adam"):
    comparisons[opt] = {m: _compare(res[f"{opt}/ce"][m], res[f"{opt}/sse"][m]) for m in metrics}
    verdicts[opt] = _verdict(comparisons[opt]["outlier_accuracy"]["significant"],
                             comparisons[opt]["minority_recall"]["significant"])
  comparisons["sgd_4x"] = {m: _compare(res["sgd/ce"][m], res["sgd/sse_4x_lr"][m]) for m in metrics}
  v = set(verdicts.values())
  verdict = v.pop() if len(v) == 1 else "mixed"

  # Figure: SGD decision boundaries of seed 0; metric curves for SGD and for Adam.
  kd, _, _ = jax.random.split(keys[0], 3)
  x, t, is_out = (np.asarray(a) for a in make_data(kd))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.6), layout="constrained")
  g = np.linspace(-4.5, 4.5, 181)
  gx, gy = np.meshgrid(g, g)
  grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1))
  for ax, (name, key) in zip(axes[:2], (("SSE", "sgd/sse"), ("cross-entropy", "sgd/ce"))):
    p = jax.tree_util.tree_map(lambda a: a[0], final[key])
    z = np.asarray(jax.nn.sigmoid(logits_fn(p, grid))).reshape(gx.shape)
    ax.contourf(gx, gy, z, levels=[0, 0.5, 1], colors=["#dde8f5", "#f8dccf"])
    ax.contour(gx, gy, z, levels=[0.5], colors="k", linewidths=1)
    ax.scatter(*x[t == 0].T, s=5, c="C0", label="negatives")
    ax.scatter(*x[(t == 1) & ~is_out].T, s=14, c="C3", label="positives")
    ax.scatter(*x[is_out].T, s=40, c="C3", marker="*", edgecolors="k", label="outlier positives")
    ax.set(title=f"{name}, SGD (seed 0, {steps} steps)", xlim=(-4.5, 4.5), ylim=(-4.5, 4.5))
    ax.legend(fontsize=7, loc="lower right")
  xs = every * np.arange(1, checkpoints + 1)
  for ax, opt in zip(axes[2:], ("sgd", "adam")):
    for m, ls in (("outlier_accuracy", "-"), ("minority_recall", "--")):
      for name, col, label in (("sse", "C0", "SSE"), ("ce", "C3", "cross-entropy")):
        vals = curves[f"{opt}/{name}"][m]
        ax.plot(xs, vals.mean(0), ls, color=col, label=f"{label}: {m.replace('_', ' ')}")
        ax.fill_between(xs, vals.mean(0) - vals.std(0, ddof=1), vals.mean(0) + vals.std(0, ddof=1),
                        color=col, alpha=0.12)
    ax.set(xlabel=f"{'SGD' if opt == 'sgd' else 'Adam'} steps", ylim=(-0.05, 1.05),
           ylabel=f"mean +- std over {seeds} seeds",
           title=f"{'SGD (lr 3)' if opt == 'sgd' else 'Adam (lr 0.01)'}: outliers and recall")
    ax.legend(fontsize=7, loc="upper left")
  fig_name = _common.save_figure(fig, out_dir, "claim3_outliers.png")

  labels = {"sgd/ce": "SGD lr 3, cross-entropy", "sgd/sse": "SGD lr 3, SSE",
            "sgd/sse_4x_lr": "SGD lr 12, SSE", "adam/ce": "Adam lr 0.01, cross-entropy",
            "adam/sse": "Adam lr 0.01, SSE"}
  shown = ["minority_recall", "outlier_accuracy", "test_outlier_recall", "balanced_accuracy"]
  rows = [[labels[name]] + [_common.mean_std(res[name][m]) for m in shown] for name, *_ in RUNS]
  crow = lambda key, title: [title] + [
      f"{comparisons[key][m]['diff_mean']:+.3f} +- {comparisons[key][m]['diff_se']:.3f} "
      f"({comparisons[key][m]['ce_better_seeds']}/{comparisons[key][m]['sse_better_seeds']})"
      for m in shown]
  details = [f"{seeds} seeds (fresh data and init each); {N_NEG} negatives, {N_POS} positives, "
             f"{N_OUT} outlier positives in a pocket at the edge of the negatives "
             f"({OUT_CENTER.tolist()}); tanh MLP 2-{WIDTH}-1 from the same init for every run, "
             f"{steps} full-batch steps on the mean loss. Test set: 4000 / 200 / 40 fresh points. "
             "Values: mean +- std over seeds.", "",
             *_common.md_table(["run"] + [m.replace("_", " ") for m in shown], rows), "",
             "Paired difference cross-entropy - SSE: mean +- standard error (seeds CE better / "
             "SSE better):", "",
             *_common.md_table(["comparison"] + [m.replace("_", " ") for m in shown], [
                 crow("sgd", "SGD, same lr"), crow("sgd_4x", "SGD, SSE with 4x lr"),
                 crow("adam", "Adam, same lr")])]
  word = {1: "higher for cross-entropy", -1: "higher for SSE", 0: "no significant difference"}
  say = lambda opt, m: word[comparisons[opt][m]["significant"]]
  summary = (f"With SGD ({verdicts['sgd']}): outlier accuracy {say('sgd', 'outlier_accuracy')} "
             f"(CE {stats['sgd/ce']['outlier_accuracy']['mean']:.3f} vs SSE "
             f"{stats['sgd/sse']['outlier_accuracy']['mean']:.3f}; SSE with 4x lr "
             f"{stats['sgd/sse_4x_lr']['outlier_accuracy']['mean']:.3f}), minority recall "
             f"{say('sgd', 'minority_recall')}. With Adam ({verdicts['adam']}): outlier accuracy "
             f"{say('adam', 'outlier_accuracy')} (CE {stats['adam/ce']['outlier_accuracy']['mean']:.3f}"
             f" vs SSE {stats['adam/sse']['outlier_accuracy']['mean']:.3f}), minority recall "
             f"{say('adam', 'minority_recall')}: Adam's per-parameter normalization removes most "
             f"of the gradient-size difference the lecture's argument rests on. Significance: paired "
             f"mean difference beyond 2 standard errors over {seeds} seeds.")
  numbers = dict(seeds=seeds, steps=steps, n_neg=N_NEG, n_pos=N_POS, n_outliers=N_OUT,
                 runs={name: dict(optimizer=mk.__name__, learning_rate=lr) for name, _, mk, lr in RUNS},
                 metrics=stats, comparisons=comparisons, verdict_by_optimizer=verdicts,
                 checkpoint_steps=xs,
                 curves_mean={n: {m: curves[n][m].mean(0) for m in metrics} for n, *_ in RUNS})
  return _common.section(NAME, TITLE, CLAIM, numbers, verdict, [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
