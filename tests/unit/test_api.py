"""tullius.queue(), configure(), chain() and the tullius_deps module."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import mongomock
import pytest

import tullius
from tullius.api import configure
from tullius.deps import load_deps
from tullius.errors import ConfigError, TaskDefinitionError
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore


class Hello(tullius.Task):
    timeout = timedelta(seconds=1)

    def run(self) -> None:
        pass


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    store = MemoryStore()
    configure(store=store)
    yield store
    configure()


def test_queue_stores_tasks_and_sets_their_ids(store: MemoryStore) -> None:
    one, two = Hello(n=1), Hello(n=2, delay=timedelta(seconds=30))
    ids = tullius.queue([one, two])
    assert ids == [one.task_id, two.task_id]
    docs = {doc.task_id: doc for doc in store.all_tasks()}
    assert docs[two.task_id].start_after - docs[one.task_id].start_after >= timedelta(seconds=29)
    assert tullius.queue(Hello(n=3))
    assert len(store.all_tasks()) == 3


def test_a_refused_queue_call_stores_nothing(store: MemoryStore) -> None:
    with pytest.raises(TaskDefinitionError, match=r"expected a tullius\.Task"):
        tullius.queue([Hello(n=1), "not a task"])  # type: ignore[list-item]
    assert store.all_tasks() == []


@pytest.mark.parametrize(
    ("argument", "named"), [(None, "None is a NoneType"), ("hello", "'hello' is a str")]
)
def test_queueing_something_that_is_not_tasks_names_it(
    store: MemoryStore, argument: object, named: str
) -> None:
    with pytest.raises(TaskDefinitionError, match=rf"queue\(\) argument {named}; expected"):
        tullius.queue(argument)  # type: ignore[arg-type]
    assert store.all_tasks() == []


def test_queue_refuses_a_class_defined_in_a_function(store: MemoryStore) -> None:
    # tulliusd's workers load "module:QualName" by import: a class made inside a
    # function isn't there, and every task of it would end unloadable, UNHANDLED.
    class Local(tullius.Task):
        timeout = timedelta(seconds=1)

        def run(self) -> None:
            pass

    with pytest.raises(TaskDefinitionError, match=r"Local is stored as .*<locals>.*can't load"):
        tullius.queue([Hello(n=1), Local(n=1)])
    assert store.all_tasks() == []


def test_queue_refuses_a_class_defined_in_main(store: MemoryStore) -> None:
    Main = type("Main", (tullius.Task,), {"timeout": timedelta(1), "run": lambda self: None})
    Main.__module__, Main.task_name = "__main__", "__main__:Main"
    with pytest.raises(TaskDefinitionError, match=r"Main is defined in __main__"):
        tullius.queue(Main(n=1))


def test_chain_of_a_queued_task_starts_with_it(store: MemoryStore) -> None:
    task = Hello(n=1)
    tullius.queue(task)
    [link] = tullius.chain(task)
    assert (link.task, link.outcome, link.status) == (task, None, tullius.Status.QUEUED)


def test_chain_of_a_task_never_queued_is_an_error(store: MemoryStore) -> None:
    with pytest.raises(ConfigError, match="has not been queued"):
        tullius.chain(Hello(n=1))


def test_configure_with_a_pymongo_database_queues_into_it() -> None:
    db = mongomock.MongoClient(tz_aware=True)["tullius"]
    configure(db=db)
    try:
        [task_id] = tullius.queue(Hello(n=1))
        assert MongoStore(db).load(task_id).task.fields == {"n": 1}  # type: ignore[union-attr]
    finally:
        configure()


@pytest.fixture
def deps_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tullius_deps", raising=False)
    yield tmp_path
    sys.modules.pop("tullius_deps", None)


def test_tullius_deps_is_read_as_the_original_readme_describes(deps_dir: Path) -> None:
    (deps_dir / "tullius_deps.py").write_text(
        textwrap.dedent(
            """
            def make_db():
                return None
            task_processes = [(10, 0, 10), (5, 0, 0)]
            """
        )
    )
    deps = load_deps()
    assert deps is not None
    assert callable(deps.make_db)
    assert [str(b) for b in deps.task_processes or ()] == ["10:0-10", "5:0-0"]


def test_a_missing_tullius_deps_says_how_to_fix_it(deps_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"create tullius_deps\.py"):
        load_deps()
    assert load_deps(required=False) is None


def test_a_tullius_deps_in_the_current_directory_off_the_path_says_to_add_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tulliusd console script puts its own directory on the path, not the current
    # one: run next to tullius_deps.py, it said only "create tullius_deps.py".
    (tmp_path / "tullius_deps.py").write_text("task_processes = [(1, 0, 10)]\n")
    monkeypatch.chdir(tmp_path)
    off_path = [entry for entry in sys.path if entry not in ("", ".", str(tmp_path))]
    monkeypatch.setattr(sys, "path", off_path)
    monkeypatch.delitem(sys.modules, "tullius_deps", raising=False)
    with pytest.raises(ConfigError, match=r"current directory.*PYTHONPATH=\. tulliusd") as caught:
        load_deps()
    assert "create tullius_deps.py" not in str(caught.value)


@pytest.mark.parametrize(
    ("processes", "message"),
    [
        ("[(0, 0, 10)]", r"tullius_deps.task_processes\[0\]=\(0, 0, 10\) must be"),
        ("[(2, 5, 1)]", r"tullius_deps.task_processes\[0\]=\(2, 5, 1\) must be"),
        ("[]", "must have at least one band"),
        ("'10:0-10'", "must be a list"),
    ],
)
def test_bad_task_processes_are_named(deps_dir: Path, processes: str, message: str) -> None:
    (deps_dir / "tullius_deps.py").write_text(f"task_processes = {processes}\n")
    with pytest.raises(ConfigError, match=message):
        load_deps()


@pytest.mark.parametrize(
    ("returned", "shown"), [("None", "'NoneType'"), ("mongomock.MongoClient()", "'MongoClient'")]
)
def test_queue_refuses_a_make_db_that_returns_no_database(
    deps_dir: Path, returned: str, shown: str
) -> None:
    (deps_dir / "tullius_deps.py").write_text(
        f"import mongomock\n\ndef make_db():\n    return {returned}\n"
    )
    with pytest.raises(ConfigError, match=rf"make_db\(\) return value={shown} is not a pymongo"):
        tullius.queue(Hello(n=1))


def test_a_broken_tullius_deps_is_reported_as_such(deps_dir: Path) -> None:
    (deps_dir / "tullius_deps.py").write_text("raise RuntimeError('typo')\n")
    with pytest.raises(ConfigError, match="RuntimeError: typo"):
        load_deps()


def test_the_public_api_is_exactly_what_all_lists() -> None:
    exported = {name for name in dir(tullius) if not name.startswith(("_", "@"))}
    exported -= {
        "api",
        "band",
        "coverage",
        "inspection",
        "deps",
        "document",
        "errors",
        "task",
        "store",
        "machine",
        "events",
        "effects",
        "policy",
        "engine",
        "clock",
        "sim",
        "runtime",
        "testing",
        "pytest_plugin",
        "cli",
        "demo",
        "prune",
        "retry",
        "user_errors",
    }
    assert exported | {"__version__"} == set(tullius.__all__)
    assert tullius.__all__ == sorted(tullius.__all__)
