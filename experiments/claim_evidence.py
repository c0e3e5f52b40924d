"""Claim 5b: the weight-decay lambda picked by the evidence (beyond the lecture).

The lecture: "the scaling factor lambda needs to be determined from experience,
or empirically". MacKay's evidence framework picks it from the training data
alone: maximize the marginal likelihood ``log p(t | lambda)`` (Laplace
approximation, ``mm.log_evidence``; exact for this linear-Gaussian model). On
the degree-9 polynomial regression of claim 5, over many data sets:

* ``mm.log_evidence`` at the MAP equals the closed-form evidence of Bayesian
  linear regression (Bishop 2006, eq. 3.86);
* the test RMSE at the evidence-chosen lambda is compared with the best lambda
  in hindsight (chosen on the test set) and with lambda = 0;
* ``mm.maximize_evidence`` (MacKay's fixed-point updates) lands on the grid's
  argmax.

Run: ``python experiments/claim_evidence.py --out results``.
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
from claim_weight_decay import NOISE, linear_apply, poly_features, toy_data  # noqa: E402

NAME = "evidence"
TITLE = "5b. The evidence picks the weight decay (beyond the lecture)"
CLAIM = ("lambda need not be set 'from experience': maximizing the evidence p(t | lambda) "
         "(MacKay 1992; Laplace approximation, exact here) on the training data alone picks a "
         "lambda = sigma^2 / sigma_0^2 that generalizes about as well as the best lambda "
         "chosen on test data.")


def _nlp(sigma0):
  return mm.negative_log_posterior(
      linear_apply, functools.partial(mm.gaussian_log_likelihood, sigma=NOISE),
      functools.partial(mm.gaussian_log_prior, sigma=sigma0))


def _closed_form(phi, t, lam):
  """Bishop (2006) eq. 3.86: log p(t | alpha, beta) with alpha = 1/sigma_0^2, beta = 1/sigma^2."""
  n, m = phi.shape
  beta = 1.0 / NOISE ** 2
  alpha = lam * beta
  a = alpha * jnp.eye(m) + beta * phi.T @ phi
  mean = beta * jnp.linalg.solve(a, phi.T @ t)
  e = 0.5 * beta * jnp.sum((t - phi @ mean) ** 2) + 0.5 * alpha * mean @ mean
  return (0.5 * m * jnp.log(alpha) + 0.5 * n * jnp.log(beta) - e
          - 0.5 * jnp.linalg.slogdet(a)[1] - 0.5 * n * jnp.log(2 * jnp.pi))


@jax.jit
def _evidence_grid(phi, t, phit, tt, lams):
  """For each data set and lambda: log evidence (mlmap and closed form), test RMSE."""
  def one(phi, t, phit, tt, lam):
    sigma0 = NOISE / jnp.sqrt(lam)
    nlp = _nlp(sigma0)
    w0 = jnp.zeros(phi.shape[1], phi.dtype)
    w = w0 - jnp.linalg.solve(jax.hessian(nlp)(w0, phi, t), jax.grad(nlp)(w0, phi, t))
    ev = mm.log_evidence(nlp, w, phi, t, curvature="ggn")
    test = jnp.sqrt(jnp.mean((phit @ w - tt) ** 2))
    return ev, _closed_form(phi, t, lam), test
  over_lam = jax.vmap(one, in_axes=(None, None, None, None, 0))
  return jax.vmap(over_lam, in_axes=(0, 0, 0, 0, None))(phi, t, phit, tt, lams)


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  _common.require("log_evidence", "maximize_evidence")
  seeds = 20 if quick else 200
  lams = np.geomspace(1e-8, 1e3, 23 if quick else 67)
  data = [toy_data(10, seed=k) for k in range(seeds)]
  phi = jnp.asarray(np.stack([poly_features(d[0]) for d in data]))
  phit = jnp.asarray(np.stack([poly_features(d[2]) for d in data]))
  t = jnp.asarray(np.stack([d[1] for d in data]))
  tt = jnp.asarray(np.stack([d[3] for d in data]))
  ev, ev_ref, test = (np.asarray(a) for a in _evidence_grid(phi, t, phit, tt, jnp.asarray(lams)))
  ev_err = float(np.max(np.abs(ev - ev_ref) / np.maximum(1.0, np.abs(ev_ref))))
  pick = np.argmax(ev, axis=1)
  oracle = np.argmin(test, axis=1)
  rows = np.arange(seeds)
  test_ev, test_oracle = test[rows, pick], test[rows, oracle]
  # lambda = 0 (ML): least-squares interpolation of the 10 points.
  from claim_weight_decay import _sweep_fits
  test_zero = np.asarray(_sweep_fits(0.0, phi, t, phit, tt)[2])
  ratio = test_ev / test_oracle

  # MacKay's fixed-point iteration on data set 0, noise fixed at its true value.
  make_nlp = lambda h: _nlp(h["prior_sigma"])
  hyper, _, _ = mm.maximize_evidence(make_nlp, {"prior_sigma": jnp.asarray(1.0)},
                                     jnp.zeros(phi.shape[2]), phi[0], t[0],
                                     noise_key=None, num_iterations=200)
  lam_me = float(NOISE ** 2 / hyper["prior_sigma"] ** 2)
  fine = np.geomspace(lams[0], lams[-1], 2001)
  ev_fine = np.asarray(jax.jit(jax.vmap(_closed_form, in_axes=(None, None, 0)))(
      phi[0], t[0], jnp.asarray(fine)))
  lam_fine = float(fine[np.argmax(ev_fine)])
  me_rel = abs(np.log(lam_me) - np.log(lam_fine))

  med_ratio = float(np.median(ratio))
  ok = (ev_err < 1e-8 and med_ratio < 1.25 and np.median(test_ev) < 0.5 * np.median(test_zero)
        and me_rel < 0.05)
  numbers = dict(
      data_sets=seeds, lambda_grid=lams, max_rel_err_log_evidence_vs_closed_form=ev_err,
      evidence_lambda_median=float(np.median(lams[pick])),
      oracle_lambda_median=float(np.median(lams[oracle])),
      test_rmse_evidence_median=float(np.median(test_ev)),
      test_rmse_oracle_median=float(np.median(test_oracle)),
      test_rmse_lambda0_median=float(np.median(test_zero)),
      test_rmse_ratio_evidence_over_oracle_median=med_ratio,
      test_rmse_ratio_evidence_over_oracle_q90=float(np.quantile(ratio, 0.9)),
      maximize_evidence_lambda_data_set0=lam_me, fine_grid_argmax_lambda_data_set0=lam_fine,
      abs_log_diff_maximize_vs_grid=me_rel,
      log_evidence_data_set0=ev[0], test_rmse_data_set0=test[0])

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained",
                                gridspec_kw=dict(wspace=0.12))
  ax.plot(lams, ev[0], "C0o-", ms=3, label="mm.log_evidence (data set 0)")
  ax.plot(fine, ev_fine, "k:", lw=1, label="closed form (Bishop 3.86)")
  ax.axvline(lam_me, color="C2", ls="--", label=f"mm.maximize_evidence: {lam_me:.3g}")
  ax.set(xscale="log", xlabel="lambda = sigma^2 / sigma_0^2", ylabel="log evidence",
         ylim=(np.max(ev[0]) - 40, np.max(ev[0]) + 5), title="Evidence of lambda (data set 0)")
  axr = ax.twinx()
  axr.plot(lams, test[0], "C1s-", ms=3, label="test RMSE")
  axr.set(yscale="log", ylim=(0.2, 20))
  axr.set_ylabel("test RMSE (orange)", color="C1")
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = axr.get_legend_handles_labels()
  # Below the axes: inside, every corner is crossed by one of the two curves.
  ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", ncol=2,
            bbox_to_anchor=(0.5, -0.14))
  parts = [test_zero, test_ev, test_oracle]
  ax2.boxplot(parts, showfliers=False)
  ax2.set_xticks([1, 2, 3], ["lambda = 0 (ML)", "evidence lambda", "best lambda\n(on test set)"])
  ax2.axhline(NOISE, color="0.5", ls=":", label=f"noise sigma = {NOISE}")
  ax2.set(yscale="log", ylabel="test RMSE", title=f"{seeds} data sets of 10 points")
  ax2.legend(fontsize=8)
  fig_name = _common.save_figure(fig, out_dir, "claim5b_evidence.png")

  details = _common.md_table(["lambda chosen by", "median lambda", "median test RMSE"], [
      ["none (lambda = 0, ML)", "0", float(np.median(test_zero))],
      ["evidence (training data only)", float(np.median(lams[pick])), float(np.median(test_ev))],
      ["test error (oracle)", float(np.median(lams[oracle])), float(np.median(test_oracle))]])
  details += ["", f"mm.log_evidence vs closed form: max relative error {_common.fmt(ev_err)}. "
              f"Data set 0: mm.maximize_evidence lambda = {lam_me:.5g}, fine-grid argmax "
              f"{lam_fine:.5g}. Evidence/oracle test-RMSE ratio: median {med_ratio:.3f}, "
              f"90th percentile {np.quantile(ratio, 0.9):.3f}."]
  summary = (f"Over {seeds} data sets the evidence-chosen lambda gives median test RMSE "
             f"{np.median(test_ev):.3f}, vs {np.median(test_oracle):.3f} for the best lambda in "
             f"hindsight and {np.median(test_zero):.3g} at lambda = 0; mm.log_evidence matches "
             f"the closed form to {_common.fmt(ev_err)}.")
  return _common.section(NAME, TITLE, CLAIM, numbers, "confirmed" if ok else "not confirmed",
                         [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
