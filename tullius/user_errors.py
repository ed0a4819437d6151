"""How an error of user code is put into a failure record, the same in both drivers.

User code's exceptions are user code too: an exception whose ``__str__``
raises escaped the simulator's wording of it (the task stayed ``running``
for ever) and crashed ``tulliusd``'s worker instead of being recorded.  And
a message or traceback is stored in records and shown by ``--status``, so
both are bounded: a 20 MB message once went into a record whole.
"""

from __future__ import annotations

import reprlib
from typing import Any, Final

#: Longest message a failure record keeps (the start is kept).
MAX_MESSAGE: Final = 2000
#: Longest traceback a failure record keeps (the end is kept: the raise).
MAX_TRACEBACK: Final = 20_000


def describe(error: BaseException) -> str:
    """``"Type: text"`` of ``error``, even if its ``__str__`` raises."""
    try:
        text = str(error)
    except BaseException as broken:  # user code: its failure to describe itself is data
        try:
            text = f"<str() of the exception raised {type(broken).__name__}>"
        except BaseException:  # pragma: no cover - a type's __name__ is a plain str
            text = "<str() of the exception failed>"
    return f"{type(error).__name__}: {text}"


_SHOWN: Final = reprlib.Repr()
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 10
_SHOWN.maxstring = _SHOWN.maxother = 200
_SHOWN.maxlevel = 4


def shown(value: Any) -> str:
    """A short ``repr`` of a value user code made, for an error message: its
    ``__repr__`` may raise, and a list of 20,000 tasks needs no message of
    its own length."""
    try:
        return _SHOWN.repr(value)
    except BaseException:  # reprlib catches Exception only
        return f"<{type(value).__name__} object>"


def raised(role: str, error: BaseException) -> str:
    """The message of a failure of kind ``exception``: ``"run() raised Type: text"``."""
    return bounded_message(f"{role} raised {describe(error)}")


def bounded_message(message: str) -> str:
    """``message`` cut to `MAX_MESSAGE` characters."""
    return message[:MAX_MESSAGE]


def bounded_traceback(text: str | None) -> str | None:
    """The last `MAX_TRACEBACK` characters of a formatted traceback."""
    return None if text is None else text[-MAX_TRACEBACK:]
