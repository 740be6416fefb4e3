import os
import time

import jax
import pytest

from optax_pes._compile import memory_mappings

# As in Optimistix: rank mistakes raise instead of silently broadcasting. (Strict
# dtype promotion is left off: optax itself relies on standard promotion.)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _free_compiled_programs():
    """Drop JAX's compiled programs once they hold too many memory mappings.

    XLA:CPU keeps each loaded executable in memory mappings (about nine for a small
    program, more for one with many branches), and a process may hold at most
    `vm.max_map_count` of them (65530 by default). The suite compiles thousands of
    programs, which jit caches keep alive: `test_deq.py` alone reached ~44k
    mappings, and by `test_linen.py` the next compile crashed inside XLA
    (segmentation fault or abort, no error message). Clearing the caches returns
    the count to its start; the check is one read of /proc/self/maps per test."""
    yield
    counts = memory_mappings()  # (held, allowed), or None off Linux
    if counts is not None and counts[0] > 20_000:
        jax.clear_caches()


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
