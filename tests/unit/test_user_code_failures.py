"""User code that fails in the odd ways, recorded alike by both drivers.

Each case once left a task ``running`` for ever in the simulator (the
error escaped while it was being put into words) or crashed ``tulliusd``'s
worker.  Every one must end as a failure record whose ``failed()`` runs, the
same under ``tulliusd``'s worker (`run_job`) and in the simulator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import tullius
from tullius.document import queued_doc, task_to_bson
from tullius.runtime.worker import run_job
from tullius.sim import Simulation
from tullius.task import to_spec
from tullius.user_errors import MAX_MESSAGE, MAX_TRACEBACK


class Mute(Exception):
    def __str__(self) -> str:
        raise RuntimeError("can't describe myself")


class RaisesMute(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        raise Mute


class RaisesAnEssay(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        def deep(n: int) -> None:
            if n == 0:
                raise ValueError("x" * 100_000)
            deep(n - 1)

        deep(400)


class Child(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        pass


class ReturnsABrokenGenerator(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> Iterator[tullius.Task]:
        yield Child()
        raise LookupError("lookup failed while building successors")


class FieldsRaise(Child):
    @property
    def fields(self) -> dict[str, Any]:
        raise RuntimeError("fields are broken")


class ReturnsUnreadableFields(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> tullius.Task:
        return FieldsRaise()


class ReturnsACycle(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> tullius.Task:
        child = Child()
        loop: list[object] = []
        loop.append(loop)
        child.loop = loop  # after construction: checked only when returned
        return child


class BuildsABadSuccessor(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> tullius.Task:
        return Child(when=datetime(2026, 1, 1))  # naive: refused inside run()


class Unshowable:
    def __repr__(self) -> str:
        raise RuntimeError("repr boom")


class ReturnsUnshowable(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> Any:
        return Unshowable()


Ending = tuple[str, str, str | None]


def through_the_worker(task: tullius.Task) -> Ending:
    doc = queued_doc(to_spec(task), task_id="t1", now=datetime(2026, 1, 1, tzinfo=UTC))
    payload = {"kind": "run", "task": task_to_bson(doc), "failure": None, "server": "s"}
    result = run_job(payload, _NoDaemon())  # type: ignore[arg-type]
    assert result["ok"] is False
    failure = result["failure"]
    return failure["kind"], failure["message"], failure["traceback"]


def through_the_simulator(task: tullius.Task) -> Ending:
    sim = Simulation(seed=3)
    sim.queue(task)
    counts = sim.drain(within=timedelta(minutes=1))
    assert counts.handled == 1  # failed() ran: nothing left running
    failure = sim.chain(task)[0].failure
    sim.check()
    sim.close()
    assert failure is not None
    return failure.kind, failure.message, failure.traceback


class _NoDaemon:
    def queue(self, specs: Any) -> list[str]:
        raise AssertionError("these tasks queue nothing")


drivers = pytest.mark.parametrize(
    "driver", [through_the_worker, through_the_simulator], ids=["worker", "simulator"]
)


@drivers
def test_an_exception_whose_str_raises_is_recorded_by_its_type(
    driver: Callable[[tullius.Task], Ending],
) -> None:
    kind, message, traceback = driver(RaisesMute())
    assert kind == "exception"
    assert message == "run() raised Mute: <str() of the exception raised RuntimeError>"
    assert traceback is not None
    assert "raise Mute" in traceback


@drivers
def test_a_huge_message_and_traceback_are_cut_to_their_limits(
    driver: Callable[[tullius.Task], Ending],
) -> None:
    kind, message, traceback = driver(RaisesAnEssay())
    assert kind == "exception"
    assert message.startswith("run() raised ValueError: xxx")
    assert len(message) == MAX_MESSAGE
    assert traceback is not None
    assert len(traceback) == MAX_TRACEBACK
    assert traceback.endswith("x" * 1000 + "\n")  # the end is kept: where it was raised


@drivers
@pytest.mark.parametrize(
    ("task", "shown"),
    [
        (ReturnsABrokenGenerator(), "LookupError: lookup failed while building successors"),
        (ReturnsUnreadableFields(), "RuntimeError: fields are broken"),
        # The worker called it bad_return: its except clause covered run() too.
        (BuildsABadSuccessor(), "TaskFieldError: Child.when holds a 'naive datetime' value"),
    ],
)
def test_user_code_raising_while_its_return_value_is_read_is_an_exception(
    driver: Callable[[tullius.Task], Ending], task: tullius.Task, shown: str
) -> None:
    kind, message, traceback = driver(task)
    assert kind == "exception"
    assert message.startswith(f"run() raised {shown}")
    assert traceback is not None


@drivers
@pytest.mark.parametrize(
    ("task", "shown"),
    [
        (ReturnsACycle(), r"Child.loop\[0\]\[0\]\[0\].* nested 65 levels deep"),
        (ReturnsUnshowable(), r"run\(\) returned <Unshowable instance at 0x[0-9a-f]+>; expected"),
    ],
)
def test_a_return_value_that_cannot_be_stored_or_shown_is_a_bad_return(
    driver: Callable[[tullius.Task], Ending], task: tullius.Task, shown: str
) -> None:
    kind, message, _ = driver(task)
    assert kind == "bad_return"
    assert message is not None
    assert re.search(shown, message), message
