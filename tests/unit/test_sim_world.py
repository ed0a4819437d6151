"""Smaller pieces of the simulator: clock, trees, bands, lease loss, close(), and that
the invariants do catch a broken store."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tullius
from tests.store_contract import make_doc, make_record
from tullius.document import Origin, Record, RecordKind, Status, TaskDoc, outcome_id
from tullius.sim import (
    InvariantViolation,
    ServerClock,
    SimClock,
    Simulation,
    StoreOutage,
    tracebacks,
)
from tullius.sim import simulation as simulation_module
from tullius.sim.clock import to_us
from tullius.sim.invariants import Invariants
from tullius.sim.memory_store import MemoryStore
from tullius.testing import assert_chain, assert_outcomes, describe_chain, expect

ORDER: list[int] = []


class Fanout(tullius.Task):
    timeout = timedelta(seconds=10)
    depth: int

    def run(self) -> Any:
        time.sleep(1)
        if self.depth:
            return [self.copy(depth=self.depth - 1), self.copy(depth=self.depth - 1)]
        return None


class Urgent(tullius.Task):
    timeout = timedelta(seconds=10)
    n: int

    def run(self) -> None:
        ORDER.append(self.n)
        time.sleep(2)


def test_sim_clock_counts_exact_microseconds_and_skews_only_wall_time() -> None:
    clock = SimClock(datetime(2030, 1, 1, tzinfo=UTC))
    clock.advance(timedelta(seconds=4.999999))
    clock.advance(timedelta(microseconds=1))
    assert clock.monotonic() == 5.0
    assert clock.now() == datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)
    skewed = ServerClock(clock, timedelta(minutes=-3))
    assert skewed.now() == clock.now() - timedelta(minutes=3)
    assert skewed.monotonic() == clock.monotonic()
    assert to_us(timedelta(days=1, microseconds=7)) == 86_400_000_007
    with pytest.raises(ValueError, match="never goes back"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="aware"):
        SimClock(datetime(2030, 1, 1))  # naive on purpose: the point of the test


def test_tree_holds_every_successor_and_chain_follows_the_first() -> None:
    sim = Simulation(seed=1)
    root = Fanout(depth=2)
    sim.queue(root)
    counts = sim.drain(within=timedelta(minutes=5))
    assert counts.succeeded == 7
    assert len(sim.tree(root).walk()) == 7
    assert_chain(sim.chain(root), [expect("succeeded", depth=d) for d in (2, 1, 0)])
    sim.close()


class Receipt(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        pass


class Invoices(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> list[tullius.Task]:
        return [Receipt(n=n) for n in range(6)]


def test_a_trees_children_are_in_the_order_run_returned_them() -> None:
    # Children are found by id, and ids are hashes: the tree listed them shuffled.
    sim = Simulation(seed=1)
    root = Invoices()
    sim.queue(root)
    sim.drain(within=timedelta(minutes=5))
    tree = sim.tree(root)
    assert [child.link.fields["n"] for child in tree.children] == list(range(6))
    assert [child.link.task_id for child in tree.children] == list(tree.link.children)
    sim.close()


def test_urgent_tasks_go_first_and_a_reserved_band_serves_only_them() -> None:
    ORDER.clear()
    sim = Simulation(seed=2, task_processes=[(1, 0, 10), (1, 0, 0)])
    sim.queue([Urgent(n=n, priority=5) for n in range(3)])
    sim.queue([Urgent(n=10 + n, priority=0) for n in range(3)])
    sim.drain(within=timedelta(minutes=5))
    # the two workers start on urgent work; priority 5 waits for the general band
    assert ORDER[:2] == [10, 11] or sorted(ORDER[:2]) == [10, 11]
    assert sorted(ORDER[:3]) == [10, 11, 12]
    sim.close()


def test_a_server_cut_off_from_the_store_loses_its_lease_and_stops_its_work() -> None:
    sim = Simulation(seed=3, servers=2, task_processes=[(1, 0, 10)], keep_trace=True)
    long = LongRun()
    sim.queue(long)
    sim.run_for(timedelta(seconds=1.5))
    owner = sim.chain(long)[0].server
    assert owner is not None
    sim.apply([StoreOutage(at=sim.elapsed, duration=timedelta(seconds=90), server=owner)])
    sim.drain(within=timedelta(minutes=10))
    sim.run_for(timedelta(minutes=3))  # the outage ends; the old owner learns it lost the lease
    assert_outcomes(sim.chain(long), "lost")
    assert any("lease lost: stopping LongRun.run()" in line for line in sim.trace)
    sim.close()


class LongRun(tullius.Task):
    timeout = timedelta(minutes=5)

    def run(self) -> None:
        time.sleep(200)


def test_close_stops_the_threads_of_tasks_left_sleeping() -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("tullius-sim-user")}
    sim = Simulation(seed=4)
    sim.queue([LongRun() for _ in range(3)])
    sim.run_for(timedelta(seconds=5))
    sim.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {t for t in threading.enumerate() if t.name.startswith("tullius-sim-user")}
        if not left - before:
            break
        time.sleep(0.01)
    assert not left - before


class OverwritingStore(MemoryStore):
    """A broken store: a second insert of an outcome replaces the first."""

    def insert_record(self, record: Record) -> Record:
        if record.kind.value == "outcome":
            self._records.pop(record.record_id, None)
        return super().insert_record(record)


def test_the_invariants_catch_a_store_whose_first_insert_does_not_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(simulation_module, "MemoryStore", OverwritingStore)
    sim = Simulation(seed=5, servers=2, task_processes=[(1, 0, 10)])
    task = LongRun()
    sim.queue(task)
    sim.run_for(timedelta(seconds=1.5))
    owner = sim.chain(task)[0].server
    assert owner is not None
    paused_at = sim.elapsed
    sim.pause_server(owner, at=paused_at, duration=timedelta(seconds=250))
    # When it wakes, its store is out for a while: its heartbeat can't learn that the
    # lease was lost before the run returns, so it tries to record the late outcome.
    sim.store_outage(at=paused_at + timedelta(seconds=245), duration=timedelta(seconds=20))
    sim.drain(within=timedelta(minutes=10))  # s2 declares the run lost and handles it
    with pytest.raises(InvariantViolation, match="seed=5") as caught:
        sim.run_for(timedelta(minutes=5))  # the paused owner wakes up and overwrites it
    assert "ServerPause" in str(caught.value)
    assert caught.value.promise in {"no terminal task resurrected", "one accepted outcome"}
    sim.close()


def test_assert_chain_explains_a_mismatch_with_the_whole_chain() -> None:
    sim = Simulation(seed=6)
    root = Fanout(depth=1)
    sim.queue(root)
    sim.drain(within=timedelta(minutes=5))
    with pytest.raises(AssertionError, match=r"link 1: depth=0, expected 7") as caught:
        assert_chain(sim.chain(root), [expect("succeeded"), expect("succeeded", depth=7)])
    assert describe_chain(sim.chain(root)) in str(caught.value)
    with pytest.raises(AssertionError, match="the chain has 2 link"):
        assert_outcomes(sim.chain(root), "succeeded")
    sim.close()


class HandlerAlwaysRaises(tullius.Task):
    timeout = timedelta(seconds=5)
    failed_attempts = 2

    def run(self) -> None:
        raise RuntimeError("declined")

    def failed(self) -> None:
        raise ValueError("handler broken")


def test_a_chain_description_says_when_a_task_was_left_unhandled() -> None:
    # Its outcome is "failed" like a handled one: only the status tells an operator's
    # case from a failure that failed() dealt with.
    sim = Simulation(seed=8)
    task = HandlerAlwaysRaises()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=5))
    [link] = sim.chain(task)
    assert link.status is Status.UNHANDLED
    assert describe_chain([link]).endswith(
        "[failed() error exception: failed() raised ValueError: handler broken; "
        "left unhandled after 2 attempt(s)]"
    )
    sim.close()


def test_a_task_whose_class_cannot_be_loaded_fails_visibly() -> None:
    sim = Simulation(seed=7)
    spec = tullius.task.to_spec(LongRun())
    missing = dataclasses.replace(spec, class_name="nowhere.to.be.found:Ghost")
    [task_id] = sim._insert_roots([missing], sim.now)  # as if another program had queued it
    counts = sim.drain(within=timedelta(minutes=5))
    [link] = sim.chain(task_id)
    assert link.failure is not None
    assert link.failure.kind == "unloadable"
    assert "nowhere.to.be.found" in link.failure.message
    assert counts.unhandled + counts.handled == 1
    sim.close()


def _raise_chained() -> None:
    try:
        {"a": 1}["b"]
    except KeyError as error:
        raise ValueError("wrapped") from error


def _raise_group() -> None:
    raise ExceptionGroup("group", [ValueError("a"), TypeError("b")])


def _recurse(n: int) -> int:
    return _recurse(n + 1) if n < 40 else 1 // 0


@pytest.mark.parametrize("raiser", [_raise_chained, _raise_group, lambda: _recurse(0)])
def test_stored_tracebacks_are_exactly_what_traceback_formats(raiser: Any) -> None:
    # The simulator memoises the formatting of frames; its text must not differ,
    # the first time or after (same frames again), for chains, groups and recursion.
    for _ in range(3):
        with pytest.raises(Exception) as caught:  # noqa: PT011  # any error will do
            raiser()
        error = caught.value
        assert tracebacks.format_exception(error) == "".join(traceback.format_exception(error))


class LeastUrgentFirstStore(MemoryStore):
    """A broken store: claims (which ask for failed and queued work) see the least urgent
    first; the checker's own query (queued tasks only) is answered correctly."""

    def find_due(
        self,
        statuses: Sequence[Status],
        min_priority: float,
        max_priority: float,
        now: datetime,
        limit: int,
    ) -> list[TaskDoc]:
        due = super().find_due(statuses, min_priority, max_priority, now, 10_000)
        if Status.FAILED in statuses:
            due.reverse()
        return due[:limit]


def test_the_invariants_catch_a_claim_that_skips_more_urgent_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(simulation_module, "MemoryStore", LeastUrgentFirstStore)
    with Simulation(seed=4, task_processes=[(1, 0, 10)]) as sim:
        sim.queue([Urgent(n=n, priority=p) for n, p in ((1, 0), (2, 5))])
        with pytest.raises(InvariantViolation) as caught:
            sim.drain(within=timedelta(minutes=5))
        assert caught.value.promise == "priority order"


def outcome_of(task_id: str, token: str) -> Record:
    """An accepted ``ok`` outcome of ``task_id`` with no successors, stored by ``token``."""
    return make_record(
        task_id, token=token, record_id=outcome_id(task_id), kind=RecordKind.OUTCOME, ok=True
    )


def test_the_invariants_catch_one_outcome_accepted_for_two_drivers() -> None:
    # Given a checker that saw the outcome of "t" accepted for its owner "a"
    invariants = Invariants()
    invariants.on_accepted(outcome_of("t", "a"), "a", make_record("t", token="a"))
    assert invariants.violation is None
    # When another driver, "b", is told the outcome it stored was accepted too
    invariants.on_accepted(outcome_of("t", "b"), "b", None)
    # Then the checker reports two accepted outcomes for one run
    assert invariants.violation is not None
    assert invariants.violation.promise == "one accepted outcome"


@pytest.mark.parametrize(
    ("stored_token", "owner_token"), [("rival", "a"), ("a", "rival")], ids=["record", "lease"]
)
def test_the_invariants_catch_a_result_accepted_for_a_driver_that_does_not_own_it(
    stored_token: str, owner_token: str
) -> None:
    # Given a checker
    invariants = Invariants()
    # When driver "a" is told its result was accepted, but the stored record, or the
    # lease it ended, carries another token
    invariants.on_accepted(outcome_of("t", stored_token), "a", make_record("t", token=owner_token))
    # Then the checker reports a result accepted from someone other than the owner
    assert invariants.violation is not None
    assert invariants.violation.promise == "accepted result comes from the owner"


def test_the_invariants_catch_a_task_nobody_queued_or_spawned() -> None:
    # Given a store holding a root task "p", queued by the application, whose run
    # succeeded with no successors
    store = MemoryStore()
    store.insert_tasks([make_doc("p")])
    store.insert_record(make_record("p"))
    store.insert_record(outcome_of("p", "tok"))
    stray_root = make_doc("stray")
    stray_child = dataclasses.replace(make_doc("child"), origin=Origin.SUCCESSOR, parent_id="p")
    store.insert_tasks([stray_root, stray_child])
    for doc, promise in (
        (make_doc("p"), None),
        (stray_root, "conservation"),
        (stray_child, "conservation"),
    ):
        invariants = Invariants()
        invariants.roots.add("p")
        # When it is told of the insert of "p", of a root nobody queued, or of a
        # successor of "p" that its outcome does not list
        invariants.on_tasks_inserted([doc], store.insert_counts, store.load)
        # Then only the last two break conservation
        violation = invariants.violation
        assert (violation and violation.promise) == promise, doc.task_id


def test_the_invariants_catch_a_task_inserted_twice() -> None:
    # Given a checker that knows "r" was queued by the application
    invariants = Invariants()
    invariants.roots.add("r")
    # When the store reports that "r" was newly inserted twice
    invariants.on_tasks_inserted([make_doc("r")], {"r": 2}, lambda task_id: None)
    # Then the checker reports it
    assert invariants.violation is not None
    assert invariants.violation.promise == "each task inserted once"


def test_the_invariants_catch_a_run_a_microsecond_longer_than_allowed() -> None:
    # Given a checker
    invariants = Invariants()
    # When a run lasted exactly its allowance, then another one microsecond more
    invariants.on_run_length("run of t", 5_000_000, 5_000_000)
    assert invariants.violation is None
    invariants.on_run_length("run of u", 5_000_001, 5_000_000)
    # Then only the second breaks the timeout promise
    assert invariants.violation is not None
    assert invariants.violation.promise == "no run longer than its timeout"


class ReadsGcThreshold(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        SEEN_THRESHOLDS.append(gc.get_threshold()[0])


SEEN_THRESHOLDS: list[int] = []


def test_gc_collects_less_often_during_a_run_only() -> None:
    before = gc.get_threshold()
    SEEN_THRESHOLDS.clear()
    try:
        with Simulation(seed=1) as sim:
            gc.set_threshold(700, *before[1:])
            sim.queue(ReadsGcThreshold())
            sim.drain(within=timedelta(minutes=1))
            assert gc.get_threshold() == (700, *before[1:])
            gc.set_threshold(0, *before[1:])  # switched off: left off
            sim.queue(ReadsGcThreshold())
            sim.drain(within=timedelta(minutes=1))
            assert gc.get_threshold()[0] == 0
        assert SEEN_THRESHOLDS == [simulation_module._GC_YOUNG_THRESHOLD, 0]
    finally:
        gc.set_threshold(*before)


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def _raise(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize(
    "error",
    [ValueError("one"), ValueError("two"), KeyError("k"), _BadStr(), SystemExit(3)],
)
def test_a_plain_failure_formats_as_traceback_does_each_time(
    error: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    for limit in (None, None, 1, None):
        if limit is not None:
            monkeypatch.setattr(sys, "tracebacklimit", limit, raising=False)
        else:
            monkeypatch.delattr(sys, "tracebacklimit", raising=False)
        with pytest.raises(BaseException) as caught:  # noqa: PT011  # any error will do
            _raise(error.with_traceback(None))
        assert tracebacks.format_exception(caught.value) == "".join(
            traceback.format_exception(caught.value)
        )


def test_a_memoised_traceback_follows_an_edited_source_file(tmp_path: Path) -> None:
    source = tmp_path / "edited_module.py"
    source.write_text("def fail():\n    raise ValueError('x')  # first\n")
    spec = importlib.util.spec_from_file_location("edited_module", source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = []
    for edit in ("first", "first", "second, longer than the first"):
        source.write_text(f"def fail():\n    raise ValueError('x')  # {edit}\n")
        os.utime(source, (time.time() + len(texts), time.time() + len(texts)))
        with pytest.raises(ValueError, match="x") as caught:
            module.fail()
        text = tracebacks.format_exception(caught.value)
        assert text == "".join(traceback.format_exception(caught.value))
        texts.append(text)
    assert "# first" in texts[0]
    assert "# second" in texts[2]


class SendReceipt(tullius.Task):
    timeout = timedelta(seconds=5)
    order: int

    def run(self) -> None:
        time.sleep(1)


def checkout(order: int, priority: int = 5) -> None:
    """Application code under test: it queues with tullius.queue(), not sim.queue()."""
    tullius.queue(SendReceipt(order=order, priority=priority))


def test_application_code_queues_into_the_simulation_within_queue_calls() -> None:
    from tullius import api

    with Simulation(seed=1) as sim:
        with sim.queue_calls():
            checkout(7)
        assert api._sink.get() is None  # outside the block: the configured store again
        counts = sim.drain(within=timedelta(minutes=1))
        assert counts.succeeded == 1
        [view] = sim.store.all_views()
        assert view.task.fields == {"order": 7}


def test_queueing_from_the_test_without_queue_calls_names_it_while_a_simulation_is_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tullius import api
    from tullius.errors import ConfigError

    def no_store() -> None:  # as on a machine without tullius_deps
        raise ConfigError("module", "tullius_deps", "was not found on the Python path")

    monkeypatch.setattr(api, "current_store", no_store)
    with Simulation(seed=1), pytest.raises(ConfigError) as caught:
        checkout(7)
    assert "within `with sim.queue_calls():`" in "".join(caught.value.__notes__)


def test_a_task_queued_within_queue_calls_outside_every_band_is_refused_by_name() -> None:
    with (
        Simulation(seed=1, task_processes=[(1, 0, 3)]) as sim,
        sim.queue_calls(),
        pytest.raises(tullius.ConfigError, match=r"SendReceipt\.priority=9"),
    ):
        checkout(7, priority=9)
