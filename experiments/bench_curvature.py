"""Speed of mlmap's curvature products and dense Hessian against hand-written JAX.

Everything is float32 and jit-compiled; each time is the median of ``--reps``
calls after warm-up, with the methods interleaved round-robin (so a load spike
on a shared machine hits all of them alike), and reported as a ratio to the
gradient measured in the same process: wall-clock time, and the process's CPU
time (all threads), which is less sensitive to other load on a shared machine.

Products (``mm.hvp``, ``mm.ggn_vp``, ``mm.fisher_vp``, ``mm.empirical_fisher_vp``)
are compared with the same math written inline: ``jvp`` of ``grad``; ``jvp`` of
the model, the closed-form softmax Hessian, ``vjp``; and, for the empirical
Fisher, both the inline ``jvp``/``vjp`` form and the naive ``vmap`` of
per-example gradients. Workloads: an MLP 784-512-512-10 (tanh, batch 512) and a
small CNN (two 3x3 convolutions, batch 256), both categorical with a Gaussian
prior and ``num_data=60000``.

Dense: ``mm.hessian_matrix`` vs ``jax.hessian`` and a plain ``vmap`` of all
``P`` HVPs, MLP 20-64-64-1 (tanh, batch 1024, Gaussian, 5569 parameters); each
method runs in its own subprocess so its peak resident memory (``VmHWM``;
on GPU the device's ``peak_bytes_in_use``) is its own.

  python experiments/bench_curvature.py [--quick] [--device gpu] [--out results/]
      [--xla-flags='--xla_cpu_experimental_ynn_fusion_type=' --tag _noynn]

On jaxlib 0.10 for CPU, XLA fuses chains of matrix products (a whole forward
pass) into one YNNPACK library fusion that runs several times slower than the
separate products; it hits the loss and the forward-mode (``jvp``) passes, of
mlmap and of the hand-written code alike. ``--xla-flags`` reruns with those
fusions off, so both configurations can be reported.
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
from pathlib import Path

import numpy as np


def _setup_jax(device):
  if device == "gpu":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  if device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  return jax


# --- workloads ---------------------------------------------------------------------

def _mlp(jax, sizes, key):
  jnp = jax.numpy
  keys = jax.random.split(key, len(sizes) - 1)
  params = {f"l{i}": {"w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
                      "b": jnp.zeros((n,), jnp.float32)}
            for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

  def apply(p, x):
    for i in range(len(sizes) - 1):
      x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
      if i < len(sizes) - 2:
        x = jnp.tanh(x)
    return x
  return params, apply


def _cnn(jax, key):
  jnp, lax = jax.numpy, jax.lax
  k = jax.random.split(key, 3)
  params = {"c1": jax.random.normal(k[0], (3, 3, 1, 16), jnp.float32) / 3.0,
            "c2": jax.random.normal(k[1], (3, 3, 16, 32), jnp.float32) / 12.0,
            "d": jax.random.normal(k[2], (7 * 7 * 32, 10), jnp.float32) / 40.0,
            "b": jnp.zeros((10,), jnp.float32)}
  dims = ("NHWC", "HWIO", "NHWC")

  def apply(p, x):
    h = jnp.tanh(lax.conv_general_dilated(x, p["c1"], (2, 2), "SAME",
                                          dimension_numbers=dims))
    h = jnp.tanh(lax.conv_general_dilated(h, p["c2"], (2, 2), "SAME",
                                          dimension_numbers=dims))
    return h.reshape(h.shape[0], -1) @ p["d"] + p["b"]
  return params, apply


def _workload(jax, name):
  import mlmap as mm
  jnp = jax.numpy
  key = jax.random.PRNGKey(0)
  if name == "mlp":
    params, apply = _mlp(jax, (784, 512, 512, 10), key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (512, 784), jnp.float32)
  else:
    params, apply = _cnn(jax, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (256, 28, 28, 1), jnp.float32)
  y = jax.random.randint(jax.random.fold_in(key, 2), (x.shape[0],), 0, 10)
  prior_sigma = 1.0
  nlp = mm.negative_log_posterior(
      apply, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=prior_sigma), num_data=60000)
  v = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape, p.dtype), params)
  return nlp, params, v, x, y, prior_sigma


def _product_methods(jax, nlp, prior_sigma):
  """``name -> f(params, v, x, y)``: mlmap's products and the hand-written ones."""
  import mlmap as mm
  jnp, tm = jax.numpy, jax.tree_util.tree_map
  apply = nlp.apply_fn

  def loss(p, x, y):  # the same objective, written out
    logp = jax.nn.log_softmax(apply(p, x))
    nll = -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))
    sq = sum(jnp.sum(w * w) for w in jax.tree_util.tree_leaves(p))
    return (60000 / x.shape[0]) * nll + 0.5 * sq / prior_sigma**2

  def hand_hvp(p, v, x, y):
    return jax.jvp(lambda q: jax.grad(loss)(q, x, y), (p,), (v,))[1]

  def hand_ggn(p, v, x, y):
    z, vjp = jax.vjp(lambda q: apply(q, x), p)
    _, jv = jax.jvp(lambda q: apply(q, x), (p,), (v,))
    prob = jax.nn.softmax(z)
    u = prob * jv - prob * jnp.sum(prob * jv, axis=1, keepdims=True)
    (g,) = vjp(u)
    return tm(lambda a, b: (60000 / x.shape[0]) * a + b / prior_sigma**2, g, v)

  def hand_emp(p, v, x, y):
    z, vjp = jax.vjp(lambda q: apply(q, x), p)
    _, jv = jax.jvp(lambda q: apply(q, x), (p,), (v,))
    r = jax.nn.softmax(z) - jax.nn.one_hot(y, z.shape[1], dtype=z.dtype)
    (g,) = vjp(jnp.sum(r * jv, axis=1, keepdims=True) * r)
    return tm(lambda a, b: (60000 / x.shape[0]) * a + b / prior_sigma**2, g, v)

  def naive_emp(p, v, x, y):
    def example_loss(q, xi, yi):
      return -jax.nn.log_softmax(apply(q, xi[None])[0])[yi]
    grads = jax.vmap(jax.grad(example_loss), (None, 0, 0))(p, x, y)  # B x P in memory
    flat_v = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(v)])
    flat_g = jnp.concatenate([a.reshape(a.shape[0], -1)
                              for a in jax.tree_util.tree_leaves(grads)], axis=1)
    s = flat_g @ flat_v
    return tm(lambda g, b: (60000 / x.shape[0]) * jnp.tensordot(s, g, 1)
              + b / prior_sigma**2, grads, v)

  return {
      "loss": lambda p, v, x, y: nlp(p, x, y),
      "grad": lambda p, v, x, y: jax.grad(nlp)(p, x, y),
      "mm.hvp": lambda p, v, x, y: mm.hvp(nlp, p, v, x, y),
      "hand hvp (jvp of grad)": hand_hvp,
      "mm.ggn_vp": lambda p, v, x, y: mm.ggn_vp(nlp, p, v, x, y),
      "hand ggn (jvp, H_z, vjp)": hand_ggn,
      "mm.fisher_vp": lambda p, v, x, y: mm.fisher_vp(nlp, p, v, x, y),
      "mm.empirical_fisher_vp": lambda p, v, x, y: mm.empirical_fisher_vp(nlp, p, v, x, y),
      "hand empirical (jvp, vjp)": hand_emp,
      "naive empirical (vmap per-example grads)": naive_emp,
  }


def _check_agreement(jax, methods, args):
  """The hand-written and mlmap products must compute the same thing."""
  from jax.flatten_util import ravel_pytree
  pairs = [("mm.hvp", "hand hvp (jvp of grad)"), ("mm.ggn_vp", "hand ggn (jvp, H_z, vjp)"),
           ("mm.fisher_vp", "hand ggn (jvp, H_z, vjp)"),
           ("mm.empirical_fisher_vp", "hand empirical (jvp, vjp)"),
           ("mm.empirical_fisher_vp", "naive empirical (vmap per-example grads)")]
  errors = {}
  for a, b in pairs:
    ra, rb = (ravel_pytree(methods[m](*args))[0] for m in (a, b))
    errors[f"{a} vs {b}"] = float(np.linalg.norm(ra - rb) / np.linalg.norm(rb))
  return errors


NAIVE_REPS = 5


def bench_products(jax, name, reps, diagonal=False):
  import mlmap as mm
  nlp, params, v, x, y, prior_sigma = _workload(jax, name)
  methods = {k: jax.jit(f) for k, f in _product_methods(jax, nlp, prior_sigma).items()}
  args = (params, v, x, y)
  for f in methods.values():  # compile and warm up
    for _ in range(2):
      jax.block_until_ready(f(*args))
  times = {k: [] for k in methods}
  cpu = {k: [] for k in methods}  # CPU seconds of all threads: less load-sensitive
  try:
    from tqdm import tqdm
  except ImportError:
    tqdm = lambda it, **kw: it  # noqa: E731
  for rep in tqdm(range(reps), desc=f"products/{name}", leave=False):
    for k, f in methods.items():
      if k.startswith("naive") and rep >= NAIVE_REPS:  # ~100x a gradient; 5 suffice
        continue
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  if diagonal:  # exact GGN diagonal: B * O single-example backward passes
    f = jax.jit(lambda p, x, y: mm.ggn_diagonal(nlp, p, x, y))
    jax.block_until_ready(f(params, x, y))
    times["mm.ggn_diagonal"], cpu["mm.ggn_diagonal"] = [], []
    for _ in range(3):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(params, x, y))
      times["mm.ggn_diagonal"].append(time.perf_counter() - t0)
      cpu["mm.ggn_diagonal"].append(time.process_time() - c0)
  median = {k: float(np.median(t)) for k, t in times.items()}
  cpu_median = {k: float(np.median(t)) for k, t in cpu.items()}
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  return {"workload": name, "num_params": int(num_params), "batch": int(x.shape[0]),
          "reps": {k: len(t) for k, t in times.items()}, "median_s": median,
          "min_s": {k: float(np.min(t)) for k, t in times.items()},
          "ratio_to_grad": {k: t / median["grad"] for k, t in median.items()},
          "cpu_median_s": cpu_median,
          "cpu_ratio_to_grad": {k: t / cpu_median["grad"] for k, t in cpu_median.items()},
          "relative_error": _check_agreement(jax, methods, args)}


# --- dense Hessian, one subprocess per method ----------------------------------------

def _peak_rss_bytes():
  """This process's peak resident memory. ``VmHWM`` belongs to the process's own
  address space; ``ru_maxrss`` would include the parent's peak before ``exec``."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dense_child(method, reps, device):
  jax = _setup_jax(device)
  import mlmap as mm
  from jax.flatten_util import ravel_pytree
  jnp = jax.numpy
  key = jax.random.PRNGKey(0)
  params, apply = _mlp(jax, (20, 64, 64, 1), key)
  x = jax.random.normal(jax.random.fold_in(key, 1), (1024, 20), jnp.float32)
  y = jax.random.normal(jax.random.fold_in(key, 2), (1024, 1), jnp.float32)
  nlp = mm.negative_log_posterior(apply, mm.gaussian_log_likelihood, mm.gaussian_log_prior)
  flat, unravel = ravel_pytree(params)

  def objective(w):
    return nlp(unravel(w), x, y)
  if method == "mm.hessian_matrix":
    fn = jax.jit(lambda p: mm.hessian_matrix(nlp, p, x, y))
    arg = params
  elif method == "jax.hessian":
    fn, arg = jax.jit(jax.hessian(objective)), flat
  else:  # a plain vmap of all P Hessian-vector products at once
    def all_hvps(w):
      return jax.vmap(lambda e: jax.jvp(jax.grad(objective), (w,), (e,))[1])(
          jnp.eye(w.size, dtype=w.dtype))
    fn, arg = jax.jit(all_hvps), flat
  rss0 = _peak_rss_bytes()
  out = jax.block_until_ready(fn(arg))  # compile + first run
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - t0)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  result = {"method": method, "num_params": int(flat.size), "shape": list(out.shape),
            "median_s": float(np.median(times)), "reps": reps,
            "peak_rss_bytes": _peak_rss_bytes(),
            "rss_before_bytes": rss0,
            "device_peak_bytes": (stats or {}).get("peak_bytes_in_use"),
            "checksum": float(jnp.sum(out)), "result_bytes": int(out.nbytes)}
  print("RESULT " + json.dumps(result))


def bench_dense(reps, device):
  results = []
  for method in ("mm.hessian_matrix", "jax.hessian", "vmap of all HVPs"):
    cmd = [sys.executable, __file__, "--dense-child", method, "--reps", str(reps),
           "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
      results.append({"method": method, "error": (proc.stderr or "")[-500:],
                      "returncode": proc.returncode})
    else:
      results.append(json.loads(line[0][7:]))
  return results


# --- report ----------------------------------------------------------------------------

def _machine():
  info = {"platform": platform.platform(), "python": platform.python_version()}
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info["lscpu"] = [l for l in lscpu.splitlines()
                     if l.split(":")[0] in ("Architecture", "CPU(s)", "Model name",
                                            "Thread(s) per core", "Core(s) per socket")]
  except OSError:
    pass
  info["loadavg_start"] = os.getloadavg()
  return info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--quick", action="store_true", help="fewer repetitions")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--out", default="results/")
  parser.add_argument("--skip-dense", action="store_true")
  parser.add_argument("--workloads", default="mlp,cnn")
  parser.add_argument("--xla-flags", default=None,
                      help="set XLA_FLAGS (before jax loads), e.g. "
                           "'--xla_cpu_experimental_ynn_fusion_type=' to turn off "
                           "XLA:CPU's YNNPACK library fusions")
  parser.add_argument("--diagonal", action="store_true",
                      help="also time mm.ggn_diagonal (median of 3; slow)")
  parser.add_argument("--tag", default="", help="suffix of the JSON file name")
  parser.add_argument("--dense-child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags  # inherited by the dense subprocesses
  if args.dense_child:
    return _dense_child(args.dense_child, args.reps, args.device)

  jax = _setup_jax(args.device)
  import mlmap as mm
  reps = args.reps or (5 if args.quick else 20)
  dense_reps = 2 if args.quick else 5
  report = {"machine": _machine(), "device": str(jax.devices()[0]),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "mlmap": mm.__version__, "products": []}
  for name in [w for w in args.workloads.split(",") if w]:
    res = bench_products(jax, name, reps, args.diagonal)
    report["products"].append(res)
    print(f"\n{name}: P={res['num_params']}, batch {res['batch']}, median of "
          f"{reps}, device {report['device']}, XLA_FLAGS={report['xla_flags']!r}")
    print(f"  {'method':44s} {'ms':>9s} {'x grad':>8s} {'CPU ms':>9s} {'x grad':>8s}")
    for k, t in res["median_s"].items():
      print(f"  {k:44s} {1e3 * t:9.2f} {res['ratio_to_grad'][k]:8.2f} "
            f"{1e3 * res['cpu_median_s'][k]:9.2f} {res['cpu_ratio_to_grad'][k]:8.2f}")
    for k, e in res["relative_error"].items():
      print(f"  rel. error {k}: {e:.1e}")
  if not args.skip_dense:
    report["dense"] = bench_dense(dense_reps, args.device)
    print(f"\ndense Hessian, MLP 20-64-64-1, batch 1024 (median of {dense_reps})")
    for r in report["dense"]:
      if "error" in r:
        print(f"  {r['method']:24s} failed (rc {r['returncode']}): {r['error'][-200:]}")
        continue
      dev = r["device_peak_bytes"]
      print(f"  {r['method']:24s} {r['median_s']:8.2f} s  peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB"
            + (f"  device peak {dev / 2**30:.2f} GiB" if dev else "")
            + f"  (result {r['result_bytes'] / 2**20:.0f} MiB, P={r['num_params']}, "
            f"RSS before compiling {r['rss_before_bytes'] / 2**30:.2f} GiB)")
  report["machine"]["loadavg_end"] = os.getloadavg()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"bench_curvature_{args.device}{args.tag}.json"
  path.write_text(json.dumps(report, indent=1))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
