"""Bad input: clear errors naming the argument; non-finite windows are contained."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

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
    # A list of Python numbers is named as such (it read "float with dtype None").
    with pytest.raises(TypeError, match=r"\[0\] is a Python float, not an array"):
        tx.init([0.5, 0.5])
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.zeros(2), state)


def _inject_pes(sigma=0.1):
    inject = optax.inject_hyperparams(
        optax_pes.pes,
        static_args=("system", "key", "num_particles", "truncation_length", "stagger"),
    )
    return inject(system=_system(), **_kwargs(sigma=sigma))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_traced_bad_sigma_skips_the_window_and_counts_it(sigma):
    # Under jit a traced sigma cannot raise a readable error: the window's estimate
    # is left out (zero), every particle is counted and restarts.
    tx = _inject_pes()
    theta = jnp.array([0.3, -0.2])
    state = tx.init(theta)
    state.hyperparams["sigma"] = jnp.asarray(sigma)
    update = jax.jit(tx.update)
    estimate, state = update(jnp.zeros(2), state, theta)
    np.testing.assert_array_equal(estimate, np.zeros(2))
    assert int(state.inner_state.diagnostics.num_nonfinite) == 4
    for leaf in jax.tree.leaves(state.inner_state.noise):
        assert np.all(np.isfinite(leaf))
    state.hyperparams["sigma"] = jnp.asarray(0.1)  # the state is still usable
    estimate, state = update(jnp.zeros(2), state, theta)
    assert np.all(np.isfinite(estimate)) and np.any(estimate != 0)
    assert int(state.inner_state.diagnostics.num_nonfinite) == 0


@pytest.mark.parametrize("make", ES + [optax_pes.full_es])
@pytest.mark.parametrize("sigma", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_sigma_as_an_array_is_refused_by_the_factory(make, sigma):
    kwargs = _kwargs(sigma=jnp.asarray(sigma))
    if make is optax_pes.full_es:
        del kwargs["truncation_length"]
    with pytest.raises(ValueError, match="sigma must be a positive"):
        make(_system(), **kwargs)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        make(_system(), **(kwargs | dict(sigma=np.float32(sigma))))


def test_schedule_reaching_zero_never_gives_a_nonfinite_update():
    tx = optax.chain(
        optax.inject_hyperparams(
            optax_pes.pes,
            static_args=("system", "key", "num_particles", "truncation_length"),
        )(
            system=_system(),
            **_kwargs(sigma=optax.linear_schedule(0.1, 0.0, 3)),
        ),
        optax.sgd(0.1),
    )
    theta = jnp.array([0.3, -0.2])
    state = tx.init(theta)
    update = jax.jit(tx.update)
    for _ in range(6):
        updates, state = update(jnp.zeros(2), state, theta)
        theta = optax.apply_updates(theta, updates)
        assert np.all(np.isfinite(theta))
    # Eagerly, the factory sees the schedule's concrete 0 and says so.
    with pytest.raises(ValueError, match="sigma must be a positive"):
        for _ in range(6):
            updates, state = tx.update(jnp.zeros(2), state, theta)


def _huge_loss_system():
    """Finite losses near float32's largest value: their weighted sum overflows."""

    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, 1e37 * (1.0 + jnp.sum(theta))

    return optax_pes.UnrolledSystem(init, step, 4)


@pytest.mark.parametrize("make", ES)
def test_overflowing_estimate_is_excluded_and_counted(make):
    tx = make(_huge_loss_system(), **_kwargs(num_particles=8, sigma=0.5))
    theta = jnp.array([0.5, 0.5])
    estimate, state = jax.jit(tx.update)(jnp.zeros(2), tx.init(theta), theta)
    assert np.all(np.isfinite(estimate))
    assert int(state.diagnostics.num_nonfinite) > 0
    for leaf in jax.tree.leaves(state.noise):
        assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("make", ES + [optax_pes.tbptt])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_params_are_refused_eagerly_and_counted_under_jit(make, bad):
    kwargs = _kwargs()
    if make is optax_pes.tbptt:
        kwargs = dict(truncation_length=2, key=0, num_particles=4)
    tx = make(_system(), **kwargs)
    theta = jnp.array([0.0, bad])
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="params must be finite"):
        tx.update(jnp.zeros(2), state, theta)
    estimate, state = jax.jit(tx.update)(jnp.zeros(2), state, theta)
    assert np.all(np.isfinite(estimate))
    assert int(state.diagnostics.num_nonfinite) == 4


def test_inject_hyperparams_without_static_args_names_them():
    tx = optax.inject_hyperparams(optax_pes.pes)(system=_system(), **_kwargs())
    with pytest.raises(TypeError, match="static_args") as info:
        tx.init(jnp.zeros(2))
    assert "truncation_length" in str(info.value)


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


def _adversarial_system(horizon, rate, bad_value):
    """Emits `bad_value` as the loss at random steps and particles (the draw uses
    the step's key, which an antithetic pair shares), counting its emissions."""

    def init(theta, key):
        return jnp.zeros(2), jnp.zeros((), jnp.int32)

    def step(theta, state, key):
        s, emitted = state
        s = 0.5 * s + theta
        bad = jax.random.uniform(key) < rate
        loss = jnp.where(bad, bad_value, jnp.sum(s**2))
        return (s, emitted + bad.astype(jnp.int32)), loss

    return optax_pes.UnrolledSystem(init, step, horizon)


def _check_adversarial_losses(
    name, windows, truncation_length, sync, rate, bad_value, stagger
):
    horizon = windows * truncation_length + (0 if sync else 1)
    system = _adversarial_system(horizon, rate, bad_value)
    kwargs = dict(num_particles=8, sigma=0.3, truncation_length=truncation_length)
    kwargs.update(key=windows, stagger=stagger)
    if name == "full_es":
        del kwargs["truncation_length"], kwargs["stagger"]
    if name == "tbptt":
        del kwargs["sigma"]
    tx = getattr(optax_pes, name)(system, **kwargs)
    theta = jnp.array([0.3, -0.2])
    update = jax.jit(tx.update)
    state = tx.init(theta)
    for _ in range(4):
        before = state
        estimate, state = update(jnp.zeros(2), state, theta)
        assert np.all(np.isfinite(estimate))
        count = int(state.diagnostics.num_nonfinite)
        assert 0 <= count <= 8
        k = horizon if name == "full_es" else truncation_length
        if name == "truncated_es" or horizon % k or not np.isinf(abs(bad_value)):
            # Truncated ES keeps only its centres' states, a mid-window reset loses
            # the emissions before it, and a huge finite loss is dropped only when
            # its contribution overflows: the update is finite, the count bounded.
            continue
        # Exactly the particles that emitted a non-finite loss are counted.
        needs_init = np.asarray(before.needs_init)
        emitted = np.asarray(state.inner_state[1])
        started = np.tile(needs_init, emitted.size // needs_init.size)
        previous = np.where(started, 0, np.asarray(before.inner_state[1]))
        assert count == int(np.sum(emitted > previous))
    for leaf in jax.tree.leaves(state.noise):
        assert np.all(np.isfinite(leaf))


ADVERSARIAL = given(
    name=st.sampled_from(["pes", "nres", "truncated_es", "full_es", "tbptt"]),
    windows=st.integers(1, 3),
    truncation_length=st.integers(1, 4),
    sync=st.booleans(),
    rate=st.sampled_from([0.05, 0.3, 1.0]),
    bad_value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38]),
    stagger=st.booleans(),
)


# Five examples by default (about 4 s each, mostly compiling); 80 with `-m slow`.
@settings(max_examples=5, deadline=None, derandomize=True)
@ADVERSARIAL
def test_adversarial_losses_never_reach_the_update(**kwargs):
    _check_adversarial_losses(**kwargs)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, derandomize=True)
@ADVERSARIAL
def test_adversarial_losses_never_reach_the_update_many(**kwargs):
    _check_adversarial_losses(**kwargs)


# ------------------------------------------- non-finite values under jit (audit) ----


def _flat_loss_system(horizon=6):
    """A loss that does not carry a NaN theta through (an accuracy, a clipped
    reward): the window's losses stay finite whatever theta is."""

    def init(theta, key):
        return jnp.zeros(())

    def step(theta, s, key):
        return s, jnp.where(theta[0] > 0, 1.0, 0.0) + jnp.clip(theta[1], -1.0, 1.0)

    return optax_pes.UnrolledSystem(init, step, horizon)


@pytest.mark.parametrize("make", ES + [optax_pes.full_es, optax_pes.tbptt])
def test_non_finite_params_under_jit_are_counted_not_estimated(make):
    kwargs = _kwargs()
    if make is optax_pes.full_es:
        del kwargs["truncation_length"]
    if make is optax_pes.tbptt:
        kwargs = dict(truncation_length=2, key=0, num_particles=4)
    tx = make(_flat_loss_system(), **kwargs)
    theta = jnp.array([jnp.nan, 0.3])
    state = tx.init(jnp.array([0.1, 0.3]))
    estimate, state = jax.jit(tx.update)(jnp.zeros(2), state, theta)
    np.testing.assert_array_equal(estimate, np.zeros(2))
    assert int(state.diagnostics.num_nonfinite) == 4


def test_ask_tell_with_non_finite_params_under_jit_is_counted():
    at = optax_pes.ask_tell("pes", num_particles=4, sigma=0.1, key=0)
    theta = jnp.array([jnp.nan, 0.3])
    state = at.init(jnp.array([0.1, 0.3]))
    losses, ended = jnp.ones(4), jnp.zeros(4, bool)
    estimate, state = jax.jit(at.tell)(state, theta, losses, ended)
    np.testing.assert_array_equal(estimate, np.zeros(2))
    assert int(state.diagnostics.num_nonfinite) == 4


def test_updates_narrower_than_the_estimate_are_refused():
    # A float16 `updates` for float32 params would cast a finite estimate to inf
    # (a 2e5 estimate overflows float16) after every finiteness check.
    theta = jnp.array([0.3, -0.2])
    tx = optax_pes.pes(_system(), **_kwargs())
    with pytest.raises(TypeError, match=r"updates.*float16.*float32"):
        tx.update(jnp.zeros(2, jnp.float16), tx.init(theta), theta)


def _make(name, **overrides):
    if name == "tbptt":
        return optax_pes.tbptt(_system(), truncation_length=2, key=0)
    kwargs = _kwargs(**overrides)
    if name == "full_es":
        del kwargs["truncation_length"]
    return getattr(optax_pes, name)(_system(), **kwargs)


@pytest.mark.parametrize(
    "made_by, used_by, match",
    [
        (("pes", {}), ("pes", dict(num_particles=8)), r"state\.inner_state is"),
        (("nres", {}), ("pes", {}), "state.noise is a NRESNoise, expected a PESNoise"),
        (("pes", {}), ("nres", {}), "state.noise is a PESNoise, expected a NRESNoise"),
        (("truncated_es", {}), ("pes", {}), "state.noise is a NoNoise"),
        (("pes", {}), ("truncated_es", {}), r"state\.(noise|inner_state)"),
        (("tbptt", {}), ("pes", {}), "state.noise is a NoNoise"),
        (("pes", {}), ("tbptt", {}), r"state\.(noise|inner_state)"),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_a_state_of_another_transformation_is_refused(made_by, used_by, match, jit):
    # Before: a cryptic broadcasting TypeError or an AttributeError from deep inside
    # the window (or, for tbptt, a wrong answer), not an error naming `state`.
    theta = jnp.array([0.3, -0.2])
    state = _make(made_by[0], **made_by[1]).init(theta)
    tx = _make(used_by[0], **used_by[1])
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=f"state does not belong to this.*{match}"):
        update(jnp.zeros(2), state, theta)
    update(jnp.zeros(2), tx.init(theta), theta)  # its own state is fine


def test_a_state_for_other_params_is_refused():
    tx = _make("pes")
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"state\.noise\.score is float32\[2, 2\]"):
        tx.update(jnp.zeros(1), state, jnp.zeros(1))  # the system broadcasts it
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match=r"float32\[4, 2\], expected float64"):
            tx.update(jnp.zeros(2, jnp.float64), state, jnp.zeros(2, jnp.float64))


def test_ask_tell_refuses_another_state():
    pes_like = optax_pes.ask_tell(
        num_particles=4, sigma=0.1, truncation_length=2, key=0
    )
    theta = jnp.array([0.3, -0.2])
    state = optax_pes.ask_tell(
        num_particles=8, sigma=0.1, truncation_length=2, key=0
    ).init(theta)
    with pytest.raises(ValueError, match=r"state\.remaining is int32\[4\], expected"):
        pes_like.ask(state, theta)
    with pytest.raises(ValueError, match="state does not belong"):
        pes_like.tell(state, theta, jnp.ones(4), jnp.zeros(4, bool))


@pytest.mark.parametrize("make", ES + [optax_pes.full_es])
def test_sigma_that_underflows_thetas_dtype_is_refused_at_init(make):
    # 1e-40 is a float32 subnormal: every score overflowed, every window was dropped
    # and the estimate was silently zero.
    kwargs = _kwargs(sigma=1e-40)
    if make is optax_pes.full_es:
        del kwargs["truncation_length"]
    tx = make(_system(), **kwargs)
    with pytest.raises(ValueError, match=r"sigma must be a normal number.*float32"):
        tx.init(jnp.array([0.3, -0.2]))
    with jax.enable_x64(True):  # float64 represents it
        tx.init(jnp.zeros(2, jnp.float64))


def test_sigma_below_thetas_resolution_warns():
    # theta + eps rounds to theta: with antithetic pairs the estimate is exactly zero.
    theta = jnp.array([1000.0, 0.0])
    tx = optax_pes.pes(_system(), **_kwargs(sigma=1e-6))
    with pytest.warns(RuntimeWarning, match="sigma=1e-06 is below the float32 spacing"):
        tx.init(theta)
    # Attributed to the user's line, through optax's chain and a jax trace too.
    chained = optax.chain(tx, optax.sgd(1.0))
    traced = lambda: jax.eval_shape(lambda: chained.init(theta))  # noqa: E731
    for call in (lambda: chained.init(theta), traced):
        with pytest.warns(RuntimeWarning, match="below the float32 spacing") as record:
            call()
        assert [r.filename for r in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optax_pes.pes(_system(), **_kwargs(sigma=1e-3)).init(theta)


def test_sigma_below_one_leafs_resolution_warns():
    # Before: the check read the flattened theta's dtype (float32 here), so a
    # bfloat16 leaf whose perturbations all rounded away raised no warning.
    system = optax_pes.UnrolledSystem(
        init=lambda theta, key: jnp.zeros(()),
        step=lambda theta, s, key: (
            s,
            jnp.sum(theta["a"].astype(jnp.float32) ** 2) + jnp.sum(theta["b"] ** 2),
        ),
        horizon=4,
    )
    theta = {"a": jnp.array([3.0], jnp.bfloat16), "b": jnp.array([3.0])}
    tx = optax_pes.pes(system, num_particles=4, sigma=1e-3, truncation_length=2, key=0)
    with pytest.warns(RuntimeWarning, match=r"below the bfloat16 spacing .*\['a'\]"):
        tx.init(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.init({"a": theta["b"], "b": theta["b"]})  # float32 resolves 1e-3 at 3


def test_init_inside_a_trace_of_concrete_params():
    # jax.eval_shape / jax.jit of a function closing over concrete params (to size
    # a restore target, say). Before: the sigma check's float() of a jnp max that
    # the trace had staged raised a ConcretizationTypeError.
    theta = jnp.array([0.3, -0.2])
    tx = optax_pes.pes(_system(), **_kwargs())
    expected = jax.eval_shape(tx.init, theta)
    for traced in (
        jax.eval_shape(lambda: tx.init(theta)),
        jax.jit(lambda: tx.init(theta))(),
    ):
        assert jax.tree.structure(traced) == jax.tree.structure(expected)
    with pytest.warns(RuntimeWarning, match="below the float32 spacing"):
        jax.eval_shape(
            lambda: optax_pes.pes(_system(), **_kwargs(sigma=1e-9)).init(theta)
        )


def test_params_with_nothing_to_perturb():
    # Before: "zero-size array to reduction operation max" from inside the update.
    tx = optax_pes.pes(_system(), **_kwargs())
    with pytest.raises(ValueError, match="params must hold at least one number"):
        tx.init({"a": jnp.zeros(0)})


@pytest.mark.parametrize("make", ES + [optax_pes.full_es])
def test_a_bfloat16_sigma_is_a_float(make):
    # bfloat16 is not an np.number, so a bfloat16 sigma (an injected hyperparameter
    # of a bfloat16 model) was refused as "not a positive float scalar".
    kwargs = _kwargs(sigma=jnp.asarray(0.1, jnp.bfloat16))
    if make is optax_pes.full_es:
        del kwargs["truncation_length"]
    tx = make(_system(), **kwargs)
    theta = jnp.ones(2)
    estimate, _ = tx.update(jnp.zeros(2), tx.init(theta), theta)
    assert np.all(np.isfinite(estimate))
