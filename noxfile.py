"""Developer sessions: ``nox -s lint typecheck tests integration``.

CI does not use nox (it runs the README's test command through .ci/run, which
also runs lint and type checks as tests); these sessions are for working on one
aspect at a time in isolated environments.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


def _run_tests(session: nox.Session, *, integration: bool = False) -> None:
    session.install("-e", ".[test]")
    paths = ["tests/integration"] if integration else ["tests/unit", "tests/property"]
    session.run("pytest", *paths, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and property tests: no database server needed."""
    _run_tests(session)


@nox.session
def integration(session: nox.Session) -> None:
    """Against FerretDB built from its Go module, or TULLIUS_TEST_MONGODB_URI."""
    _run_tests(session, integration=True)
