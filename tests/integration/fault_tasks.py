"""Task classes the fault tests queue; daemons load them by name from ``tests/integration``.

Each task *marks* what it does: when ``run()`` or ``failed()`` starts, it
writes a small JSON file into the directory named by its ``marks`` field
(one file per call, never overwritten).  The marks are how the ledger
(``ledger.py``) proves, after a scenario, that ``run()`` started at most once
per task, how often ``failed()`` ran, and that no task process outlived the
scenario: each mark names the process (pid plus its kernel start time, so a
recycled pid is not mistaken for a survivor).

Files, not the database, carry the marks because several scenarios take the
database away while tasks run.  Nothing here imports pytest: the daemon's
worker processes import this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import tullius
from tullius.task import Task

#: Longest any task here waits on its own; far beyond every test's deadline.
FOREVER = 600.0


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None.

    The command name (field 2) may contain spaces; the fields after its ')'
    are fixed, so index 0 is the state and index 19 the start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Together with the pid it names one process for its whole life, which a
    pid alone does not (pids are recycled).
    """
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


def write_mark(marks: str, what: str, task_id: str | None, **extra: Any) -> Path:
    """Record one call in ``marks`` (a directory); returns the file written."""
    pid = os.getpid()
    data = {
        "what": what,
        "task_id": task_id,
        "pid": pid,
        "start": process_start_time(pid),
        "at": time.time(),
        **extra,
    }
    directory = Path(marks)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{what}.{task_id}.{pid}.{uuid.uuid4().hex}.json"
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, final)  # readers never see half a mark
    return final


def count_marks(marks: str, what: str, task_id: str | None) -> int:
    """How many ``what`` marks ``task_id`` has written so far."""
    return len(list(Path(marks).glob(f"{what}.{task_id}.*.json")))


class Marked(Task, abstract=True):
    """Base: a ``marks`` directory field and the mark helper."""

    marks: str

    def mark(self, what: str, **extra: Any) -> None:
        write_mark(self.marks, what, self.task_id, **extra)

    def mark_failed(self) -> None:
        """Mark a call of ``failed()``, with the kind of failure it handles."""
        self.mark("failed", kind=None if self.failure is None else self.failure.kind)

    def failed(self) -> Task | list[Task] | None:
        self.mark_failed()
        return None


class RunFails(Marked, abstract=True):
    """Base: ``run()`` raises, so that each scenario's ``failed()`` is called."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        self.mark("run")
        raise RuntimeError("run fails so that failed() is called")


class Noop(Marked):
    """Does nothing but mark that it ran."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        self.mark("run")


class Sleep(Marked):
    """Sleeps ``seconds`` (or until the file ``gate`` exists); then spawns ``then`` Noops.

    ``failed()`` returns a replacement copy while ``retries`` is above zero, so
    scenarios that lose tasks also exercise replacement inserts.
    """

    timeout = timedelta(seconds=FOREVER)
    failed_timeout = timedelta(seconds=60)

    def run(self) -> list[Task]:
        self.mark("run")
        gate = getattr(self, "gate", None)
        if gate is None:
            time.sleep(float(self.seconds))
        else:  # finish only once the test opens the gate (creates the file)
            deadline = time.monotonic() + float(self.seconds)
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return [Noop(marks=self.marks) for _ in range(int(getattr(self, "then", 0)))]

    def failed(self) -> Task | None:
        super().failed()
        retries = int(getattr(self, "retries", 0))
        if retries > 0:
            return self.copy(retries=retries - 1)
        return None


class Chain(Marked):
    """Counts ``left`` down by returning a successor; a lost link is replaced (bounded)."""

    timeout = timedelta(seconds=60)
    failed_timeout = timedelta(seconds=60)

    def run(self) -> Task | None:
        self.mark("run")
        time.sleep(float(getattr(self, "pause", 0.0)))
        left = int(self.left)
        return self.copy(left=left - 1) if left > 0 else None

    def failed(self) -> Task | None:
        super().failed()
        retries = int(getattr(self, "retries", 0))
        return self.copy(retries=retries - 1) if retries > 0 else None


class WithChild(Marked):
    """Starts a child process (``sleep``) in its process group, then sleeps past its timeout.

    The child's pid is marked too, so the ledger checks that the timeout
    stopped the whole group, not just the worker.
    """

    timeout = timedelta(seconds=1)

    def run(self) -> None:
        child = subprocess.Popen(["sleep", str(FOREVER)], stdin=subprocess.DEVNULL)
        write_mark(
            self.marks,
            "child",
            self.task_id,
            child_pid=child.pid,
            child_start=process_start_time(child.pid),
        )
        self.mark("run", child_pid=child.pid)
        time.sleep(FOREVER)


class EndlessWithChild(WithChild):
    """`WithChild` without a useful timeout: it runs until someone kills it."""

    timeout = timedelta(seconds=FOREVER)


class Raises(Marked):
    """``run()`` raises; ``failed()`` marks and accepts the failure."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        self.mark("run")
        raise ValueError(f"task {self.task_id} raises on purpose")


class ExitsHard(Marked):
    """``run()`` ends its process without a word, like a segfault would."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        self.mark("run")
        sys.stdout.flush()
        os._exit(3)


class HandlerRaises(RunFails):
    """``run()`` raises and so does every ``failed()``: ends UNHANDLED after two tries."""

    failed_attempts = 2

    def failed(self) -> None:
        self.mark_failed()
        raise RuntimeError(f"failed() of {self.task_id} raises on purpose")


class HandlerRaisesOnce(RunFails):
    """``failed()`` raises on its first call and returns a replacement Noop on the second."""

    failed_attempts = 3

    def failed(self) -> Task:
        before = count_marks(self.marks, "failed", self.task_id)
        self.mark_failed()
        if before == 0:
            raise RuntimeError("first failed() call raises on purpose")
        return Noop(marks=self.marks)


class HandlerHangs(RunFails):
    """``failed()`` outlives ``failed_timeout`` every time: ends UNHANDLED after two tries."""

    failed_timeout = timedelta(seconds=1)
    failed_attempts = 2

    def failed(self) -> None:
        self.mark_failed()
        time.sleep(FOREVER)


class HandlerReturnsGarbage(RunFails):
    """``failed()`` returns something that is not a task: recorded, then UNHANDLED."""

    failed_attempts = 1

    def failed(self) -> Any:
        self.mark_failed()
        return {"not": "a task"}


class QueuesFromRun(Marked):
    """Calls ``tullius.queue()`` inside ``run()``: the daemon must route it to its store."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        self.mark("run")
        tullius.queue(Noop(marks=self.marks, queued_by=self.task_id))


class ExampleTask(Marked):
    """The original README's example, scaled down: counts ``count_to`` times, ``interval`` apart.

    The README's task times out at 5 s and counts once a second, so 10..5
    time out and 4 succeeds.  Here the timeout is ``TIMEOUT`` and the interval
    ``TIMEOUT / 4.5``: four counts end well before the deadline and five
    well after it, so a loaded machine does not change the story.
    """

    TIMEOUT = 3.0
    timeout = timedelta(seconds=TIMEOUT)

    def run(self) -> None:
        self.mark("run")
        interval = self.TIMEOUT / 4.5
        for i in range(int(self.count_to)):
            print(f"counting: {i}", flush=True)
            time.sleep(interval)

    def failed(self) -> Task:
        super().failed()
        return self.copy(count_to=max(int(self.count_to) - 1, 0))
