"""A deep equilibrium layer for Equinox models, with SHINE and other adjoints."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from optax_pes._checks import check_callable, check_same_structure, describe
from optax_pes._compile import SharedJit
from optax_pes._implicit._adjoints import AbstractAdjoint, Shine
from optax_pes._implicit._flat import flat_layer
from optax_pes._implicit._solvers import AbstractSolver, Broyden, SolveInfo, solve
from optax_pes._tree import stop_gradient


class DEQ(eqx.Module):
    r"""A deep equilibrium layer: the fixed point $z^* = f(z^*, x)$, differentiable.

    The forward pass solves for $z^*$ with `solver` (no graph is kept: memory does
    not grow with the solver's steps) and returns one more application
    $f(z^*, x)$; the backward pass is defined by `adjoint`:

    | adjoint | backward pass | cost |
    |---|---|---|
    | `Shine()` | $w = -B^{-\top}\bar z$, the forward Broyden inverse | $O(md)$, 1 VJP |
    | `Shine(refine_steps=r)` | SHINE, then $r$ fixed-point steps | $r + 1$ VJPs |
    | `Implicit()` | $(I - J^\top) w = \bar z$ by GMRES to tolerance | many VJPs |
    | `JacobianFree()` | $w = \bar z$ | 1 VJP |
    | `Phantom(k, damping)` | backprop through $k$ damped steps from $z^*$ | $k$ VJPs |

    Gradients flow to the parameters of `fn` and to `x`, never to `z0`, in reverse
    mode and to first order: forward mode (`jax.jvp`) and second-order derivatives
    (`jax.hessian`) through the fixed point are refused. One sample per call:
    `jax.vmap` over a batch gives every sample its own quasi-Newton inverse and its
    own convergence test.

    **Arguments:**

    - `fn`: `fn(z, x) -> z`, returning the structure, shapes and dtypes of `z`.
      An `eqx.Module` (its array fields are the parameters) or any function; the
      arrays a function closes over (`lambda z, x: jnp.tanh(w @ z + x)`) are
      differentiated as a module's fields would be.
    - `solver`: `optax_pes.Broyden` (default), `Anderson` or `FixedPoint`.
    - `adjoint`: `optax_pes.Shine()` (default), `Implicit`, `JacobianFree` or
      `Phantom`. `Shine` needs a solver that provides an inverse (Broyden).

    **Example:**

    ```python
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import optax_pes
    >>> class Layer(eqx.Module):
    ...     linear: eqx.nn.Linear
    ...     def __call__(self, z, x):
    ...         return jnp.tanh(0.5 * self.linear(z) + x)
    >>> deq = optax_pes.DEQ(Layer(eqx.nn.Linear(4, 4, key=jax.random.key(0))))
    >>> z_star, info = deq.solve(jnp.ones(4), jnp.zeros(4))
    >>> bool(info.converged)
    True
    >>> grads = eqx.filter_grad(lambda d: jnp.sum(d(jnp.ones(4), jnp.zeros(4))))(deq)

    ```

    **References:** Bai, Kolter, Koltun, *Deep Equilibrium Models*, NeurIPS 2019;
    Ramzi et al., *SHINE*, ICLR 2022, <https://arxiv.org/abs/2106.00553>.
    """

    fn: Callable[..., PyTree]
    solver: AbstractSolver
    adjoint: AbstractAdjoint

    def __init__(
        self,
        fn: Callable[..., PyTree],
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ):
        self.fn = check_callable(fn, "fn", "fn(z, x) -> z")
        self.solver = Broyden() if solver is None else solver
        self.adjoint = Shine() if adjoint is None else adjoint

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(
                "solver must be optax_pes.Broyden, Anderson or FixedPoint, got "
                f"{type(self.solver).__name__}"
            )
        if not isinstance(self.adjoint, AbstractAdjoint):
            raise TypeError(
                "adjoint must be optax_pes.Shine, Implicit, JacobianFree or Phantom, "
                f"got {type(self.adjoint).__name__}"
            )
        self.adjoint.check_solver(self.solver)

    def __call__(self, x: Any, z0: PyTree) -> PyTree:
        """The fixed point (as $f(z^*, x)$), differentiable per `adjoint`."""
        return self.solve(x, z0)[0]

    def solve(self, x: Any, z0: PyTree) -> tuple[PyTree, SolveInfo]:
        """`(z_star, info)`; `info` has `steps`, `residual`, `relative_residual`,
        `converged` (all stop-gradient).

        A solve that does not converge returns its lowest-residual iterate with
        `info.converged == False`; gradients stay finite. (The backward pass's own
        solve, if the adjoint has one, reports failures with a `RuntimeWarning`.)

        Eagerly too it runs as one compiled program, shared by calls with the same
        `fn` and static fields (as `eqx.filter_jit` would): `fn`'s arrays are its
        arguments, and what `fn` reads from elsewhere (a global, a plain Python
        attribute) is read when the program is first built.
        """
        return _compiled_solve(self, x, z0)

    def _solve(self, x: Any, z0: PyTree) -> tuple[PyTree, SolveInfo]:
        fn = self._layer(x, z0)
        layer, z0_flat, unravel = flat_layer(
            stop_gradient(fn), stop_gradient(x), stop_gradient(z0)
        )
        z_flat, info, inverse = solve(self.solver, layer, z0_flat)
        z_star = unravel(jax.lax.stop_gradient(z_flat))
        # The backward pass saves what the adjoint is given: the (memory, d)
        # inverse buffers only for an adjoint that reads them.
        inverse = stop_gradient(inverse) if self.adjoint.needs_inverse else None
        info = stop_gradient(info)
        return self.adjoint.output(fn, x, z_star, inverse), info

    def _layer(self, x: Any, z0: PyTree) -> Callable[..., PyTree]:
        """`fn`, checked against `z0`, with the arrays it closes over as pytree leaves.

        (Closure-converted, so that the solver's loop and the backward pass see them
        as inputs, stop-gradient and residuals, rather than as leaked tracers.)
        """
        _check_z0(z0)
        try:
            fn = eqx.filter_closure_convert(self.fn, z0, x)
            out = fn.out_struct
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"fn(z0, x) failed for z0 {describe(z0)}: {e}") from e
        check_same_structure(
            out,
            z0,
            lambda expected, got: (
                "fn(z, x) must return the structure, shapes and dtypes of z0: z0 is "
                f"{expected}, fn(z0, x) gave {got}"
            ),
        )
        return fn


# Every solve runs as one compiled program, shared by calls with the layer's
# structure (its functions and static fields; its arrays are arguments). Called
# eagerly, or under an eager `jax.vmap` or `jax.grad`, the solver's while loop would
# otherwise be built from new closures and compiled again on every call (0.6 s a
# call for a d = 64 layer), each compile leaving memory mappings behind. Inside a
# `jit` it is a nested call that XLA inlines.
_compiled_solve = SharedJit(DEQ._solve)


def _check_z0(z0: PyTree) -> None:
    """`z0` is a non-empty pytree of floating-point arrays (the initial guess)."""
    leaves = jax.tree.leaves(z0)
    if leaves and all(
        eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating) for a in leaves
    ):
        return
    if not leaves:
        got = repr(z0)
    elif all(eqx.is_array(a) for a in leaves):
        got = describe(z0)
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(z0)):
        got = f"{type(z0).__name__} {z0!r}, not an array"
    else:
        kinds = sorted({type(a).__name__ for a in leaves if not eqx.is_array(a)})
        got = (
            f"{type(z0).__name__} with Python {', '.join(kinds)} leaves, not arrays "
            "(convert them with jnp.asarray)"
        )
    raise TypeError(
        f"z0 must be a non-empty pytree of floating-point arrays, got {got}"
    )
