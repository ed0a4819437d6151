"""The Task API of the original README, and its validation where the user writes it."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest

import tullius
from tullius.document import Origin, TaskDoc, queued_doc
from tullius.errors import (
    TaskDefinitionError,
    TaskDefinitionWarning,
    TaskFieldError,
    UnknownTaskClass,
)
from tullius.task import (
    MAX_DELAY,
    MAX_NESTING,
    MAX_TIME_LIMIT,
    from_doc,
    load_class,
    to_spec,
    to_specs,
)


class Count(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self) -> None:
        pass

    def failed(self) -> tullius.Task:
        return self.copy(count_to=max(self.count_to - 1, 0))


class Declared(tullius.Task):
    timeout = timedelta(seconds=5)
    count_to: int
    note: str = ""

    def run(self) -> None:
        pass


class _NoOffset(tzinfo):
    """A tzinfo without an offset: Python counts its datetimes as naive."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


class _BrokenOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        raise RuntimeError("no offset today")


def test_keyword_arguments_become_fields_and_attributes() -> None:
    task = Count(count_to=3, note="x")
    assert task.count_to == 3
    assert task.fields == {"count_to": 3, "note": "x"}
    assert repr(task) == "Count(count_to=3, note='x')"


def test_copy_keeps_the_class_and_fields_with_some_changed() -> None:
    task = Count(count_to=3, note="x", priority=1)
    copy = task.copy(count_to=2)
    assert type(copy) is Count
    assert copy.fields == {"count_to": 2, "note": "x"}
    assert copy.priority == 1


def test_priority_defaults_to_five_and_may_be_overridden_per_instance() -> None:
    assert Count(count_to=1).priority == 5
    assert to_spec(Count(count_to=1, priority=0)).priority == 0


def test_a_class_without_a_timeout_is_refused_at_definition() -> None:
    with pytest.raises(TaskDefinitionError, match=r"NoTimeout.timeout=None; expected a positive"):

        class NoTimeout(tullius.Task):
            def run(self) -> None:
                pass


@pytest.mark.parametrize("timeout", [5, timedelta(0), timedelta(seconds=-1)])
def test_a_timeout_that_is_not_a_positive_timedelta_is_refused(timeout: object) -> None:
    with pytest.raises(TaskDefinitionError, match=re.escape(f"timeout={timeout!r}")):
        type("Bad", (tullius.Task,), {"timeout": timeout, "run": lambda self: None})


def test_an_abstract_base_needs_no_timeout_and_cannot_be_instantiated() -> None:
    class Base(tullius.Task, abstract=True):
        pass

    with pytest.raises(TaskDefinitionError, match="Base is abstract"):
        Base()


def test_a_class_without_run_is_refused() -> None:
    with pytest.raises(TaskDefinitionError, match="must define run"):

        class NoRun(tullius.Task):
            timeout = timedelta(seconds=1)


def test_an_async_run_or_failed_is_refused_when_the_class_is_defined() -> None:
    # Called as a plain method, it would return a coroutine never awaited.
    with pytest.raises(TaskDefinitionError, match=r"AsyncRun.run is an async def; expected a"):

        class AsyncRun(tullius.Task):
            timeout = timedelta(seconds=1)

            async def run(self) -> None:
                pass

    with pytest.raises(TaskDefinitionError, match=r"asyncio.run\(\.\.\.\) inside it"):

        class AsyncFailed(tullius.Task):
            timeout = timedelta(seconds=1)

            def run(self) -> None:
                pass

            async def failed(self) -> None:
                pass


def test_a_run_or_failed_that_is_not_a_method_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TaskDefinitionError, match=r"NotCallable.run=5; expected a method run"):

        class NotCallable(tullius.Task):
            timeout = timedelta(seconds=1)
            run = 5

    with pytest.raises(TaskDefinitionError, match=r"BadHandler.failed=None; expected a method"):

        class BadHandler(tullius.Task):
            timeout = timedelta(seconds=1)
            failed = None

            def run(self) -> None:
                pass


def test_a_misspelt_failed_hook_or_setting_is_warned_of_where_the_class_is_defined() -> None:
    with pytest.warns(TaskDefinitionWarning) as seen:

        class Typo(tullius.Task):
            timeout = timedelta(seconds=1)
            priorty = 3

            def run(self) -> None:
                return None

            def fail(self) -> None:  # never called: failures would be accepted silently
                return None

    assert sorted((w.message.name, w.message.meant) for w in seen.list) == [  # type: ignore[union-attr]
        ("fail", "failed"),
        ("priorty", "priority"),
    ]
    assert all(w.filename == __file__ for w in seen.list)  # the class statement's line
    assert "Typo.fail looks like a misspelling of 'failed'" in str(seen.list[-1].message)


def test_fields_and_names_unlike_any_setting_are_not_warned_of(
    recwarn: pytest.WarningsRecorder,
) -> None:
    class Fine(tullius.Task):
        timeout = timedelta(seconds=1)
        failed_timeout = timedelta(seconds=1)
        timeouts: int  # a field: the user's data
        retries = 2
        fail_count = 0

        def run(self) -> None:
            return None

        def failed(self) -> None:
            return None

    assert not [w for w in recwarn.list if issubclass(w.category, TaskDefinitionWarning)]


def test_a_field_that_cannot_be_stored_names_class_field_and_type() -> None:
    with pytest.raises(TaskFieldError) as caught:
        Count(count_to=3, when={"x": [1, object()]})
    assert caught.value.task_class == "Count"
    assert caught.value.field == "when['x'][1]"
    assert caught.value.value_type == "object"
    assert "can't be stored as BSON" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (datetime(2026, 1, 1), "naive datetime"),
        (2**64, "int beyond 64 bits"),
        ({1: "x"}, "dict key int"),
        ({"$set": 1}, "dict key starting with"),
        ({"a.b": 1}, "dict key containing"),
        ({1, 2}, "set"),
        ("caf\udce9", "str with a lone surrogate"),
        ({"caf\udce9": 1}, "str with a lone surrogate"),
        (datetime(2026, 1, 1, tzinfo=_NoOffset()), "naive datetime"),
        (datetime(2026, 1, 1, tzinfo=_BrokenOffset()), "naive datetime"),
        # Storing it in UTC raised OverflowError in both drivers.
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), "outside years 1-9999 in UTC"),
        (datetime.max.replace(tzinfo=timezone(-timedelta(hours=5))), "outside years 1-9999"),
    ],
)
def test_non_bson_values_are_refused(value: object, what: str) -> None:
    with pytest.raises(TaskFieldError, match=what):
        Count(count_to=1, value=value)


def test_a_value_nested_too_deep_or_containing_itself_is_refused_naming_the_field() -> None:
    deep: list[object] = []
    for _ in range(MAX_NESTING - 1):
        deep = [deep]
    Count(count_to=1, value=deep)  # 64 lists, one in another: as deep as allowed
    with pytest.raises(TaskFieldError, match=r"Count.value\[0\].* nested 65 levels deep"):
        Count(count_to=1, value=[deep])
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    with pytest.raises(TaskFieldError, match=r"Count.loop\['self'\].*nested"):
        Count(count_to=1, loop=cyclic)


def test_a_field_name_that_is_not_an_identifier_is_refused() -> None:
    for name in ("a.b", "$set", "", "a\0b", "first-name"):
        with pytest.raises(TaskDefinitionError, match="is not a Python identifier"):
            Count(**{name: 1})


def test_reserved_field_names_are_refused() -> None:
    for name in ("_secret", "failure", "task_id", "run", "copy", "timeout"):
        with pytest.raises(TaskDefinitionError, match=r"reserved|would hide"):
            Count(**{name: 1})


def test_a_naive_start_after_is_refused() -> None:
    for naive in (datetime(2026, 1, 1), datetime(2026, 1, 1, tzinfo=_NoOffset())):
        with pytest.raises(TaskDefinitionError, match="expected an aware datetime"):
            Count(count_to=1, start_after=naive)


def test_delay_and_start_after_together_are_refused() -> None:
    with pytest.raises(TaskDefinitionError, match="give one, not both"):
        Count(count_to=1, delay=timedelta(1), start_after=datetime(2026, 1, 1, tzinfo=UTC))


def test_a_negative_or_endless_delay_is_refused() -> None:
    for delay in (timedelta(seconds=-1), MAX_DELAY + timedelta(days=1), timedelta.max):
        with pytest.raises(TaskDefinitionError, match="expected a timedelta from 0 to 36525 days"):
            Count(count_to=1, delay=delay)
    Count(count_to=1, delay=MAX_DELAY)


@pytest.mark.parametrize("setting", ["timeout", "failed_timeout"])
@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (timedelta(microseconds=900), "expected at least 1 millisecond"),
        (MAX_TIME_LIMIT + timedelta(seconds=1), "expected at most 3653 days"),
        (timedelta.max, "expected at most 3653 days"),
    ],
)
def test_a_time_limit_too_short_to_store_or_too_long_to_add_is_refused_at_definition(
    setting: str, limit: timedelta, expected: str
) -> None:
    with pytest.raises(TaskDefinitionError, match=rf"Limited.{setting}=.*; {expected}"):
        type("Limited", (Count,), {setting: limit, "__module__": __name__})


def test_copy_refuses_a_field_the_class_does_not_declare() -> None:
    task = Declared(count_to=10)
    with pytest.raises(TaskDefinitionError, match=r"Declared.copy\(count_too=...\).*'count_to'"):
        task.copy(count_too=9)
    assert task.copy(count_to=9, note="declared", delay=timedelta(seconds=1)).count_to == 9
    # A class that declares no fields takes any: its fields are whatever it is given.
    assert Count(count_to=1).copy(attempt=2).fields == {"count_to": 1, "attempt": 2}


class Audited:
    """A plain mixin declaring a field."""

    created_by: str


class AuditedInvoice(Audited, tullius.Task):
    timeout = timedelta(seconds=5)
    amount: int
    verbose = False  # a field with a default, declared without an annotation

    def run(self) -> None:
        pass


def test_copy_takes_fields_declared_by_a_mixin_or_as_plain_class_defaults() -> None:
    # Both were refused by copy() though the constructor took them.
    invoice = AuditedInvoice(amount=1)
    assert invoice.copy(created_by="alice", verbose=True).fields == {
        "amount": 1,
        "created_by": "alice",
        "verbose": True,
    }
    with pytest.raises(TaskDefinitionError, match=r"has no field 'amont'"):
        invoice.copy(amont=2)


def test_returned_values_are_none_a_task_or_a_list_of_tasks() -> None:
    assert to_specs(None, role="run()") == ()
    assert len(to_specs(Count(count_to=1), role="run()")) == 1
    assert len(to_specs([Count(count_to=1), Count(count_to=2)], role="run()")) == 2
    for bad in ("task", 3, {"a": 1}, [Count(count_to=1), "x"]):
        with pytest.raises(TaskDefinitionError, match=r"expected (None, )?a tullius.Task"):
            to_specs(bad, role="failed()")


def test_fields_changed_in_run_to_unstorable_values_are_refused_at_queueing() -> None:
    task = Count(count_to=1)
    task.extra = object()
    with pytest.raises(TaskFieldError, match=r"Count.extra"):
        to_spec(task)


def test_classes_are_found_again_by_their_stable_name() -> None:
    assert Count.task_name == f"{__name__}:Count"
    assert load_class(Count.task_name) is Count
    assert load_class("tullius.demo:ExampleTask").__name__ == "ExampleTask"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nonsense", "expected 'module:QualName'"),
        ("no_such_module_xyz:Task", "importing 'no_such_module_xyz' failed"),
        ("tullius.task:Nope", "has no 'Nope'"),
        ("tullius.task:check_value", "is not a tullius.Task subclass"),
    ],
)
def test_unknown_or_non_task_classes_are_a_visible_error(name: str, reason: str) -> None:
    with pytest.raises(UnknownTaskClass, match=reason):
        load_class(name)


def stored(task: tullius.Task, task_id: str) -> TaskDoc:
    """``task`` as stored under ``task_id`` (queued on 1 January 2026)."""
    return queued_doc(to_spec(task), task_id=task_id, now=datetime(2026, 1, 1, tzinfo=UTC))


def test_a_task_rebuilt_from_its_document_has_its_fields_id_and_failure() -> None:
    task = from_doc(stored(Count(count_to=3, priority=2), "t1"))
    assert (task, task.task_id, task.priority, task.failure) == (
        Count(count_to=3, priority=2),
        "t1",
        2,
        None,
    )


class Charge(tullius.Task):
    timeout = timedelta(seconds=5)
    retry_of: str

    def run(self) -> None:
        return None


def test_a_field_named_like_a_retry_is_the_users_and_a_rebuilt_task_knows_its_retry() -> None:
    # A field of any name is the user's: Tullius's own retry link is a method
    assert to_spec(Charge(retry_of="order-7")).fields == {"retry_of": "order-7"}
    base = stored(Charge(retry_of="order-7"), "t1")
    task = from_doc(base)
    assert (task.retry_of, task.retried_from()) == ("order-7", None)  # type: ignore[attr-defined]
    copy = from_doc(dataclasses.replace(base, origin=Origin.RETRY, parent_id="t0"))
    assert (copy.retry_of, copy.retried_from()) == ("order-7", "t0")  # type: ignore[attr-defined]
    assert copy.fields == {"retry_of": "order-7"}


@pytest.mark.parametrize("task_name", ["billing.SendInvoice", "billing:", ":SendInvoice", 5])
def test_a_task_name_a_worker_could_not_load_is_refused_at_definition(task_name: object) -> None:
    # A worker finds a stored class by importing "module" and looking up "QualName":
    # a name without both parts would leave every task of the class unloadable.
    with pytest.raises(TaskDefinitionError, match=re.escape(f"task_name={task_name!r}")):
        type(
            "Named",
            (tullius.Task,),
            {"timeout": timedelta(1), "run": lambda self: None, "task_name": task_name},
        )


def test_a_task_name_another_class_already_has_is_refused_at_definition() -> None:
    # A copied task_name line used to make the registry hand out the second class
    # for the first one's documents: queueing Count ran the other class's run().
    with pytest.raises(TaskDefinitionError, match=rf"already the name of {__name__}\.Count"):
        type("Refund", (tullius.Task,), {**_CLASS, "task_name": Count.task_name})
    assert load_class(Count.task_name) is Count


def test_the_same_class_defined_again_keeps_its_name() -> None:
    def define() -> type[tullius.Task]:
        class Local(tullius.Task):
            timeout = timedelta(seconds=1)

            def run(self) -> None:
                pass

        return Local

    first, second = define(), define()  # a test's local class, a reloaded module
    assert first.task_name == second.task_name
    assert load_class(second.task_name) is second


def test_settings_too_big_to_store_are_refused_where_they_are_written() -> None:
    # BSON ints are 64-bit: these were accepted, then failed only at the insert.
    with pytest.raises(TaskDefinitionError, match=r"failed_attempts=10{30}"):
        type("Many", (tullius.Task,), {**_CLASS, "failed_attempts": 10**30})
    with pytest.raises(TaskDefinitionError, match=r"priority=10{40}"):
        Count(count_to=1, priority=10**40)
    with pytest.raises(TaskDefinitionError, match=r"priority=10{40}"):
        type("Urgent", (tullius.Task,), {**_CLASS, "priority": 10**40})


_CLASS = {"timeout": timedelta(seconds=1), "run": lambda self: None}


def test_a_task_of_a_class_another_has_since_replaced_under_its_name_is_refused() -> None:
    def make(behaviour: str) -> type[tullius.Task]:
        class Made(tullius.Task):
            timeout = timedelta(seconds=5)

            def run(self) -> None:
                if behaviour == "fail":
                    raise RuntimeError("the second class's code")

        return Made

    first, second = make("ok"), make("fail")
    assert first.task_name == second.task_name  # the same place, so the same name
    with pytest.raises(TaskDefinitionError, match=r"now names another class.*its own"):
        to_spec(first())
    to_spec(second())  # the class its name loads
