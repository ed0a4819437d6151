"""The daemon's bookkeeping: worker processes, and the jobs they own from claim to verdict.

`WorkerProcess` is the daemon's end of a worker (see ``worker.py`` for the
child's end and the messages they exchange); `Slot`, `Running` and
`Finishing` are the states a job passes through in the supervisor.  Plain
data and process handles only: every decision is the supervisor's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tullius.band import Band
from tullius.engine import Job
from tullius.events import Event


class WorkerProcess:
    """One worker child: its own session/process group, a socket for jobs."""

    def __init__(self, name: str) -> None:
        parent_end, child_end = socket.socketpair()
        fd = child_end.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tullius.runtime.worker", str(fd)],
                pass_fds=(fd,),
                # Own session and process group: a timeout signals the task's children too.
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        self.name = name
        self.pid = self.proc.pid
        self.conn = Connection(parent_end.detach())
        self.ready = False
        self.jobs_done = 0
        self.started = time.monotonic()
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # pidfd: Linux >= 5.3 only
            self.pidfd = os.pidfd_open(self.pid)

    def signal_group(self, signum: int) -> None:
        """Signal the worker and everything it started; a vanished group is fine."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def exited(self) -> int | None:
        return self.proc.poll()

    def send(self, message: tuple[Any, ...]) -> bool:
        try:
            self.conn.send(message)
            return True
        except OSError:
            return False  # it died; the loop notices through exited()

    def close(self) -> None:
        self.signal_group(signal.SIGKILL)  # grandchildren left behind by a dead worker
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def wait_handles(self) -> list[Any]:
        handles: list[Any] = [self.conn]
        if self.pidfd is not None:
            handles.append(self.pidfd)
        return handles


@dataclass(eq=False)
class Running:
    """A job this daemon owns, from claim to the moment its outcome is known."""

    job: Job
    next_renew: float
    dispatched_at: float | None = None
    deadline: float | None = None
    term_sent_at: float | None = None
    killed: bool = False
    #: Why we are stopping it: "timeout", "shutdown" or "abandoned" (lease taken over).
    kill_reason: str | None = None
    renewing: bool = False
    #: When it was claimed (monotonic); an undispatched job gives up after its timeout.
    claimed_at: float | None = None
    #: The last moment (`tullius.clock.window_seconds`) its verdict may be written:
    #: a write window after its claim started and its time limit ended (`tullius.prune`).
    write_by: float | None = None
    #: Its claim took longer than a heartbeat, so a sweep may have failed its lease
    #: as lost meanwhile: it is renewed, and found ours, before it is dispatched.
    confirm: bool = False


@dataclass(eq=False)
class Slot:
    """One place in a band: a worker process and the job it runs."""

    band_index: int
    band: Band
    name: str
    worker: WorkerProcess | None = None
    running: Running | None = None
    claiming: bool = False
    spawn_failures: int = 0
    next_spawn: float = 0.0

    @property
    def idle(self) -> bool:
        w = self.worker
        return w is not None and w.ready and self.running is None and not self.claiming


@dataclass(eq=False)
class Finishing:
    """A verdict to record; retried with the same event until the store answers.

    Its lease is renewed meanwhile, as a running job's is: a verdict held up by
    an outage came seconds after the database was back, and another daemon,
    back too, had already failed the run as lost (with a short lease).
    """

    job: Job
    event: Event
    next_try: float
    #: Its job's `Running.write_by`: past it, the verdict is given up.
    write_by: float | None = None
    delay: float = 0.2
    submitted: bool = False
    #: When its lease is next renewed (monotonic), as `Running.next_renew`.
    next_renew: float = 0.0
    renewing: bool = False
    #: The lease ended (our verdict recorded, or another server's sweep): no renewal.
    lease_over: bool = False


@dataclass
class Counters:
    """What this daemon did, for logs, tests and benchmarks."""

    claimed: int = 0
    accepted: int = 0
    rejected: int = 0
    timeouts: int = 0
    crashes: int = 0
    store_errors: int = 0
    #: Verdicts given up past their write window (`Running.write_by`).
    given_up: int = 0
