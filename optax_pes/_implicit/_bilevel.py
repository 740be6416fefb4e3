r"""SHINE hypergradients for bi-level problems whose inner problem L-BFGS solves.

With $w^*(h) = \arg\min_w f(w, h)$ and $F(h) = g(w^*(h), h)$, the implicit function
theorem gives

$$\nabla F(h) = \nabla_h g - (\partial_h \nabla_w f)^\top v, \qquad
  v = H^{-1} \nabla_w g, \quad H = \nabla^2_w f(w^*, h).$$

The methods differ only in how they get $v$.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from optax_pes._checks import check_int, require_params

Method = Literal["shine", "shine_opa", "shine_refine", "implicit", "jacobian_free"]
METHODS = ("shine", "shine_opa", "shine_refine", "implicit", "jacobian_free")


class BilevelState(NamedTuple):
    """State of `optax_pes.shine_bilevel`: the warm start and diagnostics."""

    count: jax.Array  # shape=(), int32: outer updates so far
    inner_params: PyTree  # the last inner solution w*, warm start of the next solve
    inner_steps: jax.Array  # shape=(), int32: L-BFGS steps of the last inner solve
    inner_grad_norm: jax.Array  # shape=(), float32: |grad_w f(w*, h)| at its end
    inner_converged: jax.Array  # shape=(), bool: False when it hit inner_max_steps
    hypergrad_norm: jax.Array  # shape=(), float32: norm of the last hypergradient


def _lbfgs_state(opt_state: Any) -> optax.ScaleByLBFGSState:
    found = [
        s
        for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByLBFGSState)
        )
        if isinstance(s, optax.ScaleByLBFGSState)
    ]
    if len(found) != 1:
        raise ValueError(
            "inner_optimizer must contain exactly one optax.scale_by_lbfgs (as "
            f"optax.lbfgs does); its state has {len(found)}"
        )
    return found[0]


def _replace_lbfgs_state(opt_state: Any, new: optax.ScaleByLBFGSState) -> Any:
    return jax.tree.map(
        lambda s: new if isinstance(s, optax.ScaleByLBFGSState) else s,
        opt_state,
        is_leaf=lambda x: isinstance(x, optax.ScaleByLBFGSState),
    )


def _memory(lbfgs: optax.ScaleByLBFGSState) -> tuple[Array, Array, Array, Array]:
    """(s, y, rho) as flat rows, and the slot of the most recent pair."""
    s = jax.vmap(lambda t: ravel_pytree(t)[0])(lbfgs.diff_params_memory)
    y = jax.vmap(lambda t: ravel_pytree(t)[0])(lbfgs.diff_updates_memory)
    last = (lbfgs.count - 2) % s.shape[0]
    return s, y, lbfgs.weights_memory.astype(s.dtype), last


def lbfgs_inverse_hessian(
    lbfgs: optax.ScaleByLBFGSState, d: Float[Array, " dim"]
) -> Float[Array, " dim"]:
    r"""$H^{-1} d$ by the L-BFGS two-loop recursion over `lbfgs`'s memory.

    Empty slots (weight 0) contribute nothing; the initial scaling is
    $\gamma = s^\top y / y^\top y$ of the most recent pair.
    """
    s, y, rho, last = _memory(lbfgs)
    m = rho.shape[0]
    newest_first = (last - jnp.arange(m)) % m

    def first(q, i):
        alpha = rho[i] * jnp.dot(s[i], q)
        return q - alpha * y[i], alpha

    q, alphas = jax.lax.scan(first, d, newest_first)
    sy, yy = jnp.dot(s[last], y[last]), jnp.dot(y[last], y[last])
    gamma = jnp.where((sy > 0) & (yy > 0), sy / jnp.where(yy > 0, yy, 1), 1.0)

    def second(r, i_alpha):
        i, alpha = i_alpha
        beta = rho[i] * jnp.dot(y[i], r)
        return r + (alpha - beta) * s[i], None

    r, _ = jax.lax.scan(second, gamma * q, (newest_first, alphas), reverse=True)
    return r


def _add_pair(
    lbfgs: optax.ScaleByLBFGSState, s: Array, y: Array, unravel: Callable
) -> optax.ScaleByLBFGSState:
    """Insert the curvature pair (s, y) as the most recent one of the memory."""
    m = lbfgs.weights_memory.shape[0]
    slot = (lbfgs.count - 1) % m
    sy = jnp.dot(s, y)
    ok = sy > jnp.finfo(s.dtype).eps * jnp.linalg.norm(s) * jnp.linalg.norm(y)
    weight = jnp.where(ok, 1 / jnp.where(ok, sy, 1), 0).astype(
        lbfgs.weights_memory.dtype
    )

    def put(memory, row):
        return jax.tree.map(
            lambda mem, r: mem.at[slot].set(jnp.where(ok, r, mem[slot])),
            memory,
            unravel(row),
        )

    return lbfgs._replace(
        count=lbfgs.count + ok.astype(lbfgs.count.dtype),
        diff_params_memory=put(lbfgs.diff_params_memory, s),
        diff_updates_memory=put(lbfgs.diff_updates_memory, y),
        weights_memory=lbfgs.weights_memory.at[slot].set(
            jnp.where(ok, weight, lbfgs.weights_memory[slot])
        ),
    )


def _conjugate_gradient(hvp, b, x0, max_steps, tol, precondition=None):
    """Solve H x = b (H symmetric positive definite) from x0, optionally with a
    symmetric positive definite preconditioner (an approximation of H^-1)."""
    precondition = (lambda r: r) if precondition is None else precondition
    r = b - hvp(x0)
    z = precondition(r)
    bound = tol * jnp.maximum(jnp.linalg.norm(b), jnp.finfo(b.dtype).tiny)

    def cond(c):
        k, _, r, _, _ = c
        return (k < max_steps) & (jnp.linalg.norm(r) > bound)

    def body(c):
        k, x, r, p, rz = c
        hp = hvp(p)
        alpha = rz / jnp.dot(p, hp)
        x = x + alpha * p
        r = r - alpha * hp
        z = precondition(r)
        rz_new = jnp.dot(r, z)
        p = z + (rz_new / rz) * p
        return k + 1, x, r, p, rz_new

    _, x, _, _, _ = jax.lax.while_loop(cond, body, (0, x0, r, z, jnp.dot(r, z)))
    return x


def shine_bilevel(
    inner_loss: Callable[..., Array],
    outer_loss: Callable[..., Array],
    *,
    inner_init: PyTree,
    inner_optimizer: optax.GradientTransformationExtraArgs | None = None,
    inner_tol: float | Callable[[Array], Array] = 1e-6,
    inner_max_steps: int = 100,
    method: Method = "shine",
    opa_every: int = 5,
    refine_steps: int = 5,
    implicit_tol: float = 1e-10,
    implicit_max_steps: int = 200,
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
    - `"shine_opa"`: outer-problem awareness: every `opa_every` inner steps, the pair
      $(d, H d)$ with $d$ the current inverse estimate applied to
      $\nabla_w g$ is added to the memory, so the inverse is accurate where the
      hypergradient needs it (one extra outer gradient and Hessian-vector product
      each time).
    - `"shine_refine"`: `refine_steps` conjugate-gradient steps from the SHINE
      estimate, preconditioned by the same L-BFGS inverse.
    - `"implicit"`: conjugate gradient to `implicit_tol` (at most
      `implicit_max_steps`): the exact reference (HOAG).
    - `"jacobian_free"`: $v = \nabla_w g$ (the inverse replaced by the identity).

    Extra keyword arguments of `update` (a data batch, say) are passed to both
    losses. The inner optimizer's memory is rebuilt by every solve (only $w$ is
    warm-started), so the solve must take a few steps for SHINE to have curvature
    pairs: a decreasing `inner_tol` (HOAG's schedule) ensures it.

    **Arguments:**

    - `inner_loss`: `inner_loss(w, h, **extra) -> scalar` $f$, smooth and strongly
      convex in $w$ near $w^*$.
    - `outer_loss`: `outer_loss(w, h, **extra) -> scalar` $g$.
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
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be a callable, got {inner_loss!r}")
    if not callable(outer_loss):
        raise TypeError(f"outer_loss must be a callable, got {outer_loss!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inner_max_steps = check_int(inner_max_steps, "inner_max_steps", 1)
    opa_every = check_int(opa_every, "opa_every", 1)
    refine_steps = check_int(refine_steps, "refine_steps", 0)
    implicit_max_steps = check_int(implicit_max_steps, "implicit_max_steps", 1)
    if not callable(inner_tol) and not (
        isinstance(inner_tol, (int, float)) and inner_tol > 0
    ):
        raise ValueError(
            f"inner_tol must be a positive float or a schedule, got {inner_tol!r}"
        )
    _check_floats(inner_init, "inner_init")
    optimizer = (
        optax.lbfgs(memory_size=30) if inner_optimizer is None else inner_optimizer
    )
    _lbfgs_state(optimizer.init(inner_init))  # raises if there is no L-BFGS in it

    def check(hparams, extra):
        _check_floats(hparams, "params (the hyperparameters)")
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            try:
                out = jax.eval_shape(
                    lambda w, h, f=fn: f(w, h, **extra), inner_init, hparams
                )
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    f"{name}(inner_init, params) failed; do inner_init "
                    f"{_describe(inner_init)} and the hyperparameters "
                    f"{_describe(hparams)} match the losses? ({e})"
                ) from e
            if getattr(out, "shape", None) != () or not jnp.issubdtype(
                out.dtype, jnp.floating
            ):
                raise ValueError(
                    f"{name} must return a float scalar, got {_describe(out)}"
                )

    def init_fn(params: PyTree) -> BilevelState:
        # The losses may need update's keyword arguments: they are checked there.
        _check_floats(params, "params (the hyperparameters)")
        return BilevelState(
            count=jnp.zeros((), jnp.int32),
            inner_params=inner_init,
            inner_steps=jnp.zeros((), jnp.int32),
            inner_grad_norm=jnp.zeros((), jnp.float32),
            inner_converged=jnp.zeros((), bool),
            hypergrad_norm=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "shine_bilevel")
        check(params, extra_args)
        w0 = jax.tree.map(jnp.asarray, state.inner_params)
        w0_flat, unravel = ravel_pytree(w0)
        tol = inner_tol(state.count) if callable(inner_tol) else inner_tol
        tol = jnp.asarray(tol, w0_flat.dtype)

        def f(wf, h):
            return inner_loss(unravel(wf), h, **extra_args)

        def g(wf, h):
            return outer_loss(unravel(wf), h, **extra_args)

        value_and_grad = jax.value_and_grad(lambda wf: f(wf, params))
        grad_outer = jax.grad(lambda wf: g(wf, params))

        def hvp(wf, v):
            return jax.jvp(jax.grad(lambda u: f(u, params)), (wf,), (v,))[1]

        def inner_update(grad, opt_state, wf, value):
            updates, opt_state = optimizer.update(
                unravel(grad),
                opt_state,
                unravel(wf),
                value=value,
                grad=unravel(grad),
                value_fn=lambda w: inner_loss(w, params, **extra_args),
            )
            return wf + ravel_pytree(updates)[0], opt_state

        def add_opa_pair(wf, opt_state):
            lbfgs = _lbfgs_state(opt_state)
            d = lbfgs_inverse_hessian(lbfgs, grad_outer(wf))
            lbfgs = _add_pair(lbfgs, d, hvp(wf, d), lambda r: unravel(r))
            return _replace_lbfgs_state(opt_state, lbfgs)

        value0, grad0 = value_and_grad(w0_flat)
        carry = (w0_flat, optimizer.init(w0), value0, grad0, jnp.zeros((), jnp.int32))

        def cond(c):
            _, _, _, grad, k = c
            return (k < inner_max_steps) & (jnp.linalg.norm(grad) > tol)

        # optax.lbfgs's line search keeps the value and gradient at the point it
        # accepts: reuse them (as optax.value_and_grad_from_state does).
        stored = [
            optax.tree_utils.tree_get(optimizer.init(w0), k) for k in ("value", "grad")
        ]
        reuse = all(x is not None for x in stored)

        def body(c):
            wf, opt_state, value, grad, k = c
            wf, opt_state = inner_update(grad, opt_state, wf, value)
            if reuse:
                value = optax.tree_utils.tree_get(opt_state, "value")
                grad = ravel_pytree(optax.tree_utils.tree_get(opt_state, "grad"))[0]
            else:
                value, grad = value_and_grad(wf)
            if method == "shine_opa":
                opt_state = jax.lax.cond(
                    (k + 1) % opa_every == 0,
                    lambda: add_opa_pair(wf, opt_state),
                    lambda: opt_state,
                )
            return wf, opt_state, value, grad, k + 1

        w_flat, opt_state, _, grad, steps = jax.lax.while_loop(cond, body, carry)
        gw = grad_outer(w_flat)
        if method == "jacobian_free":
            v = gw
        elif method == "implicit":
            v = _conjugate_gradient(
                lambda u: hvp(w_flat, u),
                gw,
                jnp.zeros_like(gw),
                implicit_max_steps,
                implicit_tol,
            )
        else:
            lbfgs = _lbfgs_state(opt_state)
            v = lbfgs_inverse_hessian(lbfgs, gw)
            if method == "shine_refine" and refine_steps:
                # Conjugate gradient preconditioned by the same L-BFGS inverse,
                # started from the SHINE estimate.
                v = _conjugate_gradient(
                    lambda u: hvp(w_flat, u),
                    gw,
                    v,
                    refine_steps,
                    0.0,
                    precondition=lambda r: lbfgs_inverse_hessian(lbfgs, r),
                )
        grad_h = jax.grad(lambda h: g(w_flat, h))(params)
        _, mixed_vjp = jax.vjp(lambda h: jax.grad(f)(w_flat, h), params)
        (mixed,) = mixed_vjp(v)
        hypergrad = jax.tree.map(lambda a, b: a - b, grad_h, mixed)
        new_state = BilevelState(
            count=state.count + 1,
            inner_params=unravel(w_flat),
            inner_steps=steps,
            inner_grad_norm=jnp.linalg.norm(grad).astype(jnp.float32),
            inner_converged=jnp.linalg.norm(grad) <= tol,
            hypergrad_norm=optax.tree.norm(hypergrad).astype(jnp.float32),
        )
        new_updates = jax.tree.map(
            lambda u, e: (u + e).astype(jnp.result_type(u)), updates, hypergrad
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _describe(tree: PyTree) -> str:
    return str(
        jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(jnp.shape(a))}", tree)
    )


def _check_floats(tree: PyTree, name: str) -> None:
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(
        jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in leaves
    ):
        raise TypeError(
            f"{name} must be a non-empty pytree of float arrays, got "
            f"{_describe(tree) if leaves else tree!r}"
        )
