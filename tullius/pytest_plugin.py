"""Tullius's pytest plugin, registered by entry point: installing Tullius is enough.

Fixtures:
    memory_store: a fresh `MemoryStore`.

Importing this module must stay cheap and must not import pymongo.
"""

from __future__ import annotations

import pytest

from tullius.sim.memory_store import MemoryStore


@pytest.fixture
def memory_store() -> MemoryStore:
    """A fresh, empty in-memory store."""
    return MemoryStore()
