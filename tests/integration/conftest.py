"""Fixtures for integration tests: a real MongoDB-wire server, one database per test, daemons.

The server is ``TULLIUS_TEST_MONGODB_URI`` if set (a real MongoDB, e.g. a
replica set in CI), else FerretDB built from ``ferretdb/`` with the local Go
toolchain and started once per session on a free loopback port with a
temporary data directory.  Without either, the tests are skipped with a
message saying how to enable them, except in CI (``CI=true``), where that is
a failure: integration tests must run there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_harness import Daemon, mongo_client, open_store
from ferretdb_server import FerretDBServer, GoUnavailable, build_ferretdb

URI_VARIABLE = "TULLIUS_TEST_MONGODB_URI"
HOW_TO_ENABLE = (
    f"integration tests need a MongoDB-wire server: install Go >= 1.24 (FerretDB is then built "
    f"and started automatically) or set {URI_VARIABLE}=mongodb://..."
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ferretdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerretDBServer | None]:
    """The session's FerretDB server, or None when ``TULLIUS_TEST_MONGODB_URI`` is used."""
    if os.environ.get(URI_VARIABLE):
        yield None
        return
    try:
        binary = build_ferretdb()
    except GoUnavailable as error:
        message = f"{HOW_TO_ENABLE} ({error})"
        if _in_ci():
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    server = FerretDBServer(binary, tmp_path_factory.mktemp("ferretdb-data"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongodb_uri(ferretdb_server: FerretDBServer | None) -> str:
    """URI of the MongoDB-wire server for this session."""
    if ferretdb_server is None:
        return os.environ[URI_VARIABLE]
    return ferretdb_server.uri


@pytest.fixture(scope="session")
def is_ferretdb(ferretdb_server: FerretDBServer | None) -> bool:
    return ferretdb_server is not None


@pytest.fixture(autouse=True)
def _replica_set_only(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("replica_set") and not os.environ.get(URI_VARIABLE):
        pytest.skip(f"needs a real MongoDB replica set: set {URI_VARIABLE}")


@pytest.fixture(scope="session")
def mongo(mongodb_uri: str) -> Iterator[Any]:
    """A pymongo client for the test process (daemons make their own)."""
    client = mongo_client(mongodb_uri)
    yield client
    client.close()


@pytest.fixture
def database_name(mongo: Any) -> Iterator[str]:
    """A fresh database name for one test, dropped afterwards."""
    name = f"tullius_test_{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(Exception):  # cleanup only: must not hide the test's result
        mongo.drop_database(name)


@pytest.fixture
def store(mongodb_uri: str, database_name: str, mongo: Any) -> Any:
    """A `MongoStore` on this test's database."""
    return open_store(mongodb_uri, database_name, client=mongo)


@pytest.fixture
def start_daemon(
    mongodb_uri: str, database_name: str, tmp_path: Path
) -> Iterator[Callable[..., Daemon]]:
    """Start ``tulliusd`` subprocesses on this test's database; all are stopped afterwards.

    Call it with `Daemon`'s keyword arguments (``lease=``, ``processes=``...)
    and extra flags as positional arguments.  At teardown every daemon still
    running is stopped (SIGTERM, then SIGKILL), and its output is printed if
    the test failed, to explain what happened.
    """
    daemons: list[Daemon] = []

    def start(*args: str, **kwargs: Any) -> Daemon:
        kwargs.setdefault("log_dir", tmp_path / "daemons")
        daemon = Daemon(mongodb_uri, database_name, *args, **kwargs).start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.running:
            daemon.resume()
            with contextlib.suppress(AssertionError):  # stop() already killed it
                daemon.stop(timeout=60)
    for daemon in daemons:
        print(f"--- {daemon!r} stderr ---\n{daemon.stderr()[-5000:]}")


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory tasks can write into (pid files, call counts); readable by workers."""
    path = Path(tempfile.mkdtemp(prefix="tullius-scratch-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
