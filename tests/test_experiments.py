"""Smoke tests of the lecture-claim experiments (experiments/run_all.py and claim_*.py)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import _common  # noqa: E402
import claim_least_squares  # noqa: E402
import run_all  # noqa: E402


def test_ml_line_equals_polyfit_for_every_sigma():
  # Independent reference: numpy's polyfit on data made here, not in the experiment.
  rng = np.random.default_rng(7)
  x = rng.uniform(-3, 3, 25)
  t = -0.4 * x + 2.0 + 0.8 * rng.standard_normal(25)
  ref = np.polyfit(x, t, 1)
  for sigma in (0.01, 1.0, 30.0):
    fit = np.asarray(claim_least_squares._ml_line(x, t, np.log(sigma)))
    np.testing.assert_allclose(fit, ref, rtol=0, atol=1e-10)
  rms = np.sqrt(np.mean((np.polyval(ref, x) - t) ** 2))
  log_sigma = claim_least_squares._ml_log_sigma(ref, x, t)
  np.testing.assert_allclose(np.exp(float(log_sigma)), rms, rtol=1e-10)


@pytest.fixture
def fake_claims(tmp_path, monkeypatch):
  """Three fake claim modules: one raising, one not runnable, one fine (in that order)."""
  mods = tmp_path / "mods"
  mods.mkdir()
  (mods / "claim_boom.py").write_text(textwrap.dedent("""
      def run(quick, out_dir):
        raise RuntimeError("deliberate failure 42")
  """))
  (mods / "claim_missing.py").write_text(textwrap.dedent("""
      import _common
      def run(quick, out_dir):
        _common.require("no_such_function_xyz")
  """))
  (mods / "claim_fine.py").write_text(textwrap.dedent("""
      import _common
      def run(quick, out_dir):
        return _common.section("fine", "9. A fine claim", "It holds.", {"x": 1.5, "quick": quick},
                               "confirmed", [], "x is 1.5.")
  """))
  monkeypatch.syspath_prepend(str(mods))
  monkeypatch.setattr(run_all, "CLAIMS", (("8", "claim_boom"), ("8b", "claim_missing"),
                                          ("9", "claim_fine")))
  return tmp_path / "out"


def test_run_all_isolates_failures(fake_claims):
  code = run_all.main(["--out", str(fake_claims)])
  assert code == 1
  results = json.loads((fake_claims / "results.json").read_text())
  status = {c["name"]: c["status"] for c in results["claims"]}
  assert status["boom"].startswith("failed: RuntimeError: deliberate failure 42")
  assert status["missing"] == "not run: mlmap does not provide mm.no_such_function_xyz yet"
  assert status["fine"] == "ok"  # ran after the failure
  assert results["mode"] == "quick" and results["all_ran"] is False
  report = (fake_claims / "report.md").read_text()
  assert "deliberate failure 42" in report and "Traceback" in report
  assert "| 9 | A fine claim | confirmed |" in report
  assert "not run: mlmap does not provide" in report


def test_run_all_only_and_full_flags(fake_claims):
  assert run_all.main(["--full", "--only", "fine", "--out", str(fake_claims)]) == 0
  results = json.loads((fake_claims / "results.json").read_text())
  assert [c["name"] for c in results["claims"]] == ["fine"]
  assert results["mode"] == "full" and results["claims"][0]["numbers"]["quick"] is False
  with pytest.raises(SystemExit, match="unknown claim"):
    run_all.main(["--only", "nope", "--out", str(fake_claims)])


def test_section_rejects_unknown_verdict():
  with pytest.raises(ValueError, match="verdict must be one of"):
    _common.section("x", "x", "x", {}, "probably", [], "x")


def test_run_all_command_line_claim1_quick(tmp_path):
  # The real thing, one quick claim, through the command line (fresh process).
  proc = subprocess.run([sys.executable, str(EXPERIMENTS / "run_all.py"), "--only", "1",
                         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  (claim,) = results["claims"]
  assert claim["status"] == "ok" and claim["verdict"] == "confirmed"
  assert (tmp_path / claim["figures"][0]).stat().st_size > 10_000
  nums = claim["numbers"]
  assert len(nums["ml_fits"]) >= 3
  for fit in nums["ml_fits"].values():
    assert abs(fit["slope"] - nums["lstsq_slope"]) < 1e-8
    assert abs(fit["intercept"] - nums["lstsq_intercept"]) < 1e-8
  assert abs(nums["sigma_ml"] - nums["rms_residual"]) < 1e-8 * nums["rms_residual"]
  report = (tmp_path / "report.md").read_text()
  assert "## 1. Least squares is Gaussian maximum likelihood" in report
  assert "**Verdict: confirmed.**" in report
  assert "![claim1_least_squares.png](claim1_least_squares.png)" in report
