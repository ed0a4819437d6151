"""The application-facing calls: ``queue()``, ``configure()``, ``chain()``, ``retry_unhandled()``.

Where queued tasks go, in order of precedence:

1. a *sink* installed by a driver for the code it runs (the simulator routes
   ``queue()`` inside ``run()``/``failed()`` to its store; a worker process
   sends them to its daemon);
2. the store or database given to `configure()`;
3. ``tullius_deps.make_db()``, as in the original README.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from tullius.clock import window_seconds
from tullius.document import TaskSpec, keyed_task_id, queued_doc
from tullius.engine import drive
from tullius.errors import ConfigError, TaskDefinitionError
from tullius.inspection import ChainLink, ChainTree, read_chain, read_tree
from tullius.keyed import check_key, insert_keyed
from tullius.policy import WRITE_WINDOW
from tullius.retry import Retry, retry_now
from tullius.store import Store
from tullius.task import Task, find_in_module, queued_tasks, split_task_name, to_specs

#: Where a driver sends ``queue()`` calls: the specs and the call's ``key`` (or None).
Sink = Callable[[Sequence[TaskSpec], str | None], list[str]]

_sink: ContextVar[Sink | None] = ContextVar("tullius_queue_sink", default=None)
_store: Store | None = None
#: The simulations not closed yet (`tullius.sim.Simulation` adds and removes
#: itself), named in `queue`'s error when no store is configured.
OPEN_SIMULATIONS: weakref.WeakSet[Any] = weakref.WeakSet()


def configure(*, db: Any = None, store: Store | None = None) -> None:
    """Say where ``queue()`` and ``chain()`` go, instead of ``tullius_deps.make_db()``.

    Args:
        db: a pymongo ``Database``.
        store: any `Store` (e.g. a ``MemoryStore`` in tests).  Give one, or neither to reset.
    """
    global _store
    if db is not None and store is not None:
        raise ConfigError("configure", "db and store", "give one of db= or store=, not both")
    if db is not None:
        from tullius.runtime.mongo_store import MongoStore  # pymongo only when asked for

        mongo = MongoStore(db)
        mongo.ensure_indexes()
        _store = mongo
    else:
        _store = store


def current_store() -> Store:
    """The configured store, or one made from ``tullius_deps.make_db()`` (then cached)."""
    global _store
    if _store is None:
        from tullius.deps import load_deps
        from tullius.runtime.mongo_store import MongoStore

        deps = load_deps()
        assert deps is not None
        if deps.make_db is None:
            raise ConfigError("tullius_deps.make_db", None, "must be defined to queue tasks")
        from pymongo.database import Database

        db = deps.make_db()
        if not isinstance(db, Database):
            # Checked here, as tulliusd checks it at start-up: otherwise the mistake
            # surfaces deep in pymongo ("'Collection' object is not callable").
            raise ConfigError(
                "tullius_deps.make_db() return value",
                type(db).__name__,
                "is not a pymongo Database; "
                "expected e.g. pymongo.MongoClient(journal=True).tullius",
            )
        mongo = MongoStore(db)
        mongo.ensure_indexes()
        _store = mongo
    return _store


@contextmanager
def queue_sink(sink: Sink) -> Iterator[None]:
    """Route ``queue()`` calls in this context (thread/task) to ``sink``; for drivers."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def insert_queued(
    store: Store,
    specs: Sequence[TaskSpec],
    *,
    now: datetime,
    new_id: Callable[[], str],
    key: str | None = None,
    write_clock: Callable[[], float] | None = None,
) -> list[str]:
    """Insert new root tasks for ``specs``; return their ids.  Used by every driver.

    With a ``key`` (checked by `check_key`), as `tullius.keyed.insert_keyed`:
    the ids are the key's, and a repeated call stores nothing twice.  Given a
    ``write_clock`` (`tullius.clock.window_seconds`), a keyed call writes
    nothing past a `WRITE_WINDOW` after it started, and raises
    `WriteWindowClosed` instead: a prune tells a task stored again under a key
    from the one it read by ``created_at``, the call's start (`tullius.prune`),
    which a call frozen for days would date days before it stored the task.
    """
    if key is None:
        docs = [queued_doc(spec, task_id=new_id(), now=now) for spec in specs]
        store.insert_tasks(docs)
        return [doc.task_id for doc in docs]
    conversation = insert_keyed(specs, key=key, now=now)
    if write_clock is None:
        return drive(store, conversation)
    write_by = write_clock() + WRITE_WINDOW.total_seconds()
    return drive(store, conversation, write_by=write_by, clock=write_clock)


def queue(task_or_tasks: Task | Iterable[Task], *, key: str | None = None) -> list[str]:
    """Store tasks to be run.  Returns their ids, also set as each task's ``task_id``.

    All tasks are validated before any is stored: a refused call stores nothing.

    Args:
        key: names the call, so that repeating it stores nothing twice: its
            tasks get ids derived from the key (`keyed_id`), and a task already
            stored under one is kept.  Use it where a call may be repeated
            after an error whose write may have been applied, or by a retried
            request: a key of your own, e.g. ``f"invoice-{invoice.id}"``.
            Remembered as long as the task is kept (see pruning).

    Raises:
        TaskDefinitionError: something that is not a Task, or a field that can't be stored.
        ConfigError: no store is configured and ``tullius_deps`` is missing; a bad ``key``.
        KeyConflict: a task stored under ``key`` differs in class or fields.
        WriteWindowClosed: a keyed call that could not store its tasks within a
            day of its start (the process frozen, or the database out of reach,
            that long); nothing more was written, and repeating it is safe.
    """
    key = check_key(key)
    tasks = queued_tasks(task_or_tasks, role="queue() argument")
    specs = to_specs(tasks, role="queue() argument")
    sink = _sink.get()
    if sink is not None:
        ids = sink(specs, key)
    else:
        for task in tasks:
            _check_loadable_elsewhere(type(task))
        try:
            store = current_store()
        except ConfigError as error:
            if OPEN_SIMULATIONS:  # the likely slip in a test: the simulation was meant
                error.add_note(
                    "A tullius.sim.Simulation is open: to queue into it from the test, "
                    "call this within `with sim.queue_calls():`"
                )
            raise
        ids = insert_queued(
            store,
            specs,
            now=datetime.now(UTC),
            new_id=lambda: uuid.uuid4().hex,
            key=key,
            write_clock=window_seconds,
        )
    for task, task_id in zip(tasks, ids, strict=True):
        task.task_id = task_id
    return ids


def keyed_id(key: str, index: int = 0) -> str:
    """The id ``queue(..., key=key)`` gives its ``index``-th task (0: the first or only one),
    for ``chain()`` or ``tulliusd --status`` without the task at hand."""
    checked = check_key(key)
    if checked is None:
        raise ConfigError("keyed_id() key", key, "is not a key; expected a non-empty str")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ConfigError("keyed_id() index", index, "expected an int >= 0")
    return keyed_task_id(checked, index)


def _check_loadable_elsewhere(cls: type[Task]) -> None:
    """Refuse a class that ``tulliusd``'s workers could never load by its stored name.

    Why: a worker imports the name's module and looks the class up in it
    (`tullius.task.load_class`).  A class defined in the script being run
    (``__main__``) or inside a function is not there, so every task of it would
    fail as ``unloadable`` and, since ``failed()`` can't load either, end
    UNHANDLED.  (Only for the store: a driver's sink runs in the process that
    has the class.)  A module not imported here is not checked.
    """
    parts = split_task_name(cls.task_name)
    assert parts is not None  # checked when the class was defined
    module_name, qualname = parts
    if module_name == "__main__":
        raise TaskDefinitionError(
            f"{cls.__name__} is defined in __main__ (the script being run), which "
            "tulliusd's workers can't import; expected a Task class defined in a module"
        )
    module = sys.modules.get(module_name)
    if module is None:
        return
    if find_in_module(module, qualname) is not cls:
        raise TaskDefinitionError(
            f"{cls.__name__} is stored as {cls.task_name!r}, but {module_name!r} has no "
            f"{qualname!r} that is this class (defined inside a function?), so tulliusd's "
            "workers can't load it; expected a class defined at the top of a module"
        )


def task_id_of(task_or_id: Task | str) -> str:
    """The id of a queued task, or the id itself; for the inspection calls of every driver."""
    if isinstance(task_or_id, Task):
        if task_or_id.task_id is None:
            raise ConfigError(
                "task", task_or_id, "has not been queued; expected a queued task or its id"
            )
        return task_or_id.task_id
    if not isinstance(task_or_id, str):
        raise ConfigError("task", task_or_id, "is not a task; expected a queued Task or its id")
    return task_or_id


def chain(task_or_id: Task | str, *, store: Store | None = None) -> list[ChainLink]:
    """The failure chain of a queued task: it, then the first task produced at each step."""
    return read_chain(store or current_store(), task_id_of(task_or_id))


def retry_unhandled(
    task_or_id: Task | str, *, store: Store | None = None, dry_run: bool = False
) -> Retry:
    """Try ``failed()`` again for an UNHANDLED task, once its code is fixed.

    The task stays UNHANDLED; a copy of it, born failed with its failure, has
    its ``failed()`` run by the daemons (``run()`` never runs again), and
    ``chain()`` follows the task to it.  Asking again for a task already
    retried returns that retry (completing it if it was cut short).  With
    ``dry_run``, nothing is written: the result says what would be.

    Raises:
        TaskNotFound: no such task.
        NotRetried: the task is not UNHANDLED (the message says what it is).
    """
    return retry_now(
        store or current_store(),
        task_id_of(task_or_id),
        server=f"retry_unhandled() on {socket.gethostname()}:{os.getpid()}",
        token=uuid.uuid4().hex,
        dry_run=dry_run,
    )


def tree(task_or_id: Task | str, *, store: Store | None = None) -> ChainTree:
    """Everything produced from a queued task, as a tree."""
    return read_tree(store or current_store(), task_id_of(task_or_id))
