"""The ledger: what must be true of the database and the machine after any fault scenario.

A fault test drives daemons, the database and the network through some
misfortune, waits for the work to settle, stops the daemons, and then calls
`check_ledger()`.  It reads every task and every record (in bulk, through
`MongoStore`'s collections) plus the marks the test tasks left
(``fault_tasks.py``), and raises one AssertionError listing *every* broken
promise:

1. every task is terminal by its records (SUCCEEDED, HANDLED, UNHANDLED), and
   its status hint agrees (sweeps must have repaired it);
2. every failure was handled exactly once: handler attempts are numbered
   1..n without gaps, each ended, at most one ended ok and only the last; an
   UNHANDLED task used every allowed attempt;
3. every spawned task was inserted exactly once: each task with a parent is
   listed in its parent's *deciding* record (an ok OUTCOME for successors,
   the ok HANDLER_END for replacements) with the same id, and every listed
   id is stored; a rejected late result therefore can't have slipped in a
   second successor or replacement;
4. from the marks: ``run()`` started at most once per task, ``failed()``
   started no more often than handler attempts were claimed, and a task
   that succeeded did run;
5. no task process (nor a child a task started) is still alive.

Why a separate checker: each scenario asserts its own story (say, "the
failure kind is lost"), but these invariants are the product's promise and
must hold after every scenario, so they are checked the same way each time.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fault_tasks import proc_stat

from tullius.document import (
    TERMINAL,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskView,
    record_from_bson,
    status_of,
)
from tullius.runtime.mongo_store import UNDECODABLE, MongoStore, decode_task


@dataclass(frozen=True)
class Mark:
    """One call of ``run()``/``failed()`` (or a child process) as a test task recorded it."""

    what: str
    task_id: str | None
    pid: int
    start: int | None
    at: float
    data: Mapping[str, Any]


@dataclass
class Ledger:
    """Everything read back after a scenario."""

    views: dict[str, TaskView] = field(default_factory=dict)
    undecodable: dict[str, str] = field(default_factory=dict)  #: task id -> why
    orphan_records: list[str] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def status(self, task_id: str) -> Status:
        return status_of(self.views[task_id])

    def status_counts(self) -> Counter[Status]:
        return Counter(status_of(view) for view in self.views.values())

    def failure_kinds(self) -> Counter[str]:
        """How many run failures of each kind (from OUTCOME records)."""
        kinds: Counter[str] = Counter()
        for view in self.views.values():
            outcome = view.outcome
            if outcome is not None and not outcome.ok and outcome.failure is not None:
                kinds[outcome.failure.kind] += 1
        return kinds

    def marks_of(self, task_id: str | None, what: str) -> list[Mark]:
        return [m for m in self.marks if m.task_id == task_id and m.what == what]

    def children(self, task_id: str) -> list[TaskView]:
        return sorted(
            (v for v in self.views.values() if v.task.parent_id == task_id),
            key=lambda v: v.task_id,
        )

    def summary(self) -> str:
        counts = ", ".join(f"{s.value}={n}" for s, n in sorted(self.status_counts().items()))
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.failure_kinds().items()))
        return f"{len(self.views)} tasks ({counts}); run failures: {kinds or 'none'}"


# --- reading ----------------------------------------------------------------------------------


def read_marks(marks_dir: Path | str | None) -> list[Mark]:
    """Every mark written into ``marks_dir`` (none if it is None or missing)."""
    if marks_dir is None or not Path(marks_dir).is_dir():
        return []
    marks = []
    for path in sorted(Path(marks_dir).glob("*.json")):
        data = json.loads(path.read_text())
        marks.append(
            Mark(
                data["what"], data.get("task_id"), data["pid"], data.get("start"), data["at"], data
            )
        )
    return marks


def read_ledger(store: MongoStore, marks_dir: Path | str | None = None) -> Ledger:
    """Read all tasks and records in bulk (two queries, not two per task)."""
    ledger = Ledger(marks=read_marks(marks_dir))
    docs: dict[str, TaskDoc] = {}
    # Finished copies first: a live copy of the same task (mid-move) wins, as in load().
    live = [raw for collection in store.live_collections() for raw in collection.find({})]
    for raw in [*store.finished.find({}), *live]:
        try:
            docs[str(raw["_id"])] = decode_task(raw)
        except (KeyError, ValueError, TypeError) as error:
            ledger.undecodable[str(raw.get("_id"))] = f"{type(error).__name__}: {error}"
    records: dict[str, dict[str, Record]] = {task_id: {} for task_id in docs}
    for raw in (raw for shard in store.record_collections() for raw in shard.find({})):
        record = record_from_bson(raw)
        if record.task_id in records:
            records[record.task_id][record.record_id] = record
        elif record.task_id not in ledger.undecodable:
            ledger.orphan_records.append(record.record_id)
    ledger.views = {task_id: TaskView(doc, records[task_id]) for task_id, doc in docs.items()}
    return ledger


# --- processes --------------------------------------------------------------------------------


def _alive(pid: int, start: int | None) -> bool:
    """True if the process that wrote a mark still runs (zombies, recycled pids: gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def task_processes(marks: Iterable[Mark]) -> set[tuple[int, int | None]]:
    """The (pid, start time) of every process a task ran in or started."""
    found: set[tuple[int, int | None]] = set()
    for mark in marks:
        found.add((mark.pid, mark.start))
        if "child_pid" in mark.data and mark.what == "child":
            found.add((mark.data["child_pid"], mark.data.get("child_start")))
    return found


def live_task_processes(marks: Iterable[Mark]) -> list[int]:
    return sorted(pid for pid, start in task_processes(marks) if _alive(pid, start))


def wait_processes_gone(marks: Iterable[Mark], timeout: float) -> list[int]:
    """Poll until every task process is gone; return the pids still alive at the deadline."""
    procs = task_processes(marks)
    deadline = time.monotonic() + timeout
    while True:
        alive = sorted(pid for pid, start in procs if _alive(pid, start))
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_leftovers(marks_dir: Path | str | None) -> list[int]:
    """SIGKILL any task process still alive (test cleanup, so a failure does not leak sleepers)."""
    killed = []
    for pid, start in task_processes(read_marks(marks_dir)):
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


# --- checking ---------------------------------------------------------------------------------


def _check_task(view: TaskView, problems: list[str]) -> None:
    tid = view.task_id
    status = status_of(view)
    if status not in TERMINAL:
        lease = view.current_lease()
        owner = "" if lease is None else f", lease {lease.record_id} of {lease.server!r}"
        problems.append(
            f"task {tid} ({view.task.class_name}) is {status.value}, not terminal{owner}"
        )
        return
    if view.task.status is not status:
        problems.append(
            f"task {tid}: hint status {view.task.status.value!r} disagrees with its records "
            f"({status.value!r})"
        )
    outcome = view.outcome
    assert outcome is not None  # terminal implies an outcome
    if outcome.kind is not RecordKind.OUTCOME:
        problems.append(f"task {tid}: outcome record has kind {outcome.kind.value!r}")
    attempts = view.handler_attempt
    handler_ids = sorted(r.record_id for r in view.records.values() if r.kind is RecordKind.HANDLER)
    expected_ids = sorted(f"{tid}:handler:{n}" for n in range(1, attempts + 1))
    if handler_ids != expected_ids:
        problems.append(f"task {tid}: handler records {handler_ids} are not 1..{attempts}")
    ends = [view.handler_end(n) for n in range(1, attempts + 1)]
    ok_ends = [n for n, end in enumerate(ends, 1) if end is not None and end.ok]
    if outcome.ok:
        if attempts:
            problems.append(f"task {tid} succeeded yet has {attempts} handler attempt(s)")
        if outcome.failure is not None:
            problems.append(f"task {tid}: an ok outcome carries failure {outcome.failure!r}")
        return
    if outcome.spawned:
        problems.append(
            f"task {tid}: a failed outcome spawned {[d.task_id for d in outcome.spawned]}"
        )
    if outcome.failure is None:
        problems.append(f"task {tid}: failed outcome without a failure")
    if attempts == 0:
        problems.append(f"task {tid}: failed but failed() was never claimed")
    missing_ends = [n for n, end in enumerate(ends, 1) if end is None]
    if missing_ends:
        problems.append(f"task {tid}: handler attempt(s) {missing_ends} never ended")
    if len(ok_ends) > 1:
        problems.append(f"task {tid}: failure handled {len(ok_ends)} times (attempts {ok_ends})")
    if ok_ends and ok_ends[-1] != attempts:
        problems.append(
            f"task {tid}: handled at attempt {ok_ends[-1]} yet attempt {attempts} exists"
        )
    if status is Status.UNHANDLED and attempts != view.task.handler_attempts:
        problems.append(
            f"task {tid}: unhandled after {attempts} attempt(s); "
            f"expected all {view.task.handler_attempts}"
        )
    for n, end in enumerate(ends, 1):
        if end is not None and not end.ok and end.spawned:
            problems.append(f"task {tid}: failed handler attempt {n} spawned tasks")


def _deciding_spawn(view: TaskView) -> tuple[Origin | None, tuple[str, ...]]:
    """Which children the task's deciding record lists, and as what."""
    outcome = view.outcome
    if outcome is None:
        return None, ()
    if outcome.ok:
        return Origin.SUCCESSOR, tuple(d.task_id for d in outcome.spawned)
    for n in range(view.handler_attempt, 0, -1):
        end = view.handler_end(n)
        if end is not None and end.ok:
            return Origin.REPLACEMENT, tuple(d.task_id for d in end.spawned)
    return None, ()


def _check_spawn(ledger: Ledger, problems: list[str]) -> None:
    listed: dict[str, tuple[str, Origin]] = {}
    for view in ledger.views.values():
        origin, ids = _deciding_spawn(view)
        if len(set(ids)) != len(ids):
            problems.append(f"task {view.task_id}: its deciding record lists an id twice: {ids}")
        for child_id in ids:
            assert origin is not None
            if child_id in listed:
                problems.append(
                    f"task {child_id} is listed by both {listed[child_id][0]} and {view.task_id}"
                )
            listed[child_id] = (view.task_id, origin)
            if child_id not in ledger.views and child_id not in ledger.undecodable:
                problems.append(f"task {view.task_id} spawned {child_id}, which was never inserted")
    for view in ledger.views.values():
        parent = view.task.parent_id
        if parent is None:
            if view.task.origin is not Origin.QUEUED:
                problems.append(
                    f"task {view.task_id}: origin {view.task.origin.value} without parent"
                )
            continue
        entry = listed.get(view.task_id)
        if entry is None:
            problems.append(
                f"task {view.task_id} ({view.task.origin.value} of {parent}) is not listed by its "
                "parent's deciding record: inserted by a writer whose result lost"
            )
        elif entry != (parent, view.task.origin):
            problems.append(
                f"task {view.task_id}: stored as {view.task.origin.value} of {parent}, listed as "
                f"{entry[1].value} of {entry[0]}"
            )


def _check_marks(ledger: Ledger, problems: list[str]) -> None:
    runs = Counter(m.task_id for m in ledger.marks if m.what == "run")
    handlers = Counter(m.task_id for m in ledger.marks if m.what == "failed")
    for task_id, n in runs.items():
        if n > 1:
            problems.append(f"task {task_id}: run() started {n} times; expected at most once")
        if task_id not in ledger.views:
            problems.append(f"a run() mark names task {task_id!r}, which is not stored")
    for task_id, n in handlers.items():
        view = ledger.views.get(task_id)
        claimed = 0 if view is None else view.handler_attempt
        if n > claimed:
            problems.append(
                f"task {task_id}: failed() started {n} times, {claimed} attempt(s) claimed"
            )
    marked_classes = {ledger.views[t].task.class_name for t in runs if t in ledger.views}
    for view in ledger.views.values():
        outcome = view.outcome
        if (
            outcome is not None
            and outcome.ok
            and view.task.class_name in marked_classes
            and runs[view.task_id] == 0
        ):
            problems.append(f"task {view.task_id} succeeded but its run() never started")


def check_ledger(
    store: MongoStore,
    marks_dir: Path | str | None = None,
    *,
    expect_tasks: int | None = None,
    allow_undecodable: Iterable[str] = (),
    process_timeout: float = 30.0,
) -> Ledger:
    """Read everything back and assert the invariants in the module docstring.

    Call it after the daemons have stopped (or at least gone idle): a task
    process is only required to be gone by then.

    Args:
        store: the store the scenario ran on.
        marks_dir: where the test tasks wrote their marks.
        expect_tasks: if given, the exact number of tasks stored.
        allow_undecodable: ids of task documents a test broke on purpose.
        process_timeout: how long to wait for task processes to disappear
            (a killed daemon's workers notice their parent's death by polling).

    Returns:
        The `Ledger`, for the scenario's own assertions.

    Raises:
        AssertionError: listing every problem found.
    """
    ledger = read_ledger(store, marks_dir)
    problems: list[str] = []
    allowed = set(allow_undecodable)
    for task_id, why in ledger.undecodable.items():
        if task_id not in allowed:
            problems.append(f"task document {task_id!r} can't be decoded: {why}")
    if expect_tasks is not None and len(ledger.views) != expect_tasks:
        problems.append(f"{len(ledger.views)} tasks stored; expected {expect_tasks}")
    if ledger.orphan_records:
        problems.append(f"records without a task: {ledger.orphan_records[:10]}")
    for view in ledger.views.values():
        _check_task(view, problems)
    _check_spawn(ledger, problems)
    _check_marks(ledger, problems)
    alive = wait_processes_gone(ledger.marks, process_timeout)
    if alive:
        problems.append(f"task processes still running after {process_timeout}s: pids {alive}")
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise AssertionError(f"ledger check failed ({ledger.summary()}):\n  {shown}{more}")
    return ledger


def settled(store: MongoStore, expect_at_least: int = 1) -> bool:
    """True when at least ``expect_at_least`` tasks exist and every status hint is terminal.

    Cheap (two counts), for ``wait_for``; the hints only turn terminal after
    the deciding record exists, and lagging hints must be repaired by the
    daemons, so waiting on them also checks the repair.
    """
    shards = store.live_collections()
    total = sum(c.count_documents({}) for c in shards) + store.finished.count_documents({})
    if total < expect_at_least:
        return False
    # A task leaves the live queue when its hint turns terminal; only
    # documents set aside as undecodable stay there, for an operator.
    return all(c.count_documents({"status": {"$ne": UNDECODABLE}}) == 0 for c in shards)
