"""The faults a simulation can inject, as plain data.

A fault schedule is a list of these frozen dataclasses; `Simulation.apply()`
validates it against the simulation's servers and arms each fault.  Times are
offsets from the simulation's start.  Every fault prints as a constructor
call, so a failing seed's report can be pasted back into a test.

==================  ===========================================================
`WorkerCrash`       The worker process running a job dies: its server records
                    the failure as ``crashed`` (like the daemon reaping a dead
                    child) and starts a fresh worker.
`ServerCrash`       The whole server vanishes without cleanup: its jobs stop
                    mid-step, its leases stay until another server's sweep
                    declares them ``lost``.  Optionally restarts later, with a
                    fresh memory (new tokens, new lease watch).
`ServerStop`        A graceful stop (SIGTERM, a deploy): the server claims no
                    more, lets its running jobs finish for ``grace``, then
                    stops the rest (failed as ``shutdown``) and exits once
                    every verdict is recorded (or gives them up 31 s after
                    the kills, as ``tulliusd``).  Optionally restarts ``restart_after``
                    after it exited.
`ServerPause`       The server freezes (GC pause, SIGSTOP, VM migration) and
                    wakes up later to carry on where it was; a late result for
                    a lease that was meanwhile declared lost is rejected.
`StoreFault`        The next ``count`` matching store operations of a server
                    fail: ``"not_applied"`` (the write never happened) or
                    ``"lost_ack"`` (it happened, but the reply was lost).
                    Operations are named as in `tullius.store.operation_name`
                    (``"InsertRecord"``, ``"SetStatus"``, ``"Load"``...);
                    ``record_kind`` narrows InsertRecord to one kind of record
                    (``"run"``, ``"outcome"``, ``"handler"``, ``"handler_end"``).
                    ``"InsertTasks"`` also hits ``tullius.queue()`` in user code
                    (the server inserts those tasks, as ``tulliusd`` does), which
                    then raises `StoreError` in the user code, as do outages.
`StepCrash`         ``server`` dies right after its next matching store
                    operation is applied, before it sees the reply: a crash
                    at a named step of the protocol (say, after the OUTCOME
                    record is inserted and before the successors are).
`StoreOutage`       Every store operation (of one server, or of all) fails, not
                    applied, for a while.
`ClockSkew`         One server's wall clock is off by ``skew`` from then on
                    (monotonic time is unaffected, as on a real machine).
==================  ===========================================================

Racing conditional updates (FerretDB) are not a scheduled fault but a property
of the store: ``Simulation(racy_updates=0.3)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from tullius.errors import ConfigError
from tullius.policy import DEFAULT_GRACE, FINISH_GIVE_UP, KILL_GRACE

#: The operation names a `StoreFault` may aim at.
OPERATIONS: Final = frozenset(
    {"InsertRecord", "InsertTasks", "SetStatus", "Load", "FindDue", "FindByStatus", "Beat"}
)
RECORD_KINDS: Final = frozenset({"run", "outcome", "handler", "handler_end"})
STORE_FAULT_KINDS: Final = frozenset({"not_applied", "lost_ack"})
#: The largest `ClockSkew`: clocks years apart are already far past any test,
#: and a skew of millennia put a server's dates past the year 9999.
MAX_SKEW: Final = timedelta(days=3653)


def _td(delta: timedelta) -> str:
    # Not a timedelta until `Simulation.apply` refuses it: the repr must still work
    # (it raised AttributeError), since that refusal and a failure report print it.
    if not isinstance(delta, timedelta):
        return repr(delta)
    # Exact, so that a report pasted back replays: ``:g`` kept six digits, and a
    # crash at 1239.4755 s printed as 1239.48 s gave another outcome.
    seconds = delta.total_seconds()
    for text in (f"{seconds:g}", repr(seconds)):
        try:
            if timedelta(seconds=float(text)) == delta:
                return f"timedelta(seconds={text})"
        except OverflowError:  # rounded past timedelta.max
            break
    return f"timedelta({delta.days}, {delta.seconds}, {delta.microseconds})"


@dataclass(frozen=True)
class WorkerCrash:
    """At ``at``, the worker process of ``server`` running a job dies (``worker``: slot index,
    or None for the busy worker with the lowest index)."""

    at: timedelta
    server: str
    worker: int | None = None

    def __repr__(self) -> str:
        return f"WorkerCrash(at={_td(self.at)}, server={self.server!r}, worker={self.worker!r})"


@dataclass(frozen=True)
class ServerCrash:
    """At ``at``, ``server`` dies without cleanup; restarts ``restart_after`` later if given."""

    at: timedelta
    server: str
    restart_after: timedelta | None = None

    def __repr__(self) -> str:
        restart = None if self.restart_after is None else _td(self.restart_after)
        return f"ServerCrash(at={_td(self.at)}, server={self.server!r}, restart_after={restart})"


@dataclass(frozen=True)
class ServerStop:
    """At ``at``, ``server`` gets a stop signal, as ``tulliusd`` on SIGTERM: no more
    claims, ``grace`` for its running jobs, then the rest are stopped and fail as
    ``shutdown``; it exits when every verdict is recorded, or gives them up
    `STOP_GIVE_UP` after the kills (their leases then expire: ``lost``).
    Restarts ``restart_after`` after it exited, if given (a deploy)."""

    at: timedelta
    server: str
    grace: timedelta = DEFAULT_GRACE
    restart_after: timedelta | None = None

    def __repr__(self) -> str:
        restart = None if self.restart_after is None else _td(self.restart_after)
        return (
            f"ServerStop(at={_td(self.at)}, server={self.server!r}, grace={_td(self.grace)}, "
            f"restart_after={restart})"
        )


#: How long after its grace a stopping server exits at the latest (time paused
#: aside): the kill's second and the daemon's 30 s of trying to record the last
#: verdicts.
STOP_GIVE_UP: Final = KILL_GRACE + FINISH_GIVE_UP


@dataclass(frozen=True)
class ServerPause:
    """From ``at``, ``server`` is frozen for ``duration``, then carries on."""

    at: timedelta
    server: str
    duration: timedelta

    def __repr__(self) -> str:
        return (
            f"ServerPause(at={_td(self.at)}, server={self.server!r}, duration={_td(self.duration)})"
        )


@dataclass(frozen=True)
class StoreFault:
    """From ``at``, the next ``count`` store operations of ``server`` named ``operation`` fail."""

    server: str
    operation: str
    kind: str = "lost_ack"
    at: timedelta = timedelta(0)
    record_kind: str | None = None
    count: int = 1

    def __repr__(self) -> str:
        return (
            f"StoreFault(server={self.server!r}, operation={self.operation!r}, "
            f"kind={self.kind!r}, at={_td(self.at)}, record_kind={self.record_kind!r}, "
            f"count={self.count})"
        )


@dataclass(frozen=True)
class StepCrash:
    """From ``at``, ``server`` dies right after its next ``operation`` is applied (restarting
    ``restart_after`` later if given); ``record_kind`` narrows InsertRecord as in `StoreFault`."""

    server: str
    operation: str
    record_kind: str | None = None
    at: timedelta = timedelta(0)
    restart_after: timedelta | None = None

    def __repr__(self) -> str:
        restart = None if self.restart_after is None else _td(self.restart_after)
        return (
            f"StepCrash(server={self.server!r}, operation={self.operation!r}, "
            f"record_kind={self.record_kind!r}, at={_td(self.at)}, restart_after={restart})"
        )


@dataclass(frozen=True)
class StoreOutage:
    """From ``at``, for ``duration``, the store refuses every operation (of ``server``, or all)."""

    at: timedelta
    duration: timedelta
    server: str | None = None

    def __repr__(self) -> str:
        return (
            f"StoreOutage(at={_td(self.at)}, duration={_td(self.duration)}, server={self.server!r})"
        )


@dataclass(frozen=True)
class ClockSkew:
    """From ``at``, ``server``'s wall clock reads ``skew`` off (positive: ahead)."""

    server: str
    skew: timedelta
    at: timedelta = timedelta(0)

    def __repr__(self) -> str:
        return f"ClockSkew(server={self.server!r}, skew={_td(self.skew)}, at={_td(self.at)})"


Fault = (
    WorkerCrash
    | ServerCrash
    | ServerPause
    | StoreFault
    | StepCrash
    | StoreOutage
    | ClockSkew
    | ServerStop
)
FAULT_TYPES: Final = (
    WorkerCrash,
    ServerCrash,
    ServerPause,
    StoreFault,
    StepCrash,
    StoreOutage,
    ClockSkew,
    ServerStop,
)


def fault_start(fault: Fault) -> timedelta:
    return fault.at


def fault_end(fault: Fault) -> timedelta:
    """When the fault stops disturbing anything (a restart or a resume counts as the end;
    a stopping server's exit comes `STOP_GIVE_UP` after its grace at the latest).

    Known from the fault alone: a pause of the server delays a stop, and with it
    this end (`Simulation.faults_end` follows that).
    """
    match fault:
        case ServerStop(at=at, grace=grace, restart_after=restart):
            return at + grace + STOP_GIVE_UP + (restart or timedelta(0))
        case (
            ServerCrash(at=at, restart_after=restart) | StepCrash(at=at, restart_after=restart)
        ) if restart is not None:
            return at + restart
        case ServerPause(at=at, duration=duration) | StoreOutage(at=at, duration=duration):
            return at + duration
    return fault.at


def validate_schedule(
    faults: Iterable[object], servers: Sequence[str], workers: int | None = None
) -> list[Fault]:
    """Check every fault; return them as a list.

    ``workers``: the worker slots of each server, if known; a `WorkerCrash` aimed
    at a slot beyond them is refused (it could never crash anything).

    Raises:
        ConfigError: naming the fault, the bad value and what was expected.
    """
    if isinstance(faults, FAULT_TYPES) or not isinstance(faults, Iterable):
        raise ConfigError("faults", faults, "must be a list of faults, e.g. [ServerCrash(...)]")
    checked: list[Fault] = []
    for index, fault in enumerate(faults):
        where = f"faults[{index}]"
        if not isinstance(fault, FAULT_TYPES):
            raise ConfigError(
                where, fault, "must be one of " + ", ".join(cls.__name__ for cls in FAULT_TYPES)
            )
        if not isinstance(fault.at, timedelta) or fault.at < timedelta(0):
            raise ConfigError(f"{where}.at", fault.at, "must be a timedelta >= 0")
        server = getattr(fault, "server", None)
        if (server is not None or not isinstance(fault, StoreOutage)) and server not in servers:
            raise ConfigError(
                f"{where}.server",
                server,
                f"is not a simulated server; expected one of {list(servers)}",
            )
        _check_fault(where, fault)
        try:
            fault_end(fault)
        except OverflowError:
            raise ConfigError(where, fault, "ends past the largest timedelta") from None
        slot = fault.worker if isinstance(fault, WorkerCrash) else None
        if slot is not None and workers is not None and slot >= workers:
            raise ConfigError(
                f"{where}.worker",
                slot,
                f"is not a worker slot; each server has {workers} (0 to {workers - 1})",
            )
        checked.append(fault)
    return checked


def _check_fault(where: str, fault: Fault) -> None:
    positive = "must be a positive timedelta"
    restart = getattr(fault, "restart_after", None)
    if restart is not None and (not isinstance(restart, timedelta) or restart <= timedelta(0)):
        raise ConfigError(f"{where}.restart_after", restart, positive + " or None")
    match fault:
        case ServerPause(duration=duration) | StoreOutage(duration=duration):
            if not isinstance(duration, timedelta) or duration <= timedelta(0):
                raise ConfigError(f"{where}.duration", duration, positive)
        case StoreFault():
            _check_step(where, fault.operation, fault.record_kind)
            if not isinstance(fault.kind, str) or fault.kind not in STORE_FAULT_KINDS:
                raise ConfigError(
                    f"{where}.kind", fault.kind, f"must be one of {sorted(STORE_FAULT_KINDS)}"
                )
            if isinstance(fault.count, bool) or not isinstance(fault.count, int) or fault.count < 1:
                raise ConfigError(f"{where}.count", fault.count, "must be an int >= 1")
        case StepCrash():
            _check_step(where, fault.operation, fault.record_kind)
        case WorkerCrash(worker=worker) if worker is not None:
            if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
                raise ConfigError(f"{where}.worker", worker, "must be a worker index >= 0 or None")
        case ServerStop(grace=grace):
            if not isinstance(grace, timedelta) or grace < timedelta(0):
                raise ConfigError(f"{where}.grace", grace, "must be a timedelta >= 0")
        case ClockSkew(skew=skew):
            if not isinstance(skew, timedelta) or abs(skew) > MAX_SKEW:
                raise ConfigError(
                    f"{where}.skew",
                    skew,
                    f"must be a timedelta of at most {MAX_SKEW.days} days either way",
                )


def _check_step(where: str, operation: str, record_kind: str | None) -> None:
    # isinstance first: a list is unhashable, and ``in`` a set raised TypeError.
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise ConfigError(f"{where}.operation", operation, f"must be one of {sorted(OPERATIONS)}")
    if record_kind is not None and (
        operation != "InsertRecord"
        or not isinstance(record_kind, str)
        or record_kind not in RECORD_KINDS
    ):
        raise ConfigError(
            f"{where}.record_kind",
            record_kind,
            f"needs operation='InsertRecord' and one of {sorted(RECORD_KINDS)}",
        )
