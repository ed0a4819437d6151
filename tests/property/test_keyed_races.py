"""Keyed ``queue()`` calls raced on `MongoStore`, one store operation at a time.

Applications make keyed calls (`tullius.keyed.insert_keyed`), repeating some
with the same key and task, some with the same key and a different task;
each call's operations land one per step, interleaved with the other calls'
and with a server that claims, runs and finishes tasks (moving them from the
live queue to ``finished``: the layout where a duplicate id is refused only
while the task is live).  Now and then an operation's answer is lost: it was
applied, and the call fails, as ``queue()`` raising after its write.

Days pass too, and two pruning daemons delete finished tasks, one store
operation per step, racing each other and the calls, and now and then dying
part-way through a delete (after the records, before the finished copies):
a call repeated after its task was pruned stores it again, as new (another
*incarnation* of the id, told apart by its ``created_at``), perhaps beside
such a leftover.  Each run of a keyed task returns a
successor due days later, which may outlive its parent's prune: the run of
an incarnation stored again returns one of its own.

After every step: a call that returned has its tasks stored, as it gave them
(two calls with one key and different tasks never both return), unless what
it stored has run since and was pruned; so has every successor a run
returned (the server may die between a run's verdict and its successor's
insert, which a sweep repairs); and no incarnation ran twice.  At the end every call is finished,
the server runs everything, and every task stored under a key and every
successor ran exactly once, each task's hint agreeing with its records,
with no live copy left.  On mongomock
(`MemoryStore` refuses a repeated id live or finished alike, so it would
hide the races with moves).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import mongomock
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.store_contract import T0, drive_until, make_spec
from tests.unit.test_mongo_store_layout import PruneDied, finished_deletes_die
from tullius.band import Band
from tullius.document import TERMINAL, TaskSpec, keyed_task_id, status_of
from tullius.effects import InsertTasks
from tullius.engine import TASK_WRITES, Conversation, claim, drive, finish, sweep
from tullius.errors import KeyConflict, StoreError
from tullius.events import Succeeded
from tullius.keyed import insert_keyed
from tullius.policy import WRITE_WINDOW, LeaseWatch
from tullius.prune import MIN_AGE, PruneReport, prune
from tullius.runtime.mongo_store import MongoStore
from tullius.store import DeleteTasks, Operation, perform

ALL = Band(1, 0, 10)


#: How long after its parent's run a successor is due: longer than a prune waits.
SUCCESSOR_DELAY = MIN_AGE + timedelta(days=1)
KEYS = ("a", "a", "b")
#: An incarnation of a task id: the id and the ``created_at`` of what was stored
#: (None: nothing, as a call returned).
Incarnation = tuple[str, datetime | None]


@dataclass
class Call:
    """A keyed call under way: its conversation and the operation it waits on."""

    key: str
    specs: list[TaskSpec]
    conversation: Conversation[list[str]]
    op: Operation
    started: datetime


class KeyedRaces(RuleBasedStateMachine):
    @initialize(sharded=st.booleans())
    def start(self, sharded: bool) -> None:
        db = mongomock.MongoClient(tz_aware=True)["keyed_races"]
        shards = {"live_shards": 3, "record_shards": 5} if sharded else {}
        self.store = MongoStore(db, **shards)  # type: ignore[arg-type]
        self.store.ensure_indexes()
        self.now = T0
        self.calls: list[Call] = []
        #: The calls that returned: their key, tasks, and what was stored for them.
        self.returned: list[tuple[str, list[TaskSpec], list[Incarnation]]] = []
        self.runs: Counter[Incarnation] = Counter()
        #: The successors the runs returned: their incarnation and fields, as recorded.
        self.successors: list[tuple[str, datetime, dict[str, Any]]] = []
        self.owed: list[tuple[str, datetime, dict[str, Any]]] = []
        self.tokens = 0
        #: Each pruning daemon's pass under way, and the answer it waits to be sent.
        self.prunes: dict[int, tuple[Conversation[PruneReport], Any]] = {}

    @rule(
        key=st.sampled_from(KEYS),
        amount=st.integers(1, 2),
        tasks=st.integers(1, 2),
        at_once=st.booleans(),
    )
    def an_application_makes_a_keyed_call(
        self, key: str, amount: int, tasks: int, at_once: bool
    ) -> None:
        """A call whose operations land one per step, or all ``at_once``."""
        specs = [make_spec(amount=amount, index=index) for index in range(tasks)]
        conversation = insert_keyed(specs, key=key, now=self.now)
        call = Call(key, specs, conversation, next(conversation), self.now)
        self.calls.append(call)
        while at_once and call in self.calls:
            self._land(call, answer_lost=False)

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), answer_lost=st.sampled_from([False, False, False, True]))
    def an_operation_of_a_call_lands(self, data: st.DataObject, answer_lost: bool) -> None:
        self._land(data.draw(st.sampled_from(self.calls), label="call"), answer_lost=answer_lost)

    def _land(self, call: Call, *, answer_lost: bool) -> None:
        """Perform the operation ``call`` waits on; if that ends it, check how."""
        if type(call.op) in TASK_WRITES and self.now - call.started > WRITE_WINDOW:
            # As `api.insert_queued` gives a write up past its window: nothing more.
            call.conversation.close()
            self.calls.remove(call)
            event("a keyed call gave up a write past its window")
            return
        result = perform(self.store, call.op)
        returned: list[str] | None = None
        conflict: KeyConflict | None = None
        try:
            if answer_lost:
                call.op = call.conversation.throw(StoreError("answer lost"))
            else:
                call.op = call.conversation.send(result)
            return
        except StopIteration as done:
            returned = done.value
        except KeyConflict as raised:
            conflict = raised
        except StoreError:
            event("a keyed call failed with its write applied")
        self.calls.remove(call)
        if returned is not None:
            assert returned == [keyed_task_id(call.key, i) for i in range(len(call.specs))]
            stored = [self.store.load(task_id) for task_id in returned]
            # Gone already: stored, run and pruned while the call went on (for days).
            gone = [task_id for task_id, view in zip(returned, stored, strict=True) if not view]
            assert all(self._ran(task_id) for task_id in gone), (call.key, gone)
            self.returned.append(
                (
                    call.key,
                    call.specs,
                    [
                        (task_id, view.task.created_at if view else None)
                        for task_id, view in zip(returned, stored, strict=True)
                    ],
                )
            )
            event("a keyed call returned")
        if conflict is not None:
            event("a keyed call raised KeyConflict")
            # Justified: what is stored under the id now is another task.
            view = self.store.load(conflict.task_id)
            given = call.specs[conflict.index].fields
            assert view is None or dict(view.task.fields) != dict(given), conflict

    @rule(everything=st.booleans(), dies=st.sampled_from([False, False, True]))
    def a_server_runs_a_task(self, everything: bool, dies: bool) -> None:
        """One task, or all it can; or one whose server ``dies`` between its verdict
        and the insert of its successor (a sweep repairs it)."""
        while self._run_one(dies=dies) and everything and not dies:
            pass

    @rule()
    def a_server_sweeps(self) -> None:
        watch = LeaseWatch(timedelta(seconds=15))
        drive(self.store, sweep(watch, observer="s2", now=self.now, monotonic=float))
        self.successors += self.owed
        self.owed = []

    def _run_one(self, *, dies: bool = False) -> bool:
        self.tokens += 1  # (a claim's token must be its own: see `engine.claim`)
        token = f"t{self.tokens}"
        job = drive(self.store, claim(ALL, server="s1", worker="w1", token=token, now=self.now))
        if job is None:
            return False
        self.runs[job.task_id, job.view.task.created_at] += 1
        successors: tuple[TaskSpec, ...] = ()
        if job.task_id in self._all_ids():  # a keyed task: it returns a successor
            spec = make_spec(of=job.task_id, run=token)
            successors = (dataclasses.replace(spec, delay=SUCCESSOR_DELAY),)
        verdict = finish(job, Succeeded(job.token, successors), now=self.now)
        if successors and dies:
            drive_until(self.store, verdict, InsertTasks)
            verdict.close()
            event("a server died before inserting a successor")
        else:
            assert drive(self.store, verdict).accepted
        if successors:
            view = self.store.load(job.task_id)
            assert view is not None
            assert view.outcome is not None
            returned = [(d.task_id, d.created_at, dict(d.fields)) for d in view.outcome.spawned]
            # (A dead server's are owed until a sweep repairs its verdict.)
            (self.owed if dies else self.successors).extend(returned)
        return True

    @rule(days=st.integers(1, 6))
    def days_pass(self, days: int) -> None:
        self.now += timedelta(days=days)

    @rule(
        daemon=st.sampled_from([None, 0, 1]),
        steps=st.integers(1, 3),
        dies=st.sampled_from([False, False, True]),
    )
    def a_prune_goes_on(self, daemon: int | None, steps: int, dies: bool) -> None:
        """``tulliusd --prune-finished`` whole (``daemon`` None), between two operations
        of everyone else; or a few store operations of a daemon with
        ``--keep-finished``, whose reads and delete others' steps may come between,
        and which ``dies`` in its delete, before the finished copies (not retried)."""
        if daemon is None:
            if drive(self.store, prune(MIN_AGE, now=self.now)).deleted:
                event("a whole prune deleted tasks")
            return
        for _ in range(steps):
            conversation, answer = self.prunes.pop(daemon, (None, None))
            if conversation is None:
                conversation = prune(MIN_AGE, now=self.now, batch=2)
            try:
                op = conversation.send(answer)
            except StopIteration:
                return
            if isinstance(op, DeleteTasks) and dies:
                self._delete_dying(op)
                return
            self.prunes[daemon] = (conversation, perform(self.store, op))
            if isinstance(op, DeleteTasks):
                event("a pruning daemon deleted (or tried to)")

    def _delete_dying(self, op: DeleteTasks) -> None:
        """``op`` performed by a process that dies once it has deleted the records."""
        try:
            with finished_deletes_die(self.store):
                perform(self.store, op)
        except PruneDied:
            event("a pruning daemon died in its delete")

    def _ran(self, task_id: str) -> bool:
        return any(ran == task_id for ran, _ in self.runs)

    @staticmethod
    def _all_ids() -> list[str]:
        return sorted({keyed_task_id(key, index) for key in set(KEYS) for index in range(2)})

    @invariant()
    def a_call_that_returned_has_its_tasks_stored_as_it_gave_them(self) -> None:
        if not hasattr(self, "store"):
            return
        for key, specs, stored in self.returned:
            for spec, (task_id, created_at) in zip(specs, stored, strict=True):
                if created_at is None:
                    continue  # gone as the call returned (checked then)
                view = self.store.load(task_id)
                if view is None or view.task.created_at != created_at:
                    # Gone, or stored again since: only once it had run (then pruned).
                    assert self.runs[task_id, created_at] == 1, (key, task_id, view)
                    continue
                assert dict(view.task.fields) == dict(spec.fields), (key, task_id, view.task)

    @invariant()
    def a_successor_a_run_returned_is_stored_as_returned(self) -> None:
        if not hasattr(self, "store"):
            return
        for task_id, created_at, fields in self.successors:
            view = self.store.load(task_id)
            if view is None or view.task.created_at != created_at:
                # Gone, or another task under its id: only once it had run (then pruned).
                assert self.runs[task_id, created_at] == 1, (task_id, fields, view)
                continue
            assert dict(view.task.fields) == fields, (task_id, view.task)

    @invariant()
    def every_record_but_a_tombstone_has_its_task(self) -> None:
        """No record outlives its task (a prune deletes the documents last), but an
        operator's retry record: an orphan `run` record would make the key's task
        read as stored but unreadable for good."""
        if not hasattr(self, "store"):
            return
        stored = {
            doc["_id"]
            for collection in [*self.store.live_collections(), self.store.finished]
            for doc in collection.find({}, {"_id": 1})
        }
        for records in self.store.record_collections():
            for record in records.find({"kind": {"$ne": "retry"}}, {"task_id": 1}):
                assert record["task_id"] in stored, ("a record without its task", record)

    @invariant()
    def no_task_runs_twice(self) -> None:
        if hasattr(self, "runs"):
            assert all(count == 1 for count in self.runs.values()), self.runs

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        for call in list(self.calls):  # every call goes on to its end (or its window's)
            while call in self.calls:
                self._land(call, answer_lost=False)
        self.a_server_sweeps()  # (repairs what a dying server left)
        while self._run_one():
            pass
        self.now += SUCCESSOR_DELAY  # (the last successors are due)
        while self._run_one():
            pass
        self.no_task_runs_twice()
        self.a_call_that_returned_has_its_tasks_stored_as_it_gave_them()
        self.a_successor_a_run_returned_is_stored_as_returned()
        for view in self.store.load_many(self._all_ids()):
            if view.run is None:  # a finished copy a dying prune left, with no records
                continue
            assert status_of(view) in TERMINAL, view.task_id
            assert view.task.status is status_of(view), view
            assert self.runs[view.task_id, view.task.created_at] == 1, view.task_id
        for task_id, created_at, _ in self.successors:
            assert self.runs[task_id, created_at] == 1, task_id
        assert all(
            collection.count_documents({}) == 0 for collection in self.store.live_collections()
        )


KeyedRaces.TestCase.settings = settings(
    max_examples=2 * settings.default.max_examples, stateful_step_count=50
)
TestKeyedRaces = KeyedRaces.TestCase
