"""Task histories written through the engine itself, for tests on any store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.store_contract import make_doc
from tullius.band import Band
from tullius.document import Failure, FailureKind, TaskDoc
from tullius.engine import JobKind, claim, drive, finish
from tullius.events import Failed, HandlerFailed, Succeeded

ALL = Band(1, 0, 10)


def ran(
    store: Any, task_id: str, *, at: datetime, ok: bool, class_name: str = "tests:Nothing"
) -> None:
    """Queue ``task_id`` (one ``failed()`` attempt allowed) and run it at ``at``: it
    succeeds, or its run times out and its ``failed()`` raises, leaving it unhandled."""
    doc = make_doc(task_id)
    store.insert_tasks(
        [TaskDoc(**{**doc.__dict__, "handler_attempts": 1, "class_name": class_name})]
    )
    job = drive(store, claim(ALL, server="s", worker="w", token=f"{task_id}-run", now=at))
    assert job is not None
    assert job.task_id == task_id
    if ok:
        drive(store, finish(job, Succeeded(job.token, ()), now=at))
        return
    drive(store, finish(job, Failed(job.token, Failure(FailureKind.TIMEOUT, "slow", at)), now=at))
    job = drive(store, claim(ALL, server="s", worker="w", token=f"{task_id}-h", now=at))
    assert job is not None
    assert job.kind is JobKind.HANDLE
    error = Failure(FailureKind.EXCEPTION, "failed() raised", at)
    drive(store, finish(job, HandlerFailed(job.token, error), now=at))


def left_unhandled(
    store: Any, task_id: str, *, at: datetime, class_name: str = "tests:Nothing"
) -> None:
    """`ran`, failing: the task is left unhandled."""
    ran(store, task_id, at=at, ok=False, class_name=class_name)
