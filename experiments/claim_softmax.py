"""Claim 4: cross-entropy = KL + entropy; softmax gradient = delta - P; sigmoid is a two-class softmax; softmax is a Boltzmann distribution.

Numerical checks in float64 against explicit formulas, and one plot of the
softmax of fixed outputs at several temperatures.

Run: ``python experiments/claim_softmax.py --out results``.
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

NAME = "softmax"
TITLE = "4. Cross-entropy = KL + entropy; softmax gradient = delta - P; sigmoid = two-class softmax"
CLAIM = ("Cross-entropy = sum_i KL(p_i || q_i) + H(p_i), so minimizing it minimizes the KL "
         "divergence; d log Prob(k) / dz_i = delta_ik - Prob(i); the sigmoid is a softmax over "
         "two classes with the class-0 output fixed at 0; softmax is the Boltzmann "
         "distribution with energy -z_i (temperature T: softmax(z / T)).")
TOL = 1e-12


@jax.jit
def _library_values(logits, p, labels, z):
  """Everything computed by mlmap / jax, in one compiled call (references are numpy)."""
  two = jnp.stack([jnp.zeros_like(z), z], axis=-1)
  soft_ce = lambda zz, pp: -mm.soft_categorical_log_likelihood(zz, pp)
  return dict(
      ce=soft_ce(logits, p),
      bern=-mm.bernoulli_log_likelihood(logits[:, 0], p[:, 0]),
      # Minimizing CE over q with p fixed gives q = p (KL = 0): gradient at z = log p.
      grad_at_p=jax.vmap(jax.grad(soft_ce))(jnp.log(p), p),
      grad_log_p=jax.vmap(jax.grad(mm.categorical_log_likelihood))(logits, labels),
      softmax_two=jax.nn.softmax(two)[:, 1], sigmoid=jax.nn.sigmoid(z),
      cat_ll_two=mm.categorical_log_likelihood(two, jnp.ones(z.shape, int)),
      bern_ll=mm.bernoulli_log_likelihood(z, jnp.ones_like(z)))


def run(quick: bool, out_dir: Path) -> dict:
  import matplotlib.pyplot as plt
  rng = np.random.default_rng(4)
  b, k = (64, 5) if quick else (4096, 10)
  logits = 3.0 * rng.standard_normal((b, k))
  p = rng.dirichlet(np.ones(k), b)
  labels = rng.integers(0, k, b)
  z = np.linspace(-30.0, 30.0, 1201)
  lib = {n: np.asarray(v) for n, v in _library_values(logits, p, labels, z).items()}

  # CE = KL + H, multi-class (soft targets) and binary (lecture's p_i = <1 - t, t>).
  q = np.exp(logits - logits.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
  ent = -np.sum(p * np.log(p), axis=-1)
  kl_diff = float(np.max(np.abs(lib["ce"] - (kl + ent))))
  s, t = logits[:, 0], p[:, 0]
  log_z, log_1mz = -np.logaddexp(0.0, -s), -np.logaddexp(0.0, s)  # log z, log(1 - z), stably
  kl_b = t * (np.log(t) - log_z) + (1 - t) * (np.log(1 - t) - log_1mz)
  h_b = -t * np.log(t) - (1 - t) * np.log(1 - t)
  kl_b_diff = float(np.max(np.abs(lib["bern"] - (kl_b + h_b))))
  grad_at_min = float(np.max(np.abs(lib["grad_at_p"])))

  # Softmax gradient: d log P(k) / dz = onehot(k) - softmax(z).
  delta_minus_p = np.eye(k)[labels] - q
  grad_diff = float(np.max(np.abs(lib["grad_log_p"] - delta_minus_p)))
  grad_rowsum = float(np.max(np.abs(lib["grad_log_p"].sum(-1))))

  # Sigmoid is the two-class softmax with the class-0 output fixed at 0.
  sig_diff = float(np.max(np.abs(lib["softmax_two"] - lib["sigmoid"])))
  ll_diff = float(np.max(np.abs(lib["cat_ll_two"] - lib["bern_ll"])))

  # Boltzmann: P(i) = exp(-E_i / T) / Z with E_i = -z_i; limits T -> 0 and T -> inf.
  zb5 = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
  temps = [0.1, 0.5, 1.0, 2.0, 10.0]
  probs = {tt: np.asarray(jax.nn.softmax(jnp.asarray(zb5) / tt)) for tt in temps}
  energy = -zb5
  boltz_diff = max(float(np.max(np.abs(probs[tt] - np.exp(-energy / tt) / np.exp(-energy / tt).sum())))
                   for tt in temps)
  p_cold = float(jax.nn.softmax(jnp.asarray(zb5) / 0.01)[0])
  ent_hot = float(-np.sum((pp := np.asarray(jax.nn.softmax(jnp.asarray(zb5) / 1e4)))
                          * np.log(pp)))

  checks = {
      "CE = KL + H (softmax, soft targets)": kl_diff,
      "CE = KL + H (binary, soft targets)": kl_b_diff,
      "grad of soft CE at q = p (KL minimum)": grad_at_min,
      "d log P(k)/dz - (delta - P)": grad_diff,
      "sum_i d log P(k)/dz_i (should be 0)": grad_rowsum,
      "softmax([0, z])[1] - sigmoid(z)": sig_diff,
      "categorical LL of [0, z] - Bernoulli LL of z": ll_diff,
      "softmax(z / T) - Boltzmann exp(-E/T)/Z": boltz_diff,
  }
  worst = max(checks.values())
  ok = worst < TOL and p_cold > 1 - 1e-12 and abs(ent_hot - np.log(5)) < 1e-6
  numbers = dict(max_abs_errors=checks, worst=worst, tolerance=TOL,
                 softmax_top_prob_at_T_0_01=p_cold, entropy_at_T_1e4=ent_hot,
                 log_num_classes=float(np.log(5)),
                 softmax_by_temperature={str(tt): probs[tt] for tt in temps})

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(temps)
  for j, tt in enumerate(temps):
    ax.bar(np.arange(5) + (j - len(temps) / 2 + 0.5) * width, probs[tt], width, label=f"T = {tt:g}")
  ax.set_xticks(np.arange(5), [f"z={v:g}" for v in zb5])
  ax.set(ylabel="softmax(z / T)", title="Softmax at several temperatures (Boltzmann, E = -z)")
  ax.legend(fontsize=8)
  tgrid = np.geomspace(0.02, 100, 200)
  pt = np.asarray(jax.nn.softmax(jnp.asarray(zb5)[None, :] / tgrid[:, None], axis=-1))
  ents = -np.sum(pt * np.log(pt + 1e-300), axis=-1)
  ax2.plot(tgrid, ents, "C0")
  ax2.axhline(np.log(5), color="0.5", ls="--", label="log K (uniform)")
  ax2.set(xscale="log", xlabel="temperature T", ylabel="entropy of softmax(z / T)",
          title="T -> 0: argmax (one-hot); T -> inf: uniform")
  ax2.legend(fontsize=8)
  fig_name = _common.save_figure(fig, out_dir, "claim4_softmax_temperature.png")

  details = _common.md_table(["check (float64)", "max abs error"],
                             [[kk, v] for kk, v in checks.items()])
  details += ["", f"Top softmax probability at T = 0.01: {p_cold:.15f}; entropy at T = 1e4: "
              f"{ent_hot:.9f} (log 5 = {np.log(5):.9f})."]
  summary = (f"All eight identities hold to {_common.fmt(worst)} (tolerance {TOL:g}) on "
             f"{b} random {k}-class examples; the temperature limits give one-hot and uniform.")
  return _common.section(NAME, TITLE, CLAIM, numbers,
                         "confirmed" if ok else "not confirmed", [fig_name], summary, details)


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
