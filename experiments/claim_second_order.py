"""Claim 6: second-order methods vs Adam, from the optimizer benchmark.

The verdict comes from ``bench_optimizers.run_benchmark`` (see its docstring
for the problems, optimizers, budgets and targets): a deep autoencoder on
digits, a CURVES-like autoencoder with P = 210,520 and a minibatched digits
classifier with P = 105,546, all float32, every optimizer on the same wall-time
budget. ``bench_optimizers.verdict`` gives each problem "refuted" (an mlmap
method reaches Adam's final loss in at most 1/3 of Adam's time and ends below
Adam's lowest loss), "confirmed" (none reaches it within Adam's time) or
"mixed". The claim's verdict is "confirmed" / "not confirmed" when all problems
agree on confirmed / refuted, and "mixed" otherwise. ``--quick`` runs the
benchmark's tiny mode (small models, sub-second budgets: a smoke test of the
verdict, not the measurement); the full main job runs its quick mode.

Run: ``python experiments/claim_second_order.py --out results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import bench_optimizers  # noqa: E402

NAME = "second_order"
TITLE = "6. Second-order methods vs Adam"
CLAIM = ("Second-order methods (conjugate gradients, natural gradients, Newton) use the "
         "curvature to take better steps, but are not normally used for deep learning because "
         "the number of weights is too high; in practice Adam gives similar benefits at low "
         "computational cost.")


def combine(verdicts: dict) -> str:
  """All problems confirmed: confirmed; all refuted: not confirmed; else mixed."""
  words = set(verdicts.values())
  if words == {"confirmed"}:
    return "confirmed"
  if words == {"refuted"}:
    return "not confirmed"
  return "mixed"


def run(quick: bool, out_dir: Path) -> dict:
  _common.require("hessian_free", "natural_gradient", "kfac", "nonlinear_cg",
                  "make_train_step")
  mode = "tiny" if quick else "quick"
  res = bench_optimizers.run_benchmark(mode, out_dir, progress=False)
  per = {name: p["verdict"]["verdict"] for name, p in res["problems"].items()}
  verdict = combine(per)
  parts = []
  for name, p in res["problems"].items():
    v = p["verdict"]
    fastest = ("no mlmap method reached Adam's final loss" if v["fastest"] is None else
               f"fastest mlmap method to Adam's final loss: {v['fastest']} at "
               f"{v['ratio']:.2f}x Adam's wall time")
    parts.append(f"{p['title']} (P = {p['num_params']:,}): {v['verdict']} ({fastest}; "
                 f"below Adam's lowest loss: {', '.join(v['lower_than_adam']) or 'none'})")
  summary = (f"Benchmark mode {mode}. " + "; ".join(parts) + ". Rule: refuted on a problem "
             "when an mlmap method reaches Adam's final loss in <= 1/3 of its wall time and "
             "ends lower; confirmed when none reaches it within Adam's time.")
  figures = [p["figure"] for p in res["problems"].values()]
  numbers = {name: dict(verdict=p["verdict"], summary=p["summary"], num_params=p["num_params"])
             for name, p in res["problems"].items()}
  return _common.section(NAME, TITLE, CLAIM, numbers, verdict, figures, summary,
                         res["markdown"].splitlines())


if __name__ == "__main__":
  sys.exit(_common.main(run, NAME))
