"""What happens to a simulated server as a whole: the faults aimed at it, its stop,
exit, crash and restart.

`ServerEvents` is a mixin of `tullius.sim.simulation.Simulation`, between the
driver loops (`tullius.sim.world.Drivers`, which it stops and starts again)
and the scheduler (`tullius.sim.scheduler.Scheduler`, which fires the faults
at their times).  A crash is abrupt (the actors and user code stop where they
are); a stop (`ServerStop`) is the daemon's graceful one, carried out by an
actor of the server's own (`ServerEvents._stopper`), so that a pause of the
server holds it back too.
"""

from __future__ import annotations

from typing import Final

from tullius.sim.clock import to_us
from tullius.sim.faults import (
    STOP_GIVE_UP,
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    ServerStop,
    WorkerCrash,
)
from tullius.sim.world import RESTART, ActorGen, Drivers, Server, Wait

#: `STOP_GIVE_UP` in the scheduler's microseconds.
STOP_GIVE_UP_US: Final = to_us(STOP_GIVE_UP)


class ServerEvents(Drivers):
    """Faults aimed at a server (`_fire`), and its stop, exit, crash and restart."""

    def _fire(self, fault: Fault) -> None:
        self._log(getattr(fault, "server", None) or "-", f"fault {fault!r}")
        now = self.clock.us
        if isinstance(fault, ClockSkew):
            self._servers[fault.server].clock.skew = fault.skew
        elif isinstance(fault, ServerPause):
            server = self._servers[fault.server]
            until = now + to_us(fault.duration)
            server.paused_until = max(server.paused_until, until)
            server.pauses.append((now, until))
        elif isinstance(fault, WorkerCrash):
            server = self._servers[fault.server]
            busy = [
                ex
                for ex in server.execs
                if ex.running
                and ex.baton is not None
                and (fault.worker is None or ex.worker == fault.worker)
            ]
            if busy:
                self._stop(min(busy, key=lambda ex: ex.worker), "crashed")
        elif isinstance(fault, ServerCrash):
            restart = fault.restart_after
            self._crash(
                self._servers[fault.server], None if restart is None else now + to_us(restart)
            )
        elif isinstance(fault, ServerStop):
            server = self._servers[fault.server]
            if not server.up or server.stopping is not None:
                self._log(server.name, f"stop signal ignored: the server is {server.state(now)}")
                return
            server.stopping = fault  # (a paused server acts on it when it wakes up)
            self._spawn(server, self._stopper(server, fault), f"{server.name}/stop")

    def _stopper(self, server: Server, stop: ServerStop) -> ActorGen:
        """A stop signal, carried out as the daemon's `Supervisor._handle_stop`.

        No more claims (the claim loops end at their next nap; a claim in flight
        runs the jobs it wins); renewals and sweeps go on; running jobs get the
        grace, then are stopped and fail as ``shutdown`` (their ``failed()`` runs,
        on another server or on this one restarted: nothing is lost in a deploy).
        The server exits as soon as nothing runs and every verdict is recorded
        (`_exit_if_done`), or gives those verdicts up `STOP_GIVE_UP` after the
        kills, when the store stays out of reach: their leases are then no longer
        renewed, and the sweeps fail them as ``lost``.
        """
        self._log(
            server.name,
            f"stopping: no new work; {len(server.execs)} job(s) get "
            f"{stop.grace.total_seconds():g}s",
        )
        now = self.clock.us
        server.kill_at = now + to_us(stop.grace)
        # The faults end with the restart: later than `fault_end` says if a pause
        # delayed this step (the liveness bound counts from the faults' end).
        restart = to_us(stop.restart_after) if stop.restart_after is not None else 0
        self._faults_end_us = max(self._faults_end_us, server.kill_at + STOP_GIVE_UP_US + restart)
        for c in server.claimers:
            if c.napping and c.actor is not None:
                c.actor.gen.close()
                self._claimer_ended(server, c)
        self._exit_if_done(server)
        if not server.up:
            return
        yield Wait(to_us(stop.grace))
        for ex in list(server.execs):
            if ex.running:
                self._log(server.name, f"grace over: stopping {ex.what}")
                self._stop(ex, "shutdown")
        yield Wait(STOP_GIVE_UP_US)
        if server.execs:
            ids = ", ".join(ex.job.task_id for ex in server.execs)
            self._log(server.name, f"stopped without recording the verdicts of {ids}")
            self._exit(server)

    def _exit_if_done(self, server: Server) -> None:
        """A stopping server exits once nothing runs, no claim is in flight and every
        verdict is recorded, as the daemon (`Supervisor._finished`).

        Its tokens, not its executions, say whether jobs are left: a claim's jobs
        are its own from the claim, but start (`StartJobs`) only after the claim
        loop went on to its next nap, which ends a stopping server's loop.
        """
        if (
            server.up
            and server.kill_at is not None  # (the stop is carried out: `_stopper` began)
            and not server.tokens
            and all(c.actor is None for c in server.claimers)
        ):
            self._log(server.name, "stopped: every verdict recorded")
            self._exit(server)

    def _exit(self, server: Server) -> None:
        stop = server.stopping
        assert stop is not None
        restart = stop.restart_after
        restart_at = None if restart is None else self.clock.us + to_us(restart)
        self._crash(server, restart_at)
        server.stopped = True
        self._faults_end_us = max(self._faults_end_us, restart_at or self.clock.us)

    def _crash(self, server: Server, restart_at: int | None) -> None:
        """The server vanishes: its actors and user code stop where they are, no cleanup."""
        if not server.up:
            return
        server.up = False
        server.stopped = False
        server.epoch += 1
        for ex in list(server.execs):
            self._stop(ex, "server crashed")
        server.execs.clear()
        server.tokens.clear()
        if restart_at is not None:
            self._push(restart_at, RESTART, server, None)

    def _restart(self, server: Server) -> None:
        if server.up:  # (restarts scheduled by a crash and by a stop never overlap)
            return
        self._log(server.name, "server restarted")
        server.up = True
        server.epoch += 1
        server.stopping, server.kill_at, server.stopped = None, None, False
        self._boot(server)
