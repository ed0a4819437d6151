"""``tulliusd --prune-finished`` and ``--keep-finished`` on a real MongoDB-wire server.

The history is written by the engine at chosen times (ten days ago, and an
hour ago), then the command is run as an operator would run it from cron, or
daemons that keep three days are started.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import tasks_for_tests as t
from daemon_harness import queue, run_tulliusd, wait_for, wait_terminal

from tests.unit import test_mongo_store_layout as layout
from tests.unit.test_prune import handle, queued, run_to_the_end
from tullius.document import Status
from tullius.prune import PRUNE_BATCH


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


def test_daemons_keeping_three_days_delete_older_tasks_page_by_page_while_they_run(
    store: Any, start_daemon: Any
) -> None:
    now = datetime.now(UTC)
    # Given more tasks that succeeded ten days ago than one page holds, and one
    # that succeeded an hour ago
    old = [f"old{n:03d}" for n in range(PRUNE_BATCH + 10)]
    for name in [*old, "recent"]:
        queued(store, name)
        ago = timedelta(days=10) if name != "recent" else timedelta(hours=1)
        run_to_the_end(store, name, at=now - ago)
    # When two daemons keeping finished tasks three days run (their first passes
    # start within a minute), a task queued meanwhile, until the old ones are gone
    daemons = [start_daemon("--keep-finished", "3") for _ in range(2)]
    (waiting,) = queue(store, t.Noop())
    wait_for(
        lambda: store.find_tasks(old) == [] or not all(d.running for d in daemons),
        timeout=240,
        what="the old tasks to be pruned",
        interval=0.5,
    )
    # Then every old one is gone with its records, and both daemons run on
    assert store.find_tasks(old) == []
    assert all(daemon.running for daemon in daemons)
    assert sum(store.records_for(i).count_documents({"task_id": i}) for i in old[:20]) == 0
    # And the recent one is kept, and the one queued meanwhile ran
    recent = store.load("recent")
    assert recent is not None
    assert recent.task.status is Status.SUCCEEDED
    assert wait_terminal(store, waiting) is Status.SUCCEEDED
    # And a daemon logs what its pass deleted, once the pass ends (it may still be
    # listing, or waiting before its next page, when the last old task is gone)
    wait_for(
        lambda: "pruned: deleted " in "".join(daemon.stderr() for daemon in daemons),
        timeout=240,
        what="a daemon to log what its prune pass deleted",
        interval=0.5,
        on_timeout=lambda: "".join(daemon.stderr() for daemon in daemons)[-3000:],
    )


def test_a_task_stored_again_beside_a_prunes_leftover_is_repaired_on_the_server(
    store: Any,
) -> None:
    """The layout test on a MongoDB-wire server (its projection, replace and delete)."""
    layout.test_a_task_stored_again_beside_a_prunes_leftover_whose_success_was_cut_short_is_repaired(
        store
    )


def test_a_task_stored_again_beside_a_prunes_leftover_ends_as_itself_on_the_server(
    store: Any,
) -> None:
    """The layout test on a MongoDB-wire server."""
    layout.test_a_task_stored_again_beside_a_prunes_leftover_ends_as_itself_and_outlives_the_leftover(
        store
    )
