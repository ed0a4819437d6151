"""The machine's outputs: store writes, as data, in the order they must be made.

A driver applies the effects of one step in order.  `InsertRecord` is the
decisive one: if the store already holds a different record under that id,
the step lost a race and the driver must stop applying it (the rival's record
is the truth).  The other effects are idempotent and safe to repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tullius.document import Record, Status, TaskDoc, quick_init

# Every effect is built on every step of every task: `quick_init` spares the
# field-by-field ``__init__`` of a frozen dataclass.


@quick_init
@dataclass(frozen=True)
class InsertRecord:
    """Insert ``record`` unless its id exists; first insert wins."""

    record: Record


@quick_init
@dataclass(frozen=True)
class InsertTasks:
    """Insert each task unless its id exists (a repeat is a no-op)."""

    docs: tuple[TaskDoc, ...]


@quick_init
@dataclass(frozen=True)
class SetStatus:
    """Set the status and due-time hints of a task whose hint is not terminal."""

    task_id: str
    status: Status
    due_at: datetime | None = None


Effect = InsertRecord | InsertTasks | SetStatus
