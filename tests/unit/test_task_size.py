"""Tasks too big to ever be recorded are refused where they are made.

A record holds every task a step spawns and MongoDB refuses documents over
16 MiB, so a successor carrying a huge field would fail every attempt to record
its parent's outcome.  Instead: ``tullius.queue()`` raises, and a ``run()`` or
``failed()`` returning too much fails with ``bad_return`` — in the daemon's
worker and in the simulator alike — so ``failed()`` still runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import tullius
from tullius.document import FailureKind, queued_doc, task_to_bson
from tullius.errors import TaskDefinitionError
from tullius.runtime.worker import run_job
from tullius.sim import Simulation
from tullius.task import MAX_FIELDS_BYTES, stored_size, to_spec, to_specs
from tullius.testing import assert_outcomes

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HALF = "x" * (MAX_FIELDS_BYTES // 2)


class Blob(tullius.Task):
    timeout = timedelta(seconds=5)
    data: str

    def run(self) -> None:
        return None


class SpawnsTwoHalves(tullius.Task):
    """Returns two successors that are each allowed but together too big."""

    timeout = timedelta(seconds=5)

    def run(self) -> list[tullius.Task]:
        return [Blob(data=HALF), Blob(data=HALF)]

    def failed(self) -> None:
        return None


class NoDaemon:
    """The supervisor end of a worker's pipe, for a task that queues nothing."""

    def queue(self, specs: object) -> list[str]:
        raise AssertionError("nothing should be queued")


def test_stored_size_is_never_less_than_the_text_it_holds() -> None:
    fields = {"s": "é" * 10, "b": b"12345", "l": [1, 2.5, None], "d": {"k": "v"}}
    assert stored_size(fields) >= 20 + 5 + 3 + 1
    assert stored_size({"s": "x" * 1000}) > 1000


def test_queueing_a_task_whose_fields_are_too_big_is_refused_naming_the_class() -> None:
    with pytest.raises(TaskDefinitionError, match=r"Blob: fields take about .* expected at most"):
        to_spec(Blob(data="x" * (MAX_FIELDS_BYTES + 1)), role="tullius.queue() argument")


def test_tasks_that_are_small_alone_but_too_big_together_are_refused() -> None:
    to_specs([Blob(data=HALF)], role="run()")
    with pytest.raises(TaskDefinitionError, match=r"run\(\) \(all 2 tasks\)"):
        to_specs([Blob(data=HALF), Blob(data=HALF)], role="run()")


def test_a_worker_reports_a_run_returning_too_much_as_a_bad_return() -> None:
    doc = queued_doc(to_spec(SpawnsTwoHalves()), task_id="t1", now=NOW)
    job = {"kind": "run", "task": task_to_bson(doc), "failure": None, "server": "s"}
    result = run_job(job, NoDaemon())  # type: ignore[arg-type]
    assert result["ok"] is False
    assert result["failure"]["kind"] == FailureKind.BAD_RETURN
    assert "expected at most" in result["failure"]["message"]


def test_the_simulator_fails_a_run_returning_too_much_as_a_bad_return_too() -> None:
    with Simulation(seed=3) as sim:
        task = SpawnsTwoHalves()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=1))
        assert_outcomes(sim.chain(task), "bad_return")
