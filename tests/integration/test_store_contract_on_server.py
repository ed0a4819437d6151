"""The store contract, and racing engines, on a real MongoDB-wire server.

FerretDB runs as it is (its conditional updates race); with
TULLIUS_TEST_MONGODB_URI the same tests run against that server.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from daemon_harness import mongo_client, open_store

from tests.store_contract import StoreContract, make_doc
from tullius.band import Band
from tullius.document import Failure, FailureKind, RecordKind, Status, TaskSpec, status_of
from tullius.engine import claim, drive, finish, sweep
from tullius.events import Failed, HandlerSucceeded, Succeeded
from tullius.policy import LeaseWatch


class TestMongoStoreOnServer(StoreContract):
    @pytest.fixture
    def store(self, mongodb_uri: str, database_name: str, mongo: Any) -> Any:
        return open_store(mongodb_uri, database_name, client=mongo)


SUCCESSOR = TaskSpec("tests:Next", {"n": 1}, 5, timedelta(seconds=5), timedelta(seconds=5), 2)


def test_racing_engines_decide_every_task_exactly_once(
    mongodb_uri: str, database_name: str, mongo: Any
) -> None:
    # Given 60 queued tasks and four servers, each with its own connection,
    setup = open_store(mongodb_uri, database_name, client=mongo)
    setup.insert_tasks([make_doc(f"t{i:03}", priority=i % 3) for i in range(60)])
    errors: list[BaseException] = []
    band = Band(1, 0, 10)

    def server(name: str) -> None:
        client = mongo_client(mongodb_uri)
        store = open_store(mongodb_uri, database_name, client=client)
        rng = random.Random(name)
        try:
            for n in range(400):  # bounded: far more rounds than work
                now = datetime.now(UTC)
                job = drive(
                    store, claim(band, server=name, worker="w", token=f"{name}-{n}", now=now)
                )
                if job is None:
                    if store.find_by_status([Status.QUEUED, Status.FAILED], 1):
                        continue
                    # Nothing due by the hints; but a racing update may have left a hint
                    # that hides work (a failed task hinted running), so before quitting
                    # repair hints as a daemon's sweeps do (a constant clock: no lease
                    # of a racing server is ever failed as lost here).
                    repair = sweep(
                        LeaseWatch(timedelta(seconds=1)),
                        observer=name,
                        now=datetime.now(UTC),
                        monotonic=lambda: 0.0,
                    )
                    if not drive(store, repair).repaired:
                        return
                    continue
                # Roots spawn one task (a successor or a replacement); those spawn nothing.
                spawned = (SUCCESSOR,) if job.view.task.parent_id is None else ()
                if job.kind.value == "run":
                    event: Any = (
                        Succeeded(job.token, spawned)
                        if rng.random() < 0.5
                        else Failed(job.token, Failure(FailureKind.EXCEPTION, "boom", now))
                    )
                else:
                    event = HandlerSucceeded(job.token, spawned)
                drive(store, finish(job, event, now=datetime.now(UTC)))
        except BaseException as error:  # reported by the test thread
            errors.append(error)
        finally:
            client.close()

    # When they race to claim, run and handle them (successors are new work too),
    threads = [threading.Thread(target=server, args=(f"s{k}",), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "servers did not finish within 300 s"
    assert not errors, errors

    # Then a sweep settles any hint a racing update left behind,
    drive(
        setup,
        sweep(
            LeaseWatch(timedelta(seconds=1)),
            observer="x",
            now=datetime.now(UTC),
            monotonic=lambda: 0.0,
        ),
    )
    roots = [setup.load(f"t{i:03}") for i in range(60)]
    for view in roots:
        assert view is not None
        # and every root was decided once: one run, one outcome, at most one handler result,
        status = status_of(view)
        assert status in (Status.SUCCEEDED, Status.HANDLED), (view.task_id, status)
        runs = [r for r in view.records.values() if r.kind is RecordKind.RUN]
        assert len(runs) == 1
        assert view.handler_attempt <= 1
        # and what it spawned was inserted exactly once, under the derived id.
        children = setup.find_children(view.task_id)
        assert len(children) == 1, (view.task_id, children)
    # and, every task being finished, all of them moved out of the live queue.
    assert mongo[database_name]["finished"].count_documents({}) == 60 * 2
    assert all(live.count_documents({}) == 0 for live in setup.live_collections())
    # and the spawned tasks ran to an end too.
    for doc in mongo[database_name]["finished"].find({"parent_id": {"$ne": None}}):
        child = setup.load(doc["_id"])
        assert child is not None
        assert status_of(child) in (Status.SUCCEEDED, Status.HANDLED)


def test_stores_announcing_work_at_once_on_a_new_database_all_succeed(
    mongodb_uri: str, database_name: str, mongo: Any
) -> None:
    # Given eight stores, each with its own connection, and a database whose
    # queue was never announced (its counter document does not exist yet),
    stores = [
        open_store(mongodb_uri, database_name, client=mongo_client(mongodb_uri)) for _ in range(8)
    ]
    errors: list[BaseException] = []
    for round_ in range(10):
        mongo[database_name]["tullius_meta"].delete_one({"_id": "queue"})
        barrier = threading.Barrier(len(stores))

        def queue(barrier: threading.Barrier, task_id: str, store: Any) -> None:
            barrier.wait()
            try:
                store.insert_tasks([make_doc(task_id)])
            except BaseException as error:  # reported by the test thread
                errors.append(error)

        # when they all queue a task at the same moment,
        threads = [
            threading.Thread(target=queue, args=(barrier, f"r{round_}-{k}", store), daemon=True)
            for k, store in enumerate(stores)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    for store in stores:
        store.db.client.close()
    # then every insert succeeded (on FerretDB one of two racing upserts of the
    # counter fails with a duplicate key: the counter exists, the bump is done),
    assert not errors, errors[:3]
    # and every task is there.
    live = open_store(mongodb_uri, database_name, client=mongo).live_collections()
    assert sum(collection.count_documents({}) for collection in live) == 80
