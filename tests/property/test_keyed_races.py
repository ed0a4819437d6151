"""Keyed ``queue()`` calls raced on `MongoStore`, one store operation at a time.

Applications make keyed calls (`tullius.keyed.insert_keyed`), repeating some
with the same key and task, some with the same key and a different task;
each call's operations land one per step, interleaved with the other calls'
and with a server that claims, runs and finishes tasks (moving them from the
live queue to ``finished``: the layout where a duplicate id is refused only
while the task is live).  Now and then an operation's answer is lost: it was
applied, and the call fails, as ``queue()`` raising after its write.

After every step: a call that returned has its tasks stored, as it gave them
(two calls with one key and different tasks never both return), and no task
ran twice.  At the end every call is finished, the server runs everything,
and every task stored under a key ran exactly once, with no live copy left.
On mongomock (`MemoryStore` refuses a repeated id live or finished alike, so
it would hide the races with moves).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import mongomock
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.store_contract import T0, make_spec
from tullius.band import Band
from tullius.document import TERMINAL, TaskSpec, keyed_task_id, status_of
from tullius.engine import Conversation, claim, drive, finish
from tullius.errors import KeyConflict, StoreError
from tullius.events import Succeeded
from tullius.keyed import insert_keyed
from tullius.runtime.mongo_store import MongoStore
from tullius.store import Operation, perform

ALL = Band(1, 0, 10)
KEYS = ("a", "a", "b")


@dataclass
class Call:
    """A keyed call under way: its conversation and the operation it waits on."""

    key: str
    specs: list[TaskSpec]
    conversation: Conversation[list[str]]
    op: Operation


class KeyedRaces(RuleBasedStateMachine):
    @initialize(sharded=st.booleans())
    def start(self, sharded: bool) -> None:
        db = mongomock.MongoClient(tz_aware=True)["keyed_races"]
        shards = {"live_shards": 3, "record_shards": 5} if sharded else {}
        self.store = MongoStore(db, **shards)  # type: ignore[arg-type]
        self.store.ensure_indexes()
        self.calls: list[Call] = []
        #: The calls that returned: their key and tasks.
        self.returned: list[tuple[str, list[TaskSpec]]] = []
        self.runs: Counter[str] = Counter()
        self.tokens = 0

    @rule(key=st.sampled_from(KEYS), amount=st.integers(1, 2), tasks=st.integers(1, 2))
    def an_application_makes_a_keyed_call(self, key: str, amount: int, tasks: int) -> None:
        specs = [make_spec(amount=amount, index=index) for index in range(tasks)]
        conversation = insert_keyed(specs, key=key, now=T0)
        self.calls.append(Call(key, specs, conversation, next(conversation)))

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), answer_lost=st.sampled_from([False, False, False, True]))
    def an_operation_of_a_call_lands(self, data: st.DataObject, answer_lost: bool) -> None:
        call = data.draw(st.sampled_from(self.calls), label="call")
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
            self.returned.append((call.key, call.specs))
            event("a keyed call returned")
        if conflict is not None:
            event("a keyed call raised KeyConflict")
            # Justified: what is stored under the id now is another task.
            view = self.store.load(conflict.task_id)
            given = call.specs[conflict.index].fields
            assert view is None or dict(view.task.fields) != dict(given), conflict

    @rule()
    def a_server_runs_one_task(self) -> None:
        self._run_one()

    @rule()
    def a_server_runs_all_it_can(self) -> None:
        while self._run_one():
            pass

    def _run_one(self) -> bool:
        self.tokens += 1  # (a claim's token must be its own: see `engine.claim`)
        token = f"t{self.tokens}"
        job = drive(self.store, claim(ALL, server="s1", worker="w1", token=token, now=T0))
        if job is None:
            return False
        self.runs[job.task_id] += 1
        assert drive(self.store, finish(job, Succeeded(job.token), now=T0)).accepted
        return True

    @invariant()
    def a_call_that_returned_has_its_tasks_stored_as_it_gave_them(self) -> None:
        if not hasattr(self, "store"):
            return
        for key, specs in self.returned:
            for index, spec in enumerate(specs):
                view = self.store.load(keyed_task_id(key, index))
                assert view is not None, (key, index)
                assert dict(view.task.fields) == dict(spec.fields), (key, index, view.task)

    @invariant()
    def no_task_runs_twice(self) -> None:
        if hasattr(self, "runs"):
            assert all(count == 1 for count in self.runs.values()), self.runs

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        for call in list(self.calls):  # every call goes on to its end
            try:
                while True:
                    call.op = call.conversation.send(perform(self.store, call.op))
            except (StopIteration, KeyConflict):
                pass
        while (
            job := drive(self.store, claim(ALL, server="s1", worker="w1", token="end", now=T0))
        ) is not None:
            self.runs[job.task_id] += 1
            drive(self.store, finish(job, Succeeded(job.token), now=T0))
        self.no_task_runs_twice()
        self.a_call_that_returned_has_its_tasks_stored_as_it_gave_them()
        ids = {keyed_task_id(key, index) for key in set(KEYS) for index in range(2)}
        for view in self.store.load_many(sorted(ids)):
            assert status_of(view) in TERMINAL, view.task_id
            assert self.runs[view.task_id] == 1, view.task_id
        assert all(
            collection.count_documents({}) == 0 for collection in self.store.live_collections()
        )


KeyedRaces.TestCase.settings = settings(
    max_examples=2 * settings.default.max_examples, stateful_step_count=30
)
TestKeyedRaces = KeyedRaces.TestCase
