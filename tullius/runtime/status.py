"""``tulliusd --status``: what an operator must look at, read from the database.

Why: the failures Tullius cannot settle on its own end in two places an
operator has to find without knowing where to look: tasks left
``unhandled`` (every try of ``failed()`` failed), and work no running daemon
takes (`tullius.coverage`).  The report lists both, with the daemons the
database has heard from and the tasks counted by status, and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tullius.coverage import EXAMPLES, LIVE_CHECKS, Coverage, read_coverage
from tullius.document import Status
from tullius.engine import drive
from tullius.inspection import ChainLink, read_chain
from tullius.policy import LeaseTimings
from tullius.store import ServerSeen, Store


@dataclass(frozen=True)
class StatusReport:
    """What `format_status` prints."""

    now: datetime
    #: Servers seen within this are counted as running.
    live_within: timedelta
    servers: tuple[ServerSeen, ...]
    counts: dict[Status, int]
    coverage: Coverage
    #: At most `EXAMPLES` unhandled tasks.
    unhandled: tuple[ChainLink, ...]


def read_status(store: Store, *, now: datetime, lease: timedelta) -> StatusReport:
    """Read the report; ``lease``: the daemons' (it sets how often they renew their entries)."""
    live_within = LIVE_CHECKS * LeaseTimings(lease).coverage_check
    unhandled = store.find_by_status([Status.UNHANDLED], EXAMPLES)
    return StatusReport(
        now=now,
        live_within=live_within,
        servers=tuple(store.read_servers()),
        counts=store.count_by_status(),
        coverage=drive(store, read_coverage(now=now, live_within=live_within)),
        unhandled=tuple(read_chain(store, doc.task_id)[0] for doc in unhandled),
    )


def format_status(report: StatusReport) -> str:
    """The report as text: one section each, the problems spelt out."""
    lines = [f"servers (running: seen within {_ago(report.live_within)}):"]
    for seen in report.servers:
        age = report.now - seen.seen_at
        state = "running" if age <= report.live_within else "not seen"
        bands = " ".join(str(band) for band in seen.bands)
        lines.append(f"  {seen.server}  {state}, last seen {_ago(age)} ago, bands {bands}")
    if not report.servers:
        lines.append("  none has recorded itself")
    counted = ", ".join(
        f"{status.value} {report.counts[status]:,}" for status in Status if status in report.counts
    )
    lines.append(f"tasks by status: {counted or 'none'}")
    stranded = report.coverage.stranded
    lines.append(
        "waiting for a priority no running server takes: "
        + ("none" if not stranded else f"{len(stranded)}{'+' if len(stranded) >= EXAMPLES else ''}")
    )
    lines += [
        f"  priority {doc.priority:g}  {doc.class_name}  {doc.task_id}  due since "
        f"{doc.due_at.isoformat() if doc.due_at else '?'}"
        for doc in stranded
    ]
    total = report.counts.get(Status.UNHANDLED, 0)
    lines.append(f"unhandled (every try of failed() failed; for an operator): {total:,}")
    for link in report.unhandled:
        failure = link.failure
        error = link.handler_error
        lines.append(
            f"  {link.task_id}  {link.class_name}  "
            + (f"failed ({failure.kind}: {_line(failure.message)})" if failure else "failed")
            + (f"; failed() error ({error.kind}: {_line(error.message)})" if error else "")
        )
    if total > len(report.unhandled):
        lines.append(f"  ... and {total - len(report.unhandled):,} more")
    return "\n".join(lines)


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _line(message: str, width: int = 120) -> str:
    """A message on one line, cut to ``width``."""
    flat = " ".join(message.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
