"""The main thread's side of `tulliusd`: starting, feeding, reading and killing
worker processes.

A mixin of `tullius.runtime.supervisor.Supervisor`, which runs the loop and
the store work.  Everything here runs on the main thread and never waits on
the store: a verdict it reaches (a result, a death, a timeout) is handed to
``_add_finishing``, which the store threads record.  A worker's process group
is signalled as a whole, so a timed-out task's children die with it.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any

from tullius import policy
from tullius.clock import Clock
from tullius.document import Failure, FailureKind, failure_from_bson, failure_to_bson, task_to_bson
from tullius.engine import Job, JobKind
from tullius.events import Event, Failed, HandlerFailed, HandlerSucceeded, Succeeded
from tullius.policy import LeaseTimings
from tullius.runtime.config import Settings
from tullius.runtime.mongo_store import redact, short_error
from tullius.runtime.slots import Counters, Running, Slot, WorkerProcess

log = logging.getLogger("tullius.daemon")

#: Seconds between SIGTERM and SIGKILL for a task past its deadline or stopped by
#: a shutdown (`tullius.policy.KILL_GRACE`).
KILL_GRACE = policy.KILL_GRACE.total_seconds()


class WorkerKeeping:
    """Keeps one worker process per band slot and turns what happens to it into events."""

    settings: Settings
    server: str
    clock: Clock
    timings: LeaseTimings
    counters: Counters
    slots: list[Slot]
    _retiring: list[tuple[WorkerProcess, float]]
    _grace_skipped: bool

    @property
    def _stopping(self) -> bool:
        raise NotImplementedError

    def _add_finishing(self, running: Running, event: Event, now: float) -> None:
        raise NotImplementedError

    def _queue_for(self, worker: WorkerProcess, specs: list[Any], key: str | None) -> None:
        raise NotImplementedError

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
        role = job.role
        if reason == "timeout":
            self.counters.timeouts += 1
            failure = self._failure(
                FailureKind.TIMEOUT,
                f"{role} did not finish within its timeout of "
                f"{job.time_limit.total_seconds():g}s; "
                "its process group was killed",
            )
        elif reason == "shutdown":
            grace = f"grace of {self.settings.grace:g}s"
            why = (
                f"a second stop signal skipped its {grace}"
                if self._grace_skipped
                else f"{grace} over"
            )
            failure = self._failure(
                FailureKind.SHUTDOWN, f"the daemon stopped ({why}) while {role} was running"
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
        self._add_finishing(running, failure_event(job, failure), now)

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
            self._queue_for(worker, list(message[1]), message[2])
        elif kind == "done":
            self._job_done(slot, worker, message[1], now)
        else:
            log.error("worker %s sent an unknown message %r; replacing it", slot.name, kind)
            worker.signal_group(signal.SIGKILL)

    def _dispatch(self, slot: Slot, running: Running, now: float) -> None:
        worker = slot.worker
        if worker is None or not worker.ready or running.confirm:
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
        running.dispatched_at = now
        running.deadline = now + job.time_limit.total_seconds()
        log.info("task %s: %s started in worker %s", job.task_id, job.role, slot.name)

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
            event = failure_event(job, failure)
        self._add_finishing(running, event, now)
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
        wait = (job.time_limit + self.timings.lease).total_seconds()
        if running.claimed_at is None or now < running.claimed_at + wait:
            return
        slot.running = None
        self.counters.crashes += 1
        why = (
            f"its lease, stored over a heartbeat before its claim returned, could not be "
            f"renewed within {wait:g}s (its timeout and a lease), so it was never started"
            if running.confirm
            else f"the worker process claimed to run {job.role} died before it started, and "
            f"no worker process could be started within {wait:g}s (its timeout and a lease)"
        )
        failure = self._failure(FailureKind.CRASHED, why)
        log.warning("task %s: %s", job.task_id, failure.message)
        self._add_finishing(running, failure_event(job, failure), now)

    def _terminate(self, worker: WorkerProcess, running: Running, now: float) -> None:
        log.info("task %s: stopping its worker (%s)", running.job.task_id, running.kill_reason)
        running.term_sent_at = now
        worker.signal_group(signal.SIGTERM)


def failure_event(job: Job, failure: Failure) -> Event:
    return (
        Failed(job.token, failure) if job.kind is JobKind.RUN else HandlerFailed(job.token, failure)
    )
