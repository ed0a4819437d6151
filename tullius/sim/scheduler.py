"""The simulator's scheduler: one heap of events, store operations with faults, checks.

How a simulation runs:

1. Every actor's store operation is one scheduler event.  Events due at the
   same virtual instant are ordered by a draw from the seeded ``rng``, so the
   seed chooses the interleaving of servers, and the same seed replays it.
2. Before an operation is carried out, faults aimed at it apply: an outage or
   a ``not_applied`` fault raises `StoreError` into the conversation without
   touching the store; ``lost_ack`` applies it, then raises.  The driver runs
   the conversation again later with the same token and event, as the daemon.
3. After each write, the touched task is re-read and the invariants checked.
4. The loop runs on pool threads (`tullius.sim.threads`), one at a time,
   while ``run_for`` waits; user code runs on the loop's thread until it
   sleeps.  A sleep becomes an event at its wake-up time, or at the deadline
   if that comes first (a tie goes to the deadline: a run still going at its
   deadline has timed out).

`Scheduler` is a mixin of `tullius.sim.simulation.Simulation`, which sets
its state up and owns the public API; the actors it runs are in
`tullius.sim.world`, the faults it fires at whole servers in
`tullius.sim.server_events`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

from tullius.api import insert_queued
from tullius.document import TERMINAL, RecordKind, TaskSpec, TaskView, keyed_task_id, spawned_of
from tullius.effects import InsertRecord, InsertTasks
from tullius.errors import StoreError, StoreUnavailable
from tullius.sim.clock import to_us
from tullius.sim.faults import Fault, StepCrash
from tullius.sim.invariants import InvariantViolation, NoTimePasses
from tullius.sim.memory_store import MemoryStore
from tullius.sim.server_events import ServerEvents
from tullius.sim.world import (
    ACTOR,
    FAULT,
    NAP,
    OP,
    WAKE,
    Actor,
    ActorGen,
    Claimer,
    Nap,
    RunUser,
    Server,
    StartJobs,
    Wait,
    describe_op,
)
from tullius.store import PERFORMERS, Operation, operation_name, perform

_NO_CHECK: Final = frozenset({"Load", "LoadMany", "FindDue", "FindByStatus", "Beat", "SetStatus"})

# Read after every write: module globals, not ``RecordKind.RUN`` (the enum
# metaclass's ``__getattr__``, ~75 ns on 3.11).
_RUN_RECORD, _HANDLER_RECORD = RecordKind.RUN, RecordKind.HANDLER

#: One scheduled event on the heap: (time, random tie-break, sequence, kind, target, value).
HeapEntry = tuple[int, int, int, int, Any, Any]


class Scheduler(ServerEvents):
    """Runs events in virtual-time order; carries out store operations with faults
    and checks the invariants after each write."""

    seed: int
    faults: list[Fault]
    _heap: list[HeapEntry]
    _tiebreak: Callable[[int], int]
    _seq: int
    _end: int
    _drain: bool
    _perform: dict[type[Any], tuple[Callable[[Any], Any], str, bool]]
    # Armed store faults, [fault, remaining], by (server, operation) in arming
    # order: an operation looks only at the faults aimed at it (the first live
    # one applies).
    _armed_at: dict[tuple[str, str], list[list[Any]]]
    _outages: list[tuple[int, int, str | None]]
    _faults_end_us: int
    _open: set[str]
    _leases: dict[str, tuple[str, int, int]]
    _leases_of: dict[str, set[str]]  # task id -> its record ids in _leases
    _tail: deque[tuple[int, str, object]]
    _trace: list[tuple[int, str, object]] | None
    _task_counter: int

    # --- events -------------------------------------------------------------------

    def _push(self, t: int, kind: int, target: Any, value: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._tiebreak(30), self._seq, kind, target, value))

    def _loop(self) -> None:
        """The scheduler's loop, run by a pool thread until the run's end.

        A pool thread may leave it while user code it called sleeps, and carry on
        later from where it left it, in a later run: so everything it reads comes
        from ``self`` (the locals below are the same objects for the whole life of
        the simulation), and the checks come first in each round.
        """
        heap = self._heap
        clock = self.clock
        heappop = heapq.heappop
        inv = self._inv
        pool = self._pool
        do_op, advance = self._do_op, self._advance
        while True:
            if inv.violation is not None:
                raise self._violation()
            if pool.interrupted:
                pool.interrupted = False
                raise KeyboardInterrupt
            if not self.events & 1023:  # the CPU may have got busy: see `SharedCpu`
                pool.cpu.check()
            if not heap or heap[0][0] > self._end or (self._drain and not self._open):
                return
            t, _, _, kind, target, value = heappop(heap)
            if t > clock.us:
                clock.us = t
            self.events += 1
            if kind <= ACTOR:
                if self._held_back(target, t, kind, target, value):
                    continue
                if kind == OP:
                    do_op(target, value)
                else:
                    advance(target, value)
            elif kind == WAKE:
                self._wake(target, value)
            elif kind == NAP:
                self._end_nap(target, value, t)
            elif kind == FAULT:
                self._fire(target)
            else:
                self._restart(target)

    def _log(self, server: str, what: object) -> None:
        # ``what`` is a line, or a store operation formatted only when read
        entry = (self.clock.us, server, what)
        self._tail.append(entry)
        if self._trace is not None:
            self._trace.append(entry)

    def _violation(self) -> InvariantViolation:
        violation = self._inv.violation
        assert violation is not None
        return InvariantViolation(
            violation.promise,
            violation.detail,
            self.seed,
            self.faults,
            [trace_line(entry) for entry in self._tail],
        )

    def _spawn(self, server: Server, gen: ActorGen, name: str, at: int | None = None) -> Actor:
        actor = Actor(gen, server, name)
        self._push(self.clock.us if at is None else at, ACTOR, actor, None)
        return actor

    def _advance(self, actor: Actor, value: Any, error: BaseException | None = None) -> None:
        try:
            cmd = actor.gen.send(value) if error is None else actor.gen.throw(error)
        except StopIteration:
            return
        kind = type(cmd)
        if kind is Wait:
            self._push(self.clock.us + cmd.us, ACTOR, actor, None)
        elif kind is RunUser:
            cmd.ex.actor = actor
            self._start_user(cmd.ex)
        elif kind is StartJobs:
            # The claimer goes on to its next command, then the jobs start in turn
            # (each runs its user code here until it ends or sleeps).  A sleep moves
            # the loop to another thread, which first makes the jobs not started yet
            # events of their own (`_moved`): after a start, this frame may be
            # resumed much later, and must find nothing left to do (see `_loop`).
            self._advance(actor, None)
            starting = self._starting
            starting.extend(cmd.actors)
            try:
                while starting:
                    self._advance(starting.popleft(), None)
            finally:  # an error left jobs unstarted: they start as events (if ever run again)
                self._start_later()
        elif kind is Nap:
            claimer = cmd.claimer
            if actor.server.stopping is not None:  # a stop ends the claim loop at its nap
                actor.gen.close()
                self._claimer_ended(actor.server, claimer)
                return
            claimer.nap += 1
            claimer.napping = True
            if cmd.us is not None:
                self._push(self.clock.us + cmd.us, NAP, claimer, claimer.nap)
        else:
            self._push(self.clock.us, OP, actor, cmd)

    def _end_nap(self, claimer: Claimer, nap: int, t: int) -> None:
        """A claimer's nap is over (its time came, or it was poked), unless it is stale."""
        actor = claimer.actor
        if nap != claimer.nap or not claimer.napping or actor is None:
            return
        if self._held_back(actor, t, NAP, claimer, nap):
            return
        claimer.napping = False
        self._advance(actor, None)

    def _held_back(self, actor: Actor, t: int, kind: int, target: Any, value: Any) -> bool:
        """Whether an event of ``actor``'s can't happen at ``t``: its server crashed since
        (the actor dies with it) or is paused (the event waits for the pause's end)."""
        server = actor.server
        if actor.epoch != server.epoch:
            actor.gen.close()
            return True
        if server.paused_until > t:
            self._push(server.paused_until, kind, target, value)
            return True
        return False

    def _do_op(self, actor: Actor, op: Operation) -> None:
        server = actor.server
        how = self._perform.get(type(op))
        if how is None:  # a subclass of an operation: `perform` finds its kind
            name = operation_name(op)
            how = (lambda op: perform(self.store, op), name, name not in _NO_CHECK)
        do, name, tracked = how
        entry = (self.clock.us, server.name, op)  # as `_log`, without a call per operation
        self._tail.append(entry)
        if self._trace is not None:
            self._trace.append(entry)
        error = self._store_fault(server, op, name) if self._outages or self._armed_at else None
        if error is not None and not error[0]:
            assert error[1] is not None
            self._store_failed(server, error[1], op)
            self._advance(actor, None, error[1])
            return
        result = do(op)
        if tracked:
            self._after_write(op, result)
        if error is not None:
            if error[1] is None:  # a StepCrash: no reply, no server
                return
            self._store_failed(server, error[1], op)
            self._advance(actor, None, error[1])
        else:
            self._store_answered(server)  # as the daemon's `WatchedStore` (`LeaseWatch`)
            self._advance(actor, result)

    def _store_fault(
        self, server: Server, op: Operation, name: str
    ) -> tuple[bool, StoreError | None] | None:
        """The fault hitting this operation: (applied?, the error to raise, or None for a
        `StepCrash`, which kills the server once the operation is applied)."""
        now = self.clock.us
        if self._outages and self._outages[0][1] <= now:  # (sorted by their end)
            # Ended outages never apply again (time never goes back): dropped, so that
            # once every fault is over `_do_op` no longer calls this.
            self._outages = [outage for outage in self._outages if outage[1] > now]
        for start, end, target in self._outages:
            if start <= now < end and target in (None, server.name):
                self._log(server.name, f"store outage: {name} refused")
                return False, StoreUnavailable(name, "simulated outage")
        key = (server.name, name)
        for armed in self._armed_at.get(key, ()):
            fault = armed[0]
            if to_us(fault.at) > now:
                continue
            if fault.record_kind is not None and (
                not isinstance(op, InsertRecord) or op.record.kind.value != fault.record_kind
            ):
                continue
            armed[1] -= 1
            if armed[1] <= 0:
                self._disarm(key, armed)
            self._faults_end_us = max(self._faults_end_us, now)
            if isinstance(fault, StepCrash):
                self._log(server.name, f"{fault!r}: dies after this {name}")
                restart = fault.restart_after
                self._crash(server, None if restart is None else now + to_us(restart))
                return True, None
            applied = fault.kind == "lost_ack"
            self._log(server.name, f"store fault {fault.kind}: {name}")
            detail = "write applied, acknowledgement lost" if applied else "write not applied"
            return applied, StoreError(f"simulated store fault on {name}: {detail}")
        return None

    def _disarm(self, key: tuple[str, str], armed: list[Any]) -> None:
        """Forget a used-up store fault: once every one is (and the outages are over),
        `_do_op` no longer looks for faults at all."""
        armed_here = self._armed_at[key]
        armed_here.remove(armed)
        if not armed_here:
            del self._armed_at[key]

    def _after_write(self, op: Operation, result: Any) -> None:
        if isinstance(op, InsertRecord):
            record = op.record
            view = self.store.load(record.task_id)
            if result.token == record.token and (
                record.kind is _RUN_RECORD or record.kind is _HANDLER_RECORD
            ):
                assert view is not None
                timeout = (
                    view.task.timeout if record.kind is _RUN_RECORD else view.task.handler_timeout
                )
                self._leases[record.record_id] = (record.task_id, self.clock.us, to_us(timeout))
                self._leases_of.setdefault(record.task_id, set()).add(record.record_id)
            self._refresh(record.task_id, view)
        elif isinstance(op, InsertTasks):
            parents: set[str] = set()
            for doc in op.docs:
                if doc.task_id not in self._inserted:
                    self._inserted[doc.task_id] = self.events
                    self._open.add(doc.task_id)
                    if doc.parent_id is not None:
                        self._count_generation(doc.task_id, doc.parent_id)
                if doc.parent_id is not None:
                    parents.add(doc.parent_id)
            if self._check:
                self._inv.on_tasks_inserted(op.docs, self.store.insert_counts, self.store.load)
            for parent in parents:
                self._refresh(parent)

    def _count_generation(self, task_id: str, parent_id: str) -> None:
        """Count the tasks that followed one another at this instant; at the
        simulation's ``instant_chain_limit``, raise `NoTimePasses` instead of spinning."""
        now = self.clock.us
        if now != self._same_instant_at:  # only this instant's tasks can be a parent here
            self._same_instant_at = now
            self._same_instant.clear()
        generations = self._same_instant.get(parent_id, 0) + 1
        self._same_instant[task_id] = generations
        if generations >= self._instant_chain_limit:
            at = timedelta(microseconds=now)
            raise NoTimePasses(task_id, generations, at, self.seed)

    def _refresh(self, task_id: str, view: TaskView | None = None) -> None:
        """Track a task after a write to it: the invariants, its live lease, and whether
        it is open.  ``view``: the task as loaded after the write, if already at hand."""
        if view is None:
            view = self.store.load(task_id)
            if view is None:
                return
        status = self._inv.on_status(view)
        leases = self._leases_of.get(task_id)
        if leases:
            # Forget the task's leases that ended: every one but its live lease.
            lease = view.current_lease()
            live = None if lease is None else lease.record_id
            for record_id in [r for r in leases if r != live]:
                del self._leases[record_id]
                leases.discard(record_id)
            if not leases:
                del self._leases_of[task_id]
        if status in TERMINAL:
            inserted = self.store.insert_counts
            if all(d.task_id in inserted for d in spawned_of(view)):
                self._open.discard(task_id)
                return
        self._open.add(task_id)

    def _insert_roots(
        self,
        specs: tuple[TaskSpec, ...] | list[TaskSpec],
        now: datetime,
        key: str | None = None,
    ) -> list[str]:
        if key is None:
            ids = []
            for _ in specs:
                self._task_counter += 1
                ids.append(f"t{self._task_counter}-{self.rng.getrandbits(32):08x}")
        else:
            ids = [keyed_task_id(key, index) for index in range(len(specs))]
        counts = self.store.insert_counts
        before = {task_id: counts.get(task_id, 0) for task_id in ids}
        fresh = iter(ids)
        try:
            insert_queued(self.store, specs, now=now, new_id=fresh.__next__, key=key)
        finally:
            # Only what this call stored is new: an insert that raised part-way once
            # left ids open that no task had, and every later drain failed on them;
            # and a keyed call repeated finds its tasks stored (perhaps finished).
            stored = [task_id for task_id in ids if counts.get(task_id, 0) > before[task_id]]
            self._inv.roots.update(stored)
            for task_id in stored:
                self._inserted[task_id] = self.events
                self._open.add(task_id)
        self._log("app", f"queued {','.join(ids)}" + ("" if key is None else f" key={key!r}"))
        return ids

    # --- checks -------------------------------------------------------------------

    def _check_liveness(self) -> None:
        if self._check and any(s.up for s in self._servers.values()):
            slack = to_us(self.timings.lease) + 2 * self._sweep_us + self._poll_us + self._retry_us
            for record_id, (_task, start, timeout) in self._leases.items():
                since = max(start, self._faults_end_us)
                if self.clock.us - since > timeout + self._grace_us + slack:
                    self._inv.fail(
                        "terminal within the bound after faults stop",
                        f"lease {record_id!r} has been live since {start / 1e6:.3f}s",
                    )
        if self._inv.violation is not None:
            raise self._violation()


def bind_performers(store: MemoryStore) -> dict[type[Any], tuple[Callable[[Any], Any], str, bool]]:
    """`tullius.store.PERFORMERS` bound to ``store``, with each operation's name
    (`operation_name`, what faults aim at) and whether `Scheduler._after_write`
    tracks it (not in `_NO_CHECK`): one lookup per operation, and the simulator
    performs tens of thousands per second."""
    return {
        kind: (partial(do, store), kind.__name__, kind.__name__ not in _NO_CHECK)
        for kind, do in PERFORMERS.items()
    }


def trace_line(entry: tuple[int, str, object]) -> str:
    what = entry[2] if isinstance(entry[2], str) else describe_op(entry[2])
    return f"{entry[0] / 1e6:12.6f}s {entry[1]:<8} {what}"
