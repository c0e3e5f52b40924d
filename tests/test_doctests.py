"""The Examples in the public docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import mlmap

_MODULES = sorted(m.name for m in pkgutil.iter_modules(mlmap.__path__, "mlmap."))


@pytest.mark.parametrize("name", _MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest failures in {name}"
