"""Queue benchmark: what a key costs a ``tullius.queue()`` call; prints figures.

    python bench/queue_bench.py [--calls 500] [--history 1000] [--ferretdb-only]

Times ``--calls`` calls of one task each, as ``tullius.queue()`` stores them
(`tullius.api.insert_queued`, after the task is validated): without a key (one
insert), with a new key each time (a read of the id, then the insert), and
repeating keys already used (the read only). A keyed call reads its id first
in the live queue and in ``finished``; on FerretDB such a read scans the
collection (design.md, "Known limits"), so each case runs beside
``--history`` finished tasks (written through the engine, as
``maintenance_bench.py`` does) and beside none.

On mongomock and on FerretDB (built and started with the integration tests'
harness, in a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import mongomock  # noqa: E402
from maintenance_bench import SPEC, ferretdb_client, history  # noqa: E402

from tullius.api import insert_queued  # noqa: E402
from tullius.runtime.mongo_store import MongoStore  # noqa: E402


def rate(calls: int, call: Callable[[int], object]) -> float:
    """Calls per second of ``call(n)`` for n in ``range(calls)``."""
    start = time.perf_counter()
    for n in range(calls):
        call(n)
    return calls / (time.perf_counter() - start)


def measure(make_db: Callable[[str], Any], calls: int, finished: int, label: str) -> None:
    store = MongoStore(make_db(f"queue_bench_{finished}"))
    store.ensure_indexes()
    now = datetime.now(UTC)
    if finished:
        history(store, finished, at=now - timedelta(hours=1), prefix="old")
    ids = (f"plain{n}" for n in count())

    def plain(n: int) -> object:
        return insert_queued(store, [SPEC], now=now, new_id=ids.__next__)

    def keyed(n: int) -> object:
        return insert_queued(store, [SPEC], now=now, new_id=ids.__next__, key=f"order-{n}")

    rates = {"no key": rate(calls, plain), "new key": rate(calls, keyed)}
    rates["repeated key"] = rate(calls, keyed)
    figures = ", ".join(f"{what} {value:,.0f}/s" for what, value in rates.items())
    print(f"{label}, beside {finished:,} finished tasks: {figures}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument(
        "--ferretdb-only", action="store_true", help="skip mongomock (slow with much history)"
    )
    args = parser.parse_args(argv)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()}",
        flush=True,
    )
    if not args.ferretdb_only:
        mock = mongomock.MongoClient(tz_aware=True)
        for finished in (0, args.history):
            measure(mock.__getitem__, args.calls, finished, "mongomock")
    with ferretdb_client() as client:
        for finished in (0, args.history):
            measure(client.__getitem__, args.calls, finished, "FerretDB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
