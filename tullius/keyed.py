"""Keyed ``queue()`` calls: a call repeated with its key stores its tasks once.

The key names the call; its ``i``-th task's id is `keyed_task_id(key, i)`, so a
repeat (after an error whose write may have been applied, a retried request,
another process making the same call) inserts the same ids.  The one atomic
primitive the store has (an ``_id`` insert is refused when the id is stored)
is not enough alone: `MongoStore` refuses a duplicate only in the live queue,
and a repeat must notice a different task given under a used key.  So a keyed
call reads before and after it inserts; design.md, "Why it stays correct",
says why each read is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tullius.document import TaskDoc, TaskSpec, as_stored, keyed_task_id, queued_doc, short_name
from tullius.effects import InsertTasks
from tullius.engine import Conversation
from tullius.errors import ConfigError, KeyConflict
from tullius.store import LoadMany, StoredIds


def insert_keyed(specs: Sequence[TaskSpec], *, key: str, now: datetime) -> Conversation[list[str]]:
    """Insert the root tasks of a ``queue()`` call with ``key``; return their ids.

    A task already stored under one of the ids is kept, not inserted again, so
    the call can be repeated, and stores each task once.  A stored task that
    is not the same class and fields (or can't be read) raises `KeyConflict`;
    a conflict seen before inserting stores nothing.  A conversation (driven
    by `tullius.engine.drive`), so that a property test can interleave its
    operations with other writers'.
    """
    docs = [
        queued_doc(spec, task_id=keyed_task_id(key, index), now=now)
        for index, spec in enumerate(specs)
    ]
    # Read first, not insert and compare: MongoStore refuses a repeated id only while
    # the task is live.  A finished task's id inserted again is queued again (its
    # claim then loses to the stored run record: no second run, but work), and a
    # different task given under its key would vanish without a word.  Which ids are
    # stored is cheap to ask; the tasks are read only for a repeat, and as `load`
    # reads them: a live copy an earlier racing call left of a finished task is
    # dropped, giving the finished one (`find_tasks` would give the copy).
    ids = [doc.task_id for doc in docs]
    present: set[str] = yield StoredIds(tuple(ids))
    stored: set[str] = set()
    if present:
        views = yield LoadMany(tuple(task_id for task_id in ids if task_id in present))
        stored = _same_as_stored(key, docs, [view.task for view in views])
        unread = tuple(task_id for task_id in ids if task_id in present and task_id not in stored)
        if unread:
            # Gone since (pruned meanwhile), or stored but unreadable: ask again.
            still: set[str] = yield StoredIds(unread)
            if still:
                # Stored again meanwhile by another call with the key (readable now),
                # or unreadable for good: read once more.
                views = yield LoadMany(tuple(task_id for task_id in unread if task_id in still))
                stored |= _same_as_stored(key, docs, [view.task for view in views])
            for index, task_id in enumerate(ids):
                if task_id in still and task_id not in stored:
                    # Inserted again, it would inherit what is left of the old task.
                    raise KeyConflict(key, index, task_id, KeyConflict.UNREADABLE)
    missing = tuple(doc for doc in docs if doc.task_id not in stored)
    if missing:
        yield InsertTasks(missing)
        # Compare again what is stored now: another call with the key may have come
        # between the read and the insert, and its task may even have finished
        # since: the insert then made a live copy of it, which MongoStore's `load`
        # drops, giving the finished task.  (Or this insert's first answer was lost
        # and its repeat found its own tasks: the same ones.)
        views = yield LoadMany(tuple(doc.task_id for doc in missing))
        _same_as_stored(key, docs, [view.task for view in views])
    return ids


def check_key(key: object) -> str | None:
    """``key`` as a plain ``str`` if it can be a ``queue()`` key (a non-empty str that
    encodes as UTF-8; a subclass is taken by its value, as fields are), or None."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ConfigError("queue() key", key, "is not a key; expected a non-empty str")
    try:
        key.encode()
    except UnicodeEncodeError as error:
        raise ConfigError(
            "queue() key", key, f"can't be encoded as UTF-8 ({error.reason}); expected a str"
        ) from None
    return str.__str__(key)


def _same_as_stored(key: str, docs: Sequence[TaskDoc], found: Sequence[TaskDoc]) -> set[str]:
    """The ids of ``docs`` (all of the call's, for the index a conflict names) found
    stored (``found``); `KeyConflict` if one differs."""
    by_id = {doc.task_id: doc for doc in found}
    for index, doc in enumerate(docs):
        stored = by_id.get(doc.task_id)
        if stored is not None:
            difference = _difference(stored, as_stored(doc))
            if difference:
                raise KeyConflict(key, index, doc.task_id, difference)
    return set(by_id)


def _difference(stored: TaskDoc, given: TaskDoc) -> str:
    """How ``given`` (as it would be stored) differs in class or fields; "" if not."""
    if stored.class_name != given.class_name:
        return f"stored {short_name(stored.class_name)}, given {short_name(given.class_name)}"
    for name in sorted(set(stored.fields) | set(given.fields)):
        if name not in given.fields:
            return f"field {name!r} only in the stored task"
        if name not in stored.fields:
            return f"field {name!r} only in the given task"
        if not _same_value(stored.fields[name], given.fields[name]):
            return (
                f"field {name!r}: {_short(stored.fields[name])} stored, "
                f"{_short(given.fields[name])} given"
            )
    return ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_value(stored: Any, given: Any) -> bool:
    """Equal as stored values, of the same BSON type: a bool only to a bool, an int
    only to an int and a float only to a float (Python finds ``True == 1 == 1.0``,
    but ``run()`` gets what the first call stored; a repeat of the call gives the
    same types), a NaN to a NaN."""
    for kind in (bool, int, float):  # (bool first: a bool is an int to Python)
        if isinstance(stored, kind) or isinstance(given, kind):
            if not (isinstance(stored, kind) and isinstance(given, kind)):
                return False
            return stored == given or (kind is float and stored != stored and given != given)
    if isinstance(stored, dict) and isinstance(given, dict):
        return stored.keys() == given.keys() and all(
            _same_value(value, given[name]) for name, value in stored.items()
        )
    if isinstance(stored, list) and isinstance(given, list):
        return len(stored) == len(given) and all(map(_same_value, stored, given))
    return bool(stored == given)
