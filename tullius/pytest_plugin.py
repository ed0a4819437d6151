"""Tullius's pytest plugin, registered by entry point: installing Tullius is enough.

Fixtures:
    memory_store: a fresh `MemoryStore`.
    tullius_sim: a fresh `tullius.sim.Simulation`; its seed comes from
        ``--tullius-seed`` or, by default, from the test's id (stable across
        runs, different between tests).  Invariants are checked at teardown.
    tullius_sim_factory: ``make(**kwargs)`` for simulations with other settings
        (``servers=3``, ``racy_updates=0.3``...); the n-th gets seed + n.

Option:
    --tullius-seed=N: run every simulation of the session with seed N.

When a test that used a simulation fails, its report gets a "tullius
simulation" section: the seed, the faults applied, and a one-line replay
command.

Importing this module must stay cheap: it imports pytest and nothing of the
simulator until a fixture is used (and never pymongo).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tullius.sim.memory_store import MemoryStore
    from tullius.sim.simulation import Simulation

_SIMS = pytest.StashKey[list["Simulation"]]()
_BASE_SEED = pytest.StashKey[int]()
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tullius")
    group.addoption(
        "--tullius-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for every tullius_sim simulation (default: derived from each test's id)",
    )


@pytest.fixture
def memory_store() -> MemoryStore:
    """A fresh, empty in-memory store."""
    from tullius.sim.memory_store import MemoryStore

    return MemoryStore()


@pytest.fixture
def tullius_sim_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Simulation]]:
    """Make simulations seeded for this test; invariants checked and threads stopped at teardown."""
    from tullius.sim.simulation import Simulation

    option = request.config.getoption("tullius_seed")
    base = option if option is not None else zlib.crc32(request.node.nodeid.encode())
    sims: list[Simulation] = []
    request.node.stash[_SIMS] = sims
    request.node.stash[_BASE_SEED] = base

    def make(**kwargs: Any) -> Simulation:
        kwargs.setdefault("seed", base + len(sims))
        sim = Simulation(**kwargs)
        sims.append(sim)
        return sim

    yield make
    try:
        if not request.node.stash.get(_CALL_FAILED, False):
            for sim in sims:
                sim.check()
    finally:
        for sim in sims:
            sim.close()


@pytest.fixture
def tullius_sim(tullius_sim_factory: Callable[..., Simulation]) -> Simulation:
    """A fresh simulation with default settings (one server, task_processes [(10, 0, 10)])."""
    return tullius_sim_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    sims = item.stash.get(_SIMS, None)
    if not sims or not report.failed:
        return
    if report.when == "call":
        item.stash[_CALL_FAILED] = True
    base = item.stash.get(_BASE_SEED, sims[0].seed)
    lines = []
    for sim in sims:
        lines.append(f"seed: {sim.seed} (virtual time {sim.elapsed}, {sim.events} events)")
        lines.append(f"faults: {sim.faults!r}")
    # Relative to where pytest was run (as its own FAILED lines), not to the
    # project's root, so that it pastes back from there; quoted for a POSIX shell,
    # even a parametrized id with a quote in it.
    nodeid = _relative_to_where_run(item.config, item.nodeid)
    quoted = "'" + nodeid.replace("'", "'\"'\"'") + "'"
    lines.append(f"replay: pytest {quoted} --tullius-seed={base}")
    report.sections.append(("tullius simulation", "\n".join(lines)))


def _relative_to_where_run(config: pytest.Config, nodeid: str) -> str:
    """``nodeid`` (relative to the project's root) relative to where pytest was run.

    (``Config.cwd_relative_nodeid`` takes a string or an object, by pytest version.)
    """
    path, sep, rest = nodeid.partition("::")
    here = config.invocation_params.dir
    if here == config.rootpath:
        return nodeid
    return os.path.relpath(config.rootpath / path, here) + sep + rest
