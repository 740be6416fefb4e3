"""The contract every estimator transformation honours (DESIGN.md section 2).

In the manner of optax's `contrib/_common_test.py`, each factory (`pes`, `nres`,
`truncated_es`, `full_es`, `tbptt`) runs through the same checks: jit, unknown keyword
arguments, no recompilation, optax wrappers (`chain`, `MultiSteps`, `apply_if_finite`,
`inject_hyperparams`), float32 and float64, stable state under `lax.cond`,
convergence inside `lax.scan`, the estimate added to the incoming updates, a clear
error without params, readable diagnostics and determinism given the key.

The system has a dict theta of several shapes and an inner state with a float array
and an int32 step counter. Besides the five plain configurations, staggered particles
on a horizon that is not a multiple of K (episodes ending inside windows) run the
core checks. XLA compilation dominates the run time, so the checks that only call
`update` share one jitted `tx.update` per configuration (`_jitted`).
"""

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes
from optax_pes._es._config import stagger_offsets

from .helpers import avals, counting_jit, slow

SHAPES = {"a": (3,), "b": (2, 2), "c": ()}
TARGET = {
    "a": np.array([0.5, -0.5, 1.0]),
    "b": np.array([[0.2, -0.3], [0.4, 0.1]]),
    "c": np.array(0.3),
}
HORIZON = 6
K = 2
NUM_PARTICLES = 4
SIGMA = 0.1


def _offset(theta):
    return jax.tree.map(lambda p, t: p - jnp.asarray(t, p.dtype), theta, TARGET)


def _system(horizon):
    """Linear dynamics driven by `theta - TARGET`, quadratic losses.

    Every loss is zero at `theta = TARGET` (the state stays at zero there) and positive
    elsewhere, so `TARGET` is the optimum and a fixed point of every estimator, biased
    or not. `init` depends on theta; the int32 `step` counts the episode's steps.
    """

    def init(theta, key):
        del key
        return {"x": 0.5 * _offset(theta)["a"][:2], "step": jnp.zeros((), jnp.int32)}

    def step(theta, state, key):
        del key
        d = _offset(theta)
        x = 0.5 * state["x"] + jnp.sum(d["b"], axis=1) + d["a"][1:] + d["c"]
        loss = jnp.sum(x**2) + sum(jnp.sum(v**2) for v in jax.tree.leaves(d))
        return {"x": x, "step": state["step"] + 1}, loss

    return optax_pes.UnrolledSystem(init, step, horizon)


class Config(NamedTuple):
    name: str
    horizon: int = HORIZON
    stagger: bool = False


BASE = ["pes", "nres", "truncated_es", "full_es", "tbptt"]
ES = ["pes", "nres", "truncated_es", "full_es"]
BASE_CONFIGS = [pytest.param(Config(name), id=name) for name in BASE]
# Staggered, and T = 7 is not a multiple of K = 2: episodes end inside windows.
VARIANT_CONFIGS = [
    pytest.param(Config(name, 7, True), id=f"{name}-stagger-T7")
    for name in ["pes", "nres", "truncated_es", "tbptt"]
]
CONFIGS = BASE_CONFIGS + VARIANT_CONFIGS
ES_CONFIGS = [p for p in CONFIGS if p.values[0].name != "tbptt"]


def _make(config, key=0):
    system = _system(config.horizon)
    if config.name == "full_es":
        return optax_pes.full_es(
            system, num_particles=NUM_PARTICLES, sigma=SIGMA, key=key
        )
    if config.name == "tbptt":
        # num_particles defaults to 1; staggering needs several trajectories.
        extra = dict(num_particles=2, stagger=True) if config.stagger else {}
        return optax_pes.tbptt(system, truncation_length=K, key=key, **extra)
    factory = getattr(optax_pes, config.name)
    return factory(
        system,
        num_particles=NUM_PARTICLES,
        sigma=SIGMA,
        truncation_length=K,
        key=key,
        stagger=config.stagger,
    )


def _window(config):
    """Inner steps per update."""
    return config.horizon if config.name == "full_es" else K


def _offsets(config):
    """Each group's phase at the first update (its stagger offset)."""
    groups = NUM_PARTICLES // (1 if config.name == "tbptt" else 2)
    if config.name == "tbptt":
        groups = 2 if config.stagger else 1
    return stagger_offsets(groups, config.horizon, _window(config), config.stagger)


def _first_losses(config, params):
    """The losses of every group's first window, unperturbed (run op by op): a
    staggered group's window starts at its offset, burned in from the episode's
    start."""
    system = _system(config.horizon)
    losses = []
    for offset in _offsets(config):
        state = system.init(params, None)
        for t in range(int(offset) + _window(config)):
            state, loss = system.step(params, state, None)
            if t >= offset:
                losses.append(float(loss))
    return losses


@functools.cache
def _jitted(config):
    """A transformation, its jitted `update` and trace count, shared by the tests."""
    tx = _make(config)
    update, traces = counting_jit(tx.update)
    return tx, update, traces


def _params(dtype=jnp.float32):
    return {k: jnp.zeros(shape, dtype) for k, shape in SHAPES.items()}


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _numeric(tree):
    """Typed PRNG keys replaced by their raw data, for comparisons."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x

    return jax.tree.map(leaf, tree)


def _pairs(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return zip(jax.tree.leaves(_numeric(a)), jax.tree.leaves(_numeric(b)), strict=True)


def _assert_trees_equal(a, b):
    for x, y in _pairs(a, b):
        np.testing.assert_array_equal(x, y)


def _assert_trees_close(actual, desired):
    for x, y in _pairs(actual, desired):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _differ(a, b):
    return any(np.any(x != y) for x, y in _pairs(a, b))


def _assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(leaf))


# --------------------------------------------------------------- jit, kwargs ------


@pytest.mark.parametrize("config", CONFIGS)
def test_jit_update_keeps_params_structure(config):
    tx, update, _ = _jitted(config)
    params = _params()
    state = tx.init(params)
    updates, new_state = update(_zeros(params), state, params)
    assert avals(updates) == avals(params)
    _assert_finite(updates)
    assert any(np.any(u != 0) for u in jax.tree.leaves(updates))
    # The state keeps its structure, shapes and dtypes (weak types included).
    assert avals(new_state) == avals(state)
    # The int32 step counter is carried: every particle took one window of steps
    # from its group's phase (its stagger offset; no episode ends in this window).
    step = new_state.inner_state["step"]
    assert step.dtype == jnp.int32
    expected = _offsets(config) + _window(config)
    np.testing.assert_array_equal(step, np.tile(expected, step.size // expected.size))


@pytest.mark.parametrize("config", CONFIGS)
def test_eager_updates_compile_once(config, monkeypatch):
    """Called outside jit, an update compiles its window once, not on every call
    (an eager lax.scan re-traces its body each time)."""
    traces = []
    base = _system(config.horizon)

    def counted_step(theta, state, key):
        traces.append(None)
        return base.step(theta, state, key)

    counted = optax_pes.UnrolledSystem(base.init, counted_step, base.horizon)
    monkeypatch.setattr(f"{__name__}._system", lambda horizon: counted)
    tx = _make(config)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_zeros(params), state, params)
    seen = len(traces)
    for _ in range(2):
        again, state = tx.update(_zeros(params), state, params)
    assert len(traces) == seen
    assert avals(again) == avals(updates)
    # Eager bad params are still refused before anything runs.
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    with pytest.raises(ValueError, match="params must be finite"):
        tx.update(_zeros(params), state, bad)


@pytest.mark.parametrize("config", CONFIGS)
def test_unexpected_keyword_arguments_accepted(config):
    tx = _make(config)
    params = _params()
    state = tx.init(params)
    update = functools.partial(tx.update, foo=1, batch=jnp.ones((5, 2)))
    updates, new_state = jax.eval_shape(update, _zeros(params), state, params)
    assert avals(updates) == avals(params)
    assert avals(new_state) == avals(state)
    # optax.chain hands every extra argument to every member.
    chain = optax.chain(tx, optax.adam(1e-2))
    updates, _ = jax.eval_shape(
        functools.partial(chain.update, foo=1, batch=jnp.ones((5, 2))),
        _zeros(params),
        chain.init(params),
        params,
    )
    assert avals(updates) == avals(params)


@pytest.mark.parametrize("config", CONFIGS)
def test_no_recompilation_on_second_update(config):
    tx, update, traces = _jitted(config)
    params = _params()
    updates, state = update(_zeros(params), tx.init(params), params)
    seen = len(traces)
    assert seen >= 1
    params = optax.apply_updates(params, jax.tree.map(lambda u: -1e-3 * u, updates))
    for _ in range(2):
        _, state = update(_zeros(params), state, params)
    assert len(traces) == seen


@pytest.mark.parametrize("config", CONFIGS)
def test_params_required(config):
    tx = _make(config)
    params = _params()
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(_zeros(params), state)
    with pytest.raises(ValueError, match="params"):
        tx.update(_zeros(params), state, None)
    with pytest.raises(ValueError, match="params"):
        jax.jit(tx.update)(_zeros(params), state)
    chain = optax.chain(tx, optax.adam(1e-2))
    with pytest.raises(ValueError, match="params"):
        chain.update(_zeros(params), chain.init(params))


# --------------------------------------------------------------- the estimate -----


@pytest.mark.parametrize("config", CONFIGS)
def test_estimate_is_added_to_updates(config):
    tx, update, _ = _jitted(config)
    params = _params()
    state = tx.init(params)
    from_zeros, state_zeros = update(_zeros(params), state, params)
    ones = jax.tree.map(jnp.ones_like, params)
    from_ones, state_ones = update(ones, state, params)
    _assert_trees_close(from_ones, jax.tree.map(lambda z: z + 1, from_zeros))
    _assert_trees_equal(state_zeros, state_ones)


@pytest.mark.parametrize(
    "config", VARIANT_CONFIGS + [BASE_CONFIGS[BASE.index("full_es")]]
)
def test_strict_dtype_promotion(config):
    # No implicit promotion inside the estimators (Equinox and Optimistix test
    # theirs under "strict"): windows with resets inside them, staggering, and the
    # float32 episode totals and int32 counters of the diagnostics. (optax.adam
    # itself does not run under "strict": its bias correction mixes int and float.)
    with jax.numpy_dtype_promotion("strict"):
        tx = _make(config)
        params = _params()
        state = tx.init(params)
        for _ in range(4):
            updates, state = jax.jit(tx.update)(_zeros(params), state, params)
        _assert_finite(updates)


@pytest.mark.parametrize("config", CONFIGS)
def test_diagnostics_readable_from_state(config):
    tx, update, _ = _jitted(config)
    params = _params()
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    for count in (1, 2):
        updates, state = update(_zeros(params), state, params)
        assert state.count.dtype == jnp.int32 and int(state.count) == count
        diagnostics = state.diagnostics
        for field, dtype in [
            ("mean_loss", jnp.float32),
            ("estimate_norm", jnp.float32),
            ("num_resets", jnp.int32),
            ("num_nonfinite", jnp.int32),
        ]:
            value = getattr(diagnostics, field)
            assert value.shape == () and value.dtype == dtype, field
            assert np.isfinite(value), field
        assert int(diagnostics.num_nonfinite) == 0
        assert float(diagnostics.mean_loss) > 0
        np.testing.assert_allclose(
            diagnostics.estimate_norm, optax.tree.norm(updates), rtol=1e-5
        )
        if count == 1:
            # The unstaggered particles start their first episode in the first
            # window, at theta; staggered ones were burned in to their offsets.
            assert int(diagnostics.num_resets) > 0
            expected = np.mean(_first_losses(config, params))
            # Perturbed particles' losses are a little higher on a convex loss.
            rtol = 1e-5 if config.name == "tbptt" else 0.1
            np.testing.assert_allclose(diagnostics.mean_loss, expected, rtol=rtol)


@pytest.mark.parametrize("config", CONFIGS)
def test_same_key_same_estimate(config):
    _, update, _ = _jitted(config)
    params = _params()

    def first_update(key):
        return update(_zeros(params), _make(config, key=key).init(params), params)

    estimate, state = first_update(0)
    again, _ = first_update(0)
    typed, _ = first_update(jax.random.key(0))
    _assert_trees_equal(estimate, again)
    _assert_trees_equal(estimate, typed)
    # The key is split at every update.
    old_key = _make(config).init(params).rng_key
    assert np.any(jax.random.key_data(state.rng_key) != jax.random.key_data(old_key))


@pytest.mark.parametrize("config", ES_CONFIGS)
def test_different_key_different_estimate(config):
    _, update, _ = _jitted(config)
    params = _params()

    def first_update(key):
        return update(_zeros(params), _make(config, key=key).init(params), params)

    estimate, state = first_update(0)
    other, _ = first_update(1)
    assert _differ(estimate, other)
    # Fresh noise at the next update too.
    second, _ = update(_zeros(params), state, params)
    assert _differ(estimate, second)


# --------------------------------------------------------------- float64 ---------


@pytest.mark.parametrize("config", BASE_CONFIGS)
def test_float64_kept_and_state_survives_lax_cond(config, x64):
    # float32 is checked by the shared tests above; its state goes through the
    # `lax.cond` of `apply_if_finite` in the wrappers' test below.
    tx = _make(config)
    params = _params(jnp.float64)
    state = tx.init(params)
    for leaf in jax.tree.leaves(state.noise):
        assert leaf.dtype == jnp.float64

    def update_if(pred, updates, state, params):
        return jax.lax.cond(
            pred, lambda: tx.update(updates, state, params), lambda: (updates, state)
        )

    update_if, traces = counting_jit(update_if)
    updates, new_state = update_if(True, _zeros(params), state, params)
    assert avals(updates) == avals(params)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float64
    _assert_finite(updates)
    assert avals(new_state) == avals(state)
    assert int(new_state.count) == 1
    kept_updates, kept = update_if(False, updates, new_state, params)
    _assert_trees_equal(kept, new_state)
    _assert_trees_equal(kept_updates, updates)
    updates, _ = update_if(True, _zeros(params), new_state, params)
    _assert_finite(updates)
    assert len(traces) == 1


# --------------------------------------------------------------- optax wrappers ---


def _injected(name, system):
    """`optax.inject_hyperparams` of the factory `name` on `system`, sigma injected
    (TBPTT has none) and every structural argument static."""
    kwargs = dict(system=system, key=0)
    if name != "tbptt":
        kwargs.update(num_particles=NUM_PARTICLES, sigma=SIGMA)
    static_args = ["system", "key", "num_particles"]
    if name != "full_es":
        kwargs["truncation_length"] = K
        static_args += ["truncation_length", "stagger"]
    factory = optax.inject_hyperparams(
        getattr(optax_pes, name), static_args=static_args
    )
    return factory(**kwargs)


@pytest.mark.parametrize("name", ES)
def test_inject_hyperparams(name):
    config = Config(name)
    tx, update, _ = _jitted(config)
    injected = _injected(name, _system(HORIZON))
    inject_update, traces = counting_jit(injected.update)
    params = _params()
    zeros = _zeros(params)

    # The same updates and estimator state as the plain transformation.
    expected, expected_state = update(zeros, tx.init(params), params)
    state = injected.init(params)
    got, new_state = inject_update(zeros, state, params)
    _assert_trees_close(got, expected)
    _assert_trees_close(new_state.inner_state, expected_state)

    # sigma is read from the state: changing it needs no recompilation.
    def with_sigma(state, sigma):
        dtype = state.hyperparams["sigma"].dtype
        hyperparams = {**state.hyperparams, "sigma": jnp.asarray(sigma, dtype)}
        return state._replace(hyperparams=hyperparams)

    other, _ = inject_update(zeros, with_sigma(state, 2 * SIGMA), params)
    assert _differ(got, other)
    # Between updates too (nres reads it when an episode starts, the others now).
    updates, new_state = inject_update(zeros, with_sigma(new_state, 2 * SIGMA), params)
    _assert_finite(updates)
    np.testing.assert_allclose(new_state.hyperparams["sigma"], 2 * SIGMA, rtol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize("name", BASE)
# (A system holding arrays compiles once in test_tasks.py too; here with `-m slow`.)
@pytest.mark.parametrize("partial", [False, slow(True)], ids=["closure", "eqx.Partial"])
def test_eager_inject_hyperparams_compiles_once(name, partial):
    """Called outside jit, `inject_hyperparams` builds the estimator anew on every
    update (its factory runs each time): the window still compiles once, and a
    changed sigma is an argument of that program, not a new one."""
    traces = []
    base = _system(HORIZON)

    def counted_step(theta, state, key):
        traces.append(None)
        return base.step(theta, state, key)

    if partial:  # a step holding an array: the system cannot be hashed

        def scaled_step(scale, theta, state, key):
            state, loss = counted_step(theta, state, key)
            return state, scale * loss

        step = eqx.Partial(scaled_step, jnp.asarray(1.0))
    else:
        step = counted_step
    injected = _injected(name, optax_pes.UnrolledSystem(base.init, step, base.horizon))
    params = _params()
    zeros = _zeros(params)
    state = injected.init(params)
    first, state = injected.update(zeros, state, params)
    seen = len(traces)
    for scale in (2, 3):
        if name != "tbptt":
            sigma = jnp.asarray(scale * SIGMA, state.hyperparams["sigma"].dtype)
            state = state._replace(hyperparams={**state.hyperparams, "sigma": sigma})
        updates, state = injected.update(zeros, state, params)
        _assert_finite(updates)
    assert len(traces) == seen
    # The eager updates are the jitted ones.
    jitted = jax.jit(injected.update)
    again, _ = jitted(zeros, injected.init(params), params)
    _assert_trees_close(again, first)


def test_a_shared_eager_program_checks_nothing_of_the_other_sigma():
    """Estimators that share an eager program may differ in sigma: the program
    checks the state's form, which sigma does not change, and not the first
    estimator's sigma against the second's params (1e-6 is refused for float16)."""
    system = optax_pes.UnrolledSystem(
        init=lambda theta, key: jnp.zeros((), theta.dtype),
        step=lambda theta, s, key: (s + 1, jnp.sum((theta - 1.0) ** 2)),
        horizon=4,
    )
    kwargs = dict(num_particles=2, truncation_length=2, key=0)
    first = optax_pes.pes(system, sigma=1e-6, **kwargs)
    theta = jnp.ones(2, jnp.float32)
    first.update(jnp.zeros(2), first.init(theta), theta)
    second = optax_pes.pes(system, sigma=0.1, **kwargs)
    theta = jnp.ones(2, jnp.float16)
    updates, _ = second.update(jnp.zeros(2, jnp.float16), second.init(theta), theta)
    _assert_finite(updates)


@pytest.mark.parametrize("name", ES)
def test_eager_update_is_the_jitted_one_bit_for_bit(name):
    """A number sigma is part of the eager program, as it is of a jitted one: the
    same bits (as an argument, XLA could not fold it, and results moved by an ulp)."""
    tx = _make(Config(name))
    params = _params()
    state = tx.init(params)
    eager, _ = tx.update(_zeros(params), state, params)
    jitted, _ = jax.jit(tx.update)(_zeros(params), state, params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config", BASE_CONFIGS)
def test_converges_inside_scan_and_optax_wrappers(config):
    """`chain` in `MultiSteps` in `apply_if_finite`, run by `lax.scan`, converges.

    One compilation per estimator covers the wrappers: `MultiSteps` emits every second
    mini-step, `apply_if_finite` rejects a NaN update (its `lax.cond` keeps the
    float32 estimator state) and SGD on the estimates reaches the optimum.
    """
    # SGD: adam's normalisation keeps noisy estimates hovering around the optimum.
    chain = optax.chain(_make(config), optax.sgd(0.02 / _window(config)))
    tx = optax.apply_if_finite(
        optax.MultiSteps(chain, every_k_schedule=2), max_consecutive_errors=3
    )
    num_steps, nan_step = 401, 5
    fills = np.zeros(num_steps, np.float32)
    fills[nan_step] = np.nan  # the incoming update of one step is NaN

    @jax.jit
    def train(params, state, fills):
        def body(carry, fill):
            params, state = carry
            incoming = jax.tree.map(lambda p: jnp.full_like(p, fill), params)
            updates, state = tx.update(incoming, state, params)
            count = state.inner_state.inner_opt_state[0].count
            params = optax.apply_updates(params, updates)
            return (params, state), (updates, count)

        return jax.lax.scan(body, (params, state), fills)

    params = _params()
    (final, state), (updates, counts) = train(params, tx.init(params), fills)

    # The estimator state advances on emitting steps only: 1, 3, then 6, as step 5's
    # NaN is rejected before MultiSteps sees it; other steps update nothing.
    np.testing.assert_array_equal(counts[:8], [0, 1, 1, 2, 2, 2, 3, 3])
    assert int(counts[-1]) == (num_steps - 1) // 2
    assert int(state.total_notfinite) == 1
    idle = np.concatenate([[True], np.diff(counts) == 0])
    for leaf in jax.tree.leaves(updates):
        _assert_finite(leaf)
        np.testing.assert_array_equal(leaf[idle], 0)
    for leaf in jax.tree.leaves(_offset(final)):
        np.testing.assert_allclose(leaf, 0, atol=0.1)


@pytest.mark.parametrize("config", CONFIGS)
def test_tree_map_params_over_a_chain(config):
    # How users build sharding specs for optimizer states from parameter specs.
    tx = optax.chain(_make(config), optax.adam(1e-2))
    theta = _params()
    state = tx.init(theta)
    specs = optax.tree_utils.tree_map_params(
        tx, lambda p: "param", state, transform_non_params=lambda _: "other"
    )
    adam_mu = specs[1][0].mu
    assert jax.tree.leaves(adam_mu) == ["param"] * len(jax.tree.leaves(theta))
    assert specs[0].count == "other" and specs[0].inner_state == "other"
