"""Flax NNX front end: `optax_pes.nnx.DEQ` wraps an `nnx.Module` layer.

Flax users need no Equinox: the wrapper splits the NNX layer into its graph and
state at each call and hands `optax_pes.DEQ` a function of that state, so the
layer's `nnx.Param`s receive gradients through `nnx.grad` as usual. Import it
explicitly (`import optax_pes.nnx`); it needs `flax`.
"""

from typing import Any

import equinox as eqx
from flax import nnx
from jaxtyping import PyTree

from optax_pes._implicit._adjoints import AbstractAdjoint
from optax_pes._implicit._deq import DEQ as _DEQ
from optax_pes._implicit._solvers import AbstractSolver, SolveInfo


class _MergedLayer(eqx.Module):
    """`fn(z, x)` of an NNX layer given as (graph, state): the state is a pytree."""

    graphdef: Any = eqx.field(static=True)
    state: Any

    def __call__(self, z: PyTree, x: Any) -> PyTree:
        return nnx.merge(self.graphdef, self.state)(z, x)


class DEQ(nnx.Module):
    r"""A deep equilibrium layer for Flax NNX models: $z^* = f(z^*, x)$.

    The NNX counterpart of `optax_pes.DEQ`, with the same solvers and adjoints.
    `layer(z, x)` must return the structure, shapes and dtypes of `z` and must not
    mutate its own state (no batch-norm statistics updates inside the fixed point).
    It is differentiated as `optax_pes.DEQ` is: in reverse mode, to first order
    (second-order derivatives through the fixed point raise `NotImplementedError`),
    and a failed backward solve warns (`throw=True` on the adjoint: raises).

    **Arguments:**

    - `layer`: an `nnx.Module` with `__call__(z, x) -> z`.
    - `solver`: `optax_pes.Broyden()` (default), `Anderson()` or `FixedPoint()`.
    - `adjoint`: `optax_pes.Shine()` (default), `Implicit()`, `JacobianFree()` or
      `Phantom()`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_pes, optax_pes.nnx
    >>> class Layer(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.linear = nnx.Linear(4, 4, rngs=rngs)
    ...     def __call__(self, z, x):
    ...         return jnp.tanh(0.5 * self.linear(z) + x)
    >>> deq = optax_pes.nnx.DEQ(Layer(nnx.Rngs(0)), adjoint=optax_pes.Shine())
    >>> z_star = deq(jnp.ones(4), jnp.zeros(4))
    >>> grads = nnx.grad(lambda d: jnp.sum(d(jnp.ones(4), jnp.zeros(4))))(deq)

    ```
    """

    def __init__(
        self,
        layer: nnx.Module,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ):
        if not isinstance(layer, nnx.Module):
            raise TypeError(
                f"layer must be a flax.nnx.Module, got {type(layer).__name__} "
                "(for an Equinox module or a function, use optax_pes.DEQ)"
            )
        # Validates solver/adjoint now, with the same messages as optax_pes.DEQ.
        _DEQ(layer, solver=solver, adjoint=adjoint)
        self.layer = layer
        self.solver = solver
        self.adjoint = adjoint

    def _deq(self) -> _DEQ:
        graphdef, state = nnx.split(self.layer)
        return _DEQ(
            _MergedLayer(graphdef, state), solver=self.solver, adjoint=self.adjoint
        )

    def __call__(self, x: Any, z0: PyTree) -> PyTree:
        """The fixed point (as $f(z^*, x)$), differentiable per `adjoint`."""
        return self._deq()(x, z0)

    def solve(self, x: Any, z0: PyTree) -> tuple[PyTree, SolveInfo]:
        """`(z_star, info)` as `optax_pes.DEQ.solve`."""
        return self._deq().solve(x, z0)
