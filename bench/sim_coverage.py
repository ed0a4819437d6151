"""What the simulator's property suites explore: which faults hit which states.

A pytest plugin (and a script that runs it) that watches every `Simulation`
the property tests create and counts, per test, in how many simulations each
*combination* happened: not which faults were drawn, but what they hit when
they fired (a worker crash while ``failed()`` runs, a lost acknowledgement of
the OUTCOME record of a failed run, a pause spanning a handler's deadline, a
racing update that overwrote a terminal hint...), what the workloads asked for
(timeouts, handler failures, successors, delays) and what the runs produced
(failure kinds, lost leases, late results rejected).

Usage (from the repository root, about as long as the suite itself)::

    PYTHONPATH=. python bench/sim_coverage.py                  # the sim suites
    PYTHONPATH=. python bench/sim_coverage.py tests/property/test_sim_properties.py -k every
    PYTHONPATH=. python bench/sim_coverage.py --json out.json  # also save the counts

It patches private methods of the simulator (``_fire``, ``_crash``,
``_store_fault``, ``_log``) for the run only; it is a measuring tool, not a
test, and nothing asserts on its numbers.  Each line of the report is
``count/examples``: simulations in which the combination happened at least
once, out of the simulations the test created (`test_same_seed_same_trace`
creates two per example), not counting those with ``check_invariants=False``
(a test's fault-free dry run, to find its timeline).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tullius.document import TERMINAL, RecordKind, Status, status_of
from tullius.effects import InsertRecord, InsertTasks, SetStatus
from tullius.engine import JobKind
from tullius.sim import faults as F
from tullius.sim.clock import to_us
from tullius.sim.memory_store import MemoryStore
from tullius.sim.simulation import Simulation
from tullius.sim.world import Server

DEFAULT_TESTS = ["tests/property/test_sim_properties.py"]

#: Per test node id: label -> simulations that hit it; and how many simulations.
HITS: dict[str, Counter[str]] = defaultdict(Counter)
SIMS: Counter[str] = Counter()
_current = {"test": "(outside a test)"}


def _hits(sim: Simulation) -> set[str]:
    found: set[str] | None = sim.__dict__.get("_cov_hits")
    if found is None:
        found = sim.__dict__["_cov_hits"] = set()
        SIMS[_current["test"]] += 1
        sim.__dict__["_cov_test"] = _current["test"]
    return found


def _hit(sim: Simulation, label: str) -> None:
    _hits(sim).add(label)


def _activity(sim: Simulation, server: Server) -> list[str]:
    """What ``server`` is doing right now, as labels."""
    if not server.up:
        return ["down"]
    found = []
    for ex in server.execs:
        role = "run()" if ex.job.kind is JobKind.RUN else "failed()"
        found.append(role if ex.running else f"recording {role} verdict")
    if any(c.claiming for c in server.claimers):
        found.append("claim in flight")
    if not found:
        found.append("idle, tasks open" if sim._open else "idle, all done")
    return sorted(set(found))


def _record_label(record: Any) -> str:
    kind = record.kind.value
    if record.kind in (RecordKind.OUTCOME, RecordKind.HANDLER_END):
        if record.ok:
            return f"{kind} ok" + (" +spawned" if record.spawned else "")
        failure = record.failure.kind if record.failure is not None else "?"
        return f"{kind} failed ({failure})"
    return kind


def _op_label(op: Any, name: str) -> str:
    if isinstance(op, InsertRecord):
        return f"InsertRecord {_record_label(op.record)}"
    if isinstance(op, InsertTasks):
        origins = sorted({doc.origin.value if doc.origin else "?" for doc in op.docs})
        return f"InsertTasks {'+'.join(origins)}"
    if isinstance(op, SetStatus):
        return f"SetStatus {op.status.value}"
    return name


# --- patches ----------------------------------------------------------------------

_orig: dict[str, Any] = {}


def _patched_init(self: Simulation, *args: Any, **kwargs: Any) -> None:
    _orig["init"](self, *args, **kwargs)
    hits = _hits(self)
    if self.store._racy:
        hits.add(f"world: racy_updates={self.store._racy:g}")
    hits.add(f"world: {len(self._servers)} server(s)")


def _patched_apply(self: Simulation, schedule: Any) -> None:
    schedule = list(schedule)
    _orig["apply"](self, schedule)
    for fault in schedule:
        name = type(fault).__name__
        if isinstance(fault, F.ServerCrash | F.StepCrash | F.ServerStop):
            name += " (permanent)" if fault.restart_after is None else " (restart)"
        _hit(self, f"drawn: {name}")


def _patched_queue(self: Simulation, tasks: Any) -> list[str]:
    ids: list[str] = _orig["queue"](self, tasks)
    for task in [tasks] if not isinstance(tasks, list | tuple) else tasks:
        fields = task.fields
        if getattr(task, "_tullius_delay", None) or getattr(task, "_tullius_start_after", None):
            _hit(self, "work: delayed start")
        if "secs" in fields:
            if fields["secs"] > type(task).timeout.total_seconds():
                _hit(self, "work: run() times out (secs > timeout)")
            if fields["run_does"] != "ok":
                _hit(self, f"work: run() {fields['run_does']}")
            if fields["failed_does"] != "ok":
                _hit(self, f"work: failed() {fields['failed_does']}")
            if fields.get("failed_secs", 0) > 0:
                _hit(self, "work: failed() sleeps")
            if fields["successors"] > 0:
                _hit(self, "work: successors")
            if fields["retries"] > 0:
                _hit(self, "work: failed() returns replacements")
    return ids


def _patched_fire(self: Simulation, fault: Any) -> None:
    name = type(fault).__name__
    self.__dict__.setdefault("_cov_fired", []).append(fault)
    server = self._servers.get(getattr(fault, "server", None) or "", None)
    if not self._open:
        _hit(self, f"wasted: {name} fired with no task open")
    if isinstance(fault, F.WorkerCrash) and server is not None:
        busy = [ex for ex in server.execs if ex.running and ex.baton is not None]
        if fault.worker is not None:
            busy = [ex for ex in busy if ex.worker == fault.worker]
        if busy:
            ex = min(busy, key=lambda ex: ex.worker)
            role = "run()" if ex.job.kind is JobKind.RUN else "failed()"
            _hit(self, f"hit: WorkerCrash during {role}")
        else:
            _hit(self, "wasted: WorkerCrash with no busy worker")
    elif isinstance(fault, F.ServerCrash) and server is not None:
        how = "permanent" if fault.restart_after is None else "restart"
        for what in _activity(self, server):
            _hit(self, f"hit: ServerCrash ({how}) during {what}")
    elif isinstance(fault, F.ServerStop) and server is not None:
        how = "permanent" if fault.restart_after is None else "restart"
        if server.paused_until > self.clock.us:
            _hit(self, "hit: ServerStop sent while the server is paused")
        for what in _activity(self, server):
            _hit(self, f"hit: ServerStop ({how}) during {what}")
    elif isinstance(fault, F.ServerPause) and server is not None:
        if server.stopping is not None and server.up:
            _hit(self, "hit: ServerPause of a stopping server")
        now, until = self.clock.us, self.clock.us + to_us(fault.duration)
        long = fault.duration > self.timings.stale_after + self.timings.sweep
        for what in _activity(self, server):
            _hit(self, f"hit: ServerPause during {what}")
            if long and what in ("run()", "failed()"):
                _hit(self, f"hit: ServerPause longer than lease/2+sweep during {what}")
        for ex in server.execs:
            if ex.running and now < ex.deadline_us <= until:
                role = "run()" if ex.job.kind is JobKind.RUN else "failed()"
                _hit(self, f"hit: ServerPause spanning a {role} deadline")
        if len(self._servers) == 1:
            _hit(self, "note: ServerPause with no other server to sweep")
    elif isinstance(fault, F.ClockSkew):
        pending = _pending_due(self)
        _hit(self, "hit: ClockSkew" + (" with delayed/backoff work pending" if pending else ""))
    _orig["fire"](self, fault)


def _pending_due(sim: Simulation) -> bool:
    now = sim.clock.now()
    for view in sim.store.all_views():
        status = status_of(view)
        if status is Status.QUEUED and view.task.start_after > now:
            return True
        if status is Status.FAILED and view.handler_attempt:
            end = view.handler_end(view.handler_attempt)
            if end is not None and end.retry_at is not None and end.retry_at > now:
                return True
    return False


def _matching_fault(sim: Simulation, server: Server, op: Any, name: str) -> Any:
    """The armed fault `Scheduler._store_fault` will apply to ``op`` (same rule), if any."""
    for fault, _ in sim._armed_at.get((server.name, name), ()):
        if to_us(fault.at) > sim.clock.us:
            continue
        if fault.record_kind is not None and (
            not isinstance(op, InsertRecord) or op.record.kind.value != fault.record_kind
        ):
            continue
        return fault
    return None


def _patched_store_fault(self: Simulation, server: Server, op: Any, name: str) -> Any:
    fault = _matching_fault(self, server, op, name) if self._armed_at else None
    activity = _activity(self, server)
    result = _orig["store_fault"](self, server, op, name)
    if result is None:
        return None
    label = _op_label(op, name)
    _, error = result
    if error is None:  # a StepCrash
        how = "permanent" if fault is None or fault.restart_after is None else "restart"
        _hit(self, f"hit: StepCrash ({how}) after {label}")
        for what in activity:
            if what.startswith(("run()", "failed()")):
                _hit(self, f"hit: StepCrash while {what} runs on the server")
        return result
    if isinstance(fault, F.StoreFault):
        _hit(self, f"hit: StoreFault {fault.kind} on {label}")
        return result
    _hit(self, f"hit: StoreOutage refused {label}")
    for what in activity:
        _hit(self, f"hit: StoreOutage during {what}")
    return result


def _patched_log(self: Simulation, server: str, what: object) -> None:
    if isinstance(what, str):
        if what.startswith("sweep expired"):
            _hit(self, "outcome: a sweep declared a lease lost")
        elif what.startswith("lease lost: stopping"):
            _hit(self, "outcome: a heartbeat found its lease lost, user code stopped")
        elif what.endswith(" rejected"):
            _hit(self, "outcome: a late verdict was rejected")
        elif what.startswith("grace over: stopping"):
            role = "failed()" if ".failed() of" in what else "run()"
            _hit(self, f"outcome: a stop's grace ran out, {role} stopped (shutdown)")
        elif what.startswith("stopped without recording"):
            _hit(self, "outcome: a stopping server gave its last verdicts up")
        elif what.startswith("stopped: every verdict recorded"):
            _hit(self, "outcome: a stopped server exited cleanly")
    _orig["log"](self, server, what)


def _patched_set_status(self: MemoryStore, task_id: str, status: Status, due_at: Any) -> bool:
    sim = _STORE_OWNER.get(id(self))
    if sim is not None and self._racy and task_id in self._previous_status and self._rng:
        state = self._rng.getstate()
        races = self._rng.random() < self._racy
        self._rng.setstate(state)
        doc = self._tasks.get(task_id)
        if races and doc is not None:
            stale = self._previous_status[task_id]
            if stale != doc.status:
                _hit(sim, "hit: racy update checked a stale hint")
                if doc.status in TERMINAL and stale not in TERMINAL:
                    _hit(sim, "hit: racy update overwrote a terminal hint")
    return bool(_orig["set_status"](self, task_id, status, due_at))


_STORE_OWNER: dict[int, Simulation] = {}


def _patched_drain(self: Simulation, within: timedelta = timedelta(hours=1)) -> Any:
    _STORE_OWNER[id(self.store)] = self
    counts = _orig["drain"](self, within)
    _summarise(self, counts)
    return counts


def _summarise(sim: Simulation, counts: Any) -> None:
    span = next(b for b in (10, 20, 30, 60, 120, 300, 10**9) if counts.elapsed.total_seconds() < b)
    _hit(sim, f"timeline: drained within {span}s" if span < 10**9 else "timeline: took > 300s")
    for kind in counts.failures:
        _hit(sim, f"outcome: run failed as {kind}")
    for view in sim.store.all_views():
        status = status_of(view)
        if status is Status.UNHANDLED:
            _hit(sim, "outcome: a task ended unhandled")
        for n in range(1, view.handler_attempt + 1):
            end = view.handler_end(n)
            if end is not None and not end.ok and end.failure is not None:
                _hit(sim, f"outcome: failed() failed as {end.failure.kind}")
            if end is not None and end.ok and end.spawned:
                _hit(sim, "outcome: failed() replacements inserted")
        outcome = view.outcome
        if outcome is not None and outcome.ok and outcome.spawned:
            _hit(sim, "outcome: successors inserted")
    for armed in sim._armed_at.values():
        for fault, _ in armed:
            _hit(sim, f"wasted: {type(fault).__name__} armed, never matched")
    fired = sim.__dict__.get("_cov_fired", [])
    for fault in sim.faults:
        timed = isinstance(fault, F.WorkerCrash | F.ServerCrash | F.ServerPause | F.ClockSkew)
        if timed and not any(fault is f for f in fired):
            _hit(sim, f"wasted: {type(fault).__name__} never fired (the work was done)")
    hits = _hits(sim)
    if any(isinstance(f, F.StoreOutage) for f in sim.faults) and not any(
        label.startswith("hit: StoreOutage refused") for label in hits
    ):
        _hit(sim, "wasted: StoreOutage refused nothing")


def _patched_close(self: Simulation) -> None:
    """Count the simulation's hits (a set: once per simulation) into `HITS`."""
    hits = self.__dict__.pop("_cov_hits", None)
    if not self._check:  # a dry run (a test's fault-free run to find its timeline)
        SIMS[self.__dict__.get("_cov_test", _current["test"])] -= 1
    elif hits is not None:
        HITS[self.__dict__.get("_cov_test", _current["test"])].update(hits)
    _STORE_OWNER.pop(id(self.store), None)
    _orig["close"](self)


def install() -> None:
    """Patch the simulator for the rest of the process (idempotent)."""
    if _orig:
        return
    _orig.update(
        init=Simulation.__init__,
        apply=Simulation.apply,
        queue=Simulation.queue,
        fire=Simulation._fire,
        crash=Simulation._crash,
        store_fault=Simulation._store_fault,
        log=Simulation._log,
        drain=Simulation.drain,
        close=Simulation.close,
        set_status=MemoryStore.set_status,
    )
    Simulation.__init__ = _patched_init  # type: ignore[method-assign]
    Simulation.apply = _patched_apply  # type: ignore[method-assign]
    Simulation.queue = _patched_queue  # type: ignore[method-assign,assignment]
    Simulation._fire = _patched_fire  # type: ignore[method-assign]
    Simulation._store_fault = _patched_store_fault  # type: ignore[method-assign]
    Simulation._log = _patched_log  # type: ignore[method-assign]
    Simulation.drain = _patched_drain  # type: ignore[method-assign]
    Simulation.close = _patched_close  # type: ignore[method-assign]
    MemoryStore.set_status = _patched_set_status  # type: ignore[method-assign]


# --- pytest plugin -------------------------------------------------------------------

_json_path: dict[str, str | None] = {"path": None}


def pytest_configure(config: pytest.Config) -> None:
    install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _current["test"] = item.nodeid.rpartition("::")[2]
    try:
        return (yield)
    finally:
        _current["test"] = "(outside a test)"


def report() -> str:
    lines = []
    for test in sorted(SIMS):
        total = SIMS[test]
        lines.append(f"\n== {test}: {total} simulations")
        for label, count in sorted(HITS[test].items()):
            lines.append(f"  {count:5d}/{total:<5d} {100 * count / total:5.1f}%  {label}")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(report())
    if _json_path["path"]:
        Path(_json_path["path"]).write_text(
            json.dumps({t: {"sims": SIMS[t], "hits": dict(HITS[t])} for t in SIMS}, indent=1)
        )


def main(argv: list[str]) -> int:
    args = list(argv)
    if "--json" in args:
        index = args.index("--json")
        _json_path["path"] = args[index + 1]
        del args[index : index + 2]
    if not any(arg.startswith("tests") for arg in args):
        args += DEFAULT_TESTS
    return pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[sys.modules[__name__]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
