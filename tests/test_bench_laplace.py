"""Smoke tests of experiments/bench_laplace.py at tiny sizes (its harness, not its timings).

Only under ``-m slow`` (each builds a posterior, or starts a fresh Python, for
several seconds): the full-structure evidence against mm.log_evidence, the kron
row's layer count, and the subprocess run that records the dense refusal. The
default suite keeps the workload / baseline-gradient checks and the
PASS/FAIL and table logic.
"""

import functools
import inspect
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import mlmap as mm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_laplace as bl  # noqa: E402

TINY = (4, 8, 3)
HAS_STRUCTURE = "structure" in inspect.signature(mm.laplace).parameters
needs_api = pytest.mark.skipif(not HAS_STRUCTURE, reason="mm.laplace has no structure= yet")


@pytest.fixture(scope="module")
def workload():
  """``bl.make_workload(TINY)``, built once for the module (nothing mutates it)."""
  return bl.make_workload(TINY)


def test_num_params_counts_weights_and_biases(workload):
  assert bl.num_params(bl.TARGET_SIZES) == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
  params = workload[1]
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == bl.num_params(TINY)


def test_baseline_gradient_is_the_full_data_gradient(workload):
  # The baseline walks four batches; it must equal one gradient over all 1000 examples.
  nlp, params, batches, (x, y) = workload
  assert len(batches) == bl.NUM_DATA // bl.BATCH and nlp.num_data == bl.NUM_DATA
  got = bl.make_full_grad(nlp)(params, batches)
  ref = jax.jit(jax.grad(nlp))(params, x, y)  # jitted: op-by-op it costs seconds here
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def _row(structure, p=669_706, **kw):
  row = {"num_params": p, "structure": structure, "build_first_s": 10.0,
         "build_second_s": 5.0, "maxrss_end_bytes": 2**29, "maxrss_increment_bytes": 2**28,
         "grad_median_s": 0.1, "build_first_over_grad": 100.0,
         "build_second_over_grad": 50.0, "build_second_cpu_s": 8.0,
         "build_second_cpu_over_grad": 40.0}
  row.update(kw)
  return row


def test_targets_pass_and_fail_on_the_thresholds():
  msg_ok = ("refused: laplace: the dense (669706, 669706) float32 matrix needs "
            "1794022213744 bytes (1.67e+03 GiB)")
  lines = bl.targets([_row("kron"), _row("lowrank", build_first_s=61.0),
                      {"num_params": 669_706, "structure": "full", "refused": msg_ok,
                       "grad_median_s": 0.1},
                      {"num_params": 101_770, "structure": "full", "refused": "refused: too big",
                       "grad_median_s": 0.1}])
  assert lines[0].startswith("PASS kron")
  assert lines[1].startswith("FAIL lowrank")
  assert lines[2].startswith("PASS dense refusal at P=669,706")
  assert lines[3].startswith("FAIL dense refusal at P=101,770")
  over = bl.targets([_row("kron", maxrss_end_bytes=2**30 + 1)])
  assert over[0].startswith("FAIL kron") and over[1].startswith("NOT RUN lowrank")
  table = bl.table([_row("kron"), {"num_params": 10, "structure": "diag", "error": "boom"}])
  assert "| 669,706 | kron | 10 (100x) | 5 (50x) | 8 (40x) |" in table and "error: boom" in table


@pytest.mark.slow
@needs_api
def test_full_structure_evidence_equals_the_dense_evidence():
  # Reference: the existing dense mm.log_evidence on all 1000 examples at one batch,
  # with the prior rebuilt at sigma=0.5 (the bench evaluates post.log_evidence(0.5)).
  res = bl.run_one(TINY, "full", grad_reps=1)
  assert "error" not in res and "evidence_error" not in res, res
  nlp, params, _, (x, y) = bl.make_workload(TINY)
  nlp05 = mm.negative_log_posterior(
      nlp.apply_fn, nlp.log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=bl.NEW_PRIOR_SIGMA), num_data=bl.NUM_DATA)
  ref = mm.log_evidence(nlp05, params, x, y, map_tol=None)
  np.testing.assert_allclose(res["log_evidence"], float(ref), rtol=1e-4)
  assert res["build_first_s"] > 0 and res["evidence_median_s"] > 0
  assert res["maxrss_end_bytes"] >= res["maxrss_base_bytes"] > 0


@pytest.mark.slow
@needs_api
def test_kron_row_reports_its_layers():
  res = bl.run_one(TINY, "kron", grad_reps=1)
  assert "error" not in res and "evidence_error" not in res, res
  assert res["structure_of"].get("kron", 0) == 4, res["structure_of"]  # 2 weights + 2 biases
  assert np.isfinite(res["log_evidence"]) and res["build_second_over_grad"] > 0


@pytest.mark.slow
@needs_api
def test_subprocess_records_the_dense_refusal():
  res = bl.run_subprocess(TINY, "full", max_bytes=1000, timeout=120)
  p = bl.num_params(TINY)
  assert res["refused"].startswith("refused: ") and str(p) in res["refused"], res
  assert "build_first_s" not in res and res["grad_median_s"] > 0
  assert res["maxrss_end_bytes"] > 0
