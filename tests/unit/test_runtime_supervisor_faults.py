"""The daemon when user code or the machine misbehaves: a message it can't read,
a task stuck in C code when the daemon is SIGKILLed, a worker that can't be
started.  The supervisor runs on a MemoryStore with real worker processes (no
MongoDB); conditions are polled with generous deadlines."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.store_contract import make_doc
from tests.unit.test_runtime_supervisor import settings as supervisor_settings
from tullius.api import insert_queued
from tullius.band import Band
from tullius.document import TERMINAL, Record, RecordKind, Status, TaskSpec, status_of
from tullius.engine import Candidates, UnsureClaim
from tullius.errors import StoreError, StoreUnavailable
from tullius.runtime.config import Settings
from tullius.runtime.supervisor import Supervisor
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store


def settings(**changes: Any) -> Settings:
    return supervisor_settings(**{"bands": (Band(1, 0, 10),), **changes})


def queue_by_name(store: Store, class_name: str, **fields: Any) -> str:
    """Queue a task by its stored class name: the supervisor never imports the class."""
    spec = TaskSpec(
        class_name=class_name,
        fields=fields,
        priority=5,
        timeout=timedelta(seconds=10),
        handler_timeout=timedelta(seconds=10),
        handler_attempts=3,
    )
    [task_id] = insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
    return task_id


def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """A module the *workers* can import (PYTHONPATH), as a project's task module is."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), path) if p))
    monkeypatch.delitem(sys.modules, name, raising=False)


def terminal(task_id: str) -> Any:
    def observe(store: Store) -> bool:
        view = store.load(task_id)
        return view is not None and status_of(view) in TERMINAL

    return observe


def test_successor_field_of_a_user_str_subclass_does_not_crash_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task module the workers import (the supervisor never imports user
    # code), whose run() returns a successor with a StrEnum field: a str, so it
    # passes validation, but it is pickled as a reference to the user's class
    user_module(
        tmp_path,
        monkeypatch,
        "user_enum_tasks",
        """
        import enum
        from datetime import timedelta
        import tullius

        class Color(enum.StrEnum):
            RED = "red"

        class Paint(tullius.Task):
            timeout = timedelta(seconds=10)
            def run(self):
                return Paint(color=Color.RED, last=True) if not self.last else None
        """,
    )
    store = MemoryStore()
    root = queue_by_name(store, "user_enum_tasks:Paint", color="blue", last=False)
    # When the daemon runs it
    supervisor = Supervisor(store, settings(), observer=terminal(root))
    # Then the daemon neither crashes nor strands the task: its run is decided
    assert supervisor.run() == 0
    view = store.load(root)
    assert view is not None
    assert status_of(view) in TERMINAL


DAEMON = """
import sys
from datetime import UTC, datetime, timedelta
from tullius.api import insert_queued
from tullius.band import Band
from tullius.document import TaskSpec
from tullius.runtime.config import Settings
from tullius.runtime.supervisor import Supervisor
from tullius.sim.memory_store import MemoryStore

store = MemoryStore()
spec = TaskSpec(class_name=sys.argv[1], fields={"pidfile": sys.argv[2]}, priority=5,
    timeout=timedelta(seconds=60), handler_timeout=timedelta(seconds=10), handler_attempts=3)
insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
Supervisor(store, Settings(bands=(Band(1, 0, 10),), embedded=True, server_name="x")).run()
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_holding_the_gil_does_not_outlive_a_killed_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal
    import subprocess
    import time

    # Given a task stuck in C code that holds the GIL (no Python signal handler
    # and no Python thread of its worker can run meanwhile)
    user_module(
        tmp_path,
        monkeypatch,
        "user_gil_tasks",
        """
        import os
        from datetime import timedelta
        import tullius

        class Spin(tullius.Task):
            timeout = timedelta(seconds=60)
            def run(self):
                with open(self.pidfile + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(self.pidfile + ".tmp", self.pidfile)
                sum(range(10**12))
        """,
    )
    pidfile = tmp_path / "worker.pid"
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, "user_gil_tasks:Spin", str(pidfile)])
    worker = 0
    try:
        deadline = time.monotonic() + 60  # a python daemon, then its worker, start
        while not pidfile.exists():
            assert time.monotonic() < deadline
            assert daemon.poll() is None
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        # Wait until it spins in sum(): CPU time it used after writing its pid file
        spun_from = _cpu_seconds(worker)
        deadline = time.monotonic() + 60
        while _cpu_seconds(worker) - spun_from < 0.2:
            assert time.monotonic() < deadline, "the task did not start spinning within 60 s"
            assert daemon.poll() is None
            time.sleep(0.05)
        # When the daemon is killed with SIGKILL
        daemon.kill()
        daemon.wait()
        # Then the task process dies with it (README: "task processes never
        # outlive their daemon, even when it is killed with SIGKILL")
        deadline = time.monotonic() + 60
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the task process outlived its SIGKILLed daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if worker and _alive(worker):
            os.killpg(worker, signal.SIGKILL)


class KillWorkerWhileClaiming(MemoryStore):
    """The worker a claim is for dies while the claim is in flight (OOM killer, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.supervisor: Supervisor | None = None
        self.killed = False

    def find_due(self, *args: Any, **kwargs: Any) -> Any:
        import signal

        found = super().find_due(*args, **kwargs)
        if found and not self.killed and self.supervisor is not None:
            self.killed = True
            for slot in self.supervisor.slots:
                if slot.worker is not None:
                    slot.worker.signal_group(signal.SIGKILL)
                    slot.worker.proc.wait()
        return found


def test_claimed_job_whose_worker_never_starts_does_not_hang_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from tullius.demo import QuickExampleTask
    from tullius.runtime import supervisor as supervisor_module
    from tullius.task import to_spec

    # Given a daemon whose worker dies while its claim is in flight, and which
    # then can't start another worker (fork failing under memory pressure)
    store = KillWorkerWhileClaiming()
    spec = to_spec(QuickExampleTask(count_to=1))  # timeout 1 s
    [root] = insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
    real = supervisor_module.WorkerProcess
    started: list[Any] = []

    def worker_process(name: str) -> Any:
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(name)
        return real(name)

    monkeypatch.setattr(supervisor_module, "WorkerProcess", worker_process)
    began = time.monotonic()
    seen: list[Status] = []

    def observe(s: Store) -> bool:
        view = s.load(root)
        assert view is not None
        status = status_of(view)
        # well past the task's timeout (1 s) + the lease (1.2 s), even on a loaded machine
        if status is Status.QUEUED or seen:
            return bool(seen)
        if status is not Status.RUNNING or time.monotonic() - began > 30:
            seen.append(status)
        return bool(seen)

    supervisor = Supervisor(
        store, settings(lease=timedelta(seconds=1.2), grace=0.0), observer=observe
    )
    store.supervisor = supervisor
    supervisor.run()
    # Then the claimed task did not stay RUNNING, its lease renewed by a daemon
    # that can never run it, until the daemon is stopped
    assert store.killed
    assert seen[0] is not Status.RUNNING, "still RUNNING 30 s after the claim of a 1 s task"


class LoseTheFirstClaimsAcknowledgement(MemoryStore):
    """The first lease insert is stored, then the connection drops before the reply
    (and the store's own retries run out): the daemon sees a `StoreError`."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_token: str | None = None

    def insert_record(self, record: Record) -> Record:
        stored = super().insert_record(record)
        if record.kind is RecordKind.RUN and self.lost_token is None:
            self.lost_token = record.token
            raise StoreError("connection reset after the insert (simulated)")
        return stored


def test_a_claim_whose_acknowledgement_was_lost_still_runs_its_task() -> None:
    from tullius.demo import QuickExampleTask
    from tullius.task import to_spec

    # Given a daemon whose first claim was stored but never acknowledged
    store = LoseTheFirstClaimsAcknowledgement()
    spec = to_spec(QuickExampleTask(count_to=0))
    [root] = insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
    # When it runs until the task is over
    Supervisor(store, settings(), observer=terminal(root)).run()
    # Then its next claim found the stored lease to be its own and ran the task under it,
    # instead of leaving it unrenewed for a sweep to fail as lost without a run
    view = store.load(root)
    assert view is not None
    assert status_of(view) is Status.SUCCEEDED
    assert view.run is not None
    assert view.run.token == store.lost_token


class FailTheSecondLeaseInsert(MemoryStore):
    """The second lease insert fails, not stored (the store's retries ran out).  The
    queue looks empty to any claim that is not for both slots at once."""

    def __init__(self) -> None:
        super().__init__()
        self.inserts = 0
        self.supervisor: Supervisor | None = None

    def find_due(self, *args: Any, **kwargs: Any) -> Any:
        slots = [] if self.supervisor is None else self.supervisor.slots
        if sum(slot.claiming for slot in slots) < 2 and not self.inserts:
            return []  # not a claim for both slots: nothing due yet
        return super().find_due(*args, **kwargs)

    def insert_record(self, record: Record) -> Record:
        if record.kind is RecordKind.RUN:
            self.inserts += 1
            if self.inserts == 2:
                raise StoreError("connection reset before the insert (simulated)")
        return super().insert_record(record)


def test_a_claim_interrupted_by_a_store_error_still_runs_the_jobs_it_won() -> None:
    from tullius.demo import QuickExampleTask
    from tullius.task import to_spec

    # Given a daemon with two idle workers, two tasks, and a store failing the second
    # lease insert of its claim for both
    store = FailTheSecondLeaseInsert()
    specs = [to_spec(QuickExampleTask(count_to=0)) for _ in range(2)]
    ids = iter(["t1", "t2"])
    roots = insert_queued(store, specs, now=datetime.now(UTC), new_id=ids.__next__)

    def both_over(s: Store) -> bool:
        return all(terminal(root)(s) for root in roots)

    # When it runs until both are over
    supervisor = Supervisor(store, settings(bands=(Band(2, 0, 10),)), observer=both_over)
    store.supervisor = supervisor
    supervisor.run()
    # Then the job won before the error ran (not left for a sweep to fail as lost),
    # and the other task was claimed again
    assert store.inserts >= 3
    for root in roots:
        view = store.load(root)
        assert view is not None
        assert status_of(view) is Status.SUCCEEDED, view.outcome


class SettledMeanwhile(Candidates):
    """A band's candidates whose unsure claim a claim on a store thread settles right
    after the main thread's first look: the second read finds none left."""

    def __init__(self, unsure: UnsureClaim) -> None:
        self._reads = 0
        self._unsure = unsure
        super().__init__(timedelta(seconds=1), unsure_for=timedelta(seconds=30))

    @property  # type: ignore[override]
    def unsure(self) -> tuple[UnsureClaim, ...]:
        self._reads += 1
        return (self._unsure,) if self._reads == 1 else ()

    @unsure.setter
    def unsure(self, value: tuple[UnsureClaim, ...]) -> None:
        pass  # (set by Candidates.__init__)


def test_a_sweep_scheduled_while_a_claim_settles_an_unsure_one_reads_it_once() -> None:
    # Given a daemon whose band has an unsure claim that a store thread settles
    # between two reads of the main thread (the sweep's own tokens used to read it
    # twice: `is not None`, then `.token` of what had become None)
    supervisor = Supervisor(MemoryStore(), settings())
    unsure = UnsureClaim(make_doc("a"), "w0.0", "t-unsure", datetime.now(UTC))
    supervisor._candidates = [SettledMeanwhile(unsure)]
    seen: list[frozenset[str]] = []
    supervisor.sweeper.work = lambda own: seen.append(own)  # type: ignore[assignment,method-assign,func-returns-value]
    supervisor._submit = lambda work, done: None  # type: ignore[method-assign]
    try:
        # When the main thread schedules a sweep
        supervisor._schedule_sweep()
    finally:
        supervisor._store_thread.close()
    # Then it did not crash, and the lease it saw unsure is its own to that sweep
    assert seen == [frozenset({"t-unsure"})]


def test_the_log_says_how_a_task_failed_and_tells_a_failed_handler_attempt_from_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a task whose run() raises and whose failed() raises too
    user_module(
        tmp_path,
        monkeypatch,
        "user_log_tasks",
        """
        from datetime import timedelta
        import tullius

        class Broken(tullius.Task):
            timeout = timedelta(seconds=10)
            def run(self):
                raise ValueError("bad invoice 7")
            def failed(self):
                raise KeyError("no handler")
        """,
    )
    store = MemoryStore()
    root = queue_by_name(store, "user_log_tasks:Broken")
    # When the daemon runs it until failed() has failed on every attempt
    caplog.set_level(logging.INFO, logger="tullius.daemon")
    assert Supervisor(store, settings(), observer=terminal(root)).run() == 0
    # Then its activity log names the class, the kind and the message of the failure,
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"task {root}")]
    assert (
        f"task {root} (user_log_tasks:Broken): failed (exception): "
        "run() raised ValueError: bad invoice 7"
    ) in lines
    # says of each failed attempt of failed() that it is that, not the task failing again,
    attempts = [line for line in lines if "failed() attempt failed (exception)" in line]
    assert len(attempts) == 2
    assert all("KeyError" in line for line in attempts)
    assert f"task {root}: failed" not in lines
    # and the UNHANDLED warning ends with the last error
    [unhandled] = [line for line in lines if "UNHANDLED" in line]
    assert unhandled.endswith("exception: failed() raised KeyError: 'no handler'")


def test_a_verdict_past_its_write_window_is_given_up_and_the_task_fails_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tullius.clock import window_seconds
    from tullius.document import FailureKind
    from tullius.inspection import read_chain
    from tullius.policy import WRITE_WINDOW

    # Given a task whose run() waits for a file, and a daemon whose write clock
    # jumps a write window and a day ahead (the server paused, say) once the
    # claim is written, before the file appears
    flag = tmp_path / "go"
    user_module(
        tmp_path,
        monkeypatch,
        "user_window_tasks",
        f"""
        import os, time
        from datetime import timedelta
        import tullius

        class WaitForFile(tullius.Task):
            timeout = timedelta(seconds=120)
            def run(self):
                deadline = time.monotonic() + 60
                while not os.path.exists({str(flag)!r}) and time.monotonic() < deadline:
                    time.sleep(0.01)
            def failed(self):
                return None
        """,
    )
    store = MemoryStore()
    root = queue_by_name(store, "user_window_tasks:WaitForFile")
    jump = [0.0]

    def observe(s: Store) -> bool:
        view = s.load(root)
        assert view is not None
        if view.task.status is Status.RUNNING and not jump[0]:  # the claim's last write
            jump[0] = (WRITE_WINDOW + timedelta(days=1)).total_seconds()
            flag.write_text("")
        return status_of(view) in TERMINAL

    supervisor = Supervisor(
        store,
        settings(lease=timedelta(seconds=1.2)),
        observer=observe,
        write_clock=lambda: window_seconds() + jump[0],
    )
    # When it runs the task to its end
    with caplog.at_level("ERROR", logger="tullius.daemon"):
        assert supervisor.run() == 0
    # Then the run's result was given up, said so, and the task failed as lost
    # instead, with failed() run: nothing was written for the run past its window
    assert supervisor.counters.given_up == 1
    assert any("given up" in record.getMessage() for record in caplog.records)
    (link,) = read_chain(store, root)
    assert link.status is Status.HANDLED
    assert link.failure is not None
    assert link.failure.kind == FailureKind.LOST


def test_a_sweep_writes_nothing_once_a_write_window_after_it_started_has_passed() -> None:
    import random

    from tullius.clock import SystemClock
    from tullius.errors import WriteWindowClosed
    from tullius.policy import WRITE_WINDOW, LeaseTimings
    from tullius.runtime.sweeper import Sweeper

    # Given a task whose hint says running but whose records say queued (a
    # repair would write), and a sweeper whose write clock jumps past the window
    store = MemoryStore()
    store.insert_tasks([make_doc("t1")])
    store.set_status("t1", Status.RUNNING, None)
    readings = iter([0.0])
    sweeper = Sweeper(
        store,
        LeaseTimings(timedelta(seconds=6)),
        server="s",
        clock=SystemClock(),
        rng=random.Random(0),
        write_clock=lambda: next(readings, WRITE_WINDOW.total_seconds() + 1),
    )
    # When it sweeps
    with pytest.raises(WriteWindowClosed, match="SetStatus given up"):
        sweeper.work(frozenset())()
    # Then the hint was left as it was
    view = store.load("t1")
    assert view is not None
    assert view.task.status is Status.RUNNING


class HoldTheVerdict(MemoryStore):
    """Refuses the run's outcome record (an outage, for the verdict only) until
    released, counting the lease's renewals meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.released = False
        self.beats_while_held = 0

    def insert_record(self, record: Record) -> Record:
        if record.kind is RecordKind.OUTCOME and not self.released:
            self.holding = True
            raise StoreError("the database is out of reach (simulated)")
        return super().insert_record(record)

    def beat(self, record_id: str) -> int | None:
        if self.holding and not self.released:
            self.beats_while_held += 1
        return super().beat(record_id)


def test_a_verdict_held_up_by_the_store_keeps_its_lease_renewed() -> None:
    import time

    from tullius.demo import QuickExampleTask
    from tullius.task import to_spec

    # Given a daemon whose run ended while its verdict can't be recorded
    store = HoldTheVerdict()
    spec = to_spec(QuickExampleTask(count_to=0))
    [root] = insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
    deadline = time.monotonic() + 30

    def observe(s: Store) -> bool:
        # released once the lease was renewed three times while held (or, failing
        # that, after a generous deadline, so that the assertion below reports it)
        if store.holding and (store.beats_while_held >= 3 or time.monotonic() > deadline):
            store.released = True
        return terminal(root)(s)

    # When it runs until the verdict is recorded, with a lease of 1.2 s
    Supervisor(store, settings(lease=timedelta(seconds=1.2)), observer=observe).run()
    # Then it went on renewing the lease while the verdict waited (unrenewed, another
    # daemon back from the same outage failed a success as lost), and the run's
    # own verdict was recorded
    assert store.beats_while_held >= 3
    view = store.load(root)
    assert view is not None
    assert status_of(view) is Status.SUCCEEDED


class SlowClaimLostMeanwhile(MemoryStore):
    """A slow database: once our claim's lease is stored, the claim takes another
    ``delay`` seconds to return, and meanwhile another server's sweep fails that
    lease as lost (as a daemon on a loaded FerretDB once saw)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.swept: list[str] = []

    def insert_record(self, record: Record) -> Record:
        import time

        from tullius.engine import apply_step, drive
        from tullius.events import LeaseExpired
        from tullius.machine import step

        stored = super().insert_record(record)
        if record.kind is RecordKind.RUN and not self.swept and stored.token == record.token:
            self.swept.append(record.record_id)
            view = self.load(record.task_id)
            assert view is not None
            now = datetime.now(UTC)
            decided = step(view, LeaseExpired(record.record_id, "rival"), now=now)
            drive(self, apply_step(view, decided, now=now))
            time.sleep(self.delay)
        return stored


def test_a_job_whose_lease_was_failed_as_lost_during_a_slow_claim_is_not_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tullius.demo import QuickExampleTask
    from tullius.task import to_spec

    # Given a daemon (lease 1.2 s, so a heartbeat of 0.2 s) whose claim of a task
    # takes 0.6 s after its lease is stored, while another server fails that lease
    # as lost
    store = SlowClaimLostMeanwhile(delay=0.6)
    spec = to_spec(QuickExampleTask(count_to=0))
    [root] = insert_queued(store, [spec], now=datetime.now(UTC), new_id=lambda: "t1")
    # When it runs until the task is settled
    with caplog.at_level(logging.INFO, logger="tullius.daemon"):
        Supervisor(store, settings(lease=timedelta(seconds=1.2)), observer=terminal(root)).run()
    # Then its run() was never started (it would have run after its failure was
    # recorded, and beside the failed() that failure calls), and that is logged
    lines = [record.getMessage() for record in caplog.records]
    assert store.swept == [f"{root}:run"]
    assert not [line for line in lines if line.startswith(f"task {root}: run() started")]
    assert (
        f"task {root}: another server ended our lease before its run() started; not starting it"
        in lines
    )
    # And the failure as lost was handled, once
    view = store.load(root)
    assert view is not None
    assert status_of(view) is Status.HANDLED
    assert view.outcome is not None
    assert view.outcome.failure is not None
    assert view.outcome.failure.kind == "lost"


class HintAckLostOnce(MemoryStore):
    """The first claim's hint write is applied, but its acknowledgement is lost: the
    claim ends with a store error, its lease stored but unsure, and the band's next
    claim (a second later) settles it as this daemon's job.  Beats and starts are
    noted in the order they happen."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_once = False
        self.happened: list[str] = []

    def set_status(self, task_id: str, status: Status, due_at: datetime | None) -> bool:
        done = super().set_status(task_id, status, due_at)
        if status is Status.RUNNING and not self.failed_once:
            self.failed_once = True
            raise StoreUnavailable("set status", "acknowledgement lost (simulated)")
        return done

    def beat(self, record_id: str) -> int | None:
        self.happened.append(f"beat {record_id}")
        return super().beat(record_id)


class NoteStarts(logging.Handler):
    def __init__(self, happened: list[str]) -> None:
        super().__init__()
        self.happened = happened

    def emit(self, record: logging.LogRecord) -> None:
        if " started in worker " in record.getMessage():
            self.happened.append(record.getMessage().split(" in worker ")[0])


def test_a_job_settled_from_an_unsure_claim_is_renewed_before_it_starts() -> None:
    from tullius.demo import QuickExampleTask
    from tullius.task import to_spec

    # Given a daemon (heartbeat 0.4 s) whose claim of a task stored its lease but
    # lost the reply to its hint write, so that the next claim, a second later,
    # settles the lease as its own: a lease over a heartbeat old, never renewed
    store = HintAckLostOnce()
    [root] = insert_queued(
        store, [to_spec(QuickExampleTask(count_to=1))], now=datetime.now(UTC), new_id=lambda: "t1"
    )
    handler = NoteStarts(store.happened)
    daemon_log = logging.getLogger("tullius.daemon")
    daemon_log.addHandler(handler)
    daemon_log.setLevel(logging.INFO)
    try:
        # When it runs until the task is settled
        Supervisor(store, settings(lease=timedelta(seconds=2.4)), observer=terminal(root)).run()
    finally:
        daemon_log.removeHandler(handler)
    # Then the lease was renewed before the run started (else another server's sweep,
    # seeing it unrenewed since the first claim, could fail it as lost as it starts)
    assert store.failed_once
    assert store.happened[:2] == [f"beat {root}:run", f"task {root}: run() started"]
    view = store.load(root)
    assert view is not None
    assert status_of(view) is Status.SUCCEEDED
