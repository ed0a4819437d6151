"""Helpers for tests that run ``tulliusd`` as a real subprocess against a MongoDB-wire server.

Shared by ``test_daemon_basic.py`` and the fault-injection tests, and free of
pytest so that benchmark scripts can use it too.

* `wait_for(predicate, timeout=60, what=...)` polls a condition; tests never
  sleep and hope, and never assert how long something took.
* `Daemon` starts ``tulliusd`` (``PYTHONPATH`` including this directory, so
  `tasks_for_tests` is importable by its workers), captures its output to
  files, and stops, kills, pauses or resumes it.  Every daemon is tagged with
  an environment variable inherited by its workers and their children, so
  `leftover_processes()` can prove no task process outlived it.
* `open_store()` and `queue()` talk to the same database from the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

INTEGRATION_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEGRATION_DIR.parents[1]
#: Environment variable inherited by a daemon's whole process tree.
MARKER_VARIABLE = "TULLIUS_TEST_DAEMON_TAG"

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 60,
    what: str = "the condition",
    interval: float = 0.05,
    *,
    tolerate: tuple[type[BaseException], ...] = (),
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Args:
        tolerate: errors of the predicate that count as "not yet" (fault tests
            take the database away on purpose); the last one is reported.
        on_timeout: more text for the failure message (e.g. a daemon's log).

    Raises:
        AssertionError: still falsy after ``timeout`` seconds, naming ``what``.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except tolerate as error:
            last_error = error
        if time.monotonic() >= deadline:
            extra = f"\nlast error: {last_error!r}" if last_error else ""
            if on_timeout is not None:
                extra += "\n" + on_timeout()
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def leftover_processes(tag: str, *, exclude: Iterable[int] = ()) -> list[int]:
    """Live processes whose environment carries ``MARKER_VARIABLE=tag`` (Linux /proc)."""
    needle = f"{MARKER_VARIABLE}={tag}".encode()
    skip = set(exclude)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if needle in environ and process_alive(int(entry)):
            found.append(int(entry))
    return found


class Daemon:
    """One ``tulliusd`` subprocess.

    Args:
        uri: the MongoDB URI it connects to.
        database: the database name (one per test).
        args: extra command-line arguments.
        lease: ``--lease`` in seconds (short, so fault tests are quick).
        processes: ``--processes`` values.
        poll_interval: ``--poll-interval``.
        grace: ``--grace``.
        server_name: ``--server-name`` (default: a unique name).
        env: extra environment variables.
        log_dir: where its stdout/stderr files go (default: a new temp dir).
        new_session: start it in a session of its own, so that a signal aimed at
            it (the fault tests' SIGKILL, SIGSTOP) reaches only it.
    """

    def __init__(
        self,
        uri: str | None,
        database: str | None,
        *args: str,
        lease: float | None = 3.0,
        processes: Sequence[str] = ("2:0-10",),
        poll_interval: float | None = None,
        grace: float | None = 5.0,
        server_name: str | None = None,
        verbose: bool = True,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.new_session = new_session
        self.tag = uuid.uuid4().hex
        self.server_name = server_name or f"daemon-{self.tag[:8]}"
        cmd = [sys.executable, "-m", "tullius.cli"]
        if uri is not None:
            cmd += ["--mongodb-uri", uri]
        if database is not None:
            cmd += ["--database", database]
        for value in processes:
            cmd += ["--processes", value]
        if lease is not None:
            cmd += ["--lease", str(lease)]
        if poll_interval is not None:
            cmd += ["--poll-interval", str(poll_interval)]
        if grace is not None:
            cmd += ["--grace", str(grace)]
        cmd += ["--server-name", self.server_name]
        if verbose:
            cmd.append("-v")
        cmd += list(args)
        self.cmd = cmd
        self.env = dict(os.environ)
        self.env.pop("TULLIUS_MONGODB_URI", None)
        paths = [str(INTEGRATION_DIR), str(REPO_ROOT)]
        if self.env.get("PYTHONPATH"):
            paths.append(self.env["PYTHONPATH"])
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.env[MARKER_VARIABLE] = self.tag
        self.env.update(env or {})
        self.log_dir = (
            Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="tulliusd-"))
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.log_dir / f"{self.server_name}.stdout"
        self.stderr_path = self.log_dir / f"{self.server_name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> Daemon:
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.log_dir,
                start_new_session=self.new_session,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() the daemon first"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, signum: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 90, signum: int = signal.SIGTERM) -> int:
        """Signal (SIGTERM by default) and wait for the exit status; SIGKILL after ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped daemon can't act on a signal
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"tulliusd {self.server_name} did not exit within {timeout}s of "
                    f"signal {signum}; "
                    f"stderr ends with:\n{self.stderr()[-3000:]}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon alone (its workers must then die by themselves)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Clean-up after a test, whatever state it left the daemon in: kill it."""
        if self.running:
            self.send_signal(signal.SIGCONT)
            self.kill()

    def pause(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def wait(self, timeout: float = 90) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    # --- inspection --------------------------------------------------------------

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_tail(self, size: int = 3000) -> str:
        """The end of what it wrote (its log is on stderr), for failure messages."""
        return (self.stderr() + self.stdout())[-size:]

    def leftovers(self) -> list[int]:
        """Processes of this daemon's tree still alive (excluding the daemon while it runs)."""
        exclude = [self.pid] if self.running else []
        return leftover_processes(self.tag, exclude=exclude)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"Daemon({self.server_name!r}, {state})"


# --- the database side -------------------------------------------------------------


def run_tulliusd(uri: str, database: str, *flags: str) -> tuple[int, str, str]:
    """Run a one-shot ``tulliusd ...`` (``--status``, ``--prune-finished``, ...) on
    ``database`` to its end, where the daemons' task classes are importable, as
    they are for the daemons (`Daemon`); return its exit status, stdout and stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(INTEGRATION_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [sys.executable, "-m", "tullius.cli", "--mongodb-uri", uri, "--database", database, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    return done.returncode, done.stdout, done.stderr


def mongo_client(uri: str) -> Any:
    import pymongo

    return pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10_000)


def open_store(uri: str, database: str, *, client: Any = None) -> Any:
    """A `MongoStore` on ``database``, with indexes, for queueing and checking from a test."""
    from tullius.runtime.mongo_store import MongoStore

    client = client or mongo_client(uri)
    store = MongoStore(client[database])
    store.ensure_indexes()
    return store


def queue(store: Any, *tasks: Any) -> list[str]:
    """Queue user tasks into ``store`` as ``tullius.queue`` would; return their ids."""
    from tullius.api import insert_queued
    from tullius.task import to_spec

    specs = [to_spec(task) for task in tasks]
    return insert_queued(store, specs, now=datetime.now(UTC), new_id=lambda: uuid.uuid4().hex)


def status(store: Any, task_id: str) -> Any:
    """The true status of a task, from its records (None if it does not exist)."""
    from tullius.document import status_of

    view = store.load(task_id)
    return None if view is None else status_of(view)


def all_terminal(store: Any) -> bool:
    """True if every task in the store has reached a terminal status (by its records)."""
    from tullius.document import TERMINAL, Status, status_of

    counts = store.count_by_status()
    pending = [s for s in Status if s not in TERMINAL and counts.get(s)]
    if pending:
        return False
    return all(
        status_of(view) in TERMINAL
        for collection in (*store.live_collections(), store.finished)
        for doc in collection.find({}, {"_id": 1})
        if (view := store.load(doc["_id"])) is not None
    )


def wait_terminal(store: Any, task_id: str, timeout: float = 60) -> Any:
    """Wait until ``task_id`` is terminal; return its status."""
    from tullius.document import TERMINAL

    return wait_for(
        lambda: (s := status(store, task_id)) in TERMINAL and s,
        timeout=timeout,
        what=f"task {task_id} to reach a terminal status",
    )
