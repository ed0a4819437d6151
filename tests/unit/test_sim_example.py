"""The original README's example, under the simulator: it must come out exactly as described."""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

import tullius
from tullius.sim import Simulation
from tullius.testing import assert_chain, assert_outcomes, describe_chain, expect


class ExampleTask(tullius.Task):
    timeout = timedelta(seconds=5)
    count_to: int

    def run(self) -> None:
        for i in range(self.count_to):
            logging.info("Counting: %s", i)
            time.sleep(1)

    def failed(self) -> tullius.Task:
        return self.copy(count_to=max(self.count_to - 1, 0))


def test_counting_to_ten_times_out_down_to_four_which_succeeds() -> None:
    sim = Simulation(seed=0)
    task = ExampleTask(count_to=10)
    sim.queue(task)

    counts = sim.drain(within=timedelta(minutes=5))

    chain = sim.chain(task)
    assert [link.fields["count_to"] for link in chain] == [10, 9, 8, 7, 6, 5, 4]
    for link in chain[:6]:
        assert link.outcome == "failed"
        assert link.failure is not None
        assert link.failure.kind == "timeout"
        assert link.finished_at is not None
        assert link.started_at is not None
        assert link.finished_at - link.started_at == timedelta(seconds=5)
    assert chain[6].outcome == "succeeded"
    assert (counts.succeeded, counts.failed, counts.handled) == (1, 6, 6)
    assert counts.failures == {"timeout": 6}
    sim.close()


def test_the_chain_reads_the_same_with_the_assert_helpers(tullius_sim: Simulation) -> None:
    task = ExampleTask(count_to=10)
    tullius_sim.queue(task)
    tullius_sim.drain(within=timedelta(minutes=5))

    assert_outcomes(tullius_sim.chain(task), "timeout*6 succeeded")
    assert_chain(
        tullius_sim.chain(task),
        [expect("timeout", duration=timedelta(seconds=5), count_to=n) for n in range(10, 4, -1)]
        + [expect("succeeded", count_to=4, duration=timedelta(seconds=4))],
    )
    assert "ExampleTask(count_to=10) failed timeout" in describe_chain(tullius_sim.chain(task))


def test_same_seed_gives_the_same_trace() -> None:
    traces = []
    for _ in range(2):
        sim = Simulation(seed=42, servers=2, keep_trace=True, racy_updates=0.3)
        sim.queue([ExampleTask(count_to=n) for n in (3, 7, 10)])
        sim.crash_server("s1", at=timedelta(seconds=2), restart_after=timedelta(seconds=20))
        sim.drain(within=timedelta(minutes=10))
        traces.append(sim.trace)
        sim.close()
    assert traces[0] == traces[1]
    assert len(traces[0]) > 100


class BacksOffWithJitter(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        for attempt in range(5):
            time.sleep(2**attempt * random.uniform(0.5, 1.5))  # the usual jittered backoff


def test_user_codes_random_draws_follow_the_seed_and_leave_the_tests_own_alone() -> None:
    # The jitter made one seed succeed in one run and time out in the next.
    endings = []
    for _ in range(2):
        random.seed(1234)
        with Simulation(seed=5) as sim:
            task = BacksOffWithJitter()
            sim.queue(task)
            random.seed(time.time_ns())  # whatever the test's own sequence is
            sim.drain(within=timedelta(minutes=5))
            endings.append([(link.outcome, link.finished_at) for link in sim.chain(task)])
    assert endings[0] == endings[1]
    random.seed(99)
    with Simulation(seed=5) as sim:
        sim.queue(BacksOffWithJitter())
        sim.drain(within=timedelta(minutes=5))
    assert random.random() == random.Random(99).random()  # the test's sequence untouched


def test_different_seeds_interleave_differently() -> None:
    traces = []
    for seed in (1, 2):
        sim = Simulation(seed=seed, servers=2, keep_trace=True)
        sim.queue([ExampleTask(count_to=n) for n in (3, 7)])
        sim.drain(within=timedelta(minutes=10))
        traces.append(sim.trace)
        sim.close()
    assert traces[0] != traces[1]


REPLAY = """
import hashlib
from datetime import timedelta
from tullius.sim import ServerCrash, Simulation, StepCrash, StoreFault
from tullius.sim.strategies import SimWork

behaviour = ["ok", "raise", "hang", "garbage"]
with Simulation(seed=99, servers=3, racy_updates=0.5, keep_trace=True,
                task_processes=[(2, 0, 10)]) as sim:
    sim.queue([SimWork(secs=n % 13, run_does=behaviour[n % 4], failed_does=behaviour[n % 2],
                       successors=n % 3, retries=n % 2, priority=n % 11) for n in range(30)])
    restart = timedelta(seconds=30)
    sim.apply([ServerCrash(at=timedelta(seconds=7), server="s2", restart_after=restart),
               StoreFault("s1", "InsertRecord", "lost_ack", count=5),
               StepCrash("s3", "InsertTasks", restart_after=timedelta(seconds=3))])
    sim.drain(within=timedelta(hours=3))
    print(len(sim.trace), hashlib.sha256("\\n".join(sim.trace).encode()).hexdigest())
"""


def test_same_seed_same_trace_across_processes_and_hash_seeds() -> None:
    import os
    import subprocess
    import sys

    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", REPLAY], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1
