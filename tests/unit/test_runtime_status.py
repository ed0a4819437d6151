"""``tulliusd --status`` shows an operator what needs them, read from any store.

The store is filled by a simulation (a task left unhandled, one waiting for
a priority nobody takes); the command line itself runs on a MongoDB-wire
server in tests/integration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import tullius
from tests import histories
from tests.store_contract import make_doc
from tullius.band import Band
from tullius.document import Status, TaskDoc, retry_copy_id, retry_copy_ids
from tullius.engine import drive
from tullius.errors import ConfigError
from tullius.events import Retried
from tullius.machine import step
from tullius.policy import WRITE_WINDOW
from tullius.retry import retry
from tullius.runtime.config import RawFlags, resolve
from tullius.runtime.status import format_status, read_status
from tullius.sim import Simulation
from tullius.sim.memory_store import MemoryStore
from tullius.store import ServerSeen

T_NOW = datetime(2026, 6, 1, tzinfo=UTC)


class Unlucky(tullius.Task):
    timeout = timedelta(seconds=5)
    failed_attempts = 2
    task_name = "tests.unit.test_runtime_status:Unlucky"

    def run(self) -> None:
        raise ValueError("the report was empty")

    def failed(self) -> None:
        raise RuntimeError("mail server down")


def test_the_report_lists_servers_counts_unreached_work_and_unhandled_failures() -> None:
    # Given a database where a task ended unhandled, another waits for priority 50,
    # one daemon renewed its entry a minute ago, one not for half an hour, one
    # stopped five minutes ago, and one not seen for three hours
    sim = Simulation(seed=3)
    (lost_cause,) = sim.queue(Unlucky())
    sim.drain(within=timedelta(hours=1))
    sim.run_for(timedelta(minutes=1))  # drain ends at the last record; the hint follows
    store = sim.store
    store.insert_tasks([make_doc("waits-50", priority=50)])
    now = sim.now
    store.announce_server(
        ServerSeen("web1", (Band(10, 0, 10), Band(5, 0, 0)), now - timedelta(minutes=1))
    )
    store.announce_server(ServerSeen("web2", (Band(2, 40, 60),), now - timedelta(minutes=30)))
    store.announce_server(ServerSeen("web3", (Band(1, 0, 0),), now - timedelta(minutes=5), True))
    store.announce_server(ServerSeen("web4", (Band(1, 0, 0),), now - timedelta(hours=3)))
    # When the status is read and printed
    report = read_status(store, now=now)
    text = format_status(report)
    sim.close()
    # Then it names each recent server, running or not, with its bands, and counts the old
    assert "web1  running, last seen 60 s ago, bands 10:0-10 5:0-0" in text
    assert "web2  not seen (crashed, or cut off), last seen 30 min ago, bands 2:40-60" in text
    assert "web3  stopped, last seen 5 min ago, bands 1:0-0" in text
    assert "web4" not in text
    assert "  and 1 stopped or not seen for over 60 min\n" in text
    # And the counts, the task no running server takes, and the unhandled one with both errors
    assert report.counts[Status.UNHANDLED] == 1
    assert "unhandled 1" in text
    assert "waiting for a priority no running server takes: 1 task(s)\n  priority 50: 1, " in text
    assert "(e.g. Nothing waits-50)\n" in text
    assert (
        f"  {lost_cause}  tests.unit.test_runtime_status:Unlucky  failed (exception: run() raised "
        "ValueError: the report was empty); failed() error (exception: failed() raised "
        "RuntimeError: mail server down)"
    ) in text


def test_an_empty_database_reports_nothing_to_look_at() -> None:
    sim = Simulation(seed=1)
    text = format_status(read_status(sim.store, now=sim.now))
    sim.close()
    assert "none has recorded itself" in text
    assert "tasks by status: none" in text
    assert "waiting for a priority no running server takes: none" in text
    assert "unhandled (every try of failed() failed; for an operator): 0" in text


@pytest.mark.parametrize("other", [{"embedded": True}, {"demo": True}])
def test_status_refuses_flags_that_run_a_daemon_instead(other: dict[str, bool]) -> None:
    with pytest.raises(ConfigError, match="--status=True reads a database and exits"):
        resolve(RawFlags(status=True, **other), env={})


class RecordsUnreadable(MemoryStore):
    """A store where an unhandled task's story can't be loaded (set aside, or gone)."""

    def load(self, task_id: str) -> Any:
        return None


def test_an_unhandled_task_whose_story_cant_be_read_is_still_listed() -> None:
    store = RecordsUnreadable()
    store.insert_tasks([make_doc("u1")])
    store.set_status("u1", Status.UNHANDLED, None)
    text = format_status(read_status(store, now=T_NOW))
    assert "  u1  tests:Nothing  (its records can't be read)" in text


class WithClock(MemoryStore):
    """A store that can tell its own time, as MongoStore tells the database's."""

    def __init__(self, time: datetime) -> None:
        super().__init__()
        self.time = time

    def server_time(self) -> datetime:
        return self.time


def test_daemons_are_judged_by_the_databases_clock_not_the_readers() -> None:
    # Given a daemon that renewed its entry ten seconds ago by the database's clock,
    # read from a machine whose clock runs ten minutes ahead
    database_now = T_NOW
    store = WithClock(database_now)
    store.announce_server(
        ServerSeen("web1", (Band(1, 0, 10),), database_now - timedelta(seconds=10))
    )
    report = read_status(store, now=database_now + timedelta(minutes=10))
    # Then it is running, ten seconds ago
    assert "web1  running, last seen 10 s ago" in format_status(report)


def test_the_readmes_recipe_runs_an_unhandled_task_again_as_a_new_one() -> None:
    # Given a task left unhandled
    sim = Simulation(seed=4)
    (lost_cause,) = sim.queue(Unlucky())
    sim.drain(within=timedelta(hours=1))
    # When the README's line queues it again
    with sim.queue_calls():
        (again,) = tullius.queue(tullius.chain(lost_cause, store=sim.store)[0].task.copy())
    counts = sim.drain(within=timedelta(hours=1))
    # Then a new task ran (and, its code unchanged, failed the same way); the first is untouched
    assert again != lost_cause
    assert counts.unhandled == 2
    assert [link.status for link in sim.chain(lost_cause)] == [Status.UNHANDLED]
    sim.close()


def unhandled_sim(seed: int = 3) -> tuple[Simulation, str]:
    sim = Simulation(seed=seed)
    (lost_cause,) = sim.queue(Unlucky())
    sim.drain(within=timedelta(hours=1))
    sim.run_for(timedelta(minutes=1))  # drain ends at the last record; the hint follows
    return sim, lost_cause


def unhandled_lines(text: str) -> list[str]:
    return text.split("unhandled (every try of failed() failed; for an operator): ")[1].splitlines()


def test_a_retried_unhandled_task_is_listed_with_its_copy() -> None:
    # Given an unhandled task an operator retried
    sim, lost_cause = unhandled_sim()
    done = drive(sim.store, retry(lost_cause, now=sim.now, token="op", server="ops1"))
    # When the status is read
    text = format_status(read_status(sim.store, now=sim.now))
    sim.close()
    # Then the task is still listed, as it was, and the next line names its copy
    # and that it waits for its failed()
    copy = retry_copy_id(sim.store.load(lost_cause).task)
    assert unhandled_lines(text) == [
        "1 (1 of them retried already, listed after the others)",
        f"  {lost_cause}  tests.unit.test_runtime_status:Unlucky  failed (exception: run() raised "
        "ValueError: the report was empty); failed() error (exception: failed() raised "
        "RuntimeError: mail server down)",
        f"    retried as {copy} at {done.at.isoformat(timespec='seconds')} by ops1; {copy} is "
        "failed: its failed() is pending",
    ]


def test_a_task_retried_by_a_version_before_the_copy_ids_changed_is_listed_as_retried() -> None:
    # Given an unhandled task an older version retried, which gave the copy an id
    # from the task's id alone (before 2026-12-06)
    sim, lost_cause = unhandled_sim()
    view = sim.store.load(lost_cause)
    assert view is not None
    decided = step(view, Retried("op", "ops1"), now=sim.now)
    assert decided.record is not None
    older = retry_copy_ids(view.task)[1]
    assert retry_copy_ids(make_doc("abc"))[1] == "idfdt22pdjsr4me7"  # (as they gave it)
    copy = dataclasses.replace(decided.record.spawned[0], task_id=older)
    sim.store.insert_record(dataclasses.replace(decided.record, spawned=(copy,)))
    sim.store.insert_tasks([copy])
    # When the status is read
    lines = unhandled_lines(format_status(read_status(sim.store, now=sim.now)))
    sim.close()
    # Then it is listed as retried, with that copy
    assert lines[0] == "1 (1 of them retried already, listed after the others)"
    assert lines[2].startswith(f"    retried as {older} at ")


def test_a_retry_cut_short_is_listed_with_the_command_that_completes_it() -> None:
    # Given an unhandled task whose retry was cut short after its record: no copy stored
    sim, lost_cause = unhandled_sim()
    view = sim.store.load(lost_cause)
    assert view is not None
    at = sim.now
    decided = step(view, Retried("op", "ops1"), now=at)
    assert decided.record is not None
    sim.store.insert_record(decided.record)
    copy = retry_copy_id(sim.store.load(lost_cause).task)
    assert sim.store.load(copy) is None
    # When the status is read within the retry's write window
    soon = format_status(read_status(sim.store, now=at + WRITE_WINDOW))
    # Then it says the copy is missing and how to complete the retry
    assert unhandled_lines(soon)[2] == (
        f"    retried as {copy} at {at.isoformat(timespec='seconds')} by ops1, but {copy} can't "
        "be read: the retry was cut short, or the copy was set aside as undecodable; run "
        f"tulliusd --retry-unhandled {lost_cause} again, which completes the one and names "
        "the other"
    )
    # And past the window, when asking again would not make the copy, it says so instead
    late = format_status(read_status(sim.store, now=at + WRITE_WINDOW + timedelta(seconds=1)))
    sim.close()
    assert unhandled_lines(late)[2] == (
        f"    retried as {copy} at {at.isoformat(timespec='seconds')} by ops1; {copy} is not "
        "stored: pruned once done with, or never written (a retry cut short is completed "
        "only within 24 h)"
    )


def test_the_status_of_a_retried_task_reads_it_alone_not_its_copys_chain() -> None:
    # Given an unhandled task retried, whose copy's failed() ran (and failed) since
    sim, lost_cause = unhandled_sim()
    done = drive(sim.store, retry(lost_cause, now=sim.now, token="op", server="ops1"))
    sim.run_for(timedelta(minutes=10))  # not drain(): the copy was stored behind its back
    loaded: list[str] = []
    load = sim.store.load

    def counting_load(task_id: str) -> object:
        loaded.append(task_id)
        return load(task_id)

    sim.store.load = counting_load  # type: ignore[method-assign]
    # When the status is read
    report = read_status(sim.store, now=sim.now)
    sim.close()
    # Then both unhandled tasks are listed, each read once, and the first's copy is stored
    assert report.counts[Status.UNHANDLED] == 2
    assert sorted(loaded) == sorted([lost_cause, done.copy_id])
    assert report.retries[lost_cause].stored
    assert done.copy_id not in report.retries
    # And the copy, not retried, comes first; the task's line says to retry its copy
    lines = unhandled_lines(format_status(report))
    assert lines[0] == "2 (1 of them retried already, listed after the others)"
    assert lines[1].startswith(f"  {done.copy_id}  tests.unit.test_runtime_status:Unlucky  ")
    assert lines[2].startswith(f"  {lost_cause}  tests.unit.test_runtime_status:Unlucky  ")
    assert lines[3] == (
        f"    retried as {done.copy_id} at {done.at.isoformat(timespec='seconds')} by ops1; "
        f"{done.copy_id} is unhandled too: retry {done.copy_id} itself"
    )
    assert len(lines) == 4


def test_a_retried_tasks_copy_retried_in_turn_is_not_advised_to_be_retried_again() -> None:
    # Given an unhandled task retried, whose copy failed again and was retried in turn
    sim, lost_cause = unhandled_sim()
    done = drive(sim.store, retry(lost_cause, now=sim.now, token="op", server="ops1"))
    sim.run_for(timedelta(minutes=10))
    again = drive(sim.store, retry(done.copy_id, now=sim.now, token="op", server="ops1"))
    # When the status is read, and the task's retry asked for again
    lines = unhandled_lines(format_status(read_status(sim.store, now=sim.now)))
    asked = drive(sim.store, retry(lost_cause, now=sim.now, token="op", server="ops1"))
    sim.close()
    # Then both say where the copy's own retry went, instead of "retry it itself"
    # (which --status and --retry-unhandled advised, though it was done)
    said = f"{done.copy_id} is unhandled too, and retried as {again.copy_id}"
    assert any(line.endswith(said) for line in lines), lines
    assert asked.describe().endswith(said)


AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
ALL = Band(1, 0, 10)


def left_unhandled(store: MemoryStore, task_id: str) -> None:
    """`tests.histories.left_unhandled` an hour ago."""
    histories.left_unhandled(store, task_id, at=AN_HOUR_AGO)


def left_since(store: MemoryStore, task_id: str) -> None:
    """`tests.histories.left_unhandled` half an hour ago: after `left_unhandled`, and
    before the copies of `retried_unhandled` come due (else their work is claimed)."""
    histories.left_unhandled(store, task_id, at=AN_HOUR_AGO + timedelta(minutes=30))


def retried_unhandled(store: MemoryStore, task_ids: list[str]) -> None:
    """Leave each of ``task_ids`` unhandled, and retry it."""
    for task_id in task_ids:
        left_unhandled(store, task_id)
        drive(store, retry(task_id, now=datetime.now(UTC), token="op", server="ops1"))


def test_a_new_unhandled_task_is_listed_before_tasks_retried_already() -> None:
    # Given 21 unhandled tasks retried already, and one left unhandled since, whose id
    # sorts after theirs
    store = MemoryStore()
    retried_unhandled(store, [f"r{index:02}" for index in range(21)])
    left_unhandled(store, "znew")
    # When the status is read
    lines = unhandled_lines(format_status(read_status(store, now=datetime.now(UTC))))
    # Then the new one is listed first, then the retried ones up to 20, each with its copy
    assert lines[0] == "22 (21 of them retried already, listed after the others)"
    tasks = [line.split()[0] for line in lines[1:] if not line.startswith("    ")]
    assert tasks == ["znew", *(f"r{index:02}" for index in range(19)), "..."]
    assert lines[-1] == "  ... and 2 more"
    assert sum(line.startswith("    retried as ") for line in lines) == 19


def test_only_so_many_unhandled_tasks_are_read_and_the_count_says_so() -> None:
    # Given three unhandled tasks retried already and three not
    store = MemoryStore()
    retried_unhandled(store, ["a0", "a1", "a2"])
    for task_id in ("b0", "b1", "b2"):
        left_unhandled(store, task_id)
    # When the status reads at most four of them, three at a time
    report = read_status(store, now=datetime.now(UTC), read=4, page=3)
    lines = unhandled_lines(format_status(report))
    # Then it says how many of those it read were retried, and lists the others first
    assert report.unhandled_capped
    assert lines[0] == "6 (3 of the 4 read retried already, listed after the others)"
    tasks = [line.split()[0] for line in lines[1:] if not line.startswith("    ")]
    assert tasks == ["b0", "a0", "a1", "a2", "..."]
    assert lines[-1] == "  ... and 2 more"
    # And reading as many as there are is not capped: the count is exact
    exact = read_status(store, now=datetime.now(UTC), read=6, page=3)
    assert not exact.unhandled_capped
    assert unhandled_lines(format_status(exact))[0] == (
        "6 (3 of them retried already, listed after the others)"
    )


class OneBadDocument(MemoryStore):
    """A store where, once ``broken``, some tasks' records or children can't be decoded."""

    broken = False

    def load(self, task_id: str) -> Any:
        if self.broken and task_id == "bad-records":
            raise ValueError("naive datetime datetime.datetime(2026, 1, 1, 0, 0)")
        if self.broken and task_id == "bad-key":
            raise KeyError("at")
        return super().load(task_id)

    def find_tasks(self, task_ids: Sequence[str]) -> list[TaskDoc]:
        # A task's children, read for its line (one task's: a page's copies, read to
        # sort the tasks, are read together and decode)
        found = super().find_tasks(task_ids)
        if self.broken and [doc.parent_id for doc in found] == ["bad-children"]:
            raise ValueError("'bogus' is not a valid Origin")
        if self.broken and [doc.parent_id for doc in found] == ["bad-type"]:
            raise TypeError("'NoneType' object is not subscriptable")
        return found

    def find_children(self, parent_id: str) -> Any:
        if self.broken and parent_id in ("bad-children", "bad-type"):
            raise ValueError("'bogus' is not a valid Origin")
        return super().find_children(parent_id)


def test_a_document_that_cant_be_decoded_is_listed_bare_and_the_rest_as_usual() -> None:
    # Given five unhandled tasks: two whose records can't be decoded, and three
    # retried, two of whose copies (their children) can't be
    store = OneBadDocument()
    for task_id in ("bad-key", "bad-records"):
        left_unhandled(store, task_id)
    retried_unhandled(store, ["bad-children", "bad-type", "fine"])
    store.broken = True
    # When the status is read
    lines = unhandled_lines(format_status(read_status(store, now=datetime.now(UTC))))
    # Then the four are listed bare, and the other one with its retry
    assert lines[:6] == [
        "5 (3 of them retried already, listed after the others)",
        "  bad-key  tests:Nothing  (its records can't be read)",
        "  bad-records  tests:Nothing  (its records can't be read)",
        "  bad-children  tests:Nothing  (its records can't be read)",
        "  bad-type  tests:Nothing  (its records can't be read)",
        "  fine  tests:Nothing  failed (timeout: slow); failed() error (exception: failed() "
        "raised)",
    ]
    assert lines[6].startswith(f"    retried as {retry_copy_id(store.load('fine').task)} at ")
    assert len(lines) == 7


class CopiesUnreadable(MemoryStore):
    """A store where looking the retries' copies up fails on a document that can't be decoded."""

    def find_tasks(self, task_ids: Sequence[str]) -> list[TaskDoc]:
        raise ValueError("'bogus' is not a valid Status")


def test_when_the_copies_cant_be_looked_up_the_tasks_are_listed_as_not_retried() -> None:
    # Given a retried task and a new failure, the copies' documents unreadable
    store = CopiesUnreadable()
    retried_unhandled(store, ["old"])
    left_since(store, "new")
    # When the status is read
    lines = unhandled_lines(format_status(read_status(store, now=datetime.now(UTC))))
    # Then both are listed, the new one first, the old one with its retry (read from its records)
    assert lines[0] == "2"
    assert [line.split()[0] for line in lines[1:]] == ["new", "old", "retried"]


class Counting(MemoryStore):
    """A store that counts the tasks loaded and the pages of unhandled tasks read."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []
        self.pages: list[tuple[int, str | None]] = []

    def load(self, task_id: str) -> Any:
        self.loaded.append(task_id)
        return super().load(task_id)

    def find_by_status(
        self, statuses: Sequence[Status], limit: int, after: str | None = None
    ) -> list[TaskDoc]:
        self.pages.append((limit, after))
        return super().find_by_status(statuses, limit, after)


def listed_tasks(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines[1:] if not line.startswith("    ")]


def test_a_new_failure_is_listed_first_however_many_tasks_were_retried_before() -> None:
    # Given 201 tasks left unhandled and retried (more than one page, and than
    # the 200 an earlier version read, oldest first), and one left unhandled since,
    # whose id sorts among theirs
    store = Counting()
    older = [f"r{index:03}" for index in range(201)]
    retried_unhandled(store, older)
    left_since(store, "r100x")
    store.loaded.clear()
    # When the status is read, 64 at a time
    report = read_status(store, now=datetime.now(UTC), page=64)
    lines = unhandled_lines(format_status(report))
    # Then the new one is listed first, and the count of the retried is exact
    assert lines[0] == "202 (201 of them retried already, listed after the others)"
    assert listed_tasks(lines) == ["r100x", *older[:19], "..."]
    assert lines[-1] == "  ... and 182 more"
    assert (report.unhandled_read, report.unhandled_retried) == (202, 201)
    assert not report.unhandled_capped
    # And all were read page by page in id order, and only those listed were loaded
    assert store.pages == [(64, ""), (64, "r063"), (64, "r126"), (64, "r190"), (64, "r200")]
    assert sorted(store.loaded) == sorted(["r100x", *older[:19]])


class SettledByAnOlderVersion(MemoryStore):
    """A store where some unhandled tasks have no ``due_at`` (settled by older versions)."""

    def __init__(self, undated: set[str]) -> None:
        super().__init__()
        self.undated = undated

    def find_by_status(
        self, statuses: Sequence[Status], limit: int, after: str | None = None
    ) -> list[TaskDoc]:
        return [
            dataclasses.replace(doc, due_at=None) if doc.task_id in self.undated else doc
            for doc in super().find_by_status(statuses, limit, after)
        ]


def test_unhandled_tasks_are_listed_newest_first_with_the_pruned_retries_among_the_new() -> None:
    # Given tasks left unhandled over three days, some of them retried: one whose
    # copy was pruned since, and one settled by an older version, with no settling time
    start = datetime.now(UTC) - timedelta(days=3)
    store = SettledByAnOlderVersion({"undated"})
    for task_id, hours in [("a-oldest", 0), ("b-newest", 50), ("c-middle", 20), ("undated", 1)]:
        histories.left_unhandled(store, task_id, at=start + timedelta(hours=hours))
    for task_id, hours in [("d-retried-old", 2), ("e-retried-new", 40), ("f-pruned", 30)]:
        histories.left_unhandled(store, task_id, at=start + timedelta(hours=hours))
        drive(store, retry(task_id, now=start + timedelta(hours=45), token="op", server="ops1"))
    pruned_copy = retry_copy_id(store.load("f-pruned").task)
    store.delete_tasks(store.find_tasks([pruned_copy]))
    # When the status is read
    report = read_status(store, now=datetime.now(UTC))
    lines = unhandled_lines(format_status(report))
    # Then those whose copy is not stored come first, the pruned one by when it was
    # left unhandled and the undated one last; then the retried, each group newest first
    assert lines[0] == "7 (2 of them retried already, listed after the others)"
    assert listed_tasks(lines) == [
        "b-newest",
        "f-pruned",
        "c-middle",
        "a-oldest",
        "undated",
        "e-retried-new",
        "d-retried-old",
    ]
    # And the pruned one's retry says its copy is no longer stored
    assert not report.retries["f-pruned"].stored
    assert f"{pruned_copy} is not stored: pruned once done with" in lines[3]
    assert report.retries["e-retried-new"].stored


class NoQueryByParent(MemoryStore):
    """A store that counts its queries by parent (on FerretDB, each reads all of ``finished``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_parent = 0

    def find_children(self, parent_id: str) -> list[TaskDoc]:
        self.by_parent += 1
        return super().find_children(parent_id)


def test_the_tasks_listed_have_their_children_read_by_id_not_by_a_query_by_parent() -> None:
    # Given a retried task and a new failure
    store = NoQueryByParent()
    retried_unhandled(store, ["old"])
    left_since(store, "new")
    # When the status is read
    lines = unhandled_lines(format_status(read_status(store, now=datetime.now(UTC))))
    # Then both are listed, the retried one with its copy, and no query by parent ran
    assert [line.split()[0] for line in lines[1:]] == ["new", "old", "retried"]
    assert store.by_parent == 0
