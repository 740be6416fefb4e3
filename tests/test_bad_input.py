"""Bad input: clear errors naming the argument; non-finite windows are contained."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes

ES = [optax_pes.pes, optax_pes.nres, optax_pes.truncated_es]


def _system(horizon=6):
    def init(theta, key):
        return jnp.zeros(2)

    def step(theta, s, key):
        s = 0.5 * s + theta
        return s, jnp.sum(s**2)

    return optax_pes.UnrolledSystem(init, step, horizon)


def _kwargs(**overrides):
    kwargs = dict(num_particles=4, sigma=0.1, truncation_length=2, key=0)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("make", ES)
@pytest.mark.parametrize("num_particles", [3, 5])
def test_odd_num_particles_with_antithetic(make, num_particles):
    with pytest.raises(ValueError, match="num_particles must be even"):
        make(_system(), **_kwargs(num_particles=num_particles))
    make(_system(), **_kwargs(num_particles=num_particles, antithetic=False))


@pytest.mark.parametrize("make", ES + [optax_pes.full_es])
@pytest.mark.parametrize("num_particles", [0, -2])
def test_non_positive_num_particles(make, num_particles):
    kwargs = dict(num_particles=num_particles, sigma=0.1, key=0)
    if make is not optax_pes.full_es:
        kwargs["truncation_length"] = 2
    with pytest.raises(ValueError, match="num_particles"):
        make(_system(), **kwargs)


@pytest.mark.parametrize("make", ES)
@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_sigma(make, sigma):
    with pytest.raises(ValueError, match="sigma must be a positive"):
        make(_system(), **_kwargs(sigma=sigma))


@pytest.mark.parametrize("make", ES + [optax_pes.tbptt])
@pytest.mark.parametrize("truncation_length", [0, -1, 7])
def test_bad_truncation_length(make, truncation_length):
    kwargs = _kwargs(truncation_length=truncation_length)
    if make is optax_pes.tbptt:
        del kwargs["sigma"], kwargs["num_particles"]
    with pytest.raises(
        ValueError, match="truncation_length must be an int in \\[1, 6\\]"
    ):
        make(_system(horizon=6), **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="truncation_length must be an int"):
        optax_pes.pes(_system(), **_kwargs(truncation_length=2.0))
    with pytest.raises(TypeError, match="key must be an int seed or a jax PRNG key"):
        optax_pes.pes(_system(), **_kwargs(key="seed"))
    with pytest.raises(TypeError, match="system must be an optax_pes.UnrolledSystem"):
        optax_pes.pes(lambda theta: theta, **_kwargs())
    with pytest.raises(TypeError, match="sigma must be a positive float scalar"):
        optax_pes.pes(_system(), **_kwargs(sigma=jnp.ones(2)))


@pytest.mark.parametrize("horizon", [0, -3])
def test_bad_horizon(horizon):
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        _system(horizon)
    with pytest.raises(TypeError, match="horizon must be an int >= 1"):
        optax_pes.UnrolledSystem(lambda t, k: t, lambda t, s, k: (s, 0.0), 3.0)
    with pytest.raises(TypeError, match="step must be a callable"):
        optax_pes.UnrolledSystem(lambda t, k: t, None, 3)


def _with_step(step):
    return optax_pes.UnrolledSystem(lambda theta, key: jnp.zeros(2), step, 6)


@pytest.mark.parametrize(
    "step, match",
    [
        (lambda t, s, k: (s + t, s + t), "scalar loss"),
        (lambda t, s, k: (s + t, jnp.sum(s > 0)), "float loss"),
        (lambda t, s, k: (jnp.zeros(3), jnp.sum(s)), "structure, shapes and dtypes"),
        (lambda t, s, k: ((s, s), jnp.sum(s)), "structure, shapes and dtypes"),
    ],
    ids=["vector-loss", "int-loss", "state-shape", "state-structure"],
)
@pytest.mark.parametrize("make", ES)
def test_bad_step_outputs(make, step, match):
    tx = make(_with_step(step), **_kwargs())
    with pytest.raises(ValueError, match=match):
        tx.init(jnp.zeros(2))


@pytest.mark.parametrize("make", ES + [optax_pes.tbptt])
def test_theta_mismatch(make):
    kwargs = _kwargs()
    if make is optax_pes.tbptt:
        del kwargs["sigma"], kwargs["num_particles"]
    tx = make(_system(), **kwargs)
    with pytest.raises(ValueError, match="does theta match the system"):
        tx.init(jnp.zeros(3))
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="does theta match the system"):
        tx.update(jnp.zeros(3), state, jnp.zeros(3))
    with pytest.raises(TypeError, match="floating-point arrays"):
        tx.init(jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.zeros(2), state)


def test_traced_sigma_checked_at_update():
    inject = optax.inject_hyperparams(
        optax_pes.pes,
        static_args=("system", "key", "num_particles", "truncation_length", "stagger"),
    )
    tx = inject(system=_system(), **_kwargs())
    theta = jnp.zeros(2)
    state = tx.init(theta)
    state.hyperparams["sigma"] = jnp.asarray(-1.0)
    with pytest.raises(Exception, match="sigma must be positive"):
        jax.block_until_ready(jax.jit(tx.update)(theta, state, theta))


def _exploding_system():
    """Blows up to inf/NaN within a window when theta[0] > 1 (a chaotic problem)."""

    def init(theta, key):
        return jnp.ones(2)

    def step(theta, s, key):
        s = jnp.exp(theta[0] * 200.0) * s + theta[1]
        return s, jnp.sum(s**2)

    return optax_pes.UnrolledSystem(init, step, 4)


@pytest.mark.parametrize("make", ES + [optax_pes.tbptt])
def test_nonfinite_window_is_excluded_and_state_recovers(make):
    kwargs = _kwargs(num_particles=8, sigma=0.5)
    if make is optax_pes.tbptt:
        kwargs = dict(truncation_length=2, key=0, num_particles=4)
    tx = make(_exploding_system(), **kwargs)
    update = jax.jit(tx.update)
    bad = jnp.array([1.0, 0.1])  # about half the particles blow up (all for tbptt)
    state = tx.init(bad)
    estimate, state = update(jnp.zeros(2), state, bad)
    assert np.all(np.isfinite(estimate))
    assert int(state.diagnostics.num_nonfinite) > 0
    assert np.isfinite(state.diagnostics.mean_loss)
    good = jnp.array([-4.0, 0.1])  # even a 6-sigma perturbation stays finite
    for _ in range(3):
        estimate, state = update(jnp.zeros(2), state, good)
    assert np.all(np.isfinite(estimate))
    assert int(state.diagnostics.num_nonfinite) == 0
    assert np.all(np.isfinite(jax.tree.leaves(state.inner_state)[0]))
    for leaf in jax.tree.leaves(state.noise):
        assert np.all(np.isfinite(leaf))


def test_nonfinite_never_reaches_params():
    tx = optax.chain(
        optax_pes.pes(_exploding_system(), **_kwargs(num_particles=8, sigma=0.5)),
        optax.sgd(1e-3),
    )
    theta = jnp.array([1.0, 0.1])
    state = tx.init(theta)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(jnp.zeros(2), state, theta)
        theta = optax.apply_updates(theta, updates)
        assert np.all(np.isfinite(theta))
