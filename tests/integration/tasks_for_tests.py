"""Task classes the integration tests queue; imported by the daemons' workers by name.

Daemons started by `daemon_harness.Daemon` have this directory on
``PYTHONPATH``, so ``tasks_for_tests:ClassName`` loads in their workers.  Tasks
that must be observed from outside (how often ``failed()`` ran, which
processes a task started) append lines to files whose paths are fields.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import tullius


def append_line(path: str, text: str) -> None:
    """Append one line atomically enough for tests (one write of a short line, O_APPEND)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class Noop(tullius.Task):
    """Does nothing; for throughput and races."""

    timeout = timedelta(seconds=30)

    def run(self) -> None:
        return None


class Sleep(tullius.Task):
    """Sleeps ``seconds`` (fields: seconds, optional log path to record start/end)."""

    timeout = timedelta(seconds=120)
    seconds: float

    def run(self) -> None:
        log = getattr(self, "log", None)
        if log:
            append_line(log, f"start {self.task_id} {os.getpid()}")
        time.sleep(self.seconds)
        if log:
            append_line(log, f"end {self.task_id}")

    def failed(self) -> None:
        log = getattr(self, "log", None)
        if log and self.failure is not None:
            append_line(log, f"failed {self.task_id} {self.failure.kind}")


class Parent(tullius.Task):
    """Succeeds with ``children`` successors of class `Child`."""

    timeout = timedelta(seconds=30)
    label: str
    children: int

    def run(self) -> list[tullius.Task]:
        return [Child(label=f"{self.label}/{i}") for i in range(self.children)]


class Child(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        return None


class QueuesInside(tullius.Task):
    """Calls ``tullius.queue()`` from inside ``run()``; the daemon must store it."""

    timeout = timedelta(seconds=30)
    label: str
    log: str

    def run(self) -> None:
        ids = tullius.queue(Child(label=f"queued by {self.label}"))
        append_line(self.log, f"queued {ids[0]}")


class QueuesByKey(tullius.Task):
    """Queues a `Child` with ``key`` twice from inside ``run()``, then another `Child`
    under the same key, catching the `tullius.KeyConflict` (all logged)."""

    timeout = timedelta(seconds=30)
    key: str
    log: str

    def run(self) -> None:
        for _ in range(2):
            (task_id,) = tullius.queue(Child(label="keyed"), key=self.key)
            append_line(self.log, f"queued {task_id}")
        try:
            tullius.queue(Child(label="another"), key=self.key)
        except tullius.KeyConflict as conflict:
            append_line(self.log, f"conflict {conflict.task_id} {conflict.difference}")


class Explodes(tullius.Task):
    """``run()`` raises; ``failed()`` (logged once per call) queues a `Recovers`."""

    timeout = timedelta(seconds=30)
    label: str
    log: str

    def run(self) -> None:
        raise ValueError(f"boom {self.label}")

    def failed(self) -> tullius.Task:
        append_line(
            self.log, f"failed {self.task_id} {self.failure.kind if self.failure else None}"
        )
        return Recovers(label=self.label, log=self.log)


class Recovers(tullius.Task):
    timeout = timedelta(seconds=30)
    label: str
    log: str

    def run(self) -> None:
        append_line(self.log, f"recovered {self.label}")


class HangsWithChild(tullius.Task):
    """Starts a child process, records both pids, then hangs past its 1 s timeout."""

    timeout = timedelta(seconds=1)
    log: str

    def run(self) -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        append_line(self.log, f"{os.getpid()} {child.pid}")
        time.sleep(600)


class Crashes(tullius.Task):
    """Exits its worker process abruptly, as a segfault or an OOM kill would."""

    timeout = timedelta(seconds=30)

    def run(self) -> None:
        os._exit(3)


class HandlerRaises(tullius.Task):
    """``run()`` raises and so does every ``failed()`` call; 2 attempts allowed."""

    timeout = timedelta(seconds=30)
    failed_attempts = 2
    log: str

    def run(self) -> None:
        raise RuntimeError("run failed")

    def failed(self) -> None:
        append_line(self.log, f"handler {self.task_id}")
        raise RuntimeError("failed() failed too")


class ReturnsGarbage(tullius.Task):
    """``run()`` returns something that is not a task."""

    timeout = timedelta(seconds=30)

    def run(self) -> object:  # type: ignore[override]  # wrong on purpose
        return {"not": "a task"}


class SleepsWithChild(tullius.Task):
    """Starts a child process, records both pids, then sleeps ``seconds`` (timeout 120 s)."""

    timeout = timedelta(seconds=120)
    log: str
    seconds: float

    def run(self) -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        append_line(self.log, f"{os.getpid()} {child.pid}")
        time.sleep(self.seconds)


class HandlerHangs(tullius.Task):
    """``run()`` raises; every ``failed()`` hangs past its 1 s ``failed_timeout``."""

    timeout = timedelta(seconds=30)
    failed_timeout = timedelta(seconds=1)
    failed_attempts = 2
    log: str

    def run(self) -> None:
        raise RuntimeError("run failed")

    def failed(self) -> None:
        append_line(self.log, f"handler {self.task_id} {os.getpid()}")
        time.sleep(600)
