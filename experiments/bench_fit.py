"""Steps per second of ``mm.fit`` against a hand-written loop of the same jitted step.

A float32 digits MLP (64-256-256-10, Adam, minibatches of 128; 11 batches per
epoch). The baseline is the loop a researcher writes by hand::

    for batch in batches:
        params, opt_state, metrics = step(params, opt_state, batch)

over the same precomputed device batches, blocked once at the end. ``mm.fit``
gets the same batches (``data`` a callable returning that list) and the same
compiled step, with the default ``log_every`` (metrics fetched every 25 steps),
with ``log_every=1`` (a host fetch per step, what ``fit`` did before), and with
``(inputs, targets)`` arrays and ``batch_size`` (``fit`` slices the batches
itself). Each variant runs ``--epochs`` epochs after a warm-up; the medians of
``--repeats`` interleaved runs are reported as ratios to the hand loop.

  python experiments/bench_fit.py [--epochs 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import mlmap as mm


def _mlp(params, x):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def setup(batch_size=128):
  xd, yd = load_digits(return_X_y=True)
  x, y = jnp.asarray(xd / 16.0, jnp.float32), jnp.asarray(yd, jnp.int32)
  sizes = (64, 256, 256, 10)
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  params = [{"w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
             "b": jnp.zeros((n,), jnp.float32)} for k, m, n in zip(keys, sizes[:-1], sizes[1:])]
  nlp = mm.negative_log_posterior(_mlp, mm.categorical_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=1.0),
                                  num_data=x.shape[0])
  tx = optax.adam(1e-3)
  step = mm.make_train_step(nlp, tx)
  n = x.shape[0] // batch_size * batch_size
  batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
  return step, params, tx, batches, (x, y), batch_size


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  step, params, tx, batches, data, batch_size = setup()
  state0 = tx.init(params)
  jax.block_until_ready(step(params, state0, batches[0]))  # compile

  def hand():
    p, s = params, state0
    for _ in range(args.epochs):
      for b in batches:
        p, s, m = step(p, s, b)
    jax.block_until_ready((p, m))

  def fit(**kw):
    def run():
      r = mm.fit(step, params, state0, lambda epoch: batches, epochs=args.epochs,
                 progress=False, **kw)
      jax.block_until_ready(r.params)
    return run

  variants = {"hand-written loop": hand,
              "mm.fit (log_every=25)": fit(),
              "mm.fit (log_every=1)": fit(log_every=1)}

  def fit_arrays():
    r = mm.fit(step, params, state0, data, epochs=args.epochs, batch_size=batch_size,
               progress=False)
    jax.block_until_ready(r.params)
  variants["mm.fit (arrays, batch_size=128)"] = fit_arrays
  for f in variants.values():
    f()  # warm-up
  times = {k: [] for k in variants}
  for _ in range(args.repeats):  # interleaved
    for k, f in variants.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  steps = args.epochs * len(batches)
  base = np.median(times["hand-written loop"])
  print(f"{steps} steps per run, {jax.default_backend()}, jax {jax.__version__}")
  print("| loop | steps/s (median) | ratio to the hand loop |\n|---|---|---|")
  for k, ts in times.items():
    t = np.median(ts)
    print(f"| {k} | {steps / t:.0f} | {base / t:.3f} |")


if __name__ == "__main__":
  main()
