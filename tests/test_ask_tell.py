"""Ask / tell gives the estimates of pes and nres for the same system and key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes.tasks import linear_quadratic

from .helpers import slow

N, K = 4, 2


def _drive(at, system, theta, num_windows):
    """Run `system` outside the estimator (op by op, as a foreign loop would), with
    the caller's own episode clocks, and tell each window's losses."""
    horizon, groups = system.horizon, N // 2
    key = jax.random.key(0)  # the linear-quadratic systems ignore their keys
    state = at.init(theta)
    inner = [None] * N
    remaining = [horizon] * groups
    estimates = []
    for _ in range(num_windows):
        ask = at.ask(state, theta)
        for i in range(N):
            if ask.starts[i]:
                inner[i] = system.init(ask.thetas[i], key)
        before, after = np.zeros(N, np.float32), np.zeros(N, np.float32)
        inside, ended = np.zeros(N, bool), np.zeros(N, bool)
        for t in range(K):
            for g in range(groups):
                for i in (g, g + groups):  # the pair shares the clock
                    th = ask.thetas_after_reset[i] if inside[i] else ask.thetas[i]
                    inner[i], loss = system.step(th, inner[i], key)
                    (after if inside[i] else before)[i] += float(loss)
                remaining[g] -= 1
                if remaining[g] == 0:
                    remaining[g] = horizon
                    for i in (g, g + groups):
                        if t < K - 1:  # a new episode starts inside the window
                            inside[i] = True
                            inner[i] = system.init(ask.thetas_after_reset[i], key)
                        else:
                            ended[i] = True
        estimate, state = at.tell(
            state, theta, before, ended, losses_after=after, reset_inside=inside
        )
        estimates.append(np.asarray(estimate))
    return np.stack(estimates), state


@pytest.mark.parametrize("method", ["pes", "nres"])
@pytest.mark.parametrize("horizon", [slow(6), 7])  # 7: episodes end inside windows
def test_same_estimates_as_the_jax_estimator(method, horizon):
    system, theta = linear_quadratic(1, theta_shapes=(3,), horizon=horizon)
    common = dict(num_particles=N, sigma=0.1, key=5)
    at = optax_pes.ask_tell(method, truncation_length=K, **common)
    tx = getattr(optax_pes, method)(system, truncation_length=K, **common)
    num_windows = 8
    got, at_state = _drive(at, system, theta, num_windows)
    state = tx.init(theta)
    update = jax.jit(tx.update)
    expected = []
    for _ in range(num_windows):
        estimate, state = update(jnp.zeros(3), state, theta)
        expected.append(np.asarray(estimate))
    np.testing.assert_allclose(got, np.stack(expected), rtol=2e-4, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(at_state.noise), jax.tree.leaves(state.noise), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(at_state.needs_init, state.needs_init)


def test_jit_and_nonfinite_losses():
    at = optax_pes.ask_tell("pes", num_particles=N, sigma=0.1, key=0)
    theta = jnp.array([0.5, -0.5])
    state = at.init(theta)
    tell = jax.jit(at.tell)
    ask = jax.jit(at.ask)(state, theta)
    losses = jnp.sum(ask.thetas**2, axis=1).at[1].set(jnp.nan)
    estimate, state = tell(state, theta, losses, jnp.zeros(N, bool))
    assert np.all(np.isfinite(estimate))
    assert int(state.diagnostics.num_nonfinite) == 2  # particle 1 and its partner
    assert bool(state.needs_init[1])  # the pair restarts


def test_disagreeing_pair_flags_under_jit_leave_the_pair_out():
    # Eagerly an error (below); under jit it cannot raise. Before, the + member's
    # flag was used silently; now the pair is left out and counted, as a pair
    # with a non-finite loss is.
    at = optax_pes.ask_tell("pes", num_particles=N, sigma=0.1, key=0)
    theta = jnp.array([0.5, -0.5])
    state = at.init(theta)
    ask = jax.jit(at.ask)(state, theta)
    losses = jnp.sum(ask.thetas**2, axis=1)
    ended = jnp.array([False, True, False, False])  # pair 1: particles 1 and 3
    estimate, new_state = jax.jit(at.tell)(state, theta, losses, ended)
    assert int(new_state.diagnostics.num_nonfinite) == 2
    assert bool(new_state.needs_init[1])  # the pair restarts
    # The estimate is pair 0's alone: that of its losses with pair 1's made NaN.
    nan = losses.at[jnp.array([1, 3])].set(jnp.nan)
    expected, _ = jax.jit(at.tell)(state, theta, nan, jnp.zeros(N, bool))
    np.testing.assert_array_equal(estimate, expected)


def test_eager_ask_and_tell_run_compiled(monkeypatch):
    """Called outside jit, as a foreign loop does, ask and tell each run as one
    compiled program: their window's work is traced once, not run op by op on every
    window (3.6-6.4 ms a window against 0.4 ms)."""
    from optax_pes._es import _ask_tell

    calls = []

    def counted(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(_ask_tell, "draw", counted(_ask_tell.draw))
    monkeypatch.setattr(_ask_tell, "credit", counted(_ask_tell.credit))
    system, theta = linear_quadratic(1, theta_shapes=(3,), horizon=6)
    at = optax_pes.ask_tell("pes", num_particles=N, sigma=0.1, key=5)
    _drive(at, system, theta, 4)
    # One trace of ask's program (a draw), one of tell's (a draw and a credit).
    assert sorted(calls) == ["credit", "draw", "draw"]


def test_bad_input_names_the_argument():
    at = optax_pes.ask_tell("pes", num_particles=N, sigma=0.1, key=0)
    theta = jnp.zeros(2)
    state = at.init(theta)
    good = jnp.zeros(N)
    with pytest.raises(
        ValueError, match=r"losses must be a float array of shape \(4,\)"
    ):
        at.tell(state, theta, jnp.zeros(3), jnp.zeros(N, bool))
    with pytest.raises(ValueError, match="ended must be a bool array"):
        at.tell(state, theta, good, jnp.zeros(N))
    with pytest.raises(ValueError, match="share an episode clock"):
        at.tell(state, theta, good, jnp.array([True, False, False, False]))
    with pytest.raises(ValueError, match="go together"):
        at.tell(state, theta, good, jnp.zeros(N, bool), losses_after=good)
    with pytest.raises(ValueError, match="method must be one of"):
        optax_pes.ask_tell("truncated_es", num_particles=N, sigma=0.1, key=0)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        optax_pes.ask_tell(num_particles=N, sigma=0.0, key=0)
