"""Loading the user's ``tullius_deps`` module, as the original README describes.

``tullius_deps`` lives on the Python path and defines ``make_db()`` (returning a
pymongo ``Database``) and ``task_processes`` (a list of ``(count,
min_priority, max_priority)``).  Everything is validated here, at start-up,
with an error that names the problem and the fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tullius.band import Band, bands_from_setting
from tullius.errors import ConfigError
from tullius.user_errors import describe

MODULE = "tullius_deps"


@dataclass(frozen=True)
class Deps:
    """What ``tullius_deps`` provides (either part may be missing)."""

    make_db: Any | None
    task_processes: tuple[Band, ...] | None


def _not_on_path_hint(module_name: str) -> str:
    """Why a module in the current directory was not found, if that is the case.

    Why: the ``tulliusd`` command, like every console script, puts its own
    directory on the path, not the current one, so running it next to
    ``tullius_deps.py`` said only "create tullius_deps.py".
    """
    if not os.path.isfile(f"{module_name}.py"):
        return ""
    here = os.getcwd()
    if any(os.path.abspath(entry or os.curdir) == here for entry in sys.path):
        return ""
    return (
        f"{module_name}.py is in the current directory, which is not on the Python path "
        "(the tulliusd command does not add it): run it as PYTHONPATH=. tulliusd"
    )


def load_deps(module_name: str = MODULE, *, required: bool = True) -> Deps | None:
    """Import and validate ``tullius_deps``.

    Args:
        module_name: the module to import.
        required: raise if it is missing (else return None).

    Raises:
        ConfigError: the module is missing (when required), fails to import,
            or defines ``make_db``/``task_processes`` wrongly.
    """
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise ConfigError(
                module_name, error.name, f"imports a module that is missing: {error}"
            ) from error
        if not required:
            return None
        raise ConfigError(
            "module",
            module_name,
            "was not found on the Python path; "
            + (
                _not_on_path_hint(module_name)
                or "create tullius_deps.py with make_db() and task_processes (see the README)"
            )
            + "; or give tulliusd --mongodb-uri, or call tullius.configure(db=...) before "
            "tullius.queue()",
        ) from None
    except Exception as error:  # user code at import: report it as a setup problem
        # (It read "tullius_deps='import' failed: ...".)
        raise ConfigError("module", module_name, f"failed to import: {describe(error)}") from error
    make_db = getattr(module, "make_db", None)
    if make_db is not None and not callable(make_db):
        raise ConfigError(
            f"{module_name}.make_db", make_db, "must be a function returning a pymongo Database"
        )
    processes = getattr(module, "task_processes", None)
    bands = (
        None
        if processes is None
        else bands_from_setting(processes, setting=f"{module_name}.task_processes")
    )
    return Deps(make_db=make_db, task_processes=bands)
