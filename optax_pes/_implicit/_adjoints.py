r"""How a DEQ differentiates through its fixed point: SHINE and its alternatives.

With $z^* = f(z^*, x)$ and an incoming cotangent $\bar z$, the exact (implicit)
gradient w.r.t. $f$'s parameters and $x$ is the VJP of $f$ at $z^*$ with

$$w = (I - J_f^\top)^{-1} \bar z = -J_g^{-\top} \bar z, \qquad g = f - I .$$

Every adjoint returns the layer's output as one more application of $f$ at the
(stop-gradient) fixed point, $f(z^*, x)$, so the parameters' cotangent always comes
from an ordinary, batched VJP of $f$; the adjoints that estimate $w$ (`Shine`,
`Implicit`) place a custom-VJP identity on that output which turns $\bar z$ into $w$.
Under `jax.vmap` the per-sample work is then only the $w$ solve, and $f$'s VJP is the
one batched VJP a backward pass must pay.

Every adjoint's output passes through that one identity, `_backward_map` (for
`JacobianFree` and `Phantom` it leaves $\bar z$ as it is). Its backward pass refuses
to be differentiated: it holds $z^*$ constant, so a second-order derivative would miss
$\mathrm{d}z^*/\mathrm{d}\theta$; and, being a custom VJP, it makes a DEQ reverse-mode
only. An iterative backward solve that fails (`Implicit`, `Shine` refinement) is
replaced by a bounded estimate and reported: a `RuntimeWarning`, or an error with
`throw=True`.
"""

import abc
import functools
from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
from jax.custom_derivatives import SymbolicZero
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PyTree

from optax_pes._checks import check_choice, check_float, check_int, python_float, warn
from optax_pes._implicit._flat import FlatFn, flat_layer, flat_vjp
from optax_pes._implicit._solvers import AbstractSolver, LowRankInverse
from optax_pes._tree import at_least_float32, stop_gradient, vector_norm


class AbstractAdjoint(eqx.Module):
    """How a `DEQ` computes its output's derivative at the fixed point."""

    needs_inverse: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def output(
        self, fn: Any, x: Any, z_star: PyTree, inverse: LowRankInverse | None
    ) -> PyTree:
        """The layer's differentiable output given the fixed point `z_star`.

        Differentiable (in reverse mode, to first order) w.r.t. `fn`'s parameters and
        `x`; `z_star` is stop-gradient. `inverse` is None unless `needs_inverse`.
        """

    def check_solver(self, solver: AbstractSolver) -> None:
        if self.needs_inverse and not solver.provides_inverse:
            raise ValueError(
                f"adjoint={type(self).__name__}() reuses the forward solver's inverse "
                f"estimate, which solver={type(solver).__name__} does not provide: use "
                "optax_pes.Broyden, or adjoint=Implicit()/JacobianFree()/Phantom()"
            )


class JacobianFree(AbstractAdjoint):
    r"""Jacobian-free backprop (Fung et al., 2022): $w = \bar z$, i.e. $J_f \approx 0$.

    The cheapest backward pass (one VJP of $f$ at $z^*$); a descent direction for
    contractive layers but not the gradient.
    """

    needs_inverse = False

    def output(self, fn, x, z_star, inverse):
        return _backward_map(fn(z_star, x), None, None)


class Phantom(AbstractAdjoint):
    r"""Phantom gradients (Geng et al., 2021): backprop through `k` damped steps.

    The output is $z_k$ with $z_0 = z^*$ and
    $z_{i+1} = (1 - \lambda) z_i + \lambda f(z_i, x)$, differentiated as an ordinary
    unrolled computation: $k$ VJPs of $f$.

    **Arguments:** `k` ($\geq 1$) steps; `damping` $\lambda \in (0, 1]$.
    """

    k: int = eqx.field(static=True, default=5)
    damping: float = eqx.field(static=True, default=0.5, converter=python_float)
    needs_inverse = False

    def __check_init__(self):
        check_int(self.k, "k", 1)
        check_float(self.damping, "damping", high=1.0)

    def output(self, fn, x, z_star, inverse):
        z = z_star
        for _ in range(self.k):
            z = jax.tree.map(
                lambda a, b: (1 - self.damping) * a + self.damping * b, z, fn(z, x)
            )
        return _backward_map(z, None, None)


class _AbstractCotangentAdjoint(AbstractAdjoint):
    """An adjoint that maps the output cotangent to $w$, then takes $f$'s VJP."""

    throw: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def cotangent(
        self,
        layer: FlatFn,
        z_star: Float[Array, " d"],
        inverse: LowRankInverse | None,
        grad: Float[Array, " d"],
    ) -> tuple[Float[Array, " d"], Bool[Array, ""] | None]:
        """$w$ from the flat cotangent `grad` (all inputs are stop-gradient), and
        whether an iterative solve for it failed (None: there is none to fail).

        A failed solve's $w$ is already replaced by the adjoint's fallback."""

    @abc.abstractmethod
    def failure(self) -> str:
        """What a failed backward solve means and what was used instead (a message)."""

    def output(self, fn, x, z_star, inverse):
        residuals = (stop_gradient(fn), stop_gradient(x), z_star, inverse)
        return _backward_map(fn(z_star, x), residuals, self)

    def __check_init__(self):
        if not isinstance(self.throw, bool):
            raise TypeError(f"throw must be a bool, got {self.throw!r}")


class Shine(_AbstractCotangentAdjoint):
    r"""SHINE (Ramzi et al., 2022): reuse the forward Broyden inverse, transposed.

    $w = -B^{-\top} \bar z = \bar z - V^\top (U \bar z)$ with the solver's low-rank
    $B^{-1} = -I + U^\top V$: $O(\text{memory} \times d)$ and no extra evaluation of
    $f$. `refine_steps > 0` then refines it, started from the SHINE estimate (seeded
    with the transpose, not with $B^{-1}$ as in the official code), by that many
    iterations of $w \leftarrow \bar z + J_f^\top w$ (`refine_solver="fixed_point"`,
    one VJP each; needs a contractive layer) or by one GMRES cycle of that many
    Krylov steps (`"gmres"`: also for non-contractive layers, with lineax's
    per-step overhead). `fallback=True` replaces $w$ by $\bar z$ (Jacobian-free)
    for a sample whose $\|w\| >$ `fallback_threshold` $\|\bar z\|$, checked before
    refinement. A non-finite $w$ falls back too; without refinement that is not
    reported unless `throw=True`, which raises (a warning would cost every
    backward pass a host callback). Needs a solver that provides an inverse
    estimate (`optax_pes.Broyden`).

    A refinement that fails for a sample (fixed-point steps whose residual
    $\|\bar z + J_f^\top w - w\|$ grows, i.e. diverges, or a non-finite result) is
    discarded there: the sample keeps the SHINE estimate it started from, and a
    `RuntimeWarning` says so (`throw=True`: an error instead, as Optimistix's
    `throw`).

    **Arguments:** `refine_steps` ($\geq 0$), `fallback`, `fallback_threshold`
    ($> 0$), `refine_solver` (`"fixed_point"` or `"gmres"`), `throw` (raise on a
    failed refinement or a non-finite estimate instead of warning).

    **References:** Ramzi, Mannel, Bai, Starck, Ciuciu, Moreau, *SHINE: SHaring the
    INverse Estimate from the forward pass for bi-level optimization and implicit
    models*, ICLR 2022, <https://arxiv.org/abs/2106.00553>.
    """

    refine_steps: int = eqx.field(static=True, default=0)
    fallback: bool = eqx.field(static=True, default=False)
    fallback_threshold: float = eqx.field(
        static=True, default=1.8, converter=python_float
    )
    refine_solver: Literal["fixed_point", "gmres"] = eqx.field(
        static=True, default="fixed_point"
    )
    throw: bool = eqx.field(static=True, default=False)
    needs_inverse = True

    def __check_init__(self):
        check_int(self.refine_steps, "refine_steps", 0)
        check_float(self.fallback_threshold, "fallback_threshold")
        check_choice(self.refine_solver, "refine_solver", ("fixed_point", "gmres"))

    def cotangent(self, layer, z_star, inverse, grad):
        w = -inverse.rmv(grad)
        if self.fallback:
            # (Also where |w| overflows: "> threshold * inf" would never fire.)
            size = vector_norm(w)
            too_big = ~jnp.isfinite(size) | (
                size > self.fallback_threshold * vector_norm(grad)
            )
            w = jnp.where(too_big, grad, w)
        if not self.refine_steps:
            return w, None
        vjp = flat_vjp(layer, z_star)
        if self.refine_solver == "gmres":
            # (lineax's first GMRES pass only computes the residual of y0.) GMRES
            # never increases the residual: only a non-finite result fails.
            solver = lx.GMRES(
                rtol=0.0, atol=0.0, max_steps=2, restart=self.refine_steps
            )
            refined = _solve_transposed(vjp, grad, solver, w)
            failed = ~jnp.all(jnp.isfinite(refined))
        else:
            # Step i's increment is the residual at iterate i: the refinement
            # diverged if the last one known is larger than the first (or NaN).
            def step(i, carry):
                w, first, _ = carry
                new = grad + vjp(w)
                size = vector_norm(new - w)
                return new, jnp.where(i == 0, size, first), size

            zero = jnp.zeros((), at_least_float32(grad.dtype))
            # refine_steps is static: unrolled, XLA fuses across steps and (on CPU)
            # keeps its fast convolution kernels, which it drops inside loop bodies.
            refined, first, last = jax.lax.fori_loop(
                0,
                self.refine_steps,
                step,
                (w, zero, zero),
                unroll=self.refine_steps <= _MAX_UNROLLED_REFINE,
            )
            # (inf <= inf: residuals whose norms overflow are a failure too.)
            failed = ~(last <= first) | ~jnp.isfinite(last)
        return jnp.where(failed, w, refined), failed

    def failure(self):
        how = (
            "the GMRES refinement was not finite"
            if self.refine_solver == "gmres"
            else "the fixed-point refinement diverged (its residual grew: the layer "
            "is not contractive at z*; refine_solver='gmres' does not need that) or "
            "was not finite"
        )
        return f"{how}; those samples kept the SHINE estimate it started from"


def _check_linear_solver(value: Any) -> Any:
    """`Implicit.linear_solver`, checked before Equinox stores it as a static field."""
    if not isinstance(value, lx.AbstractLinearSolver):
        if not (isinstance(value, str) and value in ("gmres", "fixed_point")):
            raise ValueError(
                "linear_solver must be one of ('gmres', 'fixed_point') or a "
                f"lineax.AbstractLinearSolver, got {value!r}"
            )
        return value
    try:
        hash(value)
    except TypeError as e:
        raise TypeError(
            "linear_solver must be hashable (it is a static field): a lineax solver "
            f"whose settings are Python numbers, not arrays, got {value!r}"
        ) from e
    return value


class Implicit(_AbstractCotangentAdjoint):
    r"""The exact implicit gradient: solve $(I - J_f^\top) w = \bar z$ to tolerance.

    The reference the other adjoints approximate. `linear_solver="gmres"` (default)
    uses lineax's GMRES (restarted every 10 steps) on the matrix-free operator;
    `"fixed_point"` iterates $w \leftarrow \bar z + J_f^\top w$ (converges for
    contractive $f$); any `lineax.AbstractLinearSolver` may be given.

    A solve that fails for a sample (it does not reach `tol` in `max_steps`, e.g. on
    a layer that is not contractive with `"fixed_point"`, or its $w$ is not finite)
    falls back to the Jacobian-free $w = \bar z$ there, so gradients stay finite
    and bounded, and a `RuntimeWarning` says so (`throw=True`: an error instead, as
    Optimistix's `throw`). GMRES and lineax solvers count as converged when the
    residual $\|\bar z - (I - J_f^\top) w\|$ (one more VJP) is within 10x their
    `atol + rtol` $\|\bar z\|$ (`tol` for both with `"gmres"`); the fixed-point
    iteration when its last step is at most `tol` $\|w\|$.

    **Arguments:** `max_steps` (Krylov or fixed-point steps, i.e. VJPs of $f$) and
    `tol` of the linear solve; `linear_solver` (a lineax solver is a static field:
    it must be hashable, its settings Python numbers rather than arrays); `throw`
    (raise on a failed solve instead of warning).
    """

    max_steps: int = eqx.field(static=True, default=100)
    tol: float = eqx.field(static=True, default=1e-6, converter=python_float)
    # Static, like every other setting: a DEQ's pytree leaves are its arrays only,
    # so plain `jax.jit` / `jax.grad` and `optax`'s `init` take the module as is.
    linear_solver: Literal["gmres", "fixed_point"] | lx.AbstractLinearSolver = (
        eqx.field(static=True, default="gmres", converter=_check_linear_solver)
    )
    throw: bool = eqx.field(static=True, default=False)
    needs_inverse = False

    def __check_init__(self):
        check_int(self.max_steps, "max_steps", 1)
        check_float(self.tol, "tol")

    def cotangent(self, layer, z_star, inverse, grad):
        vjp = flat_vjp(layer, z_star)
        if isinstance(self.linear_solver, str) and self.linear_solver == "fixed_point":

            def cond(c):
                i, w, delta = c
                # A diverging w overflows |w| (past 1.8e19 in float32) while its step
                # is still finite: stop there, and count it as a failure below.
                size = vector_norm(w)
                return (
                    (i < self.max_steps)
                    & jnp.isfinite(size)
                    & (delta > self.tol * size)
                )

            def body(c):
                i, w, _ = c
                new = grad + vjp(w)
                return i + 1, new, vector_norm(new - w)

            inf = jnp.asarray(jnp.inf, at_least_float32(grad.dtype))
            _, w, delta = jax.lax.while_loop(cond, body, (0, grad, inf))
            size = vector_norm(w)
            converged = jnp.isfinite(size) & (delta <= self.tol * size)
        else:
            solver = self.linear_solver
            if isinstance(solver, str):
                # lineax checks the tolerance between restart cycles only: short
                # cycles stop soon after convergence. max_steps counts Krylov steps
                # (VJPs); lineax counts cycles, the first only computes a residual.
                restart = min(10, self.max_steps)
                solver = lx.GMRES(
                    rtol=self.tol,
                    atol=self.tol,
                    max_steps=-(-self.max_steps // restart) + 1,
                    restart=restart,
                )
            w = _solve_transposed(vjp, grad, solver, None)
            # lineax reports max_steps_reached even when the last cycle converged:
            # judge by the residual instead.
            residual = vector_norm(grad - w + vjp(w))
            atol = getattr(solver, "atol", self.tol)
            rtol = getattr(solver, "rtol", self.tol)
            bound = atol + rtol * vector_norm(grad)
            converged = residual <= _RESIDUAL_SLACK * bound
        failed = ~converged  # (also where w or the residual is NaN)
        return jnp.where(failed, grad, w), failed

    def failure(self):
        if isinstance(self.linear_solver, str):
            what = f"it did not reach tol={self.tol} within max_steps={self.max_steps}"
            fix = "Raise max_steps or tol"
        elif hasattr(self.linear_solver, "atol"):  # its own tolerance and steps
            what = (
                "it did not bring the residual within 10x the linear_solver's atol + "
                "rtol |zbar| in the linear_solver's own max_steps"
            )
            fix = "Raise the linear_solver's max_steps or tolerances"
        else:  # a direct lineax solver (LU, QR, ...): judged against tol
            what = f"its residual was not within 10x tol={self.tol} times (1 + |zbar|)"
            fix = "Raise tol"
        return (
            f"{what} (or was not finite); those samples used the Jacobian-free "
            f"w = zbar instead. {fix}, check that the forward solve converged "
            "(DEQ.solve's info.converged), or pass throw=True to raise"
        )


# Shine's fixed-point refinement runs unrolled up to this many steps, in a loop beyond.
_MAX_UNROLLED_REFINE = 20

# A backward solve counts as converged within this factor of its tolerance: solvers
# estimate their residual slightly differently; a failure is orders of magnitude off.
_RESIDUAL_SLACK = 10.0


def _solve_transposed(vjp, grad, solver, y0):
    """Solve $(I - J_f^\top) w = \bar z$ with a lineax solver (not raising); `vjp`
    is $f$'s at $z^*$.

    In at least float32, around the layer's own VJPs: lineax's GMRES (and its
    direct solvers) call LAPACK, which has no bfloat16 or float16.
    """
    dtype = at_least_float32(grad.dtype)
    operator = lx.FunctionLinearOperator(
        lambda w: w - vjp(w.astype(grad.dtype)).astype(dtype),
        jax.ShapeDtypeStruct(grad.shape, dtype),
    )
    options = {} if y0 is None else {"y0": y0.astype(dtype)}
    solution = lx.linear_solve(
        operator, grad.astype(dtype), solver, options=options, throw=False
    )
    return solution.value.astype(grad.dtype)


_SECOND_ORDER = (
    "second-order derivatives through optax_pes.DEQ are not supported: its backward "
    "pass holds the fixed point z* constant, so differentiating a gradient "
    "(jax.hessian, jax.jacfwd(jax.grad(f)), jax.grad of a gradient, "
    "Hessian-vector products) w.r.t. anything z* depends on would miss dz*/dtheta "
    "and be wrong. (W.r.t. what only comes after the layer, e.g. a readout, they "
    "are allowed.) For second-order derivatives, unroll the fixed point (a "
    "jax.lax.fori_loop of the layer) instead of using a DEQ"
)


@jax.custom_jvp
def _first_order_only(out: PyTree, grad: PyTree) -> PyTree:
    """`grad`, refusing to be differentiated where the DEQ output `out` is.

    Inside a backward pass that is itself differentiated (forward- or
    reverse-over-reverse), `out = f(z*, x)` carries a tangent exactly when the outer
    derivative is w.r.t. something `z*` depends on: the case that would be wrong.
    """
    del out
    return grad


def _first_order_only_jvp(primals, tangents):
    _, grad = primals
    out_dot, grad_dot = tangents
    if any(type(t) is not SymbolicZero for t in jax.tree.leaves(out_dot)):
        raise NotImplementedError(_SECOND_ORDER)
    return grad, grad_dot


_first_order_only.defjvp(_first_order_only_jvp, symbolic_zeros=True)


_NON_FINITE = (
    "the SHINE estimate w = -B^-T zbar was not finite (Broyden's inverse blew up, or "
    "the cotangent is too large for the layer's dtype); without throw=True those "
    "samples use the Jacobian-free w = zbar"
)


def _report(
    w: Float[Array, " d"],
    failed: Bool[Array, ""],
    adjoint: "_AbstractCotangentAdjoint",
    what: str | None = None,
) -> Float[Array, " d"]:
    """Tell the user about failed backward solves: warn, or raise with `throw`."""
    message = (
        f"optax_pes.DEQ: the backward solve of adjoint={adjoint!r} failed for some "
        f"samples: {adjoint.failure()}"
        if what is None
        else f"optax_pes.DEQ: adjoint={adjoint!r}, for some samples: {what}"
    )
    if adjoint.throw:
        return eqx.error_if(w, failed, message)
    # One callback per backward pass (not one per sample under vmap), and only when
    # a sample failed: an unconditional host callback cost as much as the refinement.
    # (`warn` names the user's line where the callback runs in the user's call, as
    # eagerly; else the outermost frame of the thread it runs in.)
    jax.lax.cond(
        eqxi.unvmap_any(failed),
        lambda: jax.debug.callback(functools.partial(warn, message)),
        lambda: None,
    )
    return w


@eqx.filter_custom_vjp
def _backward_map(out, residuals, adjoint):
    """The identity on the DEQ's output, whose backward pass maps the cotangent zbar
    to the adjoint's w (leaves it for `adjoint=None`) and is first order only."""
    del residuals, adjoint
    return out


@_backward_map.def_fwd
def _backward_map_fwd(perturbed, out, residuals, adjoint):
    del perturbed, residuals, adjoint
    return out, None


@_backward_map.def_bwd
def _backward_map_bwd(_, grad, perturbed, out, residuals, adjoint):
    del perturbed
    # Leaves of the output that were not differentiated come as None: zeros.
    grad = jax.tree.map(
        lambda g, o: jnp.zeros_like(o) if g is None else g,
        grad,
        out,
        is_leaf=lambda g: g is None,
    )
    grad = _first_order_only(out, grad)
    if adjoint is None:
        return grad
    fn, x, z_star, inverse = residuals
    layer, z_flat, unravel = flat_layer(fn, x, z_star)
    grad_flat = ravel_pytree(grad)[0]
    w, failed = adjoint.cotangent(layer, z_flat, inverse, grad_flat)
    nonfinite = ~jnp.all(jnp.isfinite(w))
    w = jnp.where(nonfinite, grad_flat, w)
    if failed is not None:
        w = _report(w, failed | nonfinite, adjoint)
    elif isinstance(adjoint, Shine) and adjoint.throw:
        # Plain Shine solves nothing: a non-finite estimate is an error only with
        # throw=True. A warning needs a host callback in every backward pass, and
        # that took Shine's backward from 2.4 to 3.8 ms on the multiscale DEQ
        # (0.20 to 0.45 ms on a dense d=128 layer), for a rare event whose
        # fallback is bounded. (A non-finite cotangent is the loss's doing.)
        upstream = ~jnp.all(jnp.isfinite(grad_flat))
        w = _report(w, nonfinite & ~upstream, adjoint, _NON_FINITE)
    return unravel(w)
