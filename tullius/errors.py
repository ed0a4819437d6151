"""Every exception Tullius raises on purpose, in one tree.

    TulliusError
      ConfigError            bad settings; raised at start-up, before any task runs
      TaskDefinitionError    a Task subclass or instance is malformed (raised where it is written)
        TaskFieldError       a field value that can't be stored as BSON
      TaskError
        InvalidTransition    an event not allowed in the task's status; nothing changed
        TaskNotFound
        NotRetried           an unhandled task's failed() can't be retried (see tullius.retry)
        KeyConflict          queue(key=K) given a task other than the one stored under K
        UnknownTaskClass     a stored document names a class that can't be loaded
      StoreError
        StoreUnavailable     the database could not be reached after retries

    TaskDefinitionWarning    a Task subclass name that looks like a misspelt setting or hook

Each exception keeps its data as attributes and builds its message from them, so
callers can act on the data and people can read the message. Nothing else lives here.
"""

from __future__ import annotations

from typing import Any


class TulliusError(Exception):
    """Base of every error Tullius raises deliberately."""


class ConfigError(TulliusError):
    """A setting is wrong; raised eagerly, before any task is touched.

    Attributes:
        setting: the name of the setting, as the user spelled it.
        value: the offending value.
        expected: what would have been accepted.
    """

    def __init__(self, setting: str, value: Any, expected: str) -> None:
        self.setting = setting
        self.value = value
        self.expected = expected
        super().__init__(f"{setting}={value!r} {expected}")


class TaskDefinitionError(TulliusError, TypeError):
    """A Task subclass or a Task construction is malformed.

    A ``TypeError`` too, because that is what Python raises for a bad call.
    """


class TaskDefinitionWarning(UserWarning):
    """A name in a Task subclass looks like a misspelling of one Tullius reads.

    A warning, not an error: the name may be meant (a helper method ``fail``).
    But a misspelt ``failed`` leaves the default, which accepts every failure
    without doing anything, and a misspelt ``failed_attempts`` or ``timeout``
    is silently the default too.

    Attributes:
        class_name, name: where and what; meant: the name it resembles.
    """

    def __init__(self, class_name: str, name: str, meant: str) -> None:
        self.class_name = class_name
        self.name = name
        self.meant = meant
        super().__init__(
            f"{class_name}.{name} looks like a misspelling of {meant!r}, which Tullius "
            f"reads from a Task class; as written it is ignored and {meant} keeps its "
            "default (rename it if it is meant to be something else)"
        )


class TaskFieldError(TaskDefinitionError):
    """A task field holds a value that can't be stored as a BSON value.

    Attributes:
        task_class: the Task subclass name.
        field: the field name, with a path inside nested values (``items[2].when``).
        value_type: the type name of the value that was refused.
        expected: what would have been accepted.
    """

    def __init__(self, task_class: str, field: str, value_type: str, expected: str) -> None:
        self.task_class = task_class
        self.field = field
        self.value_type = value_type
        self.expected = expected
        super().__init__(
            f"{task_class}.{field} holds a {value_type!r} value, which can't be stored as BSON; "
            f"expected {expected}"
        )


class TaskError(TulliusError):
    """Something about one stored task."""


class InvalidTransition(TaskError):
    """An event is not allowed in the task's current status; nothing was changed.

    Attributes:
        task_id: the task.
        status: its status when the event arrived.
        event: the event that was refused.
        reason: why, when more than "no such transition".
    """

    def __init__(self, task_id: str, status: str, event: object, reason: str = "") -> None:
        self.task_id = task_id
        self.status = status
        self.event = event
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"can't handle {type(event).__name__} in status {status!r} "
            f"(task_id={task_id!r}){detail}"
        )


class TaskNotFound(TaskError):
    """No task with this id is stored."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with task_id={task_id!r}")


class NotRetried(TaskError):
    """A retry of ``failed()`` refused: the task is not UNHANDLED (`tullius.retry`).
    Nothing was written.

    Attributes:
        task_id: the task asked for.
        reason: why, and what was expected.
    """

    def __init__(self, task_id: str, reason: str) -> None:
        self.task_id = task_id
        self.reason = reason
        super().__init__(f"task {task_id!r} not retried: {reason}")


class KeyConflict(TaskError, ValueError):
    """``queue(..., key=K)`` was given a task other than the one stored under ``K``.

    Why an error: a key says "this is the same call as before", so that a
    repeat after a lost answer stores nothing twice.  A different class or
    different fields under a key already used is a mistake (a key reused for
    another purpose, or not unique enough), and keeping the stored task
    silently would lose the new one.  Nothing of the call was stored, unless
    another call with the key raced it (then the tasks without a conflict may
    be).  A ``ValueError`` too: the argument is wrong, not its type.

    Attributes:
        key: the key given.
        index: which task of the call (0 for the first or only one).
        task_id: the stored task's id (`tullius.keyed_id(key, index)`).
        difference: what differs, e.g. ``field 'amount': 10 stored, 12 given``.
    """

    #: `difference` for a stored task that can't be read, so can't be compared.
    UNREADABLE = (
        "set aside as undecodable, or pruned but for an operator's retry record, which "
        "a task stored again under its id would inherit"
    )

    def __init__(self, key: str, index: int, task_id: str, difference: str) -> None:
        self.key = key
        self.index = index
        self.task_id = task_id
        self.difference = difference
        which = "" if index == 0 else f" (task {index} of the call)"
        if difference == self.UNREADABLE:
            message = f"which can't be read ({difference}); expected a new key"
        else:
            message = (
                f"a different task: {difference}; expected the same class and fields as "
                "the call that first used the key, or a new key"
            )
        super().__init__(f"queue() key={key!r}{which} is already task {task_id!r}, {message}")


class UnknownTaskClass(TaskError):
    """A stored task names a class that can't be loaded as a Task subclass.

    Attributes:
        name: the stored class name.
        reason: what went wrong when loading it.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"can't load task class {name!r}: {reason}")


class StoreError(TulliusError):
    """The store failed an operation. The operation may or may not have been applied."""


class StoreUnavailable(StoreError):
    """The database could not be reached, even after retrying.

    Attributes:
        operation: what was being attempted.
        cause: a short description of the last error (never containing credentials).
    """

    def __init__(self, operation: str, cause: str) -> None:
        self.operation = operation
        self.cause = cause
        super().__init__(f"store unavailable during {operation}: {cause}")


class WriteWindowClosed(TulliusError):
    """A driver gave up a write it was too late to make (`engine.drive`'s ``write_by``).

    Why: pruning (`tullius.prune`) deletes a finished task's records, whose
    existence is what makes a late writer lose; it counts on no daemon writing
    for a task long after it could have held it.  A conversation that could
    not write in time (the database out of reach for a day, the server
    paused) ends with this instead; nothing of it is written any more.

    Attributes:
        operation: the write given up, e.g. ``InsertRecord``.
        late_by: how many seconds past ``write_by`` it came.
    """

    def __init__(self, operation: str, late_by: float) -> None:
        self.operation = operation
        self.late_by = late_by
        super().__init__(
            f"{operation} given up: {late_by:.0f} s past the write window "
            f"(expected to write within it; see tullius.prune)"
        )
