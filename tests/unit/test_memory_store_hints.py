"""MemoryStore.set_status copies the stored document's ``__dict__`` instead of
rebuilding it field by field; the result must be what a BSON round trip of the
updated document gives, sharing nothing mutable with what callers read before."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tullius.document import Origin, Status, TaskDoc, as_stored
from tullius.sim.memory_store import MemoryStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def a_doc() -> TaskDoc:
    return TaskDoc(
        task_id="t1",
        class_name="tests:Nothing",
        fields={"n": 1, "items": [1, (2, 3)], "at": T0 + timedelta(microseconds=1500)},
        priority=3,
        timeout=timedelta(seconds=1, microseconds=2500),
        handler_timeout=timedelta(minutes=1),
        handler_attempts=2,
        start_after=T0,
        created_at=T0,
        origin=Origin.QUEUED,
        root_id="t1",
    )


@pytest.mark.parametrize(
    ("status", "due_at"),
    [
        (Status.RUNNING, None),
        (Status.FAILED, T0 + timedelta(microseconds=2999)),
        (Status.FAILED, datetime(2030, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5)))),
        (Status.SUCCEEDED, None),
    ],
)
def test_set_status_stores_what_a_round_trip_of_the_updated_doc_gives(
    status: Status, due_at: datetime | None
) -> None:
    store = MemoryStore()
    store.insert_tasks([a_doc()])
    view = store.load("t1")
    assert view is not None
    store.set_status("t1", status, due_at)
    stored = store.all_tasks()[0]
    expected = as_stored(dataclasses.replace(a_doc(), status=status, due_at=due_at))
    assert type(stored) is TaskDoc
    assert stored == expected
    assert stored.__dict__ == expected.__dict__
    assert stored.fields is not view.task.fields
    assert stored.fields["items"] is not view.task.fields["items"]
