"""tullius.sim: the daemon's engine under a seeded scheduler, virtual time and injected faults.

The public simulator API, re-exported here.  ``tullius.sim.strategies`` (Hypothesis)
is imported on its own, so that this package does not import Hypothesis.
"""

from tullius.sim.clock import ServerClock, SimClock
from tullius.sim.faults import (
    ClockSkew,
    Fault,
    ServerCrash,
    ServerPause,
    ServerStop,
    StepCrash,
    StoreFault,
    StoreOutage,
    WorkerCrash,
)
from tullius.sim.invariants import DrainTimeout, InvariantViolation, NoTimePasses
from tullius.sim.memory_store import MemoryStore
from tullius.sim.simulation import Counts, Simulation
from tullius.sim.virtual_time import (
    SimulationError,
    TaskStopped,
    UserCodeHang,
    UserThreadLeak,
)

__all__ = [
    "ClockSkew",
    "Counts",
    "DrainTimeout",
    "Fault",
    "InvariantViolation",
    "MemoryStore",
    "NoTimePasses",
    "ServerClock",
    "ServerCrash",
    "ServerPause",
    "ServerStop",
    "SimClock",
    "Simulation",
    "SimulationError",
    "StepCrash",
    "StoreFault",
    "StoreOutage",
    "TaskStopped",
    "UserCodeHang",
    "UserThreadLeak",
    "WorkerCrash",
]
