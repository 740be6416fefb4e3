"""The paper's problems as `UnrolledSystem`s: shapes, dtypes, the numbers in them."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes import unroll
from optax_pes.tasks import (
    influence_balancing,
    influence_balancing_optimum,
    linear_quadratic,
    toy_regression,
    toy_regression_grid,
)


def _episode_loss(system):
    return lambda theta: jnp.sum(unroll(system, theta))


def _check_step(system, theta, state_shapes, dtype):
    """One init and one step: state structure/dtypes kept, loss a float scalar."""
    key = jax.random.key(0)
    state = jax.jit(system.init)(theta, key)
    assert jax.tree.map(jnp.shape, state) == state_shapes
    new_state, loss = jax.jit(system.step)(theta, state, key)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for old, new in zip(
        jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True
    ):
        assert (old.shape, old.dtype) == (new.shape, new.dtype)
    assert loss.shape == () and loss.dtype == dtype
    assert jax.tree.leaves(state)[0].dtype == dtype


# --- influence balancing -----------------------------------------------------------


def _steady_state(theta, n=23, num_positive=10):
    # s = A s + theta b  <=>  s_i = s_{i+1} + 2 theta b_i, s_n = 0.
    b = np.where(np.arange(n) < num_positive, 1.0, -1.0)
    return 2.0 * theta * np.cumsum(b[::-1])[::-1]


def test_influence_balancing_shapes_and_dtypes():
    system = influence_balancing(horizon=50)
    _check_step(system, jnp.array([0.1]), (23,), jnp.float32)
    _check_step(system, jnp.array(0.1), (23,), jnp.float32)  # a scalar theta works
    losses = jax.jit(lambda theta: unroll(system, theta))(jnp.array([0.1]))
    assert losses.shape == (50,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(
        eqx.filter_jit(unroll)(system, jnp.array(0.1)), losses, rtol=1e-6
    )


def test_influence_balancing_loss_on_new_state():
    system = influence_balancing(horizon=5)
    theta = jnp.array([0.3])
    s0 = system.init(theta, None)
    s1, loss = system.step(theta, s0, None)
    a = 0.5 * np.eye(23) + 0.5 * np.eye(23, k=1)
    b = np.where(np.arange(23) < 10, 1.0, -1.0)
    np.testing.assert_allclose(s1, a @ np.ones(23) + 0.3 * b, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * (s1[0] - 1.0) ** 2, rtol=1e-6)
    # -1/6 is the steady state's exact optimum.
    fixed, loss = system.step(
        jnp.array([-1 / 6]), jnp.asarray(_steady_state(-1 / 6)), 0
    )
    np.testing.assert_allclose(fixed, _steady_state(-1 / 6), atol=1e-6)
    assert float(loss) < 1e-12


def test_influence_balancing_optimum_default_horizon():
    optimum = influence_balancing_optimum(influence_balancing().horizon)
    assert abs(optimum + 1 / 6) < 1e-3
    # The transient from s_0 = 1 moves the finite-horizon optimum by about 21.6 / T.
    assert influence_balancing_optimum(1000) == pytest.approx(-0.146536385, abs=1e-8)
    assert influence_balancing_optimum(10_000) + 1 / 6 == pytest.approx(2.159e-3, 1e-3)


@pytest.mark.parametrize("horizon", [30, 1000, 50_000])
def test_influence_balancing_optimum_matches_unroll(horizon):
    # The episode loss is quadratic in theta: two gradients give its minimiser.
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(_episode_loss(influence_balancing(horizon))))
        g0, g1 = grad(jnp.array([0.0])), grad(jnp.array([1.0]))
        assert g0.dtype == jnp.float64
        from_grads = float((-g0 / (g1 - g0))[0])
    assert influence_balancing_optimum(horizon) == pytest.approx(from_grads, 1e-9)


_IB = influence_balancing()
_ib_grad = jax.jit(jax.grad(_episode_loss(_IB)))


@jax.jit
def _truncated_grad(theta, state):
    """Gradients of the K-step windows from `state` (held constant), K = 1..120."""

    def window_losses(theta):
        def body(state, _):
            state, loss = _IB.step(theta, state, None)
            return state, loss

        _, losses = jax.lax.scan(body, jax.lax.stop_gradient(state), length=120)
        return jnp.cumsum(losses)  # [K - 1]: the loss of the window of K steps

    return jax.jacrev(window_losses)(theta)[:, 0]


@pytest.mark.parametrize("offset", [-0.05, -0.01, 0.01, 0.05])
def test_influence_balancing_truncated_gradient_has_wrong_sign(offset):
    """From steady state, a K-step truncation's gradient points away from -1/6."""
    theta = jnp.array([-1 / 6 + offset])
    true_grad = _ib_grad(theta)[0]
    assert np.sign(true_grad) == np.sign(offset)
    state = jnp.asarray(_steady_state(float(theta[0])), jnp.float32)
    truncated_grads = np.asarray(_truncated_grad(theta, state))
    # Windows of K <= 100 steps get the sign wrong (K = 1 is the PES paper's case);
    # only K >= 110 sees enough of the long-term influence.
    assert np.all(np.sign(truncated_grads[:100]) == -np.sign(offset))
    assert np.all(np.sign(truncated_grads[110:]) == np.sign(offset))


def test_influence_balancing_float64():
    with jax.enable_x64(True):
        system = influence_balancing(horizon=20)
        _check_step(system, jnp.array([0.1]), (23,), jnp.float64)
        assert unroll(system, jnp.array([0.1])).dtype == jnp.float64


def test_influence_balancing_bad_sizes():
    with pytest.raises(ValueError, match="num_positive"):
        influence_balancing(n=5, num_positive=6)
    with pytest.raises(ValueError, match="n must be"):
        influence_balancing(n=0)
    with pytest.raises(ValueError, match="horizon"):
        influence_balancing(horizon=0)


# --- toy regression ----------------------------------------------------------------


def _inner_loss(x):
    x0, x1 = float(x[0]), float(x[1])
    return (
        np.sqrt(x0**2 + 5)
        - np.sqrt(5)
        + np.sin(x1) ** 2 * np.exp(-5 * x0**2)
        + 0.25 * abs(x1 - 100)
    )


def test_toy_regression_shapes_and_convention():
    system = toy_regression()
    theta = jnp.array([-1.0, -2.0])
    _check_step(system, theta, ((2,), ()), jnp.float32)
    x, t = system.init(theta, None)
    np.testing.assert_array_equal(x, [1.0, 1.0])
    assert t.dtype == jnp.int32 and int(t) == 0
    step = jax.jit(system.step)
    (x1, t1), loss = step(theta, (x, t), None)
    assert int(t1) == 1
    # t = 0: the learning rate is exp(theta_0); the loss is f at the new iterate.
    x_expected = x - np.exp(-1.0) * np.asarray(_numerical_grad(x))
    np.testing.assert_allclose(x1, x_expected, rtol=1e-5)
    np.testing.assert_allclose(loss, _inner_loss(x1), rtol=1e-5)
    # The schedule interpolates to exp(theta_1) at the last step.
    x_last = jnp.array([0.3, 2.0])
    (x_new, _), _ = step(theta, (x_last, jnp.int32(99)), None)
    lr = np.exp(-1.0) * 0.01 + np.exp(-2.0) * 0.99
    np.testing.assert_allclose(
        x_new, x_last - lr * np.asarray(_numerical_grad(x_last)), rtol=1e-5
    )


def _numerical_grad(x, h=1e-3):
    x = np.asarray(x, np.float64)
    return [
        (_inner_loss(x + h * e) - _inner_loss(x - h * e)) / (2 * h) for e in np.eye(2)
    ]


def test_toy_regression_meta_loss_and_jit():
    system = toy_regression()
    theta = jnp.array([-4.0, -4.0])
    meta_loss = jax.jit(_episode_loss(system))
    assert float(meta_loss(theta)) == pytest.approx(2487.77, rel=1e-4)
    assert jnp.all(jnp.isfinite(jax.grad(_episode_loss(system))(theta)))


def test_toy_regression_grid_minimum_near_553():
    theta0s, theta1s, meta_losses = toy_regression_grid(num=50)
    assert theta0s.shape == theta1s.shape == (50,)
    assert meta_losses.shape == (50, 50)
    i, j = np.unravel_index(np.nanargmin(meta_losses), meta_losses.shape)
    assert meta_losses[i, j] == pytest.approx(553.0, rel=0.03)
    assert 2.5 < theta0s[i] < 3.0 and theta1s[j] < 0.0
    # meta_losses[i, j] is at (theta0s[i], theta1s[j]); the region is chaotic, so
    # float32 rounding differences (vmapped or not) show at the 1e-3 level.
    theta = jnp.stack([theta0s[i], theta1s[j]])
    direct = jnp.sum(unroll(toy_regression(), theta))
    np.testing.assert_allclose(direct, meta_losses[i, j], rtol=1e-2)
    # A smooth region agrees tightly.
    direct = jnp.sum(unroll(toy_regression(), jnp.stack([theta0s[5], theta1s[7]])))
    np.testing.assert_allclose(direct, meta_losses[5, 7], rtol=1e-5)


def test_toy_regression_overflow_gives_non_finite_losses():
    losses = unroll(toy_regression(), jnp.array([100.0, 100.0]))
    assert not np.all(np.isfinite(losses))


def test_toy_regression_float64():
    with jax.enable_x64(True):
        system = toy_regression(horizon=10)
        _check_step(system, jnp.array([-1.0, -1.0]), ((2,), ()), jnp.float64)
        assert unroll(system, jnp.array([-1.0, -1.0])).dtype == jnp.float64


def test_toy_regression_bad_theta():
    with pytest.raises(ValueError, match="shape"):
        unroll(toy_regression(), jnp.zeros(3))


# --- linear quadratic --------------------------------------------------------------


def test_linear_quadratic_shapes_and_dtypes():
    system, theta0 = linear_quadratic(0, state_dim=5, theta_shapes=(3,), horizon=7)
    assert theta0.shape == (3,) and theta0.dtype == jnp.float32
    _check_step(system, theta0, (5,), jnp.float32)
    assert unroll(system, theta0).shape == (7,)
    # d s_{t+1} / d s_t = A
    a = jax.jacobian(lambda s: system.step(theta0, s, None)[0])(jnp.zeros(5))
    spectral_radius = np.max(np.abs(np.linalg.eigvals(np.asarray(a))))
    assert spectral_radius == pytest.approx(0.9, abs=1e-5)
    # Pytrees of shapes give pytrees of arrays; a scalar shape gives a scalar.
    system, theta0 = linear_quadratic(1, theta_shapes={"w": (2, 3), "b": ()})
    assert jax.tree.map(jnp.shape, theta0) == {"w": (2, 3), "b": ()}
    grad = jax.jit(jax.grad(_episode_loss(system)))(theta0)
    assert jax.tree.map(jnp.shape, grad) == {"w": (2, 3), "b": ()}


def test_linear_quadratic_is_quadratic_and_init_depends_on_theta():
    with jax.enable_x64(True):
        system, theta0 = linear_quadratic(
            2, theta_shapes={"a": (2,), "b": (2, 2)}, dtype=jnp.float64
        )
        flat, unravel = jax.flatten_util.ravel_pytree(theta0)
        assert flat.dtype == jnp.float64
        total = jax.jit(lambda u: jnp.sum(unroll(system, unravel(u))))
        hessian = jax.jit(jax.hessian(total))
        h0 = hessian(flat)
        h1 = hessian(flat + jnp.linspace(-2.0, 3.0, 6))
        np.testing.assert_allclose(h0, h1, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(h0, h0.T, rtol=1e-10, atol=1e-12)
        # Exact second-order Taylor expansion.
        v = jnp.linspace(-1.0, 1.0, 6)
        taylor = total(flat) + jax.jit(jax.grad(total))(flat) @ v + 0.5 * v @ h0 @ v
        np.testing.assert_allclose(total(flat + v), taylor, rtol=1e-10)
        jacobian = jax.jit(jax.jacobian(lambda u: system.init(unravel(u), None)))(flat)
        assert jacobian.shape == (4, 6) and float(jnp.abs(jacobian).min()) > 0.0


def test_linear_quadratic_memory_controls_truncation_bias():
    def relative_bias(memory):
        system, theta = linear_quadratic(0, memory=memory)
        full = jax.grad(_episode_loss(system))(theta)

        def window_loss(theta, state):  # one step, state held constant (K = 1)
            state, loss = system.step(theta, jax.lax.stop_gradient(state), None)
            return loss, state

        state, truncated = system.init(theta, None), jnp.zeros_like(theta)
        for _ in range(system.horizon):
            grad, state = jax.grad(window_loss, has_aux=True)(theta, state)
            truncated = truncated + grad
        return float(jnp.linalg.norm(truncated - full) / jnp.linalg.norm(full))

    assert relative_bias(0.0) < 1e-5  # no memory: truncation is exact
    assert relative_bias(0.9) > 0.5


def test_linear_quadratic_dtypes():
    with jax.enable_x64(True):
        system, theta0 = linear_quadratic(0, dtype=jnp.float64)
        assert theta0.dtype == jnp.float64
        _check_step(system, theta0, (4,), jnp.float64)
        assert unroll(system, theta0).dtype == jnp.float64
        # The system follows the dtype of theta.
        _check_step(system, theta0.astype(jnp.float32), (4,), jnp.float32)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        linear_quadratic(0, dtype=jnp.float64)


def test_linear_quadratic_bad_input():
    with pytest.raises(ValueError, match="memory"):
        linear_quadratic(0, memory=1.0)
    with pytest.raises(ValueError, match="state_dim"):
        linear_quadratic(0, state_dim=0)
    with pytest.raises(ValueError, match="theta_shapes"):
        linear_quadratic(0, theta_shapes=[2.5])
    system, _ = linear_quadratic(0, theta_shapes=(3,))
    with pytest.raises(ValueError, match="3 entries"):
        unroll(system, jnp.zeros(4))


def test_unroll_called_eagerly_compiles_once():
    """`unroll` called outside jit (a reference gradient, returns logged during
    training), under an eager `jax.vmap` or `jax.grad`, traces the system once per
    kind of call: a new trace compiled the episode's scan again on every call. A
    system holding arrays (an `eqx.Partial`) takes them as arguments."""
    traces = []
    base = toy_regression()

    def step(data, theta, state, key):
        traces.append(None)
        new_state, loss = base.step(theta, state, key)
        return new_state, loss * data

    system = optax_pes.UnrolledSystem(
        base.init, eqx.Partial(step, jnp.asarray(1.0)), base.horizon
    )
    theta = jnp.array([0.5, 0.5])
    keys = jax.random.split(jax.random.key(0), 3)

    def calls():
        unroll(system, theta, 0)
        jax.vmap(lambda k: unroll(system, theta, k))(keys)
        jax.grad(lambda t: jnp.sum(unroll(system, t, 1)))(theta)

    calls()
    seen = len(traces)
    calls()
    assert len(traces) == seen
