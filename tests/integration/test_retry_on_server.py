"""``tulliusd --retry-unhandled`` on a real MongoDB-wire server.

One history is made by a daemon (a task whose ``failed()`` has a bug, fixed
once it is unhandled), one by the engine at chosen times; then the command
is run as an operator would run it, and the daemon (or the store) is
watched until the retry's copy is where it should be.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from daemon_harness import queue, run_tulliusd, wait_terminal
from tasks_for_tests import append_line, read_lines

import tullius
from tullius.document import Origin, Status, retried_as, retry_copy_id, status_of


class FailedFixedLater(tullius.Task):
    """``run()`` raises; ``failed()`` raises too until the file ``fix`` exists (the bug
    fixed).  Each call is a line in ``log``.  Imported by the daemons' workers by name."""

    task_name = "test_retry_on_server:FailedFixedLater"
    timeout = timedelta(seconds=30)
    failed_attempts = 2
    fix: str
    log: str

    def run(self) -> None:
        append_line(self.log, f"run {self.task_id}")
        raise ValueError("the invoice has no lines")

    def failed(self) -> None:
        append_line(self.log, f"failed {self.task_id}")
        if not os.path.exists(self.fix):
            raise RuntimeError("failed() has a bug")


def test_a_retried_task_has_its_fixed_failed_run_once_by_the_daemon(
    store: Any, start_daemon: Any, mongodb_uri: str, database_name: str, scratch_dir: Path
) -> None:
    # Given a daemon, and a task left unhandled because its failed() had a bug
    daemon = start_daemon()
    fix, log = scratch_dir / "fixed", str(scratch_dir / "calls.log")
    (task_id,) = queue(store, FailedFixedLater(fix=str(fix), log=log))
    assert wait_terminal(store, task_id, timeout=120) is Status.UNHANDLED
    assert read_lines(log) == [f"run {task_id}", f"failed {task_id}", f"failed {task_id}"]
    # When the bug is fixed and an operator retries the task
    fix.touch()
    done = run_tulliusd(
        mongodb_uri, database_name, "--retry-unhandled", task_id, "--server-name", "ops1"
    )
    # Then it says so, and the daemon runs the copy's failed() once (never run() again)
    copy = retry_copy_id(store.load(task_id).task)
    assert done == (0, f"{task_id}: retried as {copy}; its failed() runs next\n", "")
    assert wait_terminal(store, copy, timeout=120) is Status.HANDLED
    assert read_lines(log) == [
        f"run {task_id}",
        f"failed {task_id}",
        f"failed {task_id}",
        f"failed {copy}",
    ]
    # And the task is still unhandled, its chain going on to the copy with its failure
    first, second = tullius.chain(task_id, store=store)
    assert (first.status, second.status, second.origin) == (
        Status.UNHANDLED,
        Status.HANDLED,
        Origin.RETRY,
    )
    assert second.failure == first.failure
    assert second.server == "ops1"
    # And asking again reports the retry and its handled copy, making nothing new
    code, again, err = run_tulliusd(mongodb_uri, database_name, "--retry-unhandled", task_id)
    assert (code, err) == (0, ""), again
    assert again.startswith(f"{task_id}: already retried as {copy} at ")
    assert again.endswith(f" by ops1; {copy} is handled\n")
    # And --status lists the task with its copy
    code, status, err = run_tulliusd(mongodb_uri, database_name, "--status")
    assert (code, err) == (0, ""), status
    assert f"\n  {task_id}  test_retry_on_server:FailedFixedLater  failed (exception: " in status
    assert f"\n    retried as {copy} at " in status
    assert f" by ops1; {copy} is handled\n" in status
    # And the daemon ran nothing else and stops cleanly
    assert read_lines(log)[3:] == [f"failed {copy}"]
    assert daemon.stop() == 0


def test_retry_all_of_a_class_leaves_copies_born_failed_and_names_what_it_refused(
    store: Any, mongodb_uri: str, database_name: str
) -> None:
    from tests.unit.test_cli import copy_of, ran, retried_line

    # Given (no daemon running) a task that succeeded, and an unhandled Invoice and Report
    ran(store, "done", ok=True)
    ran(store, "inv", ok=False, cls="billing.tasks:Invoice")
    ran(store, "rep", ok=False, cls="billing.tasks:Report")
    # When an operator retries every unhandled Invoice
    done = run_tulliusd(
        mongodb_uri, database_name, "--retry-unhandled", "all", "--retry-class", "Invoice"
    )
    # Then only the Invoice gets a copy, stored failed with its records, due at once
    # (its class, made up, can't be loaded: the copy keeps the stored limits, and a
    # warning says so)
    code, out, err = done
    assert (code, out) == (0, f"{retried_line(store, 'inv')}\nretried 1 unhandled task(s)\n")
    assert err.startswith("tulliusd: warning: class 'billing.tasks:Invoice' can't be loaded")
    view = store.load("inv")
    assert view is not None
    assert status_of(view) is Status.UNHANDLED
    assert retried_as(view) is not None
    copy = store.load(copy_of(store, "inv"))
    assert copy is not None
    assert (status_of(copy), copy.task.status) == (Status.FAILED, Status.FAILED)
    assert copy.outcome is not None
    assert copy.outcome.failure is not None
    assert copy.outcome.failure.message == "slow"
    assert store.find_children("rep") == []
    # When the operator names the succeeded task, an unknown id and the Report
    code, out, err = run_tulliusd(
        mongodb_uri, database_name, "--retry-unhandled", "done", "nosuch", "rep"
    )
    # Then the Report is retried, each other line says why not on stderr, and the exit
    # status is 1
    assert (code, out.splitlines()) == (1, [retried_line(store, "rep")]), err
    assert [line for line in err.splitlines() if "warning: class" not in line] == [
        "tulliusd: task 'done' not retried: its status is 'succeeded'; expected 'unhandled' "
        "(only a task whose every failed() attempt failed is retried)",
        "tulliusd: no task with task_id='nosuch'",
    ]
    assert store.load(copy_of(store, "rep")) is not None
