import os

import pytest
from hypothesis import HealthCheck, settings

# Example counts: "ci" (default) keeps the suite in minutes on 2 cores;
# HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def compiled():
    """Skips a test that exercises torch.ops.terminator directly on the reference backend."""
    import terminator.ops as ops

    if ops.backend().name == "reference":
        pytest.skip(f"compiled backend not active: {ops.backend().reason}")
    return ops
