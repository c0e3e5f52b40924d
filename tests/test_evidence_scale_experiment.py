"""Smoke test of experiments/evidence_scale.py on a tiny MLP, and its lambda <-> sigma_0 map."""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import _common  # noqa: E402
import evidence_scale as es  # noqa: E402

TINY = dict(n_train=300, n_val=100, mlp_hidden=(8,), epochs=6, batch_size=100,
            lambdas=(1e-4, 1e-2, 1.0), burn_in=2, every=2, hyper_steps=10,
            curvature_batch=150, models=("MLP",))


def test_weight_decay_is_the_gaussian_prior_per_example():
  """nlp / N = mean NLL + (lambda / 2)|w|^2 exactly when sigma_0 = 1 / sqrt(N lambda)."""
  n, lam = 300, 3e-3
  model = es.lc.MLP(hidden=(4,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 8, 8, 1)))
  y = jnp.arange(n) % 10
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                  model.init(jax.random.key(0), x[:1])["params"])
  nlp = es.make_nlp(model, n, {"prior_sigma": es.sigma0_of(lam, n)})
  logp = jax.nn.log_softmax(model.apply({"params": params}, x), -1)
  mean_nll = -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1))
  sq = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(params))
  p = sum(w.size for w in jax.tree_util.tree_leaves(params))
  const = 0.5 * p * math.log(2 * math.pi * es.sigma0_of(lam, n) ** 2) / n
  np.testing.assert_allclose(jax.jit(nlp)(params, x, y) / n, mean_nll + lam / 2 * sq + const,
                             rtol=1e-12)
  np.testing.assert_allclose(es.lambda_of(es.sigma0_of(lam, n), n), lam, rtol=1e-14)


@pytest.mark.slow  # an end-to-end experiment run (about 1 min); CI runs -m slow too
def test_tiny_run(tmp_path):
  result = es.run(True, tmp_path, config=TINY)
  assert result["verdict"] in _common.VERDICTS
  json.dumps(_common.to_jsonable(result))
  res = result["numbers"]["table"]["MLP"]
  assert res["num_params"] == 64 * 8 + 8 + 8 * 10 + 10
  assert [r["lam"] for r in res["grid"]] == list(TINY["lambdas"])
  assert res["grid_best"] == int(np.argmin([r["val_nll"] for r in res["grid"]]))
  np.testing.assert_allclose(res["grid_seconds"], sum(r["seconds"] for r in res["grid"]))
  rows = res["grid"] + [res["online"], res["online_per_layer"], res["none"]]
  for r in rows:
    assert 0 <= r["acc"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0, r
    assert r["seconds"] > 0, r
  for r in res["grid"]:
    assert math.isfinite(r["log_evidence"]), r
  # (a): two updates (after epochs 4 and 6), the chosen lambda is its final prior scale.
  a = res["online"]
  assert len(a["log_evidence"]) == 2 and a["hyper_epoch"] == [4, 6]
  np.testing.assert_allclose(a["lam"], es.lambda_of(a["prior_sigma"], TINY["n_train"]))
  assert set(res["online_per_layer"]["prior_sigma"]) == {"Dense_0", "Dense_1"}
  ratio, gap = result["numbers"]["ratios"]["MLP"], result["numbers"]["nll_gaps"]["MLP"]
  np.testing.assert_allclose(ratio, a["seconds"] / res["grid_seconds"])
  np.testing.assert_allclose(gap, a["nll"] - res["grid"][res["grid_best"]]["nll"])
  assert (tmp_path / result["figures"][0]).stat().st_size > 10_000
  assert any(line.startswith("| MLP | (b) grid") for line in result["details"])
