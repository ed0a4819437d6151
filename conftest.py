"""Hypothesis profiles for the whole repository.

``ci`` (default) is derandomised with a fixed budget and never trips the
too-slow health check, so the README's test command and .ci/run give the same
result every time, even on a loaded machine; ``dev``
(``HYPOTHESIS_PROFILE=dev``) explores fresh random examples, fewer of them;
``nightly`` runs many more (``HYPOTHESIS_PROFILE=nightly``, see tests/README.md).
"""

import os

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
