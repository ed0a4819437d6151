"""Simulator benchmark: prints figures, asserts nothing (timings are not tests).

    python bench/sim_bench.py [--tasks 5000] [--repeat 3]

Figures:
1. lifecycles per wall second with faults on: many short tasks (a third fail
   and are handled), three servers, racing conditional updates, crashes with
   restarts, a pause, store faults; with invariants checked after every event
   and without.  Then the same lifecycles driven straight through the engine
   against the in-memory store, without the simulator: the floor under it.
2. virtual-to-wall ratio on an idle-heavy workload: one server, ten workers
   polling every second, a task an hour for a simulated day.
3. the seed example (README's ExampleTask counting from 10 down to 4), wall
   time of queue + drain, and freezegun's start cost on its own.

Goals on the 2-core reference machine (issue 3): >= 20,000 lifecycles/s,
>= 1,000x, < 50 ms.  Each figure is the best of ``--repeat`` runs; the load
average is printed because other processes skew wall-clock figures, and
lifecycles are also given per CPU second of this process (all its threads),
which a busy machine disturbs less.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tullius
from tullius.api import insert_queued
from tullius.band import Band
from tullius.document import Failure, FailureKind
from tullius.engine import (
    CLAIM_READ,
    REUSE_CANDIDATES_FOR,
    Candidates,
    JobKind,
    claim_many,
    drive,
    finish,
)
from tullius.events import Event, Failed, HandlerSucceeded, Succeeded
from tullius.sim import (
    MemoryStore,
    ServerCrash,
    ServerPause,
    Simulation,
    StoreFault,
    StoreOutage,
    WorkerCrash,
)
from tullius.task import to_spec

_clock = (time.perf_counter,)  # in a tuple: freezegun must not patch our stopwatch


class Quick(tullius.Task):
    timeout = timedelta(seconds=30)
    task_name = "bench.sim_bench:Quick"
    n: int

    def run(self) -> None:
        if self.n % 3 == 0:
            raise ValueError("every third task fails")

    def failed(self) -> None:
        return None


class Hourly(tullius.Task):
    timeout = timedelta(minutes=30)
    task_name = "bench.sim_bench:Hourly"

    def run(self) -> None:
        time.sleep(600)


class ExampleTask(tullius.Task):
    timeout = timedelta(seconds=5)
    count_to: int
    task_name = "bench.sim_bench:ExampleTask"

    def run(self) -> None:
        for i in range(self.count_to):
            logging.info("Counting: %s", i)
            time.sleep(1)

    def failed(self) -> tullius.Task:
        return self.copy(count_to=max(self.count_to - 1, 0))


def lifecycles(tasks: int, *, check: bool, at_once: bool) -> tuple[float, int, int, float]:
    """Short tasks through three faulty servers; ``at_once``: all queued at zero, else
    arriving at 100 per virtual second (the in-memory store scans its whole queue on
    every claim, so a deep queue measures the store more than the simulator)."""
    sim = Simulation(
        seed=1,
        servers=3,
        task_processes=[(10, 0, 10)],
        racy_updates=0.3,
        check_invariants=check,
    )
    sim.apply(
        [
            ServerCrash(at=timedelta(seconds=5), server="s1", restart_after=timedelta(seconds=20)),
            ServerPause(at=timedelta(seconds=12), server="s2", duration=timedelta(seconds=40)),
            WorkerCrash(at=timedelta(seconds=3), server="s3"),
            StoreFault("s3", "InsertRecord", "lost_ack", record_kind="outcome", count=20),
            StoreFault("s2", "SetStatus", "not_applied", count=20),
            StoreOutage(at=timedelta(seconds=30), duration=timedelta(seconds=5)),
        ]
    )
    start = _clock[0]()
    cpu = time.process_time()
    if at_once:
        sim.queue([Quick(n=n) for n in range(tasks)])
    else:
        for first in range(0, tasks, 100):
            sim.queue([Quick(n=n) for n in range(first, min(first + 100, tasks))])
            sim.run_for(timedelta(seconds=1))
    counts = sim.drain(within=timedelta(days=1))
    wall = _clock[0]() - start
    cpu = time.process_time() - cpu
    sim.close()
    ended = counts.succeeded + counts.handled + counts.unhandled
    return ended / wall, ended, sim.events, ended / cpu


def engine_alone(tasks: int) -> float:
    """The floor under the simulator: the same lifecycles (a third fail and are
    handled) driven straight through the engine against the in-memory store, one
    worker, no scheduler, faults, invariants, threads or user code."""
    store = MemoryStore()
    now = datetime(2030, 1, 1, tzinfo=UTC)
    rng = random.Random(1)
    band = Band(1, 0, 10)
    kept = Candidates(REUSE_CANDIDATES_FOR)
    fresh = iter(f"t{n}" for n in range(tasks))
    start = _clock[0]()
    insert_queued(
        store, [to_spec(Quick(n=n)) for n in range(tasks)], now=now, new_id=fresh.__next__
    )
    ended = 0
    while True:
        token = f"{rng.getrandbits(64):016x}"
        jobs = drive(
            store,
            claim_many(
                band,
                server="s",
                workers=[("w", token)],
                now=now,
                rng=rng,
                batch=CLAIM_READ,
                candidates=kept,
            ),
        )
        if not jobs:
            break
        job = jobs[0]
        if job.kind is JobKind.HANDLE:
            event: Event = HandlerSucceeded(token)
            ended += 1
        elif job.view.task.fields["n"] % 3 == 0:
            event = Failed(token, Failure(FailureKind.EXCEPTION, "every third task fails", now))
        else:
            event = Succeeded(token)
            ended += 1
        drive(store, finish(job, event, now=now, rng=rng))
    return ended / (_clock[0]() - start)


def idle_ratio(hours: int) -> tuple[float, float]:
    sim = Simulation(seed=2, check_invariants=True)
    sim.queue([Hourly(n=n, delay=timedelta(hours=n)) for n in range(hours)])
    start = _clock[0]()
    sim.run_for(timedelta(hours=hours))
    wall = _clock[0]() - start
    sim.close()
    return hours * 3600 / wall, wall


def seed_example() -> float:
    sim = Simulation(seed=0)
    start = _clock[0]()
    task = ExampleTask(count_to=10)
    sim.queue(task)
    sim.drain(within=timedelta(minutes=5))
    wall = _clock[0]() - start
    assert [link.outcome for link in sim.chain(task)] == ["failed"] * 6 + ["succeeded"]
    sim.close()
    return wall


def freezegun_start() -> float:
    import freezegun

    start = _clock[0]()
    freezer = freezegun.freeze_time(datetime(2030, 1, 1, tzinfo=UTC))
    freezer.start()
    freezer.stop()
    return _clock[0]() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()}")

    for at_once in (False, True):
        for check in (False, True):
            runs = [
                lifecycles(args.tasks, check=check, at_once=at_once) for _ in range(args.repeat)
            ]
            best = max(runs)
            label = ("all queued at once" if at_once else "100 arrive per second") + (
                ", invariants on" if check else ", invariants off"
            )
            print(
                f"lifecycles/s with faults ({label}): {best[0]:>7,.0f}  "
                f"({best[1]} tasks ended, {best[2]:,} events; per CPU second: {best[3]:,.0f})"
            )

    floor = max(engine_alone(args.tasks) for _ in range(args.repeat))
    print(f"  the engine alone, no simulator (its floor): {floor:>7,.0f}  lifecycles/s")

    ratios = [idle_ratio(24) for _ in range(args.repeat)]
    ratio, wall = max(ratios)
    print(f"virtual/wall ratio, idle-heavy day:     {ratio:>9,.0f}x  (24 h in {wall:.3f} s)")

    seed_example()  # warm up imports and the thread pool's first thread
    walls = [seed_example() for _ in range(max(args.repeat, 5))]
    print(
        f"seed example (ExampleTask 10 -> 4):     {min(walls) * 1000:>9.1f} ms best, "
        f"{statistics.median(walls) * 1000:.1f} ms median"
    )
    starts = [freezegun_start() for _ in range(5)]
    print(f"  of which freezegun start+stop:        {min(starts) * 1000:>9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
