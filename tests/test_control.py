"""Control: `control_system` on environments with the Brax protocol, the gymnax
adapter, the policies, and the MJX swimmer (slow, with mujoco installed).

The unbiasedness checks run on a linear-quadratic control environment written here:
a policy whose action is affine in theta makes every loss quadratic in theta, so the
Gaussian-smoothed episode loss differs from the episode loss by a constant and the
summed PES estimates must average to `jax.grad` of the summed losses of
`optax_pes.unroll` (`tests/helpers.expected_sum`), i.e. `-grad` of the expected
return, done latching included.
"""

import pathlib
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes
from optax_pes import tasks

from .helpers import expected_sum, max_z_score, slow, summed_estimates

Z_UNBIASED = 5.0
Z_BIASED = 10.0


class LQState(NamedTuple):
    x: jax.Array  # the system's state
    t: jax.Array  # int32: steps taken
    key: jax.Array  # carried, split every step (the environment's randomness)
    obs: jax.Array
    reward: jax.Array
    done: jax.Array


class LQEnv:
    """x' = A x + B u, reward = -(x'^T Q x' + u^T R u), done on step `done_at`.

    After the done step the environment emits garbage (a huge reward, a jump of the
    state), which done latching must keep out of the losses. With `random_start`,
    the initial state is drawn from the reset key.
    """

    def __init__(self, seed, *, n=3, m=2, memory=0.9, done_at=None, random_start=0.0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        self.A = jnp.asarray(memory * q)
        self.B = jnp.asarray(rng.normal(size=(n, m)) / np.sqrt(n))
        self.K = jnp.asarray(0.3 * rng.normal(size=(m, n)))  # fixed feedback gain
        self.Q = jnp.asarray(np.diag(rng.uniform(0.5, 1.5, n)))
        self.R = jnp.asarray(0.1 * np.eye(m))
        self.x0 = jnp.asarray(rng.normal(size=n))
        self.done_at = done_at
        self.random_start = random_start

    def reset(self, key):
        x = self.x0
        if self.random_start:
            x = x + self.random_start * jax.random.normal(key, x.shape, x.dtype)
        zero = jnp.zeros((), x.dtype)
        return LQState(x, jnp.zeros((), jnp.int32), key, x, zero, zero)

    def step(self, state, u):
        key, _ = jax.random.split(state.key)
        x = self.A @ state.x + self.B @ u
        reward = -(x @ self.Q @ x + u @ self.R @ u)
        t = state.t + 1
        done = jnp.zeros((), x.dtype)
        if self.done_at is not None:
            done = (t == self.done_at).astype(x.dtype)
            after = t > self.done_at
            reward = jnp.where(after, 1e6, reward)
            x = jnp.where(after, x + 100.0, x)
        return LQState(x, t, key, x, reward, done)

    def policy(self, theta, obs):
        """Affine in theta: every loss is quadratic in theta."""
        return self.K @ obs + theta


def _lq_system(seed=0, *, horizon=8, memory=0.9, done_at=6):
    env = LQEnv(seed, memory=memory, done_at=done_at)
    system = tasks.control_system(env, env.policy, horizon=horizon)
    return system, jnp.asarray([0.2, -0.3])


def _z_score(make, system, theta, *, truncation_length, stagger, replicates):
    num_particles, horizon = 8, system.horizon
    kwargs = dict(num_particles=num_particles, sigma=0.1, key=0)
    if make is optax_pes.full_es:
        truncation_length, stagger = horizon, False
    else:
        kwargs.update(truncation_length=truncation_length, stagger=stagger)
    tx = make(system, **kwargs)
    num_updates = -(-2 * horizon // truncation_length)  # two episodes
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


@pytest.mark.parametrize(
    "make, truncation_length, stagger",
    [
        (optax_pes.pes, 3, False),  # T % K != 0: episodes end inside windows
        slow(optax_pes.pes, 2, True),
        (optax_pes.full_es, None, False),
    ],
    ids=["pes-K3", "pes-K2-staggered", "full_es"],
)
def test_summed_estimates_match_minus_grad_of_the_return(
    x64, make, truncation_length, stagger
):
    system, theta = _lq_system()
    z = _z_score(
        make,
        system,
        theta,
        truncation_length=truncation_length,
        stagger=stagger,
        replicates=256,
    )
    assert z < Z_UNBIASED


def test_the_reference_is_minus_grad_of_the_return(x64):
    # What the check above compares with: -grad of the return, done step included.
    system, theta = _lq_system()
    env = LQEnv(0, done_at=6)

    def episode_return(theta):
        state, total = env.reset(jax.random.key(0)), 0.0
        for _ in range(6):  # the done step counts, later ones do not
            state = env.step(state, env.policy(theta, state.obs))
            total = total + state.reward
        return total

    grad_loss = jax.grad(lambda th: jnp.sum(optax_pes.unroll(system, th)))(theta)
    np.testing.assert_allclose(grad_loss, -jax.grad(episode_return)(theta), rtol=1e-10)


# The state remembers theta for long (memory 0.95) and windows are one step: the
# check PES passes must fail for truncated ES.
@pytest.mark.parametrize(
    "make, passes", [(optax_pes.pes, True), (optax_pes.truncated_es, False)]
)
def test_truncated_es_fails_the_same_check(x64, make, passes):
    system, theta = _lq_system(horizon=12, memory=0.95, done_at=10)
    z = _z_score(
        make, system, theta, truncation_length=1, stagger=False, replicates=256
    )
    assert z < Z_UNBIASED if passes else z > Z_BIASED


# -- done latching ---------------------------------------------------------------------


class CountState(NamedTuple):
    t: jax.Array
    obs: jax.Array
    reward: jax.Array
    done: jax.Array


class Countdown:
    """Reward 1 per step, done on step `done_at`; NaN rewards and states after it."""

    def __init__(self, done_at, done_dtype=jnp.float32):
        self.done_at = done_at
        self.done_dtype = done_dtype

    def reset(self, key):
        zero = jnp.zeros((), jnp.float32)
        return CountState(zero, jnp.zeros(1), zero, jnp.zeros((), self.done_dtype))

    def step(self, state, action):
        t = state.t + 1
        after = t > self.done_at
        reward = jnp.where(after, jnp.nan, 1.0 + 0.0 * jnp.sum(action))
        obs = jnp.where(after, jnp.nan, t) * jnp.ones(1)
        done = (t >= self.done_at).astype(self.done_dtype)
        if self.done_dtype == jnp.float32:
            done = jnp.where(after, 0.0, done)  # an env may un-set done later: latched
        return CountState(t, obs, reward, done)


@pytest.mark.parametrize("done_dtype", [jnp.float32, jnp.bool_])
def test_done_is_latched_and_the_done_step_counts(done_dtype):
    system = tasks.control_system(
        Countdown(3, done_dtype), lambda theta, obs: theta * obs, horizon=7
    )
    losses = optax_pes.unroll(system, jnp.ones(1))
    assert losses.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]

    state = system.init(jnp.ones(1), jax.random.key(0))
    assert not state.done
    for _ in range(5):
        state, _ = system.step(jnp.ones(1), state, jax.random.key(0))
    assert bool(state.done)
    assert float(state.env_state.t) == 3.0  # held at the done step's state
    assert bool(jnp.all(jnp.isfinite(state.env_state.obs)))


def test_done_latching_inside_pes_windows():
    # Episodes of 5 steps that end after 2, windows of 3: estimates stay finite, and
    # each window's loss counts -1 per step before the end of its episode.
    system = tasks.control_system(
        Countdown(2), lambda theta, obs: theta * obs, horizon=5
    )
    tx = optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=3, key=0)
    theta, state = jnp.ones(1), tx.init(jnp.ones(1))
    update = jax.jit(tx.update)
    window_losses, episode_losses = [], []
    for _ in range(5):
        estimate, state = update(jnp.zeros(1), state, theta)
        assert bool(jnp.all(jnp.isfinite(estimate)))
        window_losses.append(3 * float(state.diagnostics.mean_loss))
        episode_losses.append(float(state.diagnostics.episode_loss))
    assert int(state.diagnostics.num_nonfinite) == 0
    # windows: steps 0-2, then 3-4 + 0, 1-3, 4 + 0-1, 2-4 of the next episodes
    np.testing.assert_allclose(window_losses, [-2.0, -1.0, -1.0, -2.0, 0.0], atol=1e-6)
    assert episode_losses == [0.0, -2.0, -2.0, -2.0, -2.0]


class Blowup(Countdown):
    """Countdown whose step, once past `done_at`, has an infinite derivative in the
    action (a simulator that blew up): 0 * inf = NaN in its VJP, even though the
    latched losses never use those values."""

    def step(self, state, action):
        new = super().step(state, action)
        scale = jnp.where(state.t + 1 > self.done_at, jnp.inf, 0.0)
        return new._replace(reward=new.reward + scale * jnp.sum(action))


def test_backprop_through_a_latched_episode_stays_finite():
    # Gradients through the environment (optax_pes.tbptt, jax.grad of an unroll):
    # after done, the environment's own VJP must not see a path to theta.
    system = tasks.control_system(
        Blowup(3), lambda theta, obs: theta * (obs + 1), horizon=7
    )
    grad = jax.grad(lambda th: jnp.sum(optax_pes.unroll(system, th)))(jnp.ones(1))
    # Return = 3 whatever theta: the gradient is exactly 0, and finite.
    np.testing.assert_array_equal(grad, np.zeros(1))
    tx = optax_pes.tbptt(system, truncation_length=4, key=0)
    theta, state = jnp.ones(1), tx.init(jnp.ones(1))
    for _ in range(3):
        estimate, state = jax.jit(tx.update)(jnp.zeros(1), state, theta)
        assert bool(jnp.all(jnp.isfinite(estimate))), estimate


class NaNAtDone(Countdown):
    """Countdown whose done step returns a NaN observation with a finite reward that
    depends on the action (a simulator that blew up and says so, as MuJoCo
    Playground's `done = isnan(qpos).any()` does)."""

    def step(self, state, action):
        new = super().step(state, action)
        return new._replace(
            obs=jnp.where(new.t >= self.done_at, jnp.nan, new.obs),
            reward=jnp.where(new.t > self.done_at, jnp.nan, -jnp.sum(action**2)),
        )


def test_a_non_finite_observation_at_done_does_not_reach_theta():
    # Before: the latched steps still applied the policy to the held NaN observation
    # and its VJP put 0 * NaN into theta's gradient; tbptt then dropped the window.
    policy = lambda theta, obs: theta * (obs + 1)  # noqa: E731
    theta = jnp.ones(1)
    ended = tasks.control_system(NaNAtDone(3), policy, horizon=3)
    longer = tasks.control_system(NaNAtDone(3), policy, horizon=6)
    grad = lambda system: jax.grad(  # noqa: E731
        lambda th: jnp.sum(optax_pes.unroll(system, th))
    )(theta)
    # Losses theta^2 (1 + 4 + 9), then exactly 0: the gradient is 28 theta.
    np.testing.assert_array_equal(grad(ended), [28.0])
    np.testing.assert_array_equal(grad(longer), [28.0])
    tx = optax_pes.tbptt(longer, truncation_length=6, key=0)
    estimate, state = jax.jit(tx.update)(jnp.zeros(1), tx.init(theta), theta)
    np.testing.assert_allclose(estimate, [28.0], rtol=1e-6)
    assert int(state.diagnostics.num_nonfinite) == 0


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("reset_key", ["raw", "typed"])
def test_reset_gets_the_kind_of_key_asked_for(reset_key):
    env = LQEnv(1, random_start=1.0)
    system = tasks.control_system(env, env.policy, horizon=4, reset_key=reset_key)
    state = system.init(jnp.zeros(2), jax.random.key(3))
    key = state.env_state.key
    if reset_key == "raw":
        assert key.dtype == jnp.uint32 and key.shape == (2,)
    else:
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    # The same bits either way: the same initial state.
    other = "typed" if reset_key == "raw" else "raw"
    twin = tasks.control_system(env, env.policy, horizon=4, reset_key=other)
    np.testing.assert_array_equal(
        state.env_state.x, twin.init(jnp.zeros(2), jax.random.key(3)).env_state.x
    )
    fresh = system.init(jnp.zeros(2), jax.random.key(4)).env_state.x
    assert not np.allclose(state.env_state.x, fresh)
    # The estimators carry a key of either kind in the particles' states.
    tx = optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=2, key=0)
    estimate, _ = jax.jit(tx.update)(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    assert bool(jnp.all(jnp.isfinite(estimate)))


class RandomStart(NamedTuple):
    x: jax.Array
    obs: jax.Array
    reward: jax.Array
    done: jax.Array


class StandStill:
    """A random initial state that never moves; the reward is the control cost."""

    def reset(self, key):
        x = jax.random.normal(key, (2,))
        return RandomStart(x, x, jnp.zeros(()), jnp.zeros(()))

    def step(self, state, action):
        return state._replace(reward=-jnp.sum(action**2))


def test_antithetic_pairs_share_their_initial_state():
    system = tasks.control_system(StandStill(), _policy, horizon=4)
    tx = optax_pes.pes(system, num_particles=6, sigma=0.1, truncation_length=1, key=0)
    _, state = jax.jit(tx.update)(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    x = state.inner_state.env_state.x  # member-major: particle i pairs with i + 3
    np.testing.assert_array_equal(x[:3], x[3:])
    assert len({tuple(np.asarray(row).tolist()) for row in x[:3]}) == 3


# -- gymnax ----------------------------------------------------------------------------


# (Raw keys reach reset in test_reset_gets_the_kind_of_key_asked_for too.)
@pytest.mark.parametrize("reset_key", [slow("raw"), "typed"])
def test_gymnax_pendulum(reset_key):
    gymnax = pytest.importorskip("gymnax")
    env, params = gymnax.make("Pendulum-v1")
    wrapped = tasks.from_gymnax(env, params)
    policy, theta = tasks.linear_policy(3, 1, obs_scale=[1.0, 1.0, 8.0])
    system = tasks.control_system(wrapped, policy, horizon=205, reset_key=reset_key)
    losses = jax.jit(lambda th: optax_pes.unroll(system, th, 1))(theta + 0.1)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert bool(jnp.all(losses[:200] >= 0.0))  # pendulum rewards are costs <= 0
    assert losses[200:].tolist() == [0.0] * 5  # gymnax's time limit: done, latched

    # The first step is gymnax's own, with the key the wrapper carries.
    key = jax.random.key(1)
    if reset_key == "raw":
        key = jax.random.key_data(key)
    state = wrapped.reset(key)
    carried, reset_sub = jax.random.split(key)
    obs, env_state = env.reset(reset_sub, params)
    np.testing.assert_allclose(state.obs, obs)
    action = policy(theta + 0.1, obs)
    out = env.step(jax.random.split(carried)[1], env_state, action, params)
    np.testing.assert_allclose(wrapped.step(state, action).reward, out[2], rtol=1e-6)

    tx = optax.chain(
        optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=50, key=0),
        optax.adam(1e-2),
    )
    updates, _ = jax.jit(tx.update)(jnp.zeros_like(theta), tx.init(theta), theta)
    assert updates.shape == (1, 3) and bool(jnp.all(jnp.isfinite(updates)))


def test_from_gymnax_refuses_other_objects():
    with pytest.raises(TypeError, match="gymnax environment"):
        tasks.from_gymnax(object())


# -- policies --------------------------------------------------------------------------


def test_linear_policy_normalises_and_clips():
    policy, theta = tasks.linear_policy(
        3, 2, obs_mean=[1.0, 0.0, 0.0], obs_scale=[1.0, 2.0, 4.0], action_bound=1.5
    )
    assert theta.shape == (2, 3) and theta.dtype == jnp.float32
    obs = jnp.array([2.0, 2.0, 4.0])
    assert policy(theta, obs).tolist() == [0.0, 0.0]  # zero start: zero action
    theta = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert policy(theta, obs).tolist() == [1.0, 1.5]  # [1, 1 + 1] clipped to 1.5
    unbounded, _ = tasks.linear_policy(3, 2, obs_scale=2.0)
    assert unbounded(theta, obs).tolist() == [1.0, 3.0]


def test_mlp_policy_shapes_and_start():
    policy, theta = tasks.mlp_policy(
        4, 2, key=0, hidden_sizes=(8, 5), activation="relu", action_bound=1.0
    )
    assert [layer["w"].shape for layer in theta] == [(4, 8), (8, 5), (5, 2)]
    assert [layer["b"].shape for layer in theta] == [(8,), (5,), (2,)]
    obs = jnp.arange(4.0)
    assert policy(theta, obs).tolist() == [0.0, 0.0]  # output layer starts at zero
    theta[-1]["b"] = jnp.array([3.0, -0.5])
    assert policy(theta, obs).tolist() == [1.0, -0.5]
    again, theta_again = tasks.mlp_policy(4, 2, key=0, hidden_sizes=(8, 5))
    np.testing.assert_array_equal(theta[0]["w"], theta_again[0]["w"])  # from the key
    _, linear = tasks.mlp_policy(4, 2, key=0, hidden_sizes=())
    assert [layer["w"].shape for layer in linear] == [(4, 2)]
    # Every dtype starts from the same weights, rounded (bfloat16 drew its own).
    _, half = tasks.mlp_policy(4, 2, key=0, hidden_sizes=(8, 5), dtype=jnp.bfloat16)
    np.testing.assert_array_equal(half[0]["w"], theta[0]["w"].astype(jnp.bfloat16))


def test_observation_statistics():
    # obs = t over steps 0, 1, 2 (done on step 3): mean 1, std sqrt(2/3)
    mean, std = tasks.observation_statistics(
        Countdown(3), lambda theta, obs: theta * obs, jnp.ones(1), horizon=8
    )
    np.testing.assert_allclose(mean, [1.0], rtol=1e-6)
    np.testing.assert_allclose(std, [np.sqrt(2.0 / 3.0)], rtol=1e-6)
    # a constant coordinate gets scale 1
    mean, std = tasks.observation_statistics(
        Countdown(3), lambda theta, obs: theta * obs, jnp.ones(1), horizon=1
    )
    assert mean.tolist() == [0.0] and std.tolist() == [1.0]
    # A NaN observation at the done step is not counted (before: 0 * NaN = NaN).
    mean, std = tasks.observation_statistics(
        NaNAtDone(3), lambda theta, obs: theta * obs, jnp.ones(1), horizon=8
    )
    np.testing.assert_allclose(mean, [1.0], rtol=1e-6)
    np.testing.assert_allclose(std, [np.sqrt(2.0 / 3.0)], rtol=1e-6)


class Offset(Countdown):
    """Observations 3000 + t / 2: a large offset next to a small spread."""

    def step(self, state, action):
        new = super().step(state, action)
        return new._replace(obs=3000.0 + 0.5 * new.t * jnp.ones(1))

    def reset(self, key):
        state = super().reset(key)
        return state._replace(obs=jnp.full(1, 3000.0))


def test_observation_statistics_of_offset_observations():
    # Before: E[x^2] - E[x]^2 in float32 cancelled to <= 0, and the coordinate was
    # taken for a constant (scale 1) although its std is 1.15.
    mean, std = tasks.observation_statistics(
        Offset(100), lambda theta, obs: theta * obs, jnp.ones(1), horizon=8
    )
    observations = 3000.0 + 0.5 * np.arange(8)
    np.testing.assert_allclose(mean, [observations.mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [observations.std()], rtol=1e-4)


@pytest.mark.parametrize("make", ["linear", "mlp"])
def test_integer_observations_are_normalised_in_floats(make):
    # Before: obs_mean and obs_scale were cast to the observation's dtype, so an
    # int32 observation met obs_scale 0.5 -> 0 (an infinite action) and mean 1.5 -> 1.
    norm = dict(obs_mean=[1.5, 0.0], obs_scale=[0.5, 1.0])
    if make == "linear":
        policy, theta = tasks.linear_policy(2, 1, **norm)
        theta = jnp.ones_like(theta)
    else:
        policy, theta = tasks.mlp_policy(2, 1, key=0, hidden_sizes=(3,), **norm)
        theta[-1]["w"] = jnp.ones_like(theta[-1]["w"])
    floats = policy(theta, jnp.array([2.0, 3.0]))
    np.testing.assert_array_equal(policy(theta, jnp.array([2, 3], jnp.int32)), floats)
    assert bool(jnp.all(jnp.isfinite(floats)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(obs_dim=0, act_dim=1), ValueError, "obs_dim must be an int >= 1"),
        (dict(obs_dim=2, act_dim=1.0), TypeError, "act_dim must be an int"),
        (dict(obs_dim=2, act_dim=1, obs_scale=[1.0, 0.0]), ValueError, "obs_scale"),
        (dict(obs_dim=2, act_dim=1, obs_mean=[1.0, 2, 3]), ValueError, r"shape \(2,\)"),
        (dict(obs_dim=2, act_dim=1, obs_mean=np.nan), ValueError, "finite"),
        (dict(obs_dim=2, act_dim=1, action_bound=0.0), ValueError, "action_bound"),
    ],
)
def test_policy_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        tasks.linear_policy(**kwargs)


def test_policy_bad_observation_and_activation():
    policy, theta = tasks.linear_policy(3, 1)
    with pytest.raises(ValueError, match=r"observations of shape \(3,\)"):
        policy(theta, jnp.ones(4))
    with pytest.raises(ValueError, match="activation must be"):
        tasks.mlp_policy(3, 1, key=0, activation="sigmoid")
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\]"):
        tasks.mlp_policy(3, 1, key=0, hidden_sizes=(4, 0))


# -- bad input to control_system -------------------------------------------------------


class _NoStep:
    def reset(self, key):
        return Countdown(1).reset(key)


class _Batched(Countdown):
    def reset(self, key):
        state = super().reset(key)
        return state._replace(reward=jnp.zeros(4))


class _ObsOnly(NamedTuple):
    obs: jax.Array
    reward: jax.Array


class _NoDone:
    def reset(self, key):
        return _ObsOnly(jnp.zeros(1), jnp.zeros(()))

    def step(self, state, action):
        return state


class _Typed(Countdown):
    def reset(self, key):
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            raise TypeError("this environment takes typed keys")
        return super().reset(key)


class _Changing(Countdown):
    def step(self, state, action):
        return super().step(state, action)._replace(obs=jnp.zeros(2))


class _NumpyInfo(Countdown):
    """A step that puts a NumPy float64 constant where reset put a float32 array:
    JAX computes with it as float32 (without x64), so it is the same state."""

    def step(self, state, action):
        new = super().step(state, action)
        return new._replace(reward=np.float64(1.0))


def test_numpy_constants_in_an_env_state_are_accepted():
    # A review caught the structure check comparing raw dtypes for a day.
    system = tasks.control_system(_NumpyInfo(5), _policy, horizon=3)
    assert optax_pes.unroll(system, jnp.ones(1)).tolist() == [-1.0, -1.0, -1.0]


def _policy(theta, obs):
    return theta * obs


@pytest.mark.parametrize(
    "env, kwargs, error, match",
    [
        (_NoStep(), {}, TypeError, "env must have a method step"),
        (object(), {}, TypeError, "env must have a method reset"),
        (Countdown(2), dict(policy=1.0), TypeError, "policy must be a callable"),
        (Countdown(2), dict(horizon=0), ValueError, "horizon must be an int >= 1"),
        (Countdown(2), dict(horizon=2.0), TypeError, "horizon must be an int"),
        (Countdown(2), dict(reset_key="uint"), ValueError, "reset_key must be one"),
        (_Batched(2), {}, ValueError, r"reward must be a float scalar.*vmap"),
        (_NoDone(), {}, ValueError, "fields obs, reward and done.*without done"),
        (_Typed(2), {}, ValueError, "env.reset.*failed on a raw PRNG key"),
    ],
)
def test_control_system_bad_input(env, kwargs, error, match):
    kwargs = dict(dict(policy=_policy, horizon=4), **kwargs)
    with pytest.raises(error, match=match):
        tasks.control_system(env, **kwargs)


def test_typed_reset_key_accepted_where_raw_fails():
    tasks.control_system(_Typed(2), _policy, horizon=4, reset_key="typed")


@pytest.mark.parametrize(
    "env, policy, match",
    [
        (_Changing(2), _policy, "env.step.*structure, shapes and dtypes of env.reset"),
        # Named first: a large state (MJX's) made the difference hard to find.
        (_Changing(2), _policy, r"first difference: \.obs is float32\[2\], expected"),
        (Countdown(2), lambda theta, obs: theta["w"] @ obs, r"policy\(theta, obs\)"),
        (LQEnv(0), lambda theta, obs: theta, r"env.step\(state, action\) failed"),
    ],
    ids=["state-changes", "names-the-leaf", "policy-fails", "action-does-not-fit"],
)
def test_step_errors_name_their_cause(env, policy, match):
    system = tasks.control_system(env, policy, horizon=4)
    with pytest.raises(ValueError, match=match):
        optax_pes.pes(
            system, num_particles=2, sigma=0.1, truncation_length=2, key=0
        ).init(jnp.ones(5))


def test_swimmer_needs_mujoco(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(ImportError, match=r"optax_pes\[control\]"):
        tasks.MJXSwimmer()


@jax.numpy_rank_promotion("allow")
def test_mjx_swimmer_traces_with_x64(x64):
    # Before: step set ctrl to a float32 action where MJX's data is float64 under
    # x64, and control_system refused the changed state (traced only: no compile).
    pytest.importorskip("mujoco.mjx")
    pytest.importorskip("gymnasium")
    policy, theta = tasks.linear_policy(8, 2)
    system = tasks.control_system(tasks.MJXSwimmer(), policy, horizon=10)
    state = jax.eval_shape(system.init, theta, jax.random.key(0))
    _, loss = jax.eval_shape(system.step, theta, state, jax.random.key(0))
    assert state.env_state.data.ctrl.dtype == jnp.float64
    assert loss.dtype == jnp.float32  # the swimmer's reward stays float32


# -- the MJX swimmer (slow: MJX compiles for a minute or more on a CPU) ---------------
# MJX itself broadcasts ranks implicitly: these tests allow it (conftest raises).


@pytest.mark.slow
@jax.numpy_rank_promotion("allow")
def test_mjx_swimmer_is_gymnasiums_swimmer_v5():
    pytest.importorskip("mujoco.mjx")
    gymnasium = pytest.importorskip("gymnasium")
    env = tasks.MJXSwimmer()
    state = env.reset(jax.random.key(0))
    reference = gymnasium.make("Swimmer-v5").unwrapped
    reference.reset(seed=0)
    reference.set_state(np.asarray(state.data.qpos), np.asarray(state.data.qvel))
    np.testing.assert_allclose(state.obs, reference._get_obs(), rtol=1e-6)
    step = jax.jit(env.step)
    for t in range(20):
        action = np.array([np.sin(0.3 * t), np.cos(0.2 * t)], np.float32)
        state = step(state, action)
        obs, reward, terminated, truncated, _ = reference.step(action)
        np.testing.assert_allclose(state.obs, obs, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(state.reward, reward, rtol=1e-3, atol=1e-3)
        assert float(state.done) == 0.0 and not terminated


@pytest.mark.slow
@jax.numpy_rank_promotion("allow")
def test_pes_on_the_mjx_swimmer_smoke():
    pytest.importorskip("mujoco.mjx")
    pytest.importorskip("gymnasium")
    policy, theta = tasks.linear_policy(8, 2)
    system = tasks.control_system(tasks.MJXSwimmer(), policy, horizon=10)
    tx = optax.chain(
        optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=5, key=0),
        optax.adam(0.05),
    )
    state = tx.init(theta)

    @jax.jit
    def train_step(theta, state):
        updates, state = tx.update(jnp.zeros_like(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    for _ in range(3):
        theta, state = train_step(theta, state)
    assert bool(jnp.all(jnp.isfinite(theta))) and bool(jnp.any(theta != 0))
    assert bool(jnp.isfinite(state[0].diagnostics.mean_loss))


# -- the examples' harness (slow: needs gymnax, from the control extra) --------------


@pytest.mark.slow
def test_pendulum_example_runs_every_estimator_over_seeds(tmp_path):
    pytest.importorskip("gymnax")
    root = pathlib.Path(__file__).resolve().parents[1]
    figure = tmp_path / "pendulum.png"
    run = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "pendulum.py"),
            "--quick",
            "--seeds",
            "2",
            "--learning-rates",
            "PES=0.01,full ES=0.1",
            "--particle-counts",
            "PES=16",
            "--sigmas",
            "NRES=0.2",
            "--out",
            str(figure),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    for seed in ("0", "1"):
        for name in ("full", "PES", "NRES", "truncated"):
            assert any(row[:2] == [seed, name] for row in rows), run.stdout
    assert "over the seeds" in run.stdout
    assert figure.is_file()
    # Per-estimator settings reach their estimator only (pendulum: N = 32, sigma 0.3,
    # Adam 0.05 for all but these).
    assert "full ES: N = 32, sigma = 0.3, Adam 0.1" in run.stdout
    assert "PES: N = 16, sigma = 0.3, Adam 0.01" in run.stdout
    assert "NRES: N = 32, sigma = 0.2, Adam 0.05" in run.stdout
    assert "truncated ES: N = 32, sigma = 0.3, Adam 0.05" in run.stdout

    bad = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "pendulum.py"),
            "--learning-rates",
            "PSE=0.01",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "unknown estimator 'PSE'" in bad.stderr
