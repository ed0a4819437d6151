"""The pytest plugin: tullius_sim fixture, --tullius-seed, and the failure report."""

from __future__ import annotations

import re
import shlex
import textwrap
from typing import Any

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import time
from datetime import timedelta

import tullius
from tullius.testing import assert_outcomes


class ExampleTask(tullius.Task):
    timeout = timedelta(seconds=5)

    def run(self):
        for _ in range(self.count_to):
            time.sleep(1)

    def failed(self):
        return self.copy(count_to=max(self.count_to - 1, 0))


def test_chain(tullius_sim):
    task = ExampleTask(count_to=7)
    tullius_sim.queue(task)
    tullius_sim.drain(within=timedelta(minutes=5))
    assert_outcomes(tullius_sim.chain(task), "timeout*3 succeeded")


def test_seed(tullius_sim):
    print("SEED", tullius_sim.seed)


def test_broken(tullius_sim):
    tullius_sim.crash_server("s1", at=timedelta(seconds=1))
    task = ExampleTask(count_to=7)
    tullius_sim.queue(task)
    tullius_sim.drain(within=timedelta(minutes=5))
    assert_outcomes(tullius_sim.chain(task), "succeeded")
"""


def chain_alone(task: Any) -> Any:
    """The chain of ``task`` run alone in a fresh simulation, to its end."""
    from tullius.sim import Simulation

    with Simulation() as sim:
        sim.queue(task)
        sim.drain()
        return sim.chain(task)


def test_fixture_runs_a_user_test_and_reports_seed_faults_and_replay(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*tullius simulation*",
            "seed: *",
            "faults: [[]ServerCrash(at=timedelta(seconds=1), server='s1', restart_after=None)]",
            "replay: pytest 'test_user.py::test_broken' --tullius-seed=*",
            "*DrainTimeout*",
        ]
    )


def test_the_replay_line_pastes_back_from_a_subdirectory_the_tests_were_run_from(
    pytester: pytest.Pytester,
) -> None:
    # Given a project whose tests are in a subdirectory, run from there
    pytester.makeini("[pytest]\n")
    tests = pytester.mkdir("tests")
    (tests / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tests)
    try:
        result = pytester.runpytest("-p", "no:cacheprovider", "-k", "broken")
        result.assert_outcomes(failed=1)
        [line] = [line for line in result.outlines if line.startswith("replay: ")]
        # When the replay line is run as printed, from the same place
        replayed = pytester.runpytest("-p", "no:cacheprovider", *shlex.split(line)[2:])
    finally:
        monkeypatch.undo()
    # Then it names the test as pytest does from there, and runs it again
    assert shlex.split(line)[2] == "test_user.py::test_broken"
    replayed.assert_outcomes(failed=1)


def test_seed_option_overrides_the_derived_seed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-s", "--tullius-seed=1234", "-k", "seed")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*SEED 1234*"])


def test_importing_the_plugin_does_not_import_the_simulator() -> None:
    import subprocess
    import sys

    heavy = "('tullius.sim', 'pymongo', 'hypothesis', 'freezegun')"
    code = (
        "import sys, tullius.pytest_plugin; "
        f"print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_expected_outcome_with_a_typo_is_refused_where_it_is_written() -> None:
    from tullius.testing import assert_outcomes, expect

    with pytest.raises(ValueError, match=r"expect\('succeded'\): expected 'succeeded', 'failed'"):
        expect("succeded")
    with pytest.raises(ValueError, match=r"kind='timout'.*one of exception, timeout"):
        expect("failed", kind="timout")
    with pytest.raises(ValueError, match=r"handler_error='oops'"):
        expect(handler_error="oops")
    with pytest.raises(ValueError, match=r"'succeded'"):
        assert_outcomes([], "timeout*2 succeded")


@pytest.mark.parametrize("word", ["timeout*x", "timeout*", "timeout*0", "timeout*-1"])
def test_a_count_that_is_not_a_whole_number_from_one_is_refused_naming_the_word(
    word: str,
) -> None:
    from tullius.testing import assert_outcomes

    # "*x" raised int()'s bare "invalid literal"; "*0" and "*-1" expected nothing, silently.
    with pytest.raises(ValueError, match=re.escape(f"{word!r} should be OUTCOME or OUTCOME*COUNT")):
        assert_outcomes([], f"{word} succeeded")


def test_an_expected_duration_that_is_not_a_timedelta_is_refused_where_it_is_written() -> None:
    from tullius.testing import expect

    # A number never equals a timedelta: every link mismatched, blaming the task.
    with pytest.raises(ValueError, match=r"expect\(duration=5\): expected a timedelta"):
        expect("timeout", duration=5)  # type: ignore[arg-type]


def test_a_task_or_an_outcome_string_where_a_chain_or_list_goes_is_refused_by_name() -> None:
    from datetime import timedelta

    import tullius
    from tullius.testing import assert_chain, assert_outcomes

    class Quick(tullius.Task):
        timeout = timedelta(seconds=1)

        def run(self) -> None:
            pass

    task = Quick()
    chain = chain_alone(task)
    # assert_chain(chain, "exception") compared each letter of the word as an outcome.
    with pytest.raises(TypeError, match=r"assert_chain\(chain, 'succeeded'\): expected a list"):
        assert_chain(chain, "succeeded")  # type: ignore[arg-type]
    for not_a_chain in (task, task.task_id):
        with pytest.raises(TypeError, match=r"expected a chain, the list of links sim.chain"):
            assert_chain(not_a_chain, ["succeeded"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"assert_outcomes\(.*expected a chain"):
            assert_outcomes(not_a_chain, "succeeded")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected one string of outcomes"):
        assert_outcomes(chain, ["succeeded"])  # type: ignore[arg-type]
    assert_chain(chain, ["succeeded"])
    assert_outcomes(chain, "succeeded")


def test_the_replay_line_stays_one_shell_argument_for_an_id_with_a_quote(
    pytester: pytest.Pytester,
) -> None:
    import shlex

    pytester.makepyfile(
        test_quoted="""
        import pytest

        @pytest.mark.parametrize("name", ["O'Brien"])
        def test_customer(tullius_sim, name):
            assert False
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--tullius-seed=7")
    result.assert_outcomes(failed=1)
    [line] = [line for line in result.outlines if line.startswith("replay: ")]
    assert shlex.split(line) == [
        "replay:",
        "pytest",
        "test_quoted.py::test_customer[O'Brien]",
        "--tullius-seed=7",
    ]


def test_expect_matches_a_status_and_fields_named_like_its_own_parameters() -> None:
    from datetime import timedelta

    import tullius
    from tullius.testing import assert_chain, expect

    class Notify(tullius.Task):
        timeout = timedelta(seconds=1)

        def run(self) -> None:
            pass

    class Charge(tullius.Task):
        timeout = timedelta(seconds=1)

        def run(self) -> None:
            raise RuntimeError("declined")

        def failed(self) -> tullius.Task:
            return Notify(kind="refund", duration=3)

    chain = chain_alone(Charge())
    assert_chain(
        chain,
        [
            expect("exception", task_status="handled"),
            expect("succeeded", fields={"kind": "refund", "duration": 3}),
        ],
    )
    with pytest.raises(AssertionError, match="status 'handled', expected 'unhandled'"):
        assert_chain(chain, [expect("exception", task_status="unhandled"), "succeeded"])
    with pytest.raises(AssertionError, match="kind='refund', expected 'bill'"):
        assert_chain(chain, ["exception", expect(fields={"kind": "bill"})])
    with pytest.raises(ValueError, match=r"task_status='handeled'\): expected one of queued"):
        expect(task_status="handeled")
    # A field named status is still matched by keyword, as before.
    assert expect(status="paid").fields == {"status": "paid"}
    assert_chain(chain, (expect(outcome) for outcome in ["exception", "succeeded"]))


def test_expect_matches_a_class_default_and_the_tasks_own_values_as_stored() -> None:
    from datetime import UTC, datetime, timedelta

    import tullius
    from tullius.testing import assert_chain, expect

    class Job(tullius.Task):
        timeout = timedelta(seconds=1)
        attempt: int = 0
        tags: tuple[str, ...] = ()
        when: datetime | None = None

        def run(self) -> None:
            pass

    when = datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    # Given a task made without its defaulted field, with a tuple and a time in µs
    chain = chain_alone(Job(tags=("a", "b"), when=when))
    # Then expect() matches the default, and the task's own values as they were stored
    assert_chain(chain, [expect("succeeded", attempt=0, tags=("a", "b"), when=when)])
    with pytest.raises(AssertionError, match="attempt=0, expected 1"):
        assert_chain(chain, [expect(attempt=1)])
    with pytest.raises(AssertionError, match="missing='<missing>', expected 1"):
        assert_chain(chain, [expect(missing=1)])


def test_expect_matches_fields_only_not_other_attributes_and_any_value_is_compared() -> None:
    from datetime import timedelta
    from typing import ClassVar

    import tullius
    from tullius.testing import assert_chain, expect

    class Paced(tullius.Task):
        timeout = timedelta(seconds=1)
        pace: ClassVar[float] = 0.2
        count_to: int = 3

        def run(self) -> None:
            pass

    chain = chain_alone(Paced())
    # A setting, a ClassVar or the task id is no field of the task: reported missing
    for name, value in (("timeout", timedelta(seconds=1)), ("pace", 0.2)):
        with pytest.raises(AssertionError, match=f"{name}='<missing>'"):
            assert_chain(chain, [expect(**{name: value})])
    # A value the store could not hold (a dict keyed by numbers) is a mismatch, not a crash
    with pytest.raises(AssertionError, match=r"count_to=3, expected \{1: 'x'\}"):
        assert_chain(chain, [expect(count_to={1: "x"})])
