"""Pruning raced by late writers: a pruned task never comes back.

The servers of `ProtocolRaces` (stale reads, writes landing one at a time,
replays, racing conditional updates) now live for days, and keep the
daemon's write window (`policy.WRITE_WINDOW`): a step decided on a read
writes nothing later than a window after that read, and a verdict nothing
later than a window after its lease's claim plus the job's time limit.  Up
to that moment any write may still land, however late.  Meanwhile
``tulliusd --prune-finished`` runs at random times, and two daemons with
``--keep-finished`` prune a page at a time, one store operation per step, so
that their reads and deletes interleave with each other's and with every
writer's.  A task a prune deleted must stay deleted, with its records: no
late verdict, repair or replay may insert it or one of its records again (it
would run a second time).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from tests.property.test_protocol_races import (
    SERVERS,
    SPEC,
    Pending,
    ProtocolRaces,
    check_consistent,
    finish_everything,
    root_doc,
)
from tullius.document import TERMINAL, Status, TaskView, retry_id, spawned_of, status_of
from tullius.effects import Effect, InsertRecord
from tullius.engine import Conversation, drive
from tullius.errors import InvalidTransition
from tullius.events import Claimed, Event, Failed, HandlerFailed, HandlerSucceeded, Succeeded
from tullius.machine import settle, step
from tullius.policy import WRITE_WINDOW
from tullius.prune import MIN_AGE, PruneReport, prune
from tullius.store import perform

VERDICTS = (Succeeded, Failed, HandlerSucceeded, HandlerFailed)


@dataclass
class Late:
    """A write and the last moment its writer may make it."""

    effect: Effect
    write_by: datetime


class PruneRaces(ProtocolRaces):
    """`ProtocolRaces` over days, with write windows and prunes."""

    def _started(self) -> None:
        if not hasattr(self, "write_by"):
            self.write_by: dict[int, datetime] = {}  # id(Pending) -> its window's end
            self.decided_at: dict[int, datetime] = {}  # id(Pending) -> its step's `now`
            self.read_at: dict[tuple[str, str], datetime] = {}
            self.late: list[Late] = []
            self.pruned: set[str] = set()
            #: Each pruning daemon's page under way, and where its pass goes on.
            self.paging: dict[int, Conversation[PruneReport]] = {}
            self.resume_after: dict[int, str] = {}
            self.sent: dict[int, Any] = {}

    @precondition(lambda self: self.roots < 2)
    @rule(long=st.booleans())
    def queue_a_task(self, long: bool) -> None:
        """A root task; a ``long`` one may run for three days, so that its verdict's
        writer may still write (its successors, again) after they could be pruned."""
        self.roots += 1
        limit = timedelta(days=3) if long else timedelta(seconds=5)
        doc = dataclasses.replace(root_doc(self.roots), timeout=limit)
        self.store.insert_tasks([doc])

    @rule(hours=st.integers(1, 36))
    def hours_or_days_pass(self, hours: int) -> None:
        """Up to a day and a half, by the hour: a window's end and a prune's age fall anywhere."""
        self.now += timedelta(hours=hours)

    @rule(server=st.sampled_from(SERVERS), fresh=st.booleans(), data=st.data())
    def a_server_decides_on_a_possibly_stale_read(
        self, server: str, fresh: bool, data: st.DataObject
    ) -> None:
        """As in `ProtocolRaces`, and the step's writes get their window: from the
        read it was decided on, or for a verdict from its lease's claim."""
        self._started()
        views = sorted(self.store.all_views(), key=lambda v: v.task_id)
        if not views:
            return
        task_id = data.draw(st.sampled_from([v.task_id for v in views]))
        key = (server, task_id)
        if fresh or key not in self.snapshots:
            self.snapshots[key] = self.store.load(task_id)  # type: ignore[assignment]
            self.read_at[key] = self.now
        view = self.snapshots[key]
        chosen = self._event_for(server, view, data)
        try:
            decided = step(view, chosen, now=self.now, rng=self.rng)
        except InvalidTransition:
            return
        if not decided.effects:
            return
        write_by = self.read_at[key] + WRITE_WINDOW
        lease = view.current_lease()
        if isinstance(chosen, VERDICTS) and lease is not None:
            task = view.task
            limit = task.timeout if status_of(view) is Status.RUNNING else task.handler_timeout
            write_by = lease.at + limit + WRITE_WINDOW
        pending = Pending(server, view, list(decided.effects), decided.record is not None)
        self.pending.append(pending)
        self.write_by[id(pending)] = write_by
        self.decided_at[id(pending)] = self.now

    @rule(data=st.data())
    def every_server_decides_on_every_task(self, data: st.DataObject) -> None:
        """Many steps in flight at once, each on a fresh or a stale read."""
        for server in SERVERS:
            for _ in self.store.all_views():
                self.a_server_decides_on_a_possibly_stale_read(
                    server, data.draw(st.booleans()), data
                )

    def _land(self, pending: Pending, *, ack_lost: bool) -> None:
        self._started()
        write_by = self.write_by[id(pending)]
        if self.now > write_by:  # the writer gives the rest up (`WriteWindowClosed`)
            event("a write given up past its window")
            self.pending.remove(pending)
            return
        effect = pending.effects[0]
        result = perform(self.store, effect)
        self.late.append(Late(effect, write_by))
        if ack_lost:
            return
        pending.effects.pop(0)
        if isinstance(effect, InsertRecord) and pending.decisive:
            pending.decisive = False
            won = result.token == effect.record.token
            self.lost_races += not won
            # As the daemon: the settling time is the deciding conversation's `now`.
            decided_at = self.decided_at[id(pending)]
            pending.effects = (
                list(settle(pending.view.with_record(result), decided_at)) if won else []
            )
        if not pending.effects:
            self.pending.remove(pending)

    @rule(data=st.data())
    def an_old_write_is_replayed(self, data: st.DataObject) -> None:
        """A write delivered again (a retry racing the original), within its window."""
        self._started()
        replayable = [late for late in self.late if self.now <= late.write_by]
        if replayable:
            perform(self.store, data.draw(st.sampled_from(replayable)).effect)

    @rule()
    def a_healthy_server_finishes_all_it_can(self) -> None:
        """Work settles (and ages) while stale writers still hold their writes."""
        self._started()
        finish_everything(self.store, self.now, self.rng)
        self.now += timedelta(hours=1)

    @rule(unhandled=st.booleans())
    def a_prune_runs(self, unhandled: bool) -> None:
        self._started()
        before = {view.task_id for view in self.store.all_views()}
        report = drive(self.store, prune(MIN_AGE, now=self.now, unhandled=unhandled))
        gone = before - {view.task_id for view in self.store.all_views()}
        assert len(gone) == sum(report.deleted.values())
        self.pruned |= gone
        if gone:
            event("a prune deleted tasks")
        # The worst moment for the late writers to strike: right after it.
        for pending in list(self.pending):
            while pending in self.pending:
                self._land(pending, ack_lost=False)
        for late in self.late:
            if self.now <= late.write_by:
                perform(self.store, late.effect)

    @rule(daemon=st.sampled_from([0, 1]), unhandled=st.booleans(), steps=st.integers(1, 4))
    def a_daemon_prunes_a_few_store_operations(
        self, daemon: int, unhandled: bool, steps: int
    ) -> None:
        """A daemon's pass (`runtime.pruner`), a page of one task at a time, each
        page a few store operations per step: other writers and the other
        daemon's prune act between its reads and its delete."""
        self._started()
        for _ in range(steps):
            self._prune_one_operation(daemon, unhandled)

    def _prune_one_operation(self, daemon: int, unhandled: bool) -> None:
        conversation = self.paging.get(daemon)
        if conversation is None:
            after = self.resume_after.pop(daemon, "")
            conversation = prune(
                MIN_AGE, now=self.now, unhandled=unhandled, batch=1, after=after, pages=1
            )
            self.paging[daemon] = conversation
            self.sent[daemon] = None
        before = {view.task_id for view in self.store.all_views()}
        try:
            op = conversation.send(self.sent[daemon])
        except StopIteration as stop:
            del self.paging[daemon]
            report: PruneReport = stop.value
            if report.resume_after is not None:
                self.resume_after[daemon] = report.resume_after
            return
        self.sent[daemon] = perform(self.store, op)
        gone = before - {view.task_id for view in self.store.all_views()}
        self.pruned |= gone
        if gone:
            event("a daemon's page deleted tasks")

    @invariant()
    def a_pruned_task_never_comes_back(self) -> None:
        self._started()
        for task_id in self.pruned:
            assert self.store.load(task_id) is None, task_id
            # A retry decided on a read made before an unhandled task's prune may
            # land after it (design.md, "Retrying an unhandled task"): its record
            # stays an orphan; nothing else of a pruned task ever comes back.
            back = set(self.store._records_by_task.get(task_id, ()))
            assert back <= {retry_id(task_id)}, (task_id, back)

    @invariant()
    def a_terminal_hint_is_the_truth(self) -> None:
        for view in self.store.all_views():
            if view.task.status in TERMINAL:
                assert status_of(view) is view.task.status, view.task_id
                assert self._spawned_present_or_pruned(view)

    def _spawned_present_or_pruned(self, view: TaskView) -> bool:
        return all(
            doc.task_id in self.pruned or self.store.load(doc.task_id) is not None
            for doc in spawned_of(view)
        )

    @invariant()
    def records_tell_one_consistent_story(self) -> None:
        for view in self.store.all_views():
            check_consistent(view)

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        self._started()
        event(f"pruned: {min(len(self.pruned), 3)}+")
        finish_everything(self.store, self.now, self.rng)
        self.a_pruned_task_never_comes_back()
        for view in self.store.all_views():
            status = status_of(view)
            assert status in TERMINAL, (view.task_id, status)
            assert view.task.status is status, (view.task_id, view.task.status, status)
            assert self._spawned_present_or_pruned(view)


# Four times the profile's examples (about 15 s in CI): the races that matter need
# a stale step decided before work settles, then the right hours, then a prune.
PruneRaces.TestCase.settings = settings(
    max_examples=4 * settings.default.max_examples, stateful_step_count=100
)
test_prune_races = PruneRaces.TestCase


# The races that matter need a step decided on a read made before work
# settles, then the right number of hours, then a prune: random search reaches
# them only now and then, so two are also played out as written.


def scripted(seed: int = 1) -> ScriptedRaces:
    machine = ScriptedRaces()
    machine.start(seed=seed, racy=0.0)
    machine._started()
    return machine


def decide(machine: ScriptedRaces, server: str, task_id: str, chosen: Event) -> None:
    """``server`` reads ``task_id`` now and decides ``chosen`` on it; nothing lands yet."""
    view = machine.store.load(task_id)
    assert view is not None
    machine.snapshots[(server, task_id)] = view
    machine.read_at[(server, task_id)] = machine.now
    machine.choose = chosen
    machine.a_server_decides_on_a_possibly_stale_read(server, False, _Draw(task_id))


class _Draw:
    """Stands in for ``st.data()``: every draw gives ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, _strategy: Any) -> Any:
        return self.value


class ScriptedRaces(PruneRaces):
    """`PruneRaces` whose servers decide what the script says (``choose``)."""

    choose: Event

    def _event_for(self, server: str, view: TaskView, data: Any) -> Event:
        return self.choose


def test_a_claim_decided_before_a_task_settled_lands_within_its_window_after_a_prune(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "event", lambda *_: None)
    # Given a queued task that s1 decides to claim on what it read, its writes held back
    machine = scripted()
    machine.queue_a_task(long=False)
    decide(machine, "s1", "root1", Claimed("s1-late", "s1"))
    # When a healthy server runs it to its end, 22 hours pass and a prune runs,
    # after which s1's claim lands (within its window of a day)
    machine.a_healthy_server_finishes_all_it_can()
    machine.hours_or_days_pass(22)
    machine.a_prune_runs(unhandled=True)
    # Then nothing came back, and the healthy server finishes everything
    machine.a_pruned_task_never_comes_back()
    machine.teardown()


def test_a_long_parents_verdict_replayed_late_finds_its_successor_kept(monkeypatch: Any) -> None:
    monkeypatch.setattr(sys.modules[__name__], "event", lambda *_: None)
    # Given a root that may run three days, claimed by s1, whose success (with a
    # successor) s1 records, and may repeat within its window (a lost acknowledgement)
    machine = scripted()
    machine.queue_a_task(long=True)
    decide(machine, "s1", "root1", Claimed("s1-run", "s1"))
    machine.all_writes_of_a_step_land(_Draw(machine.pending[0]))  # type: ignore[arg-type]
    decide(machine, "s1", "root1", Succeeded("s1-run", (SPEC,)))
    machine.all_writes_of_a_step_land(_Draw(machine.pending[0]))  # type: ignore[arg-type]
    # When its successor runs to its end, four days pass, a prune runs and s1's
    # writes are replayed right after it
    machine.a_healthy_server_finishes_all_it_can()
    for _ in range(4):
        machine.hours_or_days_pass(24)
    machine.a_prune_runs(unhandled=True)
    # Then the successor was kept while its parent is young: nothing came back
    machine.a_pruned_task_never_comes_back()
    assert machine.pruned == set()
    machine.teardown()
