"""SHINE hypergradients on l2-regularised logistic regression (breast-cancer data)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_breast_cancer

import optax_pes

from .helpers import slow

METHODS = ["shine", "shine_opa", "shine_refine", "implicit", "jacobian_free"]

# Every test in float64: switching jax_enable_x64 back and forth around the same
# functions can trip JAX's abstract-evaluation caches (float32/float64 mismatches
# inside the VJP), a test-harness artefact rather than a library behaviour.
pytestmark = pytest.mark.usefixtures("x64")


def _data():
    """Half for training, half held out (standardised with the training half's
    statistics): the held-out loss then has an interior minimum, near lambda = -5.4."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.float64)
    n = len(y) // 2
    x = (x - x[:n].mean(0)) / x[:n].std(0)
    return (x[:n], y[:n]), (x[n:], y[n:])


def _log_loss(w, x, y):
    z = x @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


(X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL) = _data()


def inner_loss(w, lam):
    return _log_loss(w, X_TRAIN, Y_TRAIN) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def outer_loss(w, lam):
    return _log_loss(w, X_VAL, Y_VAL)


def newton_solution(lam):
    def newton_step(_, w):
        hess = jax.hessian(inner_loss)(w, lam)
        return w - jnp.linalg.solve(hess, jax.grad(inner_loss)(w, lam))

    # A loop, not 30 unrolled Hessians: compiled once per shape, in about a second
    # (run eagerly, the unrolled version took ~9 s per call, compiling op by op).
    return jax.lax.fori_loop(0, 30, newton_step, jnp.zeros(X_TRAIN.shape[1]))


@jax.jit
def exact_hypergradient(lam):
    """Dense reference: grad_h g - (d_h grad_w f)^T H^-1 grad_w g at w*."""
    w = newton_solution(lam)
    v = jnp.linalg.solve(jax.hessian(inner_loss)(w, lam), jax.grad(outer_loss)(w, lam))
    mixed = jax.jacobian(lambda h: jax.grad(inner_loss)(w, h))(lam)
    return jax.grad(outer_loss, argnums=1)(w, lam) - jnp.tensordot(v, mixed, axes=1)


@functools.cache
def _bilevel(method, dtype, **kwargs):
    """`(tx, jax.jit(tx.update))`, one per method, dtype and settings:
    hyperparameters of the same shape reuse the compiled update."""
    tx = optax_pes.shine_bilevel(
        inner_loss,
        outer_loss,
        inner_init=jnp.zeros(X_TRAIN.shape[1], dtype),
        method=method,
        inner_tol=1e-8,
        inner_max_steps=500,
        **kwargs,
    )
    return tx, jax.jit(tx.update)


def hypergradient(lam, method, **kwargs):
    tx, update = _bilevel(method, jnp.zeros(()).dtype.name, **kwargs)
    estimate, state = update(jnp.zeros_like(lam), tx.init(lam), lam)
    assert bool(state.inner_converged)
    return estimate


def cosine(a, b):
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


PER_FEATURE = [jnp.full(30, -2.0), jnp.linspace(-4.0, 0.0, 30)]


def test_per_feature_hypergradients_match_the_exact_one(x64):
    bounds = {"implicit": 0.9999, "shine_refine": 0.999, "shine": 0.9, "shine_opa": 0.9}
    cosines = {m: [] for m in bounds}
    for lam in PER_FEATURE:
        exact = exact_hypergradient(lam)
        for method, bound in bounds.items():
            c = cosine(hypergradient(lam, method), exact)
            assert c > bound, (method, c)
            cosines[method].append(c)
    # Outer-problem awareness puts curvature where the hypergradient needs it.
    assert np.mean(cosines["shine_opa"]) > np.mean(cosines["shine"])


@pytest.mark.parametrize(
    "method, rtol",
    [("implicit", 1e-6), ("shine_refine", 1e-4), ("shine", 0.2), ("shine_opa", 0.1)],
)
def test_scalar_hypergradient_relative_error(method, rtol, x64):
    lam = jnp.asarray(-3.0)
    exact = exact_hypergradient(lam)
    np.testing.assert_allclose(hypergradient(lam, method), exact, rtol=rtol)


def _grid_minimum():
    lams = np.linspace(-10.0, 2.0, 241)
    solve = jax.jit(jax.vmap(newton_solution))
    losses = jax.vmap(outer_loss)(solve(jnp.asarray(lams)), jnp.asarray(lams))
    return float(jnp.min(losses))


# SHINE in the default suite; the other methods (about 12 s each on CPU) with
# `-m slow`.
@pytest.mark.parametrize(
    "method",
    ["shine"] + [slow(m) for m in ("shine_opa", "shine_refine", "implicit")],
)
def test_hyperparameter_optimisation_reaches_the_grid_minimum(method, x64):
    tx = optax.chain(
        optax_pes.shine_bilevel(
            inner_loss,
            outer_loss,
            inner_init=jnp.zeros(30),
            method=method,
            inner_tol=optax.exponential_decay(1e-3, 1, 0.9, end_value=1e-8),
            inner_max_steps=200,
        ),
        optax.adam(0.1),
    )
    lam = jnp.asarray(0.0)
    state = tx.init(lam)

    @jax.jit
    def run(lam, state):
        def body(carry, _):
            lam, state = carry
            updates, state = tx.update(jnp.zeros(()), state, lam)
            return (optax.apply_updates(lam, updates), state), None

        return jax.lax.scan(body, (lam, state), None, length=150)[0]

    lam, state = run(lam, state)
    held_out = float(outer_loss(newton_solution(lam), lam))
    assert held_out < _grid_minimum() + 1e-3


def test_extra_arguments_reach_both_losses(x64):
    def inner(w, lam, *, x, y):
        return _log_loss(w, x, y) + 0.5 * jnp.exp(lam) * jnp.sum(w**2)

    def outer(w, lam, *, x, y):
        return _log_loss(w, X_VAL, Y_VAL) + 0.0 * jnp.sum(x)

    tx = optax_pes.shine_bilevel(
        inner,
        outer,
        inner_init=jnp.zeros(30),
        inner_tol=1e-8,
        method="implicit",
        loss_kwargs=("x", "y"),
    )
    lam = jnp.asarray(-3.0)
    estimate, _ = tx.update(jnp.zeros(()), tx.init(lam), lam, x=X_TRAIN, y=Y_TRAIN)
    np.testing.assert_allclose(estimate, exact_hypergradient(lam), rtol=1e-6)


def test_only_the_named_extra_arguments_reach_the_losses(x64):
    # optax.chain hands every extra argument to every member: an optax.lbfgs later
    # in the chain wants value=, which the losses must not receive.
    seen = []

    def inner(w, lam, **kwargs):
        seen.append(sorted(kwargs))
        return inner_loss(w, lam) + 0.0 * jnp.sum(kwargs["x"])

    def outer(w, lam, **kwargs):
        seen.append(sorted(kwargs))
        return outer_loss(w, lam)

    tx = optax_pes.shine_bilevel(
        inner, outer, inner_init=jnp.zeros(30), inner_tol=1e-8, loss_kwargs=["x"]
    )
    lam = jnp.asarray(-3.0)
    estimate, _ = tx.update(
        jnp.zeros(()), tx.init(lam), lam, x=X_TRAIN, value=1.0, batch=None
    )
    assert seen and all(names == ["x"] for names in seen)
    assert np.isfinite(float(estimate))
    # Without loss_kwargs, no extra argument reaches them.
    seen.clear()
    plain = optax_pes.shine_bilevel(
        inner_loss,
        lambda w, lam, **kw: seen.append(kw) or outer_loss(w, lam),
        inner_init=jnp.zeros(30),
    )
    plain.update(jnp.zeros(()), plain.init(lam), lam, x=X_TRAIN, value=1.0)
    assert seen and all(kw == {} for kw in seen)


def test_a_named_extra_argument_missing_at_update_is_an_error():
    tx = optax_pes.shine_bilevel(
        inner_loss, outer_loss, inner_init=jnp.zeros(30), loss_kwargs=("x", "y")
    )
    lam = jnp.asarray(-3.0)
    with pytest.raises(ValueError, match="loss_kwargs names 'y'.*got no y="):
        tx.update(jnp.zeros(()), tx.init(lam), lam, x=X_TRAIN)
    with pytest.raises(TypeError, match="loss_kwargs must be a sequence"):
        optax_pes.shine_bilevel(
            inner_loss, outer_loss, inner_init=jnp.zeros(30), loss_kwargs="x"
        )


@pytest.mark.parametrize("method", [slow("implicit"), "shine_refine"])
def test_linear_solves_do_not_depend_on_the_inner_losss_scale(method):
    # Scaling the inner loss by c leaves the hypergradient as it is. Before: in
    # float32, lineax's CG took a step longer than 1 / (100 eps d) for a breakdown
    # (NaN), so at c = 1e-4 "implicit" added nothing and "shine_refine" silently
    # returned plain SHINE's estimate.
    rng = np.random.RandomState(0)
    x, y, xv, yv = (
        jnp.asarray(a, jnp.float32)
        for a in (rng.randn(20, 5), rng.randn(20), rng.randn(20, 5), rng.randn(20))
    )

    def outer(w, h):
        return 0.5 * jnp.mean((xv @ w - yv) ** 2)

    def exact(h):  # the closed-form ridge solution's validation loss (float64)
        x64, y64, xv64, yv64 = (a.astype(jnp.float64) for a in (x, y, xv, yv))
        a = x64.T @ x64 / 20 + jnp.exp(h) * jnp.eye(5)
        w = jnp.linalg.solve(a, x64.T @ y64 / 20)
        return 0.5 * jnp.mean((xv64 @ w - yv64) ** 2)

    h = jnp.asarray(-1.0, jnp.float32)  # float32 throughout (this module is x64)
    for c in (1.0, 1e-4, 1e-6):

        def inner(w, h, c=c):
            ridge = 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(h) * w @ w
            return c * ridge

        tx = optax_pes.shine_bilevel(
            inner,
            outer,
            inner_init=jnp.zeros(5, jnp.float32),
            method=method,
            inner_tol=c * 1e-5,
            inner_max_steps=200,
        )
        update, state = jax.jit(tx.update)(jnp.zeros_like(h), tx.init(h), h)
        assert update.dtype == jnp.float32
        np.testing.assert_allclose(
            update, jax.grad(exact)(h.astype(jnp.float64)), rtol=1e-4, err_msg=c
        )
        assert np.isfinite(state.hypergrad_norm)


def test_implicit_on_a_wide_float32_ridge():
    # 10 samples, 2000 features, a penalty of 0.01, float32: lineax's CG called
    # curvature below 100 eps d (0.024 here) a breakdown, and "implicit" added
    # 26.8 where the hypergradient is 4.5e-7, silently.
    rng = np.random.RandomState(0)
    x, y, xv, yv = (
        jnp.asarray(a, jnp.float32)
        for a in (
            rng.randn(10, 2000),
            rng.randn(10),
            rng.randn(10, 2000),
            rng.randn(10),
        )
    )

    def inner(w, h):
        return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(h) * w @ w

    def outer(w, h):
        return 0.5 * jnp.mean((xv @ w - yv) ** 2)

    h = jnp.asarray(-4.6, jnp.float32)  # a penalty of 0.01
    tx = optax_pes.shine_bilevel(
        inner,
        outer,
        inner_init=jnp.zeros(2000, jnp.float32),
        method="implicit",
        inner_tol=1e-5,
    )
    update, state = jax.jit(tx.update)(jnp.zeros_like(h), tx.init(h), h)
    # The exact hypergradient at the returned w: -(d/dh grad_w f)^T H^-1 grad_w g.
    w = np.asarray(state.inner_params, np.float64)
    xd, xvd = np.asarray(x, np.float64), np.asarray(xv, np.float64)
    hessian = xd.T @ xd / 10 + np.exp(-4.6) * np.eye(2000)
    v = np.linalg.solve(hessian, xvd.T @ (xvd @ w - np.asarray(yv, np.float64)) / 10)
    # (float32 CG on a condition number of ~2e4: 1.6e-2 relative, measured.)
    np.testing.assert_allclose(update, -(np.exp(-4.6) * w) @ v, rtol=5e-2)


def test_float32_weights_with_a_float64_inner_loss():
    # (This module runs with x64.) Before: the L-BFGS loop carried the float64 value
    # of the loss, then the float32 one optax's line search stored, and lax's
    # while_loop refused the changed carry type.
    x = jnp.asarray(np.random.RandomState(0).randn(20, 5))  # float64

    def inner(w, h):
        return 0.5 * jnp.mean((x @ w - 1.0) ** 2) + 0.5 * jnp.exp(h) * w @ w

    tx = optax_pes.shine_bilevel(
        inner, lambda w, h: w @ w, inner_init=jnp.zeros(5, jnp.float32)
    )
    h = jnp.asarray(-1.0, jnp.float32)
    update, state = tx.update(jnp.zeros_like(h), tx.init(h), h)
    assert state.inner_params.dtype == jnp.float32
    assert bool(state.inner_converged) and np.isfinite(float(update))


@pytest.mark.parametrize("method", ["shine", "shine_refine", "implicit"])
def test_weights_of_zero_size(method):
    # Before: "zero-size array to reduction operation max" from the linear solves.
    tx = optax_pes.shine_bilevel(
        lambda w, h: jnp.sum(w**2) + h**2,
        lambda w, h: jnp.sum(w) + 3.0 * h,
        inner_init=jnp.zeros(0),
        method=method,
    )
    h = jnp.asarray(0.5)
    update, _ = tx.update(jnp.zeros_like(h), tx.init(h), h)
    np.testing.assert_allclose(update, 3.0)  # the outer loss's own derivative


def test_a_large_finite_hypergradient_has_a_finite_norm():
    # Before: hypergrad_norm squared in float32 and read inf, which the docs give as
    # the sign of an update left out, though this one was added.
    tx = optax_pes.shine_bilevel(
        lambda w, h: jnp.sum((w - 1.0) ** 2),
        lambda w, h: jnp.sum(1e30 * h),
        inner_init=jnp.zeros(2, jnp.float32),
    )
    h = jnp.ones(3, jnp.float32)
    update, state = tx.update(jnp.zeros_like(h), tx.init(h), h)
    np.testing.assert_array_equal(update, np.full(3, 1e30, np.float32))
    np.testing.assert_allclose(state.hypergrad_norm, np.sqrt(3) * 1e30, rtol=1e-6)


def test_inner_solve_hitting_max_steps_is_reported():
    tx = optax_pes.shine_bilevel(
        inner_loss, outer_loss, inner_init=jnp.zeros(30), inner_max_steps=2
    )
    lam = jnp.asarray(-3.0)
    estimate, state = tx.update(jnp.zeros(()), tx.init(lam), lam)
    assert not bool(state.inner_converged)
    assert int(state.inner_steps) == 2 and np.isfinite(float(state.inner_grad_norm))
    assert np.isfinite(float(estimate))


def test_warm_start_and_no_recompilation(x64):
    tx = optax_pes.shine_bilevel(inner_loss, outer_loss, inner_init=jnp.zeros(30))
    lam = jnp.asarray(-3.0)
    traces = []

    @jax.jit
    def update(state, lam):
        traces.append(1)
        return tx.update(jnp.zeros(()), state, lam)

    _, state = update(tx.init(lam), lam)
    first = int(state.inner_steps)
    _, state = update(state, lam + 0.01)
    assert int(state.inner_steps) < first  # warm-started from the last solution
    assert len(traces) == 1
    assert state.count == 2 and state.hypergrad_norm > 0


def _loss_returning(out):
    return lambda w, lam: out


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="newton"), ValueError, "method must be one of"),
        (dict(inner_max_steps=0), ValueError, "inner_max_steps must be an int >= 1"),
        (dict(inner_tol=0.0), ValueError, "inner_tol must be a positive float"),
        (dict(inner_init=jnp.zeros(3, jnp.int32)), TypeError, "inner_init must be"),
        (dict(inner_optimizer=optax.adam(1e-2)), ValueError, "scale_by_lbfgs"),
    ],
)
def test_bad_factory_arguments(kwargs, error, match):
    full = dict(inner_init=jnp.zeros(30)) | kwargs
    with pytest.raises(error, match=match):
        optax_pes.shine_bilevel(inner_loss, outer_loss, **full)


def test_bad_losses_and_hyperparameters():
    def vector_inner(w, lam):
        return w**2

    # The losses may need the update's keyword arguments, so they are checked there.
    lam = jnp.asarray(0.0)
    tx = optax_pes.shine_bilevel(vector_inner, outer_loss, inner_init=jnp.zeros(30))
    with pytest.raises(ValueError, match="inner_loss must return a float scalar"):
        tx.update(lam, tx.init(lam), lam)
    tx = optax_pes.shine_bilevel(inner_loss, outer_loss, inner_init=jnp.zeros(4))
    with pytest.raises(ValueError, match="do inner_init"):
        tx.update(lam, tx.init(lam), lam)
    tx = optax_pes.shine_bilevel(inner_loss, outer_loss, inner_init=jnp.zeros(30))
    state = tx.init(lam)
    with pytest.raises(ValueError, match="do inner_init"):
        tx.update(jnp.zeros(7), state, jnp.zeros(7))  # one per feature needs 30
    with pytest.raises(TypeError, match="hyperparameters"):
        tx.init(jnp.asarray(1, jnp.int32))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.zeros(()), state)


def test_inner_optimizer_without_stored_gradient(x64):
    # A backtracking line search keeps no gradient: the solve recomputes it.
    optimizer = optax.chain(
        optax.scale_by_lbfgs(memory_size=30),
        optax.scale(-1.0),
        optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
    )
    lam = jnp.full(30, -2.0)
    estimate = hypergradient(lam, "shine_refine", inner_optimizer=optimizer)
    assert cosine(estimate, exact_hypergradient(lam)) > 0.999


def _highdim_problem(n_samples=1000, n_features=500):
    """More features than training samples, as in the SHINE paper's text problems:
    the inner Hessian's curvature is spread over many directions, so a warm-started
    solve's L-BFGS memory covers few of them."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples, n_features, n_informative=50, flip_y=0.05, random_state=0
    )
    n = n_samples // 2
    data = (x[:n], y[:n].astype(np.float64), x[n:], y[n:].astype(np.float64))
    xt, yt, xv, yv = map(jnp.asarray, data)

    def inner(w, lam):
        return _log_loss(w, xt, yt) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def outer(w, lam):
        return _log_loss(w, xv, yv)

    return inner, outer, n_features


def _cold_estimate(problem, lam, method, inner_tol, **kwargs):
    """One jitted hypergradient of `_highdim_problem()`'s `problem` from w = 0."""
    inner, outer, dim = problem
    tx = optax_pes.shine_bilevel(
        inner,
        outer,
        inner_init=jnp.zeros(dim),
        method=method,
        inner_tol=inner_tol,
        inner_max_steps=500,
        **kwargs,
    )
    return jax.jit(tx.update)(jnp.zeros_like(lam), tx.init(lam), lam)[0]


# (Refinement's accuracy at a few steps is in test_scalar_hypergradient_relative_error.)
@pytest.mark.slow
def test_refine_converges_to_the_implicit_hypergradient_as_its_steps_grow(x64):
    problem = _highdim_problem()
    lam = jnp.asarray(-3.0)

    def estimate(method, **kwargs):
        return _cold_estimate(problem, lam, method, 1e-8, **kwargs)

    # The exact hypergradient at the same (inexact) w*: CG to 1e-12.
    exact = estimate("implicit", implicit_tol=1e-12, implicit_max_steps=2000)
    errors = {
        k: abs(float(estimate("shine_refine", refine_steps=k) - exact))
        for k in (1, 5, 20, 60)
    }
    errors = {k: e / abs(float(exact)) for k, e in errors.items()}
    steps = sorted(errors)
    assert all(
        errors[a] > errors[b] for a, b in zip(steps[:-1], steps[1:], strict=True)
    ), errors
    # Measured: 0.34, 0.30, 7e-4, 1.3e-8 (shine: 0.9). Five steps are still in CG's
    # slow start here: the memory of a 45-step solve covers few of the ~500 curved
    # directions, so the preconditioner deflates little (docs/bilevel.md).
    assert errors[60] < 1e-6, errors


@pytest.mark.parametrize(
    "method, rtol",
    [("implicit", 1e-6), slow("shine_refine", 1e-3), slow("shine", 0.3)],
)
def test_pytree_weights_and_hyperparameters(method, rtol, x64):
    # A multinomial model's (W, b) as the inner variable and a dict of
    # hyperparameters (one l2 strength for W, one for b): every method returns a
    # pytree like the hyperparameters, close to the exact (dense) hypergradient.
    x, labels = X_TRAIN[:, :8], (Y_TRAIN + (X_TRAIN[:, 0] > 0)).astype(int)
    xv, labels_v = X_VAL[:, :8], (Y_VAL + (X_VAL[:, 0] > 0)).astype(int)

    def xent(params, x, labels):
        w, b = params
        logits = x @ w + b[None, :]
        return jnp.mean(
            jax.nn.logsumexp(logits, 1) - logits[jnp.arange(len(x)), labels]
        )

    def inner(params, h):
        w, b = params
        return xent(params, x, labels) + 0.5 * (
            jnp.exp(h["w"]) * jnp.sum(w**2) + jnp.exp(h["b"]) * jnp.sum(b**2)
        )

    def outer(params, h):
        return xent(params, xv, labels_v)

    init = (jnp.zeros((8, 3)), jnp.zeros(3))
    h = {"w": jnp.asarray(-3.0), "b": jnp.asarray(-1.0)}
    from jax.flatten_util import ravel_pytree

    flat0, unravel_w = ravel_pytree(init)
    hflat, unravel_h = ravel_pytree(h)

    def f(wf, hf):
        return inner(unravel_w(wf), unravel_h(hf))

    def g(wf, hf):
        return outer(unravel_w(wf), unravel_h(hf))

    newton = jax.jit(
        lambda w: w - jnp.linalg.solve(jax.hessian(f)(w, hflat), jax.grad(f)(w, hflat))
    )
    w = flat0
    for _ in range(30):
        w = newton(w)
    v = jnp.linalg.solve(jax.hessian(f)(w, hflat), jax.grad(g)(w, hflat))
    mixed = jax.jacobian(lambda hf: jax.grad(f)(w, hf))(hflat)
    exact = jax.grad(g, argnums=1)(w, hflat) - v @ mixed

    tx = optax_pes.shine_bilevel(
        inner, outer, inner_init=init, method=method, inner_tol=1e-9
    )
    estimate, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, h), tx.init(h), h)
    assert jax.tree.structure(estimate) == jax.tree.structure(h)
    assert jax.tree.structure(state.inner_params) == jax.tree.structure(init)
    assert bool(state.inner_converged)
    np.testing.assert_allclose(ravel_pytree(estimate)[0], exact, rtol=rtol)


def test_outer_problem_awareness_needs_its_pairs_at_every_step(x64):
    # Each OPA pair makes the inverse exact along one d_k = B_k^-1 grad_w g, and
    # d_k approaches H^-1 grad_w g only when the pairs follow one another (each is
    # then one preconditioned Richardson step on H v = grad_w g). Sparse pairs (the
    # old default, every 5 steps) leave a scalar hypergradient far off in this
    # regime: measured 0.0025 (every step, the default) and 0.18 (every 5) here,
    # 0.00095 and 0.88 at 20,000 features.
    problem = _highdim_problem(800, 1000)
    lam = jnp.asarray(-3.0)

    def estimate(method, **kwargs):
        return float(_cold_estimate(problem, lam, method, 1e-6, **kwargs))

    exact = estimate("implicit", implicit_tol=1e-12, implicit_max_steps=2000)
    errors = {
        every: abs(estimate("shine_opa", **kw) - exact) / abs(exact)
        for every, kw in (("default", {}), (5, {"opa_every": 5}))
    }
    assert errors["default"] < 0.02, errors
    assert errors[5] > 3 * errors["default"], errors


def test_no_outer_pair_after_the_last_inner_step(x64):
    # The final two-loop recursion scales by the newest pair's s'y / y'y: that
    # must be one of the solve's own secant pairs, not an OPA pair added after the
    # last step. With a pair due before every step but the first, a K-step solve
    # holds K - 1 of them (optax's count: K steps + K - 1 pairs).
    from optax_pes._implicit import _bilevel, _lbfgs

    a = jnp.linspace(1.0, 10.0, 6)

    def f(w):
        return 0.5 * jnp.sum(a * w**2) + 0.1 * jnp.sum(w**4)

    losses = _bilevel._Losses(inner_grad=jax.grad(f), outer_grad=lambda w: w + 1.0)
    _, opt_state, _, _, steps = _bilevel._inner_solve(
        optax.lbfgs(memory_size=30),
        _bilevel._ShineOPA(opa_every=1),
        losses,
        f,
        jnp.ones(6),
        jnp.asarray(1e-10),
        100,
    )
    assert int(steps) > 3
    assert int(_lbfgs.find_state(opt_state).count) == 2 * int(steps) - 1


def test_hessian_diag_starts_the_inverse_from_the_exact_diagonal(x64):
    # A quadratic inner problem with a diagonal Hessian whose curvatures span four
    # decades: started from the exact inverse diagonal, the solve's exact pairs
    # keep the L-BFGS inverse exact, so SHINE is the exact hypergradient; from
    # gamma I (the newest pair's scale) it is not. w is a pytree, as is the diagonal.
    curvatures = {"a": jnp.logspace(-2.0, 2.0, 6), "b": jnp.linspace(1.0, 3.0, 4)}
    target = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(4)}

    def inner(w, h):
        return sum(
            0.5 * jnp.sum((curvatures[k] + jnp.exp(h[k])) * w[k] ** 2) - jnp.sum(w[k])
            for k in w
        )

    def outer(w, h):
        return sum(0.5 * jnp.sum((w[k] - target[k]) ** 2) for k in w)

    def hessian_diag(w, h):
        return {k: curvatures[k] + jnp.exp(h[k]) for k in w}

    h = {"a": jnp.full(6, -1.0), "b": jnp.full(4, 0.5)}
    init = jax.tree.map(jnp.zeros_like, target)

    def estimate(method, **kwargs):
        tx = optax_pes.shine_bilevel(
            inner, outer, inner_init=init, method=method, inner_tol=1e-10, **kwargs
        )
        out, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, h), tx.init(h), h)
        assert bool(state.inner_converged) and int(state.inner_steps) > 2
        return np.concatenate([np.asarray(out[k]) for k in sorted(out)])

    exact = estimate("implicit", implicit_tol=1e-13)
    np.testing.assert_allclose(
        estimate("shine", hessian_diag=hessian_diag), exact, rtol=1e-7, atol=1e-12
    )
    # The same solve without the diagonal is visibly off (the biased baseline).
    assert np.max(np.abs(estimate("shine") - exact)) > 1e-2 * np.max(np.abs(exact))


def test_hessian_diag_of_the_wrong_shape_is_an_error():
    tx = optax_pes.shine_bilevel(
        inner_loss,
        outer_loss,
        inner_init=jnp.zeros(30),
        hessian_diag=lambda w, lam: jnp.ones(3),
    )
    lam = jnp.asarray(0.0)
    with pytest.raises(ValueError, match="hessian_diag must return a float pytree"):
        tx.update(lam, tx.init(lam), lam)
    tx = optax_pes.shine_bilevel(
        inner_loss, outer_loss, inner_init=jnp.zeros(30), hessian_diag=lambda w: w
    )
    with pytest.raises(ValueError, match=r"hessian_diag\(inner_init, params\) failed"):
        tx.update(lam, tx.init(lam), lam)


def test_hessian_diag_reaches_refine_and_opa(x64):
    # With an inexact diagonal (twice the true one, so that no method is exact by
    # accident): refine's first CG step is one preconditioned step from the SHINE
    # estimate of the same start, and an OPA pair's direction is that estimate
    # applied to the outer gradient.
    from optax_pes._implicit import _bilevel

    a = jnp.logspace(-2.0, 2.0, 8)

    def f(w):
        return 0.5 * jnp.sum(a * w**2) + 0.1 * jnp.sum(w**4)

    def outer_grad(w):
        return w - jnp.linspace(-1.0, 1.0, 8)

    losses = _bilevel._Losses(
        inner_grad=jax.grad(f),
        outer_grad=outer_grad,
        hessian_diag=lambda w: 2 * (a + 1.2 * w**2),
    )
    plain = _bilevel._Losses(inner_grad=jax.grad(f), outer_grad=outer_grad)
    w, opt_state, _, _, steps = _bilevel._inner_solve(
        optax.lbfgs(memory_size=30),
        _bilevel._Shine(),
        losses,
        f,
        jnp.ones(8),
        jnp.asarray(1e-3),
        100,
    )
    assert int(steps) > 2
    b = outer_grad(w)
    inverse = losses.inverse(w, opt_state)
    m, hess = inverse.as_matrix(), jax.hessian(f)(w)
    v0 = m @ b  # one preconditioned CG step from v0
    r = b - hess @ v0
    z = m @ r
    v1 = v0 + (r @ z) / (z @ hess @ z) * z
    refine = _bilevel._ShineRefine(refine_steps=1)
    np.testing.assert_allclose(refine.solve(w, opt_state, b, losses)[0], v1, rtol=1e-8)
    assert not np.allclose(refine.solve(w, opt_state, b, plain)[0], v1, rtol=1e-3)

    opa = _bilevel._ShineOPA(opa_every=1)
    new = _bilevel._lbfgs.find_state(opa.before_inner_step(1, w, opt_state, losses))
    slot = _bilevel._lbfgs.latest_slot(new)
    np.testing.assert_allclose(new.diff_params_memory[slot], inverse.mv(b), rtol=1e-10)
    gamma_d = plain.inverse(w, opt_state).mv(b)
    assert not np.allclose(new.diff_params_memory[slot], gamma_d, rtol=1e-3)


def test_hessian_diag_must_be_callable():
    with pytest.raises(TypeError, match="hessian_diag must be a callable"):
        optax_pes.shine_bilevel(
            inner_loss, outer_loss, inner_init=jnp.zeros(30), hessian_diag=jnp.ones(30)
        )


def test_hessian_diag_in_another_dtype_keeps_the_weights_dtype(x64):
    # A float64 diagonal for float32 weights (x64 on): the estimate stays float32.
    a = jnp.linspace(1.0, 4.0, 5, dtype=jnp.float32)

    def inner(w, h):
        return 0.5 * jnp.sum((a + jnp.exp(h)) * w**2) - jnp.sum(w)

    def outer(w, h):
        return 0.5 * jnp.sum((w - 1.0) ** 2)

    h = jnp.zeros(5, jnp.float32)
    tx = optax_pes.shine_bilevel(
        inner,
        outer,
        inner_init=jnp.zeros(5, jnp.float32),
        hessian_diag=lambda w, h: (a + jnp.exp(h)).astype(jnp.float64),
    )
    out, state = jax.jit(tx.update)(jnp.zeros_like(h), tx.init(h), h)
    assert out.dtype == jnp.float32 and state.inner_params.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
