"""One sample's layer on a flat vector: what the solvers iterate and the adjoints solve.

The DEQ's state `z` is any pytree; the forward solvers (`_solvers`) and the backward
linear solves (`_adjoints`) both work on its flattened form, through `flat_layer` and
`flat_vjp`. Both run inside loops, so their convolutions are put in the layout XLA:CPU
keeps fast there (`_layout`).
"""

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from optax_pes._implicit._layout import canonical_convolutions

FlatFn: TypeAlias = Callable[[Float[Array, " d"]], Float[Array, " d"]]
"""A layer `f(., x)` on one sample's flattened state: `z_flat -> f(z, x)` flattened,
same size and dtype (the solvers find its fixed point, the adjoints take its VJP)."""


def flat_layer(
    fn: Callable[..., PyTree], x: Any, z_like: PyTree
) -> tuple[FlatFn, Float[Array, " d"], Callable[[Float[Array, " d"]], PyTree]]:
    """`f(., x)` on the flattened state, the flat `z_like` and its unravel function."""
    z_flat, unravel = ravel_pytree(z_like)

    def layer(z: Float[Array, " d"]) -> Float[Array, " d"]:
        return ravel_pytree(fn(unravel(z), x))[0]

    return canonical_convolutions(layer, z_flat), z_flat, unravel


def flat_vjp(layer: FlatFn, z: Float[Array, " d"]) -> FlatFn:
    r"""$w \mapsto J_f(z)^\top w$ for a flat layer, linearised once at `z`."""
    _, vjp = jax.vjp(layer, z)
    return canonical_convolutions(lambda w: vjp(w)[0], z)
