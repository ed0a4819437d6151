"""Reading failure chains back: what happened to a task and to what it produced.

The simulator's ``sim.chain()`` and the daemon side's ``tullius.chain()`` both
read through here, from any `Store`, so a test written against the simulator
reads the same shape as an operator inspecting production.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tullius.document import (
    Failure,
    Origin,
    Status,
    TaskDoc,
    TaskView,
    retried_as,
    spawned_of,
    status_of,
)
from tullius.errors import TaskNotFound, UnknownTaskClass
from tullius.store import Store
from tullius.task import Task, from_doc


@dataclass(frozen=True)
class ChainLink:
    """One task's story.

    Attributes:
        task: the task rebuilt with its fields (None if its class can't be loaded).
        status: where it is; ``UNHANDLED`` when every try of ``failed()`` failed.
        outcome: ``"succeeded"``, ``"failed"``, or None while it has not ended.
        failure: why the run failed (``kind``, ``message``, ...), if it did.
        handler_error: the last error of ``failed()`` itself, if it raised,
            hung or returned something that is not a task.
        handler_attempts: how many times ``failed()`` was started.
        started_at / finished_at: when the run was claimed and when its outcome
            was recorded (after a store outage, when the store was back, which
            may be past the task's timeout although ``run()`` returned in time).
        server: the server that ran it.
        children: ids of the successors or replacements it produced, in the order
            ``run()`` or ``failed()`` returned them, then the copy an operator's
            retry made; those stored.
        first: the id of what the task produced first, stored or not: the
            successor or replacement returned first, or the retry's copy.
    """

    task_id: str
    class_name: str
    fields: dict[str, Any]
    task: Task | None
    status: Status
    origin: Origin
    parent_id: str | None
    outcome: str | None
    failure: Failure | None
    handler_error: Failure | None
    handler_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    server: str | None
    children: tuple[str, ...] = ()
    first: str | None = None


@dataclass(frozen=True)
class ChainTree:
    """A link and everything produced from it."""

    link: ChainLink
    children: list[ChainTree] = field(default_factory=list)

    def walk(self) -> list[ChainLink]:
        """Every link in the tree, depth first."""
        links = [self.link]
        for child in self.children:
            links.extend(child.walk())
        return links


def link_of(view: TaskView, children: list[TaskDoc]) -> ChainLink:
    """The `ChainLink` of one loaded task."""
    outcome = view.outcome
    failure = None if outcome is None or outcome.ok else outcome.failure
    attempts = view.handler_attempt
    handler_error = None
    for attempt in range(attempts, 0, -1):
        end = view.handler_end(attempt)
        if end is not None and not end.ok:
            handler_error = end.failure
            break
    try:
        task: Task | None = from_doc(view.task, failure=failure)
    except UnknownTaskClass:
        task = None
    run = view.run
    return ChainLink(
        task_id=view.task_id,
        class_name=view.task.class_name,
        fields=dict(view.task.fields),
        task=task,
        status=status_of(view),
        origin=view.task.origin,
        parent_id=view.task.parent_id,
        outcome=None if outcome is None else ("succeeded" if outcome.ok else "failed"),
        failure=failure,
        handler_error=handler_error,
        handler_attempts=attempts,
        started_at=None if run is None else run.at,
        finished_at=None if outcome is None else outcome.at,
        server=None if run is None else run.server,
        children=_in_returned_order(view, children),
        first=_first_produced(view),
    )


def _first_produced(view: TaskView) -> str | None:
    """The id of the successor or replacement returned first, or of the retry's copy.

    Read from the accepted records, not derived again: ids derive from the
    parent's ``created_at`` too since 2026-12-06, and the records carry what
    was derived when they were written.
    """
    spawned = spawned_of(view)
    if spawned:
        return spawned[0].task_id
    copy = retried_as(view)
    return None if copy is None else copy.task_id


def _in_returned_order(view: TaskView, children: list[TaskDoc]) -> tuple[str, ...]:
    """The children's ids in the order ``run()`` or ``failed()`` returned them.

    Why: the store finds children by id, and ids are hashes, so a tree listed a
    step's tasks in no order its author would recognise.  Any child the
    accepted record does not list (none, unless a document was edited) comes last.
    """
    position = {doc.task_id: index for index, doc in enumerate(spawned_of(view))}
    ids = [doc.task_id for doc in children]
    return tuple(sorted(ids, key=lambda task_id: position.get(task_id, len(position))))


def children_of(store: Store, view: TaskView) -> list[TaskDoc]:
    """The tasks ``view``'s task produced, as stored: those its records name (its
    successors or replacements) and its retry's copy, read by id.

    Why by id, not `Store.find_children`: only these have it as their parent, and
    on FerretDB a query by parent reads all of ``finished``, for every link read.
    """
    ids = [doc.task_id for doc in spawned_of(view)]
    copy = retried_as(view)
    if copy is not None:
        ids.append(copy.task_id)
    return store.find_tasks(ids) if ids else []


def _load_link(store: Store, task_id: str) -> ChainLink:
    view = store.load(task_id)
    if view is None:
        raise TaskNotFound(task_id)
    return link_of(view, children_of(store, view))


def read_chain(store: Store, task_id: str, *, limit: int = 10_000) -> list[ChainLink]:
    """The task and, in order, the first task produced at each step after it.

    "First" is the successor or replacement returned first (index 0); after
    an UNHANDLED task, the copy an operator's retry made (`tullius.retry`).

    Raises:
        TaskNotFound: no task ``task_id``.
    """
    chain = [_load_link(store, task_id)]
    while len(chain) < limit:
        first = chain[-1].first
        if first is None or first not in chain[-1].children:
            break
        chain.append(_load_link(store, first))
    return chain


def read_tree(store: Store, task_id: str, *, limit: int = 10_000) -> ChainTree:
    """The task and everything produced from it, as a tree (at most ``limit`` links)."""
    root = ChainTree(_load_link(store, task_id))
    pending = [root]
    count = 1
    while pending and count < limit:
        node = pending.pop()
        for child_id in node.link.children:
            child = ChainTree(_load_link(store, child_id))
            node.children.append(child)
            pending.append(child)
            count += 1
    return root
