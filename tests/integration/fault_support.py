"""Plumbing for the fault tests: daemons as subprocesses, one database per scenario, waiting.

The daemons are ``daemon_harness.Daemon`` subprocesses, each in a session of
its own so that a signal aimed at one (SIGKILL, SIGSTOP/SIGCONT, SIGTERM)
reaches only it.  The scenarios run several daemons with distinct server
names on one database, point daemons at a proxy or at a FerretDB of their
own, and always clean up after a failed scenario (kill leftover daemons and
task processes, drop the database).  `Scenario` bundles exactly that;
`wait_for` polls a condition with a deadline and rides through database
outages, so no test sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
from daemon_harness import Daemon, leftover_processes
from daemon_harness import wait_for as harness_wait_for
from ledger import Ledger, check_ledger, kill_leftovers, read_marks, settled

from tullius.api import insert_queued
from tullius.document import TaskView, status_of
from tullius.errors import StoreError
from tullius.runtime.mongo_store import MongoStore
from tullius.task import Task, to_spec

EXTERNAL_URI = os.environ.get("TULLIUS_TEST_MONGODB_URI") or None
#: As conftest decides it: in CI a missing test database is a failure, not a skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    on_timeout: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> Any:
    """`daemon_harness.wait_for` riding through database outages: a database
    error inside the predicate counts as "not yet"."""
    return harness_wait_for(
        predicate,
        timeout,
        what,
        interval,
        tolerate=(pymongo.errors.PyMongoError, StoreError),
        on_timeout=on_timeout,
    )


class Scenario:
    """One fault scenario: a fresh database, a marks directory, the daemons started on it."""

    def __init__(self, uri: str, workdir: Path, label: str) -> None:
        self.uri = uri
        self.workdir = workdir
        self.database = f"faults_{label[:30]}_{uuid.uuid4().hex[:8]}"
        self.marks = str(workdir / "marks")
        Path(self.marks).mkdir(parents=True, exist_ok=True)
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=5000
        )
        self.store = MongoStore(self.client[self.database], retry_for=timedelta(seconds=90))
        self.store.ensure_indexes()
        self.daemons: list[Daemon] = []

    # -- daemons -------------------------------------------------------------------------------

    def daemon(
        self,
        name: str,
        *,
        uri: str | None = None,
        processes: Iterable[str] = ("2:0-10",),
        lease: float = 2.0,
        poll: float = 0.02,
        grace: float = 5.0,
    ) -> Daemon:
        """Start ``tulliusd`` on this scenario's database as server ``name``."""
        daemon = Daemon(
            uri or self.uri,
            self.database,
            processes=tuple(processes),
            lease=lease,
            poll_interval=poll,
            grace=grace,
            server_name=name,
            log_dir=self.workdir,
            new_session=True,
        )
        self.daemons.append(daemon.start())
        return daemon

    def stop_all(self) -> dict[str, int]:
        return {d.server_name: d.stop() for d in self.daemons if d.running}

    def logs(self) -> str:
        return "\n".join(f"--- {d!r} (pid {d.pid}) ---\n{d.log_tail()}" for d in self.daemons)

    def describe(self) -> str:
        try:
            counts = self.store.count_by_status()
        except StoreError as error:
            counts = {"unavailable": repr(error)}  # type: ignore[dict-item]
        return f"status hints: {counts}\n{self.logs()}"

    # -- tasks ---------------------------------------------------------------------------------

    def queue(self, *tasks: Task) -> list[str]:
        """Insert root tasks directly (the test process is not a daemon)."""
        ids = insert_queued(
            self.store,
            [to_spec(t) for t in tasks],
            now=datetime.now(UTC),
            new_id=lambda: uuid.uuid4().hex,
        )
        for task, task_id in zip(tasks, ids, strict=True):
            task.task_id = task_id
        return ids

    def view(self, task_id: str) -> TaskView:
        view = self.store.load(task_id)
        assert view is not None, f"task {task_id} is not stored"
        return view

    def marks_of(self, task_id: str | None, what: str = "run") -> list[Any]:
        return [m for m in read_marks(self.marks) if m.task_id == task_id and m.what == what]

    def wait_marks(
        self, task_id: str | None, what: str = "run", count: int = 1, timeout: float = 120
    ) -> list[Any]:
        return wait_for(
            lambda: found if len(found := self.marks_of(task_id, what)) >= count else None,
            timeout,
            f"{count} {what!r} mark(s) of task {task_id}",
            on_timeout=self.describe,
        )

    def wait_status(self, task_id: str, statuses: Iterable[Any], timeout: float = 120) -> TaskView:
        wanted = set(statuses)
        return wait_for(
            lambda: (
                v
                if (v := self.store.load(task_id)) is not None and status_of(v) in wanted
                else None
            ),
            timeout,
            f"task {task_id} to reach {sorted(s.value for s in wanted)}",
            on_timeout=self.describe,
        )

    def settle(self, expect_at_least: int = 1, timeout: float = 180) -> None:
        """Wait until every stored task's hint is terminal."""
        wait_for(
            lambda: settled(self.store, expect_at_least),
            timeout,
            f"all tasks (at least {expect_at_least}) to be terminal",
            on_timeout=self.describe,
            interval=0.1,
        )

    def leftovers(self) -> list[int]:
        """Live processes started by any of this scenario's daemons (by their inherited tag)."""
        return [pid for d in self.daemons for pid in leftover_processes(d.tag)]

    def finish(self, **ledger_options: Any) -> Ledger:
        """Stop every daemon, then check the ledger and that nothing they started lives on."""
        self.stop_all()
        try:
            ledger = check_ledger(self.store, self.marks, **ledger_options)
            wait_for(
                lambda: not self.leftovers(),
                30,
                "every process of the stopped daemons to exit",
                on_timeout=lambda: f"still alive: {self.leftovers()}",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None
        return ledger

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        kill_leftovers(self.marks)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            if not EXTERNAL_URI or self.database.startswith("faults_"):
                self.client.drop_database(self.database)
        except pymongo.errors.PyMongoError:
            pass  # a dead private FerretDB takes its data with it
        self.client.close()
