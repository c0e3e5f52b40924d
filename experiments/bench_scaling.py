"""How curvature products scale: time and memory as the model grows, and over devices.

Three measurements, all in one process against baselines measured in it:

1. Time of ``grad``, ``mm.hvp`` and ``mm.ggn_vp`` of a negative log-posterior
   (tanh MLP, categorical likelihood, Gaussian prior) for parameter counts ``P``
   from ~1e4 up to ~1e6 (``--quick``), ~1e7 (``--full`` on CPU) or more
   (``--max-params``), at a fixed batch. Reported as seconds, as the ratio to
   ``grad`` (Pearlmutter: a small constant), and as the log-log slope of time
   against ``P`` (1 = linear growth).
2. Memory of dense versus matrix-free curvature: ``P^2`` entries for a dense
   GGN/Hessian (analytic, and the compiler's figure for ``mm.ggn_matrix`` where
   it is small enough to compile) against the compiler's peak estimate
   (arguments + outputs + temporaries) of the jitted ``mm.ggn_vp``: O(P).
3. With ``--devices N``: examples/s of ``mm.ggn_vp`` and of a
   ``mm.make_train_step`` step (Hessian-free and Adam) on a batch sharded over
   ``N`` devices with ``mm.shard_batch``, against the same global batch on one
   device. On CPU the ``N`` devices are simulated
   (``--xla_force_host_platform_device_count``) and share the same cores, so
   expect no speed-up there; on N real accelerators the ratio is the scaling.

Usage::

  python experiments/bench_scaling.py                      # quick, CPU, float32
  python experiments/bench_scaling.py --full --dtype bfloat16
  python experiments/bench_scaling.py --devices 4          # 4 simulated CPU devices
  python experiments/bench_scaling.py --device gpu --full --max-params 1e8

Writes ``<out>/bench_scaling[_<tag>].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", dest="full", action="store_false",
                    help="P up to ~1e6, < 90 s on 2 CPU cores (default)")
  mode.add_argument("--full", dest="full", action="store_true",
                    help="P up to ~1e7 (or --max-params)")
  p.add_argument("--device", default=None,
                 help="platform to run on: cpu, gpu, tpu (default: JAX's default)")
  p.add_argument("--devices", type=int, default=None,
                 help="also measure throughput on N devices (simulated on CPU)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="matmul input dtype (parameters and reductions stay float32)")
  p.add_argument("--max-params", type=float, default=None,
                 help="largest P (default 1e6 quick, 1e7 full)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
  p.add_argument("--repeats", type=int, default=None, help="timed runs per point (median)")
  p.add_argument("--dense-max", type=float, default=3.5e4,
                 help="largest P for which mm.ggn_matrix is compiled for its memory")
  p.add_argument("--out", default="results", help="output folder")
  p.add_argument("--tag", default="", help="suffix of the output file names")
  p.set_defaults(full=False)
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices and ARGS.device in (None, "cpu"):
  # Must happen before jax is imported. Harmless when the default platform is
  # a GPU/TPU: the flag only adds host (CPU) devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import mlmap as mm  # noqa: E402

IN_DIM, NUM_CLASSES, NUM_DATA = 32, 10, 60_000


def width_for(num_params: float) -> int:
  """Hidden width ``W`` of the 2-hidden-layer MLP with about ``num_params`` weights."""
  # P = W^2 + W (IN_DIM + NUM_CLASSES + 2) + NUM_CLASSES
  b = IN_DIM + NUM_CLASSES + 2
  return max(2, int(round((-b + np.sqrt(b * b + 4 * (num_params - NUM_CLASSES))) / 2)))


def init_params(key, width: int):
  k1, k2, k3 = jax.random.split(key, 3)
  dims = [(IN_DIM, width), (width, width), (width, NUM_CLASSES)]
  return {f"layer{i}": {"w": jax.random.normal(k, d, jnp.float32) / np.sqrt(d[0]),
                        "b": jnp.zeros(d[1], jnp.float32)}
          for i, (k, d) in enumerate(zip((k1, k2, k3), dims))}


def make_apply(dtype):
  """MLP whose matmuls take ``dtype`` inputs and accumulate in float32."""
  def apply_fn(params, x):
    h = x
    for i in range(3):
      layer = params[f"layer{i}"]
      h = jnp.dot(h.astype(dtype), layer["w"].astype(dtype),
                  preferred_element_type=jnp.float32) + layer["b"]
      if i < 2:
        h = jnp.tanh(h)
    return h
  return apply_fn


def make_nlp(dtype):
  return mm.negative_log_posterior(
      make_apply(dtype), mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=1.0), num_data=NUM_DATA)


def make_batch(key, batch: int):
  kx, kt = jax.random.split(key)
  return (np.asarray(jax.random.normal(kx, (batch, IN_DIM), jnp.float32)),
          np.asarray(jax.random.randint(kt, (batch,), 0, NUM_CLASSES)))


def num_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def timed(fn, args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` after one warm-up (compile) call."""
  return timed_interleaved({"f": (fn, args)}, repeats)["f"]


def timed_interleaved(cases: dict, repeats: int, min_seconds: float = 0.02,
                      with_min: bool = False) -> dict:
  """Median wall time per call of each ``fn(*args)`` in ``cases``, timed round-robin.

  One warm-up (compile) call each; then ``repeats`` rounds that time every case
  once, so a change in machine load during the run hits all cases alike and the
  ratios between them stay fair. A case faster than ``min_seconds`` is called
  ``k`` times in a row per timing (``k * t >= min_seconds``) so that timer and
  scheduler noise do not dominate sub-millisecond calls. ``with_min`` adds the
  fastest round as ``<name>_min`` (less sensitive to other processes).
  """
  calls = {}
  for name, (fn, args) in cases.items():
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls[name] = max(1, int(np.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      t0 = time.perf_counter()
      for _ in range(calls[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / calls[name])
  out = {name: float(np.median(t)) for name, t in times.items()}
  if with_min:
    out.update({f"{name}_min": float(np.min(t)) for name, t in times.items()})
  return out


def compiled_bytes(fn, *args) -> dict:
  """The compiler's memory figures for ``jit(fn)(*args)`` (compile only, no run)."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0))
         for k in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def loglog_slope(p, t) -> float:
  if len(set(p)) < 2:
    return float("nan")
  return float(np.polyfit(np.log(np.asarray(p, float)), np.log(np.asarray(t, float)), 1)[0])


def scaling(args, device, sizes, batch, repeats):
  """Time and memory of grad / hvp / ggn_vp for each target parameter count."""
  nlp = make_nlp(jnp.dtype(args.dtype))
  grad = jax.jit(jax.grad(nlp))
  hvp = jax.jit(lambda p, v, x, t: mm.hvp(nlp, p, v, x, t))
  ggn = jax.jit(lambda p, v, x, t: mm.ggn_vp(nlp, p, v, x, t))
  rows = []
  for target in tqdm(sizes, desc="model size", file=sys.stderr):
    width = width_for(target)
    key = jax.random.PRNGKey(0)
    params = jax.device_put(init_params(key, width), device)
    vec = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / np.sqrt(a.size), params)
    x, t = jax.device_put(make_batch(key, batch), device)
    n = num_params(params)
    row = {"target": target, "width": width, "num_params": n, "batch": batch}
    row.update(timed_interleaved({"grad_s": (grad, (params, x, t)),
                                  "hvp_s": (hvp, (params, vec, x, t)),
                                  "ggn_vp_s": (ggn, (params, vec, x, t))}, repeats,
                                 with_min=True))
    row["hvp_over_grad"] = row["hvp_s"] / row["grad_s"]
    row["ggn_vp_over_grad"] = row["ggn_vp_s"] / row["grad_s"]
    itemsize = jnp.dtype(jnp.float32).itemsize
    row["dense_bytes_analytic"] = n * n * itemsize
    row["params_bytes"] = n * itemsize
    row["ggn_vp_bytes"] = compiled_bytes(lambda p, v, x, t: mm.ggn_vp(nlp, p, v, x, t),
                                         params, vec, x, t)
    row["hvp_bytes"] = compiled_bytes(lambda p, v, x, t: mm.hvp(nlp, p, v, x, t),
                                      params, vec, x, t)
    if hasattr(mm, "ggn_matrix") and n <= args.dense_max:
      row["ggn_matrix_bytes"] = compiled_bytes(
          # Compiled, never run: lift mm.ggn_matrix's guard against huge outputs.
          lambda p, x, t: mm.ggn_matrix(nlp, p, x, t, max_bytes=1e15), params, x, t)
    rows.append(row)
    tqdm.write(f"P={n:>10,d}  grad {row['grad_s'] * 1e3:9.2f} ms  "
               f"hvp/grad {row['hvp_over_grad']:.2f}  ggn_vp/grad "
               f"{row['ggn_vp_over_grad']:.2f}", file=sys.stderr)
  return rows


def throughput(args, devices, batch_per_device, repeats):
  """examples/s of ggn_vp and train steps on N devices vs the same batch on one."""
  n_dev = len(devices)
  nlp = make_nlp(jnp.dtype(args.dtype))
  width = width_for(1e6 if args.full else 1e5)
  key = jax.random.PRNGKey(1)
  params0 = init_params(key, width)
  global_batch = batch_per_device * n_dev
  x, t = make_batch(key, global_batch)
  txs = {"hessian_free": lambda: mm.hessian_free(nlp, damping=1e-3, maxiter=10),
         "adam": lambda: optax.adam(1e-3)}
  if not hasattr(mm, "make_train_step"):
    txs = {}
  elif not hasattr(mm, "hessian_free"):
    del txs["hessian_free"]
  out = {"num_devices": n_dev, "global_batch": global_batch, "width": width,
         "num_params": num_params(params0), "results": {}}
  labels = {"1_device": 1, f"{n_dev}_devices": n_dev}
  cases = {}
  for label, ndev in labels.items():
    mesh = mm.make_mesh(ndev, devices=devices)
    params = mm.replicate(params0, mesh)
    vec = mm.replicate(jax.tree_util.tree_map(jnp.ones_like, params0), mesh)
    xs, ts = mm.shard_batch((x, t), mesh)
    ggn = jax.jit(lambda p, v, x, t: mm.ggn_vp(nlp, p, v, x, t))
    cases[(label, "ggn_vp")] = (ggn, (params, vec, xs, ts))
    for name, make_tx in txs.items():
      tx = make_tx()
      cases[(label, f"train_step_{name}")] = (mm.make_train_step(nlp, tx),
                                              (params, tx.init(params), (xs, ts)))
  # Interleaved: both meshes see the same machine load.
  secs = timed_interleaved(cases, repeats)
  for (label, name), sec in secs.items():
    out["results"].setdefault(label, {})[name] = global_batch / sec
  base, multi = out["results"]["1_device"], out["results"][f"{n_dev}_devices"]
  out["speedup"] = {k: multi[k] / base[k] for k in base}
  return out


def machine_info(device) -> dict:
  info = {"platform": device.platform, "device_kind": device.device_kind,
          "jax": jax.__version__, "python": platform.python_version(),
          "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count()}
  if hasattr(os, "getloadavg"):
    info["loadavg_at_start"] = os.getloadavg()  # other processes sharing the machine
  try:
    info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True,
                                   timeout=10).stdout.splitlines()[:20]
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def plot(rows, slopes, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  p = [r["num_params"] for r in rows]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for key, label in (("grad_s", "grad"), ("hvp_s", "mm.hvp"), ("ggn_vp_s", "mm.ggn_vp")):
    a1.loglog(p, [r[key] for r in rows], "o-", label=f"{label} (slope {slopes[key]:.2f})")
  a1.loglog(p, np.asarray(p) * rows[-1]["grad_s"] / p[-1], "k:", label="slope 1")
  a1.set(xlabel="parameters P", ylabel="seconds (median)", title="time per product")
  a1.legend()
  a2.loglog(p, [r["dense_bytes_analytic"] for r in rows], "s-", label="dense P x P (analytic)")
  dense = [(r["num_params"], r["ggn_matrix_bytes"]["peak"]) for r in rows
           if r.get("ggn_matrix_bytes")]
  if dense:
    a2.loglog(*zip(*dense), "x", ms=10, label="mm.ggn_matrix (compiler peak)")
  a2.loglog(p, [r["ggn_vp_bytes"].get("peak", np.nan) for r in rows], "o-",
            label="mm.ggn_vp (compiler peak)")
  a2.loglog(p, [r["params_bytes"] for r in rows], "k:", label="one parameter vector")
  a2.set(xlabel="parameters P", ylabel="bytes", title="curvature memory")
  a2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(args):
  t_start = time.perf_counter()
  devices = jax.devices(args.device) if args.device else jax.devices()
  device = devices[0]
  max_p = args.max_params or (1e7 if args.full else 1e6)
  sizes = [s for s in (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8) if s <= max_p * 1.01]
  batch = args.batch or 128
  repeats = args.repeats or (5 if args.full else 7)
  result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "args": vars(args), "machine": machine_info(device)}
  with jax.default_device(device):
    rows = scaling(args, device, sizes, batch, repeats)
  slopes = {k: loglog_slope([r["num_params"] for r in rows], [r[k] for r in rows])
            for k in ("grad_s", "hvp_s", "ggn_vp_s")}
  big = [r for r in rows if r["num_params"] >= 9e4]
  slopes_large = ({k: loglog_slope([r["num_params"] for r in big], [r[k] for r in big])
                   for k in slopes} if len(big) >= 2 else {})
  # Slope of (product time / grad time) against P: 0 means a constant overhead
  # factor, whatever the machine does to grad itself (caches, contention).
  ratio_slopes = {k: loglog_slope([r["num_params"] for r in rows], [r[k] for r in rows])
                  for k in ("hvp_over_grad", "ggn_vp_over_grad")}
  result.update(scaling=rows, loglog_slope=slopes, loglog_slope_p_ge_1e5=slopes_large,
                loglog_slope_ratio_to_grad=ratio_slopes)
  if args.devices:
    if args.devices > len(devices):
      raise SystemExit(f"--devices {args.devices} but only {len(devices)} "
                       f"{device.platform} devices are available.")
    result["throughput"] = throughput(args, devices[:args.devices], 64, repeats)
  result["seconds"] = time.perf_counter() - t_start
  if hasattr(os, "getloadavg"):
    result["machine"]["loadavg_at_end"] = os.getloadavg()
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "bench_scaling" + (f"_{args.tag}" if args.tag else ""))
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  plot(rows, slopes, stem + ".png")
  report(result)
  print(f"wrote {stem}.json and {stem}.png ({result['seconds']:.0f} s)")


def _mib(b):
  return f"{b / 2**20:,.1f}"


def report(result):
  m = result["machine"]
  load = (f", load average {m['loadavg_at_start'][0]:.1f} -> {m['loadavg_at_end'][0]:.1f}"
          if "loadavg_at_end" in m else "")
  print(f"device: {m['device_kind']} ({m['platform']}, {m['cpu_count']} CPUs{load}), "
        f"dtype {result['args']['dtype']}, batch {result['scaling'][0]['batch']}")
  print("| P | grad (ms) | hvp (ms) | ggn_vp (ms) | hvp/grad | ggn_vp/grad "
        "| dense P^2 (MiB) | ggn_vp peak (MiB) |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in result["scaling"]:
    print(f"| {r['num_params']:,d} | {r['grad_s'] * 1e3:.2f} | {r['hvp_s'] * 1e3:.2f} | "
          f"{r['ggn_vp_s'] * 1e3:.2f} | {r['hvp_over_grad']:.2f} | "
          f"{r['ggn_vp_over_grad']:.2f} | {_mib(r['dense_bytes_analytic'])} | "
          f"{_mib(r['ggn_vp_bytes'].get('peak', float('nan')))} |")
  s, sl = result["loglog_slope"], result["loglog_slope_p_ge_1e5"]
  print("log-log slope of time vs P (all sizes / P >= 1e5): " + ", ".join(
      f"{k[:-2]} {s[k]:.2f} / {sl.get(k, float('nan')):.2f}" for k in s))
  print("log-log slope of (time / grad time) vs P: " + ", ".join(
      f"{k} {v:.2f}" for k, v in result["loglog_slope_ratio_to_grad"].items()))
  dense = [r for r in result["scaling"] if r.get("ggn_matrix_bytes")]
  for r in dense:
    print(f"mm.ggn_matrix at P={r['num_params']:,d}: compiler peak "
          f"{_mib(r['ggn_matrix_bytes']['peak'])} MiB vs analytic P^2 "
          f"{_mib(r['dense_bytes_analytic'])} MiB vs ggn_vp {_mib(r['ggn_vp_bytes']['peak'])} MiB")
  if "throughput" in result:
    tp = result["throughput"]
    print(f"throughput, global batch {tp['global_batch']}, P={tp['num_params']:,d} "
          "(examples/s):")
    print("| | " + " | ".join(tp["results"]) + " | ratio |")
    print("|---|" + "---:|" * (len(tp["results"]) + 1))
    for k in tp["speedup"]:
      vals = " | ".join(f"{tp['results'][d][k]:,.0f}" for d in tp["results"])
      print(f"| {k} | {vals} | {tp['speedup'][k]:.2f} |")


if __name__ == "__main__":
  main(ARGS)
