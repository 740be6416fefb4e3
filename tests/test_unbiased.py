"""PES, NRES and full ES are unbiased; truncated ES and TBPTT are not.

On linear-quadratic systems the Gaussian-smoothed loss differs from the loss by a
constant, so an unbiased estimator's summed estimates must average to the exact
gradient (`tests/helpers.expected_sum`, which accounts for staggered starts and for
episodes ending inside windows). The tolerance is a z-score on the standard error
measured across independent replicates.
"""

import jax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import optax_pes
from optax_pes.tasks import linear_quadratic

from .helpers import expected_sum, max_z_score, summed_estimates

Z_UNBIASED = 5.0  # a handful of coordinates: a false alarm is ~1e-6 per test
Z_BIASED = 10.0

THETA_SHAPES = [(), (2,), {"w": (2, 2), "b": (2,)}]


def _estimator(name, system, *, num_particles, truncation_length, stagger):
    if name == "full_es":
        return optax_pes.full_es(system, num_particles=num_particles, sigma=0.1, key=0)
    if name == "tbptt":
        return optax_pes.tbptt(
            system,
            truncation_length=truncation_length,
            key=0,
            num_particles=num_particles // 2,
            stagger=stagger,
        )
    make = getattr(optax_pes, name)
    return make(
        system,
        num_particles=num_particles,
        sigma=0.1,
        truncation_length=truncation_length,
        key=0,
        stagger=stagger,
    )


def _z_score(name, system, theta, *, truncation_length, stagger, episodes, replicates):
    num_particles = 8
    if name == "full_es":
        truncation_length, stagger = system.horizon, False
    num_updates = -(-episodes * system.horizon // truncation_length)
    tx = _estimator(
        name,
        system,
        num_particles=num_particles,
        truncation_length=truncation_length,
        stagger=stagger,
    )
    samples = summed_estimates(
        tx, theta, num_updates=num_updates, num_replicates=replicates
    )
    expected = expected_sum(
        system,
        theta,
        num_groups=num_particles // 2,
        truncation_length=truncation_length,
        stagger=stagger,
        num_updates=num_updates,
    )
    return max_z_score(samples, expected)


@pytest.mark.slow  # statistical (30 s): the default suite keeps the bias checks below
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["pes", "nres", "full_es"]),
    seed=st.integers(0, 2**16),
    state_dim=st.integers(1, 4),
    theta_shapes=st.sampled_from(THETA_SHAPES),
    horizon=st.integers(2, 9),
    truncation_fraction=st.floats(0.0, 1.0),
    stagger=st.booleans(),
)
def test_unbiased_on_random_linear_quadratic_systems(
    name, seed, state_dim, theta_shapes, horizon, truncation_fraction, stagger
):
    truncation_length = 1 + int(truncation_fraction * (horizon - 1))
    with jax.enable_x64(True):
        system, theta = linear_quadratic(
            seed,
            state_dim=state_dim,
            theta_shapes=theta_shapes,
            horizon=horizon,
            memory=0.9,
            dtype="float64",
        )
        z = _z_score(
            name,
            system,
            theta,
            truncation_length=truncation_length,
            stagger=stagger,
            episodes=2,
            replicates=256,
        )
    assert z < Z_UNBIASED


# Truncation bias is large when the state remembers theta for long (memory 0.95) and
# windows are short: the check the unbiased estimators pass must fail for these.
BIAS_CASES = [
    dict(truncation_length=1, stagger=False, horizon=12),
    dict(truncation_length=3, stagger=True, horizon=14),  # resets inside windows
]


def _high_memory_system(horizon):
    return linear_quadratic(
        3,
        state_dim=3,
        theta_shapes={"w": (2,), "b": ()},
        horizon=horizon,
        memory=0.95,
        dtype="float64",
    )


def _high_memory_z_score(name, case, replicates):
    with jax.enable_x64(True):
        system, theta = _high_memory_system(case["horizon"])
        return _z_score(
            name,
            system,
            theta,
            truncation_length=case["truncation_length"],
            stagger=case["stagger"],
            episodes=2,
            replicates=replicates,
        )


@pytest.mark.parametrize("case", BIAS_CASES, ids=["sync", "staggered-resets-inside"])
@pytest.mark.parametrize("name", ["pes", "nres"])
def test_unbiased_where_truncation_bias_is_large(name, case):
    assert _high_memory_z_score(name, case, replicates=256) < Z_UNBIASED


@pytest.mark.parametrize("case", BIAS_CASES, ids=["sync", "staggered-resets-inside"])
@pytest.mark.parametrize("name", ["truncated_es", "tbptt"])
def test_truncated_estimators_fail_the_same_check(name, case):
    assert _high_memory_z_score(name, case, replicates=1024) > Z_BIASED


# -- slow: the same checks with more systems and more replicates (`-m slow`) --------


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["pes", "nres", "full_es"]),
    seed=st.integers(0, 2**16),
    state_dim=st.integers(1, 4),
    theta_shapes=st.sampled_from(THETA_SHAPES),
    horizon=st.integers(2, 16),
    truncation_fraction=st.floats(0.0, 1.0),
    stagger=st.booleans(),
    antithetic=st.booleans(),
)
def test_unbiased_on_many_random_systems(
    name,
    seed,
    state_dim,
    theta_shapes,
    horizon,
    truncation_fraction,
    stagger,
    antithetic,
):
    truncation_length = 1 + int(truncation_fraction * (horizon - 1))
    if name == "full_es":
        truncation_length, stagger = horizon, False
    with jax.enable_x64(True):
        system, theta = linear_quadratic(
            seed,
            state_dim=state_dim,
            theta_shapes=theta_shapes,
            horizon=horizon,
            memory=0.9,
            dtype="float64",
        )
        kwargs = dict(num_particles=8, sigma=0.1, key=0, antithetic=antithetic)
        if name != "full_es":
            kwargs.update(truncation_length=truncation_length, stagger=stagger)
        tx = getattr(optax_pes, name)(system, **kwargs)
        num_updates = -(-3 * horizon // truncation_length)
        samples = summed_estimates(
            tx, theta, num_updates=num_updates, num_replicates=512
        )
        expected = expected_sum(
            system,
            theta,
            num_groups=8 // (2 if antithetic else 1),
            truncation_length=truncation_length,
            stagger=stagger,
            num_updates=num_updates,
        )
    assert max_z_score(samples, expected) < Z_UNBIASED


@pytest.mark.slow
@pytest.mark.parametrize("case", BIAS_CASES, ids=["sync", "staggered-resets-inside"])
@pytest.mark.parametrize("name", ["pes", "nres"])
def test_unbiased_where_truncation_bias_is_large_many_replicates(name, case):
    # 4x the replicates of the default test: the standard error halves, so a bias a
    # quarter of the size the biased estimators show would now be caught.
    assert _high_memory_z_score(name, case, replicates=4096) < Z_UNBIASED
