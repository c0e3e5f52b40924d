"""Bad-input rows of the training area: make_train_step, fit, save/load_checkpoint.

File rows build their files once, at import, in a fresh ``tempfile.mkdtemp()``.
Loading runs at trace time, so a load row raises under ``jax.jit`` as it does
eagerly; ``fit`` is a Python loop and its rows are eager only.
"""

import os
import pickle
import tempfile

import numpy as np
import jax
import jax.numpy as jnp
import optax

import mlmap as mm
from _bad_rows import Case

_DIR = tempfile.mkdtemp(prefix="mlmap-bad-rows-training-")
_X = jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(6, 2))
_T = jnp.asarray(np.arange(6.0))
_PARAMS = {"w": jnp.ones(2)}
_TREE = {"layer": {"w": jnp.ones((3, 8)), "n": jnp.zeros((), jnp.int32)}}


def _objective(p, x, t):
  return jnp.sum((x @ p["w"] - t) ** 2)


def _file(name, data):
  path = os.path.join(_DIR, name)
  with open(path, "wb") as f:
    f.write(data)
  return path


_GOOD = os.path.join(_DIR, "good.ckpt")
mm.save_checkpoint(_GOOD, _TREE)
with open(_GOOD, "rb") as _f:
  _BYTES = _f.read()
_FLIPPED = bytearray(_BYTES)
_FLIPPED[-40] ^= 0x01
_CORRUPT = _file("flipped.ckpt", bytes(_FLIPPED))
_TRUNCATED = _file("truncated.ckpt", _BYTES[:len(_BYTES) // 2])
_EMPTY = _file("empty.ckpt", b"")
_PICKLE = _file("old.ckpt", pickle.dumps({"w": np.ones(2)}, protocol=pickle.HIGHEST_PROTOCOL))
_FIT_DIR = os.path.join(_DIR, "fit")
mm.fit(_objective, _PARAMS, None, (_X, _T), tx=optax.sgd(0.01), checkpoint_dir=_FIT_DIR,
       progress=False)
_OLD_FIT_DIR = os.path.join(_DIR, "oldfit")
os.makedirs(_OLD_FIT_DIR)
_file(os.path.join("oldfit", "checkpoint.ckpt"),
      pickle.dumps({"step": 1}, protocol=pickle.HIGHEST_PROTOCOL))


def _load(path, like=None):
  def fn():
    mm.load_checkpoint(path, like=like)
    return jnp.zeros(())
  return fn


def _step_with(objective, params=None, tx=None):
  """A row fn ``(x, t) -> loss`` running one train step (jit traces x and t)."""
  tx = optax.sgd(0.1) if tx is None else tx
  params = _PARAMS if params is None else params
  step = mm.make_train_step(objective, tx)

  def fn(x, t):
    return step(params, tx.init(params), (x, t))[2]["loss"]
  return fn


def _fit(**kwargs):
  args = dict(step=_objective, params=_PARAMS, opt_state=None, data=(_X, _T),
              tx=optax.sgd(0.01), progress=False)
  args.update(kwargs)
  return lambda: mm.fit(args.pop("step"), args.pop("params"), args.pop("opt_state"),
                        args.pop("data"), **args)


_EAGER = ("eager",)
CASES = [
    # --- checkpoint files -------------------------------------------------------------
    Case("tr-ckpt-corrupt-bit", _load(_CORRUPT), raises=ValueError,
         match=r"flipped\.ckpt is unreadable.*digest"),
    Case("tr-ckpt-truncated", _load(_TRUNCATED), raises=ValueError,
         match=r"truncated\.ckpt is unreadable"),
    Case("tr-ckpt-empty-file", _load(_EMPTY), raises=ValueError,
         match=r"empty\.ckpt is unreadable"),
    Case("tr-ckpt-pickle-refused", _load(_PICKLE), raises=ValueError,
         match=r"pre-format \(pickle\) checkpoint.*allow_pickle=True"),
    Case("tr-ckpt-missing-file", _load(os.path.join(_DIR, "absent.ckpt")),
         raises=FileNotFoundError, match="absent.ckpt"),
    Case("tr-ckpt-like-wrong-width",
         _load(_GOOD, {"layer": {"w": jnp.ones((3, 16)), "n": jnp.zeros((), jnp.int32)}}),
         raises=ValueError, match=r"leaf 'layer/w' has shape \(3, 8\), like= has shape \(3, 16\)"),
    Case("tr-ckpt-like-wrong-dtype-class",
         _load(_GOOD, {"layer": {"w": jnp.ones((3, 8)), "n": jnp.zeros(())}}),
         raises=ValueError, match=r"'layer/n' has dtype int32 \(integer\).*float64 \(floating\)"),
    Case("tr-ckpt-like-bool-for-float",
         _load(_GOOD, {"layer": {"w": jnp.ones((3, 8), bool), "n": jnp.zeros((), jnp.int32)}}),
         raises=ValueError, match=r"'layer/w' has dtype float64 \(floating\).*bool"),
    Case("tr-ckpt-like-wrong-structure", _load(_GOOD, {"layer": {"w": jnp.ones((3, 8))}}),
         raises=ValueError, match=r"differs from the expected tree.*at 'layer'"),
    Case("tr-ckpt-like-list-for-dict", _load(_GOOD, [jnp.ones(2)]),
         raises=ValueError, match=r"at '<root>': the checkpoint has a dict.*like= has a list"),
    Case("tr-save-function-leaf",
         lambda: mm.save_checkpoint(os.path.join(_DIR, "f.ckpt"), {"f": [len]}),
         raises=TypeError, match=r"leaf 'f/0' is a builtin_function_or_method", modes=_EAGER),
    Case("tr-save-object-array",
         lambda: mm.save_checkpoint(os.path.join(_DIR, "o.ckpt"), {"o": np.array([None])}),
         raises=TypeError, match=r"leaf 'o' has dtype object", modes=_EAGER),
    Case("tr-save-tuple-dict-key",
         lambda: mm.save_checkpoint(os.path.join(_DIR, "k.ckpt"), {(1, 2): np.ones(1)}),
         raises=TypeError, match=r"dict key \(1, 2\).*only str and int keys", modes=_EAGER),
    # --- make_train_step ----------------------------------------------------------------
    Case("tr-step-non-scalar-objective",
         _step_with(lambda p, x, t: (x @ p["w"] - t) ** 2), (_X, _T),
         raises=ValueError, match=r"objective must return a scalar.*shape \(6,\)"),
    Case("tr-step-integer-objective", _step_with(lambda p, x, t: jnp.sum(t.astype(int))),
         (_X, _T), raises=TypeError, match=r"floating scalar, got dtype int"),
    Case("tr-step-int-param-leaf",
         _step_with(lambda p, x, t: _objective(p, x, t), {"w": jnp.ones(2), "step": jnp.array(3)}),
         (_X, _T), raises=TypeError, match=r"non-floating leaves: 'step' \(int"),
    Case("tr-step-bool-param-leaf",
         _step_with(lambda p, x, t: _objective(p, x, t),
                    {"w": jnp.ones(2), "m": jnp.ones(2, bool)}),
         (_X, _T), raises=TypeError, match=r"non-floating leaves: 'm' \(bool\)"),
    Case("tr-step-batch-not-pair",
         lambda x: mm.make_train_step(_objective, optax.sgd(0.1))(
             _PARAMS, optax.sgd(0.1).init(_PARAMS), (x,))[2]["loss"],
         (_X,), raises=ValueError, match=r"batch must be a pair \(inputs, targets\), got tuple"),
    Case("tr-step-non-finite-batch-skipped", _step_with(_objective),
         (_X.at[0, 0].set(jnp.nan), _T), check=lambda loss: bool(jnp.isnan(loss))),
    Case("tr-step-non-finite-flagged",
         lambda x, t: mm.make_train_step(_objective, optax.sgd(0.1))(
             _PARAMS, optax.sgd(0.1).init(_PARAMS), (x, t))[2]["skipped"],
         (_X.at[0, 0].set(jnp.inf), _T), check=lambda skipped: bool(skipped)),
    Case("tr-make-step-tx-not-transformation", lambda: mm.make_train_step(_objective, "adam"),
         raises=TypeError, match=r"optax.GradientTransformation, got str", modes=_EAGER),
    Case("tr-make-step-objective-not-callable", lambda: mm.make_train_step(3.0, optax.sgd(1.0)),
         raises=TypeError, match=r"objective must be callable, got float", modes=_EAGER),
    # --- fit ----------------------------------------------------------------------------
    Case("tr-fit-resume-wrong-width", _fit(params={"w": jnp.ones(3)}, checkpoint_dir=_FIT_DIR),
         raises=ValueError, match=r"leaf 'params/w' has shape \(2,\), the given params has "
         r"shape \(3,\)", modes=_EAGER),
    Case("tr-fit-resume-other-optimizer", _fit(tx=optax.adam(0.1), checkpoint_dir=_FIT_DIR),
         raises=ValueError, match=r"differs from the expected tree \(the given opt_state\)",
         modes=_EAGER),
    Case("tr-fit-resume-pickle-refused", _fit(checkpoint_dir=_OLD_FIT_DIR),
         raises=ValueError, match=r"pre-format \(pickle\) checkpoint", modes=_EAGER),
    Case("tr-fit-non-scalar-objective", _fit(step=lambda p, x, t: x @ p["w"] - t),
         raises=ValueError, match=r"must return a scalar.*shape \(6,\)", modes=_EAGER),
    Case("tr-fit-int-param-leaf", _fit(step=lambda p, x, t: _objective(p, x, t),
                                       params={"w": jnp.ones(2), "n": jnp.array(1)}),
         raises=TypeError, match=r"'n' \(int", modes=_EAGER),
    Case("tr-fit-batch-size-too-large", _fit(batch_size=7), raises=ValueError,
         match=r"batch_size must lie in \[1, 6\].*got 7", modes=_EAGER),
    Case("tr-fit-batch-size-zero", _fit(batch_size=0), raises=ValueError,
         match=r"batch_size must lie in \[1, 6\].*got 0", modes=_EAGER),
    Case("tr-fit-opt-state-none", _fit(step=mm.make_train_step(_objective, optax.sgd(0.1)),
                                       tx=None),
         raises=ValueError, match="opt_state is None", modes=_EAGER),
    Case("tr-fit-step-not-callable", _fit(step=3, tx=None, opt_state=()), raises=TypeError,
         match="step must be a train step or an objective", modes=_EAGER),
    Case("tr-fit-epochs-negative", _fit(epochs=-1), raises=ValueError,
         match=r"epochs must be an integer >= 0, got -1", modes=_EAGER),
    Case("tr-fit-epochs-float", _fit(epochs=2.0), raises=ValueError,
         match=r"epochs must be an integer >= 0, got 2.0", modes=_EAGER),
    Case("tr-fit-data-not-pair", _fit(data=(_X,)), raises=ValueError,
         match=r"data must be \(inputs, targets\)", modes=_EAGER),
    Case("tr-fit-data-sizes-differ", _fit(data=(_X, _T[:5])), raises=ValueError,
         match=r"leading \(example\) size: '0': 6, '1': 5", modes=_EAGER),
    Case("tr-fit-data-scalar-leaf", _fit(data=(_X, 1.0)), raises=ValueError,
         match=r"data leaf '1' is a scalar", modes=_EAGER),
    Case("tr-fit-checkpoint-every-zero", _fit(checkpoint_every=0), raises=ValueError,
         match=r"checkpoint_every must be an integer >= 1 or None, got 0", modes=_EAGER),
    Case("tr-fit-eval-every-float", _fit(eval_every=1.5), raises=ValueError,
         match=r"eval_every must be an integer >= 1 or None, got 1.5", modes=_EAGER),
]
