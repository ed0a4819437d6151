"""The original README's example, runnable with ``tulliusd --embedded --demo``.

`ExampleTask` counts to ``count_to``, one second per count, under a 5 second
timeout; its ``failed()`` queues a copy counting to one less.  Queued with
``count_to=10`` it times out at 10, 9, 8, 7, 6 and 5 and succeeds at 4, each
step decided by the real runtime: worker processes, hard timeouts, records.
`QuickExampleTask` is the same story five times faster, for tests.

`ChainPrinter` prints the chain as it unfolds, reading it from the store like
any operator would (``tullius.chain``), so it works on MongoDB as well.
"""

from __future__ import annotations

import logging
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import ClassVar, TextIO

import tullius
from tullius.api import insert_queued
from tullius.document import TERMINAL, Status
from tullius.inspection import ChainLink, read_tree
from tullius.store import Store
from tullius.task import to_spec

log = logging.getLogger(__name__)


class ExampleTask(tullius.Task):
    """Count to ``count_to``, one count per second; give up a little on failure."""

    timeout = timedelta(seconds=5)
    #: Seconds per count (a class attribute, so it is not stored with the task).
    seconds_per_count: ClassVar[float] = 1.0
    count_to: int

    def run(self) -> None:
        import time

        for i in range(self.count_to):
            log.info("Counting: %d", i)
            time.sleep(self.seconds_per_count)

    def failed(self) -> tullius.Task:
        return self.copy(count_to=max(self.count_to - 1, 0))


class QuickExampleTask(ExampleTask):
    """`ExampleTask` five times faster: 0.2 s per count, 1 s timeout."""

    timeout = timedelta(seconds=1)
    seconds_per_count: ClassVar[float] = 0.2


def queue_demo(store: Store, *, quick: bool = False, count_to: int = 10) -> str:
    """Queue the example into ``store``; return its task id."""
    cls = QuickExampleTask if quick else ExampleTask
    spec = to_spec(cls(count_to=count_to), role="demo task")
    (task_id,) = insert_queued(
        store, [spec], now=datetime.now(UTC), new_id=lambda: uuid.uuid4().hex
    )
    return task_id


def _name(link: ChainLink) -> str:
    if link.task is not None:
        return repr(link.task)
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(link.fields.items()))
    return f"{link.class_name}({args})"


class ChainPrinter:
    """Prints each step of a task's tree once, as it happens; True when all is terminal.

    Meant as a `Supervisor` observer: called repeatedly with the store.
    """

    def __init__(self, root_id: str, out: TextIO | None = None) -> None:
        self.root_id = root_id
        self.out = out
        self._printed: set[tuple[str, str]] = set()

    def _say(self, key: tuple[str, str], text: str) -> None:
        if key in self._printed:
            return
        self._printed.add(key)
        print(text, file=self.out or sys.stdout, flush=True)

    def __call__(self, store: Store) -> bool:
        links = read_tree(store, self.root_id).walk()
        links.sort(
            key=lambda link: (
                link.started_at is None,
                link.started_at or datetime.min.replace(tzinfo=UTC),
            )
        )
        done = all(link.status in TERMINAL for link in links)
        for link in links:
            name = _name(link)
            if link.outcome == "succeeded":
                took = ""
                if link.started_at is not None and link.finished_at is not None:
                    took = f" after {(link.finished_at - link.started_at).total_seconds():.1f}s"
                self._say((link.task_id, "outcome"), f"{name}: succeeded{took}")
            elif link.outcome == "failed" and link.failure is not None:
                self._say(
                    (link.task_id, "outcome"),
                    f"{name}: failed ({link.failure.kind}): {link.failure.message}",
                )
            children = [_name(c) for c in links if c.parent_id == link.task_id]
            if link.status is Status.HANDLED and (children or done):
                # Replacements are inserted just after the record that decides them.
                returned = ", ".join(children) if children else "nothing"
                self._say((link.task_id, "handled"), f"{name}: failed() queued {returned}")
            elif link.status is Status.UNHANDLED:
                error = link.handler_error.message if link.handler_error else "?"
                self._say((link.task_id, "handled"), f"{name}: failed() gave up: {error}")
        return done
