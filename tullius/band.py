"""Process bands: how many workers serve which priorities.

The original ``tullius_deps.task_processes`` is a list of ``(count,
min_priority, max_priority)``: ``[(10, 0, 10), (5, 0, 0)]`` runs ten workers
for priorities 0-10 and five more that only take priority 0, reserving
capacity for the most urgent work.  Bands may overlap; that is the point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from tullius.errors import ConfigError

_PROCESSES_FLAG = re.compile(r"^\s*(\d+)\s*:\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Band:
    """``count`` workers, each taking tasks with ``min_priority <= priority <= max_priority``."""

    count: int
    min_priority: float
    max_priority: float

    def __str__(self) -> str:
        if self.min_priority == -math.inf and self.max_priority == math.inf:
            return f"{self.count}:all"
        low, high = format_priority(self.min_priority), format_priority(self.max_priority)
        return f"{self.count}:{low}-{high}"

    def covers(self, priority: float) -> bool:
        return self.min_priority <= priority <= self.max_priority


#: Every priority: the default band of ``tulliusd`` (only a default may be infinite).
ALL: Final = (-math.inf, math.inf)


def format_priority(priority: float) -> str:
    """A priority as written, exactly: ``10``, ``0.5``, ``10.0000001``, ``1234567``.

    Why not ``:g``: its six digits print 10.0000001 as 10, so a warning would
    say a priority-10 task waits beside a band that takes 10.
    """
    if isinstance(priority, int):
        return str(priority)
    if priority.is_integer() and abs(priority) < 2**53:
        return str(int(priority))
    return repr(priority)


def band_from_tuple(entry: Any, *, setting: str = "task_processes[0]") -> Band:
    """Validate one ``(count, min_priority, max_priority)`` entry.

    Raises:
        ConfigError: naming ``setting`` and what is expected.
    """
    expected = "must be (count > 0, min_priority <= max_priority), e.g. (10, 0, 10)"
    if not isinstance(entry, tuple | list) or len(entry) != 3:
        raise ConfigError(setting, entry, expected)
    count, low, high = entry
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ConfigError(setting, entry, expected)
    for value in (low, high):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(setting, entry, expected)
    if low > high:
        raise ConfigError(setting, entry, expected)
    return Band(count, low, high)


def bands_from_setting(
    entries: Iterable[Any], *, setting: str = "task_processes"
) -> tuple[Band, ...]:
    """Validate a whole ``task_processes`` list; at least one band is required."""
    if isinstance(entries, str | bytes) or not isinstance(entries, Iterable):
        raise ConfigError(setting, entries, "must be a list of (count, min_priority, max_priority)")
    bands = tuple(
        band_from_tuple(entry, setting=f"{setting}[{index}]") for index, entry in enumerate(entries)
    )
    if not bands:
        raise ConfigError(setting, list(entries), "must have at least one band")
    return bands


def parse_band(text: str, *, setting: str = "--processes") -> Band:
    """Parse the command-line form ``COUNT:MIN-MAX`` (e.g. ``10:0-10``)."""
    match = _PROCESSES_FLAG.match(text)
    if match is None:
        raise ConfigError(setting, text, "must look like COUNT:MIN-MAX, e.g. 10:0-10")
    count, low, high = match.groups()
    return band_from_tuple((int(count), _number(low), _number(high)), setting=setting)


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value
