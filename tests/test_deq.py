"""DEQ gradients against the exact implicit gradient, SHINE's pitfalls, bad input."""

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest

import optax_pes
from optax_pes._implicit._flat import flat_layer
from optax_pes._implicit._solvers import solve

from .helpers import slow


class Layer(eqx.Module):
    weight: jax.Array
    mix: jax.Array
    bias: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.mix @ x + self.bias)


def random_layer(key, dim=8, norm=0.9, symmetric=False):
    """A tanh layer whose weight has spectral norm `norm` (< 1: contractive)."""
    k1, k2, k3 = jax.random.split(key, 3)
    weight = jax.random.normal(k1, (dim, dim))
    if symmetric:
        weight = weight + weight.T
    weight = norm * weight / jnp.linalg.norm(weight, 2)
    mix = jax.random.normal(k2, (dim, dim)) / np.sqrt(dim)
    return Layer(weight, mix, 0.1 * jax.random.normal(k3, (dim,)))


def exact_gradients(layer, x, cotangent):
    """d <cotangent, z*> / d(layer, x) from a tight solve and a dense linear solve."""
    deq = optax_pes.DEQ(
        layer,
        solver=optax_pes.Broyden(max_steps=200, tol=1e-12, memory=200),
        adjoint=optax_pes.JacobianFree(),
    )
    z_star, info = deq.solve(x, jnp.zeros_like(cotangent))
    assert info.converged
    z_star = jax.lax.stop_gradient(z_star)
    jac = jax.jacobian(layer)(z_star, x)
    w = jnp.linalg.solve((jnp.eye(z_star.size) - jac).T, cotangent)
    return eqx.filter_grad(lambda lx: jnp.vdot(w, lx[0](z_star, lx[1])))((layer, x))


def deq_gradients(layer, x, cotangent, adjoint, solver=None):
    deq = optax_pes.DEQ(layer, solver=solver, adjoint=adjoint)
    z0 = jnp.zeros_like(cotangent)
    grads = eqx.filter_grad(lambda dx: jnp.vdot(cotangent, dx[0](dx[1], z0)))((deq, x))
    return grads[0].fn, grads[1]


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _problem(seed, **kwargs):
    keys = jax.random.split(jax.random.key(seed), 3)
    layer = random_layer(keys[0], **kwargs)
    return layer, jax.random.normal(keys[1], (8,)), jax.random.normal(keys[2], (8,))


SEEDS = range(5)


# Two layers in the default suite, all five with `-m slow` (about 15 s each on CPU).
@pytest.mark.parametrize("seed", [0, 1] + [slow(s) for s in SEEDS[2:]])
def test_implicit_and_refined_shine_match_the_exact_gradient(seed, x64):
    layer, x, cotangent = _problem(seed)
    ref_layer, ref_x = exact_gradients(layer, x, cotangent)
    solver = optax_pes.Broyden(max_steps=30, tol=1e-6, memory=30)
    for adjoint, bound in [
        (optax_pes.Implicit(), 0.9999),
        (optax_pes.Implicit(linear_solver="fixed_point", max_steps=500), 0.9999),
        (optax_pes.Shine(refine_steps=5), 0.999),
        (optax_pes.Shine(refine_steps=5, refine_solver="gmres"), 0.999),
    ]:
        g_layer, g_x = deq_gradients(layer, x, cotangent, adjoint, solver)
        assert cosine(g_layer, ref_layer) > bound, adjoint
        assert cosine(g_x, ref_x) > bound, adjoint


@pytest.mark.slow  # an average over the five random layers (about 35 s on CPU)
def test_shine_at_least_as_close_as_jacobian_free_on_average(x64):
    shine, jfb = [], []
    for seed in SEEDS:
        layer, x, cotangent = _problem(seed)
        ref = exact_gradients(layer, x, cotangent)
        shine.append(cosine(deq_gradients(layer, x, cotangent, optax_pes.Shine()), ref))
        jfb.append(
            cosine(deq_gradients(layer, x, cotangent, optax_pes.JacobianFree()), ref)
        )
    assert np.mean(shine) >= np.mean(jfb)
    assert np.mean(shine) > 0.95


def test_non_contractive_layer_solved_by_broyden(x64):
    # Spectral norm 1.3: plain iteration is not guaranteed to converge; Broyden is.
    layer, x, cotangent = _problem(7, norm=1.3)
    ref = exact_gradients(layer, x, cotangent)
    solver = optax_pes.Broyden(60, 1e-8, 60)
    assert bool(optax_pes.DEQ(layer, solver=solver).solve(x, jnp.zeros(8))[1].converged)
    implicit = deq_gradients(layer, x, cotangent, optax_pes.Implicit(), solver)
    assert cosine(implicit, ref) > 0.9999
    # GMRES refinement does not need a contraction (fixed-point refinement does).
    shine = optax_pes.Shine(refine_steps=5, refine_solver="gmres")
    refined = deq_gradients(layer, x, cotangent, shine, solver)
    jfb = deq_gradients(layer, x, cotangent, optax_pes.JacobianFree(), solver)
    assert cosine(refined, ref) > max(0.99, cosine(jfb, ref))


class Linear(eqx.Module):
    matrix: jax.Array

    def __call__(self, z, x):
        return self.matrix @ z + x


def _broyden_on_linear(a, x, max_steps, memory=None):
    # powell=0: the plain update, whose secant equations the tests below check.
    solver = optax_pes.Broyden(max_steps, 1e-12, memory or max_steps, powell=0.0)
    layer = lambda z: a @ z + x  # noqa: E731
    state = solver.init(layer, jnp.zeros_like(x))
    steps = []
    for i in range(max_steps):
        new = solver.step(layer, state, jnp.asarray(True), jnp.asarray(i))
        steps.append((new.z - state.z, new.g - state.g))
        state = new
    return solver.inverse(state), steps


def test_shine_applies_the_inverse_transposed(x64):
    """Non-symmetric Jacobian: SHINE's w is -B^-T zbar, not -B^-1 zbar (official code).

    Broyden's B^-1 is exact only along the directions it explored, so the transposed
    estimate must be closer to the exact gradient, and the one SHINE returns.
    """
    dim = 6
    a = jnp.triu(jax.random.normal(jax.random.key(0), (dim, dim)), 1) * 0.6
    a = a + 0.3 * jnp.eye(dim)  # non-symmetric, spectral radius 0.3
    x = jax.random.normal(jax.random.key(1), (dim,))
    cotangent = jax.random.normal(jax.random.key(2), (dim,))
    solver = optax_pes.Broyden(max_steps=4, tol=1e-12, memory=4, powell=0.0)
    _, g_x = deq_gradients(Linear(a), x, cotangent, optax_pes.Shine(), solver)
    inverse, _ = _broyden_on_linear(a, x, 4)
    transposed = -inverse.as_matrix().T @ cotangent
    untransposed = -inverse.as_matrix() @ cotangent
    exact = jnp.linalg.solve((jnp.eye(dim) - a).T, cotangent)  # d<c, z*>/dx
    np.testing.assert_allclose(g_x, transposed, rtol=1e-8)
    assert cosine(transposed, untransposed) < 0.99  # the two really differ here
    assert cosine(transposed, exact) > cosine(untransposed, exact)


def test_broyden_inverse_matches_true_inverse_along_explored_directions(x64):
    """The estimate satisfies its last secant equation, and along the directions it
    explored last it is much closer to the true inverse than its initial guess -I."""
    dim = 10
    a = 0.5 * jax.random.normal(jax.random.key(3), (dim, dim)) / np.sqrt(dim)
    x = jax.random.normal(jax.random.key(4), (dim,))
    inverse, steps = _broyden_on_linear(a, x, 6)
    inverse = inverse.as_matrix()
    true_inverse = jnp.linalg.inv(a - jnp.eye(dim))
    dz, dg = steps[-1]
    np.testing.assert_allclose(inverse @ dg, dz, rtol=1e-8, atol=1e-12)
    for _, dg in steps[-3:]:  # the recent directions (older ones get overwritten)
        error = jnp.linalg.norm((inverse - true_inverse) @ dg)
        error0 = jnp.linalg.norm((-jnp.eye(dim) - true_inverse) @ dg)
        assert error < 0.5 * error0


@pytest.mark.parametrize(
    "spectrum, memory, steps, powell",
    [
        ("contractive", 7, 7, 0.0),
        ("contractive", 3, 14, 0.0),
        ("contractive", 7, 7, 0.9),
        ("contractive", 3, 14, 0.9),
        ("expansive", 4, 14, 0.3),
    ],
)
def test_broyden_is_dense_good_broyden_restarted_when_full(
    x64, spectrum, memory, steps, powell
):
    """The compact -I + S^T A S form is the textbook inverse good Broyden: the same
    iterates and, as a dense matrix, the same final estimate, for up to `memory`
    steps (a wrong coefficient, sign or row would show at the first steps); past
    `memory + 1` steps it is that update restarted from B^-1 = -I every `memory + 1`
    steps (SciPy's 'restart' reduction; a stale row read after a restart, or a
    missed reset, would show over the three restarts of (3, 14)). With Powell's
    safeguard, an update that would scale det(B) by |gamma| < powell uses
    B dz + theta (dg - B dz) for dg, which scales it by exactly +-powell; the
    expansive layer has negative gammas both below and above powell in size."""
    dim = 7
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(5), (dim, dim)))[0]
    if spectrum == "contractive":
        a = 0.8 * q
    else:  # symmetric, eigenvalues 1.1 .. 1.8
        a = (q * jnp.linspace(1.1, 1.8, dim)[None]) @ q.T
    x = jax.random.normal(jax.random.key(6), (dim,))
    layer = lambda z: jnp.tanh(a @ z + x)  # noqa: E731
    solver = optax_pes.Broyden(max_steps=steps, tol=1e-14, memory=memory, powell=powell)
    state = solver.init(layer, jnp.zeros(dim))
    step = jax.jit(lambda state, i: solver.step(layer, state, jnp.asarray(True), i))
    z, h = jnp.zeros(dim), -jnp.eye(dim)
    g = layer(z) - z
    damped, kept = [], []
    for i in range(steps):
        state = step(state, jnp.asarray(i))
        dz = -h @ g
        z, g_new = z + dz, layer(z + dz) - (z + dz)
        dg = g_new - g
        # det(B_new) / det(B) of the plain update, in the dense inverse form.
        gamma = (dz @ h @ dg) / (dz @ dz)
        (damped if abs(gamma) < powell else kept).append(float(gamma))
        if abs(gamma) < powell:
            theta = (1 - np.sign(gamma) * powell) / (1 - gamma)
            dg = theta * dg + (1 - theta) * jnp.linalg.solve(h, dz)
            gamma = np.sign(gamma) * powell
        h_new = h + jnp.outer(dz - h @ dg, dz @ h) / (dz @ h @ dg)
        np.testing.assert_allclose(jnp.linalg.det(h) / jnp.linalg.det(h_new), gamma)
        h, g = h_new, g_new
        if (i + 1) % (memory + 1) == 0:
            h = -jnp.eye(dim)
        np.testing.assert_allclose(state.z, z, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.step, -h @ g, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        solver.inverse(state).as_matrix(), h, rtol=1e-8, atol=1e-10
    )
    # The safeguard fired, or was off; on the expansive layer also for a negative
    # gamma, and it left alone a negative gamma larger than powell in size.
    assert bool(damped) == (powell > 0)
    if spectrum == "expansive":
        assert min(damped) < 0 and min(kept) < -powell


def _slow_for_plain_iteration(dim=64, top=0.99):
    """tanh(W z + x) with symmetric W, eigenvalues evenly in [-top, top], and small
    x: near-linear at z*, so plain iteration contracts by ~top per step."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, dim)))
    w = jnp.asarray((q * np.linspace(-top, top, dim)) @ q.T, jnp.float32)
    xs = 0.01 * jax.random.normal(jax.random.key(1), (16, dim))
    return (lambda z, x: jnp.tanh(w @ z + x)), xs


@pytest.mark.parametrize("memory", [30, 10, 5])
def test_broyden_converges_where_plain_iteration_is_slow(memory):
    # Before: once the buffer wrapped, the oldest step was dropped and the estimate
    # projected off it; the residual wandered, and the stagnation stop (10 steps)
    # ended 38% (memory 30) and 75% (memory 5) of these solves unconverged, where
    # plain iteration converges every one in ~450 steps. With restarts but without
    # Powell's safeguard, 6% still stopped unconverged at memory 5 and 10 (a nearly
    # singular update, then a step that blew up).
    fn, xs = _slow_for_plain_iteration()

    def solve_all(solver):
        deq = optax_pes.DEQ(fn, solver=solver, adjoint=optax_pes.JacobianFree())
        return jax.jit(jax.vmap(deq.solve, in_axes=(0, None)))(xs, jnp.zeros(64))[1]

    plain = solve_all(optax_pes.FixedPoint(max_steps=1000, tol=1e-5))
    broyden = solve_all(optax_pes.Broyden(max_steps=400, tol=1e-5, memory=memory))
    assert bool(jnp.all(plain.converged)) and float(jnp.mean(plain.steps)) > 300
    assert bool(jnp.all(broyden.converged))
    assert float(jnp.mean(broyden.steps)) < 0.3 * float(jnp.mean(plain.steps))


@pytest.mark.parametrize(
    "solver, adjoint",
    [
        (optax_pes.Broyden(max_steps=20, powell=np.float64(0.3)), optax_pes.Shine()),
        (optax_pes.FixedPoint(damping=np.float64(0.9)), optax_pes.JacobianFree()),
        (
            optax_pes.Anderson(damping=np.float64(0.9), ridge=np.float64(1e-4)),
            optax_pes.JacobianFree(),
        ),
        (
            optax_pes.Broyden(tol=np.float64(1e-5)),
            optax_pes.Phantom(k=3, damping=np.float64(0.5)),
        ),
        (
            optax_pes.Broyden(),
            optax_pes.Shine(
                refine_steps=2, fallback=True, fallback_threshold=np.float64(2)
            ),
        ),
        (optax_pes.Broyden(), optax_pes.Implicit(tol=np.float64(1e-5))),
    ],
)
def test_numpy_float64_settings_keep_a_float32_state(x64, solver, adjoint):
    # Before: with 64-bit floats enabled, a np.float64 setting (Broyden's powell,
    # a damping, ...) promoted the iterate or w to float64, and the while loop's
    # carry changed dtype (TypeError / ValueError).
    deq = optax_pes.DEQ(
        lambda z, x: jnp.tanh(0.5 * z + x), solver=solver, adjoint=adjoint
    )
    x = jnp.linspace(-1, 1, 5, dtype=jnp.float32)
    z, info = deq.solve(x, jnp.zeros(5, jnp.float32))
    assert z.dtype == jnp.float32 and bool(info.converged)
    grad = jax.grad(lambda x: deq(x, jnp.zeros(5, jnp.float32)).sum())(x)
    assert grad.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize(
    "solver, adjoint",
    [
        (optax_pes.Broyden(), optax_pes.Shine(refine_steps=2, fallback=True)),
        (optax_pes.Anderson(), optax_pes.Implicit()),
    ],
    ids=["Broyden-Shine", "Anderson-Implicit"],
)
def test_strict_dtype_promotion(solver, adjoint):
    # No implicit promotion in the solvers and adjoints (as Equinox and Optimistix
    # test theirs): the forward, the backward and the info under "strict".
    w = 0.3 * jax.random.normal(jax.random.key(0), (5, 5))
    deq = optax_pes.DEQ(
        lambda z, x: jnp.tanh(w @ z + x), solver=solver, adjoint=adjoint
    )
    x = jnp.linspace(-1, 1, 5)
    with jax.numpy_dtype_promotion("strict"):
        z, info = jax.jit(deq.solve)(x, jnp.zeros(5))
        grad = jax.jit(jax.grad(lambda x: deq(x, jnp.zeros(5)).sum()))(x)
    assert bool(info.converged) and bool(jnp.all(jnp.isfinite(grad)))


def test_broyden_memory_is_fixed_size():
    layer, x, _ = _problem(0)
    solver = optax_pes.Broyden(max_steps=40, tol=1e-14, memory=3)
    fn, z0, _ = flat_layer(layer, x, jnp.zeros(8))
    _, info, inverse = solve(solver, fn, z0)
    # memory + 1 steps are held (3 updates); the buffers wrapped around.
    assert inverse.u.shape == (4, 8) and inverse.v.shape == (4, 8)
    assert int(info.steps) > 4


# Memory 1 and 5 in the default suite; 3 and the default 30 (20-30 s on CPU) with
# `-m slow`.
@pytest.mark.parametrize("memory", [1, 5] + [slow(m) for m in (3, 30)])
def test_broyden_step_reads_every_filled_row(x64, memory, monkeypatch):
    """Broyden's step reads only the leading block of rows filled since its last
    restart. The same step made to read every row (one block of all of them) must
    agree at every step, before and after the buffer fills and restarts (a block
    that missed a filled row would differ)."""
    from optax_pes._implicit import _solvers

    dim = 8
    a = 0.9 * jnp.linalg.qr(jax.random.normal(jax.random.key(3), (dim, dim)))[0]
    x = jax.random.normal(jax.random.key(4), (dim,))
    layer = lambda z: jnp.tanh(a @ z + x)  # noqa: E731
    solver = optax_pes.Broyden(max_steps=12, tol=1e-14, memory=memory)
    state = solver.init(layer, jnp.zeros(dim))
    first = float(jnp.linalg.norm(state.g))
    blocks = _solvers._row_blocks
    for i in range(12):
        new = solver.step(layer, state, jnp.asarray(True), jnp.asarray(i))
        with monkeypatch.context() as m:
            m.setattr(_solvers, "_row_blocks", lambda rows: (rows,))
            full = solver.step(layer, state, jnp.asarray(True), jnp.asarray(i))
        for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(full), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
        state = new
    assert _solvers._row_blocks is blocks
    # The rows were used: even memory 1 (a restart every other step) gains on the
    # 0.9 ** 12 = 0.28 of plain iteration.
    assert float(jnp.linalg.norm(state.g)) < 1e-2 * first


@pytest.mark.parametrize(
    "solver",
    [
        optax_pes.Broyden(memory=3),
        optax_pes.Anderson(memory=3),
        optax_pes.FixedPoint(damping=0.7),
    ],
    ids=lambda s: type(s).__name__,
)
def test_step_leaves_inactive_samples_unchanged(solver):
    """AbstractSolver.step's contract: where `active` is False the state comes back
    unchanged, sample by sample under vmap (a finished sample stays finished)."""
    layer, x, _ = _problem(0)
    fn, z0, _ = flat_layer(layer, x, jnp.zeros(8))
    first, second = jnp.asarray(0), jnp.asarray(1)  # the loop's iteration count
    state = solver.step(fn, solver.init(fn, z0), jnp.asarray(True), first)
    frozen = solver.step(fn, state, jnp.asarray(False), second)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = solver.step(fn, state, jnp.asarray(True), second)
    pair = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    stepped = jax.vmap(lambda s, a: solver.step(fn, s, a, second))(
        pair, jnp.array([True, False])
    )
    for new, one, old in zip(
        jax.tree.leaves(stepped),
        jax.tree.leaves(moved),
        jax.tree.leaves(state),
        strict=True,
    ):
        np.testing.assert_allclose(new[0], one, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[1], old)


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested jaxprs (loop bodies) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize(
    "solver",
    [optax_pes.Broyden(memory=3), optax_pes.Anderson(memory=3)],
    ids=lambda s: type(s).__name__,
)
def test_batched_solve_indexes_history_rows_by_the_loop(solver):
    """Under vmap, the loop's history rows are indexed by the loop's own (unbatched)
    iteration count: every sample's row at once, not a scatter or gather at
    per-sample indices (1.9x slower for a whole Broyden solve). The result equals the
    per-sample solves'."""
    layer, x, _ = _problem(0)
    xs = jnp.stack([s * x for s in (1.0, 0.5, 2.0, 0.1, 1.5)])  # (5: not memory)

    def one(x):
        fn, z0, _ = flat_layer(layer, x, jnp.zeros(8))
        return solve(solver, fn, z0)[0]

    eqns = list(_eqns(jax.make_jaxpr(jax.vmap(one))(xs).jaxpr))
    # A (batch, rows, d) buffer: Broyden holds memory + 1 steps.
    rows = solver.memory + isinstance(solver, optax_pes.Broyden)
    history = (len(xs), rows, 8)
    indexed = [
        e
        for e in eqns
        if e.primitive.name in ("scatter", "gather")
        and e.invars[0].aval.shape == history
    ]
    assert indexed
    for eqn in indexed:  # indices without a batch axis: not one row per sample
        assert len(xs) not in eqn.invars[1].aval.shape, (eqn.primitive, eqn.invars)
    batched = jax.vmap(one)(xs)
    for i in range(len(xs)):
        np.testing.assert_allclose(batched[i], one(xs[i]), rtol=1e-5, atol=1e-6)


def test_batched_inverse_is_each_samples_own_across_restarts(x64):
    """Under vmap a sample that stops keeps its inverse estimate while the others
    run on, through restarts: the batched solve hands each sample the estimate its
    own solve ends with. (A restart leaves the previous cycle's rows in the buffers,
    masked by each sample's count of rows in use; a mask from the loop's count, or
    none, would mix stale rows into the samples that stopped earlier.)"""
    dim, memory = 6, 2
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(7), (dim, dim)))[0]
    w = (q * jnp.linspace(-0.9, 0.9, dim)[None]) @ q.T  # slow for plain iteration
    layer = lambda z, x: jnp.tanh(w @ z + x)  # noqa: E731
    xs = (
        jax.random.normal(jax.random.key(8), (7, dim))
        * jnp.linspace(0.01, 2, 7)[:, None]
    )
    # (tol 1e-7: at a tolerance near rounding the last update's denominator is a
    # difference of nearly equal steps, and the batched and single solves' 1e-16
    # differences in z grow to 3e-7 in that row of A.)
    solver = optax_pes.Broyden(max_steps=60, tol=1e-7, memory=memory)

    def one(x):
        z, info, inverse = solve(solver, lambda z: layer(z, x), jnp.zeros(dim))
        return z, info.steps, inverse.as_matrix()

    z, steps, inverses = jax.vmap(one)(xs)
    rows = memory + 1
    # Samples stop at different points of a cycle, after at least one restart.
    assert int(steps.min()) > rows and len(set((np.asarray(steps) % rows).tolist())) > 1
    assert len(set(np.asarray(steps).tolist())) > 2
    for i in range(len(xs)):
        z_i, steps_i, inverse_i = one(xs[i])
        assert int(steps_i) == int(steps[i])
        np.testing.assert_allclose(z[i], z_i, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(inverses[i], inverse_i, rtol=1e-7, atol=1e-8)


class Scaled(eqx.Module):
    """z <- s z + x with a per-sample contraction s = x[0] (J = s I)."""

    def __call__(self, z, x):
        return x[0] * z + x


def test_fallback_triggers_per_sample_and_equals_jacobian_free(x64):
    # Sample 0: s = 0.9, exact w = 10 zbar: |w| > 1.8 |zbar| -> falls back to JFB.
    # Sample 1: s = 0.1, exact w = 1.11 zbar: SHINE is kept.
    xs = jnp.array([[0.9, 1.0, -1.0], [0.1, 0.5, 2.0]])
    cotangent = jnp.array([1.0, -2.0, 0.5])

    def grads(adjoint):
        deq = optax_pes.DEQ(
            Scaled(), solver=optax_pes.Broyden(50, 1e-10, 50), adjoint=adjoint
        )

        def loss(x):
            return jnp.vdot(cotangent, deq(x, jnp.zeros(3)))

        return jax.vmap(jax.grad(loss))(xs)

    fallback = grads(optax_pes.Shine(fallback=True))
    shine = grads(optax_pes.Shine())
    jfb = grads(optax_pes.JacobianFree())
    np.testing.assert_allclose(fallback[0], jfb[0], rtol=1e-10)
    np.testing.assert_allclose(fallback[1], shine[1], rtol=1e-10)
    assert not np.allclose(shine[0], jfb[0])


# SHINE's inverse depends on the solver's last tiny steps, which batched and
# unbatched arithmetic round differently: a looser tolerance.
@pytest.mark.parametrize(
    "adjoint, rtol", [(optax_pes.Implicit(), 1e-6), (optax_pes.Shine(), 1e-3)]
)
def test_vmap_jit_and_batch_gradients_are_sums_of_per_sample_ones(adjoint, rtol, x64):
    layer, _, _ = _problem(1)
    xs = jax.random.normal(jax.random.key(9), (5, 8))
    solver = optax_pes.Broyden(max_steps=40, tol=1e-10, memory=40)
    deq = optax_pes.DEQ(layer, solver=solver, adjoint=adjoint)

    @eqx.filter_jit
    def batch_loss_grad(deq, xs):
        def loss(deq):
            zs = jax.vmap(deq, in_axes=(0, None))(xs, jnp.zeros(8))
            return jnp.sum(zs**2)

        return eqx.filter_grad(loss)(deq)

    batch = batch_loss_grad(deq, xs)
    # One sample per call, unbatched (jitted once: eager calls would recompile).
    single_grad = eqx.filter_jit(
        eqx.filter_grad(lambda d, x: jnp.sum(d(x, jnp.zeros(8)) ** 2))
    )
    single = [single_grad(deq, x) for x in xs]
    total = jax.tree.map(lambda *g: sum(g), *single)
    np.testing.assert_allclose(_flat(batch.fn), _flat(total.fn), rtol=rtol, atol=1e-9)
    _, infos = jax.vmap(deq.solve, in_axes=(0, None))(xs, jnp.zeros(8))
    assert infos.converged.shape == (5,) and bool(jnp.all(infos.converged))


class PytreeLayer(eqx.Module):
    weight: jax.Array

    def __call__(self, z, x):
        a, b = z
        return (jnp.tanh(self.weight @ b + x), 0.5 * jnp.cos(a[:3]))


@pytest.mark.parametrize("dtype", ["float32", slow("float64")])
def test_pytree_state_and_dtypes(dtype, x64):
    weight = 0.3 * jax.random.normal(jax.random.key(0), (4, 3), dtype)
    x = jnp.ones(4, dtype)
    z0 = (jnp.zeros(4, dtype), jnp.zeros(3, dtype))
    for solver in [optax_pes.Broyden(), optax_pes.Anderson(), optax_pes.FixedPoint()]:
        adjoint = optax_pes.Shine() if solver.provides_inverse else optax_pes.Implicit()
        deq = optax_pes.DEQ(PytreeLayer(weight), solver=solver, adjoint=adjoint)
        (a, b), info = deq.solve(x, z0)
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        assert bool(info.converged), solver
        g = eqx.filter_grad(lambda d: jnp.sum(d(x, z0)[0]))(deq)
        assert g.fn.weight.dtype == jnp.dtype(dtype)
        assert np.all(np.isfinite(g.fn.weight))


def test_anderson_needs_fewer_steps_than_plain_iteration():
    layer, x, _ = _problem(2, norm=0.95)
    steps = {}
    for solver in [optax_pes.FixedPoint(200, 1e-6), optax_pes.Anderson(200, 1e-6)]:
        _, info = optax_pes.DEQ(
            layer, solver=solver, adjoint=optax_pes.Implicit()
        ).solve(x, jnp.zeros(8))
        assert bool(info.converged)
        steps[type(solver).__name__] = int(info.steps)
    assert steps["Anderson"] < steps["FixedPoint"]


ADJOINTS = [
    optax_pes.Shine(),
    optax_pes.Shine(refine_steps=3, fallback=True),
    optax_pes.Implicit(),
    optax_pes.JacobianFree(),
    optax_pes.Phantom(3, 0.5),
]


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=lambda a: type(a).__name__)
def test_unconverged_solve_reports_and_keeps_gradients_finite(adjoint):
    # Spectral norm 3: far from contractive, and two steps are not enough anyway.
    layer, x, cotangent = _problem(5, norm=3.0)
    deq = optax_pes.DEQ(layer, solver=optax_pes.Broyden(2, 1e-8, 2), adjoint=adjoint)
    z, info = deq.solve(x, jnp.zeros(8))
    assert not bool(info.converged)
    assert int(info.steps) <= 2 and np.all(np.isfinite(z))
    g_layer, g_x = deq_gradients(layer, x, cotangent, adjoint, deq.solver)
    assert np.all(np.isfinite(_flat(g_layer))) and np.all(np.isfinite(g_x))


def test_diverging_fixed_point_iteration_returns_its_best_iterate():
    layer = Linear(2.0 * jnp.eye(3))  # z <- 2 z + x: iteration diverges
    deq = optax_pes.DEQ(
        layer, solver=optax_pes.FixedPoint(100, 1e-6), adjoint=optax_pes.JacobianFree()
    )
    z, info = deq.solve(jnp.ones(3), jnp.zeros(3))
    assert not bool(info.converged)
    assert np.all(np.isfinite(z)) and np.isfinite(info.residual)
    assert int(info.steps) < 100  # stopped on divergence, not max_steps


@pytest.mark.parametrize(
    "solver",
    [optax_pes.Broyden(), optax_pes.Anderson(), optax_pes.FixedPoint()],
    ids=lambda s: type(s).__name__,
)
def test_a_z_whose_norm_overflows_is_not_converged(solver):
    """z <- z + x has no fixed point. From z0 = 1e19 (float32), |z0| overflows to inf
    and the relative test `residual <= tol * |z|` held for a residual of 2e18: the
    solve reported converged after 0 steps."""
    deq = optax_pes.DEQ(lambda z, x: z + x, solver=solver, adjoint=optax_pes.Implicit())
    _, info = deq.solve(jnp.full(4, 1e18), jnp.full(4, 1e19))
    assert not bool(info.converged)
    assert not float(info.relative_residual) <= solver.tol  # was 0


SOLVERS_AND_ADJOINTS = [
    optax_pes.Broyden(),
    optax_pes.Anderson(),
    optax_pes.FixedPoint(),
    *ADJOINTS,
    optax_pes.Shine(refine_steps=2, refine_solver="gmres"),
    optax_pes.Implicit(linear_solver="fixed_point"),
    optax_pes.Implicit(linear_solver=lx.GMRES(rtol=1e-6, atol=1e-6)),
]


@pytest.mark.parametrize("obj", SOLVERS_AND_ADJOINTS, ids=lambda a: type(a).__name__)
def test_solvers_and_adjoints_hold_no_non_array_leaves(obj):
    # Plain jax transforms, optax's init and eqx.filter see only arrays (here none).
    assert jax.tree.leaves(obj) == []


@pytest.mark.parametrize(
    "linear_solver",
    ["gmres", slow("fixed_point"), slow(lx.GMRES(rtol=1e-6, atol=1e-6))],
)
def test_plain_jax_transforms_over_a_deq_with_implicit(linear_solver):
    layer, x, cotangent = _problem(0)
    deq = optax_pes.DEQ(layer, adjoint=optax_pes.Implicit(linear_solver=linear_solver))
    z0 = jnp.zeros(8)

    def loss(deq):
        return jnp.vdot(cotangent, deq(x, z0))

    np.testing.assert_allclose(jax.jit(loss)(deq), loss(deq), rtol=1e-5)
    grads = jax.grad(loss)(deq)
    expected = eqx.filter_grad(loss)(deq)
    np.testing.assert_allclose(_flat(grads), _flat(expected), rtol=1e-5)
    optax.adam(1e-3).init(deq)
    optax.adam(1e-3).init(eqx.filter(deq, eqx.is_array))


def test_implicit_needs_a_hashable_lineax_solver():
    with pytest.raises(TypeError, match="linear_solver must be hashable"):
        optax_pes.Implicit(linear_solver=lx.GMRES(rtol=jnp.asarray(1e-6), atol=1e-6))


# ------------------------------------------------------------------ bad input -----


def test_fn_output_must_match_z0():
    layer, x, _ = _problem(0)
    deq = optax_pes.DEQ(layer)
    with pytest.raises(ValueError, match=r"fn\(z0, x\) failed for z0 float32\[5\]"):
        deq(x, jnp.zeros(5))  # W z fails: shapes don't fit
    with pytest.raises(ValueError, match="structure, shapes and dtypes of z0"):
        optax_pes.DEQ(lambda z, x: z[:2])(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="structure, shapes and dtypes of z0"):
        optax_pes.DEQ(lambda z, x: z.astype(jnp.int32).astype(jnp.float16))(
            x, jnp.zeros(4)
        )
    with pytest.raises(ValueError, match="structure, shapes and dtypes of z0"):
        optax_pes.DEQ(lambda z, x: (z, z))(x, jnp.zeros(4))
    with pytest.raises(TypeError, match="z0 must be a non-empty pytree of floating"):
        deq(x, jnp.zeros(8, jnp.int32))


@pytest.mark.parametrize("solver", [optax_pes.Anderson(), optax_pes.FixedPoint()])
def test_shine_needs_an_inverse_estimate(solver):
    layer, _, _ = _problem(0)
    with pytest.raises(ValueError, match="does not provide"):
        optax_pes.DEQ(layer, solver=solver, adjoint=optax_pes.Shine())
    optax_pes.DEQ(layer, solver=solver, adjoint=optax_pes.Implicit())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optax_pes.Broyden(max_steps=0), "max_steps must be an int >= 1"),
        (lambda: optax_pes.Broyden(tol=0.0), "tol must be a positive float"),
        (lambda: optax_pes.Broyden(tol=-1e-3), "tol must be a positive float"),
        (lambda: optax_pes.Broyden(memory=0), "memory must be an int >= 1"),
        (lambda: optax_pes.Broyden(powell=1.0), r"powell must be a float in \[0, 1\)"),
        (lambda: optax_pes.Broyden(powell=-0.1), r"powell must be a float in \[0, 1\)"),
        (lambda: optax_pes.Anderson(memory=-1), "memory must be an int >= 1"),
        (lambda: optax_pes.Anderson(damping=0.0), "damping must be a float in"),
        (lambda: optax_pes.Anderson(ridge=-1.0), "ridge must be a float >= 0"),
        (lambda: optax_pes.FixedPoint(max_steps=-5), "max_steps must be an int >= 1"),
        (lambda: optax_pes.Shine(refine_steps=-1), "refine_steps must be an int >= 0"),
        (lambda: optax_pes.Shine(fallback_threshold=0.0), "fallback_threshold"),
        (lambda: optax_pes.Shine(refine_solver="cg"), "refine_solver must be"),
        (lambda: optax_pes.Implicit(tol=0.0), "tol must be a positive float"),
        (lambda: optax_pes.Implicit(linear_solver="lu"), "linear_solver must be"),
        (lambda: optax_pes.Phantom(k=0), "k must be an int >= 1"),
        (lambda: optax_pes.Phantom(damping=1.5), "damping must be a float in"),
    ],
)
def test_bad_solver_and_adjoint_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_deq_arguments():
    with pytest.raises(TypeError, match="fn must be a callable"):
        optax_pes.DEQ(3)
    with pytest.raises(TypeError, match="solver must be"):
        optax_pes.DEQ(lambda z, x: z, solver="broyden")
    with pytest.raises(TypeError, match="adjoint must be"):
        optax_pes.DEQ(lambda z, x: z, adjoint="shine")


def test_low_rank_inverse_with_a_core_is_u_transpose_core_v(x64):
    """`LowRankInverse(u, v, core)` is -I + U^T C V: mv, rmv and as_matrix agree with
    the dense matrix, and `core=None` is the identity (the two-factor form)."""
    ku, kv, kc, kx = jax.random.split(jax.random.key(11), 4)
    u = jax.random.normal(ku, (3, 5), jnp.float64)
    v = jax.random.normal(kv, (3, 5), jnp.float64)
    core = jax.random.normal(kc, (3, 3), jnp.float64)
    x = jax.random.normal(kx, (5,), jnp.float64)
    dense = -jnp.eye(5) + u.T @ core @ v
    inverse = optax_pes.LowRankInverse(u, v, core)
    np.testing.assert_allclose(inverse.as_matrix(), dense, rtol=1e-12)
    np.testing.assert_allclose(inverse.mv(x), dense @ x, rtol=1e-12)
    np.testing.assert_allclose(inverse.rmv(x), dense.T @ x, rtol=1e-12)
    plain = optax_pes.LowRankInverse(u, v)
    np.testing.assert_allclose(plain.as_matrix(), -jnp.eye(5) + u.T @ v, rtol=1e-12)
    np.testing.assert_allclose(plain.rmv(x), (-jnp.eye(5) + u.T @ v).T @ x, rtol=1e-12)


def test_eager_calls_compile_once():
    """Called outside jit (an evaluation loop), under an eager `jax.vmap` or an eager
    `jax.grad`, a DEQ traces its layer once per kind of call, not on every call:
    each new trace compiled the solver's loop again (0.6 s a call at d = 64) and
    left memory mappings behind."""
    traces = []

    class Layer(eqx.Module):
        linear: eqx.nn.Linear

        def __call__(self, z, x):
            traces.append(None)
            return jnp.tanh(0.5 * self.linear(z) + x)

    deq = optax_pes.DEQ(Layer(eqx.nn.Linear(4, 4, key=jax.random.key(0))))
    x, z0 = jnp.ones((3, 4)), jnp.zeros(4)

    def calls():
        deq.solve(x[0], z0)
        jax.vmap(deq, in_axes=(0, None))(x, z0)
        eqx.filter_grad(lambda d: jnp.sum(d(x[0], z0)))(deq)

    calls()
    seen = len(traces)
    calls()
    assert len(traces) == seen


def test_a_layer_closing_over_a_traced_array_leaks_no_tracer():
    """A DEQ built inside a traced loss from a function closing over the traced
    weight runs as it is: a shared program keyed by that function would hold the
    tracer after its trace (jax.checking_leaks reported it)."""
    x, z0, w = jnp.ones(3), jnp.zeros(3), 0.3 * jnp.eye(3)

    def loss(w):
        return jnp.sum(optax_pes.DEQ(lambda z, x: jnp.tanh(w @ z + x))(x, z0))

    with jax.checking_leaks():
        for f in (jax.grad(loss), jax.jit(loss), jax.jit(jax.grad(loss))):
            jax.block_until_ready(f(w))
