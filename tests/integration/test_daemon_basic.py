"""tulliusd end to end on a real MongoDB-wire server: the ordinary life of tasks.

Each test starts real daemons as subprocesses (see ``daemon_harness.py``),
queues tasks from `tasks_for_tests`, and polls the store until the outcome is
recorded.  No test asserts how long anything took.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tasks_for_tests as t
from daemon_harness import INTEGRATION_DIR, REPO_ROOT, process_alive, queue, wait_for, wait_terminal

import tullius
from tullius.document import FailureKind, Status, TaskSpec, queued_doc


def test_task_succeeds_and_its_successors_run(store: Any, start_daemon: Any) -> None:
    # Given a running daemon
    daemon = start_daemon()
    # When a task that returns two successors is queued
    (root,) = queue(store, t.Parent(label="p", children=2))
    # Then it succeeds, and so do both successors
    assert wait_terminal(store, root) is Status.SUCCEEDED
    tree = tullius.tree(root, store=store)
    children = tree.children
    assert len(children) == 2
    for child in children:
        assert wait_terminal(store, child.link.task_id) is Status.SUCCEEDED
    # And the daemon kept quiet about problems and stops cleanly
    assert daemon.stop() == 0
    assert daemon.leftovers() == []


def test_queue_inside_run_goes_through_the_daemon(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon, and a task that calls tullius.queue() inside run()
    start_daemon()
    log = str(scratch_dir / "queued.log")
    (root,) = queue(store, t.QueuesInside(label="q", log=log))
    # When it runs
    assert wait_terminal(store, root) is Status.SUCCEEDED
    # Then the task it queued was stored by the daemon and ran too
    (line,) = t.read_lines(log)
    queued_id = line.split()[1]
    assert wait_terminal(store, queued_id) is Status.SUCCEEDED


def test_queue_with_a_key_inside_run_stores_the_task_once(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon, and a task that queues a child with a key twice, then another
    # child with the same key
    start_daemon()
    log = str(scratch_dir / "keyed.log")
    key = f"child-{uuid.uuid4().hex}"
    (root,) = queue(store, t.QueuesByKey(key=key, log=log))
    # When it runs
    assert wait_terminal(store, root) is Status.SUCCEEDED
    # Then both calls gave the key's id, the daemon stored one child, and the other
    # child was refused in run() as a KeyConflict naming what differs
    child = tullius.keyed_id(key)
    assert t.read_lines(log) == [
        f"queued {child}",
        f"queued {child}",
        f"conflict {child} field 'label': 'keyed' stored, 'another' given",
    ]
    assert wait_terminal(store, child) is Status.SUCCEEDED
    assert store.load(child).task.fields == {"label": "keyed"}


def test_exception_runs_failed_once_and_the_replacement_runs(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon and a task whose run() raises
    start_daemon()
    log = str(scratch_dir / "explodes.log")
    (root,) = queue(store, t.Explodes(label="x", log=log))
    # When it has been handled and its replacement has run
    assert wait_terminal(store, root) is Status.HANDLED
    wait_for(lambda: "recovered x" in t.read_lines(log), what="the replacement to run")
    # Then failed() ran exactly once, with the exception as its failure
    lines = t.read_lines(log)
    assert lines.count(f"failed {root} exception") == 1
    chain = tullius.chain(root, store=store)
    assert [link.class_name for link in chain] == [
        "tasks_for_tests:Explodes",
        "tasks_for_tests:Recovers",
    ]
    first, replacement = chain
    assert first.outcome == "failed"
    assert first.failure is not None
    assert first.failure.kind == FailureKind.EXCEPTION
    assert "boom x" in first.failure.message
    assert "ValueError" in (first.failure.traceback or "")
    assert first.handler_attempts == 1
    assert replacement.outcome == "succeeded"


def test_timeout_kills_the_task_and_its_child_process(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon and a task that starts a child process and hangs past its 1 s timeout
    daemon = start_daemon()
    log = str(scratch_dir / "pids.log")
    (root,) = queue(store, t.HangsWithChild(log=log))
    # When the deadline passes
    wait_for(lambda: status_failed_or_later(store, root), what="the task to fail")
    # Then the failure is a timeout
    (link,) = tullius.chain(root, store=store)[:1]
    assert link.failure is not None
    assert link.failure.kind == FailureKind.TIMEOUT
    # And both the worker process and the task's own child are gone
    worker_pid, child_pid = map(int, t.read_lines(log)[0].split())
    wait_for(lambda: not process_alive(worker_pid), what=f"worker {worker_pid} to be killed")
    wait_for(lambda: not process_alive(child_pid), what=f"task child {child_pid} to be killed")
    # And the daemon carries on with new work in a replacement worker
    (after,) = queue(store, t.Noop())
    assert wait_terminal(store, after) is Status.SUCCEEDED
    assert daemon.running


def status_failed_or_later(store: Any, task_id: str) -> bool:
    view = store.load(task_id)
    return view is not None and view.outcome is not None


def test_task_processes_do_not_outlive_a_killed_daemon(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon running a task that has started a child process of its own
    daemon = start_daemon()
    log = str(scratch_dir / "pids.log")
    queue(store, t.SleepsWithChild(log=log, seconds=600))
    wait_for(lambda: t.read_lines(log), what="the task to start its child")
    worker_pid, child_pid = map(int, t.read_lines(log)[0].split())
    # When the daemon is killed outright
    daemon.kill()
    # Then the worker and the task's child die with it
    wait_for(lambda: not process_alive(worker_pid), what=f"worker {worker_pid} to die")
    wait_for(lambda: not process_alive(child_pid), what=f"task child {child_pid} to die")
    wait_for(lambda: daemon.leftovers() == [], what="no process of the daemon to remain")


def test_worker_that_dies_gives_crashed(store: Any, start_daemon: Any) -> None:
    # Given a daemon and a task that calls os._exit() in its worker
    daemon = start_daemon()
    (root,) = queue(store, t.Crashes())
    # When it has run
    wait_for(lambda: status_failed_or_later(store, root), what="the crash to be recorded")
    # Then the failure says the worker crashed, and failed() still ran
    link = tullius.chain(root, store=store)[0]
    assert link.failure is not None
    assert link.failure.kind == FailureKind.CRASHED
    assert "status 3" in link.failure.message
    assert wait_terminal(store, root) is Status.HANDLED
    # And the daemon is still up and serving
    (after,) = queue(store, t.Noop())
    assert wait_terminal(store, after) is Status.SUCCEEDED
    assert daemon.running


def test_unknown_class_is_a_visible_failure_and_the_daemon_stays_up(
    store: Any, start_daemon: Any
) -> None:
    # Given a stored task whose class no longer exists (one handler attempt allowed)
    daemon = start_daemon()
    spec = TaskSpec(
        class_name="tasks_for_tests:GoneAway",
        fields={"x": 1},
        priority=5,
        timeout=timedelta(seconds=5),
        handler_timeout=timedelta(seconds=5),
        handler_attempts=1,
    )
    task_id = uuid.uuid4().hex
    store.insert_tasks([queued_doc(spec, task_id=task_id, now=datetime.now(UTC))])
    # When the daemon picks it up
    final = wait_terminal(store, task_id)
    # Then it is left UNHANDLED with an 'unloadable' failure naming the class
    assert final is Status.UNHANDLED
    link = tullius.chain(task_id, store=store)[0]
    assert link.failure is not None
    assert link.failure.kind == FailureKind.UNLOADABLE
    assert "GoneAway" in link.failure.message
    assert link.handler_error is not None
    assert link.handler_error.kind == FailureKind.UNLOADABLE
    # And the daemon still runs other work
    (after,) = queue(store, t.Noop())
    assert wait_terminal(store, after) is Status.SUCCEEDED
    assert daemon.running
    assert "GoneAway" in daemon.stderr()


def test_undecodable_document_is_set_aside_and_the_daemon_stays_up(
    store: Any, start_daemon: Any
) -> None:
    # Given a queued task document that is missing most of its fields
    daemon = start_daemon()
    now = datetime.now(UTC)
    store.tasks.insert_one({"_id": "mangled", "status": "queued", "priority": 5, "due_at": now})
    # When the daemon looks for work
    wait_for(
        lambda: (store.tasks.find_one({"_id": "mangled"}) or {}).get("status") == "undecodable",
        what="the mangled document to be set aside",
    )
    # Then the reason is stored with it and logged, and other work still runs
    doc = store.tasks.find_one({"_id": "mangled"})
    assert "KeyError" in doc["decode_error"]
    (after,) = queue(store, t.Noop())
    assert wait_terminal(store, after) is Status.SUCCEEDED
    assert daemon.running
    assert "mangled" in daemon.stderr()


def test_failed_that_raises_is_retried_then_left_unhandled(
    store: Any, start_daemon: Any, scratch_dir: Path, mongodb_uri: str, database_name: str
) -> None:
    # Given a task whose run() and failed() both raise, with failed_attempts = 2
    daemon = start_daemon()
    log = str(scratch_dir / "handler.log")
    (root,) = queue(store, t.HandlerRaises(log=log))
    # When the daemon has done all it can
    assert wait_terminal(store, root) is Status.UNHANDLED
    # Then failed() was tried exactly twice, and the last error is visible
    assert t.read_lines(log) == [f"handler {root}", f"handler {root}"]
    link = tullius.chain(root, store=store)[0]
    assert link.handler_attempts == 2
    assert link.handler_error is not None
    assert link.handler_error.kind == FailureKind.EXCEPTION
    assert "failed() failed too" in link.handler_error.message

    # And tulliusd --status shows it to an operator, next to the daemon that ran it
    def listed() -> str | None:
        out = status_report(mongodb_uri, database_name)
        return out if root in out else None

    report = wait_for(listed, what="tulliusd --status to list the unhandled task")
    assert f"{daemon.server_name}  running, last seen" in report
    assert "unhandled (every try of failed() failed; for an operator): 1\n" in report
    assert f"  {root}  tasks_for_tests:HandlerRaises  failed (exception: " in report


def status_report(uri: str, database: str, *, expect: int = 0) -> str:
    """What ``tulliusd --status`` prints for this database; it must exit with ``expect``."""
    flags = ["--status", "--mongodb-uri", uri, "--database", database]
    done = subprocess.run(
        [sys.executable, "-m", "tullius.cli", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == expect, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_status_of_a_database_without_tullius_data_is_refused_and_creates_nothing(
    store: Any, mongodb_uri: str, database_name: str
) -> None:
    # Given a database Tullius has used, and a name misspelt from it
    misspelt = database_name + "x"
    # When tulliusd --status is pointed at the misspelt one
    out = status_report(mongodb_uri, misspelt, expect=2)
    # Then it says so, listing the databases there, and the database is not created
    assert f"database {misspelt!r} at " in out
    assert "holds no Tullius data" in out
    assert database_name in out
    assert misspelt not in store.db.client.list_database_names()


def test_failed_that_hangs_is_killed_at_its_own_timeout(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a task whose failed() hangs past its failed_timeout, 2 attempts allowed
    start_daemon()
    log = str(scratch_dir / "hang.log")
    (root,) = queue(store, t.HandlerHangs(log=log))
    # When the daemon has done all it can
    assert wait_terminal(store, root) is Status.UNHANDLED
    # Then each attempt was stopped as a timeout, and its process is gone
    link = tullius.chain(root, store=store)[0]
    assert link.handler_attempts == 2
    assert link.handler_error is not None
    assert link.handler_error.kind == FailureKind.TIMEOUT
    pids = [int(line.split()[2]) for line in t.read_lines(log)]
    assert len(pids) == 2
    wait_for(
        lambda: not any(process_alive(pid) for pid in pids),
        what=f"handler processes {pids} to be gone",
    )


def test_bad_return_value_is_recorded(store: Any, start_daemon: Any) -> None:
    start_daemon()
    (root,) = queue(store, t.ReturnsGarbage())
    wait_for(lambda: status_failed_or_later(store, root), what="the bad return to be recorded")
    link = tullius.chain(root, store=store)[0]
    assert link.failure is not None
    assert link.failure.kind == FailureKind.BAD_RETURN


def test_workers_are_recycled_after_max_tasks(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon with one worker that is replaced after every job
    start_daemon("--max-tasks-per-worker", "1", processes=["1:0-10"])
    log = str(scratch_dir / "pids.log")
    # When three tasks run one after the other
    ids = queue(store, *(t.Sleep(seconds=0, log=log) for _ in range(3)))
    for task_id in ids:
        assert wait_terminal(store, task_id) is Status.SUCCEEDED
    # Then each ran in a fresh worker process
    pids = [line.split()[2] for line in t.read_lines(log) if line.startswith("start")]
    assert len(pids) == 3
    assert len(set(pids)) == 3


def test_a_band_only_takes_its_own_priorities(
    store: Any, start_daemon: Any, mongodb_uri: str, database_name: str
) -> None:
    # Given a daemon whose only band is reserved for priority 0
    first = start_daemon(processes=["1:0-0"])
    (urgent,) = queue(store, t.Noop(priority=0))
    (ordinary,) = queue(store, t.Noop(priority=5))
    # When the urgent task has run
    assert wait_terminal(store, urgent) is Status.SUCCEEDED
    # Then the ordinary one is still waiting for a band that covers priority 5
    assert status_of_task(store, ordinary) is Status.QUEUED
    # And the daemon says so, naming it, rather than leaving it to wait silently
    wait_for(lambda: ordinary in first.stderr(), what="a warning naming the waiting task")
    assert "priority 5: 1, oldest due " in first.stderr()
    assert f"(e.g. Noop {ordinary})" in first.stderr()
    # And tulliusd --status lists it, exiting 1 for a monitor to see
    report = status_report(mongodb_uri, database_name, expect=1)
    assert "waiting for a priority no running server takes: 1 task(s)" in report
    assert f"{first.server_name}  running, last seen" in report
    first.stop()
    start_daemon(processes=["1:0-10"])
    assert wait_terminal(store, ordinary) is Status.SUCCEEDED


def status_of_task(store: Any, task_id: str) -> Status:
    from tullius.document import status_of

    return status_of(store.load(task_id))


def test_chain_reads_the_whole_story_from_mongodb(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a handled failure followed by a replacement
    start_daemon()
    log = str(scratch_dir / "chain.log")
    (root,) = queue(store, t.Explodes(label="c", log=log))
    wait_for(lambda: "recovered c" in t.read_lines(log), what="the replacement to run")
    wait_for(
        lambda: tullius.chain(root, store=store)[-1].outcome == "succeeded",
        what="the replacement's outcome to be recorded",
    )
    # When the chain is read through tullius.chain with a task id
    chain = tullius.chain(root, store=store)
    # Then every link has the fields sim.chain has, filled in from MongoDB
    first = chain[0]
    assert first.status is Status.HANDLED
    assert first.server is not None
    assert first.server.startswith("daemon-")
    assert first.started_at is not None
    assert first.finished_at is not None
    assert first.started_at <= first.finished_at
    assert first.children == (chain[1].task_id,)
    assert chain[1].parent_id == root
    assert chain[1].task == t.Recovers(label="c", log=log)


def test_chain_without_a_store_argument_reads_the_configured_database(
    store: Any, start_daemon: Any, mongo: Any, database_name: str
) -> None:
    # Given a finished task, and an application configured with the database
    start_daemon()
    (root,) = queue(store, t.Parent(label="r", children=1))
    assert wait_terminal(store, root) is Status.SUCCEEDED
    tullius.configure(db=mongo[database_name])
    try:
        # When it asks for the chain by task id
        chain = tullius.chain(root)
    finally:
        tullius.configure()
    # Then it reads the task and its successor from MongoDB
    assert [link.class_name for link in chain] == [
        "tasks_for_tests:Parent",
        "tasks_for_tests:Child",
    ]
    assert chain[0].outcome == "succeeded"


def test_sigterm_with_nothing_running_exits_cleanly(start_daemon: Any) -> None:
    daemon = start_daemon(verbose=False)
    wait_for(lambda: len(daemon.leftovers()) >= 2, what="the workers to start")
    assert daemon.stop() == 0
    # Silent while all is well
    assert daemon.stderr() == ""
    assert daemon.stdout() == ""
    wait_for(lambda: daemon.leftovers() == [], what="no process of the daemon to remain")


def wait_started(log: str) -> None:
    """Wait until the task logging to ``log`` has started."""
    wait_for(
        lambda: any(line.startswith("start") for line in t.read_lines(log)),
        what="the task to start",
    )


def test_sigterm_lets_running_work_finish_within_grace(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon running a task that needs a moment
    daemon = start_daemon(grace=60)
    log = str(scratch_dir / "sleep.log")
    (root,) = queue(store, t.Sleep(seconds=1.0, log=log))
    wait_started(log)
    # When the daemon is asked to stop
    assert daemon.stop() == 0
    # Then the task finished normally first, and nothing is left owned or running
    assert Status(wait_terminal(store, root)) is Status.SUCCEEDED
    assert daemon.leftovers() == []


def test_sigterm_past_grace_records_shutdown_and_failed_runs(
    store: Any, start_daemon: Any, scratch_dir: Path
) -> None:
    # Given a daemon with a short grace running a long task
    daemon = start_daemon(grace=0.5)
    log = str(scratch_dir / "long.log")
    (root,) = queue(store, t.Sleep(seconds=600, log=log))
    wait_started(log)
    # When the daemon is stopped
    assert daemon.stop() == 0
    # Then the task failed with kind "shutdown" and nothing of the daemon is left
    link = tullius.chain(root, store=store)[0]
    assert link.failure is not None
    assert link.failure.kind == FailureKind.SHUTDOWN
    assert daemon.leftovers() == []
    # And the next daemon runs its failed()
    start_daemon()
    assert wait_terminal(store, root) is Status.HANDLED
    wait_for(lambda: f"failed {root} shutdown" in t.read_lines(log), what="failed() to run")


@pytest.mark.parametrize("quick_flag", ["--demo-quick"])
def test_embedded_demo_prints_the_chain(tmp_path: Path, quick_flag: str) -> None:
    # Given no database at all
    env = {
        "PYTHONPATH": f"{INTEGRATION_DIR}:{REPO_ROOT}",
        "PATH": "/usr/bin:/bin",
    }
    # When the README's example runs embedded (scaled down: 0.2 s per count, 1 s timeout)
    result = subprocess.run(
        [sys.executable, "-m", "tullius.cli", "--embedded", quick_flag, "--processes", "1:0-10"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    # Then it exits 0 after printing each step: 10 times out, failed() queues 9, ..., one succeeds
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "QuickExampleTask(count_to=10): failed (timeout)" in out
    assert "QuickExampleTask(count_to=10): failed() queued QuickExampleTask(count_to=9)" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("QuickExampleTask(count_to=")
    assert ": succeeded" in last
    assert result.stderr == ""
