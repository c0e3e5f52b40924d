"""The bad-input table: every public check, eager and under ``jax.jit``.

Rows live beside their area in ``tests/_bad_rows_<area>.py`` (see
``tests/_bad_rows.py`` for the row format); this module runs them all. A row
either raises the named exception with the named message fragment, or returns a
value its ``check`` accepts (NaN, or a flag in returned info) -- never a
plausible number.
"""

import importlib
import pathlib
import re
import warnings

import jax
import pytest

from _bad_rows import Case

_HERE = pathlib.Path(__file__).parent
_AREAS = sorted(p.stem for p in _HERE.glob("_bad_rows_*.py"))
CASES = [c for area in _AREAS for c in importlib.import_module(area).CASES]
PARAMS = [pytest.param(c, mode, id=f"{c.name}[{mode}]") for c in CASES for mode in c.modes]


def test_table_is_well_formed():
  names = [c.name for c in CASES]
  dup = sorted({n for n in names if names.count(n) > 1})
  assert not dup, f"duplicate row names: {dup}"
  for c in CASES:
    assert isinstance(c, Case)
    assert (c.raises is None) != (c.check is None), f"{c.name}: give raises or check"
    assert set(c.modes) <= {"eager", "jit"} and c.modes, c.name
  assert len(CASES) >= 80, f"only {len(CASES)} rows"


def _call(case, mode):
  if mode == "eager":
    return case.fn(*case.args)
  return jax.jit(case.fn)(*case.args)


@pytest.mark.parametrize("case, mode", PARAMS)
def test_bad_input(case, mode):
  if case.raises is not None:
    with pytest.raises(case.raises) as err, warnings.catch_warnings():
      warnings.simplefilter("ignore")
      out = _call(case, mode)
      jax.block_until_ready(out)
    assert re.search(case.match, str(err.value)), (
        f"{case.name}: message {str(err.value)!r} lacks {case.match!r}")
  else:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      out = jax.block_until_ready(_call(case, mode))
    assert case.check(out), f"{case.name}: check rejected {out!r}"
