"""Claim 2: cross-entropy is Bernoulli maximum likelihood; through a sigmoid its gradient is z - t.

Checks, in float64:

* the lecture's cross-entropy ``-t log z - (1-t) log(1-z)`` equals
  ``-mm.bernoulli_log_likelihood(s, t)`` with ``z = sigmoid(s)``;
* maximizing the Bernoulli likelihood of a constant model gives ``z = mean(t)``,
  and of a logistic regression gives sklearn's unpenalized fit;
* ``d CE / d s = z - t`` (``jax.grad``) while ``d SSE / d s = (z - t) z (1 - z)``,
  which vanishes on confidently wrong outputs.

Run: ``python experiments/claim_cross_entropy.py --out results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mlmap as mm  # noqa: E402

NAME = "cross_entropy"
TITLE = "2. Cross-entropy is Bernoulli maximum likelihood; its gradient through a sigmoid is z - t"
CLAIM = ("With z = sigmoid(s) read as P(t = 1), -log P({t_i} | f) is the cross-entropy, so "
         "minimizing it is maximum likelihood; dE/ds = z - t, whereas SSE through the sigmoid "
         "carries an extra factor z(1 - z) that vanishes when the output is confidently wrong.")
TOL = 1e-10


def _ce(s, t):
  return -mm.bernoulli_log_likelihood(s, t)


def _sse(s, t):
  return 0.5 * (jax.nn.sigmoid(s) - t) ** 2


_grad_ce = jax.jit(jax.vmap(jax.grad(_ce), in_axes=(0, None)))
_grad_sse = jax.jit(jax.vmap(jax.grad(_sse), in_axes=(0, None)))


@jax.jit
def _fit_logistic(x, t):
  """Maximize the Bernoulli likelihood of ``sigmoid(x @ w + b)`` by Newton (25 steps)."""
  xa = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  nll = lambda w: -jnp.sum(mm.bernoulli_log_likelihood(xa @ w, t))
  def step(w, _):
    return w - jnp.linalg.solve(jax.hessian(nll)(w), jax.grad(nll)(w)), None
  w, _ = jax.lax.scan(step, jnp.zeros(xa.shape[1], x.dtype), None, length=25)
  return w, jnp.linalg.norm(jax.grad(nll)(w))


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  from sklearn.linear_model import LogisticRegression

  s = np.linspace(-10.0, 10.0, 401 if quick else 4001)
  sj = jnp.asarray(s)
  z = 1.0 / (1.0 + np.exp(-s))
  # (a) The lecture's cross-entropy formula is the negative Bernoulli log-likelihood.
  lecture_ce = {tt: -tt * np.log(z) - (1 - tt) * np.log(1 - z) for tt in (0.0, 1.0, 0.3)}
  ce_diff = max(float(np.max(np.abs(np.asarray(_ce(sj, tt)) - lecture_ce[tt])))
                for tt in lecture_ce)
  # (b) ML estimates: constant model, and logistic regression against sklearn.
  rng = np.random.default_rng(1)
  n = 200 if quick else 2000
  x = rng.standard_normal((n, 3))
  w_true = np.array([1.5, -2.0, 0.5])
  t = (rng.uniform(size=n) < 1 / (1 + np.exp(-(x @ w_true - 0.3)))).astype(float)
  const_nll = lambda c: jnp.sum(_ce(jnp.full(n, c), jnp.asarray(t)))
  newton = jax.jit(lambda c: c - jax.grad(const_nll)(c) / jax.grad(jax.grad(const_nll))(c))
  s0 = jnp.zeros(())
  for _ in range(30):  # Newton on the constant logit
    s0 = newton(s0)
  const_diff = abs(float(jax.nn.sigmoid(s0)) - float(t.mean()))
  w_ml, ml_grad = _fit_logistic(jnp.asarray(x), jnp.asarray(t))
  sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, t)
  sk_w = np.concatenate([sk.coef_[0], sk.intercept_])
  logreg_diff = float(np.max(np.abs(np.asarray(w_ml) - sk_w)))
  # (c) Gradients through the sigmoid.
  diffs = {}
  for tt in (0.0, 1.0):
    diffs[f"ce_t{int(tt)}"] = float(np.max(np.abs(np.asarray(_grad_ce(sj, tt)) - (z - tt))))
    diffs[f"sse_t{int(tt)}"] = float(np.max(np.abs(np.asarray(_grad_sse(sj, tt))
                                                   - (z - tt) * z * (1 - z))))
  grad_diff = max(diffs.values())
  wrong = -8.0  # target 1, output sigmoid(-8) = 3.4e-4: confidently wrong
  g_ce_wrong = float(jax.grad(_ce)(wrong, 1.0))
  g_sse_wrong = float(jax.grad(_sse)(wrong, 1.0))

  ok = (ce_diff < TOL and const_diff < TOL and grad_diff < TOL and logreg_diff < 1e-5
        and abs(g_ce_wrong) > 1e3 * abs(g_sse_wrong))
  numbers = dict(
      max_abs_diff_lecture_ce_vs_neg_bernoulli_ll=ce_diff,
      constant_model_sigmoid_ml_minus_mean_t=const_diff,
      logistic_regression_ml=np.asarray(w_ml), logistic_regression_sklearn=sk_w,
      max_abs_diff_logreg_vs_sklearn=logreg_diff, logreg_grad_norm_at_ml=float(ml_grad),
      max_abs_diff_gradients=diffs, grad_ce_at_s_minus8_t1=g_ce_wrong,
      grad_sse_at_s_minus8_t1=g_sse_wrong,
      ce_over_sse_gradient_ratio_confidently_wrong=g_ce_wrong / g_sse_wrong)

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, tt in zip(axes, (1.0, 0.0)):
    ax.plot(s, np.asarray(_grad_ce(sj, tt)), "C0", lw=2, label="cross-entropy: z - t")
    ax.plot(s, np.asarray(_grad_sse(sj, tt)), "C3", lw=2, label="SSE: (z - t) z (1 - z)")
    ax.axhline(0, color="0.7", lw=0.8)
    wrong_side = s < 0 if tt == 1.0 else s > 0
    ax.fill_between(s, -1, 1, where=wrong_side, color="0.9", label="output on the wrong side")
    ax.set(xlabel="pre-activation s", title=f"target t = {int(tt)}", ylim=(-1.05, 1.05))
    ax.legend(fontsize=8, loc="lower right" if tt == 1.0 else "upper left")
  axes[0].set_ylabel("dE/ds (jax.grad)")
  fig.suptitle("Gradient through the sigmoid: CE keeps pushing confidently wrong outputs, SSE stalls")
  fig_name = _common.save_figure(fig, out_dir, "claim2_gradients.png")

  details = _common.md_table(["check", "value"], [
      ["max abs diff: lecture CE formula vs -mm.bernoulli_log_likelihood", ce_diff],
      ["constant model: sigmoid(s_ML) - mean(t)", const_diff],
      ["logistic regression: max abs diff ML (Newton) vs sklearn (no penalty)", logreg_diff],
      ["max abs diff jax.grad CE vs z - t, SSE vs (z-t)z(1-z)", grad_diff],
      ["dE/ds at s = -8, t = 1: cross-entropy", f"{g_ce_wrong:.6f}"],
      ["dE/ds at s = -8, t = 1: SSE", g_sse_wrong],
  ])
  summary = (f"The lecture's cross-entropy is -log Bernoulli to {_common.fmt(ce_diff)}, the ML fits "
             f"match mean(t) and sklearn, dE/ds = z - t to {_common.fmt(grad_diff)}; at a "
             f"confidently wrong output (s = -8, t = 1) the CE gradient is {g_ce_wrong:.4f} but "
             f"SSE's is {_common.fmt(g_sse_wrong)} ({abs(g_ce_wrong / g_sse_wrong):.0f}x smaller).")
  return _common.section(NAME, TITLE, CLAIM, numbers,
                         "confirmed" if ok else "not confirmed", [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
