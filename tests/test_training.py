"""Tests of the jitted train step (non-finite guard, no retracing, argument
checks), of fit (history, evaluation, atomic checkpoints, bit-for-bit resume after
a kill at any step) and of the checkpoint format (data only: corrupt, pickle,
newer and mismatched files refused; sharded arrays on 4 simulated devices)."""

import functools
import json
import os
import pathlib
import pickle
import socket
import struct
import subprocess
import sys

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


@pytest.mark.slow  # long; CI runs -m slow too
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


def _least_squares(seed=0):
  rng = np.random.default_rng(seed)
  x, t = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.normal(size=40))
  return (lambda w, x, t: 0.5 * jnp.sum((x @ w - t) ** 2)), x, t


def test_lbfgs_through_train_step_reaches_the_least_squares_solution():
  """optax.lbfgs needs value, grad and value_fn (its zoom line search): through
  make_train_step it solves a 5-parameter least squares to numpy's lstsq (1e-8)."""
  f, x, t = _least_squares()
  tx = optax.lbfgs()
  step, w = mm.make_train_step(f, tx), jnp.zeros(5)
  s = tx.init(w)
  for _ in range(15):
    w, s, m = step(w, s, (x, t))
    assert not bool(m["skipped"])
  np.testing.assert_allclose(w, np.linalg.lstsq(np.asarray(x), np.asarray(t))[0],
                             rtol=1e-8, atol=1e-10)


def test_sophia_and_reduce_on_plateau_get_obj_fn_and_value():
  """optax.contrib.sophia (obj_fn) and adam chained with reduce_on_plateau (value):
  make_train_step's steps equal a hand-written loop that passes them as optax
  documents (1e-10: the step's fused value_and_grad rounds differently from
  jax.grad); the plateau has cut the scale by the end (a test of value)."""
  f, x, t = _least_squares(1)
  for tx, kwargs in (
      (optax.contrib.sophia(0.05), lambda w: {"obj_fn": lambda p: f(p, x, t)}),
      (optax.chain(optax.sgd(0.02), optax.contrib.reduce_on_plateau(
          patience=2, cooldown=0, factor=0.5, rtol=0.5, accumulation_size=1)),
       lambda w: {"value": f(w, x, t)})):
    step = mm.make_train_step(f, tx)
    w = w_ref = jnp.zeros(5)
    s = s_ref = tx.init(w)
    ref_update = jax.jit(lambda g, s, w: tx.update(g, s, w, **kwargs(w)))
    for _ in range(12):
      w, s, _ = step(w, s, (x, t))
      u, s_ref = ref_update(jax.grad(f)(w_ref, x, t), s_ref, w_ref)
      w_ref = optax.apply_updates(w_ref, u)
      np.testing.assert_allclose(w, w_ref, rtol=1e-10, atol=1e-15)
  assert float(s[1].scale) < 1.0, s[1]


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
  assert os.listdir(str(tmp_path / "b")) == ["checkpoint.ckpt"]  # no temp file left


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


# --- make_train_step checks --------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_non_scalar_objective_names_its_shape(jit):
  nlp, params, batch = _problem()
  per_example = lambda p, x, t: jnp.sum(x @ p["w1"], axis=1)  # noqa: E731  shape (64,)
  tx = optax.sgd(0.1)
  step = mm.make_train_step(per_example, tx, jit=jit)
  with pytest.raises(ValueError, match=r"objective must return a scalar.*shape \(64,\)"):
    step(params, tx.init(params), batch)
  with pytest.raises(ValueError, match=r"must return a scalar.*shape \(64,\)"):
    mm.fit(per_example, params, None, batch, tx=tx, progress=False)
  integer = lambda p, x, t: jnp.sum(t)  # noqa: E731
  with pytest.raises(TypeError, match="floating scalar, got dtype int"):
    mm.make_train_step(integer, tx, jit=jit)(params, tx.init(params), batch)


@pytest.mark.parametrize("jit", [False, True])
def test_non_floating_param_leaf_is_named(jit):
  nlp, params, batch = _problem()
  params = dict(params, step=jnp.array(1000))
  objective = lambda p, x, t: nlp({k: v for k, v in p.items() if k != "step"}, x, t)  # noqa: E731
  tx = optax.sgd(0.1)
  step = mm.make_train_step(objective, tx, jit=jit)
  with pytest.raises(TypeError, match=r"non-floating leaves: 'step' \(int"):
    step(params, tx.init(params), batch)


def test_fit_data_leaves_must_share_the_example_axis():
  nlp, params, (x, y) = _problem()
  with pytest.raises(ValueError, match=r"leading \(example\) size: '0': 64, '1': 60"):
    mm.fit(nlp, params, None, (x, y[:60]), tx=optax.sgd(0.1), progress=False)
  with pytest.raises(ValueError, match=r"data leaf '1' is a scalar"):
    mm.fit(nlp, params, None, (x, 1.0), tx=optax.sgd(0.1), progress=False)


# --- fit resume: a kill after every step -----------------------------------------------

def _kill_runner():
  """4 epochs x 3 steps, evaluation at each epoch's end, a checkpoint after every step."""
  nlp, params, batch = _problem()
  tx = optax.adam(optax.exponential_decay(1e-2, 4, 0.5))  # an int count in the state
  step = mm.make_train_step(nlp, tx)
  eval_fn = jax.jit(lambda p: {"nlp": nlp(p, *batch)})

  def run(directory, kill_after=None):
    def callback(t, *_):
      if t == kill_after:  # the checkpoint of step t is on disk: a kill right after it
        raise mm.StopTraining
    return mm.fit(step, params, tx.init(params), batch, epochs=4, batch_size=21,
                  key=jax.random.PRNGKey(5), checkpoint_dir=directory, checkpoint_every=1,
                  eval_fn=eval_fn, callback=callback, progress=False)
  return run


def _same_history(a, b):
  """Same keys, the same per-step lists (values and Python types), the same evals."""
  per_step = [k for k in b if k != "eval"]
  return (set(a) == set(b)
          and all(repr(a[k]) == repr(b[k]) and a[k] == b[k] for k in per_step)
          and [t for t, _ in a["eval"]] == [t for t, _ in b["eval"]]
          and _equal_trees([v for _, v in a["eval"]], [v for _, v in b["eval"]]))


def test_fit_resume_after_a_kill_at_every_step_is_bit_for_bit(tmp_path):
  run = _kill_runner()
  straight = run(str(tmp_path / "straight"))
  assert straight.step == 12 and [t for t, _ in straight.history["eval"]] == [3, 6, 9, 12]
  for k in range(1, 12):
    directory = str(tmp_path / f"kill{k}")
    killed = run(directory, kill_after=k)
    assert killed.step == k
    resumed = run(directory)
    assert resumed.history["step"] == list(range(1, 13)), k
    assert _equal_trees(resumed.params, straight.params), k
    assert _equal_trees(resumed.opt_state, straight.opt_state), k
    assert _same_history(resumed.history, straight.history), (k, resumed.history["eval"])


def test_epoch_end_checkpoint_holds_that_epochs_evaluation(tmp_path):
  # The default checkpoint (at each epoch's end) is written after the evaluation.
  nlp, params, batch = _problem()
  result = mm.fit(nlp, params, None, batch, tx=optax.sgd(0.05), epochs=2, batch_size=32,
                  eval_fn=lambda p: nlp(p, *batch), checkpoint_dir=str(tmp_path),
                  progress=False)
  ckpt = mm.load_checkpoint(str(tmp_path / "checkpoint.ckpt"))
  assert ckpt["step"] == 4 and ckpt["history"]["eval_step"].tolist() == [2, 4]
  np.testing.assert_array_equal(ckpt["history"]["eval_value"][-1],
                                result.history["eval"][-1][1])


def test_fit_refuses_a_checkpoint_of_another_width(tmp_path):
  nlp, params, batch = _problem()
  tx = optax.adam(1e-2)
  mm.fit(nlp, params, None, batch, tx=tx, checkpoint_dir=str(tmp_path), progress=False)
  wider = dict(params, w1=jnp.zeros((3, 16)), b1=jnp.zeros(16), w2=jnp.zeros((16, 2)))
  with pytest.raises(ValueError, match=r"leaf 'params/b1' has shape \(8,\), the given "
                                       r"params has shape \(16,\)"):
    mm.fit(nlp, wider, None, batch, tx=tx, checkpoint_dir=str(tmp_path), progress=False)
  with pytest.raises(ValueError, match=r"differs from the expected tree \(the given "
                                       r"opt_state\) at 'opt_state/0'.*ScaleByAdamState"):
    mm.fit(nlp, params, None, batch, tx=optax.sgd(0.1), checkpoint_dir=str(tmp_path),
           progress=False)


# --- checkpoint format ---------------------------------------------------------------

def test_load_like_checks_every_leaf_shape_and_dtype_class(tmp_path):
  tree = {"layer": {"w": jnp.ones((3, 8)), "n": jnp.zeros((), jnp.int32)}}
  path = str(tmp_path / "c.ckpt")
  mm.save_checkpoint(path, tree)
  wide = {"layer": {"w": jnp.ones((3, 16)), "n": jnp.zeros((), jnp.int32)}}
  with pytest.raises(ValueError, match=r"c.ckpt leaf 'layer/w' has shape \(3, 8\), like= "
                                       r"has shape \(3, 16\)"):
    mm.load_checkpoint(path, like=wide)
  floating = {"layer": {"w": jnp.ones((3, 8)), "n": jnp.zeros(())}}
  with pytest.raises(ValueError, match=r"leaf 'layer/n' has dtype int32 \(integer\), like= "
                                       r"has dtype float64 \(floating\)"):
    mm.load_checkpoint(path, like=floating)
  with pytest.raises(ValueError, match=r"differs from the expected tree.*at 'layer'.*"
                                       r"keys \['n', 'w'\].*keys \['w'\]"):
    mm.load_checkpoint(path, like={"layer": {"w": jnp.ones((3, 8))}})
  # Within a class the dtype is like='s: float32 onto float64 is a cast, not an error.
  back = mm.load_checkpoint(path, like={"layer": {"w": jnp.ones((3, 8), jnp.float32),
                                                  "n": jnp.zeros((), jnp.int8)}})
  assert back["layer"]["w"].dtype == jnp.float32 and back["layer"]["n"].dtype == jnp.int8


def test_roundtrip_is_bit_exact_for_every_kind_of_leaf(tmp_path):
  nlp, params, batch = _problem()
  opt_state = optax.adam(1e-2).init(params)
  tree = {"params": params, "opt": opt_state, "none": None, "key": jax.random.key(3),
          "raw_key": jax.random.PRNGKey(4), "bits": jnp.array([-0.0, jnp.nan, jnp.inf]),
          "weak": jnp.full((2,), 0.5), "bf16": jnp.arange(3, dtype=jnp.bfloat16),
          "py": [1, 2.5, True, "name", 1 + 2j], "np": np.float32(3.0),
          "ints": {7: (jnp.zeros(0),), 2: 1}}
  assert tree["weak"].weak_type
  path = str(tmp_path / "c.ckpt")
  mm.save_checkpoint(path, tree)
  back = mm.load_checkpoint(path, like=tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    assert type(a) is type(b)
    if isinstance(b, jax.Array) and jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
      assert a.dtype == b.dtype
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    if isinstance(b, (jax.Array, np.ndarray, np.generic)):
      assert a.dtype == b.dtype and getattr(a, "weak_type", 0) == getattr(b, "weak_type", 0)
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
      assert a == b
  plain = mm.load_checkpoint(path)  # without like: plain containers, numpy leaves
  assert plain["opt"][0].mu["w1"].shape == (3, 8) and type(plain["opt"][0]).__name__ == (
      "ScaleByAdamState")
  assert plain["py"] == [1, 2.5, True, "name", 1 + 2j] and plain["none"] is None
  assert plain["ints"][2] == 1 and plain["ints"][7][0].shape == (0,)
  assert isinstance(plain["params"]["w1"], np.ndarray) and plain["np"].dtype == np.float32


def test_save_refuses_leaves_that_are_not_data(tmp_path):
  with pytest.raises(TypeError, match=r"leaf 'f/0' is a function"):
    mm.save_checkpoint(str(tmp_path / "c"), {"f": [lambda: 0]})
  with pytest.raises(TypeError, match=r"leaf 'o' has dtype object"):
    mm.save_checkpoint(str(tmp_path / "c"), {"o": np.array([None])})
  assert not os.listdir(tmp_path)


def test_loading_never_unpickles_a_new_format_file(tmp_path, monkeypatch):
  path = str(tmp_path / "c.ckpt")
  mm.save_checkpoint(path, {"w": jnp.ones(2)})
  def refuse(*args, **kwargs):
    raise AssertionError("pickle used")
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "load", refuse)
  assert mm.load_checkpoint(path)["w"].tolist() == [1.0, 1.0]


class _Payload:
  """A pickle that, when loaded, creates the marker file (a stand-in for any code)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, protocol):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "checkpoint.ckpt")
  with open(path, "wb") as f:
    pickle.dump({"params": _Payload(str(marker))}, f, protocol=protocol)
  what = "pre-format \\(pickle\\) checkpoint" if protocol >= 2 else "unreadable"
  with pytest.raises(ValueError, match=what) as err:
    mm.load_checkpoint(path)
  assert path in str(err.value)
  assert not marker.exists()
  nlp, params, batch = _problem()
  with pytest.raises(ValueError, match=what):
    mm.fit(nlp, params, None, batch, tx=optax.sgd(0.1), checkpoint_dir=str(tmp_path),
           progress=False)
  assert not marker.exists()
  mm.load_checkpoint(path, allow_pickle=True)  # the explicit opt-in does unpickle
  assert marker.exists()


def test_pickle_checkpoint_converts_with_allow_pickle(tmp_path):
  # A checkpoint as the pickle-era fit wrote it (history of lists, numpy leaves).
  nlp, params, batch = _problem()
  tx = optax.adam(1e-2)
  old = {"params": jax.device_get(params), "opt_state": jax.device_get(tx.init(params)),
         "step": 2, "key": None,
         "history": {"step": [1, 2], "epoch": [0, 0], "loss": [3.0, 2.0],
                     "grad_norm": [1.0, 0.5], "skipped": [False, False],
                     "eval": [(2, 1.25)]}}
  path = str(tmp_path / "checkpoint.ckpt")
  with open(path, "wb") as f:
    pickle.dump(old, f, protocol=pickle.HIGHEST_PROTOCOL)
  with pytest.raises(ValueError, match=r"allow_pickle=True.*save_checkpoint again|"
                                       r"mm.save_checkpoint\(path, mm.load_checkpoint\("
                                       r"path, allow_pickle=True\)\)"):
    mm.load_checkpoint(path)
  back = mm.load_checkpoint(path, like=old, allow_pickle=True)
  assert _equal_trees(back, old)
  mm.save_checkpoint(path, mm.load_checkpoint(path, allow_pickle=True))
  result = mm.fit(nlp, params, None, batch, tx=tx, epochs=3, checkpoint_dir=str(tmp_path),
                  progress=False)
  assert result.history["step"] == [1, 2, 3] and result.history["loss"][:2] == [3.0, 2.0]


def _corrupt_files(tmp_path):
  path = tmp_path / "good.ckpt"
  mm.save_checkpoint(str(path), {"w": jnp.arange(100.0), "i": jnp.arange(3)})
  data = path.read_bytes()
  flipped = bytearray(data)
  flipped[-100] ^= 0x01  # one bit of the array data
  header = bytearray(data)
  header[20] ^= 0x20
  return {"flipped": bytes(flipped), "truncated": data[:len(data) // 2],
          "no-digest": data[:-10], "empty": b"", "header": bytes(header),
          "random": bytes(range(256)) * 4}


@pytest.mark.parametrize("kind", ["flipped", "truncated", "no-digest", "empty", "header",
                                  "random"])
def test_corrupt_or_truncated_file_is_unreadable(tmp_path, kind):
  path = tmp_path / f"{kind}.ckpt"
  path.write_bytes(_corrupt_files(tmp_path)[kind])
  with pytest.raises(ValueError, match="unreadable") as err:
    mm.load_checkpoint(str(path), like={"w": jnp.arange(100.0), "i": jnp.arange(3)})
  assert str(path) in str(err.value)


def _rewrite_header(path, edit):
  """Rewrite a checkpoint's JSON header with ``edit`` and a fresh digest."""
  import hashlib
  from mlmap import _checkpoint
  data = pathlib.Path(path).read_bytes()
  start = len(_checkpoint._MAGIC) + 8
  (hlen,) = struct.unpack("<Q", data[len(_checkpoint._MAGIC):start])
  header = json.loads(data[start:start + hlen])
  edit(header)
  new = json.dumps(header).encode()
  body = _checkpoint._MAGIC + struct.pack("<Q", len(new)) + new + data[start + hlen:-32]
  pathlib.Path(path).write_bytes(body + hashlib.sha256(body).digest())


def test_newer_format_version_is_refused(tmp_path):
  path = str(tmp_path / "c.ckpt")
  mm.save_checkpoint(path, {"w": jnp.ones(2)})
  _rewrite_header(path, lambda h: h.update(version=2))
  with pytest.raises(ValueError, match=r"format version 2; this mlmap reads versions up "
                                       r"to 1"):
    mm.load_checkpoint(path)
  _rewrite_header(path, lambda h: h.update(version=1, leaves=[dict(h["leaves"][0],
                                                                    shape=[3])]))
  with pytest.raises(ValueError, match=r"unreadable.*leaf 'w'.*header says array \[3\]"):
    mm.load_checkpoint(path)


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
  path = tmp_path / "checkpoint.ckpt"
  # A writer killed between writing its temp file and the rename.
  child = ("import os, sys, numpy as np, mlmap as mm\n"
           "os.replace = lambda *a: os._exit(9)\n"
           "mm.save_checkpoint(sys.argv[1], {'w': np.ones(100_000)})\n")
  proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True)
  assert proc.returncode == 9
  (left,) = os.listdir(tmp_path)
  assert left.startswith(".checkpoint.ckpt.tmp-") and (tmp_path / left).stat().st_size > 8e5
  host = socket.gethostname()
  planted = tmp_path / f".checkpoint.ckpt.tmp-{host}.{_dead_pid()}.abc123"
  planted.write_bytes(b"x" * 1000)
  live = tmp_path / f".checkpoint.ckpt.tmp-{host}.{os.getpid()}.live01"  # a live writer
  other_host = tmp_path / f".checkpoint.ckpt.tmp-elsewhere.{_dead_pid()}.abc123"
  other_ckpt = tmp_path / f".other.ckpt.tmp-{host}.{_dead_pid()}.abc123"
  for f in (live, other_host, other_ckpt):
    f.write_bytes(b"x")
  mm.save_checkpoint(str(path), {"w": jnp.ones(3)})
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["checkpoint.ckpt", live.name, other_host.name, other_ckpt.name])
  assert mm.load_checkpoint(str(path))["w"].tolist() == [1.0, 1.0, 1.0]


def test_sharded_checkpoints_on_four_simulated_devices(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  script = pathlib.Path(__file__).with_name("_ckpt_sharded_check.py")
  proc = subprocess.run([sys.executable, str(script), "4", str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["num_devices"] == 4 and report["x64"]
  rt = report["roundtrip"]
  assert rt["input_weak"] and rt["plain_is_numpy"] and rt["plain_equal"]
  for name, leaf in rt["same"].items():
    assert leaf["bits_equal"] and leaf["same_sharding"] and leaf["num_devices"] == 4, name
  assert rt["same"]["w"]["shard_shapes"] == [[2, 3]] and rt["same"]["i"]["shard_shapes"] == [[2]]
  assert rt["same"]["s"]["weak_type"] and rt["moved"]["s"]["weak_type"]
  for name, leaf in rt["moved"].items():  # saved sharded, restored replicated, and back
    assert leaf["values_equal"] and leaf["same_sharding"], name
  assert rt["moved"]["w"]["shard_shapes"] == [[8, 3]]
  fit = report["fit"]
  assert fit["steps"] == [12, 12] and fit["num_evals"] == 3 and fit["moved"] > 1e-3
  assert fit["state_bits_equal"] and fit["history_equal"]
  assert fit["w_sharding_kept"] and fit["mu_sharding_kept"]


def test_fit_fetches_metrics_every_log_every_steps_and_keeps_the_full_history(
    monkeypatch, capsys):
  """``log_every`` changes only when metrics reach the host: the history (every
  step, the evaluations) is the same for 1, 5 and 100; the metrics are fetched
  ceil(12 / 5) times for ``log_every=5`` (plus the evaluations'); the evaluation
  is shown on the progress bar."""
  nlp, params, batch = _problem()
  tx = optax.adam(1e-2)
  step = mm.make_train_step(nlp, tx)
  eval_fn = jax.jit(lambda p: {"val_nlp": nlp(p, *batch)})
  runs = {}
  for log_every in (1, 5, 100):
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x, real=real: calls.append(1) or real(x))
    runs[log_every] = mm.fit(step, params, tx.init(params), batch, epochs=3, batch_size=16,
                             eval_fn=eval_fn, eval_every=6, log_every=log_every,
                             progress=log_every == 5)
    monkeypatch.setattr(jax, "device_get", real)
    if log_every == 5:
      # no step-by-step fetch: one flush before each evaluation (steps 6 and 12;
      # a lagged flush would start at 2 x 5 pending) plus the evaluations' own
      assert len(calls) == 2 + 2, len(calls)
    if log_every == 1:
      assert len(calls) >= 12, len(calls)
  for k in (5, 100):
    assert runs[k].history == runs[1].history, k
    assert _equal_trees(runs[k].params, runs[1].params)
  assert [t for t, _ in runs[1].history["eval"]] == [6, 12]
  err = capsys.readouterr().err
  assert "val_nlp=" in err and "loss=" in err
  with pytest.raises(ValueError, match="log_every"):
    mm.fit(step, params, tx.init(params), batch, batch_size=16, log_every=0, progress=False)
