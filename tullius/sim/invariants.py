"""The promises a simulation checks after every event, and the errors it raises.

`Invariants` is fed by the simulation as store writes land and as drivers
learn their verdicts; each check looks only at what the event touched, so a
run of a hundred thousand events stays linear.  The promises (issue 3, item 5):

1. every failure handled exactly once: one accepted outcome per task, one
   accepted ``failed()`` result per failed outcome, and each successor or
   replacement inserted exactly once (``MemoryStore.insert_counts``);
2. conservation: every stored task was queued by the application or is listed
   in the accepted record of its parent (for a retry's copy, its parent's
   ``retry`` record, and the copy is stored only after its run and failed
   outcome records, so that its ``run()`` never runs); nothing stored ever
   disappears;
3. no terminal task resurrected: a task's true status, once terminal, never
   changes;
4. at most one accepted owner per lease, and an accepted result always comes
   from the lease's owner;
5. no run longer than its timeout plus the kill grace (time the server spent
   paused excluded: a frozen process can't be stopped either);
6. priority order and band reservation: a worker only claims tasks in its
   band, and never a queued task while a more urgent one, due on its clock and
   queued before the claim that read its candidates (a claim tries what an
   earlier one read for up to ``engine.REUSE_CANDIDATES_FOR``, as in
   ``tulliusd``), was waiting in its band;
7. after faults stop, no lease outlives ``timeout + kill grace + lease + 2 *
   sweep interval + poll interval`` (so every task reaches a terminal status
   within that bound plus the handler backoff, or the drain horizon reports
   it), checked by `Simulation.check()` and at the end of each run.

A violation raises `InvariantViolation` with the seed, the fault schedule and
the last events of the trace: enough to replay it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tullius.document import (
    TERMINAL,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskView,
    status_of,
)
from tullius.sim.virtual_time import SimulationError


class InvariantViolation(SimulationError):
    """A promise was broken.  The message carries everything needed to replay it.

    Attributes:
        promise: which promise (``"one accepted outcome"``...).
        detail: what was seen.
        seed, faults, last_events: the replay data.
    """

    def __init__(
        self, promise: str, detail: str, seed: int, faults: Sequence[object], last_events: list[str]
    ) -> None:
        self.promise = promise
        self.detail = detail
        self.seed = seed
        self.faults = list(faults)
        self.last_events = last_events
        events = "\n  ".join(last_events) or "(none)"
        super().__init__(
            f"invariant {promise!r} violated: {detail}\n"
            f"seed={seed}\nfaults={self.faults!r}\nlast events:\n  {events}"
        )


class DrainTimeout(SimulationError):
    """`Simulation.drain()` reached its horizon with tasks still open.

    Attributes:
        open_tasks: one line per open task: id, class, status and what it waits for.
    """

    def __init__(self, within: object, seed: int, open_tasks: list[str]) -> None:
        self.within = within
        self.seed = seed
        self.open_tasks = open_tasks
        listing = "\n  ".join(open_tasks)
        super().__init__(
            f"drain(within={within!r}) reached its horizon with {len(open_tasks)} task(s) "
            f"still open (seed={seed}):\n  {listing}"
        )


class NoTimePasses(SimulationError):
    """A chain of tasks went on for ``instant_chain_limit`` generations at one
    virtual instant (`Simulation`): each step returned the next at once and
    nothing slept, so virtual time could never reach a horizon (``drain`` and
    ``run_for`` spun for ever, holding more memory with each task).

    Attributes:
        task_id: the latest task of the chain.
        generations: how many tasks followed one another at that instant.
        at: the instant, from the simulation's start.
        seed: the simulation's seed.
    """

    def __init__(self, task_id: str, generations: int, at: timedelta, seed: int) -> None:
        self.task_id = task_id
        self.generations = generations
        self.at = at
        self.seed = seed
        super().__init__(
            f"{generations:,} tasks followed one another at {at} without virtual time "
            f"passing, the latest {task_id!r} (seed={seed}): each run() or failed() returns "
            "the next at once and nothing sleeps, so the horizon never comes (tulliusd would "
            "spin as fast as the database answers); give the replacement a delay, e.g. "
            "self.copy(delay=timedelta(seconds=5)), or bound the retries (a chain that "
            "is meant to be this long: raise Simulation(instant_chain_limit=...))"
        )


@dataclass
class Violation:
    promise: str
    detail: str


class Invariants:
    """Incremental checks; the simulation calls the ``on_*`` hooks and reads ``violation``."""

    def __init__(self) -> None:
        self.roots: set[str] = set()
        self.statuses: dict[str, Status] = {}
        self.accepted: dict[str, str] = {}
        self.violation: Violation | None = None

    def fail(self, promise: str, detail: str) -> None:
        if self.violation is None:
            self.violation = Violation(promise, detail)

    # --- store writes -------------------------------------------------------------

    def on_tasks_inserted(
        self, docs: Sequence[TaskDoc], insert_counts: dict[str, int], load: Any
    ) -> None:
        for doc in docs:
            count = insert_counts.get(doc.task_id, 0)
            if count > 1:
                self.fail("each task inserted once", f"task {doc.task_id!r} inserted {count} times")
            if doc.origin is Origin.QUEUED:
                if doc.task_id not in self.roots:
                    self.fail("conservation", f"root task {doc.task_id!r} was never queued")
                continue
            parent = load(doc.parent_id) if doc.parent_id else None
            if parent is None or doc.task_id not in _spawned_ids(parent):
                self.fail(
                    "conservation",
                    f"task {doc.task_id!r} ({doc.origin.value}) is not listed in an accepted "
                    f"record of its parent {doc.parent_id!r}",
                )
            if doc.origin is Origin.RETRY:
                copy = load(doc.task_id)
                if copy is None or status_of(copy) is Status.QUEUED:
                    self.fail(
                        "conservation",
                        f"retry copy {doc.task_id!r} was stored before its run and outcome "
                        "records: it reads as queued, and its run() would run",
                    )

    def on_status(self, view: TaskView) -> Status:
        """Track the true status of a task after a write; return it."""
        status = status_of(view)
        before = self.statuses.get(view.task_id)
        if before is not None and before in TERMINAL and status is not before:
            self.fail(
                "no terminal task resurrected",
                f"task {view.task_id!r} went from {before.value!r} to {status.value!r}",
            )
        self.statuses[view.task_id] = status
        return status

    # --- driver verdicts ----------------------------------------------------------

    def on_accepted(self, record: Record, token: str, owner: Record | None) -> None:
        """A driver's finish was accepted: ``record`` is the record its insert stored."""
        earlier = self.accepted.setdefault(record.record_id, token)
        if earlier != token:
            self.fail(
                "one accepted outcome",
                f"{record.record_id!r} accepted for token {earlier!r} and again for {token!r}",
            )
        if record.token != token:
            self.fail(
                "accepted result comes from the owner",
                f"{record.record_id!r} accepted for {token!r} but stores token {record.token!r}",
            )
        if owner is not None and owner.token != token:
            self.fail(
                "accepted result comes from the owner",
                f"{record.record_id!r} accepted for {token!r}; "
                f"the lease belongs to {owner.token!r}",
            )

    def on_run_length(self, what: str, ran_us: int, allowed_us: int) -> None:
        if ran_us > allowed_us:
            self.fail(
                "no run longer than its timeout",
                f"{what} ran {ran_us / 1e6:.6f}s of virtual time; allowed {allowed_us / 1e6:.6f}s",
            )


def _spawned_ids(view: TaskView) -> set[str]:
    """The ids of the tasks the accepted records of ``view`` spawned: successors,
    replacements, and the copy an operator's retry made (`tullius.retry`)."""
    ids: set[str] = set()
    outcome = view.outcome
    if outcome is not None and outcome.ok:
        ids.update(doc.task_id for doc in outcome.spawned)
    for record in view.records.values():
        kind = record.kind
        if (kind is RecordKind.HANDLER_END and record.ok) or kind is RecordKind.RETRY:
            ids.update(doc.task_id for doc in record.spawned)
    return ids
