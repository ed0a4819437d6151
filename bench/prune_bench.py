"""Prune benchmark: how fast ``tulliusd --prune-finished`` deletes history; prints figures.

    python bench/prune_bench.py [--tasks 1000]

Writes ``--tasks`` finished tasks ten days old (a third failed and handled, so
two or four records each) through the engine into a fresh database, with as
many recent ones that must stay, then times one prune of everything over two
days old: on FerretDB (built and started with the integration tests' harness,
in a temporary directory) and on mongomock.  FerretDB reads a whole collection
for every delete, which is why the store deletes a batch with one
``delete_many`` per collection.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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
from tullius.events import Failed, HandlerSucceeded, Succeeded  # noqa: E402
from tullius.prune import MIN_AGE, prune  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args(argv)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()}",
        flush=True,
    )
    measure(mongomock.MongoClient(tz_aware=True)["prune_bench"], args.tasks, "mongomock")
    with tempfile.TemporaryDirectory() as workdir:
        server = FerretDBServer(build_ferretdb(), Path(workdir) / "ferretdb", log_level="warn")
        server.start()
        try:
            client: Any = pymongo.MongoClient(server.uri, tz_aware=True)
            measure(client["prune_bench"], args.tasks, "FerretDB")
            client.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
