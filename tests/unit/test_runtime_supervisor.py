"""The supervisor on an in-process MemoryStore, with real worker processes.

These run the daemon loop in the test process (no MongoDB): the README example,
scaled down, must time out, run failed() in a worker and end in success; a
stop request must leave nothing owned.  Conditions are polled through the
observer hook; nothing asserts how long anything took.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.unit.test_prune import queued, run_to_the_end
from tullius.band import Band
from tullius.demo import ChainPrinter, QuickExampleTask, queue_demo
from tullius.document import TERMINAL, FailureKind, Record, Status, status_of
from tullius.errors import StoreError, StoreUnavailable
from tullius.inspection import read_chain
from tullius.prune import MIN_AGE
from tullius.runtime import supervisor as supervisor_module
from tullius.runtime.config import Settings
from tullius.runtime.supervisor import Supervisor
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store


def settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "bands": (Band(2, 0, 10),),
        "embedded": True,
        "server_name": "unit",
        "lease": timedelta(seconds=6),
        "grace": 5.0,
    }
    values.update(changes)
    return Settings(**values)


def test_example_times_out_then_failed_runs_then_it_succeeds(
    capsys: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the quick example counting to 6 (1 s timeout, 0.2 s per count)
    store = MemoryStore()
    root = queue_demo(store, quick=True, count_to=6)
    printer = ChainPrinter(root)
    # When the supervisor runs until the whole chain is terminal
    supervisor = Supervisor(store, settings(), observer=printer)
    with caplog.at_level("INFO", logger="tullius.daemon"):
        assert supervisor.run() == 0
    # Then 6 and 5 timed out (5 counts take the whole timeout), each failed()
    # queued the next, and the last one, counting to 4 or less, succeeded
    chain = read_chain(store, root)
    counts = [link.fields["count_to"] for link in chain]
    assert counts == list(range(6, 6 - len(counts), -1))
    assert counts[-1] <= 4
    for link in chain[:-1]:
        assert link.status is Status.HANDLED
        assert link.failure is not None
        assert link.failure.kind == FailureKind.TIMEOUT
        assert link.failure.server == "unit"
    assert chain[-1].status is Status.SUCCEEDED
    out = capsys.readouterr().out
    assert "QuickExampleTask(count_to=6): failed (timeout)" in out
    assert f"QuickExampleTask(count_to={counts[-1]}): succeeded" in out
    assert supervisor.counters.timeouts == len(counts) - 1
    # And each handled failure's log line names the replacement it queued
    replacement = chain[1]
    assert (
        f"task {root} (tullius.demo:QuickExampleTask): handled; queued QuickExampleTask "
        f"{replacement.task_id} (priority {replacement.task.priority})"
    ) in [record.getMessage() for record in caplog.records]


class StopWhenRunning:
    """Observer: asks the supervisor to stop once the task's run has been claimed."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __call__(self, store: Store) -> bool:
        view = store.load(self.task_id)
        return view is not None and view.run is not None


def test_stop_past_grace_records_shutdown_so_failed_runs_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a supervisor with no grace running a task that would take 2 s
    store = MemoryStore()
    root = queue_demo(store, quick=True, count_to=10)
    supervisor = Supervisor(store, settings(grace=0.0), observer=StopWhenRunning(root))
    # When it is stopped as soon as the task runs
    with caplog.at_level("INFO", logger="tullius.daemon"):
        assert supervisor.run() == 0
    # Then its log says what the stop found and that it ended well
    messages = [record.getMessage() for record in caplog.records]
    assert "stopping: no new work; 1 running task(s) get 0s" in messages
    assert messages[-1] == "stopped: every verdict recorded"
    # Then the run failed as "shutdown", and no lease is left owned
    view = store.load(root)
    assert view is not None
    assert view.outcome is not None
    assert view.outcome.failure is not None
    assert view.outcome.failure.kind == FailureKind.SHUTDOWN
    assert all(v.current_lease() is None for v in store.all_views())
    # And a new supervisor runs failed() for it
    done = Supervisor(store, settings(), observer=lambda s: _terminal(s, root))
    assert done.run() == 0
    assert read_chain(store, root)[0].status is Status.HANDLED


def _terminal(store: Store, task_id: str) -> bool:
    view = store.load(task_id)
    return view is not None and status_of(view) in TERMINAL


def test_quick_example_class_is_five_times_faster() -> None:
    assert QuickExampleTask.timeout == timedelta(seconds=1)
    assert QuickExampleTask.seconds_per_count == 0.2


def test_a_sweep_leaves_alone_the_leases_of_our_own_claims_still_in_flight() -> None:
    # Given a supervisor whose claim has stored its lease but whose answer is not
    # yet collected (on MongoDB a slow claim runs beside sweeps on other threads)
    store = MemoryStore()
    root = queue_demo(store, quick=True, count_to=1)
    supervisor = Supervisor(store, settings())
    seen: list[frozenset[str]] = []
    supervisor.sweeper.work = lambda own: seen.append(own) or (lambda: None)  # type: ignore[method-assign]
    try:
        supervisor._claim_for(list(supervisor.slots), supervisor.settings.bands[0], 0)
        deadline = time.monotonic() + 60  # the claim runs on the store thread
        while (view := store.load(root)) is None or view.current_lease() is None:
            assert time.monotonic() < deadline, "the claim stored no lease within 60 s"
            time.sleep(0.01)
        # When a sweep is scheduled meanwhile
        supervisor._schedule_sweep()
        # Then it counts that lease as ours, so it can never fail it as lost
        lease = view.current_lease()
        assert lease is not None
        assert lease.token in seen[0]
    finally:
        supervisor._store_thread.close()


class StopTwiceWhenRunning:
    """Observer: once the task's run is claimed, asks for a stop twice, as a second
    SIGTERM or Ctrl-C does, and says it is satisfied only after that."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.supervisor: Supervisor | None = None

    def __call__(self, store: Store) -> bool:
        view = store.load(self.task_id)
        if view is None or view.run is None:
            return False
        assert self.supervisor is not None
        self.supervisor.request_stop()
        self.supervisor.request_stop()
        return False


def test_a_second_stop_signal_records_that_the_grace_was_skipped_not_that_it_ran_out() -> None:
    # Given a supervisor with a long grace running a task that would take 2 s
    store = MemoryStore()
    root = queue_demo(store, quick=True, count_to=10)
    observer = StopTwiceWhenRunning(root)
    supervisor = Supervisor(store, settings(grace=600.0), observer=observer)
    observer.supervisor = supervisor
    # When it is asked to stop twice as soon as the task runs
    assert supervisor.run() == 0
    # Then the task was killed at once and its failure says the grace was skipped,
    # not that the 600 s it never waited were over
    view = store.load(root)
    assert view is not None
    assert view.outcome is not None
    failure = view.outcome.failure
    assert failure is not None
    assert failure.kind == FailureKind.SHUTDOWN
    assert "second stop signal" in failure.message
    assert "over" not in failure.message


class DownOnceStopping(MemoryStore):
    """A store whose record inserts all fail once the supervisor is stopping, as
    when MongoDB goes away just as the daemon is stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.supervisor: Supervisor | None = None

    def insert_record(self, record: Record) -> Record:
        if self.supervisor is not None and self.supervisor._stopping:
            raise StoreUnavailable("insert record", "connection refused (simulated)")
        return super().insert_record(record)


def test_a_second_stop_signal_with_the_store_down_gives_up_counting_from_the_kills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a supervisor with a 600 s grace that gives up on unrecorded verdicts
    # 1 s after the kills, running a task, and a store that fails once it stops
    monkeypatch.setattr(supervisor_module, "FINISH_GIVE_UP", 1.0)
    store = DownOnceStopping()
    root = queue_demo(store, quick=True, count_to=10)
    observer = StopTwiceWhenRunning(root)
    supervisor = Supervisor(store, settings(grace=600.0), observer=observer)
    observer.supervisor = store.supervisor = supervisor
    # When it is asked to stop twice as soon as the task runs
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(supervisor.run()), daemon=True)
    thread.start()
    # Then it exits with status 1 soon after the kills, long before the grace it
    # skipped would have run out, and leaves the task to another daemon's sweep
    thread.join(timeout=120)
    assert not thread.is_alive(), "the daemon waited for the skipped grace to run out"
    assert exit_codes == [1]
    view = store.load(root)
    assert view is not None
    assert view.outcome is None


def test_a_lease_declared_lost_is_logged_by_the_task_id_chain_takes() -> None:
    from tullius.document import describe_lease, handler_id, run_id

    assert describe_lease(run_id("t1-ab")) == "task 't1-ab' run()"
    assert describe_lease(handler_id("t1-ab", 2)) == "task 't1-ab' failed() attempt 2"
    assert describe_lease("odd") == "record 'odd'"


def test_a_task_whose_priority_no_band_takes_is_logged_not_left_to_wait_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a due task of priority 50, and a daemon whose only band takes 0-10
    from tests.store_contract import make_doc

    store = MemoryStore()
    store.insert_tasks([make_doc("stuck-50", priority=50)])
    give_up = time.monotonic() + 120

    def warned(store: Store) -> bool:
        return time.monotonic() > give_up or any(
            "stuck-50" in record.getMessage() for record in caplog.records
        )

    # When the daemon runs until it says something about that task
    with caplog.at_level("WARNING", logger="tullius.daemon"):
        quick = settings(lease=timedelta(seconds=1.2))  # a check per lease: two agree
        assert Supervisor(store, quick, observer=warned).run() == 0
    # Then it warned, naming the task, its priority and what the running servers take
    (message,) = [r.getMessage() for r in caplog.records if "stuck-50" in r.getMessage()]
    assert "priority 50: 1, oldest due " in message
    assert "(e.g. Nothing stuck-50)" in message
    assert "unit 2:0-10" in message
    # And it recorded its bands for the other daemons' checks, and at its clean stop
    # that it stopped (so they stop counting on it at once); the task is untouched
    assert [(seen.server, seen.bands, seen.stopped) for seen in store.read_servers()] == [
        ("unit", (Band(2, 0, 10),), True)
    ]
    assert store.count_by_status() == {Status.QUEUED: 1}


class NoRightsOnServerEntries(MemoryStore):
    """A database whose user may not write ``tullius_servers`` (a refusal, not an outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 0

    def announce_server(self, seen: Any) -> None:
        self.refusals += 1
        # As pymongo words it: the server's full reply, with a new cluster time each call.
        raise StoreError(
            "record this server's bands failed: OperationFailure: not authorized on tullius, "
            f"full error: {{'ok': 0.0, 'operationTime': Timestamp({self.refusals}, 1)}}"
        )


def test_a_coverage_check_the_database_refuses_is_logged_once_and_leaves_leases_watched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a database that refuses the coverage check's write, every time
    store = NoRightsOnServerEntries()
    give_up = time.monotonic() + 120

    def three_refusals(store: Store) -> bool:
        assert isinstance(store, NoRightsOnServerEntries)
        return store.refusals >= 3 or time.monotonic() > give_up

    # When the daemon runs through three checks
    supervisor = Supervisor(store, settings(lease=timedelta(seconds=1.2)), observer=three_refusals)
    with caplog.at_level("INFO", logger="tullius.daemon"):
        assert supervisor.run() == 0
    assert store.refusals >= 3
    # Then it said so once, and did not take the refusal for an outage: no store error
    # counted, so its sweeper kept what it had observed of other servers' leases
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if "coverage check failed" in m] == [
        "coverage check failed: StoreError: record this server's bands failed: "
        "OperationFailure: not authorized on tullius; tulliusd runs on without it"
    ]
    assert supervisor.counters.store_errors == 0
    assert not [m for m in messages if "store call failed" in m]


class CountAnnouncements(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.stopping = False
        self.while_stopping = 0

    def announce_server(self, seen: Any) -> None:
        if self.stopping:
            self.while_stopping += 1
        super().announce_server(seen)


def test_a_daemon_in_its_grace_keeps_renewing_its_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon stopped while a 2 s run has a grace long enough to finish
    store = CountAnnouncements()
    root = queue_demo(store, quick=True, count_to=10)

    def stop_when_running(s: Store) -> bool:
        running = StopWhenRunning(root)(s)
        if running:
            store.stopping = True
        return running

    supervisor = Supervisor(
        store, settings(lease=timedelta(seconds=0.3), grace=30.0), observer=stop_when_running
    )
    # When it runs until it has stopped
    assert supervisor.run() == 0
    # Then its entry was renewed during the grace (a lease apart), not left to age
    # until --status called it "not seen (crashed, or cut off)"
    assert store.while_stopping >= 2
    assert read_chain(store, root)[0].outcome == "failed"  # (timed out meanwhile)


def test_a_daemon_keeping_finished_tasks_three_days_deletes_older_ones_while_it_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given three tasks that succeeded ten days ago, and the quick example queued now
    store = MemoryStore()
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    for n in range(3):
        queued(store, f"old{n}")
        run_to_the_end(store, f"old{n}", at=ten_days_ago)
    root = queue_demo(store, quick=True, count_to=3)

    # When a daemon keeping finished tasks three days runs, its first pass due at once,
    # until the old tasks are gone and the example has succeeded (or a minute went by)
    give_up_at = time.monotonic() + 60

    def pruned_and_done(store: Store) -> bool:
        if time.monotonic() > give_up_at:
            return True
        return store.find_tasks(["old0", "old1", "old2"]) == [] and _terminal(store, root)

    supervisor = Supervisor(store, settings(keep_finished=MIN_AGE), observer=pruned_and_done)
    assert supervisor.pruner is not None
    supervisor.pruner.next_at = 0.0
    with caplog.at_level("INFO", logger="tullius.daemon"):
        assert supervisor.run() == 0
    # Then the pass said what it deleted, and the example, finished just now, is kept
    assert (
        "pruned: deleted 3 task(s) finished over 3 day(s) ago, with their records (succeeded 3)"
        in [record.getMessage() for record in caplog.records]
    )
    assert read_chain(store, root)[-1].status is Status.SUCCEEDED
    assert store.count_by_status() == {Status.SUCCEEDED: 1}


def test_a_daemon_without_keep_finished_never_prunes() -> None:
    assert Supervisor(MemoryStore(), settings()).pruner is None
