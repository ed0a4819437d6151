"""Fault tests on the database's side: FerretDB killed, kept down, connections reset, replies lost.

These scenarios own a FerretDB process of their own (not the session's
server), built with ``build_ferretdb()`` and started in a temporary
directory, because they kill it or put a fault-injecting proxy in front of
it.  Without Go they skip locally and fail in CI, like conftest's server.
Each ends with the ledger (``ledger.py``).
"""

from __future__ import annotations

import re
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import bson
import pymongo
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_support import EXTERNAL_URI, IN_CI, Scenario, wait_for
from fault_tasks import Chain, Noop, Raises, Sleep
from ferretdb_server import FerretDBServer, GoUnavailable, build_ferretdb
from tcp_proxy import TcpProxy, WireMessage

import tullius
from tullius.document import Status
from tullius.runtime.mongo_store import MongoStore

pytestmark = pytest.mark.integration

#: How long the database stays away in the long outage: longer than the daemon
#: client's 5 s server selection timeout (the CLI's documented default).
LONG_OUTAGE_SECONDS = 8.0


@pytest.fixture(scope="module")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDBServer]:
    try:
        binary = build_ferretdb()
    except GoUnavailable as error:
        reason = f"these tests must own a FerretDB process, which needs Go: {error}"
        if EXTERNAL_URI or not IN_CI:
            pytest.skip(reason)
        pytest.fail(
            f"{reason} (CI=true: a missing test database is a failure, not a skip)", pytrace=False
        )
    server = FerretDBServer(binary, tmp_path_factory.mktemp("ferretdb-faults"), log_level="warn")
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
def server(private_server: FerretDBServer) -> Iterator[FerretDBServer]:
    """The private server, running before and after each test (a failed test may leave it down)."""
    if not private_server.running:
        private_server.start(timeout=120)
    yield private_server
    if not private_server.running:
        private_server.start(timeout=120)


@pytest.fixture
def scenario(
    server: FerretDBServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Scenario]:
    s = Scenario(
        server.uri, tmp_path, re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    )
    yield s
    s.close()


@pytest.fixture
def proxy(server: FerretDBServer) -> Iterator[TcpProxy]:
    p = TcpProxy(server.host, server.port).start()
    yield p
    p.stop()


def _run_count(scenario: Scenario) -> int:
    return len(list(Path(scenario.marks).glob("run.*.json")))


# --- the database process -------------------------------------------------------------------


def test_database_killed_mid_run_and_restarted_on_same_port_and_data(
    scenario: Scenario, server: FerretDBServer
) -> None:
    # Given two daemons working through chains of tasks (each link spawns the next)
    daemons = [scenario.daemon(n, processes=["2:0-10"], lease=3) for n in ("a", "b")]
    scenario.queue(*[Chain(marks=scenario.marks, left=3, pause=0.2, retries=2) for _ in range(30)])
    wait_for(
        lambda: _run_count(scenario) >= 20,
        120,
        "20 runs before the crash",
        on_timeout=scenario.describe,
    )

    # When FerretDB is SIGKILLed mid-run and started again on the same port and data directory
    server.kill()
    server.start(timeout=120)

    # Then the daemons stay up and finish everything, each task once
    scenario.settle(120, timeout=240)
    assert all(d.running for d in daemons), scenario.logs()
    ledger = scenario.finish()
    print(ledger.summary())


def test_database_down_longer_than_server_selection(
    scenario: Scenario, server: FerretDBServer
) -> None:
    # Given two daemons with tasks running and more queued
    daemons = [scenario.daemon(n, processes=["2:0-10"], lease=3) for n in ("a", "b")]
    scenario.queue(
        *[Sleep(marks=scenario.marks, seconds=1.0, then=1, retries=2) for _ in range(20)]
    )
    wait_for(
        lambda: _run_count(scenario) >= 4,
        120,
        "tasks running before the outage",
        on_timeout=scenario.describe,
    )

    # When FerretDB is killed and stays down longer than the client's server selection timeout
    server.kill()
    time.sleep(LONG_OUTAGE_SECONDS)  # the fault's duration, not a wait for an outcome
    assert all(d.running for d in daemons), f"a daemon died during the outage\n{scenario.logs()}"
    server.start(timeout=120)

    # Then the daemons resume: old work completes and new work is picked up
    scenario.queue(*[Noop(marks=scenario.marks) for _ in range(5)])
    scenario.settle(45, timeout=240)
    assert all(d.running for d in daemons), scenario.logs()
    ledger = scenario.finish()
    print(ledger.summary())


# --- the network ----------------------------------------------------------------------------


def test_connections_reset_under_load(scenario: Scenario, proxy: TcpProxy) -> None:
    # Given two daemons that reach the database only through a proxy
    daemons = [scenario.daemon(n, uri=proxy.uri, processes=["2:0-10"], lease=3) for n in ("a", "b")]
    scenario.queue(*[Chain(marks=scenario.marks, left=1, pause=0.05, retries=2) for _ in range(60)])
    scenario.queue(*[Raises(marks=scenario.marks) for _ in range(10)])
    # (started, connected through the proxy and working: a loaded machine may take a while)
    wait_for(
        lambda: _run_count(scenario) >= 1,
        120,
        "a run before the connections are reset",
        on_timeout=scenario.describe,
    )

    # When every connection is reset again and again while they work (a bounded number of times)
    resets = 0
    for _ in range(25):
        resets += proxy.reset_all()
        time.sleep(0.3)  # spacing between injected faults, not a wait for an outcome
    assert resets > 0, "the daemons never had a connection open through the proxy"

    # Then all work completes, each task once, and the daemons are still up
    scenario.settle(130, timeout=240)
    assert all(d.running for d in daemons), scenario.logs()
    ledger = scenario.finish()
    print(f"{resets} connections reset; {ledger.summary()}")


def _documents(msg: WireMessage) -> tuple[dict, list[dict]]:
    """The command body and the documents of an OP_MSG (inline or as a document sequence)."""
    raw = msg.raw
    length, flags = struct.unpack_from("<i", raw)[0], msg.flags
    end = length - (4 if flags & 1 else 0)
    pos, body, docs = 20, {}, []
    while pos < end:
        kind = raw[pos]
        size = struct.unpack_from("<i", raw, pos + 1)[0]
        if kind == 0:
            body = bson.decode(raw[pos + 1 : pos + 1 + size])
            pos += 1 + size
        else:
            section = raw[pos + 1 : pos + 1 + size]
            name_end = section.index(b"\0", 4)
            docs.extend(bson.decode_all(section[name_end + 1 :]))
            pos += 1 + size
    docs.extend(body.get("documents", []))
    return body, docs


def _record_insert(suffix: str) -> Callable[[WireMessage], bool]:
    def match(msg: WireMessage) -> bool:
        if msg.command != "insert":
            return False
        body, docs = _documents(msg)
        target = str(body.get("insert"))  # "records", or a shard of it ("records_7")
        return (target == "records" or target.startswith("records_")) and any(
            str(d.get("_id", "")).endswith(suffix) for d in docs
        )

    return match


def _command_on(command: str, collection: str) -> Callable[[WireMessage], bool]:
    """Matches ``command`` on ``collection``; "tasks" means any shard of the live queue."""

    def match(msg: WireMessage) -> bool:
        target = str(_documents(msg)[0].get(command)) if msg.command == command else ""
        if collection == "tasks":
            return target == "tasks" or target.startswith("tasks_")
        return target == collection

    return match


def test_write_applied_but_acknowledgement_lost(scenario: Scenario, proxy: TcpProxy) -> None:
    # Given one daemon reaching the database through a proxy
    daemon = scenario.daemon("acks", uri=proxy.uri, processes=["2:0-10"], lease=3)

    # When, one kind of write at a time, the write reaches the database but its reply is
    # swallowed (the daemon sees a network error and can't know the write was applied)
    cases: list[tuple[str, Callable[[WireMessage], bool], Callable[[], object]]] = [
        (
            "claim (run record insert)",
            _record_insert(":run"),
            lambda: scenario.queue(Noop(marks=scenario.marks)),
        ),
        (
            "outcome record insert",
            _record_insert(":outcome"),
            lambda: scenario.queue(Noop(marks=scenario.marks)),
        ),
        (
            "successor insert",
            _command_on("insert", "tasks"),
            lambda: scenario.queue(Chain(marks=scenario.marks, left=1)),
        ),
        (
            "handler claim",
            _record_insert(":handler:1"),
            lambda: scenario.queue(Raises(marks=scenario.marks)),
        ),
        (
            "handler end",
            _record_insert(":handler:1:end"),
            lambda: scenario.queue(Raises(marks=scenario.marks)),
        ),
        (
            "status hint update",
            _command_on("update", "tasks"),
            lambda: scenario.queue(Noop(marks=scenario.marks)),
        ),
        (
            "heartbeat",  # counted in the task's live document
            _command_on("findAndModify", "tasks"),
            lambda: scenario.queue(Sleep(marks=scenario.marks, seconds=2)),
        ),
    ]
    for what, matcher, trigger in cases:
        fired = proxy.drop_next_reply(matcher)
        trigger()
        wait_for(
            fired.is_set,
            90,
            f"the proxy to swallow the reply to a {what}",
            on_timeout=scenario.describe,
        )

    # Then every task still ends exactly once, with nothing inserted twice
    scenario.settle(8, timeout=180)
    assert daemon.running, daemon.log_tail()
    ledger = scenario.finish(expect_tasks=8)
    assert ledger.status_counts() == {Status.SUCCEEDED: 6, Status.HANDLED: 2}, ledger.summary()


@pytest.mark.parametrize(("key", "stored"), [("invoice-7", 1), (None, 2)])
def test_an_application_repeats_a_queue_call_that_gave_up_after_its_write_was_applied(
    server: FerretDBServer, proxy: TcpProxy, key: str | None, stored: int
) -> None:
    # Given an application that queues through the proxy, retrying for one second
    name = f"app_{uuid.uuid4().hex[:12]}"
    app = pymongo.MongoClient(proxy.uri, tz_aware=True, serverSelectionTimeoutMS=300)
    store = MongoStore(app[name], retry_for=timedelta(seconds=1))
    store.ensure_indexes()
    tullius.configure(store=store)
    try:
        # When its queue() call's insert is applied, but the answer is lost and the
        # database stays out of reach until the call gives up
        fired = proxy.drop_next_reply(_command_on("insert", "tasks"), then_down=True)
        with pytest.raises(tullius.StoreUnavailable):
            tullius.queue(Noop(marks="unused", order=7), key=key)
        assert fired.is_set()
        # And the application repeats the call once the database is back
        proxy.set_down(False)
        (again,) = tullius.queue(Noop(marks="unused", order=7), key=key)
    finally:
        tullius.configure()
        app.close()
    # Then with a key the repeat found the task the first call stored, and stored
    # nothing more (without one, the task is queued twice)
    direct = pymongo.MongoClient(server.uri, tz_aware=True)
    try:
        tasks = MongoStore(direct[name]).find_by_status([Status.QUEUED], 10)
    finally:
        direct.close()
    assert len(tasks) == stored
    assert again in {task.task_id for task in tasks}
    if key is not None:
        assert again == tullius.keyed_id(key)


def test_proxy_down_then_up_daemons_resume(scenario: Scenario, proxy: TcpProxy) -> None:
    # Given a daemon working through the proxy
    daemon = scenario.daemon("downup", uri=proxy.uri, processes=["2:0-10"], lease=3)
    scenario.queue(*[Sleep(marks=scenario.marks, seconds=0.5, retries=2) for _ in range(10)])
    wait_for(
        lambda: _run_count(scenario) >= 2,
        120,
        "runs before the network goes down",
        on_timeout=scenario.describe,
    )

    # When the network refuses every connection for longer than server selection
    proxy.set_down(True)
    stop = threading.Event()
    stop.wait(LONG_OUTAGE_SECONDS)  # the fault's duration
    assert daemon.running, daemon.log_tail()
    proxy.set_down(False)

    # Then the daemon resumes and everything completes once
    scenario.settle(10, timeout=240)
    assert daemon.running, daemon.log_tail()
    scenario.finish()
