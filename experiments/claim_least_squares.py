"""Claim 1: least squares is Gaussian maximum likelihood.

Fit a line ``f(x) = a x + b`` to noisy data by maximizing
``sum_i mm.gaussian_log_likelihood(f(x_i), t_i, sigma)`` for several fixed noise
scales ``sigma``; the maximizer is the least-squares line (``np.linalg.lstsq``)
for every ``sigma``. Maximizing over ``sigma`` as well gives the RMS residual.

Run: ``python experiments/claim_least_squares.py --out results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (sets Agg backend and float64)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mlmap as mm  # noqa: E402

NAME = "least_squares"
TITLE = "1. Least squares is Gaussian maximum likelihood"
CLAIM = ("If the targets are a function plus Gaussian noise of standard deviation sigma, "
         "maximizing the log-likelihood is minimizing the sum of squared errors, whatever "
         "sigma is (we do not need to know sigma).")
TOL = 1e-8


def _nll(theta, x, t, log_sigma):
  a, b = theta[0], theta[1]
  return -jnp.sum(mm.gaussian_log_likelihood(a * x + b, t, jnp.exp(log_sigma)))


@jax.jit
def _ml_line(x, t, log_sigma):
  """Maximize the likelihood over (a, b) by Newton's method (3 steps, jax.hessian)."""
  def step(theta, _):
    g = jax.grad(_nll)(theta, x, t, log_sigma)
    h = jax.hessian(_nll)(theta, x, t, log_sigma)
    return theta - jnp.linalg.solve(h, g), None
  theta, _ = jax.lax.scan(step, jnp.zeros(2, x.dtype), None, length=3)
  return theta


@jax.jit
def _ml_log_sigma(theta, x, t):
  """Maximize the likelihood over log sigma at fixed (a, b): Newton, 60 steps.

  The gradient ``N - SSE exp(-2s)`` is concave and increasing in ``s``, so Newton
  from any start lands left of the root and then climbs to it monotonically.
  """
  f = lambda s: _nll(theta, x, t, s)
  def step(s, _):
    return s - jax.grad(f)(s) / jax.grad(jax.grad(f))(s), None
  s, _ = jax.lax.scan(step, jnp.zeros((), x.dtype), None, length=60)
  return s


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  rng = np.random.default_rng(0)
  n = 40 if quick else 200
  true_a, true_b, true_sigma = 1.5, -0.7, 0.6
  x = np.sort(rng.uniform(-2.0, 2.0, n))
  t = true_a * x + true_b + true_sigma * rng.standard_normal(n)
  xj, tj = jnp.asarray(x), jnp.asarray(t)

  design = np.stack([x, np.ones_like(x)], axis=1)
  lstsq = np.linalg.lstsq(design, t, rcond=None)[0]
  sigmas = [0.05, 0.3, 1.0, 5.0]
  fits = {s: np.asarray(_ml_line(xj, tj, jnp.log(s))) for s in sigmas}
  diffs = {s: float(np.max(np.abs(fits[s] - lstsq))) for s in sigmas}
  max_diff = max(diffs.values())

  theta_ml = fits[1.0]
  sigma_ml = float(jnp.exp(_ml_log_sigma(jnp.asarray(theta_ml), xj, tj)))
  rms = float(np.sqrt(np.mean((design @ lstsq - t) ** 2)))
  sigma_rel_err = abs(sigma_ml - rms) / rms
  # Joint stationarity: the gradient in (a, b, log sigma) vanishes at the ML point.
  joint = lambda p: _nll(p[:2], xj, tj, p[2])
  grad_norm = float(jnp.linalg.norm(jax.grad(joint)(
      jnp.array([theta_ml[0], theta_ml[1], np.log(sigma_ml)]))))

  ok = max_diff < TOL and sigma_rel_err < TOL
  numbers = dict(
      n=n, true_slope=true_a, true_intercept=true_b, true_sigma=true_sigma,
      lstsq_slope=lstsq[0], lstsq_intercept=lstsq[1],
      ml_fits={str(s): dict(slope=fits[s][0], intercept=fits[s][1],
                            max_abs_diff_to_lstsq=diffs[s]) for s in sigmas},
      max_abs_diff_ml_vs_lstsq=max_diff, sigma_ml=sigma_ml, rms_residual=rms,
      sigma_ml_relative_error=sigma_rel_err, joint_grad_norm_at_ml=grad_norm,
      tolerance=TOL)

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  xs = np.linspace(-2.2, 2.2, 100)
  ax.scatter(x, t, s=14, color="0.4", label="data")
  ax.plot(xs, theta_ml[0] * xs + theta_ml[1], "C0", lw=2, label="Gaussian ML fit")
  ax.plot(xs, lstsq[0] * xs + lstsq[1], "C1--", lw=1.5, label="least squares (lstsq)")
  ax.fill_between(xs, theta_ml[0] * xs + theta_ml[1] - sigma_ml,
                  theta_ml[0] * xs + theta_ml[1] + sigma_ml, color="C0", alpha=0.15,
                  label=r"$\pm\sigma_{ML}$")
  ax.set(xlabel="x", ylabel="t", title="ML line = least-squares line")
  ax.legend(fontsize=8)
  grid = np.geomspace(0.2, 2.0, 200)
  ll = [-float(_nll(jnp.asarray(theta_ml), xj, tj, np.log(s))) for s in grid]
  ax2.plot(grid, ll, "C0")
  ax2.axvline(rms, color="C1", ls="--", label=f"RMS residual = {rms:.4f}")
  ax2.axvline(sigma_ml, color="C0", ls=":", label=f"ML sigma = {sigma_ml:.4f}")
  ax2.set(xscale="log", xlabel="sigma", ylabel="log-likelihood at the ML line",
          title="ML sigma = RMS residual")
  ax2.set_xticks([0.2, 0.5, 1.0, 2.0], labels=["0.2", "0.5", "1", "2"])
  ax2.set_xticks([], minor=True)
  ax2.legend(fontsize=8)
  fig_name = _common.save_figure(fig, out_dir, "claim1_least_squares.png")

  rows = [[f"{s:g}", f"{fits[s][0]:.12f}", f"{fits[s][1]:.12f}", diffs[s]] for s in sigmas]
  rows.append(["lstsq", f"{lstsq[0]:.12f}", f"{lstsq[1]:.12f}", "-"])
  details = _common.md_table(["sigma", "ML slope", "ML intercept", "max abs diff to lstsq"],
                             rows)
  details += ["", f"ML sigma = {sigma_ml:.10f}, RMS residual = {rms:.10f} "
              f"(relative difference {_common.fmt(sigma_rel_err)}); "
              f"joint gradient norm at the ML point {_common.fmt(grad_norm)}."]
  summary = (f"For sigma in {sigmas} the ML slope and intercept equal np.linalg.lstsq to "
             f"{_common.fmt(max_diff)} (tolerance {TOL:g}); the ML sigma equals the RMS "
             f"residual to a relative {_common.fmt(sigma_rel_err)}.")
  return _common.section(NAME, TITLE, CLAIM, numbers,
                         "confirmed" if ok else "not confirmed", [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
