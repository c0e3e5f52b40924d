"""Shared helpers of the lecture-claim experiments (``experiments/claim_*.py``).

Each claim module exposes ``run(quick: bool, out_dir: Path) -> dict`` returning a
*section* (see :func:`section`) and ends with ``if __name__ == "__main__":
main(run, NAME)`` so that it runs alone: ``python experiments/claim_x.py --out DIR``.
``run_all.py`` imports them, runs each in isolation and renders the report.

Importing this module selects matplotlib's Agg backend and turns on float64 in
JAX: the identities checked here (ML slope == least squares, weight decay ==
Gaussian prior) are then exact to ~1e-12 instead of float32's ~1e-6.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

VERDICTS = ("confirmed", "not confirmed", "mixed")


class NotRun(Exception):
  """An experiment cannot run here (e.g. a library function it needs is missing).

  ``run_all`` reports it as ``not run: <reason>`` and exits non-zero; it never
  stands in for a result.
  """


def require(*names: str):
  """Return the ``mlmap`` attributes ``names``, or raise :class:`NotRun` naming the missing ones."""
  import mlmap as mm
  missing = [n for n in names if not hasattr(mm, n)]
  if missing:
    raise NotRun(f"mlmap does not provide {', '.join('mm.' + n for n in missing)} yet")
  found = [getattr(mm, n) for n in names]
  return found[0] if len(found) == 1 else found


def section(name: str, title: str, claim: str, numbers: dict, verdict: str,
            figures: list, summary: str, details: Optional[list] = None) -> dict:
  """One report section: what the lecture claims, what was measured, the verdict.

  Args:
    name: short id, e.g. ``"least_squares"`` (used by ``--only`` and file names).
    title: heading, e.g. ``"1. Least squares is Gaussian maximum likelihood"``.
    claim: the lecture's claim in one or two sentences.
    numbers: measured values (JSON-serializable; numpy scalars/arrays are fine).
    verdict: one of :data:`VERDICTS`.
    figures: file names of the PNGs, relative to the output directory.
    summary: one or two sentences stating what the numbers show.
    details: optional markdown lines (tables) for the report.
  """
  if verdict not in VERDICTS:
    raise ValueError(f"section {name!r}: verdict must be one of {VERDICTS}, got {verdict!r}.")
  return dict(name=name, title=title, claim=claim, numbers=to_jsonable(numbers),
              verdict=verdict, figures=list(figures), summary=summary,
              details=list(details or []))


def to_jsonable(obj: Any) -> Any:
  """Convert numpy / JAX scalars and arrays (nested in dicts/lists) to plain Python."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (str, bool)) or obj is None:
    return obj
  if isinstance(obj, int):
    return obj
  arr = np.asarray(obj)
  if arr.ndim == 0:
    v = arr.item()
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)
    return v
  return [to_jsonable(v) for v in arr.tolist()]


def write_json(path: Path, obj: Any) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
  return path


def save_figure(fig, out_dir: Path, filename: str) -> str:
  """Save ``fig`` as ``out_dir/filename`` (PNG, 110 dpi), close it, return ``filename``."""
  import matplotlib.pyplot as plt
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_dir / filename, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return filename


class Timer:
  """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter)."""

  def __enter__(self):
    self._start = time.perf_counter()
    self.seconds = float("nan")
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._start
    return False


def fmt(x: Any, digits: int = 3) -> str:
  """Compact number formatting for the report (``1.2e-13``, ``0.947``, ``12``)."""
  if isinstance(x, (bool, np.bool_)):
    return str(bool(x))
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  try:
    v = float(x)
  except (TypeError, ValueError):
    return str(x)
  if not math.isfinite(v):
    return str(v)
  if v == 0.0:
    return "0"
  if abs(v) < 1e-3 or abs(v) >= 1e5:
    return f"{v:.{max(digits - 1, 1)}e}"
  return f"{v:.{digits}g}"


def mean_std(values) -> str:
  v = np.asarray(values, dtype=float)
  return f"{v.mean():.3f} +- {v.std(ddof=1) if v.size > 1 else 0.0:.3f}"


def md_table(header: list, rows: list) -> list:
  """Markdown table lines; cells are formatted with :func:`fmt` unless already str."""
  cell = lambda c: c if isinstance(c, str) else fmt(c)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
  return lines


def render_section(result: dict) -> str:
  """Markdown of one section (a finished result, or a failed / not-run record)."""
  lines = [f"## {result.get('title', result.get('name'))}", ""]
  if result.get("claim"):
    lines += [f"**Claim.** {result['claim']}", ""]
  status = result.get("status", "ok")
  if status != "ok":
    lines += [f"**Verdict: {status}**", ""]
    if result.get("traceback"):
      lines += ["```", result["traceback"].rstrip(), "```", ""]
    return "\n".join(lines)
  lines += [f"**Verdict: {result['verdict']}.** {result.get('summary', '')}", ""]
  lines += result.get("details", [])
  if result.get("details"):
    lines.append("")
  for fig in result.get("figures", []):
    lines += [f"![{fig}]({fig})", ""]
  if "seconds" in result:
    lines += [f"_Runtime: {result['seconds']:.1f} s._", ""]
  return "\n".join(lines)


def run_isolated(name: str, run: Callable[[bool, Path], dict], quick: bool,
                 out_dir: Path) -> dict:
  """Run one experiment; never raises. Adds ``status`` and ``seconds`` to the result.

  ``status`` is ``"ok"``, ``"not run: <reason>"`` (:class:`NotRun`) or
  ``"failed: <Error>: <message>"`` with the last frames of the traceback.
  """
  with Timer() as timer:
    try:
      result = run(quick, Path(out_dir))
      result["status"] = "ok"
    except NotRun as e:
      result = dict(name=name, status=f"not run: {e}")
    except Exception as e:  # noqa: BLE001 -- isolation is the point
      tb = traceback.format_exception(type(e), e, e.__traceback__)
      result = dict(name=name, status=f"failed: {type(e).__name__}: {e}",
                    traceback="".join(tb[:1] + tb[-4:]))  # header, last frames, error
  result["seconds"] = timer.seconds
  return result


def parse_args(description: str, argv=None, multi: bool = False):
  """``--quick`` (default) / ``--full``, ``--out DIR`` (default ``results``); ``--only`` if ``multi``."""
  p = argparse.ArgumentParser(description=description)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", dest="quick", action="store_true", default=True,
                 help="few seeds and steps (default; < 3 min for all claims on 2 CPU cores)")
  g.add_argument("--full", dest="quick", action="store_false",
                 help="more seeds and steps")
  p.add_argument("--out", type=Path, default=Path("results"),
                 help="output directory for report.md, results.json and PNGs")
  if multi:
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these claims (name, e.g. least_squares, or number, e.g. 1 5b)")
  return p.parse_args(argv)


def main(run: Callable[[bool, Path], dict], name: str, argv=None) -> int:
  """Entry point of a claim module run alone: writes ``OUT/NAME.json`` and ``OUT/NAME.md``."""
  args = parse_args(f"Lecture claim experiment: {name}", argv)
  result = run_isolated(name, run, args.quick, args.out)
  write_json(args.out / f"{name}.json", result)
  (args.out / f"{name}.md").write_text(render_section(result))
  print(render_section(result))
  return 0 if result["status"] == "ok" else 1
