"""MemoryStore's fast normalisation must equal the BSON round trip every other store does.

`stored_task` and `stored_record` skip building BSON dictionaries (a simulator
hot path); the store contract only holds if they keep exactly what
`task_to_bson`/`task_from_bson` keep.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from tullius.document import (
    Failure,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    as_stored,
    record_from_bson,
    record_to_bson,
)
from tullius.sim.memory_store import stored_record, stored_task

instants = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    ),
)
durations = st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=3))
scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | instants
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text("abc", max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
docs = st.builds(
    TaskDoc,
    task_id=st.text("abcdef0123", min_size=1, max_size=8),
    class_name=st.just("tests:Nothing"),
    fields=st.dictionaries(st.text("xyz", min_size=1, max_size=3), values, max_size=4),
    priority=st.integers(0, 10) | st.floats(0, 10),
    timeout=durations,
    handler_timeout=durations,
    handler_attempts=st.integers(1, 5),
    start_after=instants,
    created_at=instants,
    origin=st.sampled_from(Origin),
    parent_id=st.none() | st.just("p"),
    root_id=st.sampled_from(["", "r"]),
    status=st.sampled_from(Status),
    due_at=st.none() | instants,
)
failures = st.builds(
    Failure,
    kind=st.sampled_from(["exception", "lost"]),
    message=st.text(max_size=5),
    at=instants,
    traceback=st.none() | st.text(max_size=5),
    server=st.none() | st.just("s1"),
)
records = st.builds(
    Record,
    record_id=st.just("t:outcome"),
    task_id=st.just("t"),
    kind=st.sampled_from(RecordKind),
    token=st.text(max_size=4),
    at=instants,
    server=st.just("s1"),
    attempt=st.integers(0, 5),
    worker=st.none() | st.just("w"),
    beat=st.integers(0, 100),
    ok=st.none() | st.booleans(),
    failure=st.none() | failures,
    spawned=st.lists(docs, max_size=2).map(tuple),
    retry_at=st.none() | instants,
)


@given(docs)
def test_a_stored_task_equals_its_bson_round_trip(doc: TaskDoc) -> None:
    assert stored_task(doc) == as_stored(doc)


@given(records)
def test_a_stored_record_equals_its_bson_round_trip(record: Record) -> None:
    assert stored_record(record) == record_from_bson(record_to_bson(record))
