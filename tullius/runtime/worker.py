"""The worker child process: load a task's class, run ``run()`` or ``failed()``, report back.

A worker is started by the supervisor with ``python -m tullius.runtime.worker
FD`` in a session (and process group) of its own, so that a timeout can signal
the task *and any process it started* at once.  It never touches the store:
it receives one job at a time over the socket ``FD`` and answers with plain
data.  Messages (pickled tuples over a `multiprocessing.connection.Connection`):

    worker -> supervisor   ("ready", pid)
    supervisor -> worker   ("job", {"kind": "run"|"handle", "task": <task BSON>,
                                    "failure": <failure BSON>|None, "server": str})
    worker -> supervisor   ("queue", [TaskSpec, ...], key|None)  from tullius.queue() in user code
    supervisor -> worker   ("ids", [str, ...]) | ("queue_error", message)
                         | ("key_conflict", (key, index, task_id, difference))
    worker -> supervisor   ("done", {"ok": True, "specs": [TaskSpec, ...]})
                         | ("done", {"ok": False, "failure": <failure BSON>})
    supervisor -> worker   ("stop",)  (or EOF): exit

Classes are imported here, never in the supervisor, so a recycled worker
picks up new code.  The worker must not outlive its daemon: Linux's
``PR_SET_PDEATHSIG`` delivers SIGUSR2 when the daemon dies (a signal of its
own, because at delivery ``getppid()`` may still name the dead daemon, so
SIGTERM could not tell "stop this task" from "your daemon is gone"), and a
watchdog thread notices a changed parent id in case that handler can't run;
both need the GIL, so a guard process forked into the group at start-up
(`_start_guard`) also waits for the daemon's exit, for user code stuck in C;
either way the whole process group (task children included) is killed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

from tullius import api
from tullius.document import (
    Failure,
    FailureKind,
    TaskSpec,
    failure_from_bson,
    failure_to_bson,
    stored_time,
    stored_value,
    task_from_bson,
)
from tullius.errors import KeyConflict, StoreError, TaskDefinitionError, UnknownTaskClass
from tullius.task import from_doc, to_specs
from tullius.user_errors import bounded_message, bounded_traceback, describe, raised

_PR_SET_PDEATHSIG = 1
#: Sent by Linux when the daemon dies; it means "kill your whole group now".
PARENT_DEATH_SIGNAL = signal.SIGUSR2


class Terminated(BaseException):  # a signal, not an error of user code
    """Raised into user code when the supervisor asks the task to stop (SIGTERM)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _set_parent_death_signal() -> None:
    """Ask Linux to send us `PARENT_DEATH_SIGNAL` when the daemon dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watchdog thread still covers us
        pass


def _kill_own_group() -> None:
    """Kill this process and everything it started, at once."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent(parent: int) -> None:
    """Die with the daemon even if a signal handler can't run (user code stuck in C)."""
    while True:
        time.sleep(0.25)
        if os.getppid() != parent:
            _kill_own_group()


def _start_guard(parent: int, keep_fd: int) -> None:
    """Fork a guard into this process group that kills the group when the daemon dies.

    The signal handler and the watchdog thread are Python code: while user code
    sits in a C call that holds the GIL, neither can run.  The guard is a
    separate process with a GIL of its own.  It waits on a pidfd of the daemon
    and kills the whole group as soon as the daemon or this worker is gone.
    Without pidfds (not Linux) it polls the daemon's pid.
    """
    worker = os.getpid()
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None
    if os.getppid() != parent:  # the daemon died before the pidfd was opened
        _kill_own_group()
    if os.fork() != 0:
        if pidfd is not None:
            os.close(pidfd)
        return
    try:  # the guard: never returns into the worker's code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a timeout stops the worker, not us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(keep_fd)  # the daemon's socket: its end must see EOF when the worker dies
        while os.getppid() == worker:
            if pidfd is not None:
                if select.select([pidfd], [], [], 0.25)[0]:
                    break
            else:
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.25)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(0)


class _Supervisor:
    """The worker's end of the pipe, with the queue sink for user code."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def queue(self, specs: Sequence[TaskSpec], key: str | None) -> list[str]:
        """Send ``tullius.queue()`` calls to the daemon, which stores them and returns ids."""
        self.conn.send(("queue", plain_specs(specs), key))
        reply = self.conn.recv()
        if reply[0] == "ids":
            return list(reply[1])
        if reply[0] == "key_conflict":
            raise KeyConflict(*reply[1])
        raise StoreError(f"queue() failed in the daemon: {reply[1]}")


def plain_specs(specs: Sequence[TaskSpec]) -> list[TaskSpec]:
    """``specs`` with every value as the builtin type the store will keep (`stored_value`).

    Validation accepts subclasses (a ``StrEnum`` member is a ``str``, a
    pendulum time a ``datetime``), but pickled they name the user's class, and
    the supervisor, which never imports user code, would have to import it to
    read the message.
    """
    return [
        dataclasses.replace(
            spec,
            fields=stored_value(dict(spec.fields)),
            priority=stored_value(spec.priority),
            delay=None
            if spec.delay is None
            else timedelta(spec.delay.days, spec.delay.seconds, spec.delay.microseconds),
            start_after=None if spec.start_after is None else stored_time(spec.start_after),
        )
        for spec in specs
    ]


def _failure(kind: str, message: str, *, with_traceback: bool = False) -> Failure:
    text = bounded_traceback(traceback.format_exc()) if with_traceback else None
    return Failure(kind=kind, message=bounded_message(message), at=_now(), traceback=text)


def run_job(job: dict[str, Any], supervisor: _Supervisor) -> dict[str, Any]:
    """Carry out one job and describe how it ended, as plain data.

    1. Decode the task document and load its class (`UnknownTaskClass` and a
       malformed document are failures of kind ``unloadable``).
    2. Call ``run()`` or ``failed()`` with ``tullius.queue()`` routed to the daemon.
    3. Convert what it returned to specs (a bad value is ``bad_return``); any
       exception, even ``SystemExit``, is ``exception`` with its traceback.
    """
    kind = job["kind"]
    role = "run()" if kind == "run" else "failed()"
    try:
        doc = task_from_bson(job["task"])
        failure = None if job.get("failure") is None else failure_from_bson(job["failure"])
        task = from_doc(doc, failure=failure)
    except UnknownTaskClass as error:
        return _failed(_failure(FailureKind.UNLOADABLE, str(error)))
    except Exception as error:  # a document that can't be decoded must not kill the worker
        return _failed(
            _failure(
                FailureKind.UNLOADABLE,
                f"can't decode the task document: {describe(error)}",
                with_traceback=True,
            )
        )
    try:
        with api.queue_sink(supervisor.queue):
            returned = task.run() if kind == "run" else task.failed()
    except Terminated:
        raise
    except BaseException as error:  # user code: whatever it raises is recorded, never fatal
        # (a TaskDefinitionError too: a successor it built was refused inside it)
        return _failed(_failure(FailureKind.EXCEPTION, raised(role, error), with_traceback=True))
    try:
        specs = plain_specs(to_specs(returned, role=role))
    except Terminated:
        raise
    except TaskDefinitionError as error:
        return _failed(_failure(FailureKind.BAD_RETURN, str(error), with_traceback=True))
    except BaseException as error:  # user code again (an iterator, a ``fields`` property)
        return _failed(_failure(FailureKind.EXCEPTION, raised(role, error), with_traceback=True))
    return {"ok": True, "specs": specs}


def _failed(failure: Failure) -> dict[str, Any]:
    return {"ok": False, "failure": failure_to_bson(failure)}


def serve(conn: Connection) -> None:
    """Answer jobs until told to stop or the pipe closes."""
    supervisor = _Supervisor(conn)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "job":
            return
        result = run_job(message[1], supervisor)
        conn.send(("done", result))


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _on_parent_death(signum: int, frame: object) -> None:
    _kill_own_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tullius.runtime.worker FD``."""
    args = list(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    signal.signal(PARENT_DEATH_SIGNAL, _on_parent_death)
    _set_parent_death_signal()
    if os.getppid() != parent:  # the daemon died before the signal was armed
        _kill_own_group()
    fd = int(args[0])
    _start_guard(parent, fd)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    os.set_inheritable(fd, False)  # processes the task starts must not hold the daemon's socket
    conn = Connection(fd)
    try:
        serve(conn)
    except Terminated:
        return 143
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return 1  # the daemon went away mid-job; nothing to report to
    return 0


if __name__ == "__main__":
    sys.exit(main())
