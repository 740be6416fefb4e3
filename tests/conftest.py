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
