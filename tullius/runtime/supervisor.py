"""The tulliusd loop: claim work per band, hand it to worker processes, record how it ended.

Two threads, one rule each:

* the **main thread** owns the worker processes: it starts them (once per
  band slot, replacing the dead and recycling the tired), sends them jobs,
  reads their answers, and enforces deadlines by signalling process groups.
  It never waits on the store, so a database outage can't delay a kill.
* the **store threads** run every store conversation of ``engine.py`` with
  `engine.drive`: claims, finishes, renewals, sweeps and ``tullius.queue()``
  calls made by user code.  Several against a database (each conversation is
  correct against concurrent rivals); one for an embedded `MemoryStore`,
  which needs no lock then.

A store error ends a conversation; every write is idempotent, so the loop
simply runs it again later (a finished job's verdict is retried with the very
same event until it is accepted or rejected).  Nothing here decides a task's
fate: the machine does, through the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from tullius.api import insert_queued
from tullius.band import Band
from tullius.clock import Clock, SystemClock
from tullius.document import (
    Failure,
    FailureKind,
    Status,
    failure_from_bson,
    failure_to_bson,
    status_of,
    task_to_bson,
)
from tullius.engine import (
    CLAIM_READ,
    REUSE_CANDIDATES_FOR,
    Candidates,
    Job,
    JobKind,
    Verdict,
    claim_many,
    drive,
    finish,
    renew,
)
from tullius.errors import InvalidTransition, StoreError
from tullius.events import Event, Failed, HandlerFailed, HandlerSucceeded, Succeeded
from tullius.policy import LeaseTimings
from tullius.runtime.config import Settings
from tullius.runtime.mongo_store import redact, short_error
from tullius.runtime.slots import Counters, Finishing, Running, Slot, WorkerProcess
from tullius.runtime.store_thread import StoreThread
from tullius.runtime.sweeper import Sweeper
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store

log = logging.getLogger("tullius.daemon")

#: Seconds between SIGTERM and SIGKILL for a task past its deadline.
KILL_GRACE = 1.0
#: After shutdown's grace, how long to keep trying to record the last verdicts.
FINISH_GIVE_UP = 30.0
#: Store conversations in flight at once against a database (claims of one band
#: stay one at a time; finishes, renewals and sweeps overlap them).
STORE_THREADS = 4
#: Longest the loop sleeps when nothing is scheduled.
MAX_WAIT = 0.5

Observer = Callable[[Store], bool]


class Supervisor:
    """Runs the daemon until stopped; see the module docstring.

    Args:
        store: where tasks live (a `MongoStore`, or a `MemoryStore` when embedded).
        settings: validated settings.
        observer: called in the store thread after each verdict and every
            ``observe_every`` seconds; returning True stops the daemon (the demo).
        clock: wall-clock readings written into records.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        observer: Observer | None = None,
        observe_every: float = 0.1,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.server = settings.server_name
        self.timings = LeaseTimings(settings.lease)
        self.heartbeat = self.timings.heartbeat.total_seconds()
        self.clock = clock or SystemClock()
        self.rng = random.Random(os.urandom(16))
        self.sweeper = Sweeper(
            store, self.timings, server=self.server, clock=self.clock, rng=self.rng
        )
        self.observer = observer
        self.observe_every = observe_every
        self.counters = Counters()
        self.slots = [
            Slot(i, band, f"w{i}.{n}")
            for i, band in enumerate(settings.bands)
            for n in range(band.count)
        ]
        self._next_poll = [0.0] * len(settings.bands)
        self._band_claiming = [False] * len(settings.bands)
        self._candidates = [Candidates(REUSE_CANDIDATES_FOR) for _ in settings.bands]
        self._finishing: list[Finishing] = []
        self._retiring: list[tuple[WorkerProcess, float]] = []
        # MemoryStore is not thread-safe; a real database serves conversations in parallel.
        self._store_thread = StoreThread(1 if isinstance(store, MemoryStore) else STORE_THREADS)
        self._next_observe = 0.0
        self._observing = False
        self._stop_signals = 0
        self._stopping_since: float | None = None
        self._exit_code = 0
        self._store_down = False

    # --- public ----------------------------------------------------------------

    def request_stop(self, *, immediately: bool = False) -> None:
        """Stop claiming; running jobs get ``settings.grace`` (none if ``immediately``)."""
        self._stop_signals += 2 if immediately else 1
        self._wake()

    def run(self) -> int:
        """Run until stopped; return the exit status (0 clean, 1 verdicts left unrecorded)."""
        previous = self._install_signals()
        try:
            while not self._step():
                self._wait()
        finally:
            self._restore_signals(previous)
            self._shutdown_processes()
            self._store_thread.close()
        return self._exit_code

    # --- signals and waking ----------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop_signals += 1
            self._wake()

        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread (tests driving a Supervisor in a thread)
            return {}
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _wake(self) -> None:
        self._store_thread.wake()

    def _submit(self, work: Callable[[], Any], done: Callable[[Future[Any]], None]) -> None:
        self._store_thread.submit(work, done)

    # --- the loop ----------------------------------------------------------------

    def _step(self) -> bool:
        """One pass over everything; True when the daemon should exit."""
        now = time.monotonic()
        self._store_thread.collect()
        self._handle_stop(now)
        # Deadlines before results: a result read after the deadline is late, and
        # the task is stopped as timed out (run() may not take longer than timeout).
        self._enforce_deadlines(now)
        self._reap_and_spawn(now)
        self._read_workers(now)
        self._schedule_store_work(now)
        return self._finished(now)

    def _wait(self) -> None:
        now = time.monotonic()
        wake_at = now + MAX_WAIT
        for band_index, when in enumerate(self._next_poll):
            if not self._band_claiming[band_index] and self._has_idle(band_index):
                wake_at = min(wake_at, when)
        for slot in self.slots:
            if slot.worker is None:
                wake_at = min(wake_at, slot.next_spawn)
            running = slot.running
            if running is not None:
                if running.deadline is not None and running.kill_reason is None:
                    wake_at = min(wake_at, running.deadline)
                if running.term_sent_at is not None and not running.killed:
                    wake_at = min(wake_at, running.term_sent_at + KILL_GRACE)
                if not running.renewing:
                    wake_at = min(wake_at, running.next_renew)
        for item in self._finishing:
            if not item.submitted:
                wake_at = min(wake_at, item.next_try)
        if not self.sweeper.running:
            wake_at = min(wake_at, self.sweeper.next_at)
        if self._retiring:
            wake_at = min(wake_at, now + 0.05)
        handles: list[Any] = [self._store_thread.wake_fd]
        for slot in self.slots:
            if slot.worker is not None:
                handles.extend(slot.worker.wait_handles())
                if slot.worker.pidfd is None:
                    wake_at = min(wake_at, now + 0.05)  # no pidfd: poll for deaths
        timeout = max(0.0, wake_at - now)
        if timeout > 0:
            wait(handles, timeout)
        self._store_thread.drain()

    def _store_failed(self, what: str, error: BaseException) -> None:
        self.counters.store_errors += 1
        self.sweeper.outage()
        if not self._store_down:
            self._store_down = True
            log.warning("store unavailable (%s): %s; will keep retrying", what, short_error(error))
        else:
            log.info("store still unavailable (%s): %s", what, short_error(error))

    def _store_ok(self) -> None:
        if self._store_down:
            self._store_down = False
            log.warning("store reachable again")

    # --- workers -------------------------------------------------------------------

    def _reap_and_spawn(self, now: float) -> None:
        for slot in self.slots:
            worker = slot.worker
            if worker is not None and worker.exited() is not None:
                self._read_worker(slot, now)  # a result it sent before dying still counts
                if slot.worker is worker:
                    self._worker_died(slot, worker, now)
            wanted = not self._stopping or slot.running is not None
            if slot.worker is None and wanted and now >= slot.next_spawn:
                self._spawn(slot, now)
        still: list[tuple[WorkerProcess, float]] = []
        for worker, since in self._retiring:
            if worker.exited() is not None:
                worker.close()
            elif now - since > KILL_GRACE * 5:
                worker.signal_group(signal.SIGKILL)
                still.append((worker, since))
            else:
                still.append((worker, since))
        self._retiring = still

    def _spawn(self, slot: Slot, now: float) -> None:
        try:
            slot.worker = WorkerProcess(slot.name)
        except OSError as error:
            slot.spawn_failures += 1
            slot.next_spawn = now + min(0.1 * 2**slot.spawn_failures, 10.0)
            log.error("can't start a worker process for band %s: %s", slot.band, error)
            return
        log.info("worker %s started (pid %d)", slot.name, slot.worker.pid)

    def _worker_died(self, slot: Slot, worker: WorkerProcess, now: float) -> None:
        code = worker.exited()
        worker.close()
        slot.worker = None
        if not worker.ready:
            # Died before it could take work (broken environment?): back off.
            slot.spawn_failures += 1
            slot.next_spawn = now + min(0.1 * 2**slot.spawn_failures, 10.0)
            log.error("worker %s exited with status %s before it was ready", slot.name, code)
        running = slot.running
        if running is None or running.dispatched_at is None:
            return  # an undispatched job waits for the replacement worker
        slot.running = None
        job = running.job
        reason = running.kill_reason
        if reason == "abandoned":
            return
        role = "run()" if job.kind is JobKind.RUN else "failed()"
        if reason == "timeout":
            self.counters.timeouts += 1
            limit = (
                job.view.task.timeout if job.kind is JobKind.RUN else job.view.task.handler_timeout
            )
            failure = self._failure(
                FailureKind.TIMEOUT,
                f"{role} did not finish within its timeout of {limit.total_seconds():g}s; "
                "its process group was killed",
            )
        elif reason == "shutdown":
            failure = self._failure(
                FailureKind.SHUTDOWN,
                f"the daemon stopped (grace of {self.settings.grace:g}s over) "
                f"while {role} was running",
            )
        else:
            self.counters.crashes += 1
            how = (
                f"was killed by signal {-code}"
                if code is not None and code < 0
                else f"exited with status {code}"
            )
            failure = self._failure(FailureKind.CRASHED, f"the worker process running {role} {how}")
        log.info("task %s: %s", job.task_id, failure.message)
        self._add_finishing(job, _failure_event(job, failure), now)

    def _failure(self, kind: str, message: str) -> Failure:
        return Failure(kind=kind, message=message, at=self.clock.now(), server=self.server)

    def _read_worker(self, slot: Slot, now: float) -> None:
        worker = slot.worker
        while worker is not None and slot.worker is worker:
            try:
                if not worker.conn.poll():
                    break
                message = worker.conn.recv()
            except (EOFError, OSError):
                break  # it died; reaped on the next pass
            except Exception as error:  # e.g. a pickle naming a class we can't import
                log.error(
                    "worker %s sent a message that can't be read (%s: %s); replacing it",
                    slot.name,
                    type(error).__name__,
                    short_error(error),
                )
                worker.signal_group(signal.SIGKILL)
                break
            self._on_message(slot, worker, message, now)

    def _read_workers(self, now: float) -> None:
        for slot in self.slots:
            self._read_worker(slot, now)
        for slot in self.slots:
            running = slot.running
            if running is not None and running.dispatched_at is None:
                self._dispatch(slot, running, now)

    def _on_message(
        self, slot: Slot, worker: WorkerProcess, message: tuple[Any, ...], now: float
    ) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            slot.spawn_failures = 0
        elif kind == "queue":
            self._queue_for(worker, list(message[1]))
        elif kind == "done":
            self._job_done(slot, worker, message[1], now)
        else:
            log.error("worker %s sent an unknown message %r; replacing it", slot.name, kind)
            worker.signal_group(signal.SIGKILL)

    def _queue_for(self, worker: WorkerProcess, specs: list[Any]) -> None:
        def work() -> list[str]:
            return insert_queued(
                self.store, specs, now=self.clock.now(), new_id=lambda: uuid.uuid4().hex
            )

        def done(future: Future[Any]) -> None:
            error = future.exception()
            if error is None:
                self._store_ok()
                worker.send(("ids", future.result()))
                self._poll_soon()
            else:
                if isinstance(error, StoreError):
                    self._store_failed("queue", error)
                worker.send(("queue_error", redact(f"{type(error).__name__}: {error}")))

        self._submit(work, done)

    def _dispatch(self, slot: Slot, running: Running, now: float) -> None:
        worker = slot.worker
        if worker is None or not worker.ready:
            return
        job = running.job
        failure = job.view.outcome.failure if job.view.outcome is not None else None
        payload = {
            "kind": job.kind.value,
            "task": task_to_bson(job.view.task),
            "failure": None if failure is None else failure_to_bson(failure),
            "server": self.server,
        }
        if not worker.send(("job", payload)):
            return
        limit = job.view.task.timeout if job.kind is JobKind.RUN else job.view.task.handler_timeout
        running.dispatched_at = now
        running.deadline = now + limit.total_seconds()
        log.info("task %s: %s started in worker %s", job.task_id, job.kind.value, slot.name)

    def _job_done(
        self, slot: Slot, worker: WorkerProcess, result: dict[str, Any], now: float
    ) -> None:
        running = slot.running
        if running is None or running.dispatched_at is None:
            log.error("worker %s reported a result for no job; replacing it", slot.name)
            worker.signal_group(signal.SIGKILL)
            return
        if running.kill_reason is not None:
            return  # too late: we are already stopping it, and its death decides
        slot.running = None
        job = running.job
        worker.jobs_done += 1
        if result.get("ok"):
            specs = tuple(result.get("specs", ()))
            event: Event = (
                Succeeded(job.token, specs)
                if job.kind is JobKind.RUN
                else HandlerSucceeded(job.token, specs)
            )
        else:
            failure = failure_from_bson(result["failure"])
            failure = dataclasses.replace(
                failure,
                message=redact(failure.message),
                traceback=None if failure.traceback is None else redact(failure.traceback),
                server=self.server,
            )
            if failure.kind == FailureKind.UNLOADABLE:
                log.warning("task %s: %s", job.task_id, failure.message)
            event = _failure_event(job, failure)
        self._add_finishing(job, event, now)
        limit = self.settings.max_tasks_per_worker
        if self._stopping or (limit and worker.jobs_done >= limit):
            self._retire(slot, worker, now)

    def _retire(self, slot: Slot, worker: WorkerProcess, now: float) -> None:
        worker.send(("stop",))
        self._retiring.append((worker, now))
        slot.worker = None
        slot.next_spawn = now

    def _enforce_deadlines(self, now: float) -> None:
        for slot in self.slots:
            running, worker = slot.running, slot.worker
            if running is not None and running.dispatched_at is None:
                self._give_up_undispatched(slot, running, now)
                continue
            if running is None or worker is None or running.dispatched_at is None:
                continue
            if (
                running.kill_reason is None
                and running.deadline is not None
                and now >= running.deadline
            ):
                running.kill_reason = "timeout"
                self._terminate(worker, running, now)
            if (
                running.term_sent_at is not None
                and not running.killed
                and now >= running.term_sent_at + KILL_GRACE
            ):
                running.killed = True
                worker.signal_group(signal.SIGKILL)

    def _give_up_undispatched(self, slot: Slot, running: Running, now: float) -> None:
        """A job whose worker died before it started, and that no new worker could take
        within the job's own timeout plus a lease, fails as crashed (else it would stay
        claimed, its lease renewed, for as long as no worker can start)."""
        job = running.job
        limit = job.view.task.timeout if job.kind is JobKind.RUN else job.view.task.handler_timeout
        wait = limit.total_seconds() + self.timings.lease.total_seconds()
        if running.claimed_at is None or now < running.claimed_at + wait:
            return
        slot.running = None
        self.counters.crashes += 1
        role = "run()" if job.kind is JobKind.RUN else "failed()"
        failure = self._failure(
            FailureKind.CRASHED,
            f"the worker process claimed to run {role} died before it started, and no "
            f"worker process could be started within {wait:g}s (its timeout and a lease)",
        )
        log.warning("task %s: %s", job.task_id, failure.message)
        self._add_finishing(job, _failure_event(job, failure), now)

    def _terminate(self, worker: WorkerProcess, running: Running, now: float) -> None:
        log.info("task %s: stopping its worker (%s)", running.job.task_id, running.kill_reason)
        running.term_sent_at = now
        worker.signal_group(signal.SIGTERM)

    # --- store work ------------------------------------------------------------------

    def _schedule_store_work(self, now: float) -> None:
        self._schedule_finishes(now)
        self._schedule_renewals(now)
        if not self._stopping:
            self._schedule_claims(now)
        if not self.sweeper.running and now >= self.sweeper.next_at:
            self._schedule_sweep()
        if self.observer is not None and not self._observing and now >= self._next_observe:
            self._schedule_observe(now)

    def _has_idle(self, band_index: int) -> bool:
        return any(s.band_index == band_index and s.idle for s in self.slots)

    def _poll_soon(self) -> None:
        self._next_poll = [0.0] * len(self._next_poll)

    def _schedule_claims(self, now: float) -> None:
        for band_index, band in enumerate(self.settings.bands):
            if self._band_claiming[band_index] or now < self._next_poll[band_index]:
                continue
            idle = [s for s in self.slots if s.band_index == band_index and s.idle]
            if idle:
                self._claim_for(idle, band, band_index)

    def _claim_for(self, slots: list[Slot], band: Band, band_index: int) -> None:
        """Claim work for every idle slot of a band in one store conversation."""
        for slot in slots:
            slot.claiming = True
        self._band_claiming[band_index] = True
        workers = [(slot.name, uuid.uuid4().hex) for slot in slots]
        started = time.monotonic()
        candidates = self._candidates[band_index]

        def work() -> list[Job]:
            return drive(
                self.store,
                claim_many(
                    band,
                    server=self.server,
                    workers=workers,
                    now=self.clock.now(),
                    rng=self.rng,
                    batch=CLAIM_READ,
                    candidates=candidates,
                ),
            )

        def done(future: Future[Any]) -> None:
            for slot in slots:
                slot.claiming = False
            self._band_claiming[band_index] = False
            now = time.monotonic()
            error = future.exception()
            if error is not None:
                candidates.forget()
                self._next_poll[band_index] = now + 1.0
                if isinstance(error, StoreError):
                    self._store_failed("claim", error)
                else:  # e.g. a task document that can't be decoded: keep the daemon up
                    log.error(
                        "claiming work for band %s failed: %s: %s",
                        band,
                        type(error).__name__,
                        short_error(error),
                    )
                return
            self._store_ok()
            jobs: list[Job] = future.result()
            by_worker = {job.lease.worker: job for job in jobs}
            for slot in slots:
                job = by_worker.get(slot.name)
                if job is None:
                    continue
                self.counters.claimed += 1
                slot.running = Running(job, next_renew=now + self.heartbeat, claimed_at=now)
                self._dispatch(slot, slot.running, now)
            if len(jobs) < len(slots):
                # The period counts from the start of this look, so an idle daemon looks
                # every poll_interval however long a look takes (pickup latency).
                self._next_poll[band_index] = started + self.settings.poll_interval
            else:
                self._next_poll[band_index] = now  # there may be more for slots freed meanwhile

        self._submit(work, done)

    def _add_finishing(self, job: Job, event: Event, now: float) -> None:
        self._finishing.append(Finishing(job, event, next_try=now))

    def _schedule_finishes(self, now: float) -> None:
        for item in self._finishing:
            if not item.submitted and now >= item.next_try:
                self._submit_finish(item)

    def _submit_finish(self, item: Finishing) -> None:
        item.submitted = True

        def work() -> Verdict:
            return drive(
                self.store, finish(item.job, item.event, now=self.clock.now(), rng=self.rng)
            )

        def done(future: Future[Any]) -> None:
            item.submitted = False
            error = future.exception()
            if isinstance(error, StoreError):
                self._store_failed("record a verdict", error)
                item.next_try = time.monotonic() + item.delay
                item.delay = min(item.delay * 2, 5.0)
                return
            self._finishing.remove(item)
            if isinstance(error, InvalidTransition):
                self.counters.rejected += 1
                log.warning("task %s: result not recorded: %s", item.job.task_id, error)
                return
            if error is not None:  # a bug in the engine or the store: report, keep running
                log.error("task %s: recording its verdict failed: %r", item.job.task_id, error)
                return
            self._store_ok()
            self._verdict(item, future.result())

        self._submit(work, done)

    def _verdict(self, item: Finishing, verdict: Verdict) -> None:
        job = item.job
        if not verdict.accepted:
            self.counters.rejected += 1
            log.warning(
                "task %s: our result came too late; the store already says %s",
                job.task_id,
                verdict.record.kind.value,
            )
            return
        self.counters.accepted += 1
        status = status_of(verdict.view)
        if status is Status.UNHANDLED:
            log.warning(
                "task %s (%s): failed() failed on every attempt; left UNHANDLED for an operator",
                job.task_id,
                job.view.task.class_name,
            )
        else:
            log.info("task %s: %s", job.task_id, status.value)
        self._poll_soon()  # successors or replacements may be due right away
        self._next_observe = 0.0

    def _schedule_renewals(self, now: float) -> None:
        for slot in self.slots:
            running = slot.running
            if running is not None and not running.renewing and now >= running.next_renew:
                self._submit_renew(slot, running)

    def _submit_renew(self, slot: Slot, running: Running) -> None:
        running.renewing = True

        def done(future: Future[Any]) -> None:
            running.renewing = False
            now = time.monotonic()
            error = future.exception()
            if error is not None:
                if isinstance(error, StoreError):
                    self._store_failed("renew a lease", error)
                else:
                    log.error("renewing the lease of %s failed: %r", running.job.task_id, error)
                running.next_renew = now + min(self.heartbeat, 1.0)
                return
            self._store_ok()
            running.next_renew = now + self.heartbeat
            if future.result() or slot.running is not running:
                return
            log.warning("task %s: another server ended our lease; stopping it", running.job.task_id)
            if running.dispatched_at is None:
                slot.running = None
            elif running.kill_reason is None:
                running.kill_reason = "abandoned"
                running.term_sent_at = now
                running.killed = True
                if slot.worker is not None:
                    slot.worker.signal_group(signal.SIGKILL)

        self._submit(lambda: drive(self.store, renew(running.job)), done)

    def _schedule_sweep(self) -> None:
        own = frozenset(
            [s.running.job.token for s in self.slots if s.running is not None]
            + [item.job.token for item in self._finishing]
        )

        def done(future: Future[Any]) -> None:
            outcome = self.sweeper.finished(future)
            if isinstance(outcome, StoreError):
                self._store_failed("sweep", outcome)
                return
            if isinstance(outcome, BaseException):
                log.error("sweep failed: %s: %s", type(outcome).__name__, short_error(outcome))
                return
            self._store_ok()
            if outcome.expired:
                log.warning(
                    "failed as lost (their server stopped renewing): %s", ", ".join(outcome.expired)
                )
                self._poll_soon()
            if outcome.repaired:
                log.info("repaired hints of %d task(s)", len(outcome.repaired))

        self._submit(self.sweeper.work(own), done)

    def _schedule_observe(self, now: float) -> None:
        observer = self.observer
        assert observer is not None
        self._observing = True

        def done(future: Future[Any]) -> None:
            self._observing = False
            self._next_observe = time.monotonic() + self.observe_every
            error = future.exception()
            if error is None and future.result() and not self._stopping:
                log.info("observer is satisfied; stopping")
                self.request_stop()
            elif error is not None and not isinstance(error, StoreError):
                log.error("observer failed: %r", error)

        self._submit(lambda: observer(self.store), done)

    # --- stopping ----------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self._stopping_since is not None

    def _handle_stop(self, now: float) -> None:
        if self._stop_signals == 0:
            return
        if self._stopping_since is None:
            self._stopping_since = now
            log.info("stopping: no new work; running tasks get %gs", self.settings.grace)
            for slot in self.slots:
                if slot.worker is not None and slot.running is None and not slot.claiming:
                    self._retire(slot, slot.worker, now)
        over = self._stop_signals > 1 or now >= self._stopping_since + self.settings.grace
        for slot in self.slots:
            running = slot.running
            if slot.running is None and slot.worker is not None and not slot.claiming:
                self._retire(slot, slot.worker, now)
            if running is None or not over:
                continue
            if running.dispatched_at is None:
                slot.running = None
                failure = self._failure(
                    FailureKind.SHUTDOWN, "the daemon stopped before the job started"
                )
                self._add_finishing(running.job, _failure_event(running.job, failure), now)
            elif running.kill_reason is None and slot.worker is not None:
                running.kill_reason = "shutdown"
                self._terminate(slot.worker, running, now)

    def _finished(self, now: float) -> bool:
        if self._stopping_since is None:
            return False
        busy = any(s.running is not None or s.claiming or s.worker is not None for s in self.slots)
        if busy or self._retiring:
            return False
        if self._finishing:
            give_up = self._stopping_since + self.settings.grace + KILL_GRACE + FINISH_GIVE_UP
            if now < give_up:
                return False
            ids = ", ".join(item.job.task_id for item in self._finishing)
            log.error(
                "stopped without recording the outcome of %s (store unreachable); "
                "another daemon will fail them as lost when their leases expire",
                ids,
            )
            self._exit_code = 1
            return True
        return self._store_thread.idle

    def _shutdown_processes(self) -> None:
        """Nothing outlives the daemon: kill every worker group still around."""
        workers = [s.worker for s in self.slots if s.worker is not None]
        workers += [w for w, _ in self._retiring]
        for worker in workers:
            worker.signal_group(signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=5)
            worker.close()


def _failure_event(job: Job, failure: Failure) -> Event:
    return (
        Failed(job.token, failure) if job.kind is JobKind.RUN else HandlerFailed(job.token, failure)
    )
