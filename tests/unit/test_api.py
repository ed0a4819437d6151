"""tullius.queue(), configure(), chain() and the tullius_deps module."""

from __future__ import annotations

import dataclasses
import enum
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mongomock
import pytest

import tullius
from tests.store_contract import after_the_next_read
from tullius.api import configure, insert_queued
from tullius.deps import load_deps
from tullius.document import TaskSpec, queued_doc
from tullius.errors import ConfigError, TaskDefinitionError, WriteWindowClosed
from tullius.events import Claimed, Succeeded
from tullius.machine import step
from tullius.policy import WRITE_WINDOW
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore
from tullius.task import to_spec

T = datetime(2026, 1, 1, tzinfo=UTC)


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


def test_queue_with_a_key_twice_stores_the_task_once_and_gives_both_its_id(
    store: MemoryStore,
) -> None:
    first, again = Hello(n=1), Hello(n=1)
    assert tullius.queue(first, key="greeting-1") == tullius.queue(again, key="greeting-1")
    assert first.task_id == again.task_id == tullius.keyed_id("greeting-1")
    assert [doc.task_id for doc in store.all_tasks()] == [first.task_id]


def test_queue_with_a_key_gives_each_task_of_a_list_its_own_id(store: MemoryStore) -> None:
    ids = tullius.queue([Hello(n=1), Hello(n=2)], key="batch")
    assert ids == [tullius.keyed_id("batch"), tullius.keyed_id("batch", 1)]
    assert tullius.queue([Hello(n=1), Hello(n=2), Hello(n=3)], key="batch")[:2] == ids
    assert len(store.all_tasks()) == 3


def test_a_key_reused_for_a_different_task_is_refused(store: MemoryStore) -> None:
    tullius.queue(Hello(n=1), key="greeting")
    with pytest.raises(tullius.KeyConflict, match=r"field 'n': 1 stored, 2 given; expected"):
        tullius.queue(Hello(n=2), key="greeting")
    assert len(store.all_tasks()) == 1


def test_a_key_of_a_str_subclass_is_its_value(store: MemoryStore) -> None:
    class Kind(enum.StrEnum):
        GREETING = "greeting"

    assert tullius.queue(Hello(n=1), key=Kind.GREETING) == [tullius.keyed_id("greeting")]


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("", "queue() key='' is not a key; expected a non-empty str"),
        (7, "queue() key=7 is not a key; expected a non-empty str"),
        ("\udc80", "can't be encoded as UTF-8 (surrogates not allowed); expected a str"),
    ],
)
def test_a_bad_key_is_refused_naming_it_and_nothing_is_stored(
    store: MemoryStore, key: object, named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        tullius.queue(Hello(n=1), key=key)  # type: ignore[arg-type]
    assert named in str(refused.value)
    assert store.all_tasks() == []


@pytest.mark.parametrize("index", [-1, 1.0, True, "0"])
def test_keyed_id_refuses_an_index_that_is_not_a_count(index: object) -> None:
    with pytest.raises(ConfigError, match=rf"keyed_id\(\) index={index!r} expected an int >= 0"):
        tullius.keyed_id("k", index)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keyed_id\\(\\) key=None is not a key"):
        tullius.keyed_id(None)  # type: ignore[arg-type]


def racing_call(store: MemoryStore, monkeypatch: pytest.MonkeyPatch, racer: TaskSpec) -> list[str]:
    """Another call with key "k" stores ``racer`` between a keyed call's read and its
    insert; the list returned gets its ids once it ran."""
    raced: list[str] = []
    after_the_next_read(
        store,
        monkeypatch,
        lambda: raced.extend(insert_queued(store, [racer], now=T, new_id=str, key="k")),
    )
    return raced


def test_a_keyed_call_raced_by_the_same_call_gives_the_ids_without_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryStore()
    raced = racing_call(store, monkeypatch, to_spec(Hello(n=1), role="test"))
    ids = insert_queued(store, [to_spec(Hello(n=1), role="test")], now=T, new_id=str, key="k")
    assert ids == raced == [tullius.keyed_id("k")]
    assert len(store.all_tasks()) == 1


def test_a_keyed_call_raced_by_a_different_task_under_its_key_is_a_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryStore()
    raced = racing_call(store, monkeypatch, to_spec(Hello(n=2), role="test"))
    with pytest.raises(tullius.KeyConflict, match=r"field 'n': 2 stored, 1 given"):
        insert_queued(store, [to_spec(Hello(n=1), role="test")], now=T, new_id=str, key="k")
    assert raced == [tullius.keyed_id("k")]
    assert [doc.fields for doc in store.all_tasks()] == [{"n": 2}]


def test_a_conflict_found_after_the_insert_names_the_task_of_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a key whose first task is stored, and a racing call that stores a
    # different second task between this call's read and its insert
    store = MemoryStore()
    first = to_spec(Hello(n=0), role="test")
    insert_queued(store, [first], now=T, new_id=str, key="k")
    racer = queued_doc(to_spec(Hello(n=9), role="test"), task_id=tullius.keyed_id("k", 1), now=T)
    after_the_next_read(store, monkeypatch, lambda: store.insert_tasks([racer]))
    # When the call with both tasks goes on
    with pytest.raises(tullius.KeyConflict, match=r"\(task 1 of the call\)") as refused:
        insert_queued(store, [first, to_spec(Hello(n=1), role="test")], now=T, new_id=str, key="k")
    # Then the conflict names the second task of the call
    assert (refused.value.index, refused.value.task_id) == (1, tullius.keyed_id("k", 1))


def test_a_keyed_call_frozen_past_its_write_window_stores_nothing_and_can_be_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a keyed call whose process is frozen for a day and a second between
    # its first read and its insert
    store = MemoryStore()
    seconds = [0.0]
    after_the_next_read(
        store, monkeypatch, lambda: seconds.append(WRITE_WINDOW.total_seconds() + 1)
    )
    spec = to_spec(Hello(n=1), role="test")
    # When it goes on, it gives its insert up
    with pytest.raises(WriteWindowClosed, match="InsertTasks given up: 1 s past"):
        insert_queued(store, [spec], now=T, new_id=str, key="k", write_clock=lambda: seconds[-1])
    # Then nothing was stored, and the call repeated stores its task
    assert store.all_tasks() == []
    assert insert_queued(store, [spec], now=T, new_id=str, key="k") == [tullius.keyed_id("k")]


def test_chain_of_a_queued_task_starts_with_it(store: MemoryStore) -> None:
    task = Hello(n=1)
    tullius.queue(task)
    [link] = tullius.chain(task)
    assert (link.task, link.outcome, link.status) == (task, None, tullius.Status.QUEUED)


def test_a_chain_follows_the_ids_its_records_carry_also_as_older_versions_derived_them(
    store: MemoryStore,
) -> None:
    # Given a task that succeeded, returning a successor, recorded by a version that
    # derived the successor's id otherwise (before 2026-12-06, from the task's id alone)
    task = Hello(n=1)
    [task_id] = tullius.queue(task)
    view = store.load(task_id)
    assert view is not None
    at = view.task.start_after
    claimed = step(view, Claimed("tok", "s1", "w1"), now=at)
    done = step(claimed.view, Succeeded("tok", (to_spec(Hello(n=2), role="test"),)), now=at)
    assert claimed.record is not None
    assert done.record is not None
    successor = dataclasses.replace(done.record.spawned[0], task_id="as-derived-before")
    store.insert_record(claimed.record)
    store.insert_record(dataclasses.replace(done.record, spawned=(successor,)))
    store.insert_tasks([successor])
    store.set_status(task_id, tullius.Status.SUCCEEDED, at)
    # When its chain is read
    first, second = tullius.chain(task)
    # Then it goes on to the successor its record names
    assert (first.outcome, second.task_id, second.fields) == (
        "succeeded",
        successor.task_id,
        {"n": 2},
    )


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
        "keyed",
    }
    assert exported | {"__version__"} == set(tullius.__all__)
    assert tullius.__all__ == sorted(tullius.__all__)
