"""Claim 5: weight decay is MAP estimation with a Gaussian prior.

Two parts, on a small noisy regression (``sin`` plus Gaussian noise, few points):

* **Same trajectory.** An MLP trained by optax SGD on ``(1/2) SSE`` with explicit
  weight decay ``optax.add_decayed_weights(lambda)`` and one trained by optax SGD
  on the negative log-posterior ``mm.negative_log_posterior`` (Gaussian
  likelihood ``sigma``, Gaussian prior ``sigma_0``) with learning rate scaled by
  ``sigma^2`` follow the same parameters step by step when
  ``lambda = sigma^2 / sigma_0^2`` (``mm.prior_sigma_to_weight_decay``). A third
  run uses optax's mean-loss convention (``mm.prior_sigma_to_optax_weight_decay``).
* **Over-fitting and its cure.** A degree-9 polynomial on 10 points, over many
  independent data sets (medians reported): the MAP fit (exact Newton step on the
  negative log-posterior) at ``lambda = 0`` interpolates the noise; larger
  ``lambda`` smooths, too large under-fits. The lambda picked by the evidence is
  experiment 5b (``claim_evidence.py``).

Run: ``python experiments/claim_weight_decay.py --out results``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mlmap as mm  # noqa: E402

NAME = "weight_decay"
TITLE = "5. Weight decay is MAP estimation with a Gaussian prior"
CLAIM = ("Minimizing (1/2) sum_i (z_i - t_i)^2 + (lambda/2) sum_j w_j^2 is maximizing the "
         "posterior under a Gaussian prior N(0, sigma_0^2) on the weights and Gaussian noise "
         "sigma, with lambda = sigma^2 / sigma_0^2; weight decay keeps the weights small and "
         "curbs over-fitting.")
NOISE = 0.3
TOL = 1e-10


def toy_data(n: int, seed: int = 0):
  """``t = sin(2 pi x) + N(0, NOISE^2)``, ``x`` uniform on [0, 1]; also a dense test set."""
  rng = np.random.default_rng(seed)
  x = np.sort(rng.uniform(0.0, 1.0, n))
  t = np.sin(2 * np.pi * x) + NOISE * rng.standard_normal(n)
  xt = np.linspace(0.0, 1.0, 200)
  tt = np.sin(2 * np.pi * xt) + NOISE * rng.standard_normal(200)
  return x, t, xt, tt


def poly_features(x, degree: int = 9):
  """Legendre features on [-1, 1] (well conditioned; same function space as monomials)."""
  return np.polynomial.legendre.legvander(2.0 * np.asarray(x) - 1.0, degree)


def linear_apply(w, phi):
  return phi @ w


def map_nlp(lam, num_data: int):
  """Negative log-posterior whose minimizer is the weight-decay fit with ``lam``.

  ``lam`` is a number or a traced scalar > 0 (prior ``sigma_0 = sigma / sqrt(lam)``),
  or the Python float ``0.0`` for the flat prior (maximum likelihood).
  """
  prior = None
  if not (isinstance(lam, float) and lam == 0.0):
    prior = functools.partial(mm.gaussian_log_prior, sigma=NOISE / jnp.sqrt(lam))
  return mm.negative_log_posterior(
      linear_apply, functools.partial(mm.gaussian_log_likelihood, sigma=NOISE), prior,
      num_data=num_data)


def map_fit(lam, phi, t):
  """Exact MAP of the linear-Gaussian model: one Newton step from 0 on the nlp (a quadratic)."""
  nlp = map_nlp(lam, phi.shape[0])
  w0 = jnp.zeros(phi.shape[1], phi.dtype)
  h = jax.hessian(nlp)(w0, phi, t)
  g = jax.grad(nlp)(w0, phi, t)
  return w0 - jnp.linalg.lstsq(h, g)[0], nlp


@functools.partial(jax.jit, static_argnums=0)
def _sweep(flat, lam, phi, t, phit, tt):
  def one(phi, t, phit, tt):
    w, _ = map_fit(0.0 if flat else lam, phi, t)
    rmse = lambda a, b: jnp.sqrt(jnp.mean((a @ w - b) ** 2))
    return w, rmse(phi, t), rmse(phit, tt)
  return jax.vmap(one)(phi, t, phit, tt)


def _sweep_fits(lam: float, phi, t, phit, tt):
  """MAP fits of a stack of data sets (one compile for all lam > 0): weights, train and test RMSE."""
  return _sweep(lam == 0.0, jnp.asarray(lam if lam > 0 else 1.0), phi, t, phit, tt)


def _mlp_init(key, width=16):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (1, width)) * 2.0, "b1": jnp.zeros(width),
          "w2": jax.random.normal(k2, (width, 1)) / jnp.sqrt(width), "b2": jnp.zeros(1)}


def _mlp_apply(p, x):
  return (jnp.tanh(x[:, None] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])[:, 0]


def _trajectory(loss, tx, params, x, t, steps):
  grad = jax.grad(loss)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(grad(p, x, t), s, p)
    p = optax.apply_updates(p, u)
    return (p, s), jax.flatten_util.ravel_pytree(p)[0]
  _, traj = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return traj


def same_trajectory(steps: int, lam: float = 0.1, lr: float = 0.01):
  """Max abs difference of the SGD parameter trajectories: explicit decay vs Gaussian prior."""
  x, t, _, _ = toy_data(20, seed=1)
  x, t = jnp.asarray(x), jnp.asarray(t)
  n = x.shape[0]
  params = _mlp_init(jax.random.PRNGKey(5))
  sigma0 = float(NOISE / np.sqrt(lam))
  lam_from_prior = float(mm.prior_sigma_to_weight_decay(sigma0, NOISE))
  half_sse = lambda p, x, t: 0.5 * jnp.sum((_mlp_apply(p, x) - t) ** 2)
  mean_half_sse = lambda p, x, t: half_sse(p, x, t) / x.shape[0]
  nlp = mm.negative_log_posterior(
      _mlp_apply, functools.partial(mm.gaussian_log_likelihood, sigma=NOISE),
      functools.partial(mm.gaussian_log_prior, sigma=sigma0), num_data=n)
  decay = optax.chain(optax.add_decayed_weights(lam_from_prior), optax.sgd(lr))
  # nlp = ((1/2) SSE + (lambda/2)|w|^2) / sigma^2 + const: scale the step by sigma^2.
  posterior = optax.sgd(lr * NOISE ** 2)
  wd_optax = float(mm.prior_sigma_to_optax_weight_decay(sigma0, n, NOISE))
  mean_decay = optax.chain(optax.add_decayed_weights(wd_optax), optax.sgd(lr * n))
  run = jax.jit(_trajectory, static_argnums=(0, 1, 5))
  a = np.asarray(run(half_sse, decay, params, x, t, steps))
  b = np.asarray(run(nlp, posterior, params, x, t, steps))
  c = np.asarray(run(mean_half_sse, mean_decay, params, x, t, steps))
  p0 = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
  return dict(steps=steps, lam=lam, lam_from_prior_sigma=lam_from_prior, sigma=NOISE,
              sigma0=sigma0, optax_weight_decay=wd_optax, learning_rate=lr,
              max_abs_diff_decay_vs_prior=float(np.max(np.abs(a - b))),
              max_abs_diff_optax_mean_vs_prior=float(np.max(np.abs(c - b))),
              total_param_movement=float(np.max(np.abs(a[-1] - p0))),
              final_weight_norm_decay=float(np.linalg.norm(a[-1])))


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  traj = same_trajectory(steps=300 if quick else 3000)

  seeds = 20 if quick else 200
  data = [toy_data(10, seed=k) for k in range(seeds)]
  phi = jnp.asarray(np.stack([poly_features(d[0]) for d in data]))
  phit = jnp.asarray(np.stack([poly_features(d[2]) for d in data]))
  t = jnp.asarray(np.stack([d[1] for d in data]))
  tt = jnp.asarray(np.stack([d[3] for d in data]))
  lams = [0.0, 1e-6, 1e-4, 1e-2, 1.0, 100.0] if quick else [0.0] + [
      float(v) for v in np.geomspace(1e-8, 1e3, 23)]
  rows, fits = [], {}
  for lam in lams:
    w, train, test = (np.asarray(a) for a in _sweep_fits(lam, phi, t, phit, tt))
    fits[lam] = w[0]
    rows.append(dict(lam=lam, train_rmse_median=float(np.median(train)),
                     test_rmse_median=float(np.median(test)),
                     test_rmse_q25=float(np.quantile(test, 0.25)),
                     test_rmse_q75=float(np.quantile(test, 0.75)),
                     weight_norm_median=float(np.median(np.linalg.norm(w, axis=1))),
                     test_rmse=test))
  best = min(rows, key=lambda r: r["test_rmse_median"])
  zero = rows[0]
  zero_worse = float(np.mean(zero["test_rmse"] > best["test_rmse"]))
  overfits = zero["train_rmse_median"] < 1e-6 and zero["test_rmse_median"] > 2 * best["test_rmse_median"]
  same = traj["max_abs_diff_decay_vs_prior"] < TOL and traj["max_abs_diff_optax_mean_vs_prior"] < TOL
  ok = same and overfits and best["lam"] > 0
  x, t0 = data[0][0], data[0][1]

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  xs = np.linspace(0, 1, 300)
  phis = poly_features(xs)
  ax.plot(xs, np.sin(2 * np.pi * xs), color="0.6", lw=3, alpha=0.5, label="sin(2 pi x)")
  ax.scatter(x, t0, color="k", zorder=5, label="10 noisy points (data set 0)")
  shown = [lam for lam in (0.0, 1e-4, 1e-2, 1.0, 100.0) if lam in fits]
  for j, lam in enumerate(shown):
    ax.plot(xs, phis @ fits[lam], f"C{j}", label=f"lambda = {lam:g}")
  ax.set(ylim=(-2, 2), xlabel="x", ylabel="t", title="Degree-9 polynomial, MAP fit per lambda")
  ax.legend(fontsize=7)
  lam_plot = [max(r["lam"], 1e-9) for r in rows]
  ax2.plot(lam_plot, [r["train_rmse_median"] for r in rows], "o-", label="train RMSE (median)")
  ax2.plot(lam_plot, [r["test_rmse_median"] for r in rows], "s-", label="test RMSE (median)")
  ax2.fill_between(lam_plot, [r["test_rmse_q25"] for r in rows], [r["test_rmse_q75"] for r in rows],
                   color="C1", alpha=0.2, label="test RMSE, 25-75%")
  ax2.axhline(NOISE, color="0.5", ls=":", label=f"noise sigma = {NOISE}")
  ax2.set(xscale="log", yscale="log", xlabel="lambda (lambda = 0 drawn at 1e-9)",
          ylabel=f"RMSE over {seeds} data sets", title="Over-fitting at lambda = 0, under-fitting at large lambda")
  ax2.legend(fontsize=8)
  fig_name = _common.save_figure(fig, out_dir, "claim5_weight_decay.png")

  numbers = dict(same_trajectory=traj, data_sets=seeds, sweep=rows,
                 best_test_lambda=best["lam"],
                 lambda0_train_rmse_median=zero["train_rmse_median"],
                 lambda0_test_rmse_median=zero["test_rmse_median"],
                 best_test_rmse_median=best["test_rmse_median"],
                 fraction_lambda0_worse_than_best=zero_worse)
  details = [f"Same trajectory ({traj['steps']} optax SGD steps, 16-unit tanh MLP, 20 points, "
             f"sigma = {NOISE}, sigma_0 = {traj['sigma0']:.4f}, lambda = {traj['lam_from_prior_sigma']:g}):",
             "", *_common.md_table(["run", "max abs param diff to Gaussian-prior run"], [
                 ["add_decayed_weights(lambda) + sgd(lr) on (1/2) SSE",
                  traj["max_abs_diff_decay_vs_prior"]],
                 ["add_decayed_weights(sigma^2/(N sigma_0^2)) + sgd(lr N) on mean (1/2) SSE",
                  traj["max_abs_diff_optax_mean_vs_prior"]],
                 ["(total parameter movement, for scale)", traj["total_param_movement"]]]),
             "", f"Fits of a degree-9 polynomial to 10 points, {seeds} independent data sets "
             "(test: 200 fresh points each); medians over data sets:", "",
             *_common.md_table(["lambda", "train RMSE", "test RMSE", "test RMSE 25-75%", "norm of w"],
                               [[f"{r['lam']:g}", r["train_rmse_median"], r["test_rmse_median"],
                                 f"{r['test_rmse_q25']:.3g}-{r['test_rmse_q75']:.3g}",
                                 r["weight_norm_median"]] for r in rows])]
  summary = (f"Explicit weight decay and the Gaussian log-prior give the same SGD trajectory to "
             f"{_common.fmt(traj['max_abs_diff_decay_vs_prior'])} over {traj['steps']} steps. "
             f"At lambda = 0 the polynomial interpolates the noise (median train RMSE "
             f"{_common.fmt(zero['train_rmse_median'])}, median test RMSE "
             f"{_common.fmt(zero['test_rmse_median'])}); the best median test RMSE "
             f"{_common.fmt(best['test_rmse_median'])} is at lambda = {best['lam']:g}; "
             f"lambda = 0 is worse on {100 * zero_worse:.0f}% of the {seeds} data sets.")
  return _common.section(NAME, TITLE, CLAIM, numbers, "confirmed" if ok else "not confirmed",
                         [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
