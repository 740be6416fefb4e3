"""Flax linen front end: `optax_pes.linen.DEQ` wraps a `linen.Module` layer.

Linen users need no Equinox: at each call the wrapper takes the layer's variables
from its scope and hands `optax_pes.DEQ` the pure function
`layer.apply(variables, z, x)`, so the layer's parameters receive gradients through
`jax.grad` of `deq.apply(variables, x)` as usual. Import it explicitly
(`import optax_pes.linen`); it needs `flax`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
from jaxtyping import PyTree

from optax_pes._checks import check_callable
from optax_pes._implicit._adjoints import AbstractAdjoint
from optax_pes._implicit._deq import DEQ as _DEQ, _check_z0
from optax_pes._implicit._solvers import AbstractSolver, SolveInfo


class _AppliedLayer(eqx.Module):
    """`fn(z, x)` of an unbound linen layer and its variables (a pytree)."""

    layer: nn.Module = eqx.field(static=True)
    variables: Any

    def __call__(self, z: PyTree, x: Any) -> PyTree:
        return self.layer.apply(self.variables, z, x)


class DEQ(nn.Module):
    r"""A deep equilibrium layer for Flax linen models: $z^* = f(z^*, x)$.

    The linen counterpart of `optax_pes.DEQ`, with the same solvers and adjoints.
    `layer(z, x)` must return the structure, shapes and dtypes of `z`, be
    deterministic (no `make_rng`: no dropout inside the fixed point) and must not
    mutate its variables (no batch-norm statistics updates). `init` creates the
    layer's variables by calling `layer(z0, x)` once; linen places them under the
    DEQ's `"layer"` (or, for a layer constructed in a parent's compact method,
    under that parent). One sample per call: `nn.vmap` the DEQ (or `jax.vmap` its
    `apply`) over a batch. It is differentiated as `optax_pes.DEQ` is: in reverse
    mode, to first order (second-order derivatives through the fixed point raise
    `NotImplementedError`), and a failed backward solve warns (`throw=True` on the
    adjoint: raises).

    **Arguments** (the module's fields, as in
    `DEQ(layer, solver=None, adjoint=None, z_init=None)`)**:**

    - `layer`: a `flax.linen.Module` with `__call__(z, x) -> z`.
    - `solver`: `optax_pes.Broyden()` (default), `Anderson()` or `FixedPoint()`.
    - `adjoint`: `optax_pes.Shine()` (default), `Implicit()`, `JacobianFree()` or
      `Phantom()`.
    - `z_init`: optional `z_init(x) -> z0` (e.g. `jnp.zeros_like`), the initial
      guess used when a call passes no `z0`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax_pes, optax_pes.linen
    >>> class Layer(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, z, x):
    ...         return jnp.tanh(0.5 * nn.Dense(4)(z) + x)
    >>> deq = optax_pes.linen.DEQ(Layer(), z_init=jnp.zeros_like)
    >>> variables = deq.init(jax.random.key(0), jnp.ones(4))
    >>> z_star = deq.apply(variables, jnp.ones(4))
    >>> grads = jax.grad(lambda v: jnp.sum(deq.apply(v, jnp.ones(4))))(variables)
    >>> z_star, info = deq.apply(variables, jnp.ones(4), method="solve")
    >>> bool(info.converged)
    True

    ```
    """

    layer: nn.Module
    solver: AbstractSolver | None = None
    adjoint: AbstractAdjoint | None = None
    z_init: Callable[[Any], PyTree] | None = None

    def __post_init__(self):
        if not isinstance(self.layer, nn.Module):
            raise TypeError(
                f"layer must be a flax.linen.Module, got {type(self.layer).__name__} "
                "(for an Equinox module or a function, use optax_pes.DEQ; for an "
                "nnx.Module, optax_pes.nnx.DEQ)"
            )
        if self.z_init is not None:
            check_callable(self.z_init, "z_init", "z_init(x) -> z0")
        # Validates solver/adjoint now, with the same messages as optax_pes.DEQ.
        _DEQ(lambda z, x: z, solver=self.solver, adjoint=self.adjoint)
        super().__post_init__()

    def __call__(self, x: Any, z0: PyTree | None = None) -> PyTree:
        """The fixed point (as $f(z^*, x)$), differentiable per `adjoint`."""
        return self.solve(x, z0)[0]

    def solve(self, x: Any, z0: PyTree | None = None) -> tuple[PyTree, SolveInfo]:
        """`(z_star, info)` as `optax_pes.DEQ.solve` (`method="solve"` in `apply`)."""
        if z0 is None:
            if self.z_init is None:
                raise TypeError(
                    "z0 is required when the DEQ has no z_init: pass z0 or set "
                    "z_init=jnp.zeros_like (or another z_init(x) -> z0)"
                )
            z0 = self.z_init(x)
        if self.is_initializing():
            _check_z0(z0)
            self.layer(z0, x)  # creates the layer's variables
        layer, variables = self.layer.unbind()
        deq = _DEQ(
            _AppliedLayer(layer, variables), solver=self.solver, adjoint=self.adjoint
        )
        return deq.solve(x, z0)
