"""Formatting user code's tracebacks for failure records, fast when they repeat.

`format_exception` gives the very text of ``traceback.format_exception``; the
simulator records a traceback for every failed run, and the same few frames
fail thousands of times, so the text of each frame, and of a whole plain
failure, is memoised (see `_MemoStackSummary` and `_plain_key`).
"""

from __future__ import annotations

import linecache
import sys
import traceback
from typing import Any, Final

#: `_MemoStackSummary`'s memo: formatted text by frame location and source line.
_FRAME_TEXT: dict[tuple[Any, ...], str] = {}
#: The key below is everything Python 3.11's and 3.12's ``format_frame_summary``
#: reads; later versions format several source lines (and differently), so
#: there `format_exception` is simply `traceback.format_exception`.
_MEMO_KEY_IS_COMPLETE: Final = sys.version_info < (3, 13) and hasattr(
    traceback.FrameSummary, "_original_line"
)


class _MemoStackSummary(traceback.StackSummary):
    """A `traceback.StackSummary` that formats each distinct frame once.

    Formatting a frame in Python 3.11 parses its source line with `ast` to
    place the ``^^^`` carets, which cost more than the rest of a failed
    task's lifecycle in the simulator, where the same few frames (a task's
    ``raise`` under the same worker frames) fail thousands of times.  The
    text depends only on the frame's location and source line, so the memo
    is keyed by exactly what `format_frame_summary` reads: the result is the
    very text `traceback.format_exception` produces.
    """

    def format_frame_summary(self, frame_summary: traceback.FrameSummary) -> str:
        if frame_summary.locals:  # never here (no capture_locals): not memoised
            return super().format_frame_summary(frame_summary)
        key = (
            frame_summary.filename,
            frame_summary.lineno,
            frame_summary.end_lineno,
            frame_summary.colno,
            frame_summary.end_colno,
            frame_summary.name,
            # the unstripped source line it formats (a private property of CPython's)
            frame_summary._original_line,  # type: ignore[attr-defined]
        )
        memo = _FRAME_TEXT
        text = memo.get(key)
        if text is None:
            if len(memo) >= 4096:  # bounded: code locations, not tasks, fill it
                memo.clear()
            text = memo[key] = super().format_frame_summary(frame_summary)
        return text


def format_exception(error: BaseException) -> str:
    """``"".join(traceback.format_exception(error))``, with frames formatted via a memo.

    Builds the same `traceback.TracebackException` (``compact=True``, as
    `traceback.format_exception` does), then swaps each stack in the chain of
    causes, contexts and group members for a `_MemoStackSummary`.
    """
    if not _MEMO_KEY_IS_COMPLETE:
        return "".join(traceback.format_exception(error))
    plain = _plain_key(error)
    if plain is not None:
        key, entries = plain
        known = _PLAIN_TEXT.get(key)
        if known is not None and all(a is b for a, b in zip(known[0], entries, strict=True)):
            return known[1]
    text = _format_with_frame_memo(error)
    if plain is not None:
        if len(_PLAIN_TEXT) >= 4096:  # bounded: distinct failures, not tasks, fill it
            _PLAIN_TEXT.clear()
        _PLAIN_TEXT[plain[0]] = (plain[1], text)
    return text


#: Whole texts of plain failures (see `_plain_key`): key -> (linecache entries, text).
_PLAIN_TEXT: dict[tuple[Any, ...], tuple[tuple[Any, ...], str]] = {}


def _plain_key(error: BaseException) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """What decides the formatted text of a plain failure, or None if it isn't plain.

    Plain: no cause, context or notes, not an exception group, and none of the
    kinds whose text looks beyond the exception and its frames (syntax errors,
    and the "did you mean" of import, name and attribute errors).  Then the
    text is decided by the exception's type and ``str()``, ``sys.tracebacklimit``,
    each frame's code and position (``tb_lasti``), and the source lines: those
    come from `linecache`, checked against the files exactly as `traceback`
    checks them, and a memoised text is used only while every file's cache
    entry is the very object it was formatted from (a changed file is re-read
    into a new one).  So the ten thousandth ``raise`` of the same line costs a
    walk along its frames and a ``stat`` per file instead of a full format.
    """
    if (
        error.__cause__ is not None
        or error.__context__ is not None
        or getattr(error, "__notes__", None) is not None
        or isinstance(
            error, SyntaxError | ImportError | NameError | AttributeError | BaseExceptionGroup
        )
    ):
        return None
    try:
        message = str(error)
    except BaseException:  # traceback prints a placeholder instead: not plain
        return None
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code, tb.tb_lasti, tb.tb_lineno))
        tb = tb.tb_next
    entries = []
    for filename in dict.fromkeys(code.co_filename for code, _, _ in frames):
        linecache.checkcache(filename)
        entry = linecache.cache.get(filename)
        if entry is None or len(entry) == 1:  # not read yet (or lazily): format in full
            return None
        entries.append(entry)
    kind = type(error)
    key = (
        kind,
        kind.__module__,
        kind.__qualname__,
        message,
        getattr(sys, "tracebacklimit", None),
        tuple(frames),
    )
    return key, tuple(entries)


def _format_with_frame_memo(error: BaseException) -> str:
    top = traceback.TracebackException(
        type(error), error, error.__traceback__, limit=None, compact=True
    )
    pending = [top]
    seen: set[int] = set()
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        te.stack = _MemoStackSummary(te.stack)
        pending.extend(
            chained
            for chained in (te.__cause__, te.__context__, *(te.exceptions or ()))
            if chained is not None
        )
    return "".join(top.format(chain=True))
