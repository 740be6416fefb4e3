"""diagnostics.episode_loss: the mean total loss of the episodes that finished."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes


def _constant(horizon, per_step=1.0):
    """Every step's loss is `per_step`: an episode's total is `per_step * horizon`."""

    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, per_step + 0.0 * jnp.sum(theta)

    return optax_pes.UnrolledSystem(init, step, horizon)


def _make(name, system, k, **kwargs):
    if name == "tbptt":
        return optax_pes.tbptt(
            system, truncation_length=k, key=0, num_particles=4, **kwargs
        )
    return getattr(optax_pes, name)(
        system, num_particles=4, sigma=0.1, truncation_length=k, key=0, **kwargs
    )


@pytest.mark.parametrize("name", ["pes", "nres", "truncated_es", "tbptt"])
def test_finished_episodes_report_their_total(name):
    system = _constant(12)
    tx = _make(name, system, 4)
    theta = jnp.zeros(2)
    state = tx.init(theta)
    update = jax.jit(tx.update)
    particles = 4
    for count in range(1, 7):
        _, state = update(jnp.zeros(2), state, theta)
        d = state.diagnostics
        if count % 3:  # episodes end on every third window
            assert int(d.num_episodes) == 0
            expected = 0.0 if count < 3 else 12.0  # the last finished value is kept
        else:
            assert int(d.num_episodes) == particles
            expected = 12.0
        np.testing.assert_allclose(d.episode_loss, expected, rtol=1e-6)
        assert d.episode_loss.dtype == jnp.float32 and d.num_episodes.dtype == jnp.int32


def test_episodes_ending_inside_windows_and_burned_in_ones():
    # T = 7, K = 2: episodes end inside windows. With staggering, the burned-in first
    # episodes are partial and not reported; every later one is, with its full total.
    system = _constant(7, per_step=2.0)
    tx = _make("pes", system, 2, stagger=True)
    theta = jnp.zeros(2)
    state = tx.init(theta)
    update = jax.jit(tx.update)
    finished = 0
    for _ in range(20):
        _, state = update(jnp.zeros(2), state, theta)
        finished += int(state.diagnostics.num_episodes)
        if int(state.diagnostics.num_episodes):
            np.testing.assert_allclose(state.diagnostics.episode_loss, 14.0, rtol=1e-6)
    # 40 steps per particle: group 0 completes 5 episodes, group 1 (burned in to
    # phase 3) its partial first one (not reported) and then 5 whole ones by step 39.
    assert finished == 2 * (5 + 5)


def test_episode_loss_tracks_theta():
    # On a quadratic loss the episodes' mean total is T * E[(theta + eps)^2].
    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, jnp.sum(theta**2)

    system = optax_pes.UnrolledSystem(init, step, 10)
    tx = optax_pes.pes(system, num_particles=200, sigma=0.1, truncation_length=5, key=1)
    theta = jnp.array([1.0, -2.0])
    state = tx.init(theta)
    for _ in range(2):
        _, state = tx.update(jnp.zeros(2), state, theta)
    np.testing.assert_allclose(
        state.diagnostics.episode_loss, 10 * (5 + 2 * 0.01), rtol=0.02
    )


def test_half_precision_losses_are_summed_in_float32():
    # A window's per-step losses were summed in the loss's own dtype: a bfloat16 total
    # of ~200 rounds to 1.0, so the difference between a pair's totals (the estimate)
    # and the diagnostics came out wrong without a word (a bfloat16 model's training
    # loss is such a loss). Summed in float32, they equal the float32 run's.
    k = 100

    def system(dtype):
        def init(theta, key):
            return jnp.zeros(())

        def step(theta, s, key):  # every step's loss rounded to `dtype`, 2 + theta
            return s, (2.0 + theta[0]).astype(jnp.bfloat16).astype(dtype)

        return optax_pes.UnrolledSystem(init, step, k)

    theta = jnp.zeros(1)
    results = {}
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        tx = optax_pes.pes(
            system(dtype), num_particles=64, sigma=0.1, truncation_length=k, key=0
        )
        # (float32 chosen, not promoted to: strict promotion has no 16-bit path.)
        with jax.numpy_dtype_promotion("strict"):
            estimate, state = tx.update(jnp.zeros(1), tx.init(theta), theta)
        results[dtype] = (estimate, state.diagnostics)
    estimate32, diagnostics32 = results[jnp.float32]
    for dtype in (jnp.bfloat16, jnp.float16):
        estimate, diagnostics = results[dtype]
        np.testing.assert_allclose(estimate, estimate32, rtol=1e-6)
        assert float(diagnostics.mean_loss) == float(diagnostics32.mean_loss)
        assert float(diagnostics.episode_loss) == float(diagnostics32.episode_loss)
    np.testing.assert_allclose(float(diagnostics32.episode_loss), 2.0 * k, rtol=1e-2)


def _constant_loss_system():
    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, jnp.ones((), jnp.float32) + 0.0 * jnp.sum(theta).astype(jnp.float32)

    return optax_pes.UnrolledSystem(init, step, 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_noise_has_mean_zero(dtype):
    # The noise was drawn in theta's dtype, and JAX's bfloat16 normals have a mean of
    # -0.011 (float16: -0.0018). Without antithetic pairs a loss that does not
    # depend on theta then got an estimate of -0.011 L / sigma per coordinate, a
    # bias, where the true gradient is 0. Drawn in float32 and rounded, the noise is
    # symmetric. (Each coordinate of this estimate is mean_i(z_i) / sigma.)
    n, dim, sigma = 4096, 256, 0.5
    tx = optax_pes.pes(
        _constant_loss_system(),
        num_particles=n,
        sigma=sigma,
        truncation_length=1,
        antithetic=False,
        key=0,
    )
    theta = jnp.zeros(dim, dtype)
    estimate, _ = tx.update(jnp.zeros(dim, dtype), tx.init(theta), theta)
    mean = float(jnp.mean(estimate.astype(jnp.float32))) * sigma
    assert abs(mean) < 4 / np.sqrt(n * dim), mean


def test_float16_scores_that_fit_are_not_dropped():
    # Each pair's contribution |L+ - L-| * max|eps / sigma^2| was formed and tested
    # for overflow in theta's dtype: in float16 a window gradient of ~3000 at
    # sigma 0.01 overflowed it, and finite estimates that fit float16 were dropped
    # as non-finite. Formed in float32, the estimate is float32's, rounded.
    def system():
        def init(theta, key):
            return jnp.zeros(())

        def step(theta, s, key):
            return s, 3000.0 * jnp.sum(theta.astype(jnp.float32))

        return optax_pes.UnrolledSystem(init, step, 4)

    results = {}
    for dtype in (jnp.float16, jnp.float32):
        tx = optax_pes.pes(
            system(), num_particles=8, sigma=0.01, truncation_length=2, key=0
        )
        theta = jnp.full(3, 0.5, dtype)
        estimate, state = tx.update(jnp.zeros(3, dtype), tx.init(theta), theta)
        results[dtype] = estimate, int(state.diagnostics.num_nonfinite)
    (estimate16, dropped16), (estimate32, dropped32) = results.values()
    assert dropped16 == dropped32 == 0
    np.testing.assert_allclose(estimate16.astype(jnp.float32), estimate32, rtol=2e-2)


def test_float16_tbptt_mean_that_fits_is_kept():
    # The particles' gradients were summed in theta's dtype: 64 of 3000 overflow
    # float16 though each and their mean fit, and the whole estimate was dropped.
    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, 3000.0 * jnp.sum(theta.astype(jnp.float32))

    system = optax_pes.UnrolledSystem(init, step, 4)
    tx = optax_pes.tbptt(system, truncation_length=1, key=0, num_particles=64)
    theta = jnp.full(3, 0.5, jnp.float16)
    estimate, state = tx.update(jnp.zeros(3, jnp.float16), tx.init(theta), theta)
    assert estimate.dtype == jnp.float16
    np.testing.assert_array_equal(estimate, jnp.full(3, 3000.0, jnp.float16))
    assert int(state.diagnostics.num_nonfinite) == 0


def test_float16_pes_accumulator_does_not_overflow():
    # PES's running sum of eps / sigma^2 over an episode was kept in theta's dtype:
    # at sigma 1e-3 it passed float16's 65504 after a few hundred windows, and those
    # particles were dropped as non-finite. It is kept in float32.
    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, 1.0 + jnp.sum(theta.astype(jnp.float32) ** 2)

    system = optax_pes.UnrolledSystem(init, step, 100_000)
    tx = optax_pes.pes(system, num_particles=8, sigma=1e-3, truncation_length=1, key=0)
    theta = jnp.full(64, 0.5, jnp.float16)

    def body(state, _):
        _, state = tx.update(jnp.zeros_like(theta), state, theta)
        return state, state.diagnostics.num_nonfinite

    state = tx.init(theta)
    assert state.noise.score.dtype == jnp.float32
    state, dropped = jax.jit(lambda s: jax.lax.scan(body, s, None, length=1500))(state)
    assert int(jnp.sum(dropped)) == 0
    assert float(jnp.max(jnp.abs(state.noise.score))) > 65504  # past float16's range
