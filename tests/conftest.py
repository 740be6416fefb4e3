import os
import time

import jax
import pytest

# As in Optimistix: rank mistakes raise instead of silently broadcasting. (Strict
# dtype promotion is left off: optax itself relies on standard promotion.)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test with 64-bit floats enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _slow_tests_within_the_ci_budget(request):
    """Skip a slow test that would start after `OPTAX_PES_SLOW_DEADLINE` (a Unix
    time; `.ci/run` sets it so the slow suite ends within CI's time limit)."""
    deadline = os.environ.get("OPTAX_PES_SLOW_DEADLINE")
    if deadline and request.node.get_closest_marker("slow") is not None:
        if time.time() > float(deadline):
            pytest.skip("out of the CI time budget for slow tests")
