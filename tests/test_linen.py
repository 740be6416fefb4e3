"""The Flax linen front end: exact gradients through every adjoint, jit/vmap, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_pes
import optax_pes.linen

DIM = 6


class Layer(nn.Module):
    """A contractive tanh layer (the 0.4 keeps the fixed point iteration stable)."""

    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(0.4 * nn.Dense(DIM, param_dtype=self.param_dtype)(z) + x)


LAYER64 = Layer(param_dtype=jnp.float64)
TIGHT = optax_pes.Broyden(max_steps=100, tol=1e-12, memory=100)


@jax.jit
def _exact_gradients(layer_variables, x, cotangent):
    """d <cotangent, z*> / d(layer variables, x) by a dense linear solve at z*, and
    the fixed-point residual of z*."""

    def f(v, z, x):
        return LAYER64.apply(v, z, x)

    z_star = jax.lax.fori_loop(  # a contraction (Lipschitz < 0.8): machine precision
        0, 300, lambda _, z: f(layer_variables, z, x), jnp.zeros_like(x)
    )
    jac = jax.jacobian(f, argnums=1)(layer_variables, z_star, x)
    w = jnp.linalg.solve((jnp.eye(x.size) - jac).T, cotangent)
    grads = jax.grad(lambda v, x: jnp.vdot(w, f(v, z_star, x)), argnums=(0, 1))(
        layer_variables, x
    )
    return grads, jnp.max(jnp.abs(f(layer_variables, z_star, x) - z_star))


@pytest.fixture(scope="module")
def exact():
    """A float64 problem: the DEQ's variables, x, a cotangent, and the exact
    gradients of <cotangent, z*> w.r.t. the layer's variables and x."""
    with jax.enable_x64(True):
        x, cotangent = jax.random.normal(jax.random.key(1), (2, DIM))
        layer_variables = LAYER64.init(jax.random.key(0), jnp.zeros_like(x), x)
        grads, residual = _exact_gradients(layer_variables, x, cotangent)
        assert float(residual) < 1e-13
    variables = {"params": {"layer": layer_variables["params"]}}  # as the DEQ's
    return variables, x, cotangent, grads


@functools.partial(jax.jit, static_argnums=0)
def deq_gradients(deq, variables, x, cotangent):
    return jax.grad(
        lambda v, x: jnp.vdot(cotangent, deq.apply(v, x, jnp.zeros_like(x))),
        argnums=(0, 1),
    )(variables, x)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def test_implicit_gradient_equals_the_dense_exact_one(exact, x64):
    variables, x, cotangent, (ref_v, ref_x) = exact
    deq = optax_pes.linen.DEQ(
        LAYER64, solver=TIGHT, adjoint=optax_pes.Implicit(max_steps=200, tol=1e-12)
    )
    shapes = jax.eval_shape(deq.init, jax.random.key(0), x, jnp.zeros_like(x))
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, shapes)
    g_v, g_x = deq_gradients(deq, variables, x, cotangent)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12),
        g_v["params"]["layer"],
        ref_v["params"],
    )
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "solver, adjoint, bound",
    [
        (optax_pes.Broyden(), optax_pes.Shine(), 0.95),
        (optax_pes.Broyden(), optax_pes.Shine(refine_steps=5), 0.999),
        (optax_pes.Anderson(), optax_pes.Implicit(), 0.9999),
        (optax_pes.FixedPoint(max_steps=100), optax_pes.JacobianFree(), 0.9),
        (optax_pes.Broyden(), optax_pes.Phantom(k=10, damping=0.8), 0.99),
    ],
)
def test_every_adjoint_gives_finite_gradients_near_the_exact_one(
    solver, adjoint, bound, exact, x64
):
    variables, x, cotangent, (ref_v, ref_x) = exact
    deq = optax_pes.linen.DEQ(LAYER64, solver=solver, adjoint=adjoint)
    g_v, g_x = deq_gradients(deq, variables, x, cotangent)
    assert jax.tree.structure(g_v) == jax.tree.structure(variables)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((g_v, g_x)))
    assert cosine(g_v["params"]["layer"], ref_v["params"]) > bound
    assert cosine(g_x, ref_x) > bound


# SHINE's inverse depends on the solver's last tiny steps, which batched and
# unbatched arithmetic round differently: a loose tolerance, as in test_deq.py.
def test_jit_vmap_and_batch_gradients_are_sums_of_per_sample_ones(exact, x64):
    variables = exact[0]
    xs = jax.random.normal(jax.random.key(2), (4, DIM))
    deq = optax_pes.linen.DEQ(
        LAYER64,
        solver=optax_pes.Broyden(max_steps=40, tol=1e-10, memory=40),
        z_init=jnp.zeros_like,
    )

    def loss(v, x):
        return jnp.sum(deq.apply(v, x) ** 2)

    @jax.jit
    def batched(v):
        grads = jax.grad(lambda v: jnp.sum(jax.vmap(loss, (None, 0))(v, xs)))(v)
        zs, infos = jax.vmap(lambda x: deq.apply(v, x, method="solve"))(xs)
        return grads, zs, infos, deq.apply(v, xs[0], jnp.zeros(DIM))

    grads, zs, infos, z_first = batched(variables)
    single_grad = jax.jit(jax.grad(loss))
    total = jax.tree.map(lambda *g: sum(g), *[single_grad(variables, x) for x in xs])
    np.testing.assert_allclose(_flat(grads), _flat(total), rtol=1e-3, atol=1e-9)
    assert zs.shape == xs.shape and infos.converged.shape == (4,)
    assert bool(jnp.all(infos.converged))
    # z_init(x) is the z0 that a call without one uses.
    np.testing.assert_allclose(zs[0], z_first, rtol=1e-9)


class Model(nn.Module):
    """Encoder, a DEQ lifted over the batch with `nn.vmap`, readout."""

    @nn.compact
    def __call__(self, features):
        batched = nn.vmap(
            optax_pes.linen.DEQ,
            in_axes=0,
            variable_axes={"params": None},
            split_rngs={"params": False},
        )
        deq = batched(
            Layer(),
            solver=optax_pes.FixedPoint(max_steps=50),
            adjoint=optax_pes.JacobianFree(),
            z_init=jnp.zeros_like,
        )
        z = deq(nn.Dense(DIM)(features))
        return nn.Dense(1)(z)


def test_nn_vmap_inside_a_linen_model():
    model = Model()
    features = jax.random.normal(jax.random.key(3), (5, 3))
    variables = jax.jit(model.init)(jax.random.key(0), features)
    assert jax.tree.map(jnp.shape, variables["params"]["Layer_0"]) == {
        "Dense_0": {"bias": (DIM,), "kernel": (DIM, DIM)}
    }
    grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, features) ** 2)))(
        variables
    )
    assert jax.tree.structure(grads) == jax.tree.structure(variables)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.linalg.norm(grads["params"]["Layer_0"]["Dense_0"]["kernel"])) > 0


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="layer must be a flax.linen.Module"):
        optax_pes.linen.DEQ(lambda z, x: z)
    with pytest.raises(TypeError, match="layer must be a flax.linen.Module"):
        optax_pes.linen.DEQ(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not provide"):
        optax_pes.linen.DEQ(
            Layer(), solver=optax_pes.Anderson(), adjoint=optax_pes.Shine()
        )
    with pytest.raises(TypeError, match="adjoint must be optax_pes.Shine"):
        optax_pes.linen.DEQ(Layer(), adjoint="shine")
    with pytest.raises(TypeError, match="z_init must be a callable"):
        optax_pes.linen.DEQ(Layer(), z_init=0.0)
    deq = optax_pes.linen.DEQ(Layer())
    init = functools.partial(jax.eval_shape, deq.init, jax.random.key(0))
    x = jnp.ones(DIM)
    with pytest.raises(TypeError, match="z0 is required when the DEQ has no z_init"):
        init(x)
    with pytest.raises(TypeError, match="z0 must be a non-empty pytree of floating"):
        init(x, jnp.zeros(DIM, jnp.int32))
    variables = init(x, jnp.zeros(DIM))
    with pytest.raises(ValueError, match=r"fn\(z0, x\) failed for z0 float32\[7\]"):
        jax.eval_shape(deq.apply, variables, x, jnp.zeros(DIM + 1))
