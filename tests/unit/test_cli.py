"""tulliusd's command line: help, one-line start-up errors with exit status 2, and the
one-shot ``--retry-unhandled`` on a mongomock database."""

from __future__ import annotations

import socket
import sys
import types
from datetime import UTC, datetime, timedelta
from typing import Any

import mongomock
import pytest

import tullius
from tests import histories
from tullius.band import Band
from tullius.cli import EXIT_NOT_RETRIED, EXIT_STARTUP, build_parser, main
from tullius.document import (
    Record,
    Status,
    retried_as,
    retry_copy_id,
    retry_id,
    status_of,
)
from tullius.errors import StoreUnavailable, UnknownTaskClass
from tullius.inspection import read_chain
from tullius.runtime.config import Settings
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore


@pytest.fixture
def no_tullius_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TULLIUS_MONGODB_URI", raising=False)
    monkeypatch.delenv("TULLIUS_PROCESSES", raising=False)
    monkeypatch.setitem(sys.modules, "tullius_deps", None)  # import raises ModuleNotFoundError


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tulliusd: error: ")
    return lines[0]


def test_help_explains_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--mongodb-uri",
        "--database",
        "--processes",
        "--lease",
        "--poll-interval",
        "--server-name",
        "--grace",
        "--max-tasks-per-worker",
        "--embedded",
        "--demo",
        "--retry-unhandled",
        "--retry-class",
        "-v",
        "TULLIUS_MONGODB_URI",
        "tullius_deps",
    ):
        assert flag in out


def test_every_option_has_help_text() -> None:
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_missing_tullius_deps_is_one_line_and_exit_2(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == EXIT_STARTUP
    line = one_error_line(capsys)
    assert "tullius_deps" in line
    assert "--mongodb-uri" in line


@pytest.mark.parametrize(
    ("value", "expected"),
    [("abc", "COUNT:MIN-MAX"), ("0:0-10", "COUNT >= 1"), ("3:7-2", "MIN <= MAX")],
)
def test_malformed_processes_is_one_line_and_exit_2(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str], value: str, expected: str
) -> None:
    assert main(["--embedded", "--processes", value]) == EXIT_STARTUP
    line = one_error_line(capsys)
    assert f"--processes={value!r}" in line
    assert expected in line


def test_bad_lease_is_one_line_and_exit_2(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--embedded", "--lease", "soon"]) == EXIT_STARTUP
    assert "--lease='soon'" in one_error_line(capsys)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_mongodb_is_one_line_exit_2_and_redacted(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"mongodb://alice:hunter2@127.0.0.1:{_closed_port()}/db?serverSelectionTimeoutMS=300"
    assert main(["--mongodb-uri", uri]) == EXIT_STARTUP
    line = one_error_line(capsys)
    assert "can't reach MongoDB" in line
    assert "hunter2" not in line
    assert "alice" not in line
    assert "--mongodb-uri" in line


def test_uri_from_environment_is_used(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"mongodb://127.0.0.1:{_closed_port()}/db?serverSelectionTimeoutMS=300"
    monkeypatch.setenv("TULLIUS_MONGODB_URI", uri)
    assert main([]) == EXIT_STARTUP
    assert "can't reach MongoDB" in one_error_line(capsys)


def test_make_db_that_raises_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TULLIUS_MONGODB_URI", raising=False)
    module = types.ModuleType("tullius_deps")

    def make_db() -> None:
        raise RuntimeError("no database today")

    module.make_db = make_db  # type: ignore[attr-defined]
    module.task_processes = [(1, 0, 10)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tullius_deps", module)
    assert main([]) == EXIT_STARTUP
    line = one_error_line(capsys)
    assert "make_db() raised RuntimeError: no database today" in line


def test_bad_task_processes_in_tullius_deps_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TULLIUS_MONGODB_URI", raising=False)
    monkeypatch.delenv("TULLIUS_PROCESSES", raising=False)
    module = types.ModuleType("tullius_deps")
    module.make_db = lambda: None  # type: ignore[attr-defined]
    module.task_processes = [(5, 3, 1)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tullius_deps", module)
    assert main([]) == EXIT_STARTUP
    assert "tullius_deps.task_processes[0]" in one_error_line(capsys)


def test_make_db_returning_something_else_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TULLIUS_MONGODB_URI", raising=False)
    module = types.ModuleType("tullius_deps")
    module.make_db = lambda: "not a database"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tullius_deps", module)
    assert main(["--processes", "1:0-1"]) == EXIT_STARTUP
    assert "expected a pymongo Database" in one_error_line(capsys)


# --- --retry-unhandled -----------------------------------------------------------

URI = "mongodb://db1/tullius"
ALL = Band(1, 0, 10)


@pytest.fixture
def database(no_tullius_deps: None, monkeypatch: pytest.MonkeyPatch) -> MongoStore:
    """The store ``tulliusd`` opens: a `MongoStore` on mongomock, opened as a reader."""
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius"])
    store.ensure_indexes()

    def open_mongo(settings: Settings, *, prepare: bool = True) -> MongoStore:
        assert settings.mongodb_uri == URI
        assert not prepare  # a one-shot command creates no database
        return store

    monkeypatch.setattr("tullius.runtime.launch.open_mongo", open_mongo)
    return store


def tulliusd(*args: str) -> int:
    return main(["--mongodb-uri", URI, "--server-name", "ops1", *args])


#: The warning of a retry whose task class can't be loaded where it runs, which the
#: classes of these tests can't (tested on its own, and left out of the others).
UNLOADABLE_WARNING = "tulliusd: warning: class "


def output(capsys: pytest.CaptureFixture[str]) -> list[str]:
    out, err = out_and_err(capsys)
    assert err == []
    return out


def out_and_err(capsys: pytest.CaptureFixture[str]) -> tuple[list[str], list[str]]:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if not line.startswith(UNLOADABLE_WARNING)]
    return captured.out.splitlines(), err


AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


def ran(store: Any, task_id: str, *, ok: bool, cls: str = "tests:Nothing") -> None:
    """`tests.histories.ran` an hour ago."""
    histories.ran(store, task_id, at=AN_HOUR_AGO, ok=ok, class_name=cls)


def copy_of(store: Any, task_id: str) -> str:
    """The id of the copy a retry of ``task_id`` makes (derived from the task as stored)."""
    return retry_copy_id(store.load(task_id).task)


def retried_line(store: Any, task_id: str) -> str:
    return f"{task_id}: retried as {copy_of(store, task_id)}; its failed() runs next"


def assert_copy_born_failed(store: Any, task_id: str) -> None:
    """The task is still unhandled, and its copy waits for failed() with its failure."""
    view = store.load(task_id)
    assert view is not None
    assert status_of(view) is Status.UNHANDLED
    copy = retried_as(view)
    assert copy is not None
    assert copy.task_id == copy_of(store, task_id)
    assert view.records[f"{task_id}:retry"].server == "ops1"
    copy_view = store.load(copy.task_id)
    assert copy_view is not None
    assert status_of(copy_view) is Status.FAILED
    assert copy_view.task.status is Status.FAILED
    assert copy_view.outcome is not None
    assert copy_view.outcome.failure is not None
    assert copy_view.outcome.failure.message == "slow"
    assert [link.task_id for link in read_chain(store, task_id)] == [task_id, copy.task_id]


def test_retry_unhandled_retries_each_task_named_and_says_so(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given two unhandled tasks
    ran(database, "t1", ok=False)
    ran(database, "t2", ok=False)
    # When an operator retries both
    assert tulliusd("--retry-unhandled", "t1", "t2") == 0
    # Then each gets a copy born failed, whose failed() the daemons run next, one line each
    assert output(capsys) == [retried_line(database, "t1"), retried_line(database, "t2")]
    assert_copy_born_failed(database, "t1")
    assert_copy_born_failed(database, "t2")


def test_retrying_a_task_again_reports_the_first_retry_and_exits_0(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an unhandled task an operator retried
    ran(database, "t1", ok=False)
    assert tulliusd("--retry-unhandled", "t1") == 0
    capsys.readouterr()
    at = database.load("t1").records["t1:retry"].at  # type: ignore[union-attr]
    # When it is retried again
    assert tulliusd("--retry-unhandled", "t1", "--server-name", "ops2") == 0
    # Then it says when and by whom it was retried, and where its copy is; no second copy
    copy = copy_of(database, "t1")
    assert output(capsys) == [
        f"t1: already retried as {copy} at {at.isoformat(timespec='seconds')} by ops1; "
        f"{copy} is failed"
    ]
    assert [doc.task_id for doc in database.find_children("t1")] == [copy_of(database, "t1")]
    assert_copy_born_failed(database, "t1")


def test_a_dry_run_says_what_would_be_retried_and_writes_nothing(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an unhandled task, another one retried before, and one that succeeded
    ran(database, "t1", ok=False)
    ran(database, "t2", ok=False)
    ran(database, "done", ok=True)
    assert tulliusd("--retry-unhandled", "t2") == 0
    capsys.readouterr()
    # When an operator asks for a dry run, of the ids and of all
    assert tulliusd("--retry-unhandled", "t1", "t2", "done", "--dry-run") == 1
    out, err = out_and_err(capsys)
    assert tulliusd("--retry-unhandled", "all", "--dry-run") == 0
    every = output(capsys)
    # Then each line says what would be done, and nothing is written
    assert out[0] == f"t1: would be retried as {copy_of(database, 't1')}"
    assert out[1].startswith(f"t2: already retried as {copy_of(database, 't2')} at ")
    assert err == [
        "tulliusd: task 'done' not retried: its status is 'succeeded'; expected 'unhandled' "
        "(only a task whose every failed() attempt failed is retried)"
    ]
    assert every[0] == f"t1: would be retried as {copy_of(database, 't1')}"
    assert every[-1] == "would retry 1 unhandled task(s); 1 retried before"
    assert database.find_children("t1") == []
    assert "t1:retry" not in database.load("t1").records  # type: ignore[union-attr]


def test_a_task_not_unhandled_or_unknown_is_named_the_others_retried_and_exit_is_1(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a task that succeeded and an unhandled one
    ran(database, "done", ok=True)
    ran(database, "t1", ok=False)
    # When an operator retries those and an id that names no task
    assert tulliusd("--retry-unhandled", "done", "nosuch", "t1") == EXIT_NOT_RETRIED
    # Then the unhandled one is retried (on stdout), and each other line says why it was
    # not, on stderr
    assert out_and_err(capsys) == (
        [retried_line(database, "t1")],
        [
            "tulliusd: task 'done' not retried: its status is 'succeeded'; expected "
            "'unhandled' (only a task whose every failed() attempt failed is retried)",
            "tulliusd: no task with task_id='nosuch'",
        ],
    )
    assert_copy_born_failed(database, "t1")
    view = database.load("done")
    assert view is not None
    assert status_of(view) is Status.SUCCEEDED
    assert retried_as(view) is None
    assert database.find_children("done") == []


def test_retry_unhandled_all_retries_every_unhandled_task_and_sums_up(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a succeeded task, and two unhandled ones of which one was retried before
    ran(database, "done", ok=True)
    ran(database, "t1", ok=False)
    ran(database, "t2", ok=False)
    assert tulliusd("--retry-unhandled", "t2") == 0
    capsys.readouterr()
    # When an operator retries every unhandled task
    assert tulliusd("--retry-unhandled", "all") == 0
    # Then the new one is retried, the earlier retry reported, and a summary ends it
    lines = output(capsys)
    assert lines[0] == retried_line(database, "t1")
    assert lines[1].startswith(f"t2: already retried as {copy_of(database, 't2')} at ")
    assert lines[1].endswith(f" by ops1; {copy_of(database, 't2')} is failed")
    assert lines[2:] == ["retried 1 unhandled task(s); 1 retried before"]
    assert_copy_born_failed(database, "t1")
    assert database.find_children("done") == []


@pytest.mark.parametrize("name", ["billing.tasks:Invoice", "Invoice"])
def test_retry_class_narrows_all_to_one_class_by_stored_or_bare_name(
    database: MongoStore, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # Given an unhandled Invoice and an unhandled Report
    ran(database, "inv", ok=False, cls="billing.tasks:Invoice")
    ran(database, "rep", ok=False, cls="billing.tasks:Report")
    # When every unhandled Invoice is retried
    assert tulliusd("--retry-unhandled", "all", "--retry-class", name) == 0
    # Then only the Invoice is
    assert output(capsys) == [retried_line(database, "inv"), "retried 1 unhandled task(s)"]
    assert_copy_born_failed(database, "inv")
    assert database.find_children("rep") == []


@pytest.mark.parametrize("word", ["ALL", "All"])
def test_all_may_be_spelt_in_any_case(
    database: MongoStore, capsys: pytest.CaptureFixture[str], word: str
) -> None:
    ran(database, "t1", ok=False)
    assert tulliusd("--retry-unhandled", word) == 0
    assert output(capsys) == [retried_line(database, "t1"), "retried 1 unhandled task(s)"]
    assert_copy_born_failed(database, "t1")


@pytest.mark.parametrize("more", [[], ["--retry-class", "Invoice"]])
def test_retry_unhandled_all_with_nothing_unhandled_says_so(
    database: MongoStore, capsys: pytest.CaptureFixture[str], more: list[str]
) -> None:
    ran(database, "done", ok=True)
    assert tulliusd("--retry-unhandled", "all", *more) == 0
    assert output(capsys) == ["retried 0 unhandled task(s)"]


def test_a_retry_class_that_matches_nothing_lists_the_unhandled_classes_and_exits_1(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given two unhandled Invoices and an unhandled Report
    ran(database, "inv1", ok=False, cls="billing.tasks:Invoice")
    ran(database, "inv2", ok=False, cls="billing.tasks:Invoice")
    ran(database, "rep", ok=False, cls="billing.tasks:Report")
    # When an operator misspells the class
    assert tulliusd("--retry-unhandled", "all", "--retry-class", "Invoce") == EXIT_NOT_RETRIED
    # Then nothing is retried, and a line names the class and those that have unhandled tasks
    assert out_and_err(capsys) == (
        ["retried 0 unhandled task(s)"],
        [
            "tulliusd: no unhandled task is of class 'Invoce' (give the stored module:Class, "
            "or just Class); unhandled tasks by class: billing.tasks:Invoice 2, "
            "billing.tasks:Report 1"
        ],
    )
    for task_id in ("inv1", "inv2", "rep"):
        assert database.find_children(task_id) == []


def test_a_bare_retry_class_that_matches_two_modules_says_which(
    database: MongoStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an unhandled Invoice in each of two modules, and a Report
    ran(database, "inv1", ok=False, cls="billing.tasks:Invoice")
    ran(database, "inv2", ok=False, cls="legacy.billing:Invoice")
    ran(database, "rep", ok=False, cls="billing.tasks:Report")
    # When every unhandled Invoice is retried by its bare name
    assert tulliusd("--retry-unhandled", "all", "--retry-class", "Invoice") == 0
    # Then both are, and a line says the name matched the classes of two modules
    assert output(capsys) == [
        retried_line(database, "inv1"),
        retried_line(database, "inv2"),
        "--retry-class Invoice matched the unhandled tasks of 2 classes: "
        "billing.tasks:Invoice 1, legacy.billing:Invoice 1 (give module:Class to retry one "
        "class only)",
        "retried 2 unhandled task(s)",
    ]
    assert database.find_children("rep") == []


class Fixed(tullius.Task):
    """A class whose fix gave failed() more time and more attempts than its tasks had."""

    timeout = timedelta(seconds=5)
    failed_timeout = timedelta(minutes=7)
    failed_attempts = 6

    def run(self) -> None:
        pass


@pytest.mark.parametrize("asked", ["t1", "all"])
def test_the_copy_takes_failed_timeout_and_attempts_from_the_class_as_loaded_now(
    database: MongoStore, capsys: pytest.CaptureFixture[str], asked: str
) -> None:
    # Given an unhandled task queued with one failed() attempt of 60 s
    ran(database, "t1", ok=False, cls=Fixed.task_name)
    # When it is retried, its class now allowing more
    assert tulliusd("--retry-unhandled", asked) == 0
    # Then its copy has the class's limits
    (copy,) = database.find_tasks([copy_of(database, "t1")])
    assert (copy.handler_timeout, copy.handler_attempts) == (timedelta(minutes=7), 6)


@pytest.mark.parametrize("asked", [["t1", "t2", "t3"], ["all"]])
def test_a_database_lost_part_way_leaves_the_lines_printed_and_says_how_many_were_retried(
    database: MongoStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    asked: list[str],
) -> None:
    # Given three unhandled tasks, and a database that goes away when the third's
    # retry is to be recorded
    for task_id in ("t1", "t2", "t3"):
        ran(database, task_id, ok=False)
    printed_by_then: list[str] = []
    insert_record = database.insert_record

    def insert_until_t3(record: Record) -> Any:
        if record.record_id == retry_id("t3"):
            printed_by_then.extend(capsys.readouterr().out.splitlines())
            raise StoreUnavailable(
                "insert record", "ServerSelectionTimeoutError: db1:27017 refused"
            )
        return insert_record(record)

    monkeypatch.setattr(database, "insert_record", insert_until_t3)
    # When an operator retries them
    assert tulliusd("--retry-unhandled", *asked) == EXIT_STARTUP
    # Then the first two were printed as each was done, before the database went away
    assert printed_by_then == [retried_line(database, "t1"), retried_line(database, "t2")]
    assert_copy_born_failed(database, "t1")
    assert_copy_born_failed(database, "t2")
    # And the error line says so, and what to do
    assert one_error_line(capsys) == (
        "tulliusd: error: can't retry: store unavailable during insert record: "
        "ServerSelectionTimeoutError: db1:27017 refused; 2 task(s) retried before it failed "
        "(listed above); run the command again once the database answers: it completes a "
        "retry cut short and retries no task twice"
    )


class Unreachable(MemoryStore):
    """A database that went away after the command connected."""

    def load(self, task_id: str) -> Any:
        raise StoreUnavailable("load task", "ServerSelectionTimeoutError: db1:27017 refused")

    def find_by_status(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("find tasks by status", "ServerSelectionTimeoutError")


@pytest.mark.parametrize("asked", [["t1", "t2"], ["all"]])
def test_retry_unhandled_on_a_database_out_of_reach_is_one_line_and_exit_2(
    no_tullius_deps: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    asked: list[str],
) -> None:
    monkeypatch.setattr("tullius.runtime.launch.open_mongo", lambda *a, **k: Unreachable())
    assert tulliusd("--retry-unhandled", *asked) == EXIT_STARTUP
    line = one_error_line(capsys)
    assert line.startswith("tulliusd: error: can't retry: store unavailable during ")
    assert "ServerSelectionTimeoutError" in line
    assert "; 0 task(s) retried before it failed; run the command again" in line


def test_retry_unhandled_on_an_unreachable_mongodb_is_one_line_and_exit_2(
    no_tullius_deps: None, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"mongodb://127.0.0.1:{_closed_port()}/db?serverSelectionTimeoutMS=300"
    assert main(["--mongodb-uri", uri, "--retry-unhandled", "t1"]) == EXIT_STARTUP
    assert "can't reach MongoDB" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--retry-class", "Invoice"], "--retry-class='Invoice'"),
        (["--retry-unhandled", "t1", "--retry-class", "Invoice"], "--retry-class='Invoice'"),
        (["--retry-unhandled", "t1", "all"], "--retry-unhandled='t1 all'"),
        (["--retry-unhandled", ""], "--retry-unhandled=''"),
        (["--retry-unhandled", "t1", "--status"], "--retry-unhandled='t1'"),
        (["--retry-unhandled", "t1", "--prune-finished", "30"], "--retry-unhandled='t1'"),
        (["--retry-unhandled", "t1", "--demo"], "--retry-unhandled='t1'"),
    ],
)
def test_a_retry_mixed_with_other_modes_is_one_line_and_exit_2(
    database: MongoStore, capsys: pytest.CaptureFixture[str], args: list[str], shown: str
) -> None:
    ran(database, "t1", ok=False)
    assert tulliusd(*args) == EXIT_STARTUP
    assert shown in one_error_line(capsys)
    assert database.find_children("t1") == []


def test_a_retry_whose_class_cant_be_loaded_here_says_why_once_and_keeps_the_stored_limits(
    database: MongoStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two unhandled tasks of a class this process can't import
    ran(database, "t1", ok=False, cls="billing.tasks:Invoice")
    ran(database, "t2", ok=False, cls="billing.tasks:Invoice")
    tried: list[str] = []

    def load_class(name: str) -> type:
        tried.append(name)
        raise UnknownTaskClass(name, "importing 'billing.tasks' failed: RuntimeError('no config')")

    monkeypatch.setattr("tullius.retry.load_class", load_class)
    # When both are retried
    assert tulliusd("--retry-unhandled", "t1", "t2") == 0
    # Then the class was tried once, and one warning says why and what the copies keep
    assert tried == ["billing.tasks:Invoice"]
    assert capsys.readouterr().err.splitlines() == [
        "tulliusd: warning: class 'billing.tasks:Invoice' can't be loaded here (importing "
        "'billing.tasks' failed: RuntimeError('no config')), so its copies keep the "
        "failed_timeout and failed_attempts stored with each task; run the command where the "
        "fixed code is importable to take the class's own"
    ]


def test_output_piped_into_a_reader_that_stopped_ends_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    from tullius import cli

    # Given --status whose output goes to a reader that stopped (`| head -3`)
    def stopped_reader(settings: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    pointed: list[int] = []
    monkeypatch.setattr(cli, "_print_status", stopped_reader)
    monkeypatch.setattr(cli, "resolve", lambda flags: None)
    monkeypatch.setattr(os, "dup2", lambda fd, target: pointed.append(target))
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 1, raising=False)
    # When it runs, Then it ends as a process killed by SIGPIPE, with no traceback
    # (a BrokenPipeError traceback was printed), its stdout pointed at nothing
    assert main(["--status"]) == 141
    assert pointed == [1]
    assert capsys.readouterr().err == ""


def test_a_tullius_deps_that_fails_to_import_is_named_with_its_error(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tullius.deps import load_deps
    from tullius.errors import ConfigError

    (tmp_path / "broken_deps.py").write_text("import\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # It read "tullius_deps='import' failed: SyntaxError: ...".
    with pytest.raises(
        ConfigError, match=r"module='broken_deps' failed to import: SyntaxError: invalid syntax"
    ):
        load_deps("broken_deps")
