"""The ledger must catch what it promises to catch: a checker that never fails proves nothing.

Runs on mongomock (no server needed): each test stores a small, hand-made
history with one broken promise and expects `check_ledger` to name it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mongomock
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_tasks import write_mark
from ledger import check_ledger

from tullius.document import (
    Failure,
    FailureKind,
    Origin,
    Record,
    RecordKind,
    Status,
    TaskDoc,
    TaskSpec,
    derive_task_id,
    queued_doc,
    record_to_bson,
    task_to_bson,
)
from tullius.runtime.mongo_store import MongoStore

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SPEC = TaskSpec(
    class_name="fault_tasks:Noop",
    fields={},
    priority=5,
    timeout=timedelta(seconds=10),
    handler_timeout=timedelta(seconds=10),
    handler_attempts=2,
)


@pytest.fixture
def store() -> MongoStore:
    return MongoStore(mongomock.MongoClient(tz_aware=True)["ledger"])


def _record(task_id: str, suffix: str, kind: RecordKind, **fields: Any) -> Record:
    return Record(f"{task_id}:{suffix}", task_id, kind, token="t", at=NOW, server="s", **fields)


def _store(store: MongoStore, doc: TaskDoc, *records: Record) -> None:
    store.live_for(doc.task_id).insert_one(task_to_bson(doc))
    for record in records:
        store.records_for(record.task_id).insert_one(record_to_bson(record))


def _succeeded(task_id: str, spawned: tuple[TaskDoc, ...] = ()) -> tuple[TaskDoc, list[Record]]:
    doc = dataclasses.replace(queued_doc(SPEC, task_id=task_id, now=NOW), status=Status.SUCCEEDED)
    return doc, [
        _record(task_id, "run", RecordKind.RUN),
        _record(task_id, "outcome", RecordKind.OUTCOME, ok=True, spawned=spawned),
    ]


def _failure() -> Failure:
    return Failure(FailureKind.EXCEPTION, "boom", NOW)


def test_a_clean_history_passes(store: MongoStore) -> None:
    parent = queued_doc(SPEC, task_id="a", now=NOW)
    child = queued_doc(SPEC, task_id=derive_task_id(parent, Origin.SUCCESSOR, 0), now=NOW)
    child = dataclasses.replace(child, origin=Origin.SUCCESSOR, parent_id="a", root_id="a")
    doc, records = _succeeded("a", spawned=(child,))
    _store(store, doc, *records)
    done_child, child_records = _succeeded(child.task_id)
    done_child = dataclasses.replace(
        done_child, origin=Origin.SUCCESSOR, parent_id="a", root_id="a"
    )
    _store(store, done_child, *child_records)
    ledger = check_ledger(store, expect_tasks=2, process_timeout=0)
    assert ledger.status_counts() == {Status.SUCCEEDED: 2}


def test_a_task_left_running_is_reported(store: MongoStore) -> None:
    doc = dataclasses.replace(queued_doc(SPEC, task_id="r", now=NOW), status=Status.RUNNING)
    _store(store, doc, _record("r", "run", RecordKind.RUN))
    with pytest.raises(AssertionError, match=r"task r .* is running, not terminal"):
        check_ledger(store, process_timeout=0)


def test_a_stale_hint_is_reported(store: MongoStore) -> None:
    doc, records = _succeeded("h")
    _store(store, dataclasses.replace(doc, status=Status.RUNNING), *records)
    with pytest.raises(AssertionError, match="hint status 'running' disagrees"):
        check_ledger(store, process_timeout=0)


def test_a_failure_handled_twice_is_reported(store: MongoStore) -> None:
    doc = dataclasses.replace(queued_doc(SPEC, task_id="f", now=NOW), status=Status.HANDLED)
    _store(
        store,
        doc,
        _record("f", "run", RecordKind.RUN),
        _record("f", "outcome", RecordKind.OUTCOME, ok=False, failure=_failure()),
        _record("f", "handler:1", RecordKind.HANDLER, attempt=1),
        _record("f", "handler:1:end", RecordKind.HANDLER_END, attempt=1, ok=True),
        _record("f", "handler:2", RecordKind.HANDLER, attempt=2),
        _record("f", "handler:2:end", RecordKind.HANDLER_END, attempt=2, ok=True),
    )
    with pytest.raises(AssertionError, match="failure handled 2 times"):
        check_ledger(store, process_timeout=0)


def test_a_successor_its_parent_does_not_list_is_reported(store: MongoStore) -> None:
    doc, records = _succeeded("p")
    _store(store, doc, *records)
    stray, stray_records = _succeeded("stray")
    stray = dataclasses.replace(stray, origin=Origin.SUCCESSOR, parent_id="p", root_id="p")
    _store(store, stray, *stray_records)
    with pytest.raises(AssertionError, match="not listed by its parent's deciding record"):
        check_ledger(store, process_timeout=0)


def test_a_listed_successor_never_inserted_is_reported(store: MongoStore) -> None:
    child = queued_doc(SPEC, task_id="missing-child", now=NOW)
    doc, records = _succeeded("q", spawned=(child,))
    _store(store, doc, *records)
    with pytest.raises(AssertionError, match="spawned missing-child, which was never inserted"):
        check_ledger(store, process_timeout=0)


def test_run_started_twice_is_reported(store: MongoStore, tmp_path: Path) -> None:
    doc, records = _succeeded("twice")
    _store(store, doc, *records)
    write_mark(str(tmp_path), "run", "twice")
    write_mark(str(tmp_path), "run", "twice")
    with pytest.raises(AssertionError, match="run\\(\\) started 2 times"):
        check_ledger(store, tmp_path, process_timeout=0)


def test_a_live_task_process_is_reported(store: MongoStore, tmp_path: Path) -> None:
    doc, records = _succeeded("alive")
    _store(store, doc, *records)
    sleeper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fault_tasks; fault_tasks.write_mark({str(tmp_path)!r}, "
            "'run', 'alive'); import time; time.sleep(600)",
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("run.*.json")):
            if sleeper.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the marking process did not mark (exit status {sleeper.poll()})")
            time.sleep(0.01)
        with pytest.raises(
            AssertionError, match=f"task processes still running .* \\[{sleeper.pid}\\]"
        ):
            check_ledger(store, tmp_path, process_timeout=0.2)
    finally:
        sleeper.kill()
        sleeper.wait()
    check_ledger(store, tmp_path, process_timeout=10)
