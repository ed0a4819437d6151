"""``queue(..., key=...)`` in the simulator: a repeated call stores its tasks once."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import tullius
from tullius.sim import Simulation, StoreFault
from tullius.testing import assert_chain, expect

RECEIPTS: list[int] = []


class Receipt(tullius.Task):
    timeout = timedelta(seconds=10)
    order: int

    def run(self) -> None:
        RECEIPTS.append(self.order)


class Checkout(tullius.Task):
    """Queues the order's receipt 3 s into its run; a failure is tried once more."""

    timeout = timedelta(seconds=30)
    order: int
    keyed: bool
    attempt: int = 0

    def run(self) -> None:
        time.sleep(3)
        receipt = Receipt(order=self.order)
        tullius.queue(receipt, key=f"receipt-{self.order}" if self.keyed else None)

    def failed(self) -> Checkout | None:
        return self.copy(attempt=self.attempt + 1) if self.attempt == 0 else None


@pytest.fixture(autouse=True)
def _no_receipts() -> None:
    RECEIPTS.clear()


@pytest.mark.parametrize(("keyed", "receipts"), [(True, [7]), (False, [7, 7])])
def test_a_queue_call_whose_answer_was_lost_repeated_with_its_key_stores_once(
    keyed: bool, receipts: list[int]
) -> None:
    # Given a checkout whose queue() of the receipt is stored, but its answer lost:
    # queue() raises in run(), which fails, and failed() tries the checkout again
    sim = Simulation(seed=11)
    checkout = Checkout(order=7, keyed=keyed)
    sim.queue(checkout)
    sim.apply([StoreFault("s1", "InsertTasks", "lost_ack", at=timedelta(seconds=2))])
    # When it drains
    sim.drain(within=timedelta(minutes=5))
    # Then the second attempt's queue() with the key finds the receipt stored and stores
    # nothing: the receipt is sent once (without a key, twice)
    assert_chain(
        sim.chain(checkout),
        [expect("failed", kind="exception", attempt=0), expect("succeeded", attempt=1)],
    )
    assert receipts == RECEIPTS
    sim.close()


def test_sim_queue_with_a_key_twice_stores_the_task_once() -> None:
    sim = Simulation(seed=1)
    first = sim.queue(Receipt(order=1), key="receipt-1")
    assert sim.queue(Receipt(order=1), key="receipt-1") == first == [tullius.keyed_id("receipt-1")]
    counts = sim.drain(within=timedelta(minutes=1))
    assert (counts.tasks, counts.succeeded) == (1, 1)
    # And after it ran, a repeat still stores nothing: the key is kept with the task
    sim.queue(Receipt(order=1), key="receipt-1")
    assert sim.drain(within=timedelta(minutes=1)).tasks == 1
    assert RECEIPTS == [1]
    sim.close()


def test_sim_queue_with_a_key_used_for_another_task_is_a_key_conflict() -> None:
    sim = Simulation(seed=1)
    sim.queue(Receipt(order=1), key="receipt")
    with pytest.raises(tullius.KeyConflict, match=r"field 'order': 1 stored, 2 given"):
        sim.queue(Receipt(order=2), key="receipt")
    assert sim.drain(within=timedelta(minutes=1)).tasks == 1
    sim.close()


class ReusesAKey(tullius.Task):
    timeout = timedelta(seconds=10)

    def run(self) -> None:
        tullius.queue(Receipt(order=1), key="shared")
        tullius.queue(Receipt(order=2), key="shared")


def test_a_key_conflict_in_user_code_is_raised_there_as_itself() -> None:
    sim = Simulation(seed=2)
    task = ReusesAKey()
    sim.queue(task)
    sim.drain(within=timedelta(minutes=1))
    [link] = sim.chain(task)
    assert link.failure is not None
    assert link.failure.kind == "exception"
    assert "KeyConflict: queue() key='shared' is already task" in link.failure.message
    assert RECEIPTS == [1]
    sim.close()
