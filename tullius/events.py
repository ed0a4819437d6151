"""The machine's inputs: facts a driver observed or outcomes it wants recorded.

Each event is a frozen dataclass named in the past tense.  Events that only the
owner of a lease may report carry the owner's ``token``; the machine refuses
them from anyone else.  Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from tullius.document import Failure, TaskSpec, quick_init

# An event is built for every step of every task: `quick_init` spares the
# field-by-field ``__init__`` of a frozen dataclass.


@quick_init
@dataclass(frozen=True)
class Claimed:
    """A worker wants to run a queued task."""

    token: str
    server: str
    worker: str | None = None


@quick_init
@dataclass(frozen=True)
class Succeeded:
    """The owner's ``run()`` returned these successors."""

    token: str
    successors: tuple[TaskSpec, ...] = ()


@quick_init
@dataclass(frozen=True)
class Failed:
    """The owner's ``run()`` failed (raised, timed out, crashed, was shut down...)."""

    token: str
    failure: Failure


@quick_init
@dataclass(frozen=True)
class LeaseExpired:
    """An observer saw the lease ``record_id`` go unrenewed for too long.

    Staleness is judged on the observer's own monotonic clock (see
    `policy.LeaseWatch`), never by comparing wall clocks across servers.
    """

    record_id: str
    observer: str


@quick_init
@dataclass(frozen=True)
class HandlerClaimed:
    """A worker wants to run ``failed()`` for a failed task."""

    token: str
    server: str
    worker: str | None = None


@quick_init
@dataclass(frozen=True)
class HandlerSucceeded:
    """The owner's ``failed()`` returned these replacements."""

    token: str
    replacements: tuple[TaskSpec, ...] = ()


@quick_init
@dataclass(frozen=True)
class HandlerFailed:
    """The owner's ``failed()`` raised, hung, or returned something that is not a task."""

    token: str
    error: Failure


@quick_init
@dataclass(frozen=True)
class Retried:
    """An operator wants ``failed()`` tried again for an UNHANDLED task.

    The task itself stays UNHANDLED (terminal states never change): the retry
    spawns a copy of it, born FAILED with the task's own failure, whose
    ``failed()`` then gets the usual attempts.  ``server`` names the operator's
    process in the records.
    """

    token: str
    server: str
    #: The copy's ``failed_timeout`` and ``failed_attempts`` if not the task's own:
    #: its class's as the operator's process loads it now (the fix may have
    #: raised them), see `tullius.retry.current_limits`.
    handler_timeout: timedelta | None = None
    handler_attempts: int | None = None


@quick_init
@dataclass(frozen=True)
class Swept:
    """A sweeper (or a loser of a race) wants the hints and pending inserts repaired."""


Event = (
    Claimed
    | Succeeded
    | Failed
    | LeaseExpired
    | HandlerClaimed
    | HandlerSucceeded
    | HandlerFailed
    | Retried
    | Swept
)
