"""The README's worked example is a test file users copy: it must pass as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_worked_simulator_examples_pass_as_written(tmp_path: Path) -> None:
    [example] = [
        block for block in python_blocks() if "def test_" in block and "tullius_sim" in block
    ]
    (tmp_path / "test_readme_example.py").write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_readmes_make_db_clients_are_accepted_with_majority_journaled_writes() -> None:
    import pymongo

    calls = re.findall(r"pymongo\.MongoClient\((.*?)\n\s*\)", README.read_text(), flags=re.DOTALL)
    assert len(calls) == 2  # the Setup section's and the client settings section's
    for arguments in calls:
        # connect=False: built and checked, never connected (db1..db3 don't exist here).
        call = f"pymongo.MongoClient({arguments.rstrip().rstrip(',')}, connect=False)"
        client = eval(call, {"pymongo": pymongo})
        try:
            assert client.write_concern.document == {"w": "majority", "j": True, "wtimeout": 10_000}
        finally:
            client.close()


def test_the_docs_point_to_no_upstart_job_since_the_readme_has_none() -> None:
    # An operator sent to "the README's Upstart job" finds no such job in it
    readme = README.read_text()
    unit = (README.parent / "docs" / "tulliusd.service").read_text()
    readme_has_an_upstart_job = "start on " in readme
    for name, text in (("README.md", readme), ("docs/tulliusd.service", unit)):
        assert readme_has_an_upstart_job or "Upstart" not in text, name


def test_the_prune_units_command_is_one_tulliusd_accepts() -> None:
    import dataclasses

    from tullius.cli import build_parser
    from tullius.runtime.config import RawFlags, resolve

    unit = (README.parent / "docs" / "tulliusd-prune.service").read_text()
    (command,) = re.findall(r"^ExecStart=\S*tulliusd (.*)$", unit, flags=re.MULTILINE)
    args = build_parser().parse_args(command.split())
    flags = RawFlags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RawFlags)})
    settings = resolve(flags, {"TULLIUS_MONGODB_URI": "mongodb://db1/tullius"})
    assert settings.prune_finished is not None
    assert settings.prune_finished.days == 30
