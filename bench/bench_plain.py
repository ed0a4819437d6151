"""The no-op task body every contender runs: append ``"<key> <time.time()> [extra]"`` to a log.

Kept apart from ``bench_tasks.py`` (which imports Tullius) so that Celery's
and RQ's workers import nothing but the standard library for it: RQ's work
horse imports the job's module for every job, and a heavier import would be
charged to RQ unfairly.  A single ``write()`` to a file opened with O_APPEND
is atomic for lines this short, so concurrent workers never interleave.
"""

from __future__ import annotations

import os
import time


def stamp(log: str, key: str, extra: str = "") -> None:
    """Append ``key time [extra]`` to ``log`` in one atomic write."""
    line = f"{key} {time.time():.6f} {extra}".rstrip() + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def plain_noop(log: str, key: str) -> None:
    """The no-op body, as a plain function (RQ's job, and Celery's task body)."""
    stamp(log, key)
