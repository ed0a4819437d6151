"""The worker's side of a job, in-process: what run_job reports for each way a task can end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import tullius
from tullius.document import Failure as StoredFailure
from tullius.document import FailureKind, TaskSpec, failure_to_bson, queued_doc, task_to_bson
from tullius.runtime.worker import run_job
from tullius.task import to_spec

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Adds(tullius.Task):
    timeout = timedelta(seconds=5)
    a: int
    b: int

    def run(self) -> tullius.Task:
        return Adds(a=self.a + self.b, b=0)

    def failed(self) -> tullius.Task | None:
        assert self.failure is not None
        return Adds(a=0, b=len(self.failure.kind))


class Raises(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        raise KeyError("missing thing")


class Exits(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        raise SystemExit(4)


class Garbage(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> Any:
        return 42


class QueuesOne(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        tullius.queue(Adds(a=1, b=2))


class FakeDaemon:
    """Stands in for the supervisor end of the pipe: records queue() calls."""

    def __init__(self) -> None:
        self.queued: list[TaskSpec] = []
        self.keys: list[str | None] = []

    def queue(self, specs: Any, key: str | None) -> list[str]:
        self.queued.extend(specs)
        self.keys.append(key)
        return [f"id{n}" for n in range(len(specs))]


def job(
    task: tullius.Task, kind: str = "run", failure: StoredFailure | None = None
) -> dict[str, Any]:
    doc = queued_doc(to_spec(task), task_id="t1", now=NOW)
    return {
        "kind": kind,
        "task": task_to_bson(doc),
        "failure": None if failure is None else failure_to_bson(failure),
        "server": "s",
    }


def test_run_returns_successor_specs() -> None:
    result = run_job(job(Adds(a=1, b=2)), FakeDaemon())  # type: ignore[arg-type]
    assert result["ok"] is True
    (spec,) = result["specs"]
    assert spec.fields == {"a": 3, "b": 0}


def test_failed_sees_the_failure_and_returns_replacements() -> None:
    failure = StoredFailure(kind="timeout", message="too slow", at=NOW)
    result = run_job(job(Adds(a=1, b=2), "handle", failure), FakeDaemon())  # type: ignore[arg-type]
    assert result["ok"] is True
    (spec,) = result["specs"]
    assert spec.fields == {"a": 0, "b": len("timeout")}


def test_exception_is_reported_with_its_traceback() -> None:
    result = run_job(job(Raises()), FakeDaemon())  # type: ignore[arg-type]
    assert result["ok"] is False
    failure = result["failure"]
    assert failure["kind"] == FailureKind.EXCEPTION
    assert "KeyError" in failure["message"]
    assert "missing thing" in failure["message"]
    assert "Traceback" in failure["traceback"]


def test_system_exit_in_user_code_is_an_exception_not_an_exit() -> None:
    result = run_job(job(Exits()), FakeDaemon())  # type: ignore[arg-type]
    assert result["failure"]["kind"] == FailureKind.EXCEPTION
    assert "SystemExit" in result["failure"]["message"]


def test_bad_return_value_is_bad_return() -> None:
    result = run_job(job(Garbage()), FakeDaemon())  # type: ignore[arg-type]
    assert result["failure"]["kind"] == FailureKind.BAD_RETURN
    assert "42" in result["failure"]["message"]


def test_unknown_class_is_unloadable() -> None:
    payload = job(Adds(a=1, b=2))
    payload["task"]["cls"] = "no_such_module_anywhere:Gone"
    result = run_job(payload, FakeDaemon())  # type: ignore[arg-type]
    assert result["failure"]["kind"] == FailureKind.UNLOADABLE
    assert "no_such_module_anywhere:Gone" in result["failure"]["message"]


def test_undecodable_document_is_unloadable() -> None:
    payload = job(Adds(a=1, b=2))
    del payload["task"]["timeout_ms"]
    result = run_job(payload, FakeDaemon())  # type: ignore[arg-type]
    assert result["failure"]["kind"] == FailureKind.UNLOADABLE
    assert "can't decode" in result["failure"]["message"]


def test_queue_inside_run_goes_to_the_daemon() -> None:
    daemon = FakeDaemon()
    result = run_job(job(QueuesOne()), daemon)  # type: ignore[arg-type]
    assert result == {"ok": True, "specs": []}
    (spec,) = daemon.queued
    assert spec.fields == {"a": 1, "b": 2}
    assert daemon.keys == [None]
