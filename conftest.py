"""Hypothesis profiles for the whole repository.

``ci`` (default) is derandomised with a fixed budget and never trips the
too-slow health check, so the README's test command and .ci/run give the same
result every time, even on a loaded machine; ``dev``
(``HYPOTHESIS_PROFILE=dev``) explores fresh random examples, fewer of them;
``nightly`` runs many more (``HYPOTHESIS_PROFILE=nightly``, see tests/README.md),
each test with a deadline of its own (`NIGHTLY_TIMEOUT`).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: A test's deadline under the nightly profile, in seconds (pyproject's ``timeout``,
#: ten minutes, is for the fixed budgets): a property test runs many minutes there
#: by design (tests/property/test_keyed_races.py: about ten).
NIGHTLY_TIMEOUT = 3 * 60 * 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("HYPOTHESIS_PROFILE") != "nightly":
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(NIGHTLY_TIMEOUT))
