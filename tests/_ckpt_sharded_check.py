"""Sharded checkpoints on simulated devices, run by tests/test_training.py in a subprocess.

XLA_FLAGS must give the device count before jax is imported, so this runs in its
own process (the rest of the suite keeps one device). It saves a tree whose
leaves are sharded over a ``("data",)`` mesh, replicated, weak-typed and
integer, loads it back through ``like=`` with the same and with other shardings,
and runs ``mm.fit`` on sharded parameters interrupted and resumed. Prints one
JSON object (the last line of stdout).

Usage: python tests/_ckpt_sharded_check.py NUM_DEVICES DIRECTORY
"""

import os
import sys

NUM_DEVICES = int(sys.argv[1]) if len(sys.argv) > 1 else 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={NUM_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_ENABLE_X64"] = "1"

import functools  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import mlmap as mm  # noqa: E402


def _bits_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _leaf_report(back, ref):
  return {"bits_equal": _bits_equal(back, ref), "dtype": str(back.dtype),
          "weak_type": bool(back.weak_type), "same_sharding": back.sharding == ref.sharding,
          "num_devices": len(back.sharding.device_set),
          "shard_shapes": sorted({tuple(s.data.shape) for s in back.addressable_shards})}


def roundtrip(directory, mesh):
  """Save a sharded tree; restore it through like= with its own and other shardings."""
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  w = jnp.arange(8 * 3, dtype=jnp.float64).reshape(8, 3) / 7.0
  tree = {"w": jax.device_put(w, sharded),
          "b": jax.device_put(jnp.array([-0.0, 1.5, jnp.nan]), replicated),
          "s": jax.device_put(jnp.asarray(2.5), replicated),  # weak-typed scalar
          "i": jax.device_put(jnp.arange(8, dtype=jnp.int32), sharded)}
  path = os.path.join(directory, "sharded.ckpt")
  mm.save_checkpoint(path, tree)
  back = mm.load_checkpoint(path, like=tree)
  # The same values onto other placements: replicated <-> sharded.
  other = {"w": jax.device_put(jnp.zeros((8, 3)), replicated),
           "b": jax.device_put(jnp.zeros(3), replicated),
           "s": jax.device_put(jnp.asarray(0.0), replicated),
           "i": jax.device_put(jnp.zeros(8, jnp.int32), replicated)}
  moved = mm.load_checkpoint(path, like=other)
  plain = mm.load_checkpoint(path)
  return {"input_weak": bool(tree["s"].weak_type),
          "same": {k: _leaf_report(back[k], tree[k]) for k in tree},
          "moved": {k: {**_leaf_report(moved[k], other[k]),
                        "values_equal": _bits_equal(moved[k], tree[k])} for k in tree},
          "plain_is_numpy": all(isinstance(v, np.ndarray) for v in plain.values()),
          "plain_equal": all(_bits_equal(plain[k], tree[k]) for k in tree)}


def fit_resume(directory, mesh):
  """fit on sharded params and batches, killed after step 5 and resumed, vs straight."""
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x = np.asarray(jax.random.normal(k[0], (32, 4)))
  t = np.asarray(x @ np.arange(1.0, 5.0) + 0.1 * np.asarray(jax.random.normal(k[1], (32,))))
  # A sharded weight matrix (rows over the devices) and a replicated bias.
  params = {"w": jax.device_put(jax.random.normal(k[2], (4, 8)), sharded),
            "v": jax.device_put(jnp.ones(8) / 8, replicated)}
  model = lambda p, xb: jnp.tanh(xb @ p["w"]) @ p["v"]  # noqa: E731
  nlp = mm.negative_log_posterior(model, mm.gaussian_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=2.0),
                                  num_data=32)
  tx = optax.adam(optax.exponential_decay(1e-2, 3, 0.5))
  step = mm.make_train_step(nlp, tx)
  # Adam's moments follow the params' shardings; its step count goes on every device.
  opt_state = jax.tree.map(lambda a: a if a.ndim else jax.device_put(a, replicated),
                           tx.init(params))

  def data(epoch):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(k[0], epoch), 32))
    for i in range(4):
      idx = order[8 * i:8 * (i + 1)]
      yield mm.shard_batch((x[idx], t[idx]), mesh)

  def run(ckpt_dir, stop_at=None):
    def callback(step_count, *_):
      if step_count == stop_at:
        raise mm.StopTraining
    return mm.fit(step, params, opt_state, data, epochs=3, progress=False,
                  checkpoint_dir=ckpt_dir, checkpoint_every=2, callback=callback,
                  eval_fn=jax.jit(lambda p: nlp(p, x, t)))

  straight = run(os.path.join(directory, "a"))
  run(os.path.join(directory, "b"), stop_at=5)
  resumed = run(os.path.join(directory, "b"))
  leaves = zip(jax.tree.leaves((resumed.params, resumed.opt_state)),
               jax.tree.leaves((straight.params, straight.opt_state)))
  return {"steps": [straight.step, resumed.step],
          "state_bits_equal": all(_bits_equal(a, b) for a, b in leaves),
          "history_equal": repr(resumed.history) == repr(straight.history),
          "num_evals": len(straight.history["eval"]),
          "w_sharding_kept": resumed.params["w"].sharding == params["w"].sharding,
          "mu_sharding_kept": (resumed.opt_state[0].mu["w"].sharding
                               == opt_state[0].mu["w"].sharding),
          "moved": float(np.max(np.abs(np.asarray(straight.params["w"])
                                       - np.asarray(params["w"]))))}


def main():
  directory = sys.argv[2]
  mesh = mm.make_mesh(NUM_DEVICES)
  report = {"num_devices": jax.device_count(), "x64": bool(jax.config.jax_enable_x64),
            "roundtrip": roundtrip(directory, mesh), "fit": fit_resume(directory, mesh)}
  print(json.dumps(report))


if __name__ == "__main__":
  main()
