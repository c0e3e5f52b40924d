"""The row type of the bad-input table (tests/test_bad_inputs.py).

Each area of the library keeps its rows in ``tests/_bad_rows_<area>.py`` as a
list ``CASES`` of :class:`Case`; ``test_bad_inputs.py`` collects every list and
runs each row in the modes it names.

A row is one call ``fn(*args)`` and what it must give:

* ``raises=ValueError, match="sigma shape"``: that exception type, with that
  fragment (a regular expression, searched) in the message;
* ``check=lambda out: ...``: the call returns, and ``check(out)`` is True (for
  "returns NaN" or "is flagged" rows: ``check=lambda out: bool(jnp.isnan(out).all())``).

``modes`` says how the call is made: ``"eager"`` calls ``fn(*args)``; ``"jit"``
calls ``jax.jit(fn)(*args)``, so every array in ``args`` is traced (concrete-value
checks cannot fire there: such rows expect NaN or a flag instead). Put anything
that must stay static (shapes, callables, Python numbers the call needs concrete)
inside ``fn``'s closure, not in ``args``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional


class Case(NamedTuple):
  name: str                      # unique, kebab-case: "gaussian-sigma-enlarges"
  fn: Callable[..., Any]
  args: tuple = ()
  raises: Optional[type] = None  # exception type, or None when the call returns
  match: str = ""                # regex searched in str(exception)
  check: Optional[Callable[[Any], bool]] = None
  modes: tuple = ("eager", "jit")
