"""docs/design.md must describe the code as it is: the state diagram of the transition
table, and the names, ids, fields, indexes and numbers it quotes."""

from __future__ import annotations

import importlib.util
import re
import typing
from datetime import timedelta
from pathlib import Path

import mongomock

from tests.store_contract import make_doc
from tullius import engine, policy
from tullius.document import (
    FailureKind,
    Status,
    handler_end_id,
    handler_id,
    outcome_id,
    run_id,
    task_to_bson,
)
from tullius.events import Event, Swept
from tullius.machine import TRANSITIONS
from tullius.runtime import mongo_store
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store

DOCS = Path(__file__).resolve().parents[2] / "docs"
TEXT = (DOCS / "design.md").read_text()


def section(title: str) -> str:
    """The text of the ``## title`` section of design.md, up to the next ``## ``."""
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : None if end < 0 else end]


def test_the_design_document_shows_the_current_state_diagram() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_state_diagram", DOCS / "make_state_diagram.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.embedded(TEXT) == module.diagram(), (
        "run: python docs/make_state_diagram.py --write"
    )


def test_every_event_of_the_transition_table_is_described_outside_the_diagram() -> None:
    prose = section("Transitions").split("```mermaid")[0] + section("Transitions").split("```")[-1]
    events = {event for targets in TRANSITIONS.values() for event in targets}
    assert events == set(typing.get_args(Event))
    for event in events:
        assert f"`{event.__name__}`" in prose, event.__name__
    # Swept is the one event accepted in every status and inserting no record.
    assert all(Swept in accepted for accepted in TRANSITIONS.values())
    assert "`Swept` is accepted in every status" in prose


def test_the_states_table_lists_every_status() -> None:
    states = section("States")
    rows = re.findall(r"^\| `(\w+)` \|", states, re.MULTILINE)
    assert rows == [status.value for status in Status]


def test_the_record_table_gives_the_record_ids_the_code_derives() -> None:
    records = section("Documents")
    for record_id in (
        run_id("<task>"),
        outcome_id("<task>"),
        handler_id("<task>", "<n>"),  # type: ignore[arg-type]
        handler_end_id("<task>", "<n>"),  # type: ignore[arg-type]
    ):
        assert f"| `{record_id}` |" in records, record_id


def test_the_field_table_lists_every_stored_task_field() -> None:
    documents = section("Documents")
    described = set(re.findall(r"`(\w+)`", documents.split("**`records`**")[0]))
    stored = set(task_to_bson(make_doc("t"))) - {"_id"}
    assert stored <= described, stored - described
    live_only = set(mongo_store.pack_live(make_doc("t"))) - stored - {"_id"}
    assert live_only == {"body"}
    assert {"body", "beats", "decode_error"} <= described


def test_the_store_table_covers_every_store_operation() -> None:
    table = section("What each store operation guarantees")
    operations = {name for name in vars(Store) if not name.startswith("_")}
    for name in operations:
        assert f"`{name}" in table, name
        assert hasattr(MemoryStore, name)
        assert hasattr(MongoStore, name)


def test_the_failure_kinds_section_names_every_kind_tullius_writes() -> None:
    kinds = section("Failure kinds")
    for name, value in vars(FailureKind).items():
        if not name.startswith("_"):
            assert f"`{value}`" in kinds, value


def test_the_indexes_described_are_the_ones_created() -> None:
    db = mongomock.MongoClient(tz_aware=True)["design_doc"]
    store = MongoStore(db, live_shards=1)
    store.ensure_indexes()
    text = " ".join(section("A task's life, write by write").split())
    for collection in ("tasks", "finished", "records"):
        for name, info in db[collection].index_information().items():
            if name == "_id_":
                continue
            keys = ", ".join(key for key, _ in info["key"])
            assert f"`{name}` (`{keys}`" in text or (f"`{name}`" in text and f"`{keys}`" in text), (
                collection,
                name,
                keys,
            )


def test_the_numbers_quoted_are_the_codes() -> None:
    timings = policy.LeaseTimings(timedelta(seconds=60))
    assert timings.heartbeat == timings.sweep == timings.lease / 6
    assert timings.stale_after == timings.lease / 2
    assert "`lease/6`" in TEXT
    assert "`lease/2`" in TEXT
    assert policy.LeaseTimings().lease == timedelta(seconds=30)
    assert "(default 30 s)" in TEXT
    assert engine.REUSE_CANDIDATES_FOR == mongo_store.IDLE_RECHECK == timedelta(seconds=0.25)
    assert engine.SWEEP_BATCH == 1000
    assert "`SWEEP_BATCH` (1,000)" in TEXT
    assert mongo_store.FERRETDB_LIVE_SHARDS == 8
    assert "one of eight shards" in TEXT
    assert timedelta(seconds=1) == policy.HANDLER_BACKOFF_BASE
    assert timedelta(minutes=5) == policy.HANDLER_BACKOFF_CAP
    assert "capped at 5 min" in TEXT
