"""Tests of the jitted train step (non-finite guard, no retracing) and of fit
(history, evaluation, atomic checkpoints, bit-for-bit resume)."""

import functools
import os

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import mlmap as mm


def _problem():
  """A tiny tanh MLP classifier on synthetic data (fixed key)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(k1, (64, 3))
  y = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)
  params = {"w1": 0.5 * jax.random.normal(k2, (3, 8)), "b1": jnp.zeros(8),
            "w2": 0.5 * jax.random.normal(k3, (8, 2)), "b2": jnp.zeros(2)}

  def apply_fn(p, inputs):
    return jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  nlp = mm.negative_log_posterior(apply_fn, mm.categorical_log_likelihood,
                                  functools.partial(mm.gaussian_log_prior, sigma=3.0),
                                  num_data=64)
  return nlp, params, (x, y)


def _equal_trees(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)
                  for u, v in zip(la, lb)))


def test_step_matches_manual_optax_update():
  nlp, params, batch = _problem()
  tx = optax.adam(1e-2)
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  new_params, new_state, metrics = step(params, state, batch)

  @jax.jit
  def reference(params, state):
    loss, grads = jax.value_and_grad(nlp)(params, *batch)
    updates, ref_state = tx.update(grads, state, params)
    return loss, grads, optax.apply_updates(params, updates), ref_state

  loss, grads, ref, ref_state = reference(params, state)
  chex.assert_trees_all_close(new_params, ref, rtol=1e-12)
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-12)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-12)
  np.testing.assert_allclose(metrics["grad_norm"],
                             np.sqrt(sum(np.sum(np.asarray(g) ** 2)
                                         for g in jax.tree.leaves(grads))), rtol=1e-12)
  assert not bool(metrics["skipped"])


@pytest.mark.parametrize("make_tx", [
    lambda nlp: optax.adam(1e-2),
    lambda nlp: mm.hessian_free(nlp, maxiter=10),
    lambda nlp: optax.chain(optax.clip_by_global_norm(10.0), mm.natural_gradient(nlp)),
])
def test_step_does_not_retrace(make_tx):
  chex.clear_trace_counter()
  nlp, params, batch = _problem()
  tx = make_tx(nlp)
  raw = mm.make_train_step(nlp, tx, jit=False)
  step = jax.jit(chex.assert_max_traces(raw, n=1))
  state = tx.init(params)
  losses = []
  for _ in range(6):
    params, state, metrics = step(params, state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] <= losses[0]  # HF may reject its first steps on this problem
  assert step._cache_size() == 1


def test_second_order_optimizer_through_train_step_converges():
  nlp, params, batch = _problem()
  tx = mm.newton(nlp)
  step = mm.make_train_step(nlp, tx)
  state = tx.init(params)
  for _ in range(25):
    params, state, metrics = step(params, state, batch)
    assert not bool(metrics["skipped"])
  assert step._cache_size() == 1  # the default jitted step compiled once
  assert float(optax.tree.norm(jax.grad(nlp)(params, *batch))) < 1e-6


@pytest.mark.parametrize("make_tx", [lambda nlp: optax.adam(1e-2),
                                     lambda nlp: mm.newton(nlp)])
def test_non_finite_batch_is_skipped_and_state_unchanged(make_tx):
  nlp, params, (x, y) = _problem()
  tx = make_tx(nlp)
  step = mm.make_train_step(nlp, tx)
  params, state, _ = step(params, tx.init(params), (x, y))  # a non-trivial state
  for bad_x in [x.at[5, 1].set(jnp.nan), x.at[0, 0].set(jnp.inf)]:
    new_params, new_state, metrics = step(params, state, (bad_x, y))
    assert bool(metrics["skipped"])
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(
        float(metrics["grad_norm"]))
    assert _equal_trees(new_params, params) and _equal_trees(new_state, state)
  _, _, metrics = step(params, state, (x, y))
  assert not bool(metrics["skipped"])


def test_non_finite_update_is_skipped():
  nlp, params, batch = _problem()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * jnp.inf, updates), state + 1

  tx = optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)
  step = mm.make_train_step(nlp, tx)
  new_params, new_state, metrics = step(params, tx.init(params), batch)
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["skipped"])
  assert _equal_trees(new_params, params) and int(new_state) == 0


def test_bad_arguments_raise():
  nlp, params, batch = _problem()
  with pytest.raises(TypeError, match="optax.GradientTransformation"):
    mm.make_train_step(nlp, "adam")
  with pytest.raises(TypeError, match="objective must be callable"):
    mm.make_train_step(3.0, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 64\].*got 65"):
    mm.fit(nlp, params, None, batch, tx=optax.sgd(0.1), batch_size=65, progress=False)
  with pytest.raises(ValueError, match="opt_state is None"):
    mm.fit(mm.make_train_step(nlp, optax.sgd(0.1)), params, None, batch, progress=False)


# --- fit ------------------------------------------------------------------------

def _fit_runner(make_tx):
  """One compiled step and eval shared by every run of a test (compile once)."""
  nlp, params, batch = _problem()
  tx = make_tx(nlp)
  step = mm.make_train_step(nlp, tx)
  eval_fn = jax.jit(lambda p: {"nlp": nlp(p, *batch)})

  def run(tmp, stop_at=None, seen=None):
    def callback(t, params, opt_state, metrics):
      if seen is not None:
        seen.append(t)
      if stop_at is not None and t == stop_at:
        raise mm.StopTraining

    return mm.fit(step, params, tx.init(params), batch, epochs=3, batch_size=16,
                  key=jax.random.PRNGKey(42), checkpoint_dir=tmp, checkpoint_every=3,
                  callback=callback, progress=False, eval_fn=eval_fn)
  return run


@pytest.mark.parametrize("make_tx", [
    lambda nlp: optax.adam(optax.exponential_decay(1e-2, 5, 0.5)),
    lambda nlp: mm.hessian_free(nlp, maxiter=5),
])
def test_fit_resume_is_bit_for_bit(tmp_path, make_tx):
  run = _fit_runner(make_tx)
  straight = run(str(tmp_path / "a"))
  assert straight.step == 12 and len(straight.history["loss"]) == 12
  assert [e for e, _ in straight.history["eval"]] == [4, 8, 12]
  # Interrupt at step 7 (last checkpoint at step 6), then resume.
  part = run(str(tmp_path / "b"), stop_at=7)
  assert part.step == 7
  ckpt = mm.load_checkpoint(os.path.join(str(tmp_path / "b"), "checkpoint.ckpt"))
  assert ckpt["step"] == 6 and np.array_equal(ckpt["key"], jax.random.PRNGKey(42))
  seen = []
  resumed = run(str(tmp_path / "b"), seen=seen)
  assert seen == list(range(7, 13))  # it really resumed from the step-6 checkpoint
  assert resumed.step == 12
  assert _equal_trees(resumed.params, straight.params)
  assert _equal_trees(resumed.opt_state, straight.opt_state)
  assert resumed.history["loss"] == straight.history["loss"]
  assert resumed.history["step"] == list(range(1, 13))
  assert not [f for f in os.listdir(str(tmp_path / "b")) if f.startswith(".tmp")]


def test_fit_shuffles_by_key_and_steps_match_manual_loop(tmp_path):
  nlp, params, (x, y) = _problem()
  tx = optax.sgd(0.05)
  key = jax.random.PRNGKey(3)
  result = mm.fit(nlp, params, None, (x, y), tx=tx, epochs=2, batch_size=32, key=key,
                  progress=False)
  step = mm.make_train_step(nlp, tx)
  p, s = params, tx.init(params)
  for epoch in range(2):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), 64))
    for i in range(2):
      idx = order[32 * i:32 * (i + 1)]
      p, s, _ = step(p, s, (x[idx], y[idx]))
  assert _equal_trees(result.params, p)
  assert result.history["epoch"] == [0, 0, 1, 1]


def test_checkpoint_roundtrip_keeps_dtypes_and_weak_types(tmp_path):
  tree = {"a": jnp.arange(3.0, dtype=jnp.float32), "w": jnp.asarray(2.0),
          "i": jnp.zeros((), jnp.int32)}
  assert tree["w"].weak_type
  path = str(tmp_path / "c.ckpt")
  mm.save_checkpoint(path, tree)
  back = mm.load_checkpoint(path, like=tree)
  assert back["a"].dtype == jnp.float32 and back["i"].dtype == jnp.int32
  assert back["w"].weak_type and float(back["w"]) == 2.0
  with pytest.raises(ValueError, match="differs from the expected tree"):
    mm.load_checkpoint(path, like={"a": tree["a"]})
