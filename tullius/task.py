"""The user's side of a task: the `Task` base class and its conversions.

Users subclass `Task`, set ``timeout`` (and optionally ``priority``,
``failed_timeout``, ``failed_attempts``), write ``run()`` and ``failed()``, and
construct instances with keyword fields.  This module validates all of that
where the user writes it (class definition, construction, queueing), converts
tasks to `TaskSpec`s for the machine, and rebuilds tasks from stored documents
by their stable class name.  Field values must be plain BSON values: stored
documents are data, never pickles, so write access to the database never
becomes code execution.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

from tullius.document import Failure, Origin, TaskDoc, TaskSpec
from tullius.errors import (
    TaskDefinitionError,
    TaskDefinitionWarning,
    TaskFieldError,
    UnknownTaskClass,
)
from tullius.user_errors import describe, shown

_INT64: Final = 2**63
_EXPECTED_VALUE: Final = (
    "None, bool, int (64-bit), float, str, bytes, an aware datetime, "
    "or a list/tuple/dict of those (dict keys: str, not starting with '$', without '.')"
)
_REGISTRY: dict[str, type[Task]] = {}


class Task:
    """Base class of every task.

    Class attributes (checked when the subclass is defined):
        timeout: required, a positive ``timedelta``: how long ``run()`` may take.
        priority: 0 is most urgent; default 5.  An instance may override it.
        failed_timeout: how long one call of ``failed()`` may take; default 1 min.
        failed_attempts: how many times ``failed()`` is tried before the task is
            left UNHANDLED for an operator; default 5.
        task_name: the stable name stored with each task, ``"module:QualName"``;
            defaults to the class's own.  A worker loads the class by importing
            the module and looking the name up in it, so set it (keeping an
            alias at the old place) to keep old documents loadable when you
            move or rename the class.

    Pass ``abstract=True`` in the class statement for a base class without a
    timeout: ``class Base(tullius.Task, abstract=True)``.
    """

    timeout: ClassVar[timedelta]
    priority: float = 5
    failed_timeout: ClassVar[timedelta] = timedelta(minutes=1)
    failed_attempts: ClassVar[int] = 5
    task_name: ClassVar[str] = ""

    #: Set on a task rebuilt for ``failed()``: what went wrong.
    failure: Failure | None
    #: The stored id, once the task is queued or rebuilt from the store.  In
    #: an operator's retry (`tullius.retry`), the copy's own id.
    task_id: str | None
    _tullius_abstract: ClassVar[bool] = True
    #: Set by `from_doc` on a retry's copy (see `retried_from`).
    _tullius_retried_from: str | None = None

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._tullius_abstract = abstract
        if abstract:
            return
        name = cls.__name__
        timeout = getattr(cls, "timeout", None)
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise TaskDefinitionError(
                f"{name}.timeout={timeout!r}; expected a positive datetime.timedelta "
                "(or declare the class with abstract=True)"
            )
        _check_time_limit(f"{name}.timeout", timeout)
        if not isinstance(cls.failed_timeout, timedelta) or cls.failed_timeout <= timedelta(0):
            raise TaskDefinitionError(
                f"{name}.failed_timeout={cls.failed_timeout!r}; expected a positive timedelta"
            )
        _check_time_limit(f"{name}.failed_timeout", cls.failed_timeout)
        attempts = cls.failed_attempts
        # Stored as BSON, so 64-bit at most: a larger one failed only when inserted.
        if (
            isinstance(attempts, bool)
            or not isinstance(attempts, int)
            or not 1 <= attempts < _INT64
        ):
            raise TaskDefinitionError(
                f"{name}.failed_attempts={attempts!r}; expected an int >= 1 (64-bit)"
            )
        _check_priority(name, cls.priority)
        _warn_of_misspellings(cls)
        if cls.run is Task.run:
            raise TaskDefinitionError(f"{name} must define run(self)")
        for hook in ("run", "failed"):
            method = getattr(cls, hook)
            if not callable(method):  # else it fails only when a worker calls it
                raise TaskDefinitionError(
                    f"{name}.{hook}={method!r}; expected a method {hook}(self)"
                )
            if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
                # Else each run "returns" a coroutine never awaited: a bad_return.
                raise TaskDefinitionError(
                    f"{name}.{hook} is an async def; expected a plain method {hook}(self) "
                    f"(to run async code, call asyncio.run(...) inside it)"
                )
        if "task_name" not in cls.__dict__ or not cls.task_name:
            cls.task_name = f"{cls.__module__}:{cls.__qualname__}"
        if split_task_name(cls.task_name) is None:
            # A worker process finds the class by importing the module part and
            # looking up the rest (`load_class`): any other name is unloadable there.
            raise TaskDefinitionError(
                f"{name}.task_name={cls.task_name!r}; expected 'module:QualName', naming a "
                "module tulliusd's workers can import and the class's name in it"
            )
        taken = _REGISTRY.get(cls.task_name)
        if taken is not None and _place(taken) != _place(cls):
            # Why: documents name their class by task_name alone, so a second class
            # under the same name silently ran in place of the first (a copied
            # ``task_name`` line queued ChargeCard and ran RefundCharge).  The same
            # class defined again (a module reloaded, a test's local class) is fine.
            raise TaskDefinitionError(
                f"{name}.task_name={cls.task_name!r} is already the name of "
                f"{taken.__module__}.{taken.__qualname__}; expected a task_name no other "
                "Task class has, since stored tasks find their class by it"
            )
        _REGISTRY[cls.task_name] = cls

    def __init__(
        self,
        *,
        delay: timedelta | None = None,
        start_after: datetime | None = None,
        priority: float | None = None,
        **fields: Any,
    ) -> None:
        cls = type(self)
        if cls is Task or cls.__dict__.get("_tullius_abstract", False):
            raise TaskDefinitionError(f"{cls.__name__} is abstract; instantiate a subclass")
        if delay is not None and start_after is not None:
            raise TaskDefinitionError(
                f"{cls.__name__}(delay={delay!r}, start_after={start_after!r}): give one, not both"
            )
        if delay is not None and (
            not isinstance(delay, timedelta) or not timedelta(0) <= delay <= MAX_DELAY
        ):
            raise TaskDefinitionError(
                f"{cls.__name__}(delay={delay!r}); expected a timedelta from 0 to "
                f"{MAX_DELAY.days} days"
            )
        if start_after is not None and (
            not isinstance(start_after, datetime)
            or not _is_aware(start_after)
            or not _in_utc_range(start_after)
        ):
            raise TaskDefinitionError(
                f"{cls.__name__}(start_after={start_after!r}); expected an aware datetime "
                "(e.g. datetime.now(timezone.utc))"
            )
        if priority is not None:
            _check_priority(cls.__name__, priority)
            self.priority = priority
        for field, value in fields.items():
            _check_field_name(cls, field)
            check_value(cls.__name__, field, value)
            setattr(self, field, value)
        self._tullius_delay = delay
        self._tullius_start_after = start_after
        self.failure = None
        self.task_id = None

    def run(self) -> Task | Iterable[Task] | None:
        """Do the work.  Return None, or successor task(s) to queue on success."""
        raise NotImplementedError

    def failed(self) -> Task | Iterable[Task] | None:
        """Handle ``self.failure``.  Return None to accept it, or replacement task(s)."""
        return None

    def retried_from(self) -> str | None:
        """In an operator's retry of an unhandled task (`tullius.retry`): the id of
        the task retried, whose ``failed()`` attempts failed (``self.task_id`` is
        the retry's copy's own).  None in any other task.

        A method, not an attribute: an attribute would take a name from the
        task's fields, and stored tasks may have a field of any name.
        """
        return self._tullius_retried_from

    @property
    def fields(self) -> dict[str, Any]:
        """The task's stored fields: its public instance attributes."""
        return {
            key: value
            for key, value in vars(self).items()
            if not key.startswith("_") and key not in _META_ATTRIBUTES
        }

    def copy(self, **changes: Any) -> Task:
        """A new task of the same class with the same fields, some changed.

        An instance priority carries over unless changed; ``delay`` and
        ``start_after`` do not (pass them again to defer the copy).

        Raises:
            TaskDefinitionError: the class declares its fields (annotations) and
                ``changes`` names one that is neither declared nor on this task:
                ``copy(count_too=9)`` added a field and left ``count_to`` as it was.
        """
        current = self.fields
        # The class's declarations are read only for a name the task lacks: most
        # copies change fields it has (``failed()`` runs one per failure).
        new = [name for name in changes if name not in current and name not in _COPY_OPTIONS]
        declared = declared_fields(type(self)) if new else frozenset()
        for name in new:
            if declared and name not in declared:
                raise TaskDefinitionError(
                    f"{type(self).__name__}.copy({name}=...): {type(self).__name__} has no "
                    f"field {name!r}; expected one of {sorted(declared | current.keys())} "
                    f"(or declare it on the class: {name}: <type>)"
                )
        fields = {**current, **changes}
        if "priority" not in changes and "priority" in vars(self):
            fields["priority"] = self.priority
        return type(self)(**fields)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in sorted(self.fields.items()))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.fields == other.fields
            and self.priority == other.priority
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by fields


#: Most bytes of fields one task, or everything one ``run()``/``failed()``
#: returns, may hold.  A record stores all the tasks a step spawns, and MongoDB
#: refuses documents over 16 MiB: past that a result could never be recorded,
#: so it is refused where it is made (a ``bad_return`` failure, or an error from
#: ``tullius.queue()``) instead of failing every attempt to store it.
MAX_FIELDS_BYTES: Final = 8 * 1024 * 1024
_META_ATTRIBUTES: Final = frozenset({"failure", "task_id", "priority"})
_MILLISECOND: Final = timedelta(milliseconds=1)
#: Longest ``timeout`` or ``failed_timeout`` a class may set: far longer than
#: any run should take, and short enough for every date a limit is added to.
MAX_TIME_LIMIT: Final = timedelta(days=3653)
#: Longest ``delay`` a task may be given (a century).
MAX_DELAY: Final = timedelta(days=36525)
#: Exact types `check_value` accepts whatever their value.
_SCALARS: Final = frozenset({type(None), bool, bytes, float})
#: How deep lists and dicts may nest in a field.  MongoDB refuses documents
#: nested over 100 levels; a task's fields sit a few levels down in its
#: document and in the record of the step that spawned it.
MAX_NESTING: Final = 64
#: Exact types `stored_size` counts as 9 bytes whatever their value (subclasses
#: take the general path, which gives them 9 as well).
_NINE_BYTES: Final = frozenset({int, float, bool, type(None), datetime})


def _check_priority(owner: str, priority: object) -> None:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int | float)
        or (isinstance(priority, float) and not math.isfinite(priority))
        or (isinstance(priority, int) and not -_INT64 <= priority < _INT64)
    ):
        raise TaskDefinitionError(
            f"{owner} priority={priority!r}; expected a finite number, an int within 64 bits "
            "(0 is most urgent)"
        )


#: What ``copy()`` takes besides fields: the constructor's options.
_COPY_OPTIONS: Final = frozenset({"delay", "start_after", "priority"})


def declared_fields(cls: type[Task]) -> frozenset[str]:
    """The fields a Task class declares: its annotations (``count_to: int``) and
    its plain class attributes (``verbose = False``), its bases' and mixins'
    included; ``ClassVar`` settings, methods, private names and the settings
    Tullius reads are not fields."""
    names: set[str] = set()
    settings: set[str] = set()
    for klass in cls.__mro__:
        if klass is Task or klass is object:
            continue
        for name, annotation in inspect.get_annotations(klass).items():
            (settings if "ClassVar" in str(annotation) else names).add(name)
        for name, value in vars(klass).items():
            if not callable(value) and not isinstance(value, classmethod | staticmethod | property):
                names.add(name)
    fields = names - settings - _CLASS_NAMES_SET
    return frozenset(name for name in fields if not name.startswith("_"))


def _check_time_limit(what: str, limit: timedelta) -> None:
    """Refuse a positive time limit stored as nothing, or too long to add to a date."""
    if limit < _MILLISECOND:
        raise TaskDefinitionError(
            f"{what}={limit!r}; expected at least 1 millisecond (MongoDB stores times to the "
            "millisecond: a shorter limit was stored as 0)"
        )
    if limit > MAX_TIME_LIMIT:
        raise TaskDefinitionError(
            f"{what}={limit!r}; expected at most {MAX_TIME_LIMIT.days} days (dates a run's "
            "limit is added to must stay within the year 9999)"
        )


def _check_field_name(cls: type[Task], field: str) -> None:
    if not field.isidentifier():
        # Why: ``T(**{"a.b": 1})`` was accepted, and MongoDB then refused the
        # task's insert (or stored a name no attribute access reads back).
        raise TaskDefinitionError(
            f"{cls.__name__}(**{{{field!r}: ...}}): field name {field!r} is not a Python "
            "identifier; expected a name usable as an attribute"
        )
    # ``Task.__annotations__`` too: ``timeout`` is declared there without a value, and
    # as a field it would hide the class's timeout on the instance while the class's
    # applies (a per-instance timeout that silently does nothing).
    if (
        field.startswith("_")
        or field in _META_ATTRIBUTES
        or hasattr(Task, field)
        or field in Task.__annotations__
    ):
        raise TaskDefinitionError(
            f"{cls.__name__}({field}=...): field name {field!r} is reserved; expected a name "
            "not starting with '_' and not one of Task's attributes"
        )
    if callable(getattr(cls, field, None)):
        raise TaskDefinitionError(
            f"{cls.__name__}({field}=...): field {field!r} would hide the method "
            f"{cls.__name__}.{field}"
        )


def check_value(task_class: str, path: str, value: Any, depth: int = 0) -> None:
    """Raise `TaskFieldError` unless ``value`` can be stored as a BSON value.

    Args:
        task_class: named in the error.
        path: the field (and position inside it) named in the error.
        value: the value to check, recursively.
        depth: how many lists and dicts ``value`` is inside (`MAX_NESTING`).
    """
    # Fast accepts by exact type for the usual values, before the isinstance()
    # chain below (which decides everything else, subclasses included).
    kind = type(value)
    if kind is str:
        if value.isascii():
            return
        _check_text(task_class, path, value)
        return
    if kind in _SCALARS or (kind is int and -_INT64 <= value < _INT64):
        return
    if value is None or isinstance(value, bool | bytes | float):
        return
    if isinstance(value, str):
        _check_text(task_class, path, value)
        return
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return
        raise TaskFieldError(task_class, path, "int beyond 64 bits", _EXPECTED_VALUE)
    if isinstance(value, datetime):
        if not _is_aware(value):
            raise TaskFieldError(task_class, path, "naive datetime", "an aware datetime")
        if not _in_utc_range(value):
            raise TaskFieldError(
                task_class, path, "datetime outside years 1-9999 in UTC", "an aware datetime"
            )
        return
    if isinstance(value, list | tuple | dict) and depth >= MAX_NESTING:
        raise TaskFieldError(
            task_class,
            path,
            f"{type(value).__name__} nested {depth + 1} levels deep",
            f"lists and dicts nested at most {MAX_NESTING} levels deep (MongoDB's limit is "
            "100 for a whole document; a value that contains itself never ends)",
        )
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_value(task_class, f"{path}[{index}]", item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                kind_of_key = f"dict key {type(key).__name__}"
                raise TaskFieldError(task_class, f"{path}[{key!r}]", kind_of_key, _EXPECTED_VALUE)
            if key.startswith("$") or "." in key or "\0" in key:
                flaw = "starting with '$'" if key.startswith("$") else "containing '.' or NUL"
                raise TaskFieldError(
                    task_class, f"{path}[{key!r}]", f"dict key {flaw}", _EXPECTED_VALUE
                )
            if not key.isascii():
                _check_text(task_class, f"{path}[{key!r}]", key)
            check_value(task_class, f"{path}[{key!r}]", item, depth + 1)
        return
    raise TaskFieldError(task_class, path, type(value).__name__, _EXPECTED_VALUE)


def _check_text(task_class: str, path: str, text: str) -> None:
    """Refuse a string that is not text: BSON stores UTF-8, which a lone surrogate
    (``"\\ud800"``, from a bad decode) can't be, so MongoDB refused it only when
    the task was inserted, with an encoder error naming no field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TaskFieldError(
            task_class, path, "str with a lone surrogate", "text that encodes as UTF-8"
        ) from None


def _in_utc_range(when: datetime) -> bool:
    """Whether ``when`` (aware) exists in UTC, as it is stored: 0001-01-01 at +05:00
    does not, and storing it raised OverflowError in both drivers."""
    try:
        when.astimezone(UTC)
    except OverflowError:
        return False
    return True


def _is_aware(when: datetime) -> bool:
    """Whether ``when`` is aware as Python defines it: a ``tzinfo`` whose
    ``utcoffset()`` gives an offset (one that returns None makes it naive)."""
    try:
        return when.utcoffset() is not None
    except Exception:  # user code: a tzinfo that can't tell its offset
        return False


def to_spec(task: object, *, role: str = "task") -> TaskSpec:
    """The machine's view of a user task, validated as if it were being queued.

    Raises:
        TaskDefinitionError: ``task`` is not a Task, or a field can't be stored.
    """
    return _spec_and_size(task, role)[0]


def _spec_and_size(task: object, role: str) -> tuple[TaskSpec, int]:
    """`to_spec`, and the stored size of the task's fields (checked against the limit)."""
    if not isinstance(task, Task):
        raise TaskDefinitionError(
            f"{role} {shown(task)} is a {type(task).__name__}; expected a tullius.Task instance"
        )
    cls = type(task)
    registered = _REGISTRY.get(cls.task_name)
    if registered is not None and registered is not cls:
        # Two classes made by one factory (``def make(): class Made(Task): ...``)
        # share a name; a worker loads the later one, so a task of the first
        # silently ran the second's code.
        raise TaskDefinitionError(
            f"{role} {cls.__name__}: task_name {cls.task_name!r} now names another class, "
            "defined later at the same place, and workers would run that one; expected a "
            "task_name of its own (set task_name = 'module:Name' on each class the "
            "factory makes)"
        )
    fields = task.fields
    for field, value in fields.items():
        check_value(cls.__name__, field, value)
    size = stored_size(fields)
    _check_size(f"{role} {cls.__name__}", size)
    spec = TaskSpec(
        class_name=cls.task_name,
        fields=fields,
        priority=task.priority,
        timeout=cls.timeout,
        handler_timeout=cls.failed_timeout,
        handler_attempts=cls.failed_attempts,
        delay=getattr(task, "_tullius_delay", None),
        start_after=getattr(task, "_tullius_start_after", None),
    )
    return spec, size


def to_specs(returned: object, *, role: str) -> tuple[TaskSpec, ...]:
    """Specs for what ``run()`` or ``failed()`` returned: None, a task, or an iterable of tasks.

    Raises:
        TaskDefinitionError: naming what was returned and what is expected.
    """
    if returned is None:
        return ()
    if isinstance(returned, Task):
        return (to_spec(returned, role=role),)
    if isinstance(returned, str | bytes | Mapping) or not isinstance(returned, Iterable):
        raise TaskDefinitionError(
            f"{role} returned {shown(returned)}; expected None, a tullius.Task, or a list of them"
        )
    sized = [_spec_and_size(item, f"{role} item") for item in returned]
    _check_size(f"{role} (all {len(sized)} tasks)", sum(size for _, size in sized))
    return tuple(spec for spec, _ in sized)


def queued_tasks(task_or_tasks: object, *, role: str) -> list[Task]:
    """The tasks of a ``queue()`` argument: a task, or an iterable of them, as a list.

    Why: ``list()`` of a string queued its characters (refused one by one as
    "item 'h' is a str"), and of None raised a bare TypeError; either way the
    message did not name what was passed.

    Raises:
        TaskDefinitionError: naming the argument and what is expected.
    """
    if isinstance(task_or_tasks, Task):
        return [task_or_tasks]
    if isinstance(task_or_tasks, str | bytes | Mapping) or not isinstance(task_or_tasks, Iterable):
        raise TaskDefinitionError(
            f"{role} {shown(task_or_tasks)} is a {type(task_or_tasks).__name__}; "
            "expected a tullius.Task or a list of them"
        )
    return list(task_or_tasks)


def stored_size(value: Any) -> int:
    """About how many bytes ``value`` (a checked field value) takes as BSON; never less."""
    if type(value) in _NINE_BYTES:  # the usual field: no isinstance() of the ABC Mapping
        return 9
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) + 6
    if isinstance(value, bytes):
        return len(value) + 6
    if isinstance(value, dict | Mapping):  # dict first: the ABC's check is slow
        return 5 + sum(len(str(key)) + 2 + stored_size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return 5 + sum(len(str(index)) + 2 + stored_size(item) for index, item in enumerate(value))
    return 9


def _check_size(what: str, size: int) -> None:
    if size > MAX_FIELDS_BYTES:
        raise TaskDefinitionError(
            f"{what}: fields take about {size:,} bytes; expected at most "
            f"{MAX_FIELDS_BYTES:,} (records are limited to 16 MiB: store large data "
            "elsewhere and pass a reference)"
        )


def split_task_name(name: object) -> tuple[str, str] | None:
    """``(module, qualname)`` of a stored class name ``"module:QualName"``; None if
    ``name`` has another shape (a worker could not load it)."""
    if not isinstance(name, str):
        return None
    module_name, sep, qualname = name.partition(":")
    if not sep or not module_name or not qualname:
        return None
    return module_name, qualname


def find_in_module(module: object, qualname: str) -> Any:
    """What ``qualname`` (``"Outer.Inner"``) names in ``module``, or None."""
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


#: The names Tullius reads from a Task class (settings and the hooks it calls).
_CLASS_NAMES: Final = (
    "timeout",
    "failed_timeout",
    "failed_attempts",
    "priority",
    "task_name",
    "run",
    "failed",
)
_CLASS_NAMES_SET: Final = frozenset(_CLASS_NAMES)


def _warn_of_misspellings(cls: type) -> None:
    """Warn of a class attribute or method whose name is close to one of
    `_CLASS_NAMES` without being one (``priorty``, ``def fail(self)``); fields
    (annotations) are the user's data and are not looked at."""
    annotated = inspect.get_annotations(cls)
    for attribute in cls.__dict__:
        if attribute.startswith("_") or attribute in _CLASS_NAMES or attribute in annotated:
            continue
        close = difflib.get_close_matches(attribute, _CLASS_NAMES, n=1, cutoff=0.8)
        if close:
            warnings.warn(TaskDefinitionWarning(cls.__name__, attribute, close[0]), stacklevel=3)


def _place(cls: type) -> tuple[str, str]:
    """Where a class is defined: a class defined again there is the same class."""
    return cls.__module__, cls.__qualname__


def load_class(name: str) -> type[Task]:
    """The Task subclass stored under ``name`` (``"module:QualName"`` or a custom task_name).

    Classes defined or imported in this process are found directly; otherwise
    the module part is imported and the qualified name looked up in it.

    Raises:
        UnknownTaskClass: the module or class is missing, or it is not a Task.
    """
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    parts = split_task_name(name)
    if parts is None:
        raise UnknownTaskClass(name, "expected 'module:QualName'")
    module_name, qualname = parts
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as error:  # user code at import: any failure means "can't load"
        why = f"importing {module_name!r} failed: {describe(error)}"
        raise UnknownTaskClass(name, why) from error
    obj = find_in_module(obj, qualname)
    if obj is None:
        raise UnknownTaskClass(name, f"{module_name!r} has no {qualname!r}")
    if not isinstance(obj, type) or not issubclass(obj, Task):
        raise UnknownTaskClass(name, f"{obj!r} is not a tullius.Task subclass")
    cls = _REGISTRY.get(name)  # importing registers it, under its task_name
    return cls if cls is not None else obj


def from_doc(doc: TaskDoc, *, failure: Failure | None = None) -> Task:
    """Rebuild the user's task from its stored document.

    Raises:
        UnknownTaskClass: the class can't be loaded, or a stored field can't be set
            on it (the class changed since the task was queued).  One error for
            both, so that every driver fails such a task as ``unloadable``.
    """
    cls = load_class(doc.class_name)
    task = cls.__new__(cls)
    for field, value in doc.fields.items():
        try:
            setattr(task, field, value)
        except Exception as error:  # user code (a property, a __setattr__): can't load
            raise UnknownTaskClass(
                doc.class_name, f"can't set its field {field!r}: {describe(error)}"
            ) from error
    if doc.priority != cls.priority:
        task.priority = doc.priority
    task._tullius_delay = None
    task._tullius_start_after = None
    task.failure = failure
    task.task_id = doc.task_id
    task._tullius_retried_from = doc.parent_id if doc.origin is Origin.RETRY else None
    return task
