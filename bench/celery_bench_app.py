"""The Celery application the benchmark's Celery worker runs (MongoDB transport).

The broker URL comes from ``BENCH_CELERY_BROKER`` and the poll period from
``BENCH_CELERY_POLL`` (seconds), so the benchmark can point it at its own
FerretDB.  Results are not stored: like the Tullius and RQ runs, completion is
read from the bench log that every task body appends to.
"""

from __future__ import annotations

import os

from bench_plain import plain_noop
from celery import Celery

app = Celery(
    "tullius_bench",
    broker=os.environ.get("BENCH_CELERY_BROKER", "mongodb://127.0.0.1:27017/celery_bench"),
)
app.conf.update(
    task_ignore_result=True,
    broker_transport_options={"polling_interval": float(os.environ.get("BENCH_CELERY_POLL", "1"))},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(log: str, key: str) -> None:
    plain_noop(log, key)
