"""Opening the store and starting the daemon, embedded or on MongoDB.

The main job needs no database server: with ``--embedded`` the supervisor
holds a `MemoryStore` (its store thread is the only user; workers never touch
a store), and ``--demo`` queues the README's example and prints its chain.
Against MongoDB the same daemon runs on a `MongoStore`, reached through the
URI or ``tullius_deps.make_db()`` and checked at start-up, so an unreachable
server is a one-line error, not a daemon that silently retries forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tullius.errors import StoreError
from tullius.runtime.config import DEFAULT_DATABASE, Settings
from tullius.runtime.supervisor import Supervisor
from tullius.store import Store

log = logging.getLogger("tullius.daemon")

#: How long start-up waits for MongoDB before giving up with an error.
CONNECT_TIMEOUT_MS = 5000
#: Client settings used unless the URI sets them (the README, "Setup").
CLIENT_DEFAULTS: dict[str, Any] = {
    "w": "majority",
    "journal": True,
    "wTimeoutMS": 10_000,
    "serverSelectionTimeoutMS": CONNECT_TIMEOUT_MS,
    "connectTimeoutMS": CONNECT_TIMEOUT_MS,
    "socketTimeoutMS": 30_000,
}
#: How long one store call retries transient errors before the loop takes over.
STORE_RETRY = timedelta(seconds=5)


class StartupError(Exception):
    """The daemon can't start; the message names the problem and the fix."""


def _client_options(uri: str) -> dict[str, Any]:
    """`CLIENT_DEFAULTS` minus whatever the URI sets itself (the user's choice wins)."""
    from pymongo import uri_parser

    # Only the names pymongo 4 reads count as set: it ignores ``j=`` (pymongo 3's
    # name for ``journal``) with a warning, so a URI with ``j=true`` must still get
    # ``journal=True`` from here, or writes would go unjournaled.
    given = {key.lower() for key in uri_parser.parse_uri(uri, validate=False)["options"]}
    options = {"tz_aware": True}
    for key, value in CLIENT_DEFAULTS.items():
        if key.lower() not in given:
            options[key] = value
    return options


def open_mongo(settings: Settings, *, prepare: bool = True) -> Any:
    """Connect to MongoDB from the settings and check it answers; return a `MongoStore`.

    ``prepare``: create the indexes (the daemon).  Without it (a reader such as
    ``tulliusd --status``) a database holding no Tullius data is refused
    rather than created: a misspelt ``--database`` would otherwise look like
    an empty, healthy one.

    Raises:
        StartupError: the URI is unusable, ``make_db()`` failed, or the server
            did not answer within `CONNECT_TIMEOUT_MS`.  Credentials are redacted.
    """
    import pymongo
    from pymongo.database import Database
    from pymongo.errors import ConfigurationError, PyMongoError

    from tullius.runtime.mongo_store import MongoStore, redact, short_error

    if settings.mongodb_uri is not None:
        where = redact(settings.mongodb_uri)
        fix = "check --mongodb-uri / TULLIUS_MONGODB_URI and that the server is running"
        try:
            client: Any = pymongo.MongoClient(
                settings.mongodb_uri, **_client_options(settings.mongodb_uri)
            )
            db = (
                client[settings.database]
                if settings.database
                else client.get_default_database(default=DEFAULT_DATABASE)
            )
        except (ConfigurationError, ValueError, TypeError) as error:
            raise StartupError(
                f"--mongodb-uri={where!r} is not usable: {redact(str(error))}"
            ) from None
    else:
        assert settings.make_db is not None
        where = "tullius_deps.make_db()"
        fix = "check make_db() in tullius_deps.py and that the server is running"
        try:
            db = settings.make_db()
        except Exception as error:  # user code at start-up: report it as a setup problem
            raise StartupError(
                f"tullius_deps.make_db() raised {type(error).__name__}: {redact(str(error))}"
            ) from None
        if not isinstance(db, Database):
            raise StartupError(
                f"tullius_deps.make_db() returned {type(db).__name__}; expected a pymongo Database "
                "(e.g. pymongo.MongoClient(journal=True).tullius)"
            )
        if settings.database:
            db = db.client[settings.database]
    try:
        db.command("ping")
    except PyMongoError as error:
        raise StartupError(
            f"can't reach MongoDB at {where} ({type(error).__name__}: {short_error(error)}); {fix}"
        ) from None
    if not prepare:
        _require_tullius_data(db, where)
        return MongoStore(db, retry_for=STORE_RETRY)
    store = MongoStore(db, retry_for=STORE_RETRY)
    try:
        store.ensure_indexes()
    except StoreError as error:
        raise StartupError(f"can't prepare the database at {where}: {error}; {fix}") from None
    return store


def _require_tullius_data(db: Any, where: str) -> None:
    from pymongo.errors import PyMongoError

    from tullius.runtime.mongo_store import short_error

    try:
        if "tullius_meta" in db.list_collection_names():
            return
    except PyMongoError as error:
        raise StartupError(
            f"can't read database {db.name!r} at {where}: {short_error(error)}"
        ) from None
    try:  # only a hint: listing databases may need rights a reader lacks
        others = "databases there: " + (
            ", ".join(sorted(db.client.list_database_names())) or "none"
        )
    except PyMongoError:
        others = "the databases there can't be listed"
    raise StartupError(
        f"database {db.name!r} at {where} holds no Tullius data ({others}); "
        "check --database / TULLIUS_DATABASE"
    )


def open_store(settings: Settings) -> Store:
    """The store the settings ask for.

    Raises:
        StartupError: see `open_mongo`.
    """
    if settings.embedded:
        from tullius.sim.memory_store import MemoryStore

        return MemoryStore()
    store: Store = open_mongo(settings)
    return store


def run_daemon(
    settings: Settings,
    *,
    store: Store | None = None,
    on_ready: Callable[[Supervisor], None] | None = None,
) -> int:
    """Start the daemon (and the demo, if asked); return its exit status.

    Raises:
        StartupError: the store can't be opened.
    """
    if store is None:
        store = open_store(settings)
    observer = None
    if settings.demo:
        from tullius.demo import ChainPrinter, queue_demo

        try:
            root = queue_demo(store, quick=settings.demo_quick)
        except StoreError as error:
            raise StartupError(f"can't queue the demo task: {error}") from None
        kind = "QuickExampleTask" if settings.demo_quick else "ExampleTask"
        print(f"queued {kind}(count_to=10) as task {root}", flush=True)
        observer = ChainPrinter(root)
    log.info("%s", settings.describe())
    supervisor = Supervisor(store, settings, observer=observer)
    if on_ready is not None:
        on_ready(supervisor)
    return supervisor.run()
