"""optax_pes.outer_loop: chunks, history, checkpoints, resuming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes


def _tx():
    system = optax_pes.tasks.toy_regression()
    pes = optax_pes.pes(system, num_particles=8, sigma=0.3, truncation_length=10, key=0)
    return optax.chain(pes, optax.adam(1e-2))


THETA = jnp.array([-4.0, -4.0])


def _plain_loop(tx, theta, n):
    state = tx.init(theta)
    update = jax.jit(tx.update)
    thetas = []
    for _ in range(n):
        updates, state = update(jnp.zeros_like(theta), state, theta)
        theta = optax.apply_updates(theta, updates)
        thetas.append(np.asarray(theta))
    return theta, state, np.stack(thetas)


def test_same_as_the_plain_optax_loop_with_a_short_last_chunk():
    tx = _tx()
    theta, state, history = optax_pes.outer_loop(
        tx, THETA, 23, chunk=10, progress=False
    )
    expected_theta, expected_state, thetas = _plain_loop(tx, THETA, 23)
    np.testing.assert_allclose(history.theta, thetas, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theta, expected_theta, rtol=1e-5, atol=1e-6)
    assert int(state[0].count) == 23
    for field in optax_pes.Diagnostics._fields:
        assert history.diagnostics[field].shape == (23,)
    # Episodes of T = 100 steps end every 10 windows: the meta-loss is recorded then.
    finished = history.diagnostics["num_episodes"]
    np.testing.assert_array_equal(np.nonzero(finished)[0], [9, 19])
    assert history.diagnostics["episode_loss"][9] > 0


def test_checkpoints_and_resuming_continue_bit_for_bit(tmp_path):
    tx = _tx()
    path = tmp_path / "run.eqx"
    seen = []
    optax_pes.outer_loop(
        tx,
        THETA,
        20,
        chunk=5,
        progress=False,
        checkpoint=path,
        checkpoint_every=10,
        on_chunk=lambda theta, state, done: seen.append(done),
    )
    assert seen == [5, 10, 15, 20]
    theta10, state10, _ = optax_pes.outer_loop(tx, THETA, 10, chunk=5, progress=False)
    theta, state = optax_pes.tree_deserialise_leaves(path, (THETA, tx.init(THETA)))
    assert int(state[0].count) == 20
    resumed, _, _ = optax_pes.outer_loop(
        tx, theta10, 10, state=state10, chunk=5, progress=False
    )
    np.testing.assert_array_equal(resumed, theta)


def _traced_tx():
    """`_tx()` over a system whose step records each trace: `(tx, traces)`."""
    traces = []
    base = optax_pes.tasks.toy_regression()

    def step(theta, state, key):
        traces.append(None)
        return base.step(theta, state, key)

    system = optax_pes.UnrolledSystem(base.init, step, base.horizon)
    pes = optax_pes.pes(system, num_particles=8, sigma=0.3, truncation_length=10, key=0)
    return optax.chain(pes, optax.adam(1e-2)), traces


def test_calls_that_resume_compile_once():
    """Resuming (`state=`), or one call per epoch with an evaluation between, reuses
    the compiled chunk: each call compiled its own before."""
    tx, traces = _traced_tx()
    theta, state, _ = optax_pes.outer_loop(tx, THETA, 5, chunk=5, progress=False)
    seen = len(traces)
    for _ in range(2):
        theta, state, _ = optax_pes.outer_loop(
            tx, theta, 5, state=state, chunk=5, progress=False
        )
    assert len(traces) == seen
    assert int(state[0].count) == 15


def test_a_weakly_typed_theta_compiles_one_chunk():
    """A theta written from Python scalars (`jnp.array(-4.0)`) is weakly typed, and
    the first chunk returned it strongly typed: the second chunk compiled again."""
    tx, traces = _traced_tx()
    theta = jnp.broadcast_to(jnp.array(-4.0), (2,))
    assert theta.weak_type
    seen = []
    out, _, _ = optax_pes.outer_loop(
        tx,
        theta,
        15,
        chunk=5,
        progress=False,
        on_chunk=lambda theta, state, done: seen.append(len(traces)),
    )
    assert seen[0] == seen[1] == seen[2]
    assert out.dtype == theta.dtype and not out.weak_type


def test_bad_arguments():
    tx = _tx()
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        optax_pes.outer_loop(tx, THETA, 3, chunk=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint"):
        optax_pes.outer_loop(tx, THETA, 3, checkpoint_every=2)
    with pytest.raises(ValueError, match="theta must be finite"):
        optax_pes.outer_loop(tx, THETA.at[1].set(jnp.nan), 3)
