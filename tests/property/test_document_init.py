"""The documents' quick ``__init__`` (`tullius.document.quick_init`) must build exactly
what the dataclass's own ``__init__`` would: same signature, same fields, same values."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tullius.document import Failure, Record, RecordKind, TaskDoc, TaskSpec, TaskView
from tullius.machine import Step

QUICK = [Failure, TaskSpec, TaskDoc, Record, TaskView, Step]


@pytest.mark.parametrize("cls", QUICK)
def test_the_signature_is_the_dataclass_fields(cls: type[Any]) -> None:
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for param, field in zip(params, fields, strict=True):
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        if field.default is not dataclasses.MISSING:
            assert param.default is field.default
        elif field.default_factory is not dataclasses.MISSING:
            assert repr(param.default) == "<factory>"
        else:
            assert param.default is inspect.Parameter.empty


def test_a_default_factory_makes_a_fresh_value_each_time() -> None:
    doc = TaskDoc("t", "c", {}, 1, None, None, 1, None, None)  # type: ignore[arg-type]
    first, second = TaskView(doc), TaskView(doc)
    assert first.records == {}
    assert first.records is not second.records
    assert TaskView(doc, {"x": None}).records == {"x": None}  # type: ignore[dict-item]


@given(
    st.text(max_size=3),
    st.sampled_from(RecordKind),
    st.integers(0, 3),
    st.none() | st.booleans(),
)
def test_values_land_in_their_fields_and_stay_frozen(
    token: str, kind: RecordKind, attempt: int, ok: bool | None
) -> None:
    record = Record("r", "t", kind, token, None, "s", attempt=attempt, ok=ok)  # type: ignore[arg-type]
    assert vars(record) == {
        "record_id": "r",
        "task_id": "t",
        "kind": kind,
        "token": token,
        "at": None,
        "server": "s",
        "attempt": attempt,
        "worker": None,
        "beat": 0,
        "ok": ok,
        "failure": None,
        "spawned": (),
        "retry_at": None,
        "task_created_at": None,
    }
    assert record == dataclasses.replace(record)
    assert hash(record) == hash(dataclasses.replace(record))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.token = "other"  # type: ignore[misc]
