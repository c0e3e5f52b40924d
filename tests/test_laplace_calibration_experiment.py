"""Smoke test of experiments/laplace_calibration.py, and its ECE against a hand computation."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import _common  # noqa: E402
import laplace_calibration as lc  # noqa: E402

# Four examples, two classes; confidences 0.9 (right) and 0.92 (wrong) share the bin
# (13/15, 14/15], 0.7 (right) is alone in (10/15, 11/15], 0.55 (wrong) in (8/15, 9/15].
PROBS = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.55, 0.45]])
LABELS = np.array([0, 0, 1, 1])
ECE_BY_HAND = 2 / 4 * abs(0.5 - 0.91) + 1 / 4 * abs(1.0 - 0.7) + 1 / 4 * abs(0.0 - 0.55)

# Tiny models and data: P = 1210 (MLP) and 746 (CNN); the dense float64 precision
# (11.7 MB and 4.5 MB) is refused for the MLP only under an 8 MiB cap.
TINY = dict(n_train=320, n_test=100, mlp_hidden=(16,), cnn_channels=(2, 4), epochs=10,
            batch_size=64, loader_batch=160, rank=3, mc_samples=16, nn_samples=4,
            full_max_bytes=8 * 2**20, polish_steps=5, models=("MLP",))


def test_ece_matches_hand_computation():
  ece, conf, acc, count = lc.calibration_bins(PROBS, LABELS)
  assert ECE_BY_HAND == pytest.approx(0.4175, abs=1e-15)
  np.testing.assert_allclose(ece, ECE_BY_HAND, rtol=1e-14)
  assert count.sum() == 4 and count[13] == 2 and count[10] == 1 and count[8] == 1
  np.testing.assert_allclose([conf[13], acc[13], conf[10], acc[10], conf[8], acc[8]],
                             [0.91, 0.5, 0.7, 1.0, 0.55, 0.0], rtol=1e-14)
  assert np.isnan(conf[0]) and np.isnan(acc[0])  # empty bins
  m = lc.classification_metrics(PROBS, LABELS)
  assert m["acc"] == 0.5
  np.testing.assert_allclose(m["nll"], -np.mean(np.log([0.9, 0.08, 0.7, 0.45])), rtol=1e-14)
  # Bins are (lo, hi]: a confidence of exactly 1 is in the last bin, 1/15 in the first.
  _, _, _, count = lc.calibration_bins(np.array([[1.0, 0.0], [1 / 15, 14 / 15]]), np.array([0, 1]))
  assert count[-1] == 1 and count[13] == 1 and count.sum() == 2
  assert lc.calibration_bins(np.array([[0.5, 0.5]] * 3), np.array([0, 1, 1]))[0] == pytest.approx(
      abs(1 / 3 - 0.5))


def _finite(x):
  return isinstance(x, float) and math.isfinite(x)


def _check_tiny_run(tmp_path, models, methods=None):
  result = lc.run(True, tmp_path, config=dict(TINY, models=models, methods=methods))
  assert result["verdict"] in _common.VERDICTS
  json.dumps(result)  # the section is JSON-ready (results.json)
  table = result["numbers"]["table"]
  assert list(table) == list(models)
  for model, rows in table.items():
    info = rows["map"]
    assert info["map_loss"] <= info["adam_loss"], info  # L-BFGS polish: a line search
    assert list(rows) == list(methods or [m[0] for m in lc.METHODS]), model
    for key, r in rows.items():
      if model == "MLP" and key == "full":
        assert r["status"].startswith("does not fit"), r["status"]
        continue
      assert r["status"] == "ok", (model, key, r["status"])
      assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["ece"] <= 1.0, (model, key, r)
      assert _finite(r["nll"]) and r["nll"] > 0.0, (model, key, r)
      for ood in ("conf_rotated", "conf_noise"):
        assert 0.1 - 1e-12 <= r[ood] <= 1.0 + 1e-12, (model, key, r)
      sigmas = np.atleast_1d(r["prior_sigma"])
      assert np.all(np.isfinite(sigmas) & (sigmas > 0)), (model, key, r)
      if key in lc.GLM_TUNED:
        for t in ("build_seconds", "tune_seconds"):
          assert _finite(r[t]) and r[t] > 0, (model, key, t, r)
      if key not in ("map", "kron_untuned"):
        assert isinstance(r["converged"], bool), (model, key, r)
    assert any(f"| {model} | {rows[m]['method']} |" in line
               for m in rows for line in result["details"]), model
  assert (tmp_path / result["figures"][0]).stat().st_size > 10_000
  return table


@pytest.mark.slow  # an end-to-end experiment run (about 1 min); CI runs -m slow too
def test_tiny_mlp_run_cheap_methods(tmp_path):
  # The dense refusal, a diagonal and a last-layer posterior, each tuned, over 2 batches.
  _check_tiny_run(tmp_path, ("MLP",), ("map", "full", "diag", "last_layer"))


def test_methods_must_reuse_an_included_posterior():
  with pytest.raises(ValueError, match="reuse the 'kron' posterior"):
    lc.selected_methods(dict(methods=("map", "kron_mc")))
  with pytest.raises(ValueError, match="must include 'map'"):
    lc.selected_methods(dict(methods=("diag", "nope")))


@pytest.mark.slow
def test_tiny_run_of_both_models_every_method(tmp_path):
  # Every structure and predictive compiles once per model: minutes on 2 CPU cores.
  table = _check_tiny_run(tmp_path, ("MLP", "CNN"))
  assert table["CNN"]["full"]["status"] == "ok"  # 746 parameters: 4.5 MB fits under 8 MiB
  for model in table:
    assert table[model]["kron_untuned"]["prior_sigma"] == TINY.get("prior_sigma", 1.0)
