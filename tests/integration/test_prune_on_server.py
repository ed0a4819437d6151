"""``tulliusd --prune-finished`` on a real MongoDB-wire server.

The history is written by the engine at chosen times (ten days ago, and an
hour ago), then the command is run as an operator would run it from cron.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from daemon_harness import run_tulliusd

from tests.unit.test_prune import handle, queued, run_to_the_end
from tullius.document import Status


def prune_command(uri: str, database: str, *flags: str) -> str:
    """Run ``tulliusd --prune-finished ...``; it must succeed; return what it printed."""
    status, out, err = run_tulliusd(uri, database, *flags)
    assert status == 0, out + err
    return out + err


def test_prune_deletes_old_finished_tasks_and_their_records_and_keeps_the_rest(
    store: Any, mongodb_uri: str, database_name: str
) -> None:
    now = datetime.now(UTC)
    # Given a task that succeeded ten days ago, one that failed and was
    # handled ten days ago, one that succeeded an hour ago, and a queued one
    for name, ago, ok in (("old", 10, True), ("failed", 10, False), ("recent", 0, True)):
        queued(store, name)
        run_to_the_end(store, name, at=now - timedelta(days=ago, hours=1), ok=ok)
        if not ok:
            handle(store, name, at=now - timedelta(days=ago, hours=1))
    queued(store, "waiting")
    # When an operator prunes what finished over three days ago
    out = prune_command(mongodb_uri, database_name, "--prune-finished", "3")
    # Then the two old ones are gone, with their records, and it says so
    assert out == (
        "deleted 2 task(s) finished over 3 day(s) ago, with their records "
        "(handled 1, succeeded 1); kept 1 too young\n"
    )
    assert store.load("old") is None
    assert store.load("failed") is None
    assert [store.records_for(t).count_documents({"task_id": t}) for t in ("old", "failed")] == [
        0,
        0,
    ]
    # And the recent one and the queued one are as they were
    recent = store.load("recent")
    assert recent is not None
    assert recent.task.status is Status.SUCCEEDED
    assert len(recent.records) == 2
    waiting = store.load("waiting")
    assert waiting is not None
    assert waiting.task.status is Status.QUEUED
    # And a second prune finds nothing more to delete
    again = prune_command(mongodb_uri, database_name, "--prune-finished", "3")
    assert again.startswith("deleted 0 task(s) finished over 3 day(s) ago")
