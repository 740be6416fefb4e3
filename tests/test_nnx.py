"""The Flax NNX front end gives the Equinox DEQ's gradients and trains in nnx loops."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_pes
import optax_pes.nnx


class NNXLayer(nnx.Module):
    def __init__(self, dim, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.linear(z) + x)


class EqxLayer(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(0.5 * (z @ self.weight + self.bias) + x)


@pytest.mark.parametrize("adjoint", [optax_pes.Shine(), optax_pes.Implicit()])
def test_same_gradients_as_the_equinox_layer(adjoint):
    layer = NNXLayer(5, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5,))
    z0 = jnp.zeros(5)
    nnx_deq = optax_pes.nnx.DEQ(layer, adjoint=adjoint)
    grads = nnx.grad(lambda d: jnp.sum(d(x, z0) ** 2))(nnx_deq)
    eqx_layer = EqxLayer(layer.linear.kernel[...], layer.linear.bias[...])
    eqx_grads = eqx.filter_grad(lambda d: jnp.sum(d(x, z0) ** 2))(
        optax_pes.DEQ(eqx_layer, adjoint=adjoint)
    )
    np.testing.assert_allclose(
        grads.layer.linear.kernel[...], eqx_grads.fn.weight, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        grads.layer.linear.bias[...], eqx_grads.fn.bias, rtol=1e-5, atol=1e-7
    )
    z, info = nnx_deq.solve(x, z0)
    assert bool(info.converged) and z.shape == (5,)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.encoder = nnx.Linear(4, 8, rngs=rngs)
        self.deq = optax_pes.nnx.DEQ(NNXLayer(8, rngs))
        self.decoder = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        h = self.encoder(x)
        return self.decoder(jax.vmap(self.deq, in_axes=(0, None))(h, jnp.zeros(8)))


def test_trains_inside_an_nnx_loop():
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = jnp.sum(x, axis=1, keepdims=True)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return jnp.mean((model(x) - y) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    first = float(step(model, optimizer))
    for _ in range(60):
        last = float(step(model, optimizer))
    assert last < 0.2 * first


def test_rejects_non_nnx_layers():
    with pytest.raises(TypeError, match="layer must be a flax.nnx.Module"):
        optax_pes.nnx.DEQ(lambda z, x: z)
    with pytest.raises(ValueError, match="does not provide"):
        optax_pes.nnx.DEQ(
            NNXLayer(3, nnx.Rngs(0)),
            solver=optax_pes.Anderson(),
            adjoint=optax_pes.Shine(),
        )
