"""Tullius' benchmark tasks; the body is ``bench_plain.stamp``, shared with Celery and RQ.

The benchmark reads the log the bodies append to, to learn when each task's
code started: that gives pickup latency (queued -> body starts) and drain
throughput without asking any of the three systems for results.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta

from bench_plain import stamp

from tullius.task import Task

#: Tullius' timeout for `BenchTimeout`; the bench measures the kill against it.
TIMEOUT_SECONDS = 0.5


class BenchNoop(Task):
    """Tullius' no-op: stamps the log and returns."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        stamp(self.log, self.key)


class BenchTimeout(Task):
    """Starts a ``sleep`` child in its process group, stamps both pids, then hangs.

    The stamp's extra part is ``"<pid> <child pid>"`` so the benchmark can
    watch both processes disappear after the deadline.
    """

    timeout = timedelta(seconds=TIMEOUT_SECONDS)

    def run(self) -> None:
        child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        stamp(self.log, self.key, f"{os.getpid()} {child.pid}")
        time.sleep(600)
