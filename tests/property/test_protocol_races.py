"""Random interleavings of several servers' writes, on stale reads, with replays.

Servers read a task (their snapshot goes stale), decide a step on that
snapshot, and their writes land one at a time, interleaved with everyone
else's.  Writes are duplicated and replayed (an acknowledgement lost, then the
write repeated), and the store's conditional updates race as FerretDB's do.
After every step the records must still tell one consistent story; at the end
a healthy server finishes everything and every failure must have been handled
exactly once.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.store_contract import T0, make_doc
from tullius.band import Band
from tullius.document import (
    TERMINAL,
    Failure,
    FailureKind,
    Origin,
    RecordKind,
    Status,
    TaskDoc,
    TaskSpec,
    TaskView,
    retried_as,
    retry_id,
    spawned_of,
    status_of,
)
from tullius.effects import Effect, InsertRecord
from tullius.engine import claim, drive, finish, repair, sweep
from tullius.errors import InvalidTransition
from tullius.events import (
    Claimed,
    Event,
    Failed,
    HandlerClaimed,
    HandlerFailed,
    HandlerSucceeded,
    LeaseExpired,
    Retried,
    Succeeded,
    Swept,
)
from tullius.machine import settle, step
from tullius.policy import WRITE_WINDOW, LeaseWatch
from tullius.retry import retry
from tullius.sim.memory_store import MemoryStore
from tullius.store import perform

SERVERS = ("s1", "s2", "s3")
SPEC = TaskSpec("tests:Next", {"gen": 1}, 5, timedelta(seconds=1), timedelta(seconds=1), 2)
BOOM = Failure(FailureKind.EXCEPTION, "boom", T0)


@dataclass
class Pending:
    """One server's decided step whose writes have not all landed yet."""

    server: str
    view: TaskView
    effects: list[Effect]
    #: Whether the next `InsertRecord` decides the step (a retry's copy has
    #: records of its own, written after the deciding one; a sweep decides nothing).
    decisive: bool = True


class ProtocolRaces(RuleBasedStateMachine):
    """Several servers racing over a few tasks."""

    @initialize(seed=st.integers(0, 2**32 - 1), racy=st.sampled_from([0.0, 0.5, 1.0]))
    def start(self, seed: int, racy: float) -> None:
        self.rng = random.Random(seed)
        self.store = MemoryStore(rng=self.rng, racy_updates=racy)
        self.now = T0
        self.snapshots: dict[tuple[str, str], TaskView] = {}
        self.pending: list[Pending] = []
        self.history: list[Effect] = []
        self.tokens = 0
        self.roots = 0
        self.lost_races = 0

    def _token(self, server: str) -> str:
        self.tokens += 1
        return f"{server}-{self.tokens}"

    @precondition(lambda self: self.roots < 2)
    @rule()
    def queue_a_task(self) -> None:
        self.roots += 1
        self.store.insert_tasks([root_doc(self.roots)])

    @rule(hours=st.integers(0, 2))
    def time_passes(self, hours: int) -> None:
        self.now += timedelta(hours=hours, seconds=1)

    @rule(server=st.sampled_from(SERVERS), fresh=st.booleans(), data=st.data())
    def a_server_decides_on_a_possibly_stale_read(
        self, server: str, fresh: bool, data: st.DataObject
    ) -> None:
        """The server re-reads the task, or acts on what it read some time ago."""
        views = sorted(self.store.all_views(), key=lambda v: v.task_id)
        if not views:
            return
        task_id = data.draw(st.sampled_from([v.task_id for v in views]))
        if fresh or (server, task_id) not in self.snapshots:
            self.snapshots[(server, task_id)] = self.store.load(task_id)  # type: ignore[assignment]
        view = self.snapshots[(server, task_id)]
        event = self._event_for(server, view, data)
        try:
            decided = step(view, event, now=self.now, rng=self.rng)
        except InvalidTransition:
            return
        if decided.effects:
            self.pending.append(
                Pending(server, view, list(decided.effects), decided.record is not None)
            )

    def _event_for(self, server: str, view: TaskView, data: st.DataObject) -> Event:
        status = status_of(view)
        lease = view.current_lease()
        owner = lease is not None and lease.token.startswith(f"{server}-")
        choices: list[Event] = [Swept()]
        if status is Status.QUEUED:
            choices.append(Claimed(self._token(server), server))
        elif status is Status.FAILED:
            choices.append(HandlerClaimed(self._token(server), server))
        elif lease is not None and owner and status is Status.RUNNING:
            choices += [Succeeded(lease.token, (SPEC,)), Failed(lease.token, BOOM)]
        elif lease is not None and owner:
            choices += [
                HandlerSucceeded(lease.token, (SPEC, SPEC)),
                HandlerFailed(lease.token, BOOM),
            ]
        elif lease is not None:
            choices.append(LeaseExpired(lease.record_id, server))
        elif status is Status.UNHANDLED:
            choices.append(Retried(self._token(server), server))
        return data.draw(st.sampled_from(choices))

    @rule(data=st.data(), ack_lost=st.booleans())
    def a_write_lands(self, data: st.DataObject, ack_lost: bool) -> None:
        """The next write of a pending step lands; with ``ack_lost`` the writer repeats it."""
        if not self.pending:
            return
        self._land(data.draw(st.sampled_from(self.pending)), ack_lost=ack_lost)

    def _land(self, pending: Pending, *, ack_lost: bool) -> None:
        effect = pending.effects[0]
        result = perform(self.store, effect)
        self.history.append(effect)
        if ack_lost:
            return  # the writer saw an error and will send the same write again
        pending.effects.pop(0)
        if isinstance(effect, InsertRecord) and pending.decisive:
            pending.decisive = False
            # As engine.apply_step: the rest follows from the record that won,
            # and only if it is ours.
            won = result.token == effect.record.token
            self.lost_races += not won
            pending.effects = (
                list(settle(pending.view.with_record(result), self.now)) if won else []
            )
        if not pending.effects:
            self.pending.remove(pending)

    @rule(data=st.data())
    def all_writes_of_a_step_land(self, data: st.DataObject) -> None:
        if self.pending:
            pending = data.draw(st.sampled_from(self.pending))
            while pending in self.pending:
                self._land(pending, ack_lost=False)

    @rule(data=st.data())
    def an_old_write_is_replayed(self, data: st.DataObject) -> None:
        """A write delivered twice (a retry racing the original) must be harmless."""
        if self.history:
            perform(self.store, data.draw(st.sampled_from(self.history)))

    @invariant()
    def records_tell_one_consistent_story(self) -> None:
        for view in self.store.all_views():
            check_consistent(view)

    @invariant()
    def no_task_is_ever_inserted_twice(self) -> None:
        assert all(count == 1 for count in self.store.insert_counts.values())

    @invariant()
    def a_terminal_hint_is_the_truth(self) -> None:
        for view in self.store.all_views():
            if view.task.status in TERMINAL:
                assert status_of(view) is view.task.status, view.task_id
                assert spawned_all_present(self.store, view)

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        for view in self.store.all_views():
            event(f"before healing: {status_of(view).value}")
        event(f"lost races: {min(self.lost_races, 3)}+")
        retried = sum(retried_as(view) is not None for view in self.store.all_views())
        event(f"retried before healing: {min(retried, 2)}+")
        finish_everything(self.store, self.now, self.rng)
        for view in self.store.all_views():
            status = status_of(view)
            assert status in TERMINAL, (view.task_id, status)
            assert view.task.status is status, (view.task_id, view.task.status, status)
            assert spawned_all_present(self.store, view)
            children = {doc.task_id for doc in self.store.find_children(view.task_id)}
            assert children == expected_children(self.store, view, self.now), view.task_id
            if view.outcome is not None and not view.outcome.ok:
                ok_ends = [
                    r for r in view.records.values() if r.kind is RecordKind.HANDLER_END and r.ok
                ]
                assert len(ok_ends) == (0 if status is Status.UNHANDLED else 1)


def root_doc(n: int) -> TaskDoc:
    """The ``n``-th root task: the first allows one ``failed()`` attempt, so that
    runs reach UNHANDLED (and operators retry it) within a few steps."""
    return dataclasses.replace(make_doc(f"root{n}"), handler_attempts=1 if n == 1 else 3)


def check_consistent(view: TaskView) -> None:
    """Each record needs the one before it; at most one accepted handler result."""
    if view.outcome is not None:
        assert view.run is not None
    for n in range(1, view.handler_attempt + 1):
        assert view.outcome is not None
        assert view.outcome.ok is False
        if n > 1:
            previous = view.handler_end(n - 1)
            assert previous is not None
            assert previous.ok is False
    ends = [r for r in view.records.values() if r.kind is RecordKind.HANDLER_END]
    assert sum(1 for r in ends if r.ok) <= 1
    assert view.handler_attempt <= view.task.handler_attempts
    if view.handler_attempt < view.task.handler_attempts:
        pass  # more attempts may follow
    for record in view.records.values():
        if record.kind is RecordKind.HANDLER_END:
            assert view.handler(record.attempt) is not None


def expected_children(store: MemoryStore, view: TaskView, now: datetime) -> set[str]:
    """The successors or replacements, and a retry's copy: stored, unless its
    writer vanished and the retry is too old to be completed (`retry.retry`)."""
    expected = {doc.task_id for doc in spawned_of(view)}
    copy = retried_as(view)
    if copy is not None and (
        store.load(copy.task_id) is not None
        or now - view.records[retry_id(view.task_id)].at <= WRITE_WINDOW
    ):
        expected.add(copy.task_id)
    return expected


def complete_retries(store: MemoryStore, now: datetime) -> None:
    """An operator asks again for every retry (`retry.retry`): cut-short ones are completed."""
    for view in store.all_views():
        if status_of(view) is Status.UNHANDLED and retried_as(view) is not None:
            done = drive(store, retry(view.task_id, now=now, token="operator", server="operator"))
            if not done.stored:
                assert now - view.records[retry_id(view.task_id)].at > WRITE_WINDOW


def spawned_all_present(store: MemoryStore, view: TaskView) -> bool:
    return all(store.load(doc.task_id) is not None for doc in spawned_of(view))


def finish_everything(store: MemoryStore, now, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    """A healthy server takes over: leases of the vanished racers expire; all work ends.

    New work spawned along the way is finished too, failing every other run so
    handlers run; each generation of spawned tasks is shorter-lived (bounded).
    """
    watch = LeaseWatch(timedelta(seconds=1))
    band = Band(1, 0, 10)
    complete_retries(store, now)
    for round_ in range(200):
        now += timedelta(hours=1)
        drive(store, sweep(watch, observer="healer", now=now, monotonic=partial(float, round_ * 2)))
        for view in store.all_views():
            drive(store, repair(view, now=now))
        while True:
            job = drive(
                store,
                claim(
                    band,
                    server="healer",
                    worker="w",
                    token=f"heal-{round_}-{rng.random()}",
                    now=now,
                ),
            )
            if job is None:
                break
            depth = job.task_id.count("-") + len(job.view.task.fields.get("gen", 0) * "x")
            if job.kind.value == "run":
                event: Event = (
                    Failed(job.token, BOOM) if rng.random() < 0.5 else Succeeded(job.token)
                )
            else:
                event = (
                    HandlerSucceeded(job.token)
                    if depth or rng.random() < 0.5
                    else HandlerFailed(job.token, BOOM)
                )
            drive(store, finish(job, event, now=now))
        if all(
            status_of(v) in TERMINAL and v.task.status is status_of(v) for v in store.all_views()
        ):
            return
    raise AssertionError("the healthy server could not finish everything in 200 rounds")


ProtocolRaces.TestCase.settings = settings(
    max_examples=settings.default.max_examples, stateful_step_count=150
)
test_protocol_races = ProtocolRaces.TestCase


def test_origin_values_are_stable() -> None:
    # Stored values are part of the on-disk format.
    assert [o.value for o in Origin] == ["queued", "successor", "replacement", "retry"]
