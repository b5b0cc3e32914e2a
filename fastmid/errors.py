"""The one base of every error fastmid raises for the user to act on.

The CLI catches :class:`FastmidError` alone, prints its message as one line (``error: ...``) and
exits with the class's :attr:`~FastmidError.exit_code` (2 for bad input, unless a subclass says
otherwise). Any other exception is a bug and keeps its traceback.

This module imports nothing from fastmid, so every layer (``kernels`` included) may use it.
"""

from __future__ import annotations


class FastmidError(Exception):
    """Base of fastmid's user-facing errors; the message names the flag, key, file or row and what
    to do.

    Attributes:
        exit_code: the process exit status the CLI uses for this error (2: bad input).
    """

    exit_code: int = 2


def first_line(exc: BaseException, max_chars: int | None = None) -> str:
    """The first non-empty line of an exception's message (its class name when the message is
    empty), cut to ``max_chars`` characters when given: what a one-line error quotes of a
    library's report."""
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else type(exc).__name__
    return line[:max_chars] if max_chars is not None else line
