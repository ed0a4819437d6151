"""Maintenance benchmark: how fast ``tulliusd --prune-finished`` deletes history
and ``tulliusd --retry-unhandled all`` retries; prints figures.

    python bench/maintenance_bench.py [--tasks 1000]

Prune: writes ``--tasks`` finished tasks ten days old (a third failed and
handled, so two or four records each) through the engine into a fresh
database, with as many recent ones that must stay, then times one prune of
everything over three days old.  FerretDB reads a whole collection for every
delete, which is why the store deletes a batch with one ``delete_many`` per
collection.

Retry: writes ``--tasks`` unhandled tasks (run and only ``failed()`` attempt
failed) and times one `retry_all` of them: per task a load, the retry record,
the copy's two records and the copy, and a read of it.

Both on FerretDB (built and started with the integration tests' harness, in a
temporary directory) and on mongomock.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import mongomock  # noqa: E402
import pymongo  # noqa: E402
from ferretdb_server import FerretDBServer, build_ferretdb  # noqa: E402

from tullius.api import insert_queued  # noqa: E402
from tullius.band import Band  # noqa: E402
from tullius.document import Failure, FailureKind, TaskSpec  # noqa: E402
from tullius.engine import claim, drive, finish  # noqa: E402
from tullius.events import Failed, HandlerFailed, HandlerSucceeded, Succeeded  # noqa: E402
from tullius.prune import MIN_AGE, prune  # noqa: E402
from tullius.retry import retry_all  # noqa: E402
from tullius.runtime.mongo_store import MongoStore  # noqa: E402

BAND = Band(1, 0, 10)
SPEC = TaskSpec(
    class_name="bench:Nothing",
    fields={"payload": "x" * 200},
    priority=5,
    timeout=timedelta(seconds=30),
    handler_timeout=timedelta(seconds=30),
    handler_attempts=3,
)


def history(store: MongoStore, tasks: int, *, at: datetime, prefix: str) -> None:
    """``tasks`` tasks run to their end at ``at``; every third fails and is handled."""
    ids = iter(f"{prefix}{n}" for n in range(tasks))
    insert_queued(store, [SPEC] * tasks, now=at, new_id=ids.__next__)
    for n in range(tasks):
        job = drive(store, claim(BAND, server="b", worker="w", token=f"{prefix}r{n}", now=at))
        assert job is not None
        if n % 3:
            drive(store, finish(job, Succeeded(job.token), now=at))
            continue
        failure = Failure(FailureKind.EXCEPTION, "every third", at)
        drive(store, finish(job, Failed(job.token, failure), now=at))
        handler = drive(store, claim(BAND, server="b", worker="w", token=f"{prefix}h{n}", now=at))
        assert handler is not None
        drive(store, finish(handler, HandlerSucceeded(handler.token, ()), now=at))


def unhandled(store: MongoStore, tasks: int, *, at: datetime) -> None:
    """``tasks`` tasks whose run and only ``failed()`` attempt failed at ``at``."""
    ids = iter(f"u{n}" for n in range(tasks))
    once = TaskSpec(**{**SPEC.__dict__, "handler_attempts": 1})
    insert_queued(store, [once] * tasks, now=at, new_id=ids.__next__)
    failure = Failure(FailureKind.EXCEPTION, "broken", at)
    for n in range(tasks):
        for kind, event in (("r", Failed), ("h", HandlerFailed)):
            job = drive(store, claim(BAND, server="b", worker="w", token=f"{kind}{n}", now=at))
            assert job is not None
            drive(store, finish(job, event(job.token, failure), now=at))


def measure_retry(db: Any, tasks: int, label: str) -> None:
    store = MongoStore(db)
    store.ensure_indexes()
    now = datetime.now(UTC)
    unhandled(store, tasks, at=now - timedelta(hours=1))
    start = time.perf_counter()
    report = drive(store, retry_all(now=now, token="bench", server="bench"))
    wall = time.perf_counter() - start
    retried = len(report.retried)
    assert retried == tasks, report.describe()
    print(
        f"{label}: retried {retried:,} unhandled tasks in {wall:.2f} s: "
        f"{retried / wall:,.0f} tasks/s",
        flush=True,
    )


def measure(db: Any, tasks: int, label: str) -> None:
    store = MongoStore(db)
    store.ensure_indexes()
    now = datetime.now(UTC)
    history(store, tasks, at=now - timedelta(days=10), prefix="old")
    history(store, tasks, at=now - timedelta(hours=1), prefix="new")
    start = time.perf_counter()
    report = drive(store, prune(MIN_AGE, now=now))
    wall = time.perf_counter() - start
    deleted = sum(report.deleted.values())
    print(
        f"{label}: pruned {deleted:,} tasks (kept {sum(report.kept.values()):,}) "
        f"in {wall:.2f} s: {deleted / wall:,.0f} tasks/s",
        flush=True,
    )


@contextmanager
def ferretdb_client() -> Iterator[Any]:
    """A client of a FerretDB built and started (by the integration tests' harness) in a
    temporary directory, stopped and removed after."""
    with tempfile.TemporaryDirectory() as workdir:
        server = FerretDBServer(build_ferretdb(), Path(workdir) / "ferretdb", log_level="warn")
        server.start()
        try:
            client: Any = pymongo.MongoClient(server.uri, tz_aware=True)
            yield client
            client.close()
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args(argv)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()}",
        flush=True,
    )
    measure(mongomock.MongoClient(tz_aware=True)["prune_bench"], args.tasks, "mongomock")
    measure_retry(mongomock.MongoClient(tz_aware=True)["retry_bench"], args.tasks, "mongomock")
    with ferretdb_client() as client:
        measure(client["prune_bench"], args.tasks, "FerretDB")
        measure_retry(client["retry_bench"], args.tasks, "FerretDB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
