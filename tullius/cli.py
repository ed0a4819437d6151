"""``tulliusd``: the command line of the daemon; thin on purpose.

Parses flags, resolves settings (`tullius.runtime.config`), opens the store and
runs the supervisor (`tullius.runtime.launch`).  A bad start-up is one line on
stderr naming the problem and the fix, with exit status 2; the daemon is
otherwise silent unless ``-v`` is given or something needs attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from tullius.errors import ConfigError, TulliusError
from tullius.policy import DEFAULT_LEASE
from tullius.prune import MIN_AGE
from tullius.runtime.config import (
    DEFAULT_GRACE,
    DEFAULT_POLL_INTERVAL,
    RawFlags,
    Settings,
    resolve,
)

if TYPE_CHECKING:
    from tullius.retry import RetryReport

PROG = "tulliusd"
#: Exit status for settings or an environment the daemon can't start with.
EXIT_STARTUP = 2
#: ``--status``: tasks wait for a priority no running daemon takes (for monitoring).
EXIT_WAITING = 1
#: ``--retry-unhandled``: some task was not retried (not unhandled, or not found), or
#: ``--retry-class`` matched no unhandled task while some are.
EXIT_NOT_RETRIED = 1

DESCRIPTION = """\
Run Tullius tasks: claim queued tasks from MongoDB, run each in a worker
process under its timeout, and make sure every failure is handled by the
task's failed().  Silent while all is well; use -v to see activity.

Settings come from flags, then TULLIUS_* environment variables (named after
the flags: --poll-interval -> TULLIUS_POLL_INTERVAL), then the tullius_deps
module on the Python path (make_db() and task_processes, as in the README).
"""

EPILOG = """\
examples:
  tulliusd                                   # configured by tullius_deps.py
  tulliusd --mongodb-uri mongodb://db1,db2/tullius?replicaSet=rs0 \\
           --processes 10:0-10 --processes 5:0-0
  tulliusd --embedded --demo                 # the README example, no MongoDB needed
  tulliusd --status                          # what needs an operator, then exit
  tulliusd --prune-finished 30               # delete tasks finished over 30 days ago, then exit
  tulliusd --keep-finished 30                # run, deleting such tasks every six hours
  tulliusd --retry-unhandled ID1 ID2         # their failed() fixed: run it again for these
                                             # unhandled tasks (not run()), then exit
  tulliusd --retry-unhandled all --retry-class billing.tasks:Invoice
                                             # ... for every unhandled Invoice

Stop with SIGTERM or Ctrl-C: no new work is claimed, running tasks get
--grace seconds, then they are killed and recorded as failed (kind
"shutdown") so that failed() runs for them.  A second signal skips the grace.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    store = parser.add_argument_group("where tasks are stored")
    store.add_argument(
        "--mongodb-uri",
        metavar="URI",
        help="MongoDB URI (env TULLIUS_MONGODB_URI); without it, tullius_deps.make_db() is used. "
        "Unless the URI says otherwise the client uses w=majority, journal=true, 5 s to "
        "connect, and 10 s write and 30 s socket timeouts",
    )
    store.add_argument(
        "--database",
        metavar="NAME",
        help="database name (env TULLIUS_DATABASE); default: the URI's, else 'tullius'",
    )
    store.add_argument(
        "--embedded",
        action="store_true",
        help="keep tasks in this process instead of MongoDB (nothing survives a restart; "
        "for trying Tullius out and for the demo)",
    )
    work = parser.add_argument_group("workers")
    work.add_argument(
        "--processes",
        action="append",
        metavar="COUNT:MIN-MAX",
        help="COUNT worker processes for priorities MIN..MAX; repeat for more bands, which may "
        "overlap (10:0-10 and 5:0-0 keep 5 workers for priority 0). Env TULLIUS_PROCESSES "
        "(space separated); default: tullius_deps.task_processes, else 4 workers for all "
        "priorities",
    )
    work.add_argument(
        "--max-tasks-per-worker",
        metavar="N",
        help="replace a worker process after N jobs so new code is picked up (default 0: never)",
    )
    work.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        help=f"how often an idle daemon looks for new work (default {DEFAULT_POLL_INTERVAL:g})",
    )
    fault = parser.add_argument_group("failures and stopping")
    fault.add_argument(
        "--lease",
        metavar="SECONDS",
        help=f"when this daemon vanishes, others fail its tasks as 'lost' within this time "
        f"(default {DEFAULT_LEASE.total_seconds():g}); use the same value on every server",
    )
    fault.add_argument(
        "--grace",
        metavar="SECONDS",
        help=f"on SIGTERM/SIGINT, how long running tasks may finish before they are killed "
        f"(default {DEFAULT_GRACE:g})",
    )
    fault.add_argument(
        "--server-name",
        metavar="NAME",
        help="name written into this daemon's records (default host:pid)",
    )
    history = parser.add_argument_group("history")
    history.add_argument(
        "--keep-finished",
        metavar="DAYS",
        help="delete the tasks that succeeded or were handled more than DAYS ago (at least "
        f"{MIN_AGE / timedelta(days=1):g}), with their records, every six hours while running "
        "(env TULLIUS_KEEP_FINISHED; default: keep them for ever); unhandled ones too with "
        "--prune-unhandled. Every daemon may have it: their prunes don't clash",
    )
    other = parser.add_argument_group("other")
    other.add_argument("-v", "--verbose", action="store_true", help="log activity to stderr")
    other.add_argument(
        "--status",
        action="store_true",
        help="print the daemons the database has heard from, tasks by status, set-aside "
        "documents, work no running daemon takes and unhandled tasks, then exit, starting no "
        "daemon: 0, or 1 when work waits for a priority no running daemon takes",
    )
    other.add_argument(
        "--prune-finished",
        metavar="DAYS",
        help="delete the tasks that succeeded or were handled more than DAYS ago (at least "
        f"{MIN_AGE / timedelta(days=1):g}), with their records, then exit, starting no daemon; "
        "a task is kept longer by its own timeout, and while its parent is too young to go. "
        "Safe while daemons run; run it daily from cron",
    )
    other.add_argument(
        "--prune-unhandled",
        action="store_true",
        help="with --prune-finished or --keep-finished, delete old unhandled tasks too (kept "
        "otherwise: they are the failures nobody handled)",
    )
    other.add_argument(
        "--retry-unhandled",
        action="extend",
        nargs="+",
        metavar="ID",
        help="once the bug in their failed() is fixed, have the daemons run failed() again for "
        "these unhandled tasks (ids as --status lists them), or for every one with 'all', then "
        "exit, starting no daemon. Each task stays unhandled; a copy of it, failed with its "
        "failure, gets the failed() attempts (run() never runs again). Asking again for a task "
        "already retried completes that retry. Exit status 0, or 1 when some task was not "
        "retried (a line on stderr says why) or --retry-class matched no unhandled task, or 2 "
        "when the database can't be read or written",
    )
    other.add_argument(
        "--dry-run",
        action="store_true",
        help="with --retry-unhandled, write nothing: print what would be retried",
    )
    other.add_argument(
        "--retry-class",
        metavar="NAME",
        help="with --retry-unhandled all, only the tasks of this class: the stored "
        "module:Class, or just Class",
    )
    other.add_argument(
        "--demo",
        action="store_true",
        help="queue the README's ExampleTask(count_to=10), print its chain as it unfolds "
        "(10..5 time out after 5 s, 4 succeeds) and exit when all is done",
    )
    other.add_argument(
        "--demo-quick",
        action="store_true",
        help="like --demo, five times faster (0.2 s per count, 1 s timeout)",
    )
    return parser


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s tulliusd %(levelname)s %(message)s"))
    root = logging.getLogger("tullius")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _print_status(settings: Settings) -> int:
    """Print ``--status``'s report; 1 if work waits for a priority no running daemon takes."""
    from tullius.runtime.launch import StartupError, open_mongo
    from tullius.runtime.status import format_status, read_status

    store = open_mongo(settings, prepare=False)
    try:
        report = read_status(store, now=datetime.now(UTC))
    except TulliusError as error:  # the store failing, or a document it can't give back
        raise StartupError(f"can't read the status: {error}") from None
    print(format_status(report))
    return EXIT_WAITING if report.coverage.waiting else 0


def _prune(settings: Settings) -> int:
    """Delete old finished tasks (``--prune-finished``) and print what was done."""
    from tullius.engine import drive
    from tullius.prune import prune
    from tullius.runtime.launch import StartupError, open_mongo

    assert settings.prune_finished is not None
    store = open_mongo(settings, prepare=False)
    try:
        report = drive(
            store,
            prune(
                settings.prune_finished, now=datetime.now(UTC), unhandled=settings.prune_unhandled
            ),
        )
    except TulliusError as error:  # the store failing, or a document it can't give back
        raise StartupError(f"can't prune: {error}") from None
    print(report.describe(settings.prune_finished))
    return 0


def _retry(settings: Settings) -> int:
    """Retry unhandled tasks' ``failed()`` (``--retry-unhandled``); print a line per task.

    Driven `within_window`, as `tullius.retry.retry_now` drives one, and with
    the classes' `current_limits` as this process loads them: no write is
    made a `WRITE_WINDOW` after the command started, so that a prune can
    count on it (`tullius.prune`).  Each task's line is printed as it is
    done: on stdout when it was retried (now or before), on stderr, as
    ``tulliusd: ...``, when it was refused or not found.  One task refused or
    not found does not stop the others; the store failing does (exit status
    2, as for ``--status``), the lines printed standing for what was done.
    """
    from tullius.errors import NotRetried, TaskNotFound, UnknownTaskClass
    from tullius.retry import Retry, RetryReport, limits_once, retry, retry_all, within_window
    from tullius.runtime.launch import StartupError, open_mongo

    assert settings.retry_unhandled is not None
    run = within_window(open_mongo(settings, prepare=False))
    now = datetime.now(UTC)
    token = uuid.uuid4().hex
    server = settings.server_name
    report = RetryReport()

    def unloadable(error: UnknownTaskClass) -> None:
        _say(
            f"warning: class {error.name!r} can't be loaded here ({error.reason}), so its "
            "copies keep the failed_timeout and failed_attempts stored with each task; run "
            "the command where the fixed code is importable to take the class's own"
        )

    limits = limits_once(unloadable)

    def show(done: Retry | NotRetried | TaskNotFound) -> None:
        # As each is done (flushed): the store may fail at the next one.
        if isinstance(done, Retry):
            print(done.describe(), flush=True)
        else:
            _say(str(done))

    try:
        if settings.retry_all:
            run(
                retry_all(
                    now=now,
                    token=token,
                    server=server,
                    class_name=settings.retry_class,
                    limits=limits,
                    report=report,
                    on_each=show,
                    dry_run=settings.retry_dry_run,
                )
            )
            return _retry_all_done(report, settings.retry_class)
        not_found = 0
        for task_id in settings.retry_unhandled:
            try:
                done = run(
                    retry(
                        task_id,
                        now=now,
                        token=token,
                        server=server,
                        limits=limits,
                        dry_run=settings.retry_dry_run,
                    )
                )
            except TaskNotFound as error:
                not_found += 1
                show(error)
                continue
            except NotRetried as error:
                result: Retry | NotRetried = error
            else:
                result = done
            report.add(result)
            show(result)
        return EXIT_NOT_RETRIED if report.refused or not_found else 0
    except TulliusError as error:  # the store failing, or a document it can't give back
        so_far = [f"{len(report.retried):,} task(s) retried before it failed"]
        if report.earlier:
            so_far.append(f"{len(report.earlier):,} found retried before")
        if report.refused:
            so_far.append(f"{len(report.refused):,} refused")
        raise StartupError(
            f"can't retry: {error}; {', '.join(so_far)}"
            + (" (listed above)" if report.matched() else "")
            + "; run the command again once the database answers: it completes a retry "
            "cut short and retries no task twice"
        ) from None


def _say(line: str) -> None:
    """A line on stderr, as ``tulliusd: ...``, after what stdout has so far: the two
    read in order when they go to one terminal or file."""
    sys.stdout.flush()
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


#: How many classes a ``--retry-class`` that matched nothing lists.
CLASSES_LISTED = 10


def _retry_all_done(report: RetryReport, class_name: str | None) -> int:
    """Print the end of ``--retry-unhandled all``: what a bare ``--retry-class``
    matched if that was more than one class, the summary, and a line on
    stderr if ``--retry-class`` matched nothing while some tasks are
    unhandled; its exit status."""
    from tullius.retry import is_of_class

    matched = sorted(
        name for name in report.classes if class_name is not None and is_of_class(name, class_name)
    )
    if len(matched) > 1:
        print(
            f"--retry-class {class_name} matched the unhandled tasks of {len(matched)} classes: "
            + ", ".join(f"{name} {report.classes[name]:,}" for name in matched)
            + " (give module:Class to retry one class only)",
            flush=True,
        )
    print(report.describe(), flush=True)
    if class_name is not None and not report.matched() and report.classes:
        listed = ", ".join(
            f"{name} {count:,}" for name, count in report.classes.most_common(CLASSES_LISTED)
        )
        more = len(report.classes) - CLASSES_LISTED
        if more > 0:
            listed += f" and {more:,} more class(es)"
        _say(
            f"no unhandled task is of class {class_name!r} (give the stored module:Class, "
            f"or just Class); unhandled tasks by class: {listed}"
        )
        return EXIT_NOT_RETRIED
    return EXIT_NOT_RETRIED if report.refused else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tulliusd``; return its exit status (2 for a bad start-up)."""
    from tullius.runtime.launch import StartupError, run_daemon

    args = build_parser().parse_args(argv)
    # Every flag of the parser is a field of RawFlags, under the same name.
    flags = RawFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RawFlags)})
    _configure_logging(args.verbose)
    try:
        settings = resolve(flags)
        if args.status:
            return _print_status(settings)
        if settings.prune_finished is not None:
            return _prune(settings)
        if settings.retry_unhandled is not None:
            return _retry(settings)
        return run_daemon(settings)
    except (ConfigError, StartupError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:  # Ctrl-C before the daemon took over signals (e.g. while connecting)
        return 130
    except BrokenPipeError:  # its output piped into a reader that stopped (`--status | head`)
        # Python's own recipe: point stdout at nothing, so the flush at exit
        # doesn't raise again, and end as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
