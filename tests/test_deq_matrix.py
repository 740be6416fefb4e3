"""Every DEQ solver with every adjoint: under jit + vmap + grad, in float32 and float64.

A compatible pair gives finite gradients from one trace (a second call with new values
does not recompile), and `Implicit` / refined `Shine` match the exact implicit gradient,
computed here in float64 numpy from a dense solve on a small contractive layer. A pair
whose adjoint needs an inverse estimate the solver does not provide is refused.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes

from .helpers import slow

DIM, BATCH = 4, 3

SOLVERS = {
    "Broyden": lambda tol: optax_pes.Broyden(max_steps=40, tol=tol, memory=40),
    "Anderson": lambda tol: optax_pes.Anderson(max_steps=40, tol=tol, memory=4),
    "FixedPoint": lambda tol: optax_pes.FixedPoint(max_steps=200, tol=tol),
}

# adjoint, and the largest relative error to the exact gradient in (float32, float64)
# (measured: about 2e-3 for refine_steps=2, 3e-6 and 4e-11 for Implicit); None: the
# gradient is only required to be finite (JacobianFree is off by about 0.2 here).
ADJOINTS = {
    "Shine": (optax_pes.Shine(), None),
    "Shine(refine_steps=2)": (optax_pes.Shine(refine_steps=2), (1e-2, 1e-2)),
    "Shine(fallback=True)": (optax_pes.Shine(fallback=True), None),
    "Implicit": (optax_pes.Implicit(), (1e-4, 1e-7)),
    "JacobianFree": (optax_pes.JacobianFree(), None),
    "Phantom": (optax_pes.Phantom(), None),
}


def compatible(solver_name, adjoint_name):
    solver, (adjoint, _) = SOLVERS[solver_name](1e-5), ADJOINTS[adjoint_name]
    return solver.provides_inverse or not adjoint.needs_inverse


PAIRS = [(s, a) for s in SOLVERS for a in ADJOINTS if compatible(s, a)]
REFUSED = [(s, a) for s in SOLVERS for a in ADJOINTS if not compatible(s, a)]


class Layer(eqx.Module):
    weight: jax.Array
    mix: jax.Array
    bias: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.mix @ x + self.bias)


def problem(seed, dtype):
    """A contractive layer (spectral norm 0.5), a batch of inputs and cotangents."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(DIM, DIM))
    weight *= 0.5 / np.linalg.norm(weight, 2)
    mix = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    bias = 0.1 * rng.normal(size=DIM)
    xs, cs = rng.normal(size=(BATCH, DIM)), rng.normal(size=(BATCH, DIM))
    return [np.asarray(a, dtype) for a in (weight, mix, bias, xs, cs)]


def exact_gradients(weight, mix, bias, xs, cs):
    """d sum_i <c_i, z*_i> / d(weight, mix, bias, xs), in float64 numpy.

    z* by plain iteration (a contraction), then w = (I - J)^-T c with the dense
    Jacobian J = diag(1 - z*^2) weight; s = (1 - z*^2) w is the cotangent through tanh.
    """
    weight, mix, bias, xs, cs = (
        np.asarray(a, np.float64) for a in (weight, mix, bias, xs, cs)
    )
    grads = [np.zeros_like(weight), np.zeros_like(mix), np.zeros_like(bias)]
    grad_xs = []
    for x, c in zip(xs, cs, strict=True):
        z = np.zeros(DIM)
        for _ in range(200):
            z = np.tanh(weight @ z + mix @ x + bias)
        slope = 1 - z**2
        w = np.linalg.solve((np.eye(DIM) - slope[:, None] * weight).T, c)
        s = slope * w
        grads[0] += np.outer(s, z)
        grads[1] += np.outer(s, x)
        grads[2] += s
        grad_xs.append(mix.T @ s)
    return (*grads, np.stack(grad_xs))


# The float64 cases (tighter bounds, twice the compile time) run with `-m slow`.
@pytest.fixture(params=["float32", slow("float64")])
def dtype(request):
    if request.param == "float64":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


@pytest.mark.parametrize("solver_name", SOLVERS)
def test_compatible_pairs_under_jit_vmap_grad(solver_name, dtype):
    """A row of the matrix: the solver with each adjoint it supports.

    The row's DEQs go through one plain `jax.jit` together (one XLA compilation costs
    about half as much as one per pair); every pair is checked, and named, apart.
    """
    tol = 1e-5 if dtype == jnp.float32 else 1e-10
    solver = SOLVERS[solver_name](tol)
    names = [a for s, a in PAIRS if s == solver_name]
    traces = []

    @jax.jit
    def gradients(deqs, xs, cs):
        traces.append(None)  # a Python side effect: runs once per trace

        def loss(deq, xs):
            zs = jax.vmap(deq, in_axes=(0, None))(xs, jnp.zeros(DIM, dtype))
            return jnp.sum(cs * zs)

        return {n: jax.grad(loss, argnums=(0, 1))(d, xs) for n, d in deqs.items()}

    for seed in (0, 1):  # new values, same shapes: the second call reuses the trace
        weight, mix, bias, xs, cs = problem(seed, dtype)
        layer = Layer(weight, mix, bias)
        deqs = {
            n: optax_pes.DEQ(layer, solver=solver, adjoint=ADJOINTS[n][0])
            for n in names
        }
        exact = exact_gradients(weight, mix, bias, xs, cs)
        for name, (g_deq, g_xs) in gradients(deqs, xs, cs).items():
            pair = f"{solver_name} x {name}"
            got = (g_deq.fn.weight, g_deq.fn.mix, g_deq.fn.bias, g_xs)
            for g in got:
                assert g.dtype == dtype, pair
                assert np.all(np.isfinite(g)), pair
            bounds = ADJOINTS[name][1]
            if bounds is not None:
                bound = bounds[dtype == jnp.float64]
                for g, e in zip(got, exact, strict=True):
                    error = np.linalg.norm(np.asarray(g, np.float64) - e)
                    assert error <= bound * np.linalg.norm(e), (pair, error)
    assert len(traces) == 1


@pytest.mark.parametrize("solver_name, adjoint_name", REFUSED)
def test_shine_without_an_inverse_estimate_is_refused(solver_name, adjoint_name):
    assert adjoint_name.startswith("Shine")
    layer = Layer(*problem(0, np.float32)[:3])
    solver, (adjoint, _) = SOLVERS[solver_name](1e-5), ADJOINTS[adjoint_name]
    with pytest.raises(ValueError, match="does not provide"):
        optax_pes.DEQ(layer, solver=solver, adjoint=adjoint)
