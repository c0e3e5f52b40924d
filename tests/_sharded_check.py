"""Sharded-vs-single-device checks, run by tests/test_sharding.py in a subprocess.

The subprocess sees ``NUM_DEVICES`` simulated CPU devices (set through XLA_FLAGS
before jax is imported) and float64, so the rest of the test suite keeps its one
device. Every check jit-compiles the same function twice: once on a batch held by
one device, once on the batch sharded over a ``("data",)`` mesh with replicated
parameters, and records the relative difference, whether the outputs come back
replicated, and any all-gather in the compiled sharded program that produces an
array with the global batch size (a gathered batch). Prints one JSON object.

Usage: python tests/_sharded_check.py [num_devices] [all]
  ("all" adds the slower checks of FULL_ONLY.)
"""

import os
import sys

NUM_DEVICES = 4
if __name__ == "__main__":  # imported by _multihost_check.py for its helpers only
  NUM_DEVICES = int(sys.argv[1]) if len(sys.argv) > 1 else NUM_DEVICES
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={NUM_DEVICES}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_ENABLE_X64"] = "1"

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import mlmap as mm  # noqa: E402

B, D, H, K = 24, 3, 5, 4     # B differs from every other dimension: see _batch_gathers
NUM_DATA = 120
DAMPING = 0.1


def mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def setup():
  k = jax.random.split(jax.random.PRNGKey(7), 6)
  params = {"w1": jax.random.normal(k[0], (D, H)), "b1": 0.1 * jax.random.normal(k[1], (H,)),
            "w2": jax.random.normal(k[2], (H, K)), "b2": jnp.zeros(K)}
  vector = jax.tree_util.tree_map(lambda p: jax.random.normal(k[3], p.shape), params)
  x = np.asarray(jax.random.normal(k[4], (B, D)))
  t = np.asarray(jax.random.randint(k[5], (B,), 0, K))
  nlp = mm.negative_log_posterior(
      mlp, mm.categorical_log_likelihood,
      functools.partial(mm.gaussian_log_prior, sigma=2.0), num_data=NUM_DATA)
  return nlp, params, vector, x, t


def rel_err(a, b) -> float:
  """max |a - b| / max |b| over all float leaves (exact for int/bool leaves).

  Non-finite entries must be equal (NaN matches NaN) and at the same places,
  else the error is ``inf``: a NaN must never hide in a ``max``.
  """
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
    return float("inf")
  num, den = 0.0, 0.0
  for u, v in zip(la, lb):
    u, v = np.asarray(u), np.asarray(v)
    if u.shape != v.shape:
      return float("inf")
    if u.dtype.kind in "biu":
      if not np.array_equal(u, v):
        return float("inf")
      continue
    fu, fv = np.isfinite(u), np.isfinite(v)
    if not (np.array_equal(fu, fv) and np.array_equal(u[~fu], v[~fv], equal_nan=True)):
      return float("inf")
    num = max(num, float(np.max(np.abs(u[fu] - v[fv]), initial=0.0)))
    den = max(den, float(np.max(np.abs(v[fv]), initial=0.0)))
  return num / max(den, 1e-300)


_ALLGATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")


def _batch_gathers(hlo: str):
  """All-gather instructions whose result has the global batch size as a dimension."""
  bad = []
  for line in hlo.splitlines():
    m = _ALLGATHER.search(line)
    if not m:
      continue
    dims = [int(d) for s in re.findall(r"\[([\d,]*)\]", m.group(1)) for d in s.split(",") if d]
    if B in dims:
      bad.append(line.strip()[:200])
  return bad


def _leaves_replicated(tree) -> bool:
  return all(getattr(leaf, "sharding", None) is None or leaf.sharding.is_fully_replicated
             for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array))


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree_util.tree_leaves(tree))))


def _moved(out, params):
  """Train steps: how far the parameters moved, and whether any step was skipped."""
  new, _, metrics = out
  return {"moved": _norm(jax.tree_util.tree_map(lambda a, b: a - b, new, params)),
          "skipped": bool(any(bool(m["skipped"]) for m in metrics))}


def _updated(out, params):
  """Optimizer updates: the size of the step (a zero step would compare trivially)."""
  return {"update_norm": _norm(out[0]), "moved": _norm(out[0]), "skipped": False}


def compare(fn, params, batch, sharded_params, sharded_batch, sanity=None):
  """Run ``fn(params, batch)`` jitted on one device and sharded; report the difference."""
  jitted = jax.jit(fn)
  ref = jax.block_until_ready(jitted(params, batch))
  compiled = jitted.lower(sharded_params, sharded_batch).compile()
  out = jax.block_until_ready(compiled(sharded_params, sharded_batch))
  hlo = compiled.as_text()
  return {
      "sanity": sanity(jax.device_get(ref), params) if sanity else None,
      "rel_err": rel_err(out, ref),
      "out_replicated": _leaves_replicated(out),
      "batch_allgathers": _batch_gathers(hlo),
      "num_allgathers": hlo.count("all-gather-start") or hlo.count("all-gather("),
      "num_allreduces": hlo.count("all-reduce-start") or hlo.count("all-reduce("),
  }


def opt_step(tx):
  """One ``tx.update`` from ``tx.init`` with the batch as extra argument."""
  def fn(nlp, params, batch):
    grads = jax.grad(nlp)(params, *batch)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, batch=batch)
    return updates, state
  return fn


def build_checks(nlp, vector):
  """name -> (required mlmap names, fn(params, batch))."""
  def ggn_mv(p, batch):
    return lambda u: jax.tree_util.tree_map(
        lambda a, b: a + DAMPING * b, mm.ggn_vp(nlp, p, u, *batch), u)

  def train(make_tx, steps=2):
    def fn(params, batch):
      tx = make_tx()
      step = mm.make_train_step(nlp, tx)
      state = tx.init(params)
      metrics = []
      for _ in range(steps):
        params, state, m = step(params, state, batch)
        metrics.append(m)
      return params, state, metrics
    return fn

  def with_sanity(entries):
    """Add the sanity function: train steps must move, updates must be nonzero."""
    out = {}
    for name, (needs, fn) in entries.items():
      sanity = (_moved if name.startswith("train_step") else
                _updated if name.endswith("_step") else None)
      out[name] = (needs, fn, sanity)
    return out

  def solve(p, batch):
    g = jax.grad(nlp)(p, *batch)
    x, info = mm.cg(ggn_mv(p, batch), g, maxiter=8, tol=1e-12)
    return x, info

  # Few CG iterations: after ~30 of them finite-precision CG amplifies the
  # last-bit differences of a reordered sum to ~1e-7 (seen with maxiter=100,
  # tol=1e-6 here: same iteration count, residuals 8.90e-5 vs 9.03e-5), which
  # is CG's rounding, not a sharding error.
  ng = lambda: mm.natural_gradient(nlp, learning_rate=0.5, damping=DAMPING, maxiter=8,
                                   adaptive=False)
  # Damping 10: with less, the first Hessian-free step on this (saturated,
  # random-init) problem is rejected, and a zero update would agree trivially.
  hf = lambda c: mm.hessian_free(nlp, curvature=c, damping=10.0, maxiter=6)
  return with_sanity({
      "loss_and_grad": ((), lambda p, b: jax.value_and_grad(nlp)(p, *b)),
      "hvp": (("hvp",), lambda p, b: mm.hvp(nlp, p, vector, *b)),
      "ggn_vp": (("ggn_vp",), lambda p, b: mm.ggn_vp(nlp, p, vector, *b)),
      "fisher_vp": (("fisher_vp",), lambda p, b: mm.fisher_vp(nlp, p, vector, *b)),
      "empirical_fisher_vp": (("empirical_fisher_vp",),
                              lambda p, b: mm.empirical_fisher_vp(nlp, p, vector, *b)),
      "hessian_matrix": (("hessian_matrix",), lambda p, b: mm.hessian_matrix(nlp, p, *b)),
      "ggn_matrix": (("ggn_matrix",), lambda p, b: mm.ggn_matrix(nlp, p, *b)),
      "fisher_matrix": (("fisher_matrix",), lambda p, b: mm.fisher_matrix(nlp, p, *b)),
      "empirical_fisher_matrix": (("empirical_fisher_matrix",),
                                  lambda p, b: mm.empirical_fisher_matrix(nlp, p, *b)),
      "cg_ggn_solve": (("cg", "ggn_vp"), solve),
      "natural_gradient_step": (("natural_gradient",),
                                lambda p, b: opt_step(ng())(nlp, p, b)),
      "hessian_free_ggn_step": (("hessian_free",),
                                lambda p, b: opt_step(hf("ggn"))(nlp, p, b)),
      "hessian_free_hessian_step": (("hessian_free",),
                                    lambda p, b: opt_step(hf("hessian"))(nlp, p, b)),
      "newton_step": (("newton",),
                      lambda p, b: opt_step(mm.newton(nlp, damping=DAMPING))(nlp, p, b)),
      "nonlinear_cg_step": (("nonlinear_cg",),
                            lambda p, b: opt_step(mm.nonlinear_cg(nlp))(nlp, p, b)),
      "train_step_adam": (("make_train_step",), train(lambda: optax.adam(1e-2))),
      "train_step_hessian_free": (("make_train_step", "hessian_free"),
                                  train(lambda: hf("ggn"), steps=1)),
      "train_step_hessian_free_x2": (("make_train_step", "hessian_free"),
                                      train(lambda: hf("ggn"), steps=2)),
      "train_step_natural_gradient": (("make_train_step", "natural_gradient"),
                                      train(ng)),
      "log_evidence": (("log_evidence",), lambda p, b: mm.log_evidence(nlp, p, *b)),
      "ggn_vp_fn": (("ggn_vp_fn",), lambda p, b: mm.ggn_vp_fn(nlp, p, *b)(vector)),
      "mc_fisher_vp": (("mc_fisher_vp",), lambda p, b: mm.mc_fisher_vp(
          nlp, p, vector, *b, jax.random.PRNGKey(3), num_samples=2)),
      "ggn_diagonal": (("ggn_diagonal",), lambda p, b: mm.ggn_diagonal(nlp, p, *b)),
      "hutchinson_trace_ggn": (("hutchinson_trace", "ggn_vp_fn"), lambda p, b: tuple(
          mm.hutchinson_trace(mm.ggn_vp_fn(nlp, p, *b), p, jax.random.PRNGKey(4), 8))),
  })


# Run only with "all" (the slow pytest test): further contract functions and
# optimizers; each jit-compiles a larger program twice.
FULL_ONLY = ("hessian_free_ggn_step", "train_step_hessian_free_x2", "hessian_matrix",
             "fisher_matrix", "empirical_fisher_matrix", "hessian_free_hessian_step",
             "newton_step", "nonlinear_cg_step", "train_step_adam",
             "train_step_natural_gradient", "log_evidence", "ggn_vp_fn", "mc_fisher_vp",
             "ggn_diagonal", "hutchinson_trace_ggn")


def fit_check(nlp, params, x, t, mesh):
  """``mm.fit`` fed sharded batches by a ``data(epoch)`` callable vs plain batches."""
  def run(params, put):
    tx = optax.adam(1e-2)
    step = mm.make_train_step(nlp, tx)
    data = lambda epoch: (put((x[i:i + 8], t[i:i + 8])) for i in range(0, B, 8))
    res = mm.fit(step, params, tx.init(params), data, epochs=2, progress=False)
    return res.params, res.history["loss"]
  ref = run(params, lambda b: b)
  out = run(mm.replicate(params, mesh), lambda b: mm.shard_batch(b, mesh))
  moved = _norm(jax.tree_util.tree_map(lambda a, b: a - b, ref[0], params))
  return {"rel_err": rel_err(out, ref), "out_replicated": _leaves_replicated(out[0]),
          "batch_allgathers": [], "sanity": {"moved": moved, "skipped": False}}


def placement_checks(x, t):
  """Where ``shard_batch`` puts the data, and its bad-input errors."""
  mesh = mm.make_mesh(NUM_DEVICES)
  xs, ts = mm.shard_batch((x, t), mesh)
  xl, tl = mm.shard_batch((x, t), mesh, process_local=True)
  two = jax.make_mesh((2, NUM_DEVICES // 2), ("data", "model"),
                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
  xm = mm.shard_batch(x, two, axis=("data", "model"))
  res = {
      "x_spec": [a if a is None or isinstance(a, str) else list(a) for a in xs.sharding.spec],
      "x_num_devices": len(xs.sharding.device_set),
      "x_shard_shapes": sorted({tuple(s.data.shape) for s in xs.addressable_shards}),
      "t_shard_shapes": sorted({tuple(s.data.shape) for s in ts.addressable_shards}),
      "x_values_equal": bool(np.array_equal(np.asarray(xs), x)),
      "process_local_equal": bool(np.array_equal(np.asarray(xl), x)
                                  and np.array_equal(np.asarray(tl), t)
                                  and xl.sharding == xs.sharding),
      "two_axis_shard_shapes": sorted({tuple(s.data.shape) for s in xm.addressable_shards}),
      "two_axis_on_data_only": sorted({tuple(s.data.shape) for s in
                                       mm.shard_batch(x, two).addressable_shards}),
      "errors": {},
  }
  bad = {
      "indivisible": lambda: mm.shard_batch((x[:B - 2], t[:B - 2]), mesh),
      "indivisible_two_axes": lambda: mm.shard_batch(x[:B - 2], two, axis=("data", "model")),
      "unknown_axis": lambda: mm.shard_batch((x, t), mesh, axis="batch"),
      "scalar_leaf": lambda: mm.shard_batch((x, np.float64(1.0)), mesh),
      "too_many_devices": lambda: mm.make_mesh(NUM_DEVICES + 1),
  }
  for name, thunk in bad.items():
    try:
      thunk()
      res["errors"][name] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on type and text
      res["errors"][name] = f"{type(e).__name__}: {e}"
  return res


def main():
  t0 = time.perf_counter()
  nlp, params, vector, x, t = setup()
  mesh = mm.make_mesh(NUM_DEVICES)
  batch = (jnp.asarray(x), jnp.asarray(t))
  sharded_batch = mm.shard_batch((x, t), mesh)
  sharded_params = mm.replicate(params, mesh)
  report = {"num_devices": jax.device_count(), "x64": bool(jax.config.jax_enable_x64),
            "placement": placement_checks(x, t), "checks": {}, "missing": {}, "failed": {}}
  full = "all" in sys.argv[2:]
  for name, (needs, fn, sanity) in build_checks(nlp, vector).items():
    if name in FULL_ONLY and not full:
      continue
    absent = [n for n in needs if not hasattr(mm, n)]
    if absent:
      report["missing"][name] = absent
      continue
    try:
      t1 = time.perf_counter()
      report["checks"][name] = compare(fn, params, batch, sharded_params, sharded_batch,
                                       sanity)
      report["checks"][name]["seconds"] = time.perf_counter() - t1
    except Exception:  # noqa: BLE001 - reported to the pytest side
      report["failed"][name] = traceback.format_exc()[-1500:]
  if full and hasattr(mm, "fit"):
    report["checks"]["fit_sharded_batches"] = fit_check(nlp, params, x, t, mesh)
  # The detector itself must fire on a program that has to gather the batch.
  report["detector_sanity"] = compare(lambda p, b: jnp.sort(b[0], axis=0), params, batch,
                                      sharded_params, sharded_batch)
  report["seconds"] = time.perf_counter() - t0
  print(json.dumps(report))


if __name__ == "__main__":
  main()
