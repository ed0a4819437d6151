"""Settings resolution: flags win over environment over tullius_deps; bad values name themselves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tullius.band import Band
from tullius.deps import Deps
from tullius.errors import ConfigError
from tullius.policy import DEFAULT_LEASE
from tullius.runtime.config import (
    DEFAULT_BANDS,
    DEFAULT_GRACE,
    DEFAULT_POLL_INTERVAL,
    ENV_FLAGS,
    RawFlags,
    env_name,
    parse_count,
    parse_processes,
    parse_seconds,
    resolve,
)


def make_db() -> None:
    return None


def deps(*, make_db: Any = make_db, task_processes: Any = None) -> Any:
    def loader(*, required: bool) -> Deps:
        return Deps(make_db=make_db, task_processes=task_processes)

    return loader


def no_deps(*, required: bool) -> Deps | None:
    if required:
        raise ConfigError("module", "tullius_deps", "was not found on the Python path")
    return None


def test_env_name_follows_the_flag() -> None:
    assert env_name("--poll-interval") == "TULLIUS_POLL_INTERVAL"
    assert env_name("--mongodb-uri") == "TULLIUS_MONGODB_URI"


def test_tullius_deps_alone_configures_the_daemon() -> None:
    bands = (Band(10, 0, 10), Band(5, 0, 0))
    settings = resolve(RawFlags(), {}, deps_loader=deps(task_processes=bands))
    assert settings.make_db is make_db
    assert settings.mongodb_uri is None
    assert settings.bands == bands
    assert settings.lease == DEFAULT_LEASE
    assert settings.poll_interval == DEFAULT_POLL_INTERVAL
    assert settings.grace == DEFAULT_GRACE
    assert settings.max_tasks_per_worker == 0
    assert settings.server_name


def test_flags_win_over_environment_which_wins_over_deps() -> None:
    env = {"TULLIUS_MONGODB_URI": "mongodb://env/db", "TULLIUS_PROCESSES": "3:0-1, 2:0-0"}
    loader = deps(task_processes=(Band(10, 0, 10),))
    from_env = resolve(RawFlags(), env, deps_loader=loader)
    assert from_env.mongodb_uri == "mongodb://env/db"
    assert from_env.bands == (Band(3, 0, 1), Band(2, 0, 0))
    assert from_env.make_db is None
    from_flags = resolve(
        RawFlags(mongodb_uri="mongodb://flag/db", processes=["1:4-4"]), env, deps_loader=loader
    )
    assert from_flags.mongodb_uri == "mongodb://flag/db"
    assert from_flags.bands == (Band(1, 4, 4),)


def test_uri_without_tullius_deps_uses_default_bands() -> None:
    settings = resolve(RawFlags(mongodb_uri="mongodb://h/db"), {}, deps_loader=no_deps)
    assert settings.bands == DEFAULT_BANDS


def test_missing_tullius_deps_without_uri_is_an_error() -> None:
    with pytest.raises(ConfigError, match="tullius_deps"):
        resolve(RawFlags(), {}, deps_loader=no_deps)


def test_tullius_deps_without_make_db_needs_a_uri() -> None:
    with pytest.raises(ConfigError, match="--mongodb-uri") as info:
        resolve(RawFlags(), {}, deps_loader=deps(make_db=None))
    assert info.value.setting == "tullius_deps.make_db"


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (RawFlags(processes=["3:7-2"]), "--processes='3:7-2'"),
        (RawFlags(lease="0"), "--lease='0'"),
    ],
)
def test_a_bad_flag_is_reported_before_a_missing_tullius_deps(flags: RawFlags, shown: str) -> None:
    with pytest.raises(ConfigError, match=shown):
        resolve(flags, {}, deps_loader=no_deps)


def test_embedded_needs_neither_uri_nor_deps() -> None:
    settings = resolve(RawFlags(embedded=True, demo=True), {}, deps_loader=no_deps)
    assert settings.embedded
    assert settings.demo
    assert settings.bands == DEFAULT_BANDS


@pytest.mark.parametrize(
    "flags",
    [
        RawFlags(embedded=True, mongodb_uri="mongodb://user:secret@db/tullius"),
        RawFlags(embedded=True, database="tullius"),
    ],
)
def test_embedded_with_a_database_flag_is_refused_naming_the_flag(flags: RawFlags) -> None:
    with pytest.raises(ConfigError, match="can't be given with --embedded") as raised:
        resolve(flags, {}, deps_loader=no_deps)
    assert raised.value.setting in ("--mongodb-uri", "--database")
    assert "secret" not in str(raised.value)


def test_embedded_wins_over_a_uri_in_the_environment() -> None:
    env = {"TULLIUS_MONGODB_URI": "mongodb://h/db"}
    settings = resolve(RawFlags(embedded=True), env, deps_loader=no_deps)
    assert settings.embedded
    assert settings.mongodb_uri is None


def test_demo_quick_implies_demo() -> None:
    settings = resolve(RawFlags(embedded=True, demo_quick=True), {}, deps_loader=no_deps)
    assert settings.demo
    assert settings.demo_quick


def test_timings_and_names_from_flags() -> None:
    settings = resolve(
        RawFlags(
            mongodb_uri="mongodb://h/db",
            lease="6",
            poll_interval="0.005",
            grace="0",
            max_tasks_per_worker="100",
            server_name="alpha",
            database="jobs",
        ),
        {},
        deps_loader=no_deps,
    )
    assert settings.lease == timedelta(seconds=6)
    assert settings.poll_interval == 0.005
    assert settings.grace == 0
    assert settings.max_tasks_per_worker == 100
    assert settings.server_name == "alpha"
    assert settings.database == "jobs"


def test_environment_timings_are_validated_under_their_variable_name() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(RawFlags(embedded=True), {"TULLIUS_LEASE": "soon"}, deps_loader=no_deps)
    assert info.value.setting == "TULLIUS_LEASE"
    assert info.value.value == "soon"


@pytest.mark.parametrize(
    ("flags", "setting", "value"),
    [
        (RawFlags(embedded=True, lease="0"), "--lease", "0"),
        (RawFlags(embedded=True, lease="-3"), "--lease", "-3"),
        (RawFlags(embedded=True, lease="nan"), "--lease", "nan"),
        (RawFlags(embedded=True, poll_interval="inf"), "--poll-interval", "inf"),
        (RawFlags(embedded=True, grace="-1"), "--grace", "-1"),
        (RawFlags(embedded=True, max_tasks_per_worker="-1"), "--max-tasks-per-worker", "-1"),
        (RawFlags(embedded=True, max_tasks_per_worker="1.5"), "--max-tasks-per-worker", "1.5"),
        (RawFlags(embedded=True, processes=["0:0-10"]), "--processes", "0:0-10"),
        (RawFlags(embedded=True, processes=["2:5-1"]), "--processes", "2:5-1"),
        (RawFlags(embedded=True, processes=["ten"]), "--processes", "ten"),
        (RawFlags(embedded=True, server_name=" "), "--server-name", " "),
        (RawFlags(embedded=True, database="a.b"), "--database", "a.b"),
        (RawFlags(mongodb_uri="http://h/db"), "--mongodb-uri", "http://h/db"),
    ],
)
def test_bad_values_name_the_setting_and_the_value(
    flags: RawFlags, setting: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(flags, {}, deps_loader=no_deps)
    assert info.value.setting == setting
    assert info.value.value == value
    assert setting in str(info.value)


def test_more_worker_processes_than_a_daemon_starts_are_refused_before_any_fork() -> None:
    # 100000:0-5 was accepted, and forking that many froze the machine for minutes.
    with pytest.raises(ConfigError, match=r"must total at most 1024 worker processes") as info:
        resolve(RawFlags(embedded=True, processes=["1000:0-5", "25:6-10"]), {}, deps_loader=no_deps)
    assert info.value.setting == "--processes"
    assert info.value.value == "1000:0-5 25:6-10"
    assert "(it asks for 1,025)" in str(info.value)
    resolve(RawFlags(embedded=True, processes=["1000:0-5", "24:6-10"]), {}, deps_loader=no_deps)


def test_a_lease_too_short_to_divide_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least"):
        parse_seconds("--lease", "0.01", minimum=0.06)


def test_bad_uri_is_redacted_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(RawFlags(mongodb_uri="postgres://user:secret@h/db"), {}, deps_loader=no_deps)
    assert "secret" not in str(info.value)


def test_describe_redacts_credentials() -> None:
    settings = resolve(
        RawFlags(mongodb_uri="mongodb://user:secret@h:27017/db"), {}, deps_loader=no_deps
    )
    assert "secret" not in settings.describe()
    assert "secret" not in repr(settings)
    assert "***" in settings.describe()


def test_parse_processes_accepts_overlapping_bands() -> None:
    assert parse_processes("--processes", ["10:0-10", "5:0-0"]) == (Band(10, 0, 10), Band(5, 0, 0))


def test_parse_processes_needs_one_band() -> None:
    with pytest.raises(ConfigError, match="at least one band"):
        parse_processes("--processes", [])


def test_parse_count_accepts_zero() -> None:
    assert parse_count("--max-tasks-per-worker", "0") == 0


def test_a_uri_with_pymongo_3s_j_option_still_gets_journaled_writes() -> None:
    from tullius.runtime.launch import _client_options

    # pymongo 4 ignores ``j=`` in a URI (with a warning): it does not set journal.
    assert _client_options("mongodb://db1/tullius?j=false")["journal"] is True
    assert "journal" not in _client_options("mongodb://db1/tullius?journal=false")
    assert "w" not in _client_options("mongodb://db1/tullius?w=1")


def test_a_misspelt_tullius_variable_is_refused_naming_the_one_it_resembles() -> None:
    env = {"TULLIUS_MONGODB_URL": "mongodb://user:secret@h/db"}
    with pytest.raises(ConfigError, match=r"TULLIUS_LEAES='60'.*expected TULLIUS_LEASE"):
        resolve(RawFlags(embedded=True), {"TULLIUS_LEAES": "60"}, deps_loader=no_deps)
    with pytest.raises(ConfigError, match="expected TULLIUS_MONGODB_URI") as raised:
        resolve(RawFlags(embedded=True), env, deps_loader=no_deps)
    assert "secret" not in str(raised.value)


def test_other_programs_tullius_variables_and_every_setting_of_ours_are_accepted() -> None:
    env = {env_name(flag): "" for flag in ENV_FLAGS}
    env |= {"TULLIUS_SIM_PIN_CPU": "0", "TULLIUS_APP_THEME": "dark"}
    assert resolve(RawFlags(embedded=True), env, deps_loader=no_deps).embedded


def test_prune_finished_takes_a_number_of_days() -> None:
    flags = RawFlags(mongodb_uri="mongodb://h/db", prune_finished="30", prune_unhandled=True)
    settings = resolve(flags, {}, deps_loader=no_deps)
    assert (settings.prune_finished, settings.prune_unhandled) == (timedelta(days=30), True)


@pytest.mark.parametrize(
    ("flags", "setting", "expected"),
    [
        (RawFlags(prune_finished="2"), "--prune-finished", "from 3 to 36500"),
        (RawFlags(prune_finished="ten"), "--prune-finished", "a number of days"),
        (RawFlags(prune_finished="nan"), "--prune-finished", "a number of days"),
        (RawFlags(prune_finished="1e9"), "--prune-finished", "from 3 to 36500"),
        (RawFlags(prune_finished="3", embedded=True), "--prune-finished", "with --embedded"),
        (RawFlags(prune_finished="3", status=True), "--prune-finished", "--status"),
        (RawFlags(prune_unhandled=True), "--prune-unhandled", "or --keep-finished DAYS"),
    ],
)
def test_a_prune_that_is_too_young_or_mixed_with_other_modes_is_refused(
    flags: RawFlags, setting: str, expected: str
) -> None:
    if not flags.embedded:
        flags = RawFlags(**{**flags.__dict__, "mongodb_uri": "mongodb://h/db"})
    with pytest.raises(ConfigError, match=expected) as raised:
        resolve(flags, {}, deps_loader=no_deps)
    assert raised.value.setting == setting


def test_keep_finished_takes_a_number_of_days_from_the_flag_or_the_environment() -> None:
    uri = "mongodb://h/db"
    by_flag = resolve(RawFlags(mongodb_uri=uri, keep_finished="30"), {}, deps_loader=no_deps)
    by_env = resolve(
        RawFlags(mongodb_uri=uri, prune_unhandled=True),
        {"TULLIUS_KEEP_FINISHED": "7.5"},
        deps_loader=no_deps,
    )
    assert (by_flag.keep_finished, by_flag.prune_unhandled) == (timedelta(days=30), False)
    assert (by_env.keep_finished, by_env.prune_unhandled) == (timedelta(days=7.5), True)
    assert by_flag.describe().endswith("; succeeded and handled tasks kept 30 day(s)")
    assert by_env.describe().endswith("; succeeded, handled and unhandled tasks kept 7.5 day(s)")
    assert resolve(RawFlags(mongodb_uri=uri), {}, deps_loader=no_deps).keep_finished is None


@pytest.mark.parametrize(
    ("flags", "env", "setting", "expected"),
    [
        (RawFlags(keep_finished="2"), {}, "--keep-finished", "from 3 to 36500"),
        (RawFlags(), {"TULLIUS_KEEP_FINISHED": "a week"}, "TULLIUS_KEEP_FINISHED", "of days"),
        (RawFlags(keep_finished="9", status=True), {}, "--keep-finished", "--status"),
        (
            RawFlags(keep_finished="9", retry_unhandled=["t1"]),
            {},
            "--keep-finished",
            "--retry-unhandled, which run no daemon",
        ),
        (
            RawFlags(keep_finished="9", prune_finished="9"),
            {},
            "--prune-finished",
            "can't be given with --keep-finished",
        ),
    ],
)
def test_a_keep_that_is_too_young_or_mixed_with_modes_that_run_no_daemon_is_refused(
    flags: RawFlags, env: dict[str, str], setting: str, expected: str
) -> None:
    flags = RawFlags(**{**flags.__dict__, "mongodb_uri": "mongodb://h/db"})
    with pytest.raises(ConfigError, match=expected) as raised:
        resolve(flags, env, deps_loader=no_deps)
    assert raised.value.setting == setting


def test_the_keep_variable_is_left_alone_by_modes_that_run_no_daemon() -> None:
    # Why: the environment that configures the daemons may serve a one-off --status
    env = {"TULLIUS_KEEP_FINISHED": "30"}
    for flags in (
        RawFlags(status=True),
        RawFlags(prune_finished="10"),
        RawFlags(retry_unhandled=["t1"]),
    ):
        flags = RawFlags(**{**flags.__dict__, "mongodb_uri": "mongodb://h/db"})
        assert resolve(flags, env, deps_loader=no_deps).keep_finished is None


def test_retry_unhandled_takes_task_ids_once_each() -> None:
    flags = RawFlags(mongodb_uri="mongodb://h/db", retry_unhandled=["t1", "t2", "t1"])
    settings = resolve(flags, {}, deps_loader=no_deps)
    assert settings.retry_unhandled == ("t1", "t2")
    assert (settings.retry_all, settings.retry_class) == (False, None)
    assert settings.prune_finished is None


def test_retry_unhandled_all_may_be_narrowed_to_a_class() -> None:
    flags = RawFlags(
        mongodb_uri="mongodb://h/db", retry_unhandled=["all"], retry_class="billing.tasks:Invoice"
    )
    settings = resolve(flags, {}, deps_loader=no_deps)
    assert (settings.retry_unhandled, settings.retry_all) == ((), True)
    assert settings.retry_class == "billing.tasks:Invoice"
    every = resolve(
        RawFlags(mongodb_uri="mongodb://h/db", retry_unhandled=["all"]), {}, deps_loader=no_deps
    )
    assert (every.retry_unhandled, every.retry_all, every.retry_class) == ((), True, None)


@pytest.mark.parametrize("given", [["ALL"], ["All"], ["aLL"], ["all", "ALL"]])
def test_retry_unhandled_all_is_the_word_in_any_case(given: list[str]) -> None:
    flags = RawFlags(mongodb_uri="mongodb://h/db", retry_unhandled=given, retry_class="Invoice")
    settings = resolve(flags, {}, deps_loader=no_deps)
    assert (settings.retry_unhandled, settings.retry_all) == ((), True)
    assert settings.retry_class == "Invoice"


def test_a_dry_run_of_a_retry_is_a_setting_of_its_own() -> None:
    flags = RawFlags(mongodb_uri="mongodb://h/db", retry_unhandled=["all"], dry_run=True)
    assert resolve(flags, {}, deps_loader=no_deps).retry_dry_run
    flags = RawFlags(mongodb_uri="mongodb://h/db", retry_unhandled=["t1"])
    assert not resolve(flags, {}, deps_loader=no_deps).retry_dry_run


def test_without_retry_unhandled_the_daemon_runs() -> None:
    settings = resolve(RawFlags(mongodb_uri="mongodb://h/db"), {}, deps_loader=no_deps)
    assert (settings.retry_unhandled, settings.retry_all) == (None, False)


def test_retry_unhandled_uses_tullius_deps_like_the_daemon() -> None:
    settings = resolve(RawFlags(retry_unhandled=["t1"]), {}, deps_loader=deps())
    assert settings.make_db is make_db
    assert settings.retry_unhandled == ("t1",)


@pytest.mark.parametrize(
    ("flags", "setting", "value", "expected"),
    [
        (RawFlags(retry_unhandled=["t1"], embedded=True), "--retry-unhandled", "t1", "--embedded"),
        (RawFlags(retry_unhandled=["t1"], demo=True), "--retry-unhandled", "t1", "--demo"),
        (RawFlags(retry_unhandled=["all"], demo_quick=True), "--retry-unhandled", "all", "--demo"),
        (RawFlags(retry_unhandled=["t1"], status=True), "--retry-unhandled", "t1", "--status"),
        (
            RawFlags(retry_unhandled=["t1"], prune_finished="30"),
            "--retry-unhandled",
            "t1",
            "--prune-finished",
        ),
        (RawFlags(retry_unhandled=[""]), "--retry-unhandled", "", "by id"),
        (RawFlags(retry_unhandled=["t1", " "]), "--retry-unhandled", "t1  ", "by id"),
        (RawFlags(retry_unhandled=[]), "--retry-unhandled", "", "by id"),
        (RawFlags(retry_unhandled=["t1", "all"]), "--retry-unhandled", "t1 all", "not both"),
        (RawFlags(retry_unhandled=["t1", "ALL"]), "--retry-unhandled", "t1 ALL", "not both"),
        (RawFlags(retry_class="Invoice"), "--retry-class", "Invoice", "--retry-unhandled all"),
        (RawFlags(dry_run=True), "--dry-run", True, "give --retry-unhandled too"),
        (
            RawFlags(retry_unhandled=["t1"], retry_class="Invoice"),
            "--retry-class",
            "Invoice",
            "can't be given with task ids",
        ),
        (RawFlags(retry_unhandled=["all"], retry_class=""), "--retry-class", "", "module:Class"),
        (
            RawFlags(retry_unhandled=["all"], retry_class="a b"),
            "--retry-class",
            "a b",
            "module:Class",
        ),
    ],
)
def test_a_retry_mixed_with_other_modes_or_malformed_is_refused_naming_the_value(
    flags: RawFlags, setting: str, value: str, expected: str
) -> None:
    if not flags.embedded:
        flags = RawFlags(**{**flags.__dict__, "mongodb_uri": "mongodb://h/db"})
    with pytest.raises(ConfigError, match=expected) as raised:
        resolve(flags, {}, deps_loader=no_deps)
    assert (raised.value.setting, raised.value.value) == (setting, value)
    assert f"{setting}={value!r}" in str(raised.value)
