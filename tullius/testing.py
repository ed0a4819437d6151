"""Helpers for users' tests: assert what happened to a task and to what it produced.

Pair with the ``tullius_sim`` fixture (``tullius.pytest_plugin``)::

    def test_counting_backs_off_until_it_fits(tullius_sim):
        task = ExampleTask(count_to=10)
        tullius_sim.queue(task)
        tullius_sim.drain(within=timedelta(minutes=5))
        assert_chain(tullius_sim.chain(task), ["timeout"] * 6 + ["succeeded"])

An expected link is a string (``"succeeded"``, ``"failed"``, or a failure
kind such as ``"timeout"``) or an `expect()` for more detail.  A mismatch
fails with the whole chain printed, the first differing link marked.
After an operator's retry (``sim.retry_unhandled(task)``), the chain of an
UNHANDLED task goes on to the retry's copy, which reads as failed with the
task's own failure (its ``run()`` never ran: it has no duration).
Nothing here imports Hypothesis or pytest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tullius.document import (
    FailureKind,
    Origin,
    Status,
    short_name,
    stored_value,
)
from tullius.inspection import ChainLink
from tullius.task import declared_fields

#: The failure kinds Tullius writes: an expected kind must be one of them, so a
#: typo (``"timout"``) is refused where it is written, not reported as a mismatch.
KINDS: tuple[str, ...] = tuple(value for name, value in vars(FailureKind).items() if name.isupper())
#: The statuses a link may have (`expect`'s ``task_status``).
STATUSES: tuple[str, ...] = tuple(status.value for status in Status)


@dataclass(frozen=True)
class Expected:
    """What one link of a chain should look like; None means "don't care"."""

    outcome: str | None = None
    kind: str | None = None
    duration: timedelta | None = None
    handler_error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    task_status: str | None = None

    def mismatches(self, link: ChainLink) -> list[str]:
        problems = []
        if self.outcome is not None and link.outcome != self.outcome:
            problems.append(f"outcome {link.outcome!r}, expected {self.outcome!r}")
        if self.task_status is not None and link.status.value != self.task_status:
            problems.append(f"status {link.status.value!r}, expected {self.task_status!r}")
        kind = link.failure.kind if link.failure is not None else None
        if self.kind is not None and kind != self.kind:
            problems.append(f"failure kind {kind!r}, expected {self.kind!r}")
        if self.duration is not None and _duration(link) != self.duration:
            problems.append(f"ran {_duration(link)}, expected {self.duration}")
        error = link.handler_error.kind if link.handler_error is not None else None
        if self.handler_error is not None and error != self.handler_error:
            problems.append(f"handler error {error!r}, expected {self.handler_error!r}")
        for name, value in self.fields.items():
            found = _field_of(link, name)
            # As stored too: the task's own tuple comes back a list, its time to the ms.
            if found != value and found != _as_stored(value):
                shown = "<missing>" if found is _MISSING else found
                problems.append(f"{name}={shown!r}, expected {value!r}")
        return problems


_MISSING = object()


def _field_of(link: ChainLink, name: str) -> Any:
    """The link's field ``name``: as stored, else the default its class declares
    for it (a field not passed when the task was made is not stored).  Not any
    other attribute of the task: ``timeout`` or a ``ClassVar`` is no field."""
    found = link.fields.get(name, _MISSING)
    task = link.task
    if found is _MISSING and task is not None and name in declared_fields(type(task)):
        try:
            return getattr(task, name, _MISSING)
        except Exception:  # user code's property that raises
            return _MISSING
    return found


def _as_stored(value: Any) -> Any:
    """``value`` as the store gives it back, or itself if it could not be stored (a
    dict with keys that are not strings: then only the value itself matches)."""
    try:
        return stored_value(value)
    except Exception:
        return value


def expect(
    outcome: str | None = None,
    *,
    kind: str | None = None,
    duration: timedelta | None = None,
    handler_error: str | None = None,
    task_status: str | None = None,
    fields: Mapping[str, Any] | None = None,
    **more_fields: Any,
) -> Expected:
    """An expected link: ``expect("failed", kind="timeout", count_to=10)``.

    Args:
        outcome: ``"succeeded"``, ``"failed"``, or a failure kind
            (``expect("timeout")``), which implies ``"failed"``.
        kind: the run's failure kind, one of `KINDS`.
        duration: exactly how long the run took, from its claim to its outcome's record
            (a retry's copy never ran, so none matches it).
        handler_error: the kind (one of `KINDS`, not a message) of the last error of
            ``failed()`` itself, e.g. ``"exception"`` when ``failed()`` raised.
        task_status: the task's status now, one of `STATUSES`: ``"handled"`` or
            ``"unhandled"`` tells whether ``failed()`` dealt with the failure.
            (Not ``status``: a task's field may have that name.)
        fields: the task's fields that must have these values, as a dict: for a
            field named like a parameter here (``fields={"kind": "refund"}``).
        more_fields: the same, as keywords (``count_to=10``).

    Raises:
        ValueError: an outcome or kind that is none of these, or a duration that
            is not a timedelta.
    """
    if outcome is not None and outcome not in ("succeeded", "failed"):
        if kind is not None:
            raise ValueError(f"expect({outcome!r}, kind={kind!r}): give the kind once")
        if outcome not in KINDS:
            raise ValueError(
                f"expect({outcome!r}): expected 'succeeded', 'failed' or a failure kind, "
                f"one of {', '.join(KINDS)}"
            )
        outcome, kind = "failed", outcome
    for name, value in (("kind", kind), ("handler_error", handler_error)):
        if value is not None and value not in KINDS:
            raise ValueError(
                f"expect({name}={value!r}): expected a failure kind, one of {', '.join(KINDS)}"
            )
    if task_status is not None and task_status not in STATUSES:
        raise ValueError(
            f"expect(task_status={task_status!r}): expected one of {', '.join(STATUSES)}"
        )
    if duration is not None and not isinstance(duration, timedelta):
        # Why: compared with a timedelta, a number never matched, and the mismatch
        # ("ran 0:00:05, expected 5") hid that the expectation itself was wrong.
        raise ValueError(f"expect(duration={duration!r}): expected a timedelta")
    wanted = {**(fields or {}), **more_fields}
    return Expected(outcome, kind, duration, handler_error, wanted, task_status)


def describe_chain(chain: Sequence[ChainLink]) -> str:
    """One line per link: task, outcome, failure, how long it ran, where."""
    return "\n".join(f"{index}. {describe_link(link)}" for index, link in enumerate(chain))


def describe_link(link: ChainLink) -> str:
    name = short_name(link.class_name)
    args = ", ".join(f"{key}={value!r}" for key, value in sorted(link.fields.items()))
    text = f"{name}({args}) {link.outcome or link.status.value}"
    if link.failure is not None:
        text += f" {link.failure.kind}: {link.failure.message}"
    if link.origin is Origin.RETRY:  # born failed with its parent's failure: it never ran
        text += f", retried from {link.parent_id} by {link.server}"
    else:
        duration = _duration(link)
        if duration is not None:
            text += f" after {duration.total_seconds():.3f}s"
        if link.server is not None:
            text += f" on {link.server}"
    if link.handler_error is not None:
        text += f" [failed() error {link.handler_error.kind}: {link.handler_error.message}"
        if link.status is Status.UNHANDLED:
            text += f"; left unhandled after {link.handler_attempts} attempt(s)"
        text += "]"
    if link.status is Status.UNHANDLED and link.first in link.children:
        text += f"; retried as {link.first}"
    return text


def assert_chain(chain: Sequence[ChainLink], expected: Sequence[str | Expected]) -> None:
    """Assert the chain has exactly the expected links, in order.

    Raises:
        TypeError: ``chain`` is not a chain (a task, say) or ``expected`` not a list.
        AssertionError: naming the first differing link, with the whole chain.
    """
    _check_chain("assert_chain", chain)
    if isinstance(expected, str | bytes) or not isinstance(expected, Iterable):
        raise TypeError(
            f"assert_chain(chain, {expected!r}): expected a list of outcomes, e.g. "
            "['timeout', 'succeeded'] (or assert_outcomes(chain, 'timeout succeeded'))"
        )
    wanted = [item if isinstance(item, Expected) else expect(item) for item in expected]
    problem = None
    for index, (link, item) in enumerate(zip(chain, wanted, strict=False)):
        mismatches = item.mismatches(link)
        if mismatches:
            problem = f"link {index}: " + "; ".join(mismatches)
            break
    if problem is None and len(chain) != len(wanted):
        problem = f"the chain has {len(chain)} link(s), expected {len(wanted)}"
    if problem is not None:
        raise AssertionError(f"{problem}\nchain:\n{describe_chain(chain)}")


def assert_outcomes(chain: Sequence[ChainLink], expected: str) -> None:
    """Shorthand: ``assert_outcomes(chain, "timeout*6 succeeded")``.

    Raises:
        TypeError: ``chain`` is not a chain or ``expected`` not a string.
        ValueError: a word that is not ``OUTCOME`` or ``OUTCOME*COUNT`` (COUNT >= 1).
        AssertionError: as `assert_chain`.
    """
    _check_chain("assert_outcomes", chain)
    if not isinstance(expected, str):
        raise TypeError(
            f"assert_outcomes(chain, {expected!r}): expected one string of outcomes, e.g. "
            "'timeout*6 succeeded' (assert_chain takes a list)"
        )
    items: list[str | Expected] = []
    for word in expected.split():
        name, star, times = word.partition("*")
        if star and not (times.isdecimal() and int(times) >= 1):
            raise ValueError(
                f"assert_outcomes({expected!r}): {word!r} should be OUTCOME or OUTCOME*COUNT "
                "with a COUNT >= 1, e.g. 'timeout*6 succeeded'"
            )
        items.extend([name] * (int(times) if star else 1))
    assert_chain(chain, items)


def _check_chain(helper: str, chain: object) -> None:
    """Refuse anything but a chain: a task or its id is a common slip."""
    if (
        isinstance(chain, str | bytes)
        or not isinstance(chain, Sequence)
        or not all(isinstance(link, ChainLink) for link in chain)
    ):
        raise TypeError(
            f"{helper}({chain!r}, ...): expected a chain, the list of links "
            "sim.chain(task) or tullius.chain(task) returns"
        )


def _duration(link: ChainLink) -> timedelta | None:
    # A retry's copy has the records of a run that failed, made by the operator's
    # retry (`tullius.retry`), but never ran: no duration.
    if link.started_at is None or link.finished_at is None or link.origin is Origin.RETRY:
        return None
    return link.finished_at - link.started_at
