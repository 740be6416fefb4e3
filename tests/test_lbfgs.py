"""optax's L-BFGS memory as SHINE reads it (`optax_pes._implicit._lbfgs`).

The layout test pins what the module assumes about `optax.scale_by_lbfgs`'s state, so
that a change in optax fails here rather than silently degrading SHINE; the others
check the two-loop recursion against the dense BFGS matrix built from the same pairs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_pes._implicit import _lbfgs

pytestmark = pytest.mark.usefixtures("x64")

MEMORY = 3
DIM = 8
# An ill-conditioned quadratic: L-BFGS needs more than 2 * MEMORY steps to converge,
# so every pair of the runs below is a genuine curvature pair.
CURVATURES = jnp.logspace(0.0, 3.0, DIM)
MAX_STEPS = 2 * MEMORY + 1


# Jitted once per shape: op-by-op, each lax.scan of the recursion compiles anyway.
_add_pair = jax.jit(_lbfgs.add_pair)
_from_state = jax.jit(_lbfgs.LBFGSInverse.from_state)
_mv = jax.jit(lambda inverse, d: inverse.mv(d))
_as_matrix = jax.jit(lambda inverse: inverse.as_matrix())


def _quadratic(w):
    return 0.5 * jnp.sum(CURVATURES * w**2)


@functools.cache
def _lbfgs_run():
    """`MAX_STEPS` updates of `optax.lbfgs(memory_size=MEMORY)` in one `lax.scan`:
    the state after each, and the params and gradients each update was called with."""
    solver = optax.lbfgs(memory_size=MEMORY)
    value_and_grad = optax.value_and_grad_from_state(_quadratic)

    def step(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = solver.update(
            grad, state, w, value=value, grad=grad, value_fn=_quadratic
        )
        return (optax.apply_updates(w, updates), state), (state, w, grad)

    w = jnp.linspace(1.0, 2.0, DIM)
    run = jax.jit(lambda w: jax.lax.scan(step, (w, solver.init(w)), length=MAX_STEPS))
    _, (states, points, grads) = run(w)
    return states, np.asarray(points), np.asarray(grads)


def _run_lbfgs(num_steps):
    """The state after `num_steps` updates, and the params and gradients they had."""
    states, points, grads = _lbfgs_run()
    state = jax.tree.map(lambda x: x[num_steps - 1], states)
    return state, points[:num_steps], grads[:num_steps]


@pytest.mark.parametrize("num_steps", [1, 2, MEMORY - 1, MEMORY, MEMORY + 1, MAX_STEPS])
def test_optax_memory_layout(num_steps):
    """The update with `count == c` (before it) writes the pair of its point and the
    previous one into slot `(c - 1) % m` with weight `1 / s.y`; the first writes a
    zero pair of weight 0. So after `n` updates the newest pair is in slot
    `(n - 2) % m` and the next goes to `(n - 1) % m`."""
    state, points, grads = _run_lbfgs(num_steps)
    lbfgs = _lbfgs.find_state(state)
    assert lbfgs.count.dtype == jnp.int32 and int(lbfgs.count) == num_steps
    m = MEMORY
    expected_s, expected_y = np.zeros((m, DIM)), np.zeros((m, DIM))
    expected_w = np.zeros(m)
    for c in range(num_steps):  # what update number c wrote, oldest first
        slot = (c - 1) % m
        if c == 0:
            expected_s[slot], expected_y[slot], expected_w[slot] = 0, 0, 0
        else:
            s, y = points[c] - points[c - 1], grads[c] - grads[c - 1]
            expected_s[slot], expected_y[slot], expected_w[slot] = s, y, 1 / (s @ y)
    np.testing.assert_allclose(lbfgs.diff_params_memory, expected_s, rtol=1e-12)
    np.testing.assert_allclose(lbfgs.diff_updates_memory, expected_y, rtol=1e-12)
    np.testing.assert_allclose(lbfgs.weights_memory, expected_w, rtol=1e-12)
    # What the module reads: the newest pair is that of the last two points.
    latest = int(_lbfgs.latest_slot(lbfgs))
    assert latest == (num_steps - 2) % m
    inverse = _from_state(lbfgs)
    assert int(inverse.latest) == latest
    if num_steps >= 2:
        np.testing.assert_allclose(
            inverse.s[latest], points[-1] - points[-2], rtol=1e-12
        )
        np.testing.assert_allclose(inverse.y[latest], grads[-1] - grads[-2], rtol=1e-12)
    filled = min(max(num_steps - 1, 0), m)
    assert int(np.sum(np.asarray(lbfgs.weights_memory) > 0)) == filled


def test_added_pair_is_the_newest_and_optax_writes_after_it():
    state, _, _ = _run_lbfgs(4)
    lbfgs = _lbfgs.find_state(state)
    slot = (int(lbfgs.count) - 1) % MEMORY
    s = jnp.linspace(-1.0, 1.0, DIM)
    y = CURVATURES * s
    added = _add_pair(lbfgs, s, y)
    assert int(added.count) == int(lbfgs.count) + 1
    assert int(_lbfgs.latest_slot(added)) == slot
    np.testing.assert_allclose(added.diff_params_memory[slot], s)
    np.testing.assert_allclose(added.diff_updates_memory[slot], y)
    np.testing.assert_allclose(added.weights_memory[slot], 1 / (s @ y))
    # optax's next update writes its own pair into the next slot, keeping ours.
    solver = optax.lbfgs(memory_size=MEMORY)
    state = _lbfgs.replace_state(state, added)
    w = lbfgs.params + 0.1  # a new point
    value, grad = jax.value_and_grad(_quadratic)(w)
    update = jax.jit(
        lambda grad, state, w, value: solver.update(
            grad, state, w, value=value, grad=grad, value_fn=_quadratic
        )
    )
    _, state = update(grad, state, w, value)
    after = _lbfgs.find_state(state)
    np.testing.assert_allclose(after.diff_params_memory[slot], s)
    newest = (slot + 1) % MEMORY
    assert int(_lbfgs.latest_slot(after)) == newest
    np.testing.assert_allclose(after.diff_params_memory[newest], w - lbfgs.params)


def test_a_pair_without_curvature_is_skipped():
    lbfgs = _lbfgs.find_state(_run_lbfgs(3)[0])
    s = jnp.ones(DIM)
    skipped = _add_pair(lbfgs, s, -s)
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(lbfgs), strict=True):
        np.testing.assert_array_equal(a, b)


def _dense_bfgs_inverse(pairs, initial=None):
    """The inverse of the BFGS matrix built from `pairs` (oldest first), started from
    `I / gamma` with gamma = s.y / y.y of the newest pair, or from the inverse of
    the diagonal `initial` (that of H0)."""
    s_new, y_new = pairs[-1]
    b = np.eye(len(s_new)) * (y_new @ y_new) / (s_new @ y_new)
    if initial is not None:
        b = np.diag(1 / initial)
    for s, y in pairs:
        bs = b @ s
        b = b - np.outer(bs, bs) / (s @ bs) + np.outer(y, y) / (y @ s)
    return np.linalg.inv(b)


@pytest.mark.parametrize("num_pairs", [1, 3, 5])
def test_two_loop_recursion_is_the_dense_bfgs_inverse(num_pairs):
    """A wrapped circular memory (newest in slot 1) with empty slots ignored."""
    memory, dim = 5, 6
    rng = np.random.RandomState(num_pairs)
    a = rng.randn(dim, dim)
    hessian = a @ a.T + dim * np.eye(dim)
    pairs = [(s, hessian @ s) for s in rng.randn(num_pairs, dim)]
    latest = 1
    s_rows, y_rows, rho = np.zeros((memory, dim)), np.zeros((memory, dim)), np.zeros(5)
    for age, (s, y) in enumerate(reversed(pairs)):  # newest first
        slot = (latest - age) % memory
        s_rows[slot], y_rows[slot], rho[slot] = s, y, 1 / (s @ y)
    inverse = _lbfgs.LBFGSInverse(
        jnp.asarray(s_rows), jnp.asarray(y_rows), jnp.asarray(rho), jnp.asarray(latest)
    )
    dense = _dense_bfgs_inverse(pairs)
    d = rng.randn(dim)
    np.testing.assert_allclose(_mv(inverse, jnp.asarray(d)), dense @ d, rtol=1e-10)
    np.testing.assert_allclose(_as_matrix(inverse), dense, rtol=1e-10, atol=1e-14)
    # Secant equation of the newest pair: H^-1 y = s.
    np.testing.assert_allclose(_mv(inverse, jnp.asarray(pairs[-1][1])), pairs[-1][0])


def test_an_initial_diagonal_replaces_gamma():
    """`initial` is the diagonal of H0 in the recursion; started from the exact
    inverse of a diagonal Hessian, exact pairs keep it exact (gamma I does not);
    entries that are not finite and positive take gamma."""
    memory, dim = 4, 6
    rng = np.random.RandomState(0)
    curvatures = np.logspace(-2.0, 2.0, dim)
    pairs = [(s, curvatures * s) for s in rng.randn(3, dim)]
    lbfgs = optax.scale_by_lbfgs(memory_size=memory).init(jnp.zeros(dim))
    for s, y in pairs:
        lbfgs = _add_pair(lbfgs, jnp.asarray(s), jnp.asarray(y))
    exact = np.diag(1 / curvatures)
    with_initial = _from_state(lbfgs, jnp.asarray(1 / curvatures))
    np.testing.assert_allclose(_as_matrix(with_initial), exact, rtol=1e-10, atol=1e-14)
    general = 1 / (curvatures + rng.rand(dim))
    np.testing.assert_allclose(
        _as_matrix(_from_state(lbfgs, jnp.asarray(general))),
        _dense_bfgs_inverse(pairs, general),
        rtol=1e-10,
        atol=1e-14,
    )
    gamma = _as_matrix(_from_state(lbfgs))
    assert np.max(np.abs(gamma - exact)) > 1.0  # gamma I is far off here
    unusable = jnp.asarray([0.0, -1.0, np.nan, np.inf, 1.0, 1.0])
    d = jnp.asarray(rng.randn(dim))
    gamma_value = float(pairs[-1][0] @ pairs[-1][1] / (pairs[-1][1] @ pairs[-1][1]))
    fallback = jnp.where(jnp.arange(dim) < 4, gamma_value, 1.0)
    np.testing.assert_allclose(
        _mv(_from_state(lbfgs, unusable), d), _mv(_from_state(lbfgs, fallback), d)
    )


def test_pairs_added_to_a_pytree_state_give_the_dense_inverse():
    """`add_pair` and `from_state` on an `optax.scale_by_lbfgs` state of a dict."""
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    lbfgs = optax.scale_by_lbfgs(memory_size=4).init(params)
    rng = np.random.RandomState(0)
    a = rng.randn(6, 6)
    hessian = a @ a.T + 6 * np.eye(6)
    pairs = [(s, hessian @ s) for s in rng.randn(6, 6)]  # more pairs than memory
    for s, y in pairs:
        lbfgs = _add_pair(lbfgs, jnp.asarray(s), jnp.asarray(y))
    inverse = _from_state(lbfgs)
    np.testing.assert_allclose(
        _as_matrix(inverse), _dense_bfgs_inverse(pairs[-4:]), rtol=1e-10, atol=1e-14
    )
    assert lbfgs.diff_params_memory["a"].shape == (4, 2, 2)


def test_an_empty_memory_is_the_identity():
    lbfgs = optax.scale_by_lbfgs(memory_size=3).init(jnp.zeros(4))
    d = jnp.arange(4.0)
    np.testing.assert_array_equal(_mv(_from_state(lbfgs), d), d)


def test_find_state_needs_exactly_one():
    with pytest.raises(ValueError, match="exactly one optax.scale_by_lbfgs.*has 0"):
        _lbfgs.find_state(optax.adam(1e-2).init(jnp.zeros(2)))
    two = optax.chain(optax.scale_by_lbfgs(), optax.scale_by_lbfgs())
    with pytest.raises(ValueError, match="has 2"):
        _lbfgs.find_state(two.init(jnp.zeros(2)))
