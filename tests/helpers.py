"""Shared by the tests: exact references for the statistical tests, and trace
counting and abstract-value comparison for the contract suites."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes._es._config import stagger_offsets


def slow(*values, id: str | None = None):
    """A `parametrize` case run only with `-m slow` (CI runs those after the default
    suite): a further case of a behaviour whose other cases stay in the default
    suite, kept out of it for time."""
    return pytest.param(*values, marks=pytest.mark.slow, id=id)


def summed_estimates(tx, theta, *, num_updates, num_replicates, seed=0):
    """The sum of `num_updates` successive estimates, for independent replicates.

    Every replicate starts from `tx.init(theta)` with its own PRNG key; returns a
    pytree of float64 numpy arrays with a leading replicate axis.
    """
    state0 = tx.init(theta)
    zeros = jax.tree.map(jnp.zeros_like, theta)

    def run(key):
        def body(state, _):
            estimate, state = tx.update(zeros, state, theta)
            return state, estimate

        _, estimates = jax.lax.scan(
            body, state0._replace(rng_key=key), None, length=num_updates
        )
        return jax.tree.map(lambda e: jnp.sum(e, axis=0), estimates)

    keys = jax.random.split(jax.random.key(seed), num_replicates)
    out = jax.jit(jax.vmap(run))(keys)
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def _burned_in_per_step(system, theta, offset):
    """Per-step gradients of the losses at phases `offset .. T-1` of an episode whose
    first `offset` steps ran at theta held fixed (a staggered particle's burn-in)."""
    horizon = system.horizon
    fixed = jax.lax.stop_gradient(theta)
    key = jax.random.key(0)

    def losses(th):
        state = system.init(fixed, key)
        for _ in range(offset):
            state, _ = system.step(fixed, state, key)
        out = []
        for _ in range(horizon - offset):
            state, loss = system.step(th, state, key)
            out.append(loss)
        return jnp.stack(out)

    return jax.jacrev(losses)(theta)


def expected_sum(system, theta, *, num_groups, truncation_length, stagger, num_updates):
    """E[sum of estimates] for an unbiased estimator, from the per-step gradients.

    Group g starts at phase `offset_g` of its first episode (its stagger offset), with
    the state at that phase burned in at theta and held fixed: the first episode's
    steps contribute the gradients of its remaining losses with that state fixed.
    After that, its episodes have the full horizon, and each inner step at episode
    time tau contributes the gradient of the tau-th loss of a fresh episode. The
    systems this is used on ignore their keys.
    """
    horizon = system.horizon
    per_step = jax.jacrev(lambda th: optax_pes.unroll(system, th))(theta)
    offsets = stagger_offsets(num_groups, horizon, truncation_length, stagger)
    counts = np.zeros(horizon)
    total = jax.tree.map(lambda g: np.zeros(g.shape[1:]), per_step)
    for offset in offsets:
        first = horizon - int(offset)
        steps = num_updates * truncation_length
        if offset:
            burned = _burned_in_per_step(system, theta, int(offset))
            taken = min(steps, first)
            scored = jax.tree.map(
                lambda g, n=taken: np.asarray(g[:n], np.float64), burned
            )
            total = jax.tree.map(lambda t, g: t + g.sum(0), total, scored)
        for step in range(steps):
            if step < first and not offset:
                counts[step] += 1
            elif step >= first:
                counts[(step - first) % horizon] += 1
    fresh = jax.tree.map(
        lambda g: np.tensordot(counts, np.asarray(g, np.float64), axes=1), per_step
    )
    return jax.tree.map(lambda a, b: (a + b) / num_groups, fresh, total)


def max_z_score(samples, expected):
    """Largest |mean - expected| / standard error over all coordinates."""
    flat_samples = np.concatenate(
        [s.reshape(s.shape[0], -1) for s in jax.tree.leaves(samples)], axis=1
    )
    flat_expected = np.concatenate([np.ravel(e) for e in jax.tree.leaves(expected)])
    mean = flat_samples.mean(0)
    stderr = flat_samples.std(0, ddof=1) / np.sqrt(flat_samples.shape[0])
    scale = np.abs(flat_expected).max()
    stderr = np.maximum(stderr, 1e-9 * scale + 1e-300)  # tbptt has zero variance
    return float(np.max(np.abs(mean - flat_expected) / stderr))


def counting_jit(fn):
    """`jax.jit(fn)` and a list that grows by one every time `fn` is traced."""
    traces = []

    def counted(*args):
        traces.append(None)
        return fn(*args)

    return jax.jit(counted), traces


def avals(tree):
    """Structure, then shape, dtype and weak type of every leaf (keys included)."""
    return jax.tree.structure(tree), [jax.typeof(x) for x in jax.tree.leaves(tree)]
