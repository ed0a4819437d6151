"""Prove that the integration-test harness works: FerretDB server, pymongo semantics, fault proxy.

These tests pin down the MongoDB behaviour Tullius relies on (duplicate-key
errors, atomic updates, tz-aware datetimes, durability across a crash) and
the fault injection the fault-tolerance tests are built on, so that a
failure elsewhere can be trusted to be a Tullius bug, not a harness bug.

Server selection:
* ``TULLIUS_TEST_MONGODB_URI`` set -> general tests use that server; the
  crash/restart test still needs Go because it must own the process.
* otherwise FerretDB is built with Go and started once for this module.
* neither available -> skip, except with ``CI=true`` where it is a failure,
  so a CI machine that silently lost Go cannot report green.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pymongo
import pymongo.uri_parser
import pytest
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import AutoReconnect, DuplicateKeyError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ferretdb_server import FerretDBServer, GoUnavailable, build_ferretdb
from tcp_proxy import TcpProxy

EXTERNAL_URI = os.environ.get("TULLIUS_TEST_MONGODB_URI") or None
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
T = TypeVar("T")
Client = pymongo.MongoClient[dict[str, Any]]


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(
            f"{reason} (CI=true: a missing test database is a failure, not a skip)", pytrace=False
        )
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ferretdb_binary() -> Path:
    try:
        return build_ferretdb()
    except GoUnavailable as e:
        missing = str(e)
    if EXTERNAL_URI:
        pytest.skip(f"this test must own a FerretDB process, which needs Go: {missing}")
    _skip_or_fail(
        f"no MongoDB for integration tests: TULLIUS_TEST_MONGODB_URI is unset and {missing}"
    )
    raise AssertionError("unreachable: _skip_or_fail always raises")


@pytest.fixture(scope="module")
def mongodb_uri(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if EXTERNAL_URI:
        yield EXTERNAL_URI
        return
    binary = request.getfixturevalue("ferretdb_binary")
    server = FerretDBServer(binary, tmp_path_factory.mktemp("ferretdb-shared"))
    server.start(timeout=120)
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(mongodb_uri: str) -> Iterator[Client]:
    c: Client = pymongo.MongoClient(mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=30_000)
    yield c
    c.close()


@pytest.fixture
def db(client: Client) -> Iterator[Any]:
    """A fresh database per test, dropped afterwards (matters for an external server)."""
    name = f"tullius_harness_{uuid.uuid4().hex[:12]}"
    yield client[name]
    client.drop_database(name)


def _upstream(uri: str) -> tuple[str, int]:
    nodes: list[tuple[str, int]] = pymongo.uri_parser.parse_uri(uri)["nodelist"]
    assert len(nodes) == 1, f"proxy tests need a single-host URI, got nodes {nodes!r} from {uri!r}"
    return nodes[0]


@pytest.fixture
def proxy(mongodb_uri: str) -> Iterator[TcpProxy]:
    p = TcpProxy(*_upstream(mongodb_uri)).start()
    yield p
    p.stop()


@pytest.fixture
def proxied_client(proxy: TcpProxy) -> Iterator[Client]:
    """A client through the proxy with driver retries off, so every fault is visible to the test."""
    c: Client = pymongo.MongoClient(
        proxy.uri,
        directConnection=True,
        retryWrites=False,
        retryReads=False,
        tz_aware=True,
        serverSelectionTimeoutMS=2_000,
    )
    yield c
    c.close()


def _retry_until_ok(op: Callable[[], T], deadline_s: float = 60) -> T:
    """Run ``op`` until it stops raising AutoReconnect, the way an application recovers."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return op()
        except AutoReconnect:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- basic MongoDB semantics ---------------------------------------------------------------------


def test_insert_and_find_sorted(db: Any) -> None:
    db.items.insert_many([{"_id": i, "prio": i % 3, "name": f"n{i}"} for i in range(9)])
    got = [
        d["_id"]
        for d in db.items.find({"prio": {"$gte": 1}}).sort(
            [("prio", DESCENDING), ("_id", ASCENDING)]
        )
    ]
    assert got == [2, 5, 8, 1, 4, 7]
    assert db.items.find_one({"name": "n4"})["prio"] == 1


def test_duplicate_id_raises_duplicate_key_error(db: Any) -> None:
    db.items.insert_one({"_id": "task-1", "v": 1})
    with pytest.raises(DuplicateKeyError) as info:
        db.items.insert_one({"_id": "task-1", "v": 2})
    assert info.value.code == 11000
    assert db.items.find_one({"_id": "task-1"})["v"] == 1


def test_inc_update(db: Any) -> None:
    db.items.insert_one({"_id": 1, "attempts": 0})
    for _ in range(3):
        result = db.items.update_one({"_id": 1}, {"$inc": {"attempts": 1}})
        assert (result.matched_count, result.modified_count) == (1, 1)
    assert db.items.find_one({"_id": 1})["attempts"] == 3


def test_create_index_is_idempotent_and_unique_is_enforced(db: Any) -> None:
    first = db.items.create_index([("key", ASCENDING)], unique=True, name="key_unique")
    second = db.items.create_index([("key", ASCENDING)], unique=True, name="key_unique")
    assert first == second == "key_unique"
    assert "key_unique" in db.items.index_information()
    db.items.insert_one({"key": "a"})
    with pytest.raises(DuplicateKeyError):
        db.items.insert_one({"key": "a"})


def test_tz_aware_datetime_round_trip(db: Any) -> None:
    # BSON datetimes have millisecond precision, so use a whole-millisecond value.
    when = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    elsewhere = when.astimezone(timezone(timedelta(hours=5, minutes=30)))
    db.items.insert_one({"_id": 1, "at": when, "local": elsewhere})
    doc = db.items.find_one({"_id": 1, "at": {"$lte": when}})
    assert doc is not None, f"range query on {when!r} found nothing"
    assert doc["at"] == when
    assert doc["at"].tzinfo is not None
    assert doc["local"] == when, "a non-UTC aware datetime must come back as the same instant"


def test_find_one_and_update_claims_atomically(db: Any) -> None:
    db.items.insert_many([{"_id": i, "state": "queued"} for i in range(3)])
    claimed = db.items.find_one_and_update(
        {"state": "queued"},
        {"$set": {"state": "running"}},
        sort=[("_id", ASCENDING)],
        return_document=ReturnDocument.AFTER,
    )
    assert claimed == {"_id": 0, "state": "running"}
    assert db.items.count_documents({"state": "queued"}) == 2


def test_racing_inserts_of_one_id_have_exactly_one_winner(mongodb_uri: str, db: Any) -> None:
    """The one atomic primitive Tullius relies on (docs/design.md): of concurrent
    inserts of the same _id, exactly one succeeds; the rest get a duplicate-key error.
    (FerretDB's conditional updates do race; Tullius never relies on them.)"""
    wins: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def writer(who: int) -> None:
        c: Client = pymongo.MongoClient(mongodb_uri, serverSelectionTimeoutMS=30_000)
        try:
            for i in range(60):
                try:
                    c[db.name].claims.insert_one({"_id": f"task-{i}:run", "who": who})
                    wins.append((i, who))
                except pymongo.errors.DuplicateKeyError:
                    pass
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "writers did not finish within 120 s"
    assert not errors, f"writer errors: {errors!r}"
    assert sorted(i for i, _ in wins) == list(range(60)), "an id was won twice or never"
    stored = {d["_id"]: d["who"] for d in db.claims.find()}
    assert stored == {f"task-{i}:run": who for i, who in wins}


# --- process faults ------------------------------------------------------------------------------


def test_kill_and_restart_on_same_port_keeps_data(ferretdb_binary: Path, tmp_path: Path) -> None:
    server = FerretDBServer(ferretdb_binary, tmp_path / "data")
    with server:
        port = server.port
        c: Client = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=30_000)
        try:
            c.tullius.items.insert_one({"_id": "durable", "v": 42})
            server.kill()
            assert not server.running
            server.start(timeout=120)
            assert server.port == port
            # The client built before the crash must find the server again by itself.
            assert _retry_until_ok(lambda: c.tullius.items.find_one({"_id": "durable"})) == {
                "_id": "durable",
                "v": 42,
            }
            server.restart(timeout=120)
            assert _retry_until_ok(lambda: c.tullius.items.count_documents({})) == 1
        finally:
            c.close()
    assert not server.running
    assert "Listening" in server.log_path.read_text(), f"no start-up lines in {server.log_path}"


# --- network faults ------------------------------------------------------------------------------


def test_proxy_reset_all_sends_rst(proxy: TcpProxy, proxied_client: Client) -> None:
    # A bare socket makes the RST itself observable, independent of driver behaviour.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        proxied_client.admin.command("ping")  # proves the path works (and the socket is accepted)
        assert proxy.reset_all() >= 1

        def poke() -> None:
            s.sendall(b"\0" * 16)  # may still succeed locally; the reset then surfaces on recv
            s.recv(1)

        with pytest.raises(ConnectionResetError):
            poke()


def test_proxy_reset_all_gives_auto_reconnect_then_recovers(
    proxy: TcpProxy, proxied_client: Client
) -> None:
    coll = proxied_client.tullius_harness.reset_probe
    coll.insert_one({"_id": 1})
    # pymongo silently replaces a pooled socket it finds dead after >1 s idle,
    # so the scenario is repeated: the reset must surface as AutoReconnect on
    # a socket the driver believes healthy.
    saw_reconnect = False
    for _ in range(3):
        _retry_until_ok(lambda: coll.find_one({"_id": 1}))
        assert proxy.reset_all() >= 1
        try:
            coll.find_one({"_id": 1})
        except AutoReconnect:
            saw_reconnect = True
            break
    assert saw_reconnect, "reset_all() never surfaced as AutoReconnect on the next operation"
    assert _retry_until_ok(lambda: coll.find_one({"_id": 1})) == {"_id": 1}
    coll.drop()


def test_proxy_drop_next_reply_loses_ack_but_write_is_applied(
    proxy: TcpProxy, proxied_client: Client, client: Client
) -> None:
    name = f"drop_probe_{uuid.uuid4().hex[:8]}"
    proxied = proxied_client.tullius_harness[name]
    proxied_client.admin.command("ping")
    dropped = proxy.drop_next_reply("insert")
    with pytest.raises(AutoReconnect):  # NetworkTimeout is a subclass
        proxied.insert_one({"_id": "lost-ack", "v": 1})
    assert dropped.is_set(), "the proxy did not swallow a reply to the insert"
    # The write reached the server even though the client saw an error.
    direct = client.tullius_harness[name]
    assert direct.find_one({"_id": "lost-ack"}) == {"_id": "lost-ack", "v": 1}
    # A blind retry now hits the duplicate: exactly what idempotent code must handle.
    with pytest.raises(DuplicateKeyError):
        _retry_until_ok(lambda: proxied.insert_one({"_id": "lost-ack", "v": 1}))
    direct.drop()


def test_proxy_set_down_then_up(proxy: TcpProxy, proxied_client: Client) -> None:
    proxied_client.admin.command("ping")
    proxy.set_down(True)
    with pytest.raises(AutoReconnect):  # ServerSelectionTimeoutError is a subclass
        proxied_client.admin.command("ping")
    proxy.set_down(False)
    assert _retry_until_ok(lambda: proxied_client.admin.command("ping"))["ok"] == 1
