"""optax_pes.models: the multiscale DEQ's gradients, every adjoint, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import optax_pes
from optax_pes.models import Conv2d, GroupNorm, MDEQCell, MDEQClassifier

from .helpers import slow

ADJOINTS = {
    "Shine": optax_pes.Shine(),
    "Shine(refine_steps=5)": optax_pes.Shine(refine_steps=5),
    "JacobianFree": optax_pes.JacobianFree(),
    # (k=2, not 5: each step is unrolled, and compiling it dominates the test.)
    "Phantom": optax_pes.Phantom(k=2),
}
# Implicit: in test_gradient_matches_the_dense_implicit_gradient (jit, vmap, exact).


def tiny(adjoint, solver=None):
    """A 4x4 one-channel input, two resolutions of 2 and 3 channels."""
    return MDEQClassifier(
        1, 3, (2, 3), groups=1, solver=solver, adjoint=adjoint, key=jax.random.key(0)
    )


def images(num):
    return jax.random.normal(jax.random.key(1), (num, 4, 4, 1))


def test_gradient_matches_the_dense_implicit_gradient(x64):
    # Also the Implicit adjoint's jit + vmap check (it is not in ADJOINTS' test).
    tight = optax_pes.Broyden(max_steps=200, tol=1e-12, memory=200)
    model = tiny(optax_pes.Implicit(max_steps=200, tol=1e-12), tight)
    batch = images(2)
    weights = jax.random.normal(jax.random.key(2), (3,))
    loss = lambda m: jnp.sum(jax.vmap(m)(batch) @ weights)
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)

    # The exact gradient: z* from a tight solve; w = (I - J^T)^{-1} zbar with a
    # dense Jacobian (solved by NumPy); then the VJP of f at z* w.r.t. the cell and
    # x (hence the stem), plus the head's own gradient.
    @eqx.filter_jit
    def dense(model, image):
        x = model.inject(image)
        z_star, info = model.deq.solve(x, tuple(jnp.zeros_like(a) for a in x))
        flat, unravel = ravel_pytree(z_star)
        jac = jax.jacobian(lambda v: ravel_pytree(model.cell(unravel(v), x))[0])(flat)
        zbar = jax.grad(lambda z: jnp.vdot(weights, model.readout(z)))(z_star)
        return z_star, info, jac, ravel_pytree(zbar)[0]

    @eqx.filter_jit
    def surrogate_grad(model, z_star, w):
        def surrogate(m, image, z_star, w):
            f = ravel_pytree(m.cell(z_star, m.inject(image)))[0]
            return jnp.vdot(w, f) + jnp.vdot(weights, m.readout(z_star))

        total = lambda m: jnp.sum(
            jax.vmap(surrogate, (None, 0, 0, 0))(m, batch, z_star, w)
        )
        return eqx.filter_grad(total)(model)

    z_star, info, jac, zbar = jax.vmap(dense, (None, 0))(model, batch)
    assert bool(jnp.all(info.converged))
    eye = np.eye(jac.shape[-1])
    w = np.linalg.solve(
        np.swapaxes(eye - np.asarray(jac), 1, 2), np.asarray(zbar)[..., None]
    )
    expected = surrogate_grad(model, z_star, jnp.asarray(w[..., 0]))
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    got, want = ravel_pytree(grads)[0], ravel_pytree(expected)[0]
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # The cell's parameters matter (not only the head's).
    assert float(jnp.linalg.norm(ravel_pytree(expected.deq)[0])) > 1e-3


# SHINE and Jacobian-free in the default suite; the others (10-12 s each on CPU)
# with `-m slow`.
@pytest.mark.parametrize(
    "name",
    [n if n in ("Shine", "JacobianFree") else slow(n) for n in ADJOINTS],
)
def test_every_adjoint_gives_finite_gradients_under_jit_and_vmap(name):
    model = tiny(ADJOINTS[name])
    batch = images(2)

    @eqx.filter_jit
    def loss_and_grad(model, batch):
        def loss(m):
            logits, info = jax.vmap(m.solve)(batch)
            return jnp.mean(logits**2), (logits, info)

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (loss, (logits, info)), grads = loss_and_grad(model, batch)
    assert logits.shape == (2, 3) and info.steps.shape == (2,)
    params = eqx.filter(model, eqx.is_array)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.linalg.norm(ravel_pytree(grads.deq)[0])) > 0
    assert bool(jnp.isfinite(loss))


def test_three_resolutions_and_a_traced_constructor():
    cell = MDEQCell((2, 3, 4), groups=1, key=0)
    z = cell.zeros(8, 4)
    assert [a.shape for a in z] == [(8, 4, 2), (4, 2, 3), (2, 1, 4)]
    out = jax.eval_shape(cell, z, z)
    assert [a.shape for a in out] == [a.shape for a in z]
    # Constructed under a trace (jax.random draws the weights instead of NumPy).
    shapes = eqx.filter_eval_shape(
        lambda k: MDEQClassifier(3, 5, (2, 4), groups=2, key=k), jax.random.key(0)
    )
    assert shapes.head_weight.shape == (5, 6)
    # The same key gives the same weights.
    a = MDEQClassifier(1, 3, (2, 3), groups=1, key=7)
    b = MDEQClassifier(1, 3, (2, 3), groups=1, key=jax.random.key(7))
    assert all(
        bool(jnp.all(x == y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_default_adjoint_is_the_one_that_trains_it():
    # examples/mdeq_digits.py (16 seeds, cosine rate): Shine(refine_steps=5)
    # trained it to 97.15 %, Implicit to 96.49 %, plain Shine() to 95.76 %.
    model = MDEQClassifier(1, 3, (2, 3), groups=1, key=0)
    assert model.deq.adjoint == optax_pes.Shine(refine_steps=5)
    assert model.deq.solver == optax_pes.Broyden(max_steps=30, tol=1e-4, memory=30)


def test_building_blocks_are_channels_last():
    x = jax.random.normal(jax.random.key(0), (6, 4, 3))
    conv = Conv2d(3, 5, 3, 2, key=0)
    assert conv(x).shape == (3, 2, 5)
    norm = GroupNorm(4, groups=2)
    y = norm(jax.random.normal(jax.random.key(1), (3, 3, 4)) * 3.0 + 1.0)
    groups = y.reshape(3, 3, 2, 2)
    np.testing.assert_allclose(groups.mean(axis=(0, 1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(groups.std(axis=(0, 1, 3)), 1.0, atol=1e-3)


def test_bad_input_names_the_argument():
    model = tiny(None)
    with pytest.raises(ValueError, match=r"image must be one channels-last image"):
        model(jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"image must be .* in_channels=1"):
        model(jnp.ones((4, 4, 2)))
    with pytest.raises(ValueError, match=r"image's \(H, W\) must be .* got \(5, 4\)"):
        model(jnp.ones((5, 4, 1)))
    # Before: lax's "conv_general_dilated requires arguments to have the same dtypes".
    with pytest.raises(TypeError, match=r"image must have the model's dtype float32"):
        model(jnp.ones((4, 4, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"groups must divide every channel count"):
        MDEQClassifier(1, 3, (2, 3), groups=2, key=0)
    with pytest.raises(TypeError, match=r"channels must be a non-empty tuple"):
        MDEQCell(16, key=0)
    with pytest.raises(ValueError, match=r"channels\[1\] must be an int >= 1"):
        MDEQCell((4, 0), groups=1, key=0)
    with pytest.raises(TypeError, match=r"num_classes must be an int"):
        MDEQClassifier(1, 2.5, key=0)
    with pytest.raises(ValueError, match=r"kernel_size must be odd"):
        Conv2d(1, 1, 2, key=0)
    cell = model.cell
    z = cell.zeros(4, 4)
    with pytest.raises(ValueError, match=r"z must be a tuple of 2 arrays"):
        cell(z[:1], z)
    with pytest.raises(ValueError, match=r"x must be a tuple of 2 arrays"):
        cell(z, (z[0], jnp.zeros((2, 2, 4))))
