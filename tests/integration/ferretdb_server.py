"""Build and run a throwaway FerretDB server for Tullius' integration tests.

Why this exists: the machines that run our tests can reach language package
registries but cannot install a MongoDB server. FerretDB speaks the MongoDB
wire protocol, is a Go module (so the Go module proxy serves it), and has a
pure-Go SQLite backend, so ``go build`` of the tiny program in ``ferretdb/``
gives us a real server to talk to with pymongo.

This module deliberately does not import pytest, and imports pymongo only
when a server is started, so that scripts and other tooling can use it too.

Typical use::

    binary = build_ferretdb()
    with FerretDBServer(binary, tmp_dir) as server:
        client = pymongo.MongoClient(server.uri)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FerretDBBuildError",
    "FerretDBServer",
    "FerretDBStartError",
    "GoUnavailable",
    "build_ferretdb",
    "find_go",
    "free_loopback_port",
]

GO_PROGRAM_DIR = Path(__file__).resolve().parent / "ferretdb"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "ferretdb"

# Files whose content fully determines the binary; any change forces a rebuild.
_SOURCE_FILES = ("main.go", "go.mod", "go.sum")
_BINARY_PREFIX = "ferretdb-testserver-"
# A cold build (module download plus compiling the pure-Go SQLite) takes about
# a minute on a 2-core machine; leave lots of room for slow CI hosts.
_BUILD_TIMEOUT_SECONDS = 1800
_FALLBACK_GO = Path("/usr/local/go/bin/go")
LOG_FILE_NAME = "ferretdb-server.log"


class GoUnavailable(RuntimeError):
    """No Go toolchain was found, so FerretDB cannot be built here.

    Kept distinct from build failures so that test suites can decide to skip
    (developer laptop without Go) rather than report a broken build.
    """


class FerretDBBuildError(RuntimeError):
    """``go build`` of the FerretDB test server failed; the message has go's output."""


class FerretDBStartError(RuntimeError):
    """The server process exited early or never answered ``ping`` in time."""


def find_go() -> Path:
    """Return the path of the ``go`` command, or raise :class:`GoUnavailable`.

    ``/usr/local/go/bin`` is checked as well because the official tarball
    installs there and non-login shells (CI, IDEs) often lack it on PATH.
    """
    found = shutil.which("go")
    if found:
        return Path(found)
    if _FALLBACK_GO.is_file() and os.access(_FALLBACK_GO, os.X_OK):
        return _FALLBACK_GO
    raise GoUnavailable(
        f"the Go toolchain was not found: 'go' is not on PATH ({os.environ.get('PATH', '')!r}) "
        f"and {_FALLBACK_GO} does not exist; install Go >= 1.24 to build the FerretDB test server"
    )


def _source_digest() -> str:
    """Hash the Go sources plus the platform, so stale or foreign binaries are never reused."""
    h = hashlib.sha256()
    h.update(f"{sys.platform}-{platform.machine()}\0".encode())
    for name in _SOURCE_FILES:
        path = GO_PROGRAM_DIR / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FerretDBBuildError(
                f"FerretDB test server source {path} is missing; "
                f"expected {_SOURCE_FILES} in {GO_PROGRAM_DIR}"
            ) from None
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def build_ferretdb(cache_dir: Path | None = None) -> Path:
    """Build the FerretDB test server once per source version and return the binary.

    The binary is named after a hash of ``main.go``/``go.mod``/``go.sum``, so
    an unchanged checkout reuses it and an edited one rebuilds. The build
    writes to a temporary name and renames atomically, which makes parallel
    test processes (e.g. pytest-xdist) safe: the last rename simply wins.

    Build flags and environment, and why:

    * ``GOTOOLCHAIN=local`` - never download another Go toolchain (only
      package registries are reachable); fail with a clear message instead if
      the installed Go is older than go.mod's ``go`` line.
    * ``-mod=readonly`` - go.sum is committed; the build must not rewrite it.
    * ``CGO_ENABLED=0`` - the SQLite driver is pure Go; no C compiler needed.
    * ``-buildvcs=false`` - stamping VCS info fails in some checkouts (e.g.
      a repository owned by another user) and is useless here.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    exe_suffix = ".exe" if sys.platform == "win32" else ""
    binary = cache / f"{_BINARY_PREFIX}{_source_digest()}{exe_suffix}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary  # up to date; Go is not even needed

    go = find_go()
    cache.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", GOFLAGS="-mod=readonly", CGO_ENABLED="0")
    env["PATH"] = f"{go.parent}{os.pathsep}{env.get('PATH', '')}"

    fd, tmp_name = tempfile.mkstemp(prefix=binary.name + ".", suffix=".tmp", dir=cache)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [str(go), "build", "-trimpath", "-buildvcs=false", "-o", str(tmp), "."]
    try:
        try:
            result = subprocess.run(
                cmd,
                cwd=GO_PROGRAM_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired as e:
            raise FerretDBBuildError(
                f"`{' '.join(cmd)}` in {GO_PROGRAM_DIR} did not finish within "
                f"{_BUILD_TIMEOUT_SECONDS}s; output so far:\n{e.stderr!r}"
            ) from None
        if result.returncode != 0:
            raise FerretDBBuildError(
                f"`{' '.join(cmd)}` in {GO_PROGRAM_DIR} exited with status {result.returncode} "
                f"(expected 0); go's output:\n{result.stderr}{result.stdout}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        tmp.unlink(missing_ok=True)

    _remove_stale_binaries(cache, keep=binary)
    return binary


def _remove_stale_binaries(cache: Path, keep: Path) -> None:
    """Delete binaries of older source versions (~40 MB each). Best effort only.

    Anything touched in the last hour is kept: another test process in the
    same checkout may have just been handed that path and not exec'd it yet.
    """
    cutoff = time.time() - 3600
    for old in cache.glob(_BINARY_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()


def free_loopback_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FerretDBServer:
    """One FerretDB process with a fixed port and data directory.

    The port is chosen once and kept across :meth:`restart`, so clients and
    proxies created before a crash/restart keep pointing at the right place,
    exactly like a real database host that comes back.

    The server's stderr goes to ``<data_dir>/ferretdb-server.log`` (appended
    across restarts) so a failing test can be debugged afterwards; the tail
    of that log is included in start-up errors.

    ``serialize_writes`` (default False) makes the server run one write command
    at a time. Plain FerretDB 1.24 loses concurrent ``$inc`` updates and lets
    two ``find_one_and_update`` calls claim the same document; MongoDB does
    neither.  Tullius's protocol must not depend on atomic conditional
    updates (docs/design.md), so its tests run FerretDB as it is, racing;
    pass True to get MongoDB-like single-document atomicity (e.g. to compare
    with other queues in bench/).
    """

    def __init__(
        self,
        binary: Path | str,
        data_dir: Path | str,
        port: int | None = None,
        *,
        log_level: str = "info",
        serialize_writes: bool = False,
    ) -> None:
        self.binary = Path(binary)
        self.data_dir = Path(data_dir)
        self.port = port if port is not None else free_loopback_port()
        self.log_level = log_level
        self.serialize_writes = serialize_writes
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- information ---------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Return the end of the server log, for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"<could not read {self.log_path}: {e}>"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the process and return once a pymongo ``ping`` succeeds.

        Readiness is polled with a deadline instead of sleeping, so a fast
        start returns quickly and a slow CI host still gets ``timeout``
        seconds. An early exit (e.g. the port is taken) fails immediately.
        """
        if self.running:
            raise FerretDBStartError(
                f"FerretDB (pid {self.pid}) is already running on {self.uri}; "
                "expected it stopped before start()"
            )
        if not self.binary.is_file():
            raise FerretDBStartError(
                f"FerretDB binary {self.binary} does not exist; "
                "expected the path returned by build_ferretdb()"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Kept open for the process's lifetime and closed by stop()/kill().
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(
            f"\n==== harness: starting FerretDB on {self.uri} at {stamp} ====\n".encode()
        )
        self._log.flush()
        cmd = [
            str(self.binary),
            "-listen",
            f"{self.host}:{self.port}",
            "-data-dir",
            str(self.data_dir),
            "-log-level",
            self.log_level,
            "-exit-with-parent",
            f"-serialize-writes={'true' if self.serialize_writes else 'false'}",
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the terminal goes to pytest, which
            # then stops the server in order, instead of both racing.
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import pymongo  # imported lazily: only needed once a server runs
        import pymongo.errors

        deadline = time.monotonic() + timeout
        pause = 0.01
        last_error: Exception | None = None
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise FerretDBStartError(
                    f"FerretDB exited with status {code} during start-up on {self.uri} "
                    f"(expected it to keep running); "
                    f"log {self.log_path} ends with:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FerretDBStartError(
                    f"FerretDB on {self.uri} did not answer ping within {timeout}s "
                    f"(last error: {last_error!r}); "
                    f"log {self.log_path} ends with:\n{self.log_tail()}"
                )
            # A cheap TCP probe first: a pymongo client created before the
            # listener exists would wait for its next heartbeat (>= 500 ms).
            try:
                socket.create_connection(
                    (self.host, self.port), timeout=min(1.0, remaining)
                ).close()
            except OSError as e:
                last_error = e
                time.sleep(min(pause, max(remaining, 0)))
                pause = min(pause * 2, 0.2)
                continue
            wait_ms = int(max(100, min(5000, remaining * 1000)))
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                self.uri,
                directConnection=True,
                serverSelectionTimeoutMS=wait_ms,
                connectTimeoutMS=wait_ms,
            )
            try:
                client.admin.command("ping")
                # The ping may have been answered by a stranger that owns the
                # port (our process then exits on bind); only accept our pid.
                answered_by = client.admin.command("serverStatus").get("pid")
            except pymongo.errors.PyMongoError as e:
                last_error = e
                continue
            finally:
                client.close()
            if answered_by == self._proc.pid:
                return
            last_error = FerretDBStartError(
                f"{self.uri} is answered by pid {answered_by!r}, expected our pid {self._proc.pid}"
            )
            time.sleep(min(pause, max(remaining, 0)))
            pause = min(pause * 2, 0.2)

    def stop(self, grace: float = 15) -> None:
        """Stop gracefully (SIGTERM), escalating to SIGKILL after ``grace`` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup()

    def kill(self) -> None:
        """Crash the server with SIGKILL, as a fault test would (no clean shutdown)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._cleanup()

    def restart(self, timeout: float = 60) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self.start(timeout=timeout)

    def _cleanup(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> FerretDBServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"FerretDBServer({self.uri!r}, data_dir={str(self.data_dir)!r}, {state})"
