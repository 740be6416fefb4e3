r"""SHINE hypergradients for bi-level problems whose inner problem L-BFGS solves.

With $w^*(h) = \arg\min_w f(w, h)$ and $F(h) = g(w^*(h), h)$, the implicit function
theorem gives

$$\nabla F(h) = \nabla_h g - (\partial_h \nabla_w f)^\top v, \qquad
  v = H^{-1} \nabla_w g, \quad H = \nabla^2_w f(w^*, h).$$

The methods differ only in how they get $v$: each is a small final strategy under
`_AbstractHypergradientMethod` (as the DEQ adjoints are under `AbstractAdjoint`), and
the public `method=` strings name them in one table, `_METHODS`. The update solves
the inner problem (calling the method's hook before every L-BFGS step, where OPA adds
its secant pairs), asks the method for $v$, and forms $\nabla F$ with one gradient
and one vector-Jacobian product.

The linear solves of `shine_refine` and `implicit` are conjugate gradients (JAX's
`jax.scipy.sparse.linalg.cg`; see `_cg` for why not lineax's) on the Hessian
operator (the Jacobian of $\nabla_w f$, linearised once so that each Hessian-vector
product reuses the primal computation), preconditioned by the L-BFGS inverse for
`shine_refine`.
"""

import abc
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from optax_pes._checks import (
    check_callable,
    check_choice,
    check_finite_params,
    check_float,
    check_float_tree,
    check_int,
    concrete_number,
    describe,
    is_concrete,
    is_params_placeholder,
    require_params,
)
from optax_pes._compile import SharedJit
from optax_pes._implicit import _lbfgs
from optax_pes._tree import (
    add_to_updates,
    at_least_float32,
    scaled_global_norm_f32,
    tree_all_finite,
    vector_norm,
)

Method = Literal["shine", "shine_opa", "shine_refine", "implicit", "jacobian_free"]


class BilevelState(NamedTuple):
    """State of `optax_pes.shine_bilevel`: the warm start and diagnostics."""

    count: jax.Array  # shape=(), int32: outer updates so far
    inner_params: PyTree  # as inner_init: the last solution w*, the next warm start
    inner_steps: jax.Array  # shape=(), int32: L-BFGS steps of the last inner solve
    inner_grad_norm: jax.Array  # shape=(), float32: |grad_w f(w*, h)| at its end
    inner_converged: jax.Array  # shape=(), bool: False when it hit inner_max_steps
    hypergrad_norm: jax.Array  # shape=(), float32: norm of the last hypergradient;
    #   NaN when it (or the outer gradient, the inner loss at w*, or a traced
    #   tolerance) was not usable and nothing was added
    backward_converged: jax.Array  # shape=(), bool: False when "implicit"'s v has a
    #   true residual |H v - grad_w g| above implicit_tol |grad_w g| (CG stopped at
    #   implicit_max_steps, or on its own running residual, which drifts below the
    #   true one in float32); True for the other methods, which have no tolerance


# ------------------------------------------------------------------ the methods ----


class _Losses(eqx.Module):
    """The two losses' derivatives in the flat inner variable, at the current h."""

    inner_grad: Callable[[Array], Array]  # w -> grad_w f(w, h)
    outer_grad: Callable[[Array], Array]  # w -> grad_w g(w, h)
    hessian_diag: Callable[[Array], Array] | None = None  # w -> ~diag of H, or None

    def hvp(self, w: Float[Array, " d"], v: Float[Array, " d"]) -> Float[Array, " d"]:
        r"""$\nabla^2_w f(w, h) v$ (forward over reverse)."""
        return jax.jvp(self.inner_grad, (w,), (v,))[1]

    def hessian(
        self, w: Float[Array, " d"]
    ) -> Callable[[Float[Array, " d"]], Float[Array, " d"]]:
        r"""$v \mapsto \nabla^2_w f(w, h) v$, linearised once at `w` (each product
        then reuses the primal computation of $\nabla_w f$)."""
        return jax.linearize(self.inner_grad, w)[1]

    def inverse(self, w: Float[Array, " d"], opt_state: Any) -> _lbfgs.LBFGSInverse:
        r"""The L-BFGS estimate of $H^{-1}$ in `opt_state`'s memory, started from
        the inverse of `hessian_diag` at `w` if there is one (else $\gamma I$).
        (`LBFGSInverse` takes $\gamma$ where that inverse is not finite and
        positive: where the diagonal is 0, negative, NaN or inf.)"""
        initial = None if self.hessian_diag is None else 1 / self.hessian_diag(w)
        return _lbfgs.LBFGSInverse.from_state(_lbfgs.find_state(opt_state), initial)


class _AbstractHypergradientMethod(eqx.Module):
    r"""How `shine_bilevel` gets $v \approx H^{-1} \nabla_w g$ at the inner solution.

    Fields are named as the `shine_bilevel` arguments they come from.
    """

    @abc.abstractmethod
    def before_inner_step(
        self,
        step: Int[Array, ""],
        w: Float[Array, " d"],
        opt_state: Any,
        losses: _Losses,
    ) -> Any:
        """The inner optimizer's state for its next step, taken after `step` steps
        (from 0) have reached `w` and the solve goes on."""

    @abc.abstractmethod
    def solve(
        self,
        w: Float[Array, " d"],
        opt_state: Any,
        outer_grad: Float[Array, " d"],
        losses: _Losses,
    ) -> tuple[Float[Array, " d"], Bool[Array, ""]]:
        r"""$v$ at the inner solution `w`, whose solver state is `opt_state`, and
        whether its solve reached its tolerance (True for a method without one)."""

    def usable(self) -> Array | None:
        """Whether the method's traced settings are usable (None: all checked)."""
        return None


class _AbstractAfterSolve(_AbstractHypergradientMethod):
    """A method that leaves the inner solve alone (every one but OPA)."""

    def before_inner_step(self, step, w, opt_state, losses):
        del step, w, losses
        return opt_state


class _Shine(_AbstractAfterSolve):
    """`"shine"`: the two-loop recursion over the inner solver's own memory."""

    def solve(self, w, opt_state, outer_grad, losses):
        return losses.inverse(w, opt_state).mv(outer_grad), jnp.asarray(True)


class _ShineOPA(_AbstractHypergradientMethod):
    r"""`"shine_opa"`: every `opa_every` steps, the pair $(d, H d)$ with $d$ the
    current inverse estimate of the outer gradient joins the memory.

    A pair joins only when another L-BFGS step follows it, so the memory's newest
    pair, whose $\gamma$ scales the initial estimate in the final two-loop
    recursion, is always a secant pair of the solve itself, as in optax's own
    directions. (A pair added after the last step made that $\gamma$ the inverse
    curvature along $d$, and put the scalar 20,000-feature hypergradient 3.4x off.)
    """

    opa_every: int = eqx.field(static=True)

    def before_inner_step(self, step, w, opt_state, losses):
        def add_pair():
            d = losses.inverse(w, opt_state).mv(losses.outer_grad(w))
            lbfgs = _lbfgs.add_pair(_lbfgs.find_state(opt_state), d, losses.hvp(w, d))
            return _lbfgs.replace_state(opt_state, lbfgs)

        due = (step > 0) & (step % self.opa_every == 0)
        return jax.lax.cond(due, add_pair, lambda: opt_state)

    def solve(self, w, opt_state, outer_grad, losses):
        return losses.inverse(w, opt_state).mv(outer_grad), jnp.asarray(True)


class _ShineRefine(_AbstractAfterSolve):
    """`"shine_refine"`: exactly `refine_steps` CG steps from the SHINE estimate,
    preconditioned by the same L-BFGS inverse (the SHINE estimate if they break
    down)."""

    refine_steps: int = eqx.field(static=True)

    def solve(self, w, opt_state, outer_grad, losses):
        inverse = losses.inverse(w, opt_state)
        if not self.refine_steps:
            return inverse.mv(outer_grad), jnp.asarray(True)
        # (Over its largest entry, as in "implicit": CG's inner products of a
        # float32 gradient past 1.8e19 overflow, and refinement fell back silently.)
        peak, vector = _normalised(outer_grad)
        v = inverse.mv(vector)
        # tol = atol = 0: no stopping rule but the step count.
        refined = _cg(losses.hessian(w), vector, v, inverse.mv, 0.0, self.refine_steps)
        # A breakdown (an exactly zero curvature: 0 / 0) keeps v.
        v = jnp.where(jnp.all(jnp.isfinite(refined)), refined, v)
        return peak * v, jnp.asarray(True)


class _Implicit(_AbstractAfterSolve):
    r"""`"implicit"`: CG from zero until $\|H v - \nabla_w g\| \le$ `implicit_tol`
    $\|\nabla_w g\|$, at most `implicit_max_steps`."""

    implicit_tol: float | Array
    implicit_max_steps: int = eqx.field(static=True)

    def usable(self):
        return _usable_tol(self.implicit_tol, "implicit_tol")[1]

    def solve(self, w, opt_state, outer_grad, losses):
        del opt_state
        tol, ok = _usable_tol(self.implicit_tol, "implicit_tol")
        if ok is not None:  # an unusable traced tol: stop at once, left out later
            tol = jnp.where(ok, tol, jnp.inf)
        # Solved for the outer gradient over its largest entry, then scaled back
        # (the solve is linear): a float32 gradient past 1.8e19 overflows its norm
        # (the tolerance was inf and CG stopped at 0) and CG's inner products.
        peak, vector = _normalised(outer_grad)
        zero = jnp.zeros_like(vector)
        hessian = losses.hessian(w)
        v = _cg(hessian, vector, zero, None, tol, self.implicit_max_steps)
        # Its true residual, one more product: a solve short of the tolerance (at
        # implicit_max_steps, or stopped early by CG's own running residual, which
        # drifts below the true one in float32) is reported, not silent.
        residual = vector_norm(hessian(v) - vector)
        converged = residual <= tol * vector_norm(vector)
        if ok is not None:  # an unusable traced tol solved nothing
            converged = converged & ok
        return peak * v, converged


class _JacobianFree(_AbstractAfterSolve):
    r"""`"jacobian_free"`: $v = \nabla_w g$ (the inverse replaced by the identity)."""

    def solve(self, w, opt_state, outer_grad, losses):
        del w, opt_state, losses
        return outer_grad, jnp.asarray(True)


def _normalised(vector: Array) -> tuple[Array, Array]:
    """`(peak, vector / peak)` with `peak` the largest magnitude (1 where that is 0
    or not finite): a linear solve for the second, times the first, is the solve for
    `vector`, without overflowing its norm or inner products."""
    peak = jnp.max(jnp.abs(vector), initial=0)  # (0 for a zero-size w)
    peak = jnp.where(jnp.isfinite(peak) & (peak > 0), peak, 1).astype(vector.dtype)
    return peak, vector / peak


def _cg(matvec, vector, y0, preconditioner, tol, max_steps) -> Array:
    r"""Conjugate gradients on $H y = $ `vector` from `y0`, until $\|H y - b\| \le$
    `tol` $\|b\|$ or `max_steps` steps; the last iterate either way.

    JAX's CG, not lineax's: lineax's takes a curvature $p^\top H p$ below
    $100\, \epsilon\, d\, r^\top z$ for a breakdown and returns NaN, an absolute
    test that a well-posed float32 problem meets when its loss is small or its
    dimension large (0.024 at d = 2000: ridge with a small penalty, or any loss
    scaled by 1e-4, added nothing with `"implicit"` and fell back to plain SHINE
    with `"shine_refine"`, silently).
    """
    y, _ = jax.scipy.sparse.linalg.cg(
        matvec, vector, y0, tol=tol, atol=0.0, maxiter=max_steps, M=preconditioner
    )
    return y


_METHODS: dict[str, type[_AbstractHypergradientMethod]] = {
    "shine": _Shine,
    "shine_opa": _ShineOPA,
    "shine_refine": _ShineRefine,
    "implicit": _Implicit,
    "jacobian_free": _JacobianFree,
}


def _method(name: Any, **arguments: Any) -> _AbstractHypergradientMethod:
    """The strategy `name` names, built from the factory arguments it has fields for."""
    cls = _METHODS[check_choice(name, "method", tuple(_METHODS))]
    return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------ the solve ------


def _inner_solve(
    optimizer: optax.GradientTransformationExtraArgs,
    method: _AbstractHypergradientMethod,
    losses: _Losses,
    value_fn: Callable[[PyTree], Array],
    w0: PyTree,
    tol: Array,
    max_steps: int,
) -> tuple[Array, Any, Array, Array, Array]:
    r"""L-BFGS from `w0` until $\|\nabla_w f\| \le$ `tol` or `max_steps`.

    Returns the flat solution, the optimizer's state, the value and the gradient
    there, and the number of steps.
    """
    w0_flat, unravel = ravel_pytree(w0)
    value_and_grad = jax.value_and_grad(lambda wf: value_fn(unravel(wf)))
    # optax.lbfgs's line search keeps the value and gradient at the point it
    # accepts: reuse them (as optax.value_and_grad_from_state does).
    opt_state0 = optimizer.init(w0)
    reuse = all(optax.tree.get(opt_state0, k) is not None for k in ("value", "grad"))

    def cond(c):
        _, _, _, grad, k = c
        return (k < max_steps) & (vector_norm(grad) > tol)

    def body(c):
        wf, opt_state, value, grad, k = c
        opt_state = method.before_inner_step(k, wf, opt_state, losses)
        updates, opt_state = optimizer.update(
            unravel(grad),
            opt_state,
            unravel(wf),
            value=value,
            grad=unravel(grad),
            value_fn=value_fn,
        )
        wf = wf + ravel_pytree(updates)[0]
        if reuse:
            new_value = optax.tree.get(opt_state, "value")
            grad = ravel_pytree(optax.tree.get(opt_state, "grad"))[0]
        else:
            new_value, grad = value_and_grad(wf)
        # (The line search stores the value in the weights' dtype, which may not be
        # the loss's: the loop's carry keeps one.)
        return wf, opt_state, new_value.astype(value.dtype), grad, k + 1

    value0, grad0 = value_and_grad(w0_flat)
    carry = (w0_flat, opt_state0, value0, grad0, jnp.zeros((), jnp.int32))
    w, opt_state, value, grad, steps = jax.lax.while_loop(cond, body, carry)
    return w, opt_state, value, grad, steps


def _loss_kwargs(names: tuple[str, ...], extra_args: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `update` that `loss_kwargs` names."""
    for name in names:
        if name not in extra_args:
            raise ValueError(
                f"loss_kwargs names {name!r}, but shine_bilevel.update got no {name}= "
                f"argument (it got {sorted(extra_args) or 'none'}): pass it to "
                "tx.update, or leave it out of loss_kwargs"
            )
    return {name: extra_args[name] for name in names}


def _check_losses(inner_loss, outer_loss, inner_init, hparams, kwargs) -> None:
    """Both losses accept (inner_init, hparams, **kwargs) and return float scalars."""
    check_float_tree(hparams, "params (the hyperparameters)")
    for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
        try:
            out = jax.eval_shape(
                lambda w, h, f=fn: f(w, h, **kwargs), inner_init, hparams
            )
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"{name}(inner_init, params) failed; do inner_init "
                f"{describe(inner_init)} and the hyperparameters "
                f"{describe(hparams)} match the losses? ({e})"
            ) from e
        if getattr(out, "shape", None) != () or not jnp.issubdtype(
            out.dtype, jnp.floating
        ):
            raise ValueError(f"{name} must return a float scalar, got {describe(out)}")


def _check_hessian_diag(hessian_diag, inner_init, hparams, kwargs) -> None:
    """`hessian_diag(inner_init, hparams, **kwargs)` is a float pytree like w."""
    try:
        out = jax.eval_shape(
            lambda w, h: hessian_diag(w, h, **kwargs), inner_init, hparams
        )
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"hessian_diag(inner_init, params) failed ({e}); it must take the "
            "arguments of inner_loss"
        ) from e
    expected = jax.eval_shape(lambda w: w, inner_init)
    same = jax.tree.structure(out) == jax.tree.structure(expected) and all(
        getattr(a, "shape", None) == b.shape and jnp.issubdtype(a.dtype, jnp.floating)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True)
    )
    if not same:
        raise ValueError(
            "hessian_diag must return a float pytree with inner_init's structure and "
            f"shapes, {describe(inner_init)}; got {describe(out)}"
        )


def _check_tol(value: Any, name: str, *, low_inclusive: bool = False) -> Any:
    """A positive float (>= 0 with `low_inclusive`); a traced scalar
    (`inject_hyperparams` under `jit`) as is."""
    if np.ndim(value) == 0 and not is_concrete(value):
        return value
    return check_float(concrete_number(value), name, low_inclusive=low_inclusive)


def _usable_tol(value: Any, name: str) -> tuple[Array, Array | None]:
    """`(tol, ok)` for a tolerance met at update time (a schedule's value, an
    injected hyperparameter). It may be 0 (a decreasing schedule's end, or an
    underflow: the solve then runs to its step limit). A concrete one is checked
    (an error naming `name`, `ok` None); a traced one cannot raise a readable error
    under `jit`, so `ok` says whether it is finite and >= 0, and the update is left
    out if not."""
    if np.ndim(value) != 0:
        raise ValueError(
            f"{name} must be a scalar (a float, or a schedule returning one), got "
            f"shape {np.shape(value)}"
        )
    if is_concrete(value):
        return jnp.asarray(_check_tol(value, name, low_inclusive=True)), None
    value = jnp.asarray(value)
    return value, jnp.isfinite(value) & (value >= 0)


def _check_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not (
        isinstance(names, Sequence) and all(isinstance(n, str) for n in names)
    ):
        raise TypeError(
            "loss_kwargs must be a sequence of keyword-argument names such as "
            f"('x', 'y'), got {names!r}"
        )
    return tuple(names)


class _Program(eqx.Module):
    """What an update runs, fixed at the factory: its functions, method and limits.

    A module-level function of it (`_update`) rather than a closure, so that
    transformations built twice from the same arguments, as an eager
    `optax.inject_hyperparams` builds one on every update, share one compiled
    program (`_compiled_update`): its functions and Python numbers are hashed,
    its arrays (an injected tolerance) are arguments.
    """

    inner_loss: Callable[..., Array]
    outer_loss: Callable[..., Array]
    inner_init: PyTree
    hessian_diag: Callable[..., PyTree] | None
    strategy: _AbstractHypergradientMethod
    optimizer: optax.GradientTransformationExtraArgs
    inner_max_steps: int


def _update(
    p: _Program,
    tol: Any,
    updates: PyTree,
    state: BilevelState,
    params: PyTree,
    kwargs: dict[str, Any],
) -> tuple[PyTree, BilevelState]:
    """One outer update: solve the inner problem from the warm start, then the
    hypergradient by `p.strategy`, added to `updates`."""
    inner_loss, outer_loss, hessian_diag = p.inner_loss, p.outer_loss, p.hessian_diag
    inner_init, strategy, optimizer = p.inner_init, p.strategy, p.optimizer
    inner_max_steps = p.inner_max_steps
    _check_losses(inner_loss, outer_loss, inner_init, params, kwargs)
    w0 = jax.tree.map(jnp.asarray, state.inner_params)
    w0_flat, unravel = ravel_pytree(w0)
    tol, tol_ok = _usable_tol(tol, "inner_tol")
    # (Norms are taken in at least float32: a float16 one overflows past 256.)
    tol = tol.astype(at_least_float32(w0_flat.dtype))
    if tol_ok is not None:  # an unusable traced tolerance: no solve at all
        tol = jnp.where(tol_ok, tol, jnp.inf)
    usable = [ok for ok in (tol_ok, strategy.usable()) if ok is not None]

    def f(wf, h):
        return inner_loss(unravel(wf), h, **kwargs)

    def g(wf, h):
        return outer_loss(unravel(wf), h, **kwargs)

    if hessian_diag is None:
        diag = None
    else:
        _check_hessian_diag(hessian_diag, inner_init, params, kwargs)

        def diag(wf):
            out = hessian_diag(unravel(wf), params, **kwargs)
            return ravel_pytree(out)[0].astype(wf.dtype)

    losses = _Losses(
        inner_grad=jax.grad(lambda wf: f(wf, params)),
        outer_grad=jax.grad(lambda wf: g(wf, params)),
        hessian_diag=diag,
    )
    w, opt_state, value, grad, steps = _inner_solve(
        optimizer,
        strategy,
        losses,
        lambda w: inner_loss(w, params, **kwargs),
        w0,
        tol,
        inner_max_steps,
    )
    outer_grad = losses.outer_grad(w)
    v, backward_converged = strategy.solve(w, opt_state, outer_grad, losses)
    grad_h = jax.grad(lambda h: g(w, h))(params)
    _, mixed_vjp = jax.vjp(lambda h: jax.grad(f)(w, h), params)
    (mixed,) = mixed_vjp(v)
    hypergrad = jax.tree.map(lambda a, b: a - b, grad_h, mixed)
    # A non-finite hypergradient or outer gradient (an outer loss that is inf
    # at w*; NaN hyperparameters under jit), or an unusable traced tolerance,
    # adds nothing and keeps the previous warm start; hypergrad_norm records
    # it (not finite). The outer gradient is checked too: a linear solve may turn a
    # non-finite right-hand side into a finite, meaningless v. (Leaf by leaf:
    # a float32 norm of a large finite float64 hypergradient would overflow.)
    # So does an inner loss that is not finite at w* (its line search rejects
    # every step: w* was the stale warm start), though its gradient may be.
    finite = tree_all_finite((outer_grad, hypergrad)) & jnp.isfinite(value)
    for ok in usable:
        finite = finite & ok
    # (Scaled: a finite float32 hypergradient past 1.8e19 read as inf, left out.)
    norm = jnp.where(finite, scaled_global_norm_f32(hypergrad), jnp.nan)
    hypergrad = jax.tree.map(lambda a: jnp.where(finite, a, 0), hypergrad)
    # A left-out update keeps the previous warm start.
    w = jnp.where(finite & tree_all_finite(w), w, w0_flat)
    converged = vector_norm(grad) <= tol
    if tol_ok is not None:  # a skipped solve did not converge
        converged = converged & tol_ok
    new_state = BilevelState(
        count=state.count + 1,
        inner_params=unravel(w),
        inner_steps=steps,
        inner_grad_norm=vector_norm(grad).astype(jnp.float32),
        inner_converged=converged,
        hypergrad_norm=norm,
        backward_converged=backward_converged,
    )
    return add_to_updates(updates, hypergrad), new_state


@functools.cache
def _default_optimizer() -> optax.GradientTransformationExtraArgs:
    """`optax.lbfgs(memory_size=30)`, one instance: a new one per factory call would
    hash differently, and `_compiled_update` would compile again for it."""
    return optax.lbfgs(memory_size=30)


# Called outside jit (a plain optax loop), an update runs as one compiled program,
# not op by op (each eager while loop of the inner solve compiles on every call),
# shared by transformations built from the same losses, method and limits.
_compiled_update = SharedJit(_update)


# ------------------------------------------------------------------ the factory ----


def shine_bilevel(
    inner_loss: Callable[..., Array],
    outer_loss: Callable[..., Array],
    *,
    inner_init: PyTree,
    inner_optimizer: optax.GradientTransformationExtraArgs | None = None,
    inner_tol: float | Callable[[Array], Array] = 1e-6,
    inner_max_steps: int = 100,
    method: Method = "shine",
    opa_every: int = 1,
    refine_steps: int = 5,
    implicit_tol: float = 1e-10,
    implicit_max_steps: int = 200,
    loss_kwargs: Sequence[str] = (),
    hessian_diag: Callable[..., PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Hypergradients of a bi-level problem, reusing the inner L-BFGS memory (SHINE).

    The transformation's params are the hyperparameters $h$ (any pytree). Each
    update solves the inner problem $\min_w f(w, h)$ with `inner_optimizer`
    (`optax.lbfgs(memory_size=30)` by default: SHINE's inverse is only as good as
    the memory), warm-started from the previous solution kept in
    the state, until $\|\nabla_w f\| \le$ `inner_tol` or `inner_max_steps`, then
    **adds** to the incoming updates the hypergradient

    $$\nabla F(h) = \nabla_h g(w^*, h) - (\partial_h \nabla_w f(w^*, h))^\top v,
      \qquad v \approx H^{-1} \nabla_w g(w^*, h),$$

    with $H = \nabla_w^2 f(w^*, h)$ and $v$ from `method`:

    - `"shine"`: the L-BFGS two-loop recursion over the inner solver's own memory:
      no Hessian-vector product at all.
    - `"shine_opa"`: outer-problem awareness: every `opa_every` inner steps (every
      step by default), the pair $(d, H d)$ with $d$ the current inverse estimate
      applied to $\nabla_w g$ is added to the memory, so the inverse is accurate
      where the hypergradient needs it (one extra outer gradient and
      Hessian-vector product each time). Sparser pairs are cheaper but can be
      worse than plain SHINE for a scalar hyperparameter (docs' bi-level page).
    - `"shine_refine"`: `refine_steps` conjugate-gradient steps from the SHINE
      estimate, preconditioned by the same L-BFGS inverse.
    - `"implicit"`: conjugate gradient to `implicit_tol` (at most
      `implicit_max_steps`): the exact reference (HOAG). A solution whose true
      residual is above the tolerance is reported in `state.backward_converged`.
      The default `implicit_tol=1e-10` needs float64: in float32 take about
      `1e-5` (CG's own running residual drifts below the true one there, and
      stops it early).
    - `"jacobian_free"`: $v = \nabla_w g$ (the inverse replaced by the identity).

    The keyword arguments of `update` that `loss_kwargs` names (a data batch, say)
    are passed to both losses; the others are ignored, since `optax.chain` hands
    every extra argument to every member. The inner optimizer's memory is rebuilt
    by every solve (only $w$ is warm-started), so the solve must take a few steps
    for SHINE to have curvature pairs: a decreasing `inner_tol` (HOAG's schedule)
    ensures it.

    **Arguments:**

    - `inner_loss`: `inner_loss(w, h, **loss_kwargs) -> scalar` $f$, smooth and
      strongly convex in $w$ near $w^*$.
    - `outer_loss`: `outer_loss(w, h, **loss_kwargs) -> scalar` $g$.
    - `inner_init`: the initial $w$ (a pytree of float arrays).
    - `inner_optimizer`: an optax transformation containing exactly one
      `optax.scale_by_lbfgs`, called with `value`, `grad` and `value_fn` as
      `optax.lbfgs` expects; `None` for `optax.lbfgs(memory_size=30)`.
    - `inner_tol`: the inner gradient-norm tolerance, or a schedule
      `count -> tol` (optax style) to decrease it over outer steps.
    - `inner_max_steps`: the most L-BFGS steps per solve (a solve that hits it is
      reported in `state.inner_converged`).
    - `method`: one of the above.
    - `opa_every`, `refine_steps`, `implicit_tol`, `implicit_max_steps`: as above.
    - `loss_kwargs`: names of `update`'s keyword arguments to pass to both losses,
      e.g. `("x", "y")` for `tx.update(updates, state, h, x=xb, y=yb)`; an update
      without one of them raises a `ValueError`.
    - `hessian_diag`: optional `hessian_diag(w, h, **loss_kwargs) -> pytree like w`,
      an estimate of the diagonal of $H$ (positive; the exact diagonal for a
      generalised linear model, or only the regulariser's). The L-BFGS inverse of
      the SHINE methods then starts from its inverse instead of $\gamma I$: the
      memory's few pairs cover the high-curvature directions, and $\gamma$, a
      high-curvature scale, misweighs the rest (on the 20,000-feature problem of
      the docs' bi-level page, plain SHINE's direction fell behind Jacobian-free's).
      Entries that are not finite and positive take $\gamma$. `None`: $\gamma I$,
      as `optax.lbfgs`. `"implicit"` and `"jacobian_free"` ignore it. Under
      `optax.inject_hyperparams` it goes in `static_args` (a callable there is
      taken for a schedule).

    A hypergradient that is not finite, or one at a $w^*$ where the inner loss is
    not finite, is never added: the update then adds nothing, keeps the previous
    warm start and records a non-finite `state.hypergrad_norm`.
    Eagerly, hyperparameters that hold NaN or inf raise a `ValueError`.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `optax_pes.BilevelState`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optax, optax_pes
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8.0) % 2
    >>> def inner(w, lam):  # ridge regression on a train split
    ...     return jnp.mean((x @ w - y) ** 2) + jnp.exp(lam) * jnp.sum(w**2)
    >>> def outer(w, lam):  # its error on a validation split
    ...     return jnp.mean((x[:4] @ w - y[:4]) ** 2)
    >>> tx = optax.chain(
    ...     optax_pes.shine_bilevel(inner, outer, inner_init=jnp.zeros(3)),
    ...     optax.adam(1e-1),
    ... )
    >>> lam = jnp.array(0.0)
    >>> updates, state = tx.update(jnp.zeros(()), tx.init(lam), lam)
    >>> bool(state[0].inner_converged)
    True

    ```

    **References:** Ramzi et al., *SHINE: SHaring the INverse Estimate from the
    forward pass for bi-level optimization and implicit models*, ICLR 2022,
    <https://arxiv.org/abs/2106.00553>; Pedregosa, *Hyperparameter optimization
    with approximate gradient*, ICML 2016 (HOAG).
    """
    form = "(w, hparams, **loss_kwargs) -> scalar"
    check_callable(inner_loss, "inner_loss", form)
    check_callable(outer_loss, "outer_loss", form)
    if hessian_diag is not None:
        check_callable(
            hessian_diag, "hessian_diag", "(w, hparams, **loss_kwargs) -> pytree like w"
        )
    check_float_tree(inner_init, "inner_init")
    if not callable(inner_tol):
        inner_tol = _check_tol(inner_tol, "inner_tol")
    inner_max_steps = check_int(inner_max_steps, "inner_max_steps", 1)
    loss_kwargs = _check_names(loss_kwargs)
    strategy = _method(
        method,
        opa_every=check_int(opa_every, "opa_every", 1),
        refine_steps=check_int(refine_steps, "refine_steps", 0),
        implicit_tol=_check_tol(implicit_tol, "implicit_tol"),
        implicit_max_steps=check_int(implicit_max_steps, "implicit_max_steps", 1),
    )
    optimizer = _default_optimizer() if inner_optimizer is None else inner_optimizer
    _lbfgs.find_state(optimizer.init(inner_init))  # raises if there is no L-BFGS

    def init_fn(params: PyTree) -> BilevelState:
        # The losses may need update's keyword arguments: they are checked there.
        if not is_params_placeholder(params):  # tree_map_params: no params to check
            check_float_tree(params, "params (the hyperparameters)")
        return BilevelState(
            count=jnp.zeros((), jnp.int32),
            inner_params=inner_init,
            inner_steps=jnp.zeros((), jnp.int32),
            inner_grad_norm=jnp.zeros((), jnp.float32),
            inner_converged=jnp.zeros((), bool),
            hypergrad_norm=jnp.zeros((), jnp.float32),
            backward_converged=jnp.zeros((), bool),
        )

    program = _Program(
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_init=inner_init,
        hessian_diag=hessian_diag,
        strategy=strategy,
        optimizer=optimizer,
        inner_max_steps=inner_max_steps,
    )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "shine_bilevel")
        check_finite_params(params)  # eagerly an error; under jit, contained
        kwargs = _loss_kwargs(loss_kwargs, extra_args)
        tol = inner_tol(state.count) if callable(inner_tol) else inner_tol
        args = (program, tol, updates, state, params, kwargs)
        if all(is_concrete(leaf) for leaf in jax.tree.leaves(args)):
            _usable_tol(tol, "inner_tol")  # a schedule's value: eagerly an error
            # The tolerances as arrays: arguments of the compiled program, where a
            # Python float would be part of its key (a new program per value, as
            # an injected tolerance has on every update).
            strategy_arrays = jax.tree.map(
                lambda x: jnp.asarray(x) if isinstance(x, float) else x, strategy
            )
            p = eqx.tree_at(lambda p: p.strategy, program, strategy_arrays)
            return _compiled_update(p, jnp.asarray(tol), *args[2:])
        return _update(*args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
