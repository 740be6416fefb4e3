"""Convolutions rewritten into the layout XLA:CPU keeps fast inside loops.

`canonical_convolutions` must compute exactly what the function it rewrites computes
(every layout, stride, dilation, grouping; under jit, vmap and grad) and leave no
non-canonical convolution behind; a DEQ on a convolutional layer (which goes through
it in its solvers and backward solves) must still give the exact implicit gradient.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes._implicit import _adjoints
from optax_pes._implicit._layout import _needs_rewrite, canonical_convolutions

from .helpers import slow

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the rewrite only happens on the CPU"
)

# (lhs layout, rhs layout, out layout, strides, lhs dilation, rhs dilation, groups)
# (The default suite runs the first and the grouped one; `-m slow` all five.)
CASES = [
    ("NCHW", "OIHW", "NCHW", (1, 1), (1, 1), (1, 1), 1),  # eqx.nn.Conv2d
    slow(("NHWC", "HWOI", "NHWC", (1, 1), (1, 1), (1, 1), 1)),  # an input VJP's kernel
    slow(("NHWC", "HWIO", "NCHW", (2, 1), (1, 1), (1, 2), 1)),
    ("NCHW", "IOHW", "NHWC", (1, 1), (2, 1), (1, 1), 2),  # grouped, lhs-dilated
    slow(("HWNC", "OHWI", "CHWN", (1, 2), (1, 1), (2, 1), 1)),
]


def _conv(layouts, strides, lhs_dilation, rhs_dilation, groups):
    def conv(lhs, rhs):
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            strides,
            [(1, 1), (2, 0)],
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=layouts,
            feature_group_count=groups,
        )

    return conv


def _operands(layouts, groups, key):
    sizes = {"N": 2, "C": 4, "H": 5, "W": 6}
    kernel = {"O": 6, "I": 4 // groups, "H": 3, "W": 2}
    k1, k2 = jax.random.split(key)
    lhs = jax.random.normal(k1, tuple(sizes[c] for c in layouts[0]))
    rhs = jax.random.normal(k2, tuple(kernel[c] for c in layouts[1]))
    return lhs, rhs


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c[:3]))
def test_rewritten_convolutions_compute_the_same(case):
    *layouts, strides, lhs_dil, rhs_dil, groups = case
    conv = _conv(tuple(layouts), strides, lhs_dil, rhs_dil, groups)
    lhs, rhs = _operands(layouts, groups, jax.random.key(0))
    rewritten = canonical_convolutions(conv, lhs, rhs)
    assert rewritten is not conv
    assert not _needs_rewrite(jax.make_jaxpr(rewritten)(lhs, rhs).jaxpr)
    np.testing.assert_allclose(
        jax.jit(rewritten)(lhs, rhs), conv(lhs, rhs), rtol=1e-5, atol=1e-5
    )
    # Under vmap (a batch of inputs, shared kernel) and grad.
    batch = jnp.stack([lhs, 2 * lhs])
    np.testing.assert_allclose(
        jax.vmap(rewritten, (0, None))(batch, rhs),
        jax.vmap(conv, (0, None))(batch, rhs),
        rtol=1e-5,
        atol=1e-5,
    )
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(rewritten(a, b))), (0, 1))(lhs, rhs)
    expected = jax.grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b))), (0, 1))(lhs, rhs)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_input_vjp_of_a_channels_last_layer_is_rewritten():
    """The VJP w.r.t. the input of an NHWC/HWIO convolution (canonical itself) is a
    convolution with an HWOI kernel: the backward solves' case."""
    conv = _conv(("NHWC", "HWIO", "NHWC"), (1, 1), (1, 1), (1, 1), 1)
    lhs, rhs = _operands(("NHWC", "HWIO"), 1, jax.random.key(1))
    assert canonical_convolutions(conv, lhs, rhs) is conv  # nothing to rewrite
    _, vjp = jax.vjp(lambda z: conv(z, rhs), lhs)
    out = conv(lhs, rhs)
    assert _needs_rewrite(jax.make_jaxpr(vjp)(out).jaxpr)
    rewritten = canonical_convolutions(vjp, out)
    assert not _needs_rewrite(jax.make_jaxpr(rewritten)(out).jaxpr)
    np.testing.assert_allclose(rewritten(out)[0], vjp(out)[0], rtol=1e-5, atol=1e-5)


def test_functions_without_convolutions_are_left_alone():
    fn = lambda x: jnp.tanh(x) @ x
    assert canonical_convolutions(fn, jnp.ones((3, 3))) is fn


class _ConvCell(eqx.Module):
    """`tanh(0.5 * conv(z) + x)` in NCHW (eqx.nn.Conv2d's layout), a contraction."""

    conv: eqx.nn.Conv2d

    def __init__(self, key):
        self.conv = eqx.nn.Conv2d(2, 2, 3, padding=1, key=key)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.conv(z) + x)


def _exact_gradient(cell, x, z_star, cotangent):
    """The implicit gradient w.r.t. the cell and x from a dense solve at z*."""
    flat = lambda z: cell(z.reshape(z_star.shape), x).ravel()
    jac = jax.jacobian(flat)(z_star.ravel())
    w = jnp.linalg.solve(jnp.eye(jac.shape[0]) - jac.T, cotangent.ravel())
    _, vjp = jax.vjp(lambda c, x: c(z_star, x), cell, x)
    return vjp(w.reshape(z_star.shape))


@pytest.mark.parametrize(
    "adjoint",
    [
        slow(optax_pes.Implicit(tol=1e-7)),
        optax_pes.Implicit(tol=1e-7, linear_solver="fixed_point", max_steps=200),
        optax_pes.Shine(refine_steps=40),
    ],
    ids=["Implicit-gmres", "Implicit-fixed_point", "Shine-refine40"],
)
def test_conv_deq_gradient_is_exact(adjoint):
    """A DEQ on an NCHW convolutional layer (its solver loop and backward solve run
    rewritten convolutions) gives the dense-solve implicit gradient."""
    cell = _ConvCell(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4))
    cotangent = jax.random.normal(jax.random.key(2), (2, 4, 4))
    deq = optax_pes.DEQ(
        cell, solver=optax_pes.Broyden(tol=1e-7, max_steps=200), adjoint=adjoint
    )
    z0 = jnp.zeros_like(x)

    def loss(deq, x):
        return jnp.sum(deq(x, z0) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(deq, x)
    z_star, info = deq.solve(x, z0)
    assert bool(info.converged)
    cell_grad, x_grad = _exact_gradient(cell, x, z_star, cotangent)
    np.testing.assert_allclose(grads[1], x_grad, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        grads[0].fn.conv.weight, cell_grad.conv.weight, rtol=1e-3, atol=1e-5
    )


def test_refinement_unrolled_equals_refinement_looped(monkeypatch):
    """`Shine(refine_steps=r)` runs unrolled for small r and in a loop beyond: the
    same numbers either way."""
    cell = _ConvCell(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (2, 4, 4))
    deq = optax_pes.DEQ(
        cell,
        solver=optax_pes.Broyden(tol=1e-6),
        adjoint=optax_pes.Shine(refine_steps=5),
    )
    z0 = jnp.zeros_like(x)
    loss = lambda deq, x: jnp.sum(jnp.sin(deq(x, z0)))
    unrolled = jax.jit(jax.grad(loss, argnums=(0, 1)))(deq, x)
    monkeypatch.setattr(_adjoints, "_MAX_UNROLLED_REFINE", 0)
    looped = jax.jit(jax.grad(loss, argnums=(0, 1)))(deq, x)
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
