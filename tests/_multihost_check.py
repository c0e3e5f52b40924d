"""The multi-host recipe of docs/sharding.md, run as 2 processes x 2 CPU devices.

Started twice by tests/test_sharding.py (process ids 0 and 1). Each process
joins with ``jax.distributed.initialize`` (CPU collectives over gloo), loads only
its own half of the batch, builds the global batch with
``mm.shard_batch(..., process_local=True)``, and compares mlmap results on the
4-device global batch with the same computation on one local device holding the
whole batch. Prints one JSON object.

Usage: python tests/_multihost_check.py PROCESS_ID PORT
"""

import os
import sys

PROCESS_ID, PORT = int(sys.argv[1]), int(sys.argv[2])
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={LOCAL_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_ENABLE_X64"] = "1"

import json  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{PORT}", num_processes=NUM_PROCESSES,
                           process_id=PROCESS_ID, initialization_timeout=60)

import mlmap as mm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sharded_check import B, rel_err, setup  # noqa: E402


def main():
  nlp, params, vector, x, t = setup()
  mesh = mm.make_mesh()                               # all 4 devices of both processes
  per = B // NUM_PROCESSES
  mine = slice(PROCESS_ID * per, (PROCESS_ID + 1) * per)
  batch = mm.shard_batch((x[mine], t[mine]), mesh, process_local=True)
  rparams, rvector = mm.replicate(params, mesh), mm.replicate(vector, mesh)
  checks = {
      "loss_and_grad": lambda p, v, b: jax.value_and_grad(nlp)(p, *b),
      "ggn_vp": lambda p, v, b: mm.ggn_vp(nlp, p, v, *b),
  }
  if hasattr(mm, "make_train_step"):
    def train_step(p, v, b):
      tx = optax.adam(1e-2)
      p, state, metrics = mm.make_train_step(nlp, tx)(p, tx.init(p), b)
      return p, metrics
    checks["train_step_adam"] = train_step
  res = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
         "global_batch_shape": list(batch[0].shape),
         "local_rows": sorted({s.index[0].start or 0 for s in batch[0].addressable_shards}),
         "checks": {}}
  for name, fn in checks.items():
    f = jax.jit(fn)
    out = jax.device_get(f(rparams, rvector, batch))
    ref = jax.device_get(f(params, vector, (x, t)))   # one local device, whole batch
    res["checks"][name] = rel_err(out, ref)
  print(json.dumps(res), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
