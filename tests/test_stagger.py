"""stagger=True spreads the particles' phases over the horizon from the first update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes._es._config import stagger_offsets


def _clock(horizon):
    """The inner state is the episode's phase; the loss depends on theta."""

    def init(theta, key):
        return jnp.zeros((), jnp.int32)

    def step(theta, phase, key):
        return phase + 1, jnp.sum(theta**2) * (1.0 + phase)

    return optax_pes.UnrolledSystem(init, step, horizon)


def _make(name, system, k):
    if name == "tbptt":
        return optax_pes.tbptt(
            system, truncation_length=k, key=0, num_particles=4, stagger=True
        )
    return getattr(optax_pes, name)(
        system, num_particles=8, sigma=0.1, truncation_length=k, key=0, stagger=True
    )


@pytest.mark.parametrize("name", ["pes", "nres", "truncated_es", "tbptt"])
@pytest.mark.parametrize("horizon, k", [(100, 10), (103, 10)])
def test_phases_are_spread_from_the_first_update(name, horizon, k):
    system = _clock(horizon)
    tx = _make(name, system, k)
    theta = jnp.array([0.5, -0.3])
    state = tx.init(theta)
    groups = state.remaining.shape[0]
    offsets = stagger_offsets(groups, horizon, k, True)
    assert len(set(offsets.tolist())) == groups  # all distinct, spread over T
    assert offsets.max() >= horizon // 2
    phases = np.asarray(state.inner_state).reshape(-1, groups)
    np.testing.assert_array_equal(phases, np.broadcast_to(offsets, phases.shape))
    np.testing.assert_array_equal(state.remaining, horizon - offsets)
    estimate, state = jax.jit(tx.update)(jnp.zeros(2), state, theta)
    phases = np.asarray(state.inner_state).reshape(-1, groups)
    expected = (offsets + k) % horizon  # no episode ends in the first window here
    np.testing.assert_array_equal(phases, np.broadcast_to(expected, phases.shape))
    assert np.all(np.isfinite(estimate)) and np.any(estimate != 0)


def test_burned_in_groups_are_scored_from_the_first_update():
    # Every group contributes to the first estimate: NRES draws the burned-in
    # episode's noise at its first scored window.
    system = _clock(40)
    tx = optax_pes.nres(
        system, num_particles=8, sigma=0.1, truncation_length=5, key=1, stagger=True
    )
    theta = jnp.array([0.5, -0.3])
    _, state = tx.update(jnp.zeros(2), tx.init(theta), theta)
    assert np.all(np.asarray(state.noise.sigma) == 0.1)
    assert np.all(np.linalg.norm(np.asarray(state.noise.direction), axis=1) > 0)


def test_without_stagger_nothing_is_burned_in():
    system = _clock(20)
    tx = optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=5, key=0)
    state = tx.init(jnp.zeros(2))
    assert bool(jnp.all(state.needs_init))
    np.testing.assert_array_equal(state.inner_state, np.zeros(4))
