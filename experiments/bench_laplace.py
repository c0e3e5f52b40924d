"""Time and peak memory of building each structured Laplace posterior, and of its evidence.

For tanh MLPs on random float32 inputs (categorical likelihood, Gaussian prior
``sigma=1``), with ``P`` from ~1e3 to ~7e5 (784-512-512-10 at the top), ``N =
1000`` examples (inputs ``N(0, 1)``, random labels) given to ``mm.laplace`` as
four batches of 250 through ``data=``, and each structure in ``("diag", "kron",
"lowrank", "full")`` (``lowrank`` with ``rank=20``), this measures:

- the build, ``mm.laplace(nlp, params, structure=s, data=batches)``: the first
  call (with compilation) and a second call;
- the evidence at another prior scale, ``post.log_evidence(prior_sigma=0.5)``,
  jitted: its first call and the median of 5 calls after warm-up;
- the peak resident memory: every ``(P, structure)`` runs in a fresh
  subprocess, which reports ``ru_maxrss`` at its end (absolute), and its
  increment over the same process's ``ru_maxrss`` right after importing JAX and
  building the model and data;
- the baseline: one ``jax.grad`` of the same full-data negative log-posterior,
  walked over the same four batches (jitted per batch, prior gradient once),
  median of 5 in the same subprocess; every time is also given as a ratio to it,
  wall to wall and, less sensitive to other load on a shared machine, CPU time
  (all threads) to CPU time.

The weights are random, not a MAP: the cost of a build does not depend on it,
and ``mm.laplace``'s "far from a MAP" warning is expected (it is recorded).

``"full"`` builds the dense ``P x P`` precision and is expected to be refused
above ``max_bytes`` (2 GiB by default, so ``P`` above ~23,000 in float32); the
first line of the ``ValueError`` is recorded instead of a time.

Targets (printed as PASS/FAIL, from ``--full``): ``kron`` and ``lowrank``
(``rank=20``) for the 669,706-parameter MLP each under 1 GiB peak resident
memory and under 60 s for the first build on a 2-core CPU; the dense refusal's
message names ``P`` and the bytes.

Usage::

  python experiments/bench_laplace.py            # --quick: P = 874 (+ one refusal), < 60 s
  python experiments/bench_laplace.py --full     # P up to 669,706
  python experiments/bench_laplace.py --full --structures kron,lowrank --out results/

Writes ``<out>/bench_laplace[_<tag>].json`` and prints a markdown table.

On jaxlib 0.10 for CPU, XLA fuses chains of matrix products into YNNPACK
library fusions that can be several times slower than the separate products
(see ``bench_curvature.py``); ``--xla-flags`` sets ``XLA_FLAGS`` for every
subprocess, e.g. ``--xla-flags='--xla_cpu_experimental_ynn_fusion_type='``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

STRUCTURES = ("diag", "kron", "lowrank", "full")
QUICK_SIZES = ((16, 32, 10),)
FULL_SIZES = ((16, 32, 10), (64, 128, 10), (784, 128, 10), (784, 512, 10),
              (784, 512, 512, 10))
# --quick also checks the dense refusal once, at a size where it is certain.
QUICK_REFUSAL = ((784, 128, 10), "full")
NUM_DATA, BATCH = 1000, 250
RANK, PRIOR_SIGMA, NEW_PRIOR_SIGMA, REPS = 20, 1.0, 0.5, 5
TARGET_BYTES, TARGET_SECONDS = 2**30, 60.0
TARGET_SIZES = (784, 512, 512, 10)


def num_params(sizes):
  """Weights and biases of a dense MLP with layer widths ``sizes``."""
  return int(sum(m * n + n for m, n in zip(sizes[:-1], sizes[1:])))


def _ratio_key(key):
  """``"build_first_s" -> "build_first_over_grad"``."""
  return key[:-len("_s")] + "_over_grad"


def _maxrss_bytes():
  """``ru_maxrss`` of this process (kilobytes on Linux). The parent of each run
  does not import JAX, so the peak it hands over through ``fork`` is small."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vmhwm_bytes():
  """Peak resident memory of this process's own address space (``VmHWM``), or None."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# --- workload ------------------------------------------------------------------------

def make_workload(sizes, key=0):
  """A tanh MLP, its negative log-posterior and ``NUM_DATA`` random examples.

  Returns:
    ``(nlp, params, batches, (x, y))``: ``batches`` a list of ``(inputs,
    labels)`` of ``BATCH`` examples each, ``(x, y)`` all of them.
  """
  import jax
  import jax.numpy as jnp
  import mlmap as mm
  k = jax.random.PRNGKey(key)
  keys = jax.random.split(k, len(sizes) + 1)
  params = {f"l{i}": {"w": jax.random.normal(keys[i], (m, n), jnp.float32) / np.sqrt(m),
                      "b": jnp.zeros((n,), jnp.float32)}
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}

  def apply(p, x):
    for i in range(len(sizes) - 1):
      x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
      if i < len(sizes) - 2:
        x = jnp.tanh(x)
    return x

  x = jax.random.normal(keys[-2], (NUM_DATA, sizes[0]), jnp.float32)
  y = jax.random.randint(keys[-1], (NUM_DATA,), 0, sizes[-1])
  nlp = mm.negative_log_posterior(
      apply, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=PRIOR_SIGMA), num_data=NUM_DATA)
  batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, NUM_DATA, BATCH)]
  return nlp, params, batches, (x, y)


def make_full_grad(nlp):
  """``grad(params, batches)``: the gradient of the full-data negative log-posterior,
  summed over the batches (one jitted call each) with the prior's gradient once."""
  import jax
  tm = jax.tree_util.tree_map

  def data_loss(p, x, y):
    return -jax.numpy.sum(nlp.log_likelihood(nlp.apply_fn(p, x), y))

  @jax.jit
  def add_batch(g, p, x, y):
    return tm(jax.numpy.add, g, jax.grad(data_loss)(p, x, y))

  prior_grad = jax.jit(jax.grad(lambda p: -nlp.log_prior(p)))

  def full_grad(p, batches):
    g = prior_grad(p)
    for x, y in batches:
      g = add_batch(g, p, x, y)
    return g
  return full_grad


def _block(post):
  """Wait for every array a posterior holds (a pytree, or an object's attributes)."""
  import jax
  leaves = jax.tree_util.tree_leaves(post)
  if len(leaves) == 1 and leaves[0] is post:
    leaves = jax.tree_util.tree_leaves(
        {k: v for k, v in vars(post).items() if not callable(v)})
  jax.block_until_ready(leaves)


def _timed(fn, *args):
  """``(fn(*args), wall seconds, CPU seconds of all threads)``; ``fn`` must block."""
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - t0, time.process_time() - c0


def _median_time(fn, *args, reps=REPS):
  """Median wall and CPU seconds of ``reps`` blocking calls, and the wall times."""
  import jax
  wall, cpu = [], []
  for _ in range(reps):
    _, w, c = _timed(lambda: jax.block_until_ready(fn(*args)))
    wall.append(w)
    cpu.append(c)
  return float(np.median(wall)), float(np.median(cpu)), [float(t) for t in wall]


# --- one (P, structure), in its own process -----------------------------------------

def _build(nlp, params, batches, structure, max_bytes):
  import mlmap as mm
  kwargs = {"structure": structure, "data": batches}
  if structure == "lowrank":
    kwargs["rank"] = RANK
  if max_bytes is not None:
    kwargs["max_bytes"] = max_bytes
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    post = mm.laplace(nlp, params, **kwargs)
    _block(post)
  # Random weights are not a MAP: a "far from a MAP" warning is expected and kept.
  return post, sorted({str(w.message).splitlines()[0][:300] for w in caught})


def _evidence_fn(post):
  """``f(sigma) -> log evidence`` at prior scale ``sigma``, jitted: with the
  posterior as an argument when it is a pytree, else closed over."""
  import jax
  leaves = jax.tree_util.tree_leaves(post)
  if not (len(leaves) == 1 and leaves[0] is post):
    f = jax.jit(lambda q, s: q.log_evidence(prior_sigma=s))
    return functools.partial(f, post), "posterior as a pytree argument"
  return jax.jit(lambda s: post.log_evidence(prior_sigma=s)), "posterior closed over"


def _time_evidence(post, res):
  """Add the evidence's values and times (first call, median of ``REPS``) to ``res``."""
  import jax
  try:
    f, res["evidence_jit"] = _evidence_fn(post)
    ev, res["evidence_first_s"], _ = _timed(lambda s: jax.block_until_ready(f(s)),
                                            NEW_PRIOR_SIGMA)
    res["log_evidence"] = float(ev)
    (res["evidence_median_s"], res["evidence_median_cpu_s"],
     res["evidence_times_s"]) = _median_time(f, NEW_PRIOR_SIGMA)
    res["log_evidence_own_prior"] = float(post.log_evidence())
  except Exception as e:  # noqa: BLE001  (reported; the row keeps its build)
    res["evidence_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_one(sizes, structure, max_bytes=None, grad_reps=REPS):
  """Build one structure for one MLP; return a dict of times, memory and values."""
  import jax
  nlp, params, batches, _ = make_workload(sizes)
  jax.block_until_ready((params, batches))
  res = {"sizes": list(sizes), "num_params": num_params(sizes), "structure": structure,
         "rank": RANK if structure == "lowrank" else None,
         "maxrss_base_bytes": _maxrss_bytes(), "vmhwm_base_bytes": _vmhwm_bytes()}
  try:
    (post, res["warnings"]), res["build_first_s"], res["build_first_cpu_s"] = _timed(
        _build, nlp, params, batches, structure, max_bytes)
    del post
    (post, _), res["build_second_s"], res["build_second_cpu_s"] = _timed(
        _build, nlp, params, batches, structure, max_bytes)
  except ValueError as e:
    res["refused"] = "refused: " + str(e).splitlines()[0]
    post = None
  res["maxrss_after_build_bytes"] = _maxrss_bytes()
  if post is not None:
    try:
      res["structure_of"] = _structure_summary(post)
    except Exception as e:  # noqa: BLE001  (informational only)
      res["structure_of"] = f"{type(e).__name__}: {e}"
    _time_evidence(post, res)
  full_grad = make_full_grad(nlp)
  _, res["grad_first_s"], _ = _timed(lambda: jax.block_until_ready(full_grad(params, batches)))
  res["grad_median_s"], res["grad_median_cpu_s"], res["grad_times_s"] = _median_time(
      full_grad, params, batches, reps=grad_reps)
  for k in ("build_first_s", "build_second_s", "evidence_first_s", "evidence_median_s"):
    if k in res:
      res[_ratio_key(k)] = res[k] / res["grad_median_s"]
  for k in ("build_first_cpu_s", "build_second_cpu_s", "evidence_median_cpu_s"):
    if k in res:
      res[_ratio_key(k)] = res[k] / res["grad_median_cpu_s"]
  res["maxrss_end_bytes"] = _maxrss_bytes()
  res["vmhwm_end_bytes"] = _vmhwm_bytes()
  res["maxrss_increment_bytes"] = res["maxrss_end_bytes"] - res["maxrss_base_bytes"]
  return res


def _structure_summary(post):
  """``{structure: number of leaves}`` from ``post.structure_of()``."""
  counts = {}
  for v in post.structure_of().values():
    key = v.split(":")[0]
    counts[key] = counts.get(key, 0) + 1
  return counts


def _child(sizes, structure, max_bytes):
  import jax
  jax.config.update("jax_platforms", "cpu")
  import mlmap  # noqa: F401  (imported before the base memory reading)
  try:
    res = run_one(sizes, structure, max_bytes)
  except Exception as e:  # noqa: BLE001  (the parent reports it in the table)
    import traceback
    res = {"sizes": list(sizes), "num_params": num_params(sizes), "structure": structure,
           "error": f"{type(e).__name__}: {e}"[:2000],
           "traceback": traceback.format_exc()[-3000:]}
  res["jax"] = jax.__version__
  print("RESULT " + json.dumps(res))


def run_subprocess(sizes, structure, max_bytes=None, timeout=1800):
  """Run :func:`run_one` in a fresh Python process; return its dict."""
  cmd = [sys.executable, os.path.abspath(__file__), "--one",
         ",".join(map(str, sizes)), structure]
  if max_bytes is not None:
    cmd += ["--max-bytes", str(max_bytes)]
  base = {"sizes": list(sizes), "num_params": num_params(sizes), "structure": structure}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timeout after {timeout} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    return {**base, "error": f"exit code {proc.returncode}: {(proc.stderr or '')[-1500:]}"}
  res = json.loads(lines[-1][len("RESULT "):])
  res["process_wall_s"] = time.perf_counter() - t0
  return res


# --- report ------------------------------------------------------------------------------

def _gib(b):
  return f"{b / 2**30:.2f}" if b is not None else ""


def _cell_time(r, key):
  if key not in r:
    return ""
  return f"{r[key]:.3g} ({r[_ratio_key(key)]:.3g}x)"


def table(rows):
  """Markdown table of the runs: seconds, with the ratio to one gradient (wall to
  wall, CPU to CPU), peak resident memory at the end of each run's process."""
  out = ["| P | structure | build 1st s (x grad) | build 2nd s (x grad) "
         "| build 2nd CPU s (x grad CPU) | evidence s (x grad) | grad ms "
         "| peak RSS GiB | RSS incr. GiB | log Z(sigma=0.5) |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lead = f"| {r['num_params']:,d} | {r['structure']}"
    if "error" in r:
      out.append(f"{lead} | error: {r['error'].splitlines()[0][:150]} | | | | | | | |")
      continue
    mem = f"{_gib(r['maxrss_end_bytes'])} | {_gib(r['maxrss_increment_bytes'])}"
    if "refused" in r:
      out.append(f"{lead} | {r['refused'][:220]} | | | | {1e3 * r['grad_median_s']:.1f} "
                 f"| {mem} | |")
      continue
    ev = (_cell_time(r, "evidence_median_s") if "evidence_median_s" in r
          else r.get("evidence_error", "")[:100])
    logz = f"{r['log_evidence']:.6g}" if "log_evidence" in r else ""
    out.append(f"{lead} | {_cell_time(r, 'build_first_s')} | {_cell_time(r, 'build_second_s')} "
               f"| {_cell_time(r, 'build_second_cpu_s')} | {ev} "
               f"| {1e3 * r['grad_median_s']:.1f} | {mem} | {logz} |")
  return "\n".join(out)


def targets(rows):
  """PASS/FAIL (or "not run") lines for the targets of the issue."""
  lines = []
  p_top = num_params(TARGET_SIZES)
  for s in ("kron", "lowrank"):
    r = next((r for r in rows if r["num_params"] == p_top and r["structure"] == s), None)
    name = f"{s}{f' rank={RANK}' if s == 'lowrank' else ''} at P={p_top:,d}"
    if r is None:
      lines.append(f"NOT RUN {name} (needs --full)")
    elif "build_first_s" not in r:
      lines.append(f"FAIL {name}: {r.get('error') or r.get('refused')}"[:300])
    else:
      ok = r["maxrss_end_bytes"] < TARGET_BYTES and r["build_first_s"] < TARGET_SECONDS
      lines.append(f"{'PASS' if ok else 'FAIL'} {name}: peak RSS "
                   f"{_gib(r['maxrss_end_bytes'])} GiB (< 1 GiB; increment "
                   f"{_gib(r['maxrss_increment_bytes'])}), first build "
                   f"{r['build_first_s']:.1f} s (< {TARGET_SECONDS:.0f} s), second "
                   f"{r['build_second_s']:.1f} s")
  refused = [r for r in rows if r["structure"] == "full" and "refused" in r]
  if not refused:
    lines.append("NOT RUN dense refusal (no 'full' run was refused)")
  for r in refused:
    msg, p = r["refused"], r["num_params"]
    clear = ((str(p) in msg or f"{p:,d}" in msg) and "bytes" in msg.lower())
    lines.append(f"{'PASS' if clear else 'FAIL'} dense refusal at P={p:,d} names P and "
                 f"the bytes: {msg[:300]}")
  return lines


def _machine():
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    info["lscpu"] = [l for l in lscpu.splitlines()
                     if l.split(":")[0] in ("Architecture", "CPU(s)", "Model name")]
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", dest="full", action="store_false",
                    help="P = 874, plus one dense refusal (default, < 60 s)")
  mode.add_argument("--full", dest="full", action="store_true",
                    help="P from ~1e3 to 669,706 (784-512-512-10)")
  p.add_argument("--structures", default=",".join(STRUCTURES),
                 help=f"comma-separated subset of {STRUCTURES}")
  p.add_argument("--sizes", default=None,
                 help="MLP widths, ';'-separated, e.g. '16,32,10;784,512,10' (overrides the mode)")
  p.add_argument("--max-bytes", type=float, default=None,
                 help="max_bytes= for mm.laplace (default: the library's)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
  p.add_argument("--out", default="results/", help="output folder")
  p.add_argument("--tag", default="", help="suffix of the JSON file name")
  p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for every subprocess")
  p.add_argument("--one", nargs=2, metavar=("SIZES", "STRUCTURE"), default=None,
                 help=argparse.SUPPRESS)
  p.set_defaults(full=False)
  return p.parse_args(argv)


def _cases(args):
  structures = [s for s in args.structures.split(",") if s]
  bad = [s for s in structures if s not in STRUCTURES]
  if bad:
    raise SystemExit(f"--structures: unknown {bad}; choose from {STRUCTURES}")
  if args.sizes:
    sizes = [tuple(int(w) for w in s.split(",")) for s in args.sizes.split(";") if s]
  else:
    sizes = FULL_SIZES if args.full else QUICK_SIZES
  cases = [(sz, s) for sz in sizes for s in structures]
  if not args.full and not args.sizes and "full" in structures:
    cases.append(QUICK_REFUSAL)
  return cases


def main(argv=None):
  args = parse_args(argv)
  max_bytes = int(args.max_bytes) if args.max_bytes is not None else None
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags  # inherited by every subprocess
  if args.one:
    return _child(tuple(int(w) for w in args.one[0].split(",")), args.one[1], max_bytes)
  t_start = time.perf_counter()
  try:
    from tqdm import tqdm
  except ImportError:
    tqdm = lambda it, **kw: it  # noqa: E731
  rows = []
  for sizes, structure in tqdm(_cases(args), desc="bench_laplace"):
    rows.append(run_subprocess(sizes, structure, max_bytes, args.timeout))
  machine = _machine()
  machine["loadavg_end"] = os.getloadavg()
  report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": machine, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "num_data": NUM_DATA, "batch": BATCH, "prior_sigma": PRIOR_SIGMA,
            "evidence_prior_sigma": NEW_PRIOR_SIGMA, "rank": RANK, "rows": rows,
            "targets": targets(rows), "seconds": time.perf_counter() - t_start}
  print(f"\nLaplace build and evidence, tanh MLPs, N={NUM_DATA} in batches of {BATCH}, "
        f"float32, {machine['cpu_count']} CPUs, load {machine['loadavg_start'][0]:.1f} -> "
        f"{machine['loadavg_end'][0]:.1f}; ratios to one full-data gradient")
  print(table(rows))
  print("\n".join(report["targets"]))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"bench_laplace{'_' + args.tag if args.tag else ''}.json"
  path.write_text(json.dumps(report, indent=1))
  print(f"wrote {path} ({report['seconds']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
