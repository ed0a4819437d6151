"""Hypothesis profiles for the whole repository.

``dev`` (default) keeps the property suite quick; ``ci`` is selected when the
environment variable CI is set and is what .ci/run uses; ``nightly`` runs many
more examples (``HYPOTHESIS_PROFILE=nightly``, see tests/README.md).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None)
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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
