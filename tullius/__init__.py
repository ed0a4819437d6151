"""Tullius: fault-tolerant task processing where no failure is ever silent.

The public API, re-exported here and nowhere else.  See the README for use and
``docs/design.md`` for how it works.
"""

from tullius.api import chain, configure, keyed_id, queue, retry_unhandled, tree
from tullius.band import Band
from tullius.document import Failure, FailureKind, Status
from tullius.errors import (
    ConfigError,
    InvalidTransition,
    KeyConflict,
    NotRetried,
    StoreError,
    StoreUnavailable,
    TaskDefinitionError,
    TaskDefinitionWarning,
    TaskError,
    TaskFieldError,
    TaskNotFound,
    TulliusError,
    UnknownTaskClass,
    WriteWindowClosed,
)
from tullius.inspection import ChainLink, ChainTree
from tullius.retry import Retry
from tullius.task import Task

__version__ = "0.1.0"

__all__ = [
    "Band",
    "ChainLink",
    "ChainTree",
    "ConfigError",
    "Failure",
    "FailureKind",
    "InvalidTransition",
    "KeyConflict",
    "NotRetried",
    "Retry",
    "Status",
    "StoreError",
    "StoreUnavailable",
    "Task",
    "TaskDefinitionError",
    "TaskDefinitionWarning",
    "TaskError",
    "TaskFieldError",
    "TaskNotFound",
    "TulliusError",
    "UnknownTaskClass",
    "WriteWindowClosed",
    "__version__",
    "chain",
    "configure",
    "keyed_id",
    "queue",
    "retry_unhandled",
    "tree",
]
