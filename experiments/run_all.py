"""Run every claim of the lecture "Backprop Variations" as a measured experiment.

    python experiments/run_all.py [--quick | --full] [--out DIR] [--only NAME ...]

Runs each ``experiments/claim_*.py``, ``experiments/laplace_calibration.py`` and
``experiments/evidence_scale.py``
(default ``--quick``) with a progress bar, each isolated: an experiment that
raises is reported (with the end of its traceback) and the others still run.
Writes ``DIR/report.md`` (one section per claim: the claim, the measured
numbers, the verdict, the figure), ``DIR/results.json`` and the PNG figures.
Exit code 0 only if every selected experiment ran; 1 if any failed or could not
run (e.g. a library function it needs is missing: "not run: <reason>").
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (Agg backend, float64)

# (number, module): the order of the lecture.
CLAIMS = (
    ("1", "claim_least_squares"),
    ("2", "claim_cross_entropy"),
    ("3", "claim_outliers"),
    ("4", "claim_softmax"),
    ("5", "claim_weight_decay"),
    ("5b", "claim_evidence"),
    ("6", "claim_second_order"),
    ("7", "claim_empirical_fisher"),
    ("8", "laplace_calibration"),
    ("9", "evidence_scale"),
)


def select(only):
  """The ``(number, module)`` pairs named by ``--only`` (numbers, names, or module names)."""
  if not only:
    return list(CLAIMS)
  known = {}
  for num, mod in CLAIMS:
    for alias in (num, mod, mod.removeprefix("claim_")):
      known[alias] = (num, mod)
  unknown = [o for o in only if o not in known]
  if unknown:
    raise SystemExit(f"run_all: unknown claim(s) {unknown}; choose from "
                     f"{[m.removeprefix('claim_') for _, m in CLAIMS]} or {[n for n, _ in CLAIMS]}.")
  chosen = {known[o] for o in only}
  return [c for c in CLAIMS if c in chosen]


def _load_and_run(mod_name: str):
  """A ``run(quick, out_dir)`` that imports the module first (import errors are isolated too)."""
  def run(quick, out_dir):
    return importlib.import_module(mod_name).run(quick, out_dir)
  return run


def _machine() -> str:
  import jax
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"jax {jax.__version__} on {jax.default_backend()}, Python {platform.python_version()}")


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def render_report(results: list, args, total: float, cpu: float, command: str) -> str:
  lines = ["# The lecture's claims, measured", "",
           f"Command: `{command}` ({'quick' if args.quick else 'full'} mode), "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
           f"total {total:.1f} s wall, {cpu:.1f} s CPU (user + system; the wall time "
           "includes waiting for the CPU on a shared machine).  ", f"Machine: {_machine()}.", "",
           "| # | claim | verdict | time (s) |", "|---|---|---|---|"]
  for r in results:
    verdict = r.get("verdict", "-") if r["status"] == "ok" else r["status"]
    title = r.get("title", r["name"])
    lines.append(f"| {r['number']} | {title.split('. ', 1)[-1]} | {verdict} | {r['seconds']:.1f} |")
  lines.append("")
  for r in results:
    if "title" not in r:
      r = dict(r, title=f"{r['number']}. {r['name']}")
    lines.append(_common.render_section(r))
  return "\n".join(lines)


def main(argv=None) -> int:
  from tqdm import tqdm
  args = _common.parse_args(__doc__.splitlines()[0], argv, multi=True)
  chosen = select(args.only)
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python experiments/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
  results = []
  start, cpu0 = time.perf_counter(), _cpu_seconds()
  bar = tqdm(chosen, desc="claims", unit="claim")
  for num, mod in bar:
    bar.set_postfix_str(mod.removeprefix("claim_"))
    r = _common.run_isolated(mod.removeprefix("claim_"), _load_and_run(mod), args.quick, args.out)
    r["number"] = num
    results.append(r)
    tqdm.write(f"[{num}] {r['name']}: {r.get('verdict') if r['status'] == 'ok' else r['status']}"
               f" ({r['seconds']:.1f} s)")
  total = time.perf_counter() - start
  cpu = _cpu_seconds() - cpu0
  ok = all(r["status"] == "ok" for r in results)
  _common.write_json(args.out / "results.json", dict(
      mode="quick" if args.quick else "full", total_seconds=total, cpu_seconds=cpu, all_ran=ok,
      command=command.strip(), machine=_machine(), claims=results))
  (args.out / "report.md").write_text(render_report(results, args, total, cpu, command.strip()))
  print(f"wrote {args.out / 'report.md'} and {args.out / 'results.json'} in {total:.1f} s "
        f"({cpu:.1f} s CPU); "
        + ("all experiments ran" if ok else
           f"{sum(r['status'] != 'ok' for r in results)} did not run or failed"))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
