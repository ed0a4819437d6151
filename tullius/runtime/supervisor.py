"""The tulliusd loop: claim work per band, hand it to worker processes, record how it ended.

Two threads, one rule each:

* the **main thread** owns the worker processes: it starts them (once per
  band slot, replacing the dead and recycling the tired), sends them jobs,
  reads their answers, and enforces deadlines by signalling process groups
  (`tullius.runtime.processes`).  It never waits on the store, so a database
  outage can't delay a kill.
* the **store threads** run every store conversation of ``engine.py`` with
  `engine.drive`: claims, finishes, renewals, sweeps, coverage checks
  (`tullius.coverage`), prunes with ``--keep-finished`` (`runtime.pruner`)
  and ``tullius.queue()`` calls made by user code.
  Several against a database (each conversation is correct against
  concurrent rivals); one for an embedded `MemoryStore`, which needs no
  lock then.

A store error ends a conversation; every write is idempotent, so the loop
simply runs it again later (a finished job's verdict is retried with the very
same event until it is accepted or rejected).  Nothing here decides a task's
fate: the machine does, through the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from tullius import policy
from tullius.api import insert_queued
from tullius.band import Band, format_priority
from tullius.clock import Clock, SystemClock, window_seconds
from tullius.document import (
    FailureKind,
    Status,
    describe_lease,
    short_name,
    status_of,
)
from tullius.engine import (
    CLAIM_READ,
    REUSE_CANDIDATES_FOR,
    Candidates,
    ClaimInterrupted,
    Job,
    Verdict,
    claim_many,
    drive,
    finish,
    renew,
)
from tullius.errors import (
    InvalidTransition,
    KeyConflict,
    StoreError,
    StoreUnavailable,
    WriteWindowClosed,
)
from tullius.events import Event, Failed, HandlerFailed
from tullius.policy import WRITE_WINDOW, LeaseTimings, verdict_window
from tullius.runtime.config import Settings
from tullius.runtime.coverage_check import CoverageCheck
from tullius.runtime.mongo_store import redact, short_error
from tullius.runtime.processes import KILL_GRACE, WorkerKeeping, failure_event
from tullius.runtime.pruner import Pruner
from tullius.runtime.slots import Counters, Finishing, Running, Slot, WorkerProcess
from tullius.runtime.store_thread import StoreThread
from tullius.runtime.store_watch import WatchedStore
from tullius.runtime.sweeper import Sweeper
from tullius.sim.memory_store import MemoryStore
from tullius.store import Store

log = logging.getLogger("tullius.daemon")

#: After shutdown's kills, seconds to keep trying to record the last verdicts
#: (`tullius.policy.FINISH_GIVE_UP`).
FINISH_GIVE_UP = policy.FINISH_GIVE_UP.total_seconds()
#: Store conversations in flight at once against a database (claims of one band
#: stay one at a time; finishes, renewals and sweeps overlap them).
STORE_THREADS = 4
#: Longest the loop sleeps when nothing is scheduled.
MAX_WAIT = 0.5

Observer = Callable[[Store], bool]


def _queued(verdict: Verdict) -> str:
    """What a success or a handled failure queued, for its log line: an operator
    following a chain (a replacement at a priority no band takes) needs the ids."""
    spawned = verdict.record.spawned
    if not spawned:
        return ""
    shown = ", ".join(
        f"{short_name(doc.class_name)} {doc.task_id} (priority {format_priority(doc.priority)})"
        for doc in spawned[:5]
    )
    more = f" and {len(spawned) - 5} more" if len(spawned) > 5 else ""
    return f"; queued {shown}{more}"


class Supervisor(WorkerKeeping):
    """Runs the daemon until stopped; see the module docstring.

    Args:
        store: where tasks live (a `MongoStore`, or a `MemoryStore` when embedded).
        settings: validated settings.
        observer: called in the store thread after each verdict and every
            ``observe_every`` seconds; returning True stops the daemon (the demo).
        clock: wall-clock readings written into records.
        write_clock: what write windows are judged by (`Running.write_by`).
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        observer: Observer | None = None,
        observe_every: float = 0.1,
        clock: Clock | None = None,
        write_clock: Callable[[], float] = window_seconds,
    ) -> None:
        self.settings = settings
        self.server = settings.server_name
        self.timings = LeaseTimings(settings.lease)
        watch = self.timings.watch()
        #: Every call of ours to the store is reported to the sweeps' watch (but
        #: the observer's, which gets the store as given).
        self.store: Store = WatchedStore(store, watch)
        self._given_store = store
        self.heartbeat = self.timings.heartbeat.total_seconds()
        self.clock = clock or SystemClock()
        self.write_clock = write_clock
        self.rng = random.Random(os.urandom(16))
        self.sweeper = Sweeper(
            self.store,
            self.timings,
            server=self.server,
            clock=self.clock,
            rng=self.rng,
            write_clock=write_clock,
            watch=watch,
        )
        self.coverage = CoverageCheck(
            self.store,
            server=self.server,
            bands=tuple(settings.bands),
            every=self.timings.coverage_check,
            clock=self.clock,
        )
        self.pruner = (
            None
            if settings.keep_finished is None
            else Pruner(
                self.store,
                keep=settings.keep_finished,
                unhandled=settings.prune_unhandled,
                clock=self.clock,
                rng=self.rng,
            )
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
        self._candidates = [
            Candidates(REUSE_CANDIDATES_FOR, unsure_for=settings.lease) for _ in settings.bands
        ]
        #: Tokens of claims on the store thread: their leases may already be stored.
        self._claim_tokens: set[str] = set()
        self._finishing: list[Finishing] = []
        self._retiring: list[tuple[WorkerProcess, float]] = []
        # MemoryStore is not thread-safe; a real database serves conversations in parallel.
        self._store_thread = StoreThread(1 if isinstance(store, MemoryStore) else STORE_THREADS)
        self._next_observe = 0.0
        self._observing = False
        self._stop_signals = 0
        self._stopping_since: float | None = None
        #: When running tasks started to be killed: the grace ran out, or a second
        #: stop signal cut it short (then ``_grace_skipped``).
        self._killing_since: float | None = None
        self._grace_skipped = False
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
        if self._exit_code == 0 and not self._store_down:
            self._say_stopped()
        if self._stop_signals and self._exit_code == 0:
            given_up = self.counters.given_up
            log.info(
                "stopped: every verdict recorded"
                + (f", but {given_up} given up past the write window" if given_up else "")
            )
        return self._exit_code

    def _say_stopped(self) -> None:
        """Mark our entry stopped, so that the other daemons' coverage checks and
        ``tulliusd --status`` stop counting on our bands at once, not a few leases on.

        Only if the store answered last (else the stop would wait on its
        retries), and only if our start wrote the entry last (a newer daemon of
        the same name is running).
        """
        try:
            self.store.mark_stopped(self.server, self.coverage.instance)
        except StoreError as error:  # they will see our entry age instead
            log.info("could not mark this server stopped: %s", short_error(error))

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
            if not item.renewing and not item.lease_over:
                wake_at = min(wake_at, item.next_renew)
        if not self.sweeper.running:
            wake_at = min(wake_at, self.sweeper.next_at)
        if not self.coverage.running:  # (stopping too: it renews our entry)
            wake_at = min(wake_at, self.coverage.next_at)
        if self.pruner is not None and not self.pruner.running and not self._stopping:
            wake_at = min(wake_at, self.pruner.next_at)
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
        if not self._store_down:
            self._store_down = True
            log.warning("store call failed (%s): %s; will keep retrying", what, short_error(error))
        else:
            log.info("store call failed again (%s): %s", what, short_error(error))

    def _store_ok(self) -> None:
        if self._store_down:
            self._store_down = False
            log.warning("store reachable again")

    # --- store work ------------------------------------------------------------------

    def _queue_for(self, worker: WorkerProcess, specs: list[Any], key: str | None) -> None:
        def work() -> list[str]:
            return insert_queued(
                self.store,
                specs,
                now=self.clock.now(),
                new_id=lambda: uuid.uuid4().hex,
                key=key,
                write_clock=self.write_clock,
            )

        def done(future: Future[Any]) -> None:
            error = future.exception()
            if error is None:
                self._store_ok()
                worker.send(("ids", future.result()))
                self._poll_soon()
            elif isinstance(error, KeyConflict):  # raised as itself in the user's code
                worker.send(
                    ("key_conflict", (error.key, error.index, error.task_id, error.difference))
                )
            else:
                if isinstance(error, StoreError):
                    self._store_failed("queue", error)
                worker.send(("queue_error", redact(f"{type(error).__name__}: {error}")))

        self._submit(work, done)

    def _schedule_store_work(self, now: float) -> None:
        self._schedule_finishes(now)
        self._schedule_renewals(now)
        if not self._stopping:
            self._schedule_claims(now)
        if not self.sweeper.running and now >= self.sweeper.next_at:
            self._schedule_sweep()
        # Also while stopping: the check renews our entry, and without it a daemon
        # in a long grace was listed by --status as not seen (crashed, or cut off).
        if not self.coverage.running and now >= self.coverage.next_at:
            self._schedule_coverage()
        pruner = self.pruner
        if pruner and not pruner.running and not self._stopping and now >= pruner.next_at:
            self._schedule_prune(pruner)
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
        candidates = self._candidates[band_index]
        tokens = {token for _, token in workers}
        # The leases of unsure claims may become jobs of this claim.
        tokens.update(unsure.token for unsure in candidates.unsure)
        self._claim_tokens |= tokens
        started = time.monotonic()
        started_boot = self.write_clock()
        window = WRITE_WINDOW.total_seconds()

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
                write_by=started_boot + window,
                clock=self.write_clock,
            )

        def done(future: Future[Any]) -> None:
            for slot in slots:
                slot.claiming = False
            self._band_claiming[band_index] = False
            self._claim_tokens -= tokens
            now = time.monotonic()
            error = future.exception()
            jobs: list[Job]
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
                if not isinstance(error, ClaimInterrupted):
                    return
                jobs = error.jobs  # won before the error: ours to run all the same
            else:
                self._store_ok()
                jobs = future.result()
                if len(jobs) < len(slots):
                    # The period counts from the start of this look, so an idle daemon
                    # looks every poll_interval however long a look takes (pickup latency).
                    self._next_poll[band_index] = started + self.settings.poll_interval
                else:
                    self._next_poll[band_index] = now  # more, maybe, for slots freed meanwhile
            by_worker = {job.lease.worker: job for job in jobs}
            # A lease stored over a heartbeat ago was never renewed: that of a claim
            # that took long (a slow database, many lost races), or that of an
            # earlier claim a store error left unsure, settled by this one.  It may
            # have been failed as lost meanwhile, and its user code must not start
            # after that verdict: such jobs are renewed first, at once, and
            # dispatched once found ours.
            slow = now - started > self.heartbeat
            old_by = self.clock.now() - timedelta(seconds=self.heartbeat)
            for slot in slots:
                job = by_worker.get(slot.name)
                if job is None:
                    continue
                self.counters.claimed += 1
                confirm = slow or job.lease.at < old_by
                if confirm:
                    log.info(
                        "task %s: its lease was stored %.1f s ago, unrenewed; renewing it "
                        "before its %s starts",
                        job.task_id,
                        max(now - started, (self.clock.now() - job.lease.at).total_seconds()),
                        job.role,
                    )
                slot.running = Running(
                    job,
                    next_renew=now if confirm else now + self.heartbeat,
                    claimed_at=now,
                    write_by=started_boot + verdict_window(job.time_limit).total_seconds(),
                    confirm=confirm,
                )
                self._dispatch(slot, slot.running, now)

        self._submit(work, done)

    def _add_finishing(self, running: Running, event: Event, now: float) -> None:
        self._finishing.append(
            Finishing(
                running.job,
                event,
                next_try=now,
                write_by=running.write_by,
                next_renew=running.next_renew,
            )
        )

    def _schedule_finishes(self, now: float) -> None:
        for item in self._finishing:
            if not item.submitted and now >= item.next_try:
                self._submit_finish(item)

    def _submit_finish(self, item: Finishing) -> None:
        item.submitted = True

        def work() -> Verdict:
            return drive(
                self.store,
                finish(item.job, item.event, now=self.clock.now(), rng=self.rng),
                write_by=item.write_by,
                clock=self.write_clock,
            )

        def done(future: Future[Any]) -> None:
            item.submitted = False
            error = future.exception()
            if isinstance(error, StoreError):
                self._store_failed("record a verdict", error)
                item.next_try = time.monotonic() + item.delay
                # At most a heartbeat apart: once the database is back, the verdict
                # comes about as soon as a renewal would.
                item.delay = min(item.delay * 2, 5.0, max(self.heartbeat, 0.2))
                return
            self._finishing.remove(item)
            if isinstance(error, WriteWindowClosed):
                # No longer ours (`_schedule_sweep`): the sweeps fail its lease as lost.
                self.counters.given_up += 1
                log.error(
                    "task %s: %s's result (%s) was not recorded within %s of its claim and "
                    "time limit (the database out of reach, or this server paused); given up: "
                    "unless it was recorded before the error, another sweep fails the task "
                    "as lost and its failed() runs",
                    item.job.task_id,
                    item.job.role,
                    type(item.event).__name__,
                    WRITE_WINDOW,
                )
                return
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
        name = job.view.task.class_name
        event = item.event
        if status is Status.UNHANDLED:
            last = (
                f": {event.error.kind}: {event.error.message}"
                if isinstance(event, HandlerFailed)
                else ""
            )
            log.warning(
                "task %s (%s): failed() failed on every attempt; left UNHANDLED for an operator%s",
                job.task_id,
                name,
                last,
            )
        elif isinstance(event, HandlerFailed):
            # The task stays FAILED: this attempt of failed() is what failed, not the task again.
            log.info(
                "task %s (%s): failed() attempt failed (%s): %s; it will be tried again",
                job.task_id,
                name,
                event.error.kind,
                event.error.message,
            )
        elif isinstance(event, Failed):
            log.info(
                "task %s (%s): failed (%s): %s",
                job.task_id,
                name,
                event.failure.kind,
                event.failure.message,
            )
        else:
            log.info("task %s (%s): %s%s", job.task_id, name, status.value, _queued(verdict))
        self._poll_soon()  # successors or replacements may be due right away
        self._next_observe = 0.0

    def _schedule_renewals(self, now: float) -> None:
        for slot in self.slots:
            running = slot.running
            if running is not None and not running.renewing and now >= running.next_renew:
                self._submit_renew(slot, running)
        for item in self._finishing:
            if not item.renewing and not item.lease_over and now >= item.next_renew:
                self._submit_verdict_renew(item)

    def _submit_verdict_renew(self, item: Finishing) -> None:
        """Renew the lease of a job whose verdict is still to be recorded (`Finishing`)."""
        item.renewing = True

        def done(future: Future[Any]) -> None:
            item.renewing = False
            item.next_renew, ours = self._renewed(item.job, future)
            if ours is False:  # recorded (by us, or a sweep): the verdict tells
                item.lease_over = True

        self._submit(lambda: drive(self.store, renew(item.job)), done)

    def _renewed(self, job: Job, future: Future[Any]) -> tuple[float, bool | None]:
        """A renewal's end: when to renew next, and whether the lease is still ours
        (None: the renewal failed, and is tried again sooner)."""
        now = time.monotonic()
        error = future.exception()
        if error is not None:
            if isinstance(error, StoreError):
                self._store_failed("renew a lease", error)
            else:
                log.error("renewing the lease of %s failed: %r", job.task_id, error)
            return now + min(self.heartbeat, 1.0), None
        self._store_ok()
        ours: bool = future.result()
        return now + self.heartbeat, ours

    def _submit_renew(self, slot: Slot, running: Running) -> None:
        running.renewing = True

        def done(future: Future[Any]) -> None:
            running.renewing = False
            running.next_renew, ours = self._renewed(running.job, future)
            now = time.monotonic()
            if ours:
                running.confirm = False  # dispatched by the loop's next pass
            if ours is not False or slot.running is not running:
                return
            if running.dispatched_at is None:
                log.warning(
                    "task %s: another server ended our lease before its %s started; "
                    "not starting it",
                    running.job.task_id,
                    running.job.role,
                )
                slot.running = None
                return
            log.warning("task %s: another server ended our lease; stopping it", running.job.task_id)
            if running.kill_reason is None:
                running.kill_reason = "abandoned"
                running.term_sent_at = now
                running.killed = True
                if slot.worker is not None:
                    slot.worker.signal_group(signal.SIGKILL)

        self._submit(lambda: drive(self.store, renew(running.job)), done)

    def _schedule_sweep(self) -> None:
        # Claims still in flight count as ours: a claim stores its lease before it
        # returns, and a slow one (a loaded database) could otherwise be watched by
        # our own sweeps, on other store threads, until they fail it as lost.
        own = frozenset(
            [s.running.job.token for s in self.slots if s.running is not None]
            + [item.job.token for item in self._finishing]
            + list(self._claim_tokens)
            # (``unsure`` read once: a claim on a store thread may replace it meanwhile)
            + [token for c in self._candidates for token in c.unsure_tokens(self.clock.now())]
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
                    "failed as lost (their server stopped renewing): %s",
                    ", ".join(describe_lease(record_id) for record_id in outcome.expired),
                )
                self._poll_soon()
            if outcome.repaired:
                log.info("repaired hints of %d task(s)", len(outcome.repaired))

        self._submit(self.sweeper.work(own), done)

    def _schedule_coverage(self) -> None:
        def done(future: Future[Any]) -> None:
            error = self.coverage.finished(future, time.monotonic())
            if isinstance(error, StoreUnavailable):  # an outage, as for any store call
                self._store_failed("coverage check", error)
            elif error is not None and self.coverage.first_report(error):
                # Not an outage (a refused write, a broken entry): the other store calls
                # work, so lease observations stay, and once is enough to say so.
                log.warning(
                    "coverage check failed: %s: %s; tulliusd runs on without it",
                    type(error).__name__,
                    short_error(error),
                )

        self._submit(self.coverage.work(), done)

    def _schedule_prune(self, pruner: Pruner) -> None:
        def done(future: Future[Any]) -> None:
            outcome = pruner.finished(future)
            if isinstance(outcome, StoreUnavailable):
                self._store_failed("prune", outcome)
            elif isinstance(outcome, BaseException):
                log.error(
                    "prune failed: %s: %s; trying again in %.0f s",
                    type(outcome).__name__,
                    short_error(outcome),
                    pruner.next_at - time.monotonic(),
                )
            elif outcome is not None and outcome.deleted:
                log.info("pruned: %s", outcome.describe(pruner.keep))

        self._submit(pruner.work(), done)

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

        self._submit(lambda: observer(self._given_store), done)

    # --- stopping ----------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self._stopping_since is not None

    def _handle_stop(self, now: float) -> None:
        if self._stop_signals == 0:
            return
        if self._stopping_since is None:
            self._stopping_since = now
            busy = sum(slot.running is not None for slot in self.slots)
            if busy:
                log.info(
                    "stopping: no new work; %d running task(s) get %gs", busy, self.settings.grace
                )
            else:
                log.info("stopping: no new work, nothing running")
            for slot in self.slots:
                if slot.worker is not None and slot.running is None and not slot.claiming:
                    self._retire(slot, slot.worker, now)
        grace_ends = self._stopping_since + self.settings.grace
        over = self._stop_signals > 1 or now >= grace_ends
        if over and self._killing_since is None:
            self._grace_skipped = now < grace_ends
            self._killing_since = now if self._grace_skipped else grace_ends
            if self._grace_skipped:
                log.warning("second stop signal: grace skipped; killing running tasks now")
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
                self._add_finishing(running, failure_event(running.job, failure), now)
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
            # Counted from the kills (README: "within 30 seconds after the kills"),
            # which a second signal brings forward from the end of the grace.
            killing_since = self._killing_since
            if killing_since is None:
                killing_since = self._stopping_since + self.settings.grace
            give_up = killing_since + KILL_GRACE + FINISH_GIVE_UP
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
