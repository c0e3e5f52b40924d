"""The optimizer benchmark's pieces: the CURVES-like data, the targets, the verdict
rule (hand-made summaries with known answers) and a cheap end-to-end run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_optimizers as bo  # noqa: E402
from _curves import make_curves  # noqa: E402


def test_curves_are_seeded_float32_images_with_ink():
  a, b = make_curves(20, seed=3), make_curves(20, seed=3)
  assert a.shape == (20, 784) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, make_curves(20, seed=4))
  assert a.min() >= 0.0 and a.max() <= 1.0
  ink = (a > 0.5).sum(1)
  assert np.all(ink >= 10) and np.all(ink <= 400), ink  # a stroke, not a blob
  assert make_curves(3, seed=0, size=12).shape == (3, 144)
  for n, size in ((0, 28), (5, 4)):
    with pytest.raises(ValueError, match=r"make_curves: need n >= 1 and size >= 8"):
      make_curves(n, seed=0, size=size)


def _run(losses, times):
  return dict(loss=list(losses), time=list(times), steps=list(range(len(losses))), test=0.0)


def test_summarize_targets_and_times_to_them():
  runs = {"Adam a": _run([10, 6, 4, 3], [0, 1, 2, 3]),
          "Adam b": _run([10, 8, 7, 6], [0, 1, 2, 3]),
          "K-FAC": _run([10, 3, 1, 1], [0, 0.5, 1.0, 1.5])}
  fam = {"Adam a": "Adam", "Adam b": "Adam", "K-FAC": "K-FAC"}
  s = bo.summarize(runs, fam, t_grad=0.25)
  assert s["T1"] == 3 and s["best_adam"] == "Adam a"
  assert s["T2"] == pytest.approx(1 + 0.1 * 2)
  assert s["rows"]["K-FAC"]["T1"] == dict(steps=1, seconds=0.5, grad_equivalents=2.0,
                                          time_vs_adam=0.5 / 3)
  assert s["rows"]["K-FAC"]["T2"]["steps"] == 2 and s["rows"]["Adam a"]["T2"] is None
  assert s["rows"]["Adam b"]["T1"] is None


def _summary(ratio, lower):
  adam = {"family": "Adam", "best_loss": 1.0, "T1": {"time_vs_adam": 1.0}}
  other = {"family": "Hessian-free", "best_loss": 0.5 if lower else 1.5,
           "T1": None if ratio is None else {"time_vs_adam": ratio}}
  return {"rows": {"Adam": adam, "Hessian-free": other}, "adam_best_loss": 1.0}


@pytest.mark.parametrize("ratio, lower, word", [
    (0.2, True, "refuted"), (1 / 3, True, "refuted"), (0.2, False, "mixed"),
    (0.5, True, "mixed"), (1.0, True, "mixed"), (1.5, True, "confirmed"),
    (None, True, "confirmed")])
def test_verdict_rule(ratio, lower, word):
  v = bo.verdict(_summary(ratio, lower))
  assert v["verdict"] == word and v["goal_met"] == (word == "refuted")


def test_claim_combines_the_problems_verdicts():
  import claim_second_order as c6
  assert c6.combine({"a": "confirmed", "b": "confirmed"}) == "confirmed"
  assert c6.combine({"a": "refuted", "b": "refuted"}) == "not confirmed"
  assert c6.combine({"a": "refuted", "b": "confirmed"}) == "mixed"


def test_problems_are_float32_and_meet_the_sizes():
  probs = {p["name"]: p for p in bo.make_problems("quick")}
  assert probs["curves"]["num_params"] >= 100_000 and probs["classifier"]["num_params"] >= 100_000
  assert len(probs["autoencoder"]["params"]) >= 5
  for p in probs.values():
    assert all(v.dtype == np.float32 for v in
               [*p["train"], *[a for layer in p["params"] for a in layer.values()]]
               if v.dtype.kind == "f")


def _check_result(res, out, families):
  data = json.loads((out / "bench_optimizers.json").read_text())
  assert set(data["problems"]) == set(families)
  for name in families:
    assert (out / f"bench_optimizers_{name}.png").stat().st_size > 10_000
    rows = data["problems"][name]["summary"]["rows"]
    assert {r["family"] for r in rows.values()} == set(families[name])
    for row in rows.values():
      assert np.isfinite(row["final_loss"])
    assert res["problems"][name]["verdict"]["verdict"] in ("refuted", "confirmed", "mixed")


@pytest.mark.slow  # an end-to-end experiment run (about 1 min); CI runs -m slow too
def test_cheap_end_to_end_run(tmp_path):
  res = bo.run_benchmark("tiny", tmp_path, progress=False, problems=("autoencoder",),
                         families=("K-FAC",))
  _check_result(res, tmp_path, {"autoencoder": ["Adam", "K-FAC"]})


@pytest.mark.slow
def test_tiny_mode_runs_every_optimizer(tmp_path):
  res = bo.run_benchmark("tiny", tmp_path, progress=False)
  every = ["Adam", "SGD", "Sophia", "Muon", "Hessian-free", "natural gradient", "K-FAC"]
  _check_result(res, tmp_path, {"autoencoder": every + ["nonlinear CG"],
                                "curves": every + ["nonlinear CG"], "classifier": every})
