"""The store contract on the in-process stores: MemoryStore and MongoStore over mongomock."""

from __future__ import annotations

import mongomock
import pytest

from tests.store_contract import StoreContract
from tullius.runtime.mongo_store import MongoStore
from tullius.sim.memory_store import MemoryStore


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()


class TestMongoStoreOnMongomock(StoreContract):
    @pytest.fixture
    def store(self) -> MongoStore:
        store = MongoStore(mongomock.MongoClient(tz_aware=True)["tullius_test"])
        store.ensure_indexes()
        return store


class TestMongoStoreShardedOnMongomock(StoreContract):
    """The live queue split over three collections and records over five, as on
    FerretDB (which gets eight and 64)."""

    @pytest.fixture
    def store(self) -> MongoStore:
        store = MongoStore(
            mongomock.MongoClient(tz_aware=True)["tullius_test"], live_shards=3, record_shards=5
        )
        store.ensure_indexes()
        return store
