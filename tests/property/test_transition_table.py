"""Exhaustive: every (reachable status, event) pair either steps as the table says or
raises InvalidTransition with nothing changed."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta

from tests.store_contract import T0, make_doc
from tullius.document import (
    Failure,
    FailureKind,
    RecordKind,
    Status,
    TaskSpec,
    TaskView,
    handler_id,
    run_id,
    status_of,
)
from tullius.effects import InsertRecord
from tullius.errors import InvalidTransition
from tullius.events import (
    Claimed,
    Event,
    Failed,
    HandlerClaimed,
    HandlerFailed,
    HandlerSucceeded,
    LeaseExpired,
    Succeeded,
    Swept,
)
from tullius.machine import TRANSITIONS, step

LATER = T0 + timedelta(days=1)


def now_for(view: TaskView) -> datetime:
    """A time by which every backoff of ``view`` is over: an hour per record."""
    return LATER + timedelta(hours=len(view.records))


SPEC = TaskSpec("tests:Next", {}, 5, timedelta(seconds=1), timedelta(seconds=1), 2)
BOOM = Failure(FailureKind.EXCEPTION, "boom", T0)


def candidate_events(view: TaskView) -> list[Event]:
    """Events of every type: from the owner, from a stranger, for the live lease and another."""
    tokens = {"stranger"}
    tokens.update(record.token for record in view.records.values())
    events: list[Event] = [Swept(), LeaseExpired("t:nonsense", "obs")]
    for token in sorted(tokens):
        events += [
            Claimed(token, "s"),
            Succeeded(token, (SPEC,)),
            Failed(token, BOOM),
            HandlerClaimed(token, "s"),
            HandlerSucceeded(token, (SPEC,)),
            HandlerFailed(token, BOOM),
        ]
    events.append(LeaseExpired(run_id("t"), "obs"))
    events += [LeaseExpired(handler_id("t", n), "obs") for n in range(1, 4)]
    return events


def reachable_views() -> list[TaskView]:
    """Every view reachable from a queued task by legal steps (handler_attempts=2)."""
    doc = make_doc("t")
    start = TaskView(doc.__class__(**{**doc.__dict__, "handler_attempts": 2}))
    seen: dict[tuple[str, ...], TaskView] = {(): start}
    frontier = [start]
    counter = 0
    while frontier:
        view = frontier.pop()
        for event in candidate_events(view):
            if isinstance(event, Claimed | HandlerClaimed):
                counter += 1
                event = type(event)(f"tok{counter}", "s")
            try:
                new = step(view, event, now=now_for(view)).view
            except InvalidTransition:
                continue
            key = tuple(sorted(f"{r.record_id}/{r.ok}" for r in new.records.values()))
            if key not in seen:
                seen[key] = new
                frontier.append(new)
    return list(seen.values())


def test_every_status_is_reachable() -> None:
    assert {status_of(view) for view in reachable_views()} == set(Status)


def test_every_status_event_pair_steps_as_the_table_says_or_changes_nothing() -> None:
    checked = 0
    for view in reachable_views():
        status = status_of(view)
        for event in candidate_events(view):
            before = copy.deepcopy(view)
            try:
                result = step(view, event, now=now_for(view))
            except InvalidTransition as error:
                assert view == before
                # the loop decides per pair whether a refusal is expected
                assert error.status == status.value  # noqa: PT017
                continue
            checked += 1
            assert type(event) in TRANSITIONS[status]
            assert result.status in TRANSITIONS[status][type(event)]
            if isinstance(event, Swept):
                assert result.record is None
                assert all(not isinstance(e, InsertRecord) for e in result.effects)
            else:
                assert result.effects[0] == InsertRecord(result.record)  # type: ignore[arg-type]
                assert result.record is not None
                assert result.record.record_id not in view.records
    assert checked >= 20  # a floor against the enumeration silently shrinking


def test_events_missing_from_the_table_are_always_refused() -> None:
    for view in reachable_views():
        allowed = TRANSITIONS[status_of(view)]
        for event in candidate_events(view):
            if type(event) not in allowed:
                try:
                    step(view, event, now=now_for(view))
                except InvalidTransition:
                    continue
                raise AssertionError(f"{event!r} stepped in {status_of(view)}")


def test_records_form_a_chain_where_each_needs_the_one_before() -> None:
    for view in reachable_views():
        kinds = [record.kind for record in view.records.values()]
        if RecordKind.OUTCOME in kinds:
            assert view.run is not None
        for n in range(1, view.handler_attempt + 1):
            assert view.handler(n) is not None
            if n > 1:
                end = view.handler_end(n - 1)
                assert end is not None
                assert end.ok is False
