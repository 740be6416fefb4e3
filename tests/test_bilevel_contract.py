"""The optax contract of `shine_bilevel` (DESIGN.md section 2), as `test_contract.py`
checks it for the estimators: unknown keyword arguments accepted, one trace under
`jit`, inside `optax.chain`, `optax.MultiSteps` and `optax.inject_hyperparams` (with
static args), float32 and float64 kept, state dtypes stable under `lax.cond`, the
estimate added to the incoming updates, and `params` required.

The problem is a tiny ridge regression with pytrees on both levels: weights
`{"a": (4,), "b": ()}` and hyperparameters `{"log_lam": (4,), "log_mu": ()}`.
Compilation dominates, so the float32 checks share one jitted `update` per method.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes

from .helpers import avals, counting_jit, slow

METHODS = ["shine", "shine_opa", "shine_refine", "implicit", "jacobian_free"]
# The slowest contract checks run SHINE and the implicit method (the two backward
# solves) by default and the three others with `-m slow`.
METHODS_TIMED = [m if m in ("shine", "implicit") else slow(m, id=m) for m in METHODS]
STRUCTURAL = ["inner_max_steps", "opa_every", "refine_steps", "implicit_max_steps"]
SETTINGS = dict(inner_tol=1e-4, inner_max_steps=20, opa_every=2, refine_steps=2)


def _losses(dtype):
    """Fresh inner and outer losses on data of `dtype`."""
    rng = np.random.RandomState(0)
    x_train, x_val = rng.randn(12, 4), rng.randn(8, 4)
    w_true = rng.randn(4)
    y_train = x_train @ w_true + 0.1 * rng.randn(12) + 0.5
    y_val = x_val @ w_true + 0.1 * rng.randn(8) + 0.5
    x_train, y_train, x_val, y_val = (
        jnp.asarray(a, dtype) for a in (x_train, y_train, x_val, y_val)
    )

    def inner_loss(w, h):
        r = x_train @ w["a"] + w["b"] - y_train
        penalty = jnp.sum(jnp.exp(h["log_lam"]) * w["a"] ** 2)
        return 0.5 * (jnp.mean(r**2) + penalty + jnp.exp(h["log_mu"]) * w["b"] ** 2)

    def outer_loss(w, h):
        del h
        return 0.5 * jnp.mean((x_val @ w["a"] + w["b"] - y_val) ** 2)

    return inner_loss, outer_loss


def _params(dtype=jnp.float32):
    return {"log_lam": jnp.full(4, -1.0, dtype), "log_mu": jnp.asarray(-2.0, dtype)}


def _inner_init(dtype=jnp.float32):
    return {"a": jnp.zeros(4, dtype), "b": jnp.zeros((), dtype)}


def _make(method, dtype=jnp.float32, **kwargs):
    inner_loss, outer_loss = _losses(dtype)
    return optax_pes.shine_bilevel(
        inner_loss,
        outer_loss,
        inner_init=_inner_init(dtype),
        method=method,
        **(SETTINGS | kwargs),
    )


@functools.cache
def _jitted(method):
    """A float32 transformation, its jitted `update` and trace count."""
    tx = _make(method)
    update, traces = counting_jit(tx.update)
    return tx, update, traces


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(leaf))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_trees_close(actual, desired, rtol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------ jit, kwargs ----


@pytest.mark.parametrize("method", METHODS_TIMED)
def test_jit_one_trace_and_the_estimate_added(method):
    tx, update, traces = _jitted(method)
    params = _params()
    state = tx.init(params)
    updates, new_state = update(_zeros(params), state, params)
    assert avals(updates) == avals(params)
    assert avals(new_state) == avals(state)
    _assert_finite(updates)
    assert float(new_state.hypergrad_norm) > 0 and int(new_state.count) == 1
    # New values (params, incoming updates, a warm state): no new trace.
    params = jax.tree.map(lambda p: p + 0.1, params)
    ones = jax.tree.map(jnp.ones_like, params)
    from_ones, _ = update(ones, new_state, params)
    from_zeros, second = update(_zeros(params), new_state, params)
    assert int(second.count) == 2
    assert len(traces) == 1
    _assert_trees_close(from_ones, jax.tree.map(lambda z: z + 1, from_zeros))


@pytest.mark.parametrize("method", ["shine", "shine_opa"])
def test_unexpected_keyword_arguments_accepted(method):
    tx = _make(method)
    params = _params()
    extra = dict(foo=1, batch=jnp.ones((5, 2)), value=jnp.asarray(0.0))
    update = functools.partial(tx.update, **extra)
    updates, new_state = jax.eval_shape(update, _zeros(params), tx.init(params), params)
    assert avals(updates) == avals(params)
    # optax.chain hands every extra argument to every member.
    chain = optax.chain(tx, optax.adam(1e-2))
    updates, _ = jax.eval_shape(
        functools.partial(chain.update, **extra),
        _zeros(params),
        chain.init(params),
        params,
    )
    assert avals(updates) == avals(params)


def test_params_required():
    tx = _make("shine")
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


# ------------------------------------------------------------------ dtypes ---------


def _check_dtype_and_lax_cond(method, dtype):
    tx = _make(method, dtype)
    params = _params(dtype)
    state = tx.init(params)

    def update_if(pred, updates, state, params):
        return jax.lax.cond(
            pred, lambda: tx.update(updates, state, params), lambda: (updates, state)
        )

    update_if, traces = counting_jit(update_if)
    updates, new_state = update_if(True, _zeros(params), state, params)
    assert avals(updates) == avals(params)
    assert avals(new_state) == avals(state)
    for leaf in jax.tree.leaves((updates, new_state.inner_params)):
        assert leaf.dtype == dtype
    for field, field_dtype in [
        ("count", jnp.int32),
        ("inner_steps", jnp.int32),
        ("inner_grad_norm", jnp.float32),
        ("inner_converged", jnp.bool_),
        ("hypergrad_norm", jnp.float32),
        ("backward_converged", jnp.bool_),
    ]:
        value = getattr(new_state, field)
        assert value.shape == () and value.dtype == field_dtype, field
    _assert_finite(updates)
    assert int(new_state.count) == 1 and int(new_state.inner_steps) > 0
    kept_updates, kept = update_if(False, updates, new_state, params)
    _assert_trees_equal(kept, new_state)
    _assert_trees_equal(kept_updates, updates)
    updates, _ = update_if(True, _zeros(params), new_state, params)
    _assert_finite(updates)
    assert len(traces) == 1


@pytest.mark.parametrize("method", ["shine_opa", "implicit"])
def test_float32_kept_and_state_survives_lax_cond(method):
    _check_dtype_and_lax_cond(method, jnp.float32)


@pytest.mark.parametrize("method", ["shine_opa", "implicit"])
def test_float64_kept_and_state_survives_lax_cond(method, x64):
    _check_dtype_and_lax_cond(method, jnp.float64)


# ------------------------------------------------------------------ optax wrappers -


def test_chain_in_multisteps_inside_scan():
    """`MultiSteps` calls the transformation on every mini-step and keeps its state
    on emitting ones only (every second one): its count advances then, and the
    other steps update nothing."""
    tx = optax.MultiSteps(
        optax.chain(_make("shine"), optax.adam(0.1)), every_k_schedule=2
    )
    params = _params()

    @jax.jit
    def train(params, state):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(_zeros(params), state, params)
            count = state.inner_opt_state[0].count
            return (optax.apply_updates(params, updates), state), (updates, count)

        return jax.lax.scan(body, (params, state), length=6)

    (final, state), (updates, counts) = train(params, tx.init(params))
    np.testing.assert_array_equal(counts, [0, 1, 1, 2, 2, 3])
    idle = np.asarray([True, False, True, False, True, False])
    for leaf in jax.tree.leaves(updates):
        _assert_finite(leaf)
        np.testing.assert_array_equal(leaf[idle], 0)
        assert np.all(np.any(leaf[~idle] != 0, axis=tuple(range(1, leaf.ndim))))
    _assert_finite(final)


def test_inject_hyperparams_with_static_args():
    """Tolerances are injected (traced), structural arguments go in `static_args`:
    the same result as the plain transformation, and a new tolerance needs no new
    trace."""
    inner_loss, outer_loss = _losses(jnp.float32)
    static = ["inner_loss", "outer_loss", "inner_init", *STRUCTURAL]
    factory = optax.inject_hyperparams(optax_pes.shine_bilevel, static_args=static)
    injected = factory(
        inner_loss,
        outer_loss,
        inner_init=_inner_init(),
        method="shine_refine",
        **SETTINGS,
    )
    params = _params()
    state = injected.init(params)
    assert set(state.hyperparams) == {"inner_tol", "implicit_tol"}
    update, traces = counting_jit(injected.update)
    got, new_state = update(_zeros(params), state, params)
    _, plain_update, _ = _jitted("shine_refine")
    tx = _jitted("shine_refine")[0]
    expected, expected_state = plain_update(_zeros(params), tx.init(params), params)
    _assert_trees_close(got, expected, rtol=1e-5)
    assert int(new_state.inner_state.inner_steps) == int(expected_state.inner_steps)

    # A looser tolerance from the state: fewer inner steps, the same trace.
    hyperparams = {**state.hyperparams, "inner_tol": jnp.asarray(0.1, jnp.float32)}
    _, loose = update(_zeros(params), state._replace(hyperparams=hyperparams), params)
    assert int(loose.inner_state.inner_steps) < int(new_state.inner_state.inner_steps)
    assert len(traces) == 1


@pytest.mark.parametrize("injected", [False, True], ids=["plain", "injected"])
def test_eager_updates_compile_once(injected):
    """Called outside jit (a plain optax loop), an update traces the losses once,
    not on every call; under `inject_hyperparams`, which builds the transformation
    anew on every update, a changed tolerance is an argument, not a new program."""
    traces = []
    inner, outer_loss = _losses(jnp.float32)

    def inner_loss(w, h):
        traces.append(None)
        return inner(w, h)

    kwargs = dict(inner_init=_inner_init(), method="shine_refine", **SETTINGS)
    if injected:
        static = ["inner_loss", "outer_loss", "inner_init", *STRUCTURAL]
        factory = optax.inject_hyperparams(optax_pes.shine_bilevel, static_args=static)
        tx = factory(inner_loss, outer_loss, **kwargs)
    else:
        tx = optax_pes.shine_bilevel(inner_loss, outer_loss, **kwargs)
    params = _params()
    state = tx.init(params)
    first, state = tx.update(_zeros(params), state, params)
    seen = len(traces)
    for tol in (1e-3, 1e-5):
        if injected:
            tol = jnp.asarray(tol, jnp.float32)
            state = state._replace(hyperparams={**state.hyperparams, "inner_tol": tol})
        updates, state = tx.update(_zeros(params), state, params)
        _assert_finite(updates)
    assert len(traces) == seen
    # The eager update is the jitted one.
    again, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    _assert_trees_close(first, again, rtol=1e-5)


def test_eager_update_takes_what_an_op_by_op_update_took():
    """Called eagerly, the update runs compiled, yet takes the keyword arguments an
    op-by-op update took: a float read in Python, a NumPy integer slice bound, and an
    unhashable dataclass (which then runs op by op)."""
    import dataclasses
    import math

    x, y = jnp.ones((8, 3)), jnp.arange(8.0) % 2

    @dataclasses.dataclass
    class Config:
        reg: float

    def inner(w, lam, reg, n, config):
        penalty = math.exp(math.log(reg)) * config.reg * jnp.exp(lam) * jnp.sum(w**2)
        return jnp.mean((x[:n] @ w - y[:n]) ** 2) + (penalty if reg > 0 else 0.0)

    def outer(w, lam, reg, n, config):
        return jnp.mean((x[:4] @ w - y[:4]) ** 2)

    tx = optax_pes.shine_bilevel(
        inner, outer, inner_init=jnp.zeros(3), loss_kwargs=("reg", "n", "config")
    )
    lam = jnp.array(0.0)
    kwargs = dict(reg=1.0, n=np.int64(6), config=Config(1.0))
    updates, _ = tx.update(jnp.zeros(()), tx.init(lam), lam, **kwargs)
    _assert_finite(updates)


def test_inject_hyperparams_without_static_structural_args_says_so():
    inner_loss, outer_loss = _losses(jnp.float32)
    factory = optax.inject_hyperparams(
        optax_pes.shine_bilevel,
        static_args=["inner_loss", "outer_loss", "inner_init"],
    )
    injected = factory(inner_loss, outer_loss, inner_init=_inner_init())
    with pytest.raises(TypeError, match="inner_max_steps.*static_args"):
        injected.init(_params())


def test_tree_map_params_over_a_chain():
    # How users build sharding specs for optimizer states from parameter specs.
    tx = optax.chain(_make("shine"), optax.adam(1e-2))
    lam = _params()
    state = tx.init(lam)
    specs = optax.tree_utils.tree_map_params(
        tx, lambda p: "param", state, transform_non_params=lambda _: "other"
    )
    assert jax.tree.leaves(specs[1][0].mu) == ["param"] * len(jax.tree.leaves(lam))
    assert specs[0].count == "other"


# ------------------------------------------------------------------ non-finite ----


def test_an_implicit_solve_stopped_short_is_reported():
    """`"implicit"`'s CG stopped by `implicit_max_steps` above `implicit_tol` gave
    its last iterate as the exact reference without a word: `backward_converged`
    says so, as `inner_converged` does for the inner solve. (The hypergradient is
    still added: finite, as inexact as its solve.)"""
    params = _params()
    for steps, converged in [(1, False), (50, True)]:
        tx = _make("implicit", implicit_max_steps=steps, implicit_tol=1e-5)
        _, state = tx.update(_zeros(params), tx.init(params), params)
        assert bool(state.backward_converged) is converged, steps
        assert np.isfinite(float(state.hypergrad_norm))
    # A method with no tolerance (a fixed number of steps, or none) has converged.
    tx = _make("shine_refine", refine_steps=1)
    _, state = tx.update(_zeros(params), tx.init(params), params)
    assert bool(state.backward_converged)


@pytest.mark.parametrize("method", METHODS_TIMED)
def test_a_non_finite_hypergradient_never_reaches_the_updates(method):
    """An outer loss that is inf at the solution (a held-out log-loss of 0 * log 0,
    say) gives a non-finite hypergradient: the update adds nothing, the warm start
    is kept finite, and `hypergrad_norm` says what happened."""
    inner_loss, outer_loss = _losses(jnp.float32)

    def bad_outer(w, h):
        return outer_loss(w, h) / jnp.where(h["log_mu"] > -3.0, 0.0, 1.0)

    tx = optax_pes.shine_bilevel(
        inner_loss, bad_outer, inner_init=_inner_init(), method=method, **SETTINGS
    )
    params = _params()
    incoming = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(incoming, tx.init(params), params)
    _assert_trees_equal(updates, incoming)
    _assert_finite(state.inner_params)
    assert not np.isfinite(float(state.hypergrad_norm))
    # The next update with a finite outer loss starts from the kept warm start.
    ok = {"log_lam": params["log_lam"], "log_mu": jnp.asarray(-4.0)}
    updates, state = jax.jit(tx.update)(_zeros(ok), state, ok)
    _assert_finite(updates)
    assert np.isfinite(float(state.hypergrad_norm))


@pytest.mark.parametrize("method", METHODS_TIMED)
def test_a_non_finite_inner_loss_never_reaches_the_updates(method):
    """An inner loss that is NaN in value (a log of a negative hyperparameter) but
    whose gradient in w is finite: the line search rejects every step. Before, the
    solve spun to inner_max_steps without moving and the hypergradient at the stale
    warm start was added, eagerly and under jit."""
    inner_loss, outer_loss = _losses(jnp.float32)

    def bad_inner(w, h):
        return inner_loss(w, h) + jnp.log(h["log_mu"] + 5.0)

    tx = optax_pes.shine_bilevel(
        bad_inner, outer_loss, inner_init=_inner_init(), method=method, **SETTINGS
    )
    bad = {"log_lam": _params()["log_lam"], "log_mu": jnp.asarray(-6.0)}
    incoming = jax.tree.map(jnp.ones_like, bad)
    for update in (tx.update, jax.jit(tx.update)):
        updates, state = update(incoming, tx.init(bad), bad)
        _assert_trees_equal(updates, incoming)
        _assert_trees_equal(state.inner_params, _inner_init())
        assert not np.isfinite(float(state.hypergrad_norm))


def test_non_finite_hyperparameters():
    """Eagerly an error naming the leaf; under `jit` contained as above (every
    quantity of the update is then NaN, the kept warm start is the previous one)."""
    tx = _make("shine")
    params = _params()
    state = tx.init(params)
    bad = {"log_lam": params["log_lam"].at[2].set(jnp.nan), "log_mu": params["log_mu"]}
    with pytest.raises(ValueError, match=r"params .*finite.*\['log_lam'\]"):
        tx.update(_zeros(bad), state, bad)
    updates, new_state = jax.jit(tx.update)(_zeros(bad), state, bad)
    _assert_trees_equal(updates, _zeros(bad))
    _assert_trees_equal(new_state.inner_params, state.inner_params)
    assert not np.isfinite(float(new_state.hypergrad_norm))


@pytest.mark.parametrize("bad", [float("nan"), slow(float("inf")), slow(-1e-3)])
@pytest.mark.parametrize("name", ["inner_tol", "implicit_tol"])
def test_an_unusable_traced_tolerance_adds_nothing(name, bad):
    """An injected tolerance that is not positive and finite cannot raise under
    jit: a NaN inner_tol skipped the solve and added the hypergradient of the
    unsolved warm start; a NaN implicit_tol stopped CG at v = 0. Now nothing is
    added, the warm start is kept and hypergrad_norm is not finite."""
    inner_loss, outer_loss = _losses(jnp.float32)
    static = ["inner_loss", "outer_loss", "inner_init", *STRUCTURAL]
    factory = optax.inject_hyperparams(optax_pes.shine_bilevel, static_args=static)
    injected = factory(
        inner_loss, outer_loss, inner_init=_inner_init(), method="implicit", **SETTINGS
    )
    params = _params()
    state = injected.init(params)
    state.hyperparams[name] = jnp.asarray(bad, jnp.float32)
    incoming = jax.tree.map(jnp.ones_like, params)
    updates, new_state = jax.jit(injected.update)(incoming, state, params)
    _assert_trees_equal(updates, incoming)
    _assert_trees_equal(new_state.inner_state.inner_params, _inner_init())
    assert not np.isfinite(float(new_state.inner_state.hypergrad_norm))
    if name == "inner_tol":  # the skipped solve is not reported as converged
        assert not bool(new_state.inner_state.inner_converged)
    else:  # nor the skipped backward solve (an inf tolerance passed any residual)
        assert not bool(new_state.inner_state.backward_converged)


def test_a_tolerance_schedule_may_reach_zero():
    """A decreasing schedule may end at 0 (or underflow to it): the solve then runs
    to inner_max_steps, and the hypergradient is added, eagerly and under jit."""
    params = _params()
    tx = _make("implicit", inner_tol=optax.linear_schedule(1e-3, 0.0, 1))
    state = tx.init(params)
    for update in (tx.update, jax.jit(tx.update)):
        updates, new_state = update(_zeros(params), state._replace(count=5), params)
        _assert_finite(updates)
        assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
        assert int(new_state.inner_steps) == SETTINGS["inner_max_steps"]


def test_a_large_finite_hypergradient_is_added(x64):
    """The finiteness check is leaf by leaf: a float32 norm of a 1e30 float64
    hypergradient would overflow and drop it."""
    inner_loss, outer_loss = _losses(jnp.float64)
    tx = optax_pes.shine_bilevel(
        inner_loss,
        lambda w, h: 1e30 * outer_loss(w, h),
        inner_init=_inner_init(jnp.float64),
        method="implicit",
        **SETTINGS,
    )
    params = _params(jnp.float64)
    updates, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    leaves = [np.asarray(u) for u in jax.tree.leaves(updates)]
    assert all(np.all(np.isfinite(u)) for u in leaves)
    assert max(np.abs(u).max() for u in leaves) > 1e25


@pytest.mark.parametrize("method", ["implicit", slow("shine_refine")])
def test_an_outer_gradient_whose_norm_overflows_keeps_its_implicit_term(method):
    """float32, the outer loss times 1e25: |outer gradient| overflows, the linear
    solve's tolerance `tol * |outer gradient|` was inf, and CG stopped at y = 0: the
    hypergradient lost its implicit term, here all of it (0, silently); refinement's
    CG overflowed its inner products and fell back to SHINE's estimate, silently. The
    solve is linear in the outer gradient: the estimate must be 1e25 times the
    unscaled one."""
    inner_loss, outer_loss = _losses(jnp.float32)

    def update(scale):
        tx = optax_pes.shine_bilevel(
            inner_loss,
            lambda w, h: scale * outer_loss(w, h),
            inner_init=_inner_init(),
            method=method,
            **SETTINGS,
        )
        params = _params()
        return jax.jit(tx.update)(_zeros(params), tx.init(params), params)[0]

    plain, scaled = update(1.0), update(1e25)
    for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a) / 1e25, b, rtol=1e-4, atol=1e-9)


def test_a_schedule_of_inner_tol_is_checked():
    """Eagerly a schedule's bad value is an error naming inner_tol; under jit it is
    contained as above."""
    params = _params()
    for value in (jnp.nan, -1.0):
        tx = _make("shine", inner_tol=lambda count, v=value: v * jnp.ones(()))
        with pytest.raises(ValueError, match="inner_tol must be a float >= 0"):
            tx.update(_zeros(params), tx.init(params), params)
        updates, state = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
        _assert_trees_equal(updates, _zeros(params))
        assert not np.isfinite(float(state.hypergrad_norm))
    tx = _make("shine", inner_tol=lambda count: jnp.ones(3))
    with pytest.raises(ValueError, match="inner_tol.*scalar"):
        jax.jit(tx.update)(_zeros(params), tx.init(params), params)


def test_strict_dtype_promotion():
    # No implicit promotion in the inner L-BFGS solve, OPA's extra pairs and the
    # hypergradient (optax.lbfgs included), as Equinox and Optimistix test theirs.
    with jax.numpy_dtype_promotion("strict"):
        tx = _make("shine_opa", **SETTINGS)
        params = _params()
        updates, state = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    _assert_finite(updates)
    assert bool(state.inner_converged)
