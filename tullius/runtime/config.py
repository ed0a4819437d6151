"""The daemon's settings, gathered from flags, environment and ``tullius_deps``, validated eagerly.

Every setting has one name used three ways: a flag (``--poll-interval``), an
environment variable (``TULLIUS_POLL_INTERVAL``) and, for the two settings the
original README defines, the ``tullius_deps`` module (``make_db``,
``task_processes``).  A flag wins over the environment, which wins over
``tullius_deps``, which wins over the built-in default.

Nothing here connects to a database or starts a process: `resolve()` turns raw
text into a `Settings`, raising `ConfigError` (naming the flag or variable and
the value) before anything runs.  The database URI may hold a password, so it
is kept out of ``repr()`` and shown only through `Settings.describe()`, which
redacts it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tullius import policy
from tullius.band import ALL, Band, parse_band
from tullius.deps import Deps, load_deps
from tullius.errors import ConfigError
from tullius.policy import DEFAULT_LEASE, MAX_LEASE, MIN_LEASE
from tullius.prune import MIN_AGE

ENV_PREFIX = "TULLIUS_"
#: Used when no flag, variable or ``tullius_deps.task_processes`` names bands:
#: four workers for every priority.
DEFAULT_BANDS = (Band(4, *ALL),)
#: The most worker processes one daemon starts, across its bands.
MAX_PROCESSES = 1024
#: Idle polling period; small enough that an idle daemon picks up new work in
#: about 15 ms (half the period plus one claim's round trips); measured in
#: bench/daemon_bench.py: pickup p50 14 ms at 0.01 s, 22 ms at 0.02 s.
DEFAULT_POLL_INTERVAL = 0.01
DEFAULT_GRACE = policy.DEFAULT_GRACE.total_seconds()
DEFAULT_DATABASE = "tullius"
#: The largest ``--prune-finished`` (``timedelta`` stops at 999,999,999 days).
MAX_PRUNE_DAYS = 100 * 365


_ANY_CREDENTIALS = re.compile(r"([A-Za-z][\w+.-]*://)[^@/\s]*@")


def _redact(text: str) -> str:
    """``text`` without the ``user:password@`` of any URI (not only MongoDB's)."""
    return _ANY_CREDENTIALS.sub(r"\1***@", text)


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs to start, already validated.

    Attributes:
        bands: the worker bands, ``(count, min_priority, max_priority)`` each.
        mongodb_uri: the database URI (None: use ``make_db`` or the embedded store).
        make_db: ``tullius_deps.make_db`` when no URI was given.
        database: the database name to use with ``mongodb_uri``.
        lease: how long a silent server keeps its tasks before others fail them as lost.
        poll_interval: seconds between looks for new work while idle.
        server_name: written into every record this daemon makes.
        grace: seconds running tasks get to finish on SIGTERM/SIGINT.
        max_tasks_per_worker: recycle a worker process after this many jobs (0: never).
        verbose: log activity, not only problems.
        embedded: use an in-process store instead of MongoDB.
        demo: queue the README's example and print its chain as it unfolds.
        demo_quick: the demo scaled down (0.2 s per count, 1 s timeout).
        prune_finished: delete tasks finished longer ago than this, then exit
            (`tullius.prune`); None: run the daemon.
        prune_unhandled: with ``prune_finished`` or ``keep_finished``,
            ``unhandled`` tasks too.
        keep_finished: while running, delete tasks finished longer ago than
            this, now and then (`tullius.runtime.pruner`); None: keep them.
        retry_unhandled: retry the ``failed()`` of these ``unhandled`` tasks,
            then exit (`tullius.retry`); empty with ``retry_all``; None: run
            the daemon.
        retry_all: with ``retry_unhandled``, retry every ``unhandled`` task.
        retry_class: with ``retry_all``, only those of this class (the stored
            ``module:Class``, or just ``Class``).
        retry_dry_run: with ``retry_unhandled``, only say what would be retried.
    """

    bands: tuple[Band, ...]
    mongodb_uri: str | None = field(default=None, repr=False)
    make_db: Callable[[], Any] | None = field(default=None, repr=False)
    database: str | None = None
    lease: timedelta = DEFAULT_LEASE
    poll_interval: float = DEFAULT_POLL_INTERVAL
    server_name: str = ""
    grace: float = DEFAULT_GRACE
    max_tasks_per_worker: int = 0
    verbose: bool = False
    embedded: bool = False
    demo: bool = False
    demo_quick: bool = False
    prune_finished: timedelta | None = None
    prune_unhandled: bool = False
    keep_finished: timedelta | None = None
    retry_unhandled: tuple[str, ...] | None = None
    retry_all: bool = False
    retry_class: str | None = None
    retry_dry_run: bool = False

    def describe(self) -> str:
        """One line for the start-up log; credentials redacted."""
        if self.embedded:
            where = "embedded store"
        elif self.mongodb_uri is not None:
            where = _redact(self.mongodb_uri)
            if self.database:
                where += f" database {self.database!r}"
        else:
            where = "tullius_deps.make_db()"
        bands = " ".join(str(band) for band in self.bands)
        line = (
            f"server {self.server_name!r} on {where}; processes {bands}; "
            f"lease {self.lease.total_seconds():g}s; poll {self.poll_interval:g}s; "
            f"grace {self.grace:g}s"
        )
        if self.keep_finished is not None:
            kept = "succeeded and handled"
            if self.prune_unhandled:
                kept = "succeeded, handled and unhandled"
            line += f"; {kept} tasks kept {self.keep_finished / timedelta(days=1):g} day(s)"
        return line


@dataclass(frozen=True)
class RawFlags:
    """Command-line values as typed (None: not given)."""

    mongodb_uri: str | None = None
    database: str | None = None
    processes: Sequence[str] | None = None
    lease: str | None = None
    poll_interval: str | None = None
    server_name: str | None = None
    grace: str | None = None
    max_tasks_per_worker: str | None = None
    verbose: bool = False
    embedded: bool = False
    demo: bool = False
    demo_quick: bool = False
    status: bool = False
    prune_finished: str | None = None
    prune_unhandled: bool = False
    keep_finished: str | None = None
    retry_unhandled: Sequence[str] | None = None
    retry_class: str | None = None
    dry_run: bool = False


def env_name(flag: str) -> str:
    """``--poll-interval`` -> ``TULLIUS_POLL_INTERVAL``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


#: The flags that have a ``TULLIUS_*`` variable.
ENV_FLAGS = (
    "--mongodb-uri",
    "--database",
    "--processes",
    "--lease",
    "--poll-interval",
    "--grace",
    "--max-tasks-per-worker",
    "--server-name",
    "--keep-finished",
)
#: Every ``TULLIUS_*`` variable Tullius reads, the daemon's and the others'.
KNOWN_ENV: frozenset[str] = frozenset(
    [env_name(flag) for flag in ENV_FLAGS] + ["TULLIUS_SIM_PIN_CPU", "TULLIUS_TEST_MONGODB_URI"]
)


def check_env_names(env: Mapping[str, str]) -> None:
    """Refuse a ``TULLIUS_*`` variable that looks like a misspelt one of ours.

    Why: ``TULLIUS_LEAES=60`` was ignored, and the daemon ran with the default
    lease.  A name close to none of ours is left alone (another program's).

    Raises:
        ConfigError: naming the variable and the one it resembles.
    """
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in KNOWN_ENV:
            continue
        close = difflib.get_close_matches(name, KNOWN_ENV, n=1, cutoff=0.85)
        if close:
            raise ConfigError(
                name, _redact(env[name]), f"is not a setting; expected {close[0]} (a misspelling?)"
            )


def parse_seconds(
    setting: str,
    text: str,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    allow_zero: bool = False,
) -> float:
    """A number of seconds, finite, from ``minimum`` to ``maximum`` (or 0 when allowed).

    Raises:
        ConfigError: naming ``setting`` and the value.
    """
    expected = (
        "must be a number of seconds >= 0" if allow_zero else "must be a positive number of seconds"
    )
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(setting, text, expected) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(setting, text, expected)
    if value and value < minimum:
        raise ConfigError(setting, text, f"must be at least {minimum:g} seconds")
    if value > maximum:
        raise ConfigError(setting, text, f"must be at most {maximum:g} seconds")
    return value


def parse_count(setting: str, text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(setting, text, "must be a whole number >= 0 (0: never)") from None
    if value < 0:
        raise ConfigError(setting, text, "must be a whole number >= 0 (0: never)")
    return value


def parse_processes(setting: str, entries: Sequence[str]) -> tuple[Band, ...]:
    """Bands from ``COUNT:MIN-MAX`` texts (the variable may hold several, space separated)."""
    bands = []
    for entry in entries:
        try:
            bands.append(parse_band(entry, setting=setting))
        except ConfigError as error:
            if error.value == entry:
                raise
            raise ConfigError(
                setting, entry, "must have COUNT >= 1 and MIN <= MAX, e.g. 10:0-10 or 5:0-0"
            ) from None
    if not bands:
        raise ConfigError(setting, list(entries), "must name at least one band, e.g. 10:0-10")
    return tuple(bands)


def default_server_name() -> str:
    """``host:pid``: unique among live daemons, readable in records."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve(
    flags: RawFlags,
    env: Mapping[str, str] | None = None,
    *,
    deps_loader: Callable[..., Deps | None] = load_deps,
) -> Settings:
    """Combine flags, environment and ``tullius_deps`` into validated `Settings`.

    1. Each setting: the flag if given, else ``TULLIUS_<NAME>``, else default.
    2. The store: ``--embedded``; else the URI (flag, then variable); else
       ``tullius_deps.make_db`` (then ``tullius_deps`` is required).
    3. The bands: ``--processes`` (flag, then variable), else
       ``tullius_deps.task_processes``, else `DEFAULT_BANDS`.

    Raises:
        ConfigError: a malformed value, or no way to reach a database.
    """
    env = os.environ if env is None else env
    check_env_names(env)

    def pick(flag: str, value: str | None) -> tuple[str, str | None]:
        if value is not None:
            return flag, value
        name = env_name(flag)
        text = env.get(name)
        return name, (text if text not in (None, "") else None)

    uri_setting, uri = pick("--mongodb-uri", flags.mongodb_uri)
    database_setting, database = pick("--database", flags.database)
    embedded = flags.embedded
    for flag, given in (("--mongodb-uri", flags.mongodb_uri), ("--database", flags.database)):
        if embedded and given is not None:
            # Why refused: the daemon would run on the in-process store and the
            # operator would believe their tasks went to the database.  (The
            # environment variables are left alone: --embedded wins over them.)
            raise ConfigError(
                flag,
                _redact(given) if flag == "--mongodb-uri" else given,
                "can't be given with --embedded, which runs on an in-process store "
                "and no database; drop one of the two",
            )
    if flags.status and (embedded or flags.demo or flags.demo_quick):
        raise ConfigError(
            "--status",
            True,
            "reads a database and exits, so it can't be given with --embedded (whose tasks "
            "live in its own daemon's memory) or --demo",
        )
    keep_setting, keep_text = pick("--keep-finished", flags.keep_finished)
    keep = _parse_keep(flags, keep_setting, keep_text)
    prune = _parse_prune(flags, keeping=keep is not None)
    retry_ids, retry_all = _parse_retry(flags)
    if uri is not None and not embedded and not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(
            uri_setting, _redact(uri), "must be a MongoDB URI such as mongodb://host:27017/tullius"
        )
    if database is not None and (not database or any(c in database for c in '/\\. "$\0')):
        raise ConfigError(
            database_setting, database, "must be a MongoDB database name, e.g. tullius"
        )

    processes_setting, processes = "--processes", flags.processes
    if not processes:
        processes_setting = env_name("--processes")
        listed = env.get(processes_setting, "")
        processes = listed.replace(",", " ").split() or None
    given_bands = parse_processes(processes_setting, processes) if processes else None

    lease = DEFAULT_LEASE
    setting, text = pick("--lease", flags.lease)
    if text is not None:
        seconds = parse_seconds(
            setting, text, minimum=MIN_LEASE.total_seconds(), maximum=MAX_LEASE.total_seconds()
        )
        lease = timedelta(seconds=seconds)
    poll = DEFAULT_POLL_INTERVAL
    setting, text = pick("--poll-interval", flags.poll_interval)
    if text is not None:
        poll = parse_seconds(setting, text, minimum=0.001)
    grace = DEFAULT_GRACE
    setting, text = pick("--grace", flags.grace)
    if text is not None:
        grace = parse_seconds(setting, text, allow_zero=True)
    recycle = 0
    setting, text = pick("--max-tasks-per-worker", flags.max_tasks_per_worker)
    if text is not None:
        recycle = parse_count(setting, text)
    setting, name = pick("--server-name", flags.server_name)
    if name is not None and (not name.strip() or len(name) > 200):
        raise ConfigError(setting, name, "must be a non-empty name of at most 200 characters")

    # tullius_deps last: a mistake in a flag is reported as such, not hidden
    # behind a missing or broken tullius_deps.
    needs_deps = not embedded and uri is None
    deps = deps_loader(required=needs_deps)
    make_db = None
    if needs_deps:
        assert deps is not None
        if deps.make_db is None:
            raise ConfigError(
                "tullius_deps.make_db",
                None,
                "must be defined (a function returning a pymongo Database), or pass --mongodb-uri",
            )
        make_db = deps.make_db

    if given_bands is not None:
        bands, bands_setting = given_bands, processes_setting
    elif deps is not None and deps.task_processes is not None:
        bands, bands_setting = deps.task_processes, "tullius_deps.task_processes"
    else:
        bands, bands_setting = DEFAULT_BANDS, "--processes"
    total = sum(band.count for band in bands)
    if total > MAX_PROCESSES:
        # Why: 100000:0-5 was accepted, and forking that many froze the machine.
        raise ConfigError(
            bands_setting,
            " ".join(str(band) for band in bands),
            f"must total at most {MAX_PROCESSES} worker processes (it asks for {total:,}); "
            "run more daemons for more",
        )

    return Settings(
        bands=bands,
        mongodb_uri=None if embedded else uri,
        make_db=make_db,
        database=database,
        lease=lease,
        poll_interval=poll,
        server_name=name or default_server_name(),
        grace=grace,
        max_tasks_per_worker=recycle,
        verbose=flags.verbose,
        embedded=embedded,
        demo=flags.demo or flags.demo_quick,
        demo_quick=flags.demo_quick,
        prune_finished=prune,
        prune_unhandled=flags.prune_unhandled,
        keep_finished=keep,
        retry_unhandled=retry_ids,
        retry_all=retry_all,
        retry_class=flags.retry_class,
        retry_dry_run=flags.dry_run,
    )


def _parse_prune(flags: RawFlags, *, keeping: bool) -> timedelta | None:
    """``--prune-finished DAYS`` as a `timedelta`, checked against the flags it can't go with.

    ``keeping``: ``--keep-finished`` was set, which ``--prune-unhandled`` may
    go with instead.

    Raises:
        ConfigError: naming the flag and the value.
    """
    if flags.prune_finished is None:
        if flags.prune_unhandled and not keeping:
            raise ConfigError(
                "--prune-unhandled",
                True,
                "only says what --prune-finished DAYS or --keep-finished DAYS deletes; "
                "give one of them too",
            )
        return None
    if flags.embedded or flags.demo or flags.demo_quick or flags.status:
        raise ConfigError(
            "--prune-finished",
            flags.prune_finished,
            "deletes from a database and exits, so it can't be given with --embedded, "
            "--demo or --status",
        )
    if flags.keep_finished is not None:
        raise ConfigError(
            "--prune-finished",
            flags.prune_finished,
            "prunes once and exits, so it can't be given with --keep-finished, which has a "
            "running daemon prune now and then; drop one of the two",
        )
    return _parse_days("--prune-finished", flags.prune_finished)


def _parse_days(setting: str, text: str) -> timedelta:
    """An age to prune at: a number of days from `MIN_AGE` to `MAX_PRUNE_DAYS`.

    Raises:
        ConfigError: naming ``setting`` and the value.
    """
    least = MIN_AGE / timedelta(days=1)
    expected = (
        f"must be a number of days from {least:g} to {MAX_PRUNE_DAYS} (a daemon cut off from "
        "the database may still write for a task up to a day after its time limit)"
    )
    try:
        days = float(text)
    except ValueError:
        raise ConfigError(setting, text, expected) from None
    if not math.isfinite(days) or days < least or days > MAX_PRUNE_DAYS:
        raise ConfigError(setting, text, expected)
    return timedelta(days=days)


def _parse_keep(flags: RawFlags, setting: str, text: str | None) -> timedelta | None:
    """``--keep-finished DAYS`` (or ``TULLIUS_KEEP_FINISHED``) as a `timedelta`.

    Given as a flag it can't go with the modes that run no daemon; the
    variable is left alone there (it configures the daemons, and the same
    environment may serve a one-off ``--status``).

    Raises:
        ConfigError: naming the flag or variable and the value.
    """
    if text is None:
        return None
    one_off = flags.status or flags.retry_unhandled is not None
    if flags.keep_finished is not None and one_off:
        raise ConfigError(
            "--keep-finished",
            flags.keep_finished,
            "has a running daemon prune now and then, so it can't be given with --status or "
            "--retry-unhandled, which run no daemon",
        )
    return None if one_off or flags.prune_finished is not None else _parse_days(setting, text)


#: ``--retry-unhandled``'s word for every ``unhandled`` task, in any case (no task id
#: is spelt so).
RETRY_ALL = "all"


def _parse_retry(flags: RawFlags) -> tuple[tuple[str, ...] | None, bool]:
    """``--retry-unhandled ID [ID ...]`` or ``all`` (any case; with ``--retry-class``), checked
    against the flags it can't go with: the ids (duplicates dropped, ``()`` for
    ``all``) or None when not asked, and whether ``all`` was.

    Raises:
        ConfigError: naming the flag and the value.
    """
    given = flags.retry_unhandled
    if given is None:
        if flags.dry_run:
            raise ConfigError(
                "--dry-run",
                True,
                "only says what --retry-unhandled would do; give --retry-unhandled too",
            )
        if flags.retry_class is not None:
            raise ConfigError(
                "--retry-class",
                flags.retry_class,
                f"only narrows --retry-unhandled {RETRY_ALL}; give --retry-unhandled {RETRY_ALL} "
                "too (task ids name their tasks already)",
            )
        return None, False
    shown = " ".join(given)
    modes = (flags.embedded, flags.demo, flags.demo_quick, flags.status)
    if any(modes) or flags.prune_finished is not None:
        raise ConfigError(
            "--retry-unhandled",
            shown,
            "writes to a database and exits, so it can't be given with --embedded, --demo, "
            "--status or --prune-finished",
        )
    if not given or any(not task_id.strip() for task_id in given):
        raise ConfigError(
            "--retry-unhandled",
            shown,
            f"must name unhandled tasks by id (as --status lists them), or be {RETRY_ALL}",
        )
    # ``ALL`` or ``All`` is the word too (no task id is spelt so either).
    ids = tuple(
        dict.fromkeys(
            RETRY_ALL if task_id.strip().lower() == RETRY_ALL else task_id.strip()
            for task_id in given
        )
    )
    if RETRY_ALL in ids:
        if len(ids) > 1:
            raise ConfigError(
                "--retry-unhandled",
                shown,
                f"takes task ids or {RETRY_ALL}, not both; give {RETRY_ALL} alone "
                "(with --retry-class NAME to retry one class's)",
            )
        if flags.retry_class is not None and (
            not flags.retry_class.strip() or any(c.isspace() for c in flags.retry_class)
        ):
            raise ConfigError(
                "--retry-class",
                flags.retry_class,
                "must name a task class as stored, module:Class (e.g. billing.tasks:Invoice), "
                "or just Class",
            )
        return (), True
    if flags.retry_class is not None:
        raise ConfigError(
            "--retry-class",
            flags.retry_class,
            f"only narrows --retry-unhandled {RETRY_ALL}; it can't be given with task ids",
        )
    return ids, False
