"""Small pytree utilities both halves of the library use."""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree


def tree_where(mask: Bool[Array, " n"], on_true: PyTree, on_false: PyTree) -> PyTree:
    """Select along the leading axis of every leaf with a 1-d mask."""

    def select(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(select, on_true, on_false)


def tree_all_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether every element of every leaf is finite (leaf by leaf: no norm that
    could overflow)."""
    finite = jnp.asarray(True)
    for leaf in jax.tree.leaves(tree):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    return finite


def stop_gradient(tree: Any) -> Any:
    """`lax.stop_gradient` on every array leaf, other leaves untouched."""
    return jax.tree.map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, tree
    )


def add_to_updates(updates: PyTree, estimate: PyTree) -> PyTree:
    """`updates + estimate`, leaf by leaf, in the dtypes of `updates` (an estimator
    transformation *adds* its estimate, as optax's `add_noise` adds noise).

    An `updates` leaf whose float type has a smaller range than both the
    estimate's and float32's (float16 updates for float32 params) is refused: the
    cast would turn an ordinary finite estimate into inf after every finiteness
    check. bfloat16, and float32 updates for float64 params, are allowed.
    """

    def add(u, e):
        u_type, e_type = jnp.result_type(u), jnp.result_type(e)
        if (
            jnp.issubdtype(u_type, jnp.floating)
            and jnp.issubdtype(e_type, jnp.floating)
            and jnp.finfo(u_type).maxexp < min(jnp.finfo(e_type).maxexp, 128)
        ):
            raise TypeError(
                f"updates has dtype {u_type} where the params (and the estimate) are "
                f"{e_type}: pass updates in the params' dtypes, e.g. "
                "jax.tree.map(jnp.zeros_like, params)"
            )
        return (u + e).astype(u_type)

    return jax.tree.map(add, updates, estimate)


def global_norm_f32(tree: PyTree) -> Array:
    """The l2 norm of all leaves, as a float32 scalar (for diagnostics)."""
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
    return jnp.sqrt(jnp.asarray(sq, jnp.float32))


def scaled_global_norm_f32(tree: PyTree) -> Array:
    """`global_norm_f32` computed over the largest entry, so that it is finite for
    every tree of finite float32 values (squaring overflows past 1.8e19)."""
    leaves = [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    peak = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(x), initial=0) for x in leaves]
    )
    scale = jnp.where((peak > 0) & jnp.isfinite(peak), peak, 1)
    return scale * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for x in leaves))


def at_least_float32(dtype: Any) -> jnp.dtype:
    """`dtype` where it is at least as wide as float32, else float32: the dtype to
    sum, score or solve in for bfloat16 and float16 values. (Chosen, not promoted:
    under `jax.numpy_dtype_promotion("strict")` a 16-bit float and float32 have no
    implicit promotion.) Other dtypes (integers, which the callers' checks refuse
    with their own message) are returned as they are."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype


def vector_norm(v: Array) -> Array:
    """`jnp.linalg.norm(v)` in at least float32: a float16 norm overflows once it
    passes 256 (its square passes float16's largest value, 65504)."""
    return jnp.linalg.norm(v.astype(at_least_float32(v.dtype)))
