"""tulliusd's command line: help, and one-line start-up errors with exit status 2."""

from __future__ import annotations

import socket
import sys
import types

import pytest

from tullius.cli import EXIT_STARTUP, build_parser, main


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
