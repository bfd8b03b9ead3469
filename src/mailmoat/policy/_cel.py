"""The one place that imports the CEL implementation.

``common-expression-language`` (``import cel``) is a Rust CEL interpreter with
Python bindings.  Everything else in the policy package goes through these
names, so swapping the implementation (or pinning its behaviour) touches one
file.

Contract of the underlying library, as the policy package relies on it:

- :func:`compile_expression` raises :class:`ValueError` whose text contains
  ``<input>:LINE:COLUMN: message`` for a syntax error;
- :meth:`Program.variables` lists top-level identifiers (macro-bound names
  included), :meth:`Program.functions` lists functions and operator overloads;
- :meth:`Program.execute` raises ``TypeError``, ``KeyError``, ``ValueError``,
  ``RuntimeError``, ``OverflowError`` or ``ZeroDivisionError`` on an evaluation
  error (:data:`EVALUATION_ERRORS`);
- every ``Context.add_variable`` converts the value and invalidates the
  context's cached environment, so a context is filled once and then shared by
  all programs evaluated against it.
"""

from __future__ import annotations

import re

import cel

Program = cel.Program
Context = cel.Context

#: what :meth:`Program.execute` raises when an expression cannot be evaluated
EVALUATION_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    KeyError,
    ValueError,
    RuntimeError,
    OverflowError,
    ZeroDivisionError,
    IndexError,
    AttributeError,
)

_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")


def compile_expression(source: str) -> cel.Program:
    """Compile ``source``; :class:`ValueError` on a syntax error."""
    return cel.compile(source)


def syntax_error_position(exc: ValueError) -> tuple[int, int, str]:
    """``(line, column, message)`` of a compile error (1-based; 1, 1 if unknown)."""
    text = str(exc)
    m = _POSITION.search(text)
    if m is None:
        return 1, 1, text.splitlines()[0] if text else "syntax error"
    # keep the caret excerpt: it shows the user where the parser stopped
    rest = text[m.end() :].rstrip()
    message = m.group(3) + (rest if rest else "")
    return int(m.group(1)), int(m.group(2)), message
