"""Unmodified user code under virtual time: clocks, sleeps, deadlines and the odd cases."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from time import sleep  # a module-level alias: patched too
from typing import Any

import pytest

import tullius
from tullius.sim import Simulation, UserCodeHang, UserThreadLeak, cpu_pin, virtual_time
from tullius.sim.threads import BatonPool
from tullius.testing import assert_chain, assert_outcomes, expect

SEEN: dict[str, object] = {}
REAL_SLEEP = time.sleep
REAL_MONOTONIC = time.monotonic


class Clocks(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        SEEN["time0"] = time.time()
        SEEN["mono0"] = time.monotonic()
        SEEN["perf0"] = time.perf_counter()
        SEEN["now0"] = datetime.now(UTC)
        sleep(2.5)
        time.sleep(0.5)
        SEEN["time1"] = time.time()
        SEEN["mono1"] = time.monotonic()
        SEEN["perf1"] = time.perf_counter()
        SEEN["now1"] = datetime.now(UTC)
        SEEN["utcnow1"] = datetime.utcnow()  # legacy API must follow too


def test_clocks_inside_run_follow_virtual_time() -> None:
    sim = Simulation(seed=1)
    sim.queue(Clocks())
    started = sim.now
    sim.drain(within=timedelta(minutes=1))
    assert SEEN["time1"] - SEEN["time0"] == pytest.approx(3.0)  # type: ignore[operator]
    assert SEEN["mono1"] - SEEN["mono0"] == pytest.approx(3.0)  # type: ignore[operator]
    assert SEEN["perf1"] - SEEN["perf0"] == pytest.approx(3.0)  # type: ignore[operator]
    assert SEEN["now1"] - SEEN["now0"] == timedelta(seconds=3)  # type: ignore[operator]
    assert started <= SEEN["now0"] < started + timedelta(seconds=2)  # type: ignore[operator]
    sim.close()


class Naps(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        time.sleep(1)


def test_between_runs_the_clock_is_real_and_close_takes_freezegun_away() -> None:
    import freezegun.api

    sim = Simulation(seed=1, start=datetime(2040, 1, 1, tzinfo=UTC))
    sim.queue(Naps())
    sim.run_for(timedelta(seconds=5))
    assert abs(time.time() - freezegun.api.real_time()) < 60
    assert abs(datetime.now(UTC) - datetime.fromtimestamp(freezegun.api.real_time(), UTC)) < (
        timedelta(seconds=60)
    )
    assert time.sleep is REAL_SLEEP
    sim.close()
    assert time.time is freezegun.api.real_time
    assert datetime.now(UTC).__class__ is datetime


def test_consecutive_runs_start_freezegun_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import freezegun

    virtual_time.release_frozen_clock()
    starts = []
    real_freeze_time = freezegun.freeze_time

    def counting(*args: Any, **kwargs: Any) -> Any:
        starts.append(args)
        return real_freeze_time(*args, **kwargs)

    monkeypatch.setattr(freezegun, "freeze_time", counting)
    sim = Simulation(seed=1)
    for n in range(3):
        sim.queue(Clocks())
        sim.run_for(timedelta(seconds=10))
        assert SEEN["now1"] - SEEN["now0"] == timedelta(seconds=3), n  # type: ignore[operator]
    sim.close()
    assert len(starts) == 1


def test_a_users_own_freeze_between_runs_works_and_the_next_run_is_virtual_again() -> None:
    import freezegun

    sim = Simulation(seed=1)
    sim.queue(Clocks())
    sim.run_for(timedelta(seconds=10))
    with freezegun.freeze_time("2001-02-03 04:05:06"):
        assert datetime.now() == datetime(2001, 2, 3, 4, 5, 6)
    assert abs(time.time() - time.mktime(time.localtime())) < 2  # the real clock again
    sim.queue(Clocks())
    before = sim.now
    sim.run_for(timedelta(seconds=10))
    assert before <= SEEN["now0"] < before + timedelta(seconds=2)  # type: ignore[operator]
    assert SEEN["now1"] - SEEN["now0"] == timedelta(seconds=3)  # type: ignore[operator]
    sim.close()
    assert time.time() > datetime(2026, 1, 1, tzinfo=UTC).timestamp()


class Swallower(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        try:
            time.sleep(10)
        except Exception:  # must not catch the stop
            SEEN["swallowed"] = True


class Stubborn(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        with contextlib.suppress(BaseException):
            time.sleep(10)
        time.sleep(1)  # raises again: a stopped task can't sleep on


class Obstinate(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> Any:
        with contextlib.suppress(BaseException):
            time.sleep(10)
        return "a result after the deadline is ignored"


@pytest.mark.parametrize("cls", [Swallower, Stubborn, Obstinate])
def test_a_task_is_stopped_at_its_deadline_whatever_it_catches(cls: type[tullius.Task]) -> None:
    SEEN.pop("swallowed", None)
    sim = Simulation(seed=2)
    task = cls()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    assert_chain(sim.chain(task), [expect("timeout", duration=timedelta(seconds=3))])
    assert "swallowed" not in SEEN
    sim.close()


class Exits(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        sys.exit(3)


class Interrupts(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        raise KeyboardInterrupt


class Odd(BaseException):
    pass


class RaisesOdd(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        raise Odd("odd")


def test_sys_exit_in_run_is_an_exception_as_in_the_daemon() -> None:
    sim = Simulation(seed=3)
    task = Exits()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "exception"
    assert link.failure.message == "run() raised SystemExit: 3"
    assert link.failure.traceback is not None
    assert "sys.exit(3)" in link.failure.traceback
    sim.close()


def test_os_exit_in_run_ends_the_test_process_as_the_readme_warns() -> None:
    import subprocess

    code = (
        "import os\n"
        "from datetime import timedelta\n"
        "import tullius\n"
        "from tullius.sim import Simulation\n"
        "class Dies(tullius.Task):\n"
        "    timeout = timedelta(seconds=5)\n"
        "    def run(self):\n"
        "        os._exit(7)\n"
        "with Simulation() as sim:\n"
        "    sim.queue(Dies())\n"
        "    sim.drain()\n"
        "print('survived')\n"
    )
    env = {**os.environ, "TULLIUS_SIM_PIN_CPU": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 7
    assert "survived" not in result.stdout


HELPER = type(sys)("helper_with_its_own_sleep")  # a module the task's module imported
exec("from time import sleep as pause\n\ndef nap(secs):\n    pause(secs)\n", HELPER.__dict__)
sys.modules[HELPER.__name__] = HELPER


class NapsInAHelper(tullius.Task):
    timeout = timedelta(seconds=5)
    secs: float

    def run(self) -> None:
        HELPER.nap(self.secs)


def test_a_helpers_own_from_time_import_sleep_takes_virtual_time_too() -> None:
    with Simulation(seed=3) as sim:
        quick, slow = NapsInAHelper(secs=2), NapsInAHelper(secs=8)
        sim.queue([quick, slow])
        sim.drain(within=timedelta(minutes=1))
        assert_outcomes(sim.chain(quick), "succeeded")
        [link] = sim.chain(quick)
        assert link.finished_at is not None
        assert link.started_at is not None
        assert link.finished_at - link.started_at == timedelta(seconds=2)
        # 8 s in a helper is past the 5 s timeout, as under tulliusd
        assert [link.failure.kind for link in sim.chain(slow) if link.failure] == ["timeout"]
    # and once the simulation is closed, the helper has the real sleep again
    assert HELPER.pause is virtual_time.REAL[0]


def test_a_task_class_defined_inside_a_test_runs_in_the_simulator() -> None:
    class Local(tullius.Task):
        timeout = timedelta(seconds=5)

        def run(self) -> None:
            time.sleep(1)

    with Simulation(seed=3) as sim:
        task = Local()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=1))
        assert_outcomes(sim.chain(task), "succeeded")


def test_other_base_exceptions_are_an_exception_as_in_the_daemon() -> None:
    sim = Simulation(seed=3)
    task = RaisesOdd()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    assert_outcomes(sim.chain(task), "exception")
    sim.close()


def test_keyboard_interrupt_in_run_stops_the_simulation() -> None:
    sim = Simulation(seed=3)
    sim.queue(Interrupts())
    with pytest.raises(KeyboardInterrupt):
        sim.drain(within=timedelta(minutes=1))
    sim.close()


class SelfInterrupting(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, while the run goes on


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as in a terminal: a process started in the
    background by a shell without job control inherits it ignored (this test failed
    so, once, in a unit run started with ``&``)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_during_a_run_stops_it_and_the_next_run_goes_on() -> None:
    sim = Simulation(seed=3)
    sim.queue(SelfInterrupting())
    with pytest.raises(KeyboardInterrupt):
        sim.drain(within=timedelta(minutes=1))
    sim.run_for(timedelta(seconds=1))  # no KeyboardInterrupt left over
    sim.close()


def test_where_local_time_is_not_utc_the_clock_between_runs_is_the_local_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import freezegun.api

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        sim = Simulation(seed=1)
        sim.queue(Naps())
        sim.run_for(timedelta(seconds=5))
        local = freezegun.api.real_datetime.now()
        assert abs(datetime.now() - local) < timedelta(seconds=60)
        assert time.time is freezegun.api.real_time  # freezegun was stopped after the run
        sim.close()
    finally:
        monkeypatch.undo()
        time.tzset()


class Busy(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        end = time.time() + 1
        while time.time() < end:  # virtual time never moves without a sleep
            pass


def test_a_busy_loop_is_reported_naming_the_task_instead_of_hanging() -> None:
    sim = Simulation(seed=4, wall_limit=timedelta(seconds=0.3))
    task = Busy()
    sim.queue(task)
    with pytest.raises(UserCodeHang, match=r"Busy.run\(\) of task '.*' ran for 0.3 real seconds"):
        sim.drain(within=timedelta(minutes=1))
    sim.close()


class BusyAfterANap(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        time.sleep(1)
        end = time.time() + 1
        while time.time() < end:
            pass


def test_a_busy_loop_after_a_sleep_is_reported_too_and_the_simulation_stays_stopped() -> None:
    sim = Simulation(seed=4, wall_limit=timedelta(seconds=0.3))
    sim.queue([Naps(), BusyAfterANap(), Naps()])
    with pytest.raises(UserCodeHang, match=r"BusyAfterANap.run\(\) of task '.*' ran for 0.3"):
        sim.drain(within=timedelta(minutes=1))
    with pytest.raises(virtual_time.SimulationError, match="stopped at an earlier hang"):
        sim.run_for(timedelta(seconds=1))
    sim.close()


class Sleepy(tullius.Task):
    timeout = timedelta(minutes=5)
    naps: int

    def run(self) -> None:
        for _ in range(self.naps):
            time.sleep(0.5)


def test_many_sleepers_across_runs_end_as_they_would_in_one_run() -> None:
    def outcome(steps: int) -> list[str]:
        sim = Simulation(seed=9, servers=2, task_processes=[(3, 0, 10)], keep_trace=True)
        sim.queue([Sleepy(naps=n % 4) for n in range(12)])
        for _ in range(steps):
            sim.run_for(timedelta(seconds=30) / steps)
        sim.drain(within=timedelta(minutes=5))
        trace = sim.trace
        sim.close()
        return trace

    one = outcome(1)
    assert one == outcome(1)
    many = outcome(7)
    assert [line for line in one if "finish" in line] == [line for line in many if "finish" in line]


class Spawner(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        threading.Thread(target=time.sleep, args=(0.5,), name="user-thread").start()


class Joiner(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        worker = threading.Thread(target=lambda: None, name="joined")
        worker.start()
        worker.join()


def test_threads_left_running_by_run_are_refused() -> None:
    sim = Simulation(seed=5)
    sim.queue(Spawner())
    with pytest.raises(UserThreadLeak, match="user-thread"):
        sim.drain(within=timedelta(minutes=1))
    sim.close()


def test_threads_left_running_are_refused_in_later_runs_too() -> None:
    # The pool threads left from the first run must not be taken for the baseline.
    sim = Simulation(seed=5)
    sim.queue(Joiner())
    sim.drain(within=timedelta(minutes=1))
    sim.queue(Spawner())
    with pytest.raises(UserThreadLeak, match="user-thread"):
        sim.drain(within=timedelta(minutes=1))
    sim.close()


def test_threads_joined_inside_run_are_fine() -> None:
    sim = Simulation(seed=5)
    task = Joiner()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    assert_outcomes(sim.chain(task), "succeeded")
    sim.close()


class Parent(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> None:
        tullius.queue(Nap2(n=1))


class Nap2(tullius.Task):
    timeout = timedelta(seconds=3)
    n: int

    def run(self) -> None:
        time.sleep(self.n)


def test_tullius_queue_inside_run_goes_to_the_simulated_store() -> None:
    sim = Simulation(seed=6)
    sim.queue(Parent())
    counts = sim.drain(within=timedelta(minutes=1))
    assert counts.tasks == 2
    assert counts.succeeded == 2
    sim.close()


class BadHandler(tullius.Task):
    timeout = timedelta(seconds=3)
    failed_attempts = 3

    def run(self) -> None:
        raise ValueError("nope")

    def failed(self) -> Any:
        return "not a task"


class BadReturn(tullius.Task):
    timeout = timedelta(seconds=3)

    def run(self) -> Any:
        return 42


def test_a_failed_that_returns_garbage_is_retried_then_left_unhandled() -> None:
    sim = Simulation(seed=7)
    task = BadHandler()
    sim.queue(task)
    counts = sim.drain(within=timedelta(minutes=5))
    assert counts.unhandled == 1
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "exception"
    assert "ValueError: nope" in link.failure.message
    assert link.failure.traceback is not None
    assert "raise ValueError" in link.failure.traceback
    assert link.handler_error is not None
    assert link.handler_error.kind == "bad_return"
    assert link.handler_attempts == 3
    sim.close()


def test_run_returning_garbage_is_a_bad_return() -> None:
    sim = Simulation(seed=8)
    task = BadReturn()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    assert_outcomes(sim.chain(task), "bad_return")
    sim.close()


class Affinity(tullius.Task):
    timeout = timedelta(seconds=30)

    def run(self) -> None:
        SEEN["user affinity"] = os.sched_getaffinity(0)
        SEEN["user policy"] = os.sched_getscheduler(0)
        time.sleep(1)
        SEEN["user affinity after sleep"] = os.sched_getaffinity(0)


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs Linux and two CPUs",
)


@needs_two_cpus
def test_a_run_shares_one_cpu_between_scheduler_and_user_threads_and_restores_it() -> None:
    before = os.sched_getaffinity(0)
    policy = os.sched_getscheduler(0)
    with Simulation(seed=1) as sim:
        sim.queue([Affinity(), Affinity()])
        sim.drain(within=timedelta(minutes=1))
        assert len(SEEN["user affinity"]) == 1  # type: ignore[arg-type]
        assert SEEN["user affinity after sleep"] == SEEN["user affinity"]
        if policy == os.SCHED_OTHER:
            assert SEEN["user policy"] == os.SCHED_BATCH
        assert os.sched_getaffinity(0) == before
        assert os.sched_getscheduler(0) == policy


@needs_two_cpus
def test_the_pin_is_lifted_while_the_cpu_is_busy_and_can_be_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = os.sched_getaffinity(0)
    pool = BatonPool(10.0)
    baton = pool.spare()
    pool.cpu.start()
    assert len(os.sched_getaffinity(0)) == 1
    assert os.sched_getaffinity(baton.thread.native_id or 0) == os.sched_getaffinity(0)
    # As if the last check was long ago and the process got no CPU since:
    pool.cpu._since = (virtual_time.real_monotonic() - 1.0, time.process_time())
    pool.cpu.check()
    assert pool.cpu.cpu is None
    assert os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(baton.thread.native_id or 0) == before
    assert os.sched_getscheduler(baton.thread.native_id or 0) != os.SCHED_BATCH
    pool.cpu.stop()
    monkeypatch.setattr(cpu_pin, "PIN_TO_ONE_CPU", False)
    pool.cpu.start()
    assert os.sched_getaffinity(0) == before
    pool.close()


ASYNC_SEEN: list[Any] = []


class Gathers(tullius.Task):
    """Runs an asyncio program: two sleeps at once, and a wait_for that times out."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.gather(asyncio.sleep(2), asyncio.sleep(3))
            ASYNC_SEEN.append(loop.time() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(100), timeout=4)
            ASYNC_SEEN.append(loop.time() - start)
            async with asyncio.timeout(1):
                await asyncio.sleep(0.5)  # within its timeout: no error
            ASYNC_SEEN.append(await loop.run_in_executor(None, sum, [1, 2, 3]))

        asyncio.run(main())


def test_asyncio_timers_inside_run_follow_virtual_time() -> None:
    # Without it, the loop read freezegun's frozen clock and waited for real for
    # ever (UserCodeHang after wall_limit, 10 real seconds).
    ASYNC_SEEN.clear()
    sim = Simulation(seed=1)
    task = Gathers()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=5))
    assert ASYNC_SEEN[:2] == [pytest.approx(3.0, abs=1e-5), pytest.approx(7.0, abs=1e-5)]
    assert ASYNC_SEEN[2] == 6  # a real thread from the loop's executor still works
    assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(seconds=7.5))])
    sim.close()
    assert not getattr(selectors.DefaultSelector, "_tullius_virtual", False)


class AwaitsTooLong(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        async def main() -> None:
            try:
                await asyncio.sleep(60)
            except BaseException as error:
                ASYNC_SEEN.append(type(error).__name__)
                raise

        asyncio.run(main())

    def failed(self) -> None:
        return None


def test_an_async_run_past_its_deadline_is_stopped_exactly_there() -> None:
    ASYNC_SEEN.clear()
    sim = Simulation(seed=2)
    task = AwaitsTooLong()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=5))
    assert_chain(sim.chain(task), [expect("timeout", duration=timedelta(seconds=5))])
    assert ASYNC_SEEN == ["CancelledError"]  # asyncio.run cancelled it on the way out
    sim.close()


SYNC_SEEN: list[Any] = []


class SelectsItself(tullius.Task):
    """Synchronous code waiting on a selector, as a DNS or HTTP client library does."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            SYNC_SEEN.append(selector.select(0.01))  # a real wait: nothing to read


def test_synchronous_selectors_and_the_tests_own_loops_are_left_alone() -> None:
    with Simulation(seed=3) as sim:
        task = SelectsItself()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=1))
        # a real wait, taking no virtual time (not a virtual 10 ms)
        assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(0))])
        assert SYNC_SEEN == [[]]

        async def outside() -> float:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.01)
            return loop.time()

        assert asyncio.run(outside()) == pytest.approx(REAL_MONOTONIC(), abs=60)
    assert not getattr(asyncio.SelectorEventLoop.__init__, "_tullius_virtual", False)


def blocking(seconds: float) -> str:
    """Real work on an executor thread (its sleep is the real one: not a simulated worker)."""
    time.sleep(seconds)
    return "done"


class AwaitsRealWork(tullius.Task):
    """Awaits real work (a thread, a child process, a host name lookup) under timeouts,
    with a ticker's timer pending meanwhile."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            ticks = 0
            working = True

            async def ticker() -> None:
                nonlocal ticks
                while working:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticking = asyncio.ensure_future(ticker())
            ASYNC_SEEN.append(await asyncio.wait_for(asyncio.to_thread(blocking, 0.05), 30))
            await asyncio.wait_for(loop.getaddrinfo("localhost", 80), 5)
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "print('hi')", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(child.communicate(), 20)
            ASYNC_SEEN.append(out.strip().decode())
            working = False
            await ticking
            ASYNC_SEEN.append(ticks)

        asyncio.run(main())


def test_real_work_a_loop_awaits_takes_no_virtual_time_and_beats_its_timers() -> None:
    # The loop waits for it for real, virtual time standing still: before, a
    # timer pending meanwhile (the ticker's, a wait_for's) jumped virtual time
    # ahead, and a 50 ms thread "timed out" after 30 virtual seconds.
    for seed in range(3):
        ASYNC_SEEN.clear()
        with Simulation(seed=seed) as sim:
            task = AwaitsRealWork()
            sim.queue(task)
            sim.drain(within=timedelta(minutes=5))
            assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(seconds=0.01))])
        assert ASYNC_SEEN == ["done", "hi", 1]  # the ticker's first timer ran after it all


class ExactAsync(tullius.Task):
    """Sleeps just short of its 5 s deadline, on a loop of its own making."""

    timeout = timedelta(seconds=5)

    def run(self) -> None:
        loop = asyncio.SelectorEventLoop(selectors.DefaultSelector())
        try:
            loop.run_until_complete(asyncio.sleep(4.999999))
            loop.run_until_complete(asyncio.sleep(1e-7))  # under the clock's step: due now
        finally:
            loop.close()


def test_a_hand_made_loop_sleeps_to_the_microsecond_on_a_skewed_server() -> None:
    sim = Simulation(seed=4)
    sim.skew_clock("s1", timedelta(minutes=-3), at=timedelta(seconds=2))
    task = ExactAsync()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=5))
    # the loop's clock is the simulation's monotonic one: the wall clock set back
    # 3 minutes mid-run doesn't stretch the sleep, and 4.999999 s is not rounded up
    # to the deadline (drain() returned as the run's success was recorded)
    assert_outcomes(sim.chain(task), "succeeded")
    started = sim.chain(task)[0].started_at
    assert started is not None
    assert sim.elapsed == started - (sim.now - sim.elapsed) + timedelta(seconds=4.999999)
    sim.close()


class UsesAThread(tullius.Task):
    """Task A: a thread for a lookup, then a long nap while its loop's executor lives on."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        async def main() -> None:
            await asyncio.to_thread(blocking, 0)
            await asyncio.sleep(10)

        asyncio.run(main())


def test_a_task_is_not_blamed_for_the_threads_of_another_task_still_running() -> None:
    # Task B returned while A's executor thread (kept until A's asyncio.run ends)
    # was alive: B was refused with UserThreadLeak for a thread it never started.
    with Simulation(seed=5) as sim:
        a, b = UsesAThread(), Naps()
        sim.queue([a, b])
        sim.drain(within=timedelta(minutes=5))
        assert_outcomes(sim.chain(a), "succeeded")
        assert_outcomes(sim.chain(b), "succeeded")


class CancelsRealWork(tullius.Task):
    """Cancels an executor job whose thread goes on, with a timer left far ahead."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(100, lambda: None)  # left behind
            job = asyncio.ensure_future(asyncio.to_thread(blocking, 0.05))
            await asyncio.sleep(0)
            job.cancel()  # done at once; its thread goes on for 50 ms

        asyncio.run(main())  # which then waits for the executor's thread


def test_a_cancelled_job_still_running_is_waited_for_without_virtual_time() -> None:
    # Before, the job counted as over once cancelled, and asyncio.run's wait for
    # the executor slept to the timer left behind: past the deadline, a timeout.
    with Simulation(seed=6) as sim:
        task = CancelsRealWork()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(0))])


KEPT_LOOPS: list[asyncio.AbstractEventLoop] = []


class KeepsItsLoop(tullius.Task):
    """Makes a loop and keeps it (as a library caching one would), timing with call_at."""

    timeout = timedelta(seconds=60)

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        KEPT_LOOPS.append(loop)
        fired: list[float] = []
        start = time.monotonic()  # the same clock as the loop's, as in CPython
        loop.call_at(start + 1, lambda: fired.append(time.monotonic() - start))
        loop.run_until_complete(asyncio.sleep(2))
        ASYNC_SEEN.append(fired)


def test_a_loop_kept_past_close_gets_its_real_clock_back() -> None:
    ASYNC_SEEN.clear()
    with Simulation(seed=7) as sim:
        task = KeepsItsLoop()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(seconds=2))])
    assert [[pytest.approx(1.0, abs=1e-6)]] == ASYNC_SEEN
    [loop] = KEPT_LOOPS
    try:
        assert loop.time() == pytest.approx(REAL_MONOTONIC(), abs=5)
        assert loop.run_until_complete(asyncio.sleep(0.01, "real")) == "real"
    finally:
        loop.close()


class RunsAChild(tullius.Task):
    """A child process with a timeout, as a task shelling out would run it."""

    timeout = timedelta(seconds=60)
    seconds: float
    limit: float
    capture: bool

    def run(self) -> None:
        subprocess.run(
            [sys.executable, "-c", f"import time; time.sleep({self.seconds})"],
            timeout=self.limit,
            capture_output=self.capture,
            check=True,
        )


@pytest.mark.parametrize("capture", [False, True])
def test_a_child_process_within_its_timeout_succeeds_taking_no_virtual_time(
    capture: bool,
) -> None:
    # Without capture, subprocess's wait loop slept in virtual time while the
    # child ran for real: a 0.3 s child timed out after 30 virtual seconds.
    with Simulation(seed=1) as sim:
        task = RunsAChild(seconds=0.3, limit=30, capture=capture)
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_chain(sim.chain(task), [expect("succeeded", duration=timedelta(0))])


@pytest.mark.parametrize("capture", [False, True])
def test_a_child_process_past_its_timeout_fails_after_real_seconds(capture: bool) -> None:
    # With capture, the timeout read the frozen clock and never came: the child
    # was waited for to its end and the task succeeded.
    with Simulation(seed=1) as sim:
        task = RunsAChild(seconds=30, limit=0.3, capture=capture)
        sim.queue(task)
        started = REAL_MONOTONIC()
        sim.drain(within=timedelta(minutes=5))
        assert REAL_MONOTONIC() - started < 20  # the real timeout, not the child's end
        [link] = sim.chain(task)
        assert link.failure is not None
        assert "raised TimeoutExpired" in link.failure.message


class PollsInAHelperThread(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:  # on a frozen clock: for ever
                time.sleep(0.02)

        helper = threading.Thread(target=watch)
        helper.start()
        helper.join()


def test_a_helper_thread_reads_real_clocks_so_its_polling_loop_ends() -> None:
    with Simulation(seed=1, wall_limit=timedelta(seconds=20)) as sim:
        task = PollsInAHelperThread()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_outcomes(sim.chain(task), "succeeded")


class WaitsOnAPipe(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> None:
        import multiprocessing

        reader, writer = multiprocessing.Pipe(duplex=False)
        SEEN["pipe poll"] = reader.poll(0.1)  # its deadline read the frozen clock
        reader.close()
        writer.close()


def test_a_multiprocessing_wait_with_a_timeout_ends_in_real_time() -> None:
    with Simulation(seed=1) as sim:
        task = WaitsOnAPipe()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_outcomes(sim.chain(task), "succeeded")
    assert SEEN["pipe poll"] is False


class SleepsOddly(tullius.Task):
    timeout = timedelta(seconds=60)
    how: str

    def run(self) -> None:
        values = {"fraction": Fraction(1, 2), "text": "1", "nan": math.nan, "huge": 1e20}
        time.sleep(values[self.how])


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("fraction", "TypeError: 'Fraction' object cannot be interpreted as an integer"),
        ("text", "TypeError: 'str' object cannot be interpreted as an integer"),
        ("nan", "ValueError: Invalid value NaN (not a number)"),
        ("huge", "OverflowError: timestamp out of range for platform time_t"),
    ],
)
def test_a_sleep_of_a_value_time_sleep_refuses_raises_what_it_raises(how: str, error: str) -> None:
    with Simulation(seed=1) as sim:
        task = SleepsOddly(how=how)
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.message == f"run() raised {error}"


class StampsItsChild(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> tullius.Task:
        return Stamped(at=datetime.now(UTC))


class Stamped(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> None:
        SEEN["stamp type"] = type(self.at)


def test_a_time_taken_from_the_virtual_clock_comes_back_a_plain_datetime() -> None:
    with Simulation(seed=1) as sim:
        parent = StampsItsChild()
        sim.queue(parent)
        sim.drain(within=timedelta(minutes=5))
        stored = sim.chain(parent)[1].fields["at"]
    assert type(stored) is type(datetime(2030, 1, 1))  # not freezegun's FakeDatetime
    assert SEEN["stamp type"] is type(stored)


class ReturnsASlowGenerator(tullius.Task):
    timeout = timedelta(seconds=1)

    def run(self) -> Any:
        time.sleep(0.5)
        yield Stamped(at=datetime.now(UTC))
        time.sleep(3)  # while the return value is read: still the run's time


def test_a_generator_returned_by_run_is_read_within_the_runs_deadline() -> None:
    # Read after the step, its sleep crashed the run and left the task running.
    with Simulation(seed=1) as sim:
        task = ReturnsASlowGenerator()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=1))
        assert_chain(sim.chain(task), [expect("timeout", duration=timedelta(seconds=1))])


class ReadsDatetimeInAHelperThread(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> None:
        def watch() -> None:
            SEEN["helper now"] = datetime.now(UTC)
            deadline = datetime.now(UTC) + timedelta(seconds=0.2)
            while datetime.now(UTC) < deadline:
                time.sleep(0.02)

        helper = threading.Thread(target=watch)
        helper.start()
        helper.join()
        SEEN["task now"] = datetime.now(UTC)


def test_a_helper_thread_reads_the_real_datetime_too() -> None:
    with Simulation(seed=1, wall_limit=timedelta(seconds=20)) as sim:
        task = ReadsDatetimeInAHelperThread()
        sim.queue(task)
        sim.drain(within=timedelta(minutes=5))
        assert_outcomes(sim.chain(task), "succeeded")
        assert SEEN["task now"] >= sim.clock.start  # type: ignore[operator]
    assert abs(SEEN["helper now"] - datetime.now(UTC)) < timedelta(minutes=5)  # type: ignore[operator]


def test_a_user_module_named_like_subprocess_still_runs_in_virtual_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Matched by prefix, ``subprocess_jobs`` slept for real and read real clocks.
    (tmp_path / "subprocess_jobs.py").write_text(
        "import time\n"
        "from datetime import timedelta\n"
        "import tullius\n"
        "class Slow(tullius.Task):\n"
        "    timeout = timedelta(seconds=1)\n"
        "    def run(self):\n"
        "        time.sleep(2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import subprocess_jobs  # type: ignore[import-not-found]

    with Simulation(seed=1) as sim:
        task = subprocess_jobs.Slow()
        sim.queue(task)
        started = REAL_MONOTONIC()
        sim.drain(within=timedelta(minutes=1))
        assert REAL_MONOTONIC() - started < 1.5
        assert_outcomes(sim.chain(task), "timeout")


class RunsASimulation(tullius.Task):
    timeout = timedelta(seconds=60)

    def run(self) -> None:
        with Simulation(seed=2) as inner:
            inner.queue(Stamped(at=datetime.now(UTC)))
            inner.drain(within=timedelta(minutes=1))


def test_a_simulation_inside_a_task_leaves_freezegun_as_it_found_it() -> None:
    import freezegun
    import freezegun.api

    original = freezegun.api._should_use_real_time
    with Simulation(seed=1) as sim:
        sim.queue(RunsASimulation())
        sim.drain(within=timedelta(minutes=5))
    assert freezegun.api._should_use_real_time is original
    with freezegun.freeze_time("2001-01-01"):
        assert datetime.now(UTC).year == 2001
        assert time.gmtime().tm_year == 2001
