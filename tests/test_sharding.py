"""Tests for mlmap.sharding: data-parallel placement, and mlmap's SPMD-correctness.

The multi-device checks run once in a subprocess with 4 simulated CPU devices
(``tests/_sharded_check.py``; XLA_FLAGS must be set before jax is imported, and
the rest of the suite keeps its single device). Each mlmap function is
jit-compiled on a single-device batch and on the same batch sharded over the 4
devices; the results must agree to float64 rounding, come back replicated, and
the compiled sharded program must not all-gather the batch. A second pair of
subprocesses (``tests/_multihost_check.py``) runs the multi-host recipe: 2
processes x 2 CPU devices joined by ``jax.distributed.initialize``.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import mlmap as mm

_SCRIPT = pathlib.Path(__file__).with_name("_sharded_check.py")
_MULTIHOST = pathlib.Path(__file__).with_name("_multihost_check.py")
_NUM_DEVICES = 4
_TOL = 1e-10

# Run by default: the list (curvature products, a dense form, a CG
# solve, a natural-gradient step, a Hessian-free step inside a train step).
_FAST = (
    "loss_and_grad", "hvp", "ggn_vp", "fisher_vp", "empirical_fisher_vp", "ggn_matrix",
    "cg_ggn_solve", "natural_gradient_step", "train_step_hessian_free",
)
# The rest of the design contract, in the slow test (``-m slow``).
_FULL_ONLY = ("hessian_free_ggn_step", "train_step_hessian_free_x2", "hessian_matrix",
              "fisher_matrix", "empirical_fisher_matrix", "hessian_free_hessian_step",
              "newton_step", "nonlinear_cg_step", "train_step_adam",
              "train_step_natural_gradient", "log_evidence", "ggn_vp_fn", "mc_fisher_vp",
              "ggn_diagonal", "hutchinson_trace_ggn", "fit_sharded_batches")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _check(report, name):
  assert name not in report["missing"], f"mlmap does not define {report['missing'][name]}"
  assert name not in report["failed"], report["failed"].get(name)
  res = report["checks"][name]
  assert res["rel_err"] < _TOL, (name, res)
  assert res["out_replicated"], (name, res)
  assert res["batch_allgathers"] == [], (name, res)
  if res.get("sanity") is not None:
    # A skipped step or a zero update would agree trivially.
    assert res["sanity"]["moved"] > 1e-6 and not res["sanity"]["skipped"], (name, res)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _last_json(stdout: str):
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
  """Run the 4-device check and the 2-process multi-host check concurrently."""
  env = _env()
  port = str(_free_port())
  hosts = [subprocess.Popen([sys.executable, str(_MULTIHOST), str(i), port], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    proc = subprocess.run([sys.executable, str(_SCRIPT), str(_NUM_DEVICES)], env=env,
                          capture_output=True, text=True, timeout=300)
    host_out = [h.communicate(timeout=240) for h in hosts]
  finally:
    for h in hosts:
      if h.poll() is None:
        h.kill()
  assert proc.returncode == 0, proc.stderr[-3000:]
  multihost = []
  for h, (out, err) in zip(hosts, host_out):
    assert h.returncode == 0, err[-3000:]
    multihost.append(_last_json(out))
  return {"report": _last_json(proc.stdout), "multihost": multihost}


@pytest.fixture(scope="module")
def report(runs):
  return runs["report"]


def test_subprocess_has_simulated_devices_and_x64(report):
  assert report["num_devices"] == _NUM_DEVICES
  assert report["x64"] is True


@pytest.mark.parametrize("name", _FAST)
def test_sharded_matches_single_device(report, name):
  _check(report, name)


@pytest.mark.slow
def test_sharded_matches_single_device_full_contract():
  proc = subprocess.run([sys.executable, str(_SCRIPT), str(_NUM_DEVICES), "all"],
                        env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = _last_json(proc.stdout)
  for name in _FAST + _FULL_ONLY:
    _check(report, name)


def test_rel_err_cannot_hide_nan_or_mismatch():
  sys.path.insert(0, str(_SCRIPT.parent))
  from _sharded_check import rel_err
  a = {"w": np.array([1.0, 2.0]), "n": np.array(3)}
  assert rel_err(a, a) == 0.0
  assert rel_err({"w": np.array([1.0, np.nan]), "n": np.array(3)}, a) == np.inf
  assert rel_err({"w": np.array([1.0, np.nan]), "n": np.array(3)},
                 {"w": np.array([1.0, np.nan]), "n": np.array(3)}) == 0.0
  assert rel_err({"w": np.array([1.0, 2.0]), "n": np.array(4)}, a) == np.inf
  assert rel_err({"w": np.array([1.0, 2.0 + 2e-10]), "n": np.array(3)}, a) == pytest.approx(1e-10)
  assert rel_err({"w": np.array([1.0, 2.0])}, a) == np.inf


def test_sum_over_examples_is_an_all_reduce(report):
  # Loss and gradient sum over the sharded batch: the compiler must reduce
  # across devices, otherwise each device would return its local partial sum.
  assert report["checks"]["loss_and_grad"]["num_allreduces"] >= 1


def test_gather_detector_fires_on_a_gathering_program(report):
  # Sorting along the batch axis needs every example on one device; if the
  # detector missed that gather, the no-gather assertions above could not fail.
  assert report["detector_sanity"]["batch_allgathers"], report["detector_sanity"]


def test_shard_batch_placement(report):
  p = report["placement"]
  assert p["x_spec"] == ["data"]
  assert p["x_num_devices"] == _NUM_DEVICES
  assert p["x_shard_shapes"] == [[24 // _NUM_DEVICES, 3]]
  assert p["t_shard_shapes"] == [[24 // _NUM_DEVICES]]
  assert p["x_values_equal"]
  assert p["process_local_equal"]
  assert p["two_axis_shard_shapes"] == [[24 // _NUM_DEVICES, 3]]
  assert p["two_axis_on_data_only"] == [[24 // 2, 3]]


def test_shard_batch_bad_inputs_on_four_devices(report):
  e = report["placement"]["errors"]
  assert e["indivisible"].startswith("ValueError")
  assert "22" in e["indivisible"] and "by 4" in e["indivisible"]
  assert e["indivisible_two_axes"].startswith("ValueError")
  assert "22" in e["indivisible_two_axes"] and "('data', 'model')" in e["indivisible_two_axes"]
  assert e["unknown_axis"].startswith("ValueError")
  assert "'batch'" in e["unknown_axis"] and "('data',)" in e["unknown_axis"]
  assert e["scalar_leaf"].startswith("ValueError") and "scalar" in e["scalar_leaf"]
  assert e["too_many_devices"].startswith("ValueError") and "5" in e["too_many_devices"]


def test_multihost_recipe_two_processes(runs):
  # 2 processes x 2 CPU devices joined by jax.distributed.initialize; each holds
  # half of the batch (process_local=True) and gets the single-device results.
  hosts = runs["multihost"]
  assert sorted(h["process_index"] for h in hosts) == [0, 1]
  for h in hosts:
    assert h["process_count"] == 2 and h["device_count"] == 4
    assert h["local_device_count"] == 2
    assert h["global_batch_shape"] == [24, 3]
    assert {"loss_and_grad", "ggn_vp", "train_step_adam"} <= set(h["checks"])
    for name, err in h["checks"].items():
      assert err < _TOL, (name, err)
  # Process i holds rows [12 i, 12 i + 12) in two shards of 6.
  assert sorted(h["local_rows"] for h in hosts) == [[0, 6], [12, 18]]


# --- in-process (one device) ---------------------------------------------------

def test_make_mesh_defaults():
  mesh = mm.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == jax.device_count()
  assert mesh.axis_types == (AxisType.Auto,)
  assert mm.make_mesh(1, axis="batch").axis_names == ("batch",)


def test_shard_batch_single_device_keeps_values_and_dtypes():
  mesh = mm.make_mesh(1)
  x = np.arange(12.0).reshape(4, 3)
  t = np.arange(4, dtype=np.int32)
  batch = {"x": x, "t": t}
  out = mm.shard_batch(batch, mesh)
  assert out["x"].sharding == NamedSharding(mesh, PartitionSpec("data"))
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  np.testing.assert_array_equal(np.asarray(out["t"]), t)
  assert out["t"].dtype == jnp.int32
  assert mm.batch_sharding(mesh) == out["x"].sharding


def test_replicate():
  mesh = mm.make_mesh(1)
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  rep = mm.replicate(params, mesh)
  for leaf in jax.tree_util.tree_leaves(rep):
    assert leaf.sharding.is_fully_replicated
    assert leaf.sharding.spec == PartitionSpec()


def test_sharded_nlp_under_jit_uses_global_batch_size():
  # N / B must use the global B; on one device this is the plain value.
  mesh = mm.make_mesh(1)
  nlp = mm.negative_log_posterior(lambda w, x: x @ w, mm.gaussian_log_likelihood,
                                  num_data=40)
  x, t = mm.shard_batch((np.ones((8, 2)), np.zeros(8)), mesh)
  value = jax.jit(nlp)(jnp.ones(2), x, t)
  expected = 40 / 8 * np.sum(0.5 * 2.0 ** 2 + 0.5 * np.log(2 * np.pi) * np.ones(8))
  np.testing.assert_allclose(float(value), expected, rtol=1e-12)


def test_unknown_axis_lists_mesh_axes():
  mesh = mm.make_mesh(1)
  with pytest.raises(ValueError, match=r"'model' is not a mesh axis.*\('data',\)"):
    mm.shard_batch(np.ones((4, 2)), mesh, axis="model")
  with pytest.raises(ValueError, match=r"'model' is not a mesh axis"):
    mm.batch_sharding(mesh, axis=("data", "model"))


def test_explicit_axis_mesh_is_refused():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"'data' has AxisType.Explicit"):
    mm.shard_batch(np.ones((4, 2)), mesh)


def test_bad_types_and_sizes():
  with pytest.raises(TypeError, match="jax.sharding.Mesh, got list"):
    mm.shard_batch(np.ones((4, 2)), [0])
  with pytest.raises(TypeError, match="jax.sharding.Mesh, got str"):
    mm.replicate({"w": jnp.ones(2)}, "data")
  with pytest.raises(ValueError, match=r"num_devices must be an integer in \[1, \d+\].*got 0"):
    mm.make_mesh(0)
  with pytest.raises(ValueError, match=r"leaf \['x'\] is a scalar"):
    mm.shard_batch({"x": 1.0}, mm.make_mesh(1))


@pytest.mark.slow
def test_bench_scaling_smoke(tmp_path):
  # The benchmark script end to end, tiny: 2 simulated devices, P ~ 1e4.
  script = pathlib.Path(__file__).parents[1] / "experiments" / "bench_scaling.py"
  proc = subprocess.run([sys.executable, str(script), "--max-params", "1e4", "--repeats", "1",
                         "--devices", "2", "--out", str(tmp_path)], env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "bench_scaling.json").read_text())
  (row,) = result["scaling"]
  assert 9_000 < row["num_params"] < 11_000
  assert row["dense_bytes_analytic"] == 4 * row["num_params"] ** 2
  assert row["ggn_vp_bytes"]["peak"] < row["dense_bytes_analytic"] / 100
  assert result["throughput"]["num_devices"] == 2
  assert set(result["throughput"]["speedup"]) == {
      "ggn_vp", "train_step_hessian_free", "train_step_adam"}
  assert (tmp_path / "bench_scaling.png").stat().st_size > 0
