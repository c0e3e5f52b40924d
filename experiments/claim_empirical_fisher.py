"""Claim 7: the empirical Fisher is not the Fisher (Kunstner et al. 2019, Fig. 1).

Linear regression ``t = a x + b + noise`` with the Gaussian likelihood, as in
Kunstner, Balles & Hennig, "Limitations of the empirical Fisher approximation
for natural gradient descent", NeurIPS 2019, https://arxiv.org/abs/1905.12558.
From several starting points, run for the same number of steps

* gradient descent (step ``1 / L``),
* natural gradient with the Fisher ``mm.fisher_matrix``
  (``F = sum_i x_i x_i^T / sigma^2``: constant, equal to the Hessian here),
* the same update preconditioned by the empirical Fisher
  ``mm.empirical_fisher_matrix`` (``sum_i g_i g_i^T = sum_i r_i^2 x_i x_i^T / sigma^4``),

``w <- w - eta (M + delta I)^{-1} grad`` with the same ``eta`` and ``delta``; and
compare the trajectories. Both matrices are checked against their closed forms.

Run: ``python experiments/claim_empirical_fisher.py --out results``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mlmap as mm  # noqa: E402

NAME = "empirical_fisher"
TITLE = "7. The empirical Fisher is not the Fisher"
CLAIM = ("Natural gradients (Amari) rescale the gradient by the inverse Fisher. The empirical "
         "Fisher (sum of squared per-example gradients), often used in its place, is a "
         "different matrix: preconditioning with it distorts the steps (Kunstner et al. 2019; "
         "beyond the lecture, which names natural gradients only).")
SIGMA = 1.0
ETA = 0.5
DAMPING = 1e-8


def _problem(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(1.0, 1.0, n)  # non-centred inputs: slope and intercept are correlated
  t = 2.0 * x - 1.0 + SIGMA * rng.standard_normal(n)
  inputs = jnp.asarray(np.stack([x, np.ones(n)], 1))
  nlp = mm.negative_log_posterior(lambda w, z: z @ w,
                                  functools.partial(mm.gaussian_log_likelihood, sigma=SIGMA))
  return nlp, inputs, jnp.asarray(t)


def _trajectories(nlp, inputs, targets, starts, steps, lr_gd):
  """``[starts, steps + 1, 2]`` trajectories for GD, Fisher NGD and empirical-Fisher NGD."""
  eye = jnp.eye(2)

  def precond(kind):
    def step(w, _):
      g = jax.grad(nlp)(w, inputs, targets)
      if kind == "gd":
        d = lr_gd * g
      else:
        m = (mm.fisher_matrix if kind == "fisher" else mm.empirical_fisher_matrix)(
            nlp, w, inputs, targets)
        d = ETA * jnp.linalg.solve(m + DAMPING * eye, g)
      return w - d, w
    return step

  def run_one(kind, w0):
    last, traj = jax.lax.scan(precond(kind), w0, None, length=steps)
    return jnp.concatenate([traj, last[None]], 0)
  return {k: jax.vmap(functools.partial(run_one, k))(starts) for k in ("gd", "fisher", "empirical")}


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  _common.require("fisher_matrix", "empirical_fisher_matrix")
  n = 100 if quick else 1000
  steps = 30 if quick else 100
  nlp, inputs, targets = _problem(n)
  xn, tn = np.asarray(inputs), np.asarray(targets)
  w_star = np.linalg.lstsq(xn, tn, rcond=None)[0]

  # Closed forms of both matrices at a point away from the optimum.
  w_test = jnp.asarray(w_star + np.array([1.5, -2.0]))
  f = np.asarray(jax.jit(mm.fisher_matrix, static_argnums=0)(nlp, w_test, inputs, targets))
  ef = np.asarray(jax.jit(mm.empirical_fisher_matrix, static_argnums=0)(nlp, w_test, inputs, targets))
  r = xn @ np.asarray(w_test) - tn
  f_ref = xn.T @ xn / SIGMA ** 2
  ef_ref = (xn * (r ** 2)[:, None]).T @ xn / SIGMA ** 4
  f_err = float(np.max(np.abs(f - f_ref)) / np.max(np.abs(f_ref)))
  ef_err = float(np.max(np.abs(ef - ef_ref)) / np.max(np.abs(ef_ref)))

  angles = np.linspace(0, 2 * np.pi, 8, endpoint=False) + 0.3
  starts = w_star + 3.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
  lr_gd = 1.0 / float(np.linalg.eigvalsh(f_ref)[-1])
  traj = jax.jit(_trajectories, static_argnums=(0, 4))(
      nlp, inputs, targets, jnp.asarray(starts), steps, lr_gd)
  traj = {k: np.asarray(v) for k, v in traj.items()}

  loss = lambda w: 0.5 * np.sum((w @ xn.T - tn) ** 2, axis=-1) / SIGMA ** 2
  f_star = float(loss(w_star))
  res = {}
  for k, tr in traj.items():
    gap = loss(tr) - f_star
    dist = np.linalg.norm(tr - w_star, axis=-1)
    hit = [int(np.argmax(gi <= 1e-6 * gi[0])) if np.any(gi <= 1e-6 * gi[0]) else None for gi in gap]
    res[k] = dict(final_distance_median=float(np.median(dist[:, -1])),
                  final_distance_max=float(np.max(dist[:, -1])),
                  final_gap_median=float(np.median(gap[:, -1])), steps_to_1e6=hit,
                  path_length_over_distance=float(np.median(
                      np.sum(np.linalg.norm(np.diff(tr, axis=1), axis=-1), 1) / dist[:, 0])))
  # Direction distortion at the starting points: angle between Fisher and EF steps.
  step_dir = lambda k: traj[k][:, 0] - traj[k][:, 1]
  cos = np.sum(step_dir("fisher") * step_dir("empirical"), 1) / (
      np.linalg.norm(step_dir("fisher"), axis=1) * np.linalg.norm(step_dir("empirical"), axis=1))
  angle_deg = np.degrees(np.arccos(np.clip(cos, -1, 1)))
  ef_at_star = np.asarray(mm.empirical_fisher_matrix(nlp, jnp.asarray(w_star), inputs, targets))
  rel_diff_at_star = float(np.linalg.norm(ef_at_star - f_ref) / np.linalg.norm(f_ref))
  rel_diff_away = float(np.linalg.norm(ef - f_ref) / np.linalg.norm(f_ref))

  fisher_hits = res["fisher"]["steps_to_1e6"]
  ef_hits = res["empirical"]["steps_to_1e6"]
  fisher_faster = all(fh is not None and (eh is None or fh < eh)
                      for fh, eh in zip(fisher_hits, ef_hits))
  ok = f_err < 1e-10 and ef_err < 1e-10 and fisher_faster and float(np.mean(angle_deg)) > 10
  numbers = dict(n=n, steps=steps, eta=ETA, damping=DAMPING, w_star=w_star,
                 fisher_rel_err_closed_form=f_err, empirical_fisher_rel_err_closed_form=ef_err,
                 ef_vs_fisher_rel_frobenius_at_start_like_point=rel_diff_away,
                 ef_vs_fisher_rel_frobenius_at_optimum=rel_diff_at_star,
                 angle_fisher_vs_ef_first_step_deg=angle_deg, methods=res)

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
  ga = np.linspace(w_star[0] - 4, w_star[0] + 4, 120)
  gb = np.linspace(w_star[1] - 4, w_star[1] + 4, 120)
  A, B = np.meshgrid(ga, gb)
  Z = loss(np.stack([A, B], -1)) - f_star
  names = {"gd": f"gradient descent (step 1/L)",
           "fisher": f"natural gradient, Fisher (eta={ETA})",
           "empirical": f"empirical Fisher (eta={ETA})"}
  for ax, k in zip(axes, ("gd", "fisher", "empirical")):
    ax.contour(A, B, Z, levels=np.geomspace(0.5, Z.max(), 12), colors="0.75", linewidths=0.7)
    for i, tr in enumerate(traj[k]):
      ax.plot(tr[:, 0], tr[:, 1], ".-", color=f"C{i}", ms=3, lw=1)
      ax.plot(*tr[0], "o", color=f"C{i}", ms=5)
    ax.plot(*w_star, "k*", ms=12)
    ax.set(xlabel="slope a", ylabel="intercept b", title=f"{names[k]}, {steps} steps",
           xlim=(ga[0], ga[-1]), ylim=(gb[0], gb[-1]))
  fig_name = _common.save_figure(fig, out_dir, "claim7_empirical_fisher.png")

  fmt_hits = lambda h: f"{sum(v is not None for v in h)}/{len(h)} starts; median " + (
      f"{int(np.median([v for v in h if v is not None]))} steps" if any(v is not None for v in h) else "-")
  details = _common.md_table(
      ["method", "reached gap <= 1e-6 x initial", "median final distance to w*",
       "median path length / initial distance"],
      [[names[k], fmt_hits(res[k]["steps_to_1e6"]), res[k]["final_distance_median"],
        res[k]["path_length_over_distance"]] for k in ("gd", "fisher", "empirical")])
  details += ["", f"mm.fisher_matrix vs sum x x^T / sigma^2: relative error {_common.fmt(f_err)}; "
              f"mm.empirical_fisher_matrix vs sum r^2 x x^T / sigma^4: {_common.fmt(ef_err)}. "
              f"Relative Frobenius difference EF vs F: {rel_diff_away:.3g} at a point 2.5 away "
              f"from w*, {rel_diff_at_star:.3g} at w*. Angle between the Fisher and EF steps at "
              f"the 8 starts: median {np.median(angle_deg):.1f} deg, max {np.max(angle_deg):.1f} deg."]
  summary = (f"From 8 starts at distance 3 the Fisher natural gradient goes straight to w*: "
             f"loss gap <= 1e-6 x initial from {fmt_hits(fisher_hits)}; the empirical-Fisher "
             f"steps turn away by up to {np.max(angle_deg):.0f} deg (median "
             f"{np.median(angle_deg):.0f} deg) and reach it from {fmt_hits(ef_hits)} "
             f"(budget {steps} steps; median final distance to w* "
             f"{_common.fmt(res['empirical']['final_distance_median'])} vs "
             f"{_common.fmt(res['fisher']['final_distance_median'])}).")
  return _common.section(NAME, TITLE, CLAIM, numbers, "confirmed" if ok else "not confirmed",
                         [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
