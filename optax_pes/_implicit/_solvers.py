"""Fixed-point solvers for `optax_pes.DEQ`: Broyden, Anderson and damped iteration.

Every solver works on one sample with a flat state vector `z` (the DEQ flattens any
pytree), solving `g(z) = fn(z) - z = 0`. They share one driver, `solve`, which keeps
the lowest-residual iterate and stops on tolerance, stagnation or divergence.
"""

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from optax_pes._checks import check_float, check_int, python_float
from optax_pes._implicit._flat import FlatFn
from optax_pes._tree import at_least_float32, vector_norm

# Stop when the best residual has not improved for this many steps...
_STAGNATION_STEPS = 50
# ...or when the residual exceeds this multiple of the initial one (divergence).
_DIVERGENCE_FACTOR = 1e4


class SolveInfo(NamedTuple):
    """Convergence statistics of a fixed-point solve (stop-gradient)."""

    steps: jax.Array  # shape=(), int32: iterations this sample took
    residual: jax.Array  # shape=(), z's dtype, at least float32: `|fn(z*) - z*|`
    relative_residual: jax.Array  # shape=(), as residual: `residual / |z*|`
    converged: jax.Array  # shape=(), bool: residual or relative_residual <= tol


def _row_blocks(memory: int) -> tuple[int, ...]:
    """The leading blocks of a `memory`-row buffer that an apply may read:
    1, 2, 4, ... rows, then all of them (at most twice the rows in use)."""
    blocks, size = [], 1
    while size < memory:
        blocks.append(size)
        size *= 2
    return (*blocks, memory)


class LowRankInverse(eqx.Module):
    r"""An inverse-Jacobian estimate $B^{-1} = -I + U^\top C V$ of $g = f - I$.

    The rows of `u` and `v` pair up into its rank-one terms through the small
    `core` matrix $C$ (the identity when `core` is None, as in
    `LowRankInverse(u, v)`, where an unused row of `u` is zero); applying it, or
    its transpose, costs $O(\text{rows} \times d)$. `Broyden` hands its estimate
    over compact, `u` and `v` both its `memory + 1` steps and `core` the small
    matrix of its update, whose rows and columns for unused steps are zero: one
    buffer for SHINE's backward to keep, not two. An apply reads every row: under
    `jax.vmap` a slice of the batched buffers is a copy, which costs SHINE's
    one-pass backward more than it saves.
    """

    u: Float[Array, "rows d"]
    v: Float[Array, "rows d"]
    core: Float[Array, "rows rows"] | None = None

    def mv(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        """$B^{-1} x$ (in at least float32, in `x`'s dtype)."""
        return _low_rank_minus_identity(self.v, self.core, self.u, x)

    def rmv(self, x: Float[Array, " d"]) -> Float[Array, " d"]:
        r"""$B^{-\top} x$ (in at least float32, in `x`'s dtype)."""
        core = None if self.core is None else self.core.T
        return _low_rank_minus_identity(self.u, core, self.v, x)

    def as_matrix(self) -> Float[Array, "d d"]:
        """The dense estimate (for tests and small problems)."""
        d, acc = self.u.shape[1], at_least_float32(self.u.dtype)
        v = self.v.astype(acc)
        v = v if self.core is None else self.core.astype(acc) @ v
        dense = self.u.T.astype(acc) @ v - jnp.eye(d, dtype=acc)
        return dense.astype(self.u.dtype)


def _low_rank_minus_identity(
    right: Float[Array, "rows d"],
    core: Float[Array, "rows rows"] | None,
    left: Float[Array, "rows d"],
    x: Float[Array, " d"],
) -> Float[Array, " d"]:
    r"""$(L^\top C R - I) x$, in at least float32 (a float16 product overflows past
    65504), returned in `x`'s dtype; `core` None is $C = I$."""
    acc = at_least_float32(x.dtype)
    y = right.astype(acc) @ x.astype(acc)
    y = y if core is None else core.astype(acc) @ y
    return (left.T.astype(acc) @ y - x.astype(acc)).astype(x.dtype)


class AbstractSolver(eqx.Module):
    """A fixed-point solver: `init` and `step` on a solver state holding `z`, `g`."""

    max_steps: eqx.AbstractVar[int]
    tol: eqx.AbstractVar[float]
    provides_inverse: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, fn: FlatFn, z0: Float[Array, " d"]) -> Any:
        """The state at `z0`; must have fields `z` and `g = fn(z) - z`."""

    @abc.abstractmethod
    def step(
        self,
        fn: FlatFn,
        state: Any,
        active: Bool[Array, ""],
        iteration: Int[Array, ""],
    ) -> Any:
        """One iteration; where `active` is False the state must come back unchanged
        (up to the sign of a zero).

        (Under `jax.vmap` the loop runs until every sample is done; masking inside
        the step, row by row, avoids a select over whole history buffers.)
        `iteration` is the loop's own count, the same for every sample (unbatched
        under `jax.vmap`): an active sample has taken exactly that many steps, so
        history rows are indexed by it, one row of every sample at once; a
        per-sample counter makes each write a scatter at batched indices, measured
        1.9x slower for a whole Broyden solve.
        """

    def inverse(self, state: Any) -> LowRankInverse | None:
        """The inverse-Jacobian estimate the backward pass may reuse (or None)."""
        return None

    def __check_init__(self):
        # (Equinox runs every class's __check_init__: the solvers check the rest.)
        check_int(self.max_steps, "max_steps", 1)
        check_float(self.tol, "tol")


class _Driver(NamedTuple):
    """The carry of `solve`'s loop (one sample; a leading batch axis under vmap)."""

    state: Any  # the solver's state: a NamedTuple with (at least) fields z and g
    best_z: jax.Array  # shape=(d,), z's dtype: the lowest-residual iterate so far
    best_res: jax.Array  # shape=(), z's dtype, at least float32: its residual
    #   `|fn(best_z) - best_z|`
    first_res: jax.Array  # shape=(), as best_res: the residual at z0 (divergence test)
    iteration: jax.Array  # shape=(), int32: loop iterations (not batched under vmap)
    steps: jax.Array  # shape=(), int32: iterations while this sample was active
    stall: jax.Array  # shape=(), int32: iterations since best_res last improved
    done: jax.Array  # shape=(), bool: converged, stalled, diverged or non-finite


def _converged(res, z, tol):
    # (A z whose norm overflows is no scale for a relative test: inf * tol passes
    # any finite residual.)
    size = vector_norm(z)
    return (res <= tol) | (jnp.isfinite(size) & (res <= tol * size))


def solve(
    solver: AbstractSolver, fn: FlatFn, z0: Float[Array, " d"]
) -> tuple[Float[Array, " d"], SolveInfo, LowRankInverse | None]:
    """Run `solver` on `fn` from `z0`; return the lowest-residual iterate.

    Not differentiable (call it on stop-gradient inputs): the DEQ's adjoints define
    the derivative. Under `jax.vmap` the loop's predicate is unbatched (any sample
    still running) and finished samples are masked inside the step, so the history
    buffers are never copied wholesale by a batched `while_loop`.
    """
    state = solver.init(fn, z0)
    res0 = vector_norm(state.g)  # (at least float32: a float16 one overflows at 256)
    zero = jnp.zeros((), jnp.int32)
    carry = _Driver(
        state=state,
        best_z=state.z,
        best_res=res0,
        first_res=res0,
        iteration=zero,
        steps=zero,
        stall=zero,
        done=_converged(res0, state.z, solver.tol) | ~jnp.isfinite(res0),
    )

    def cond(c: _Driver):
        return eqxi.unvmap_any(~c.done) & (c.iteration < solver.max_steps)

    def body(c: _Driver):
        active = ~c.done
        state = solver.step(fn, c.state, active, c.iteration)
        res = vector_norm(state.g)
        finite = jnp.isfinite(res)
        better = active & finite & (res < c.best_res)
        improved = finite & (res < (1 - 1e-3) * c.best_res)
        best_z = jnp.where(better, state.z, c.best_z)
        best_res = jnp.where(better, res, c.best_res)
        stall = jnp.where(improved, 0, c.stall + 1)
        done = c.done | (
            _converged(best_res, best_z, solver.tol)
            | ~finite
            | (res > _DIVERGENCE_FACTOR * c.first_res)
            | (stall >= _STAGNATION_STEPS)
        )
        return _Driver(
            state,
            best_z,
            best_res,
            c.first_res,
            c.iteration + 1,
            c.steps + active.astype(jnp.int32),
            stall,
            done,
        )

    carry = jax.lax.while_loop(cond, body, carry)
    norm_z = vector_norm(carry.best_z)
    info = SolveInfo(
        steps=carry.steps,
        residual=carry.best_res,
        relative_residual=jnp.where(
            jnp.isfinite(norm_z),
            carry.best_res / jnp.maximum(norm_z, jnp.finfo(norm_z.dtype).tiny),
            jnp.inf,  # (an overflowed |z|: no scale, as in _converged)
        ),
        converged=_converged(carry.best_res, carry.best_z, solver.tol),
    )
    return carry.best_z, info, solver.inverse(carry.state)


def _keep(active: Array, new: Array, old: Array) -> Array:
    return jnp.where(active, new, old)


# ---------------------------------------------------------------------- Broyden ----


class _BroydenState(NamedTuple):
    """Broyden's state: the iterate, and its inverse estimate in compact form."""

    z: jax.Array  # shape=(d,), z's dtype: the current iterate
    g: jax.Array  # shape=(d,), z's dtype: `fn(z) - z`
    step: jax.Array  # shape=(d,), z's dtype: the next step, `-B^-1 g`
    s: jax.Array  # shape=(memory + 1, d), z's dtype: the steps, one a row
    a: jax.Array  # shape=(memory + 1, memory + 1), z's dtype, at least float32:
    #   B^-1 = -I + S^T A S
    filled: jax.Array  # shape=(), int32: rows of s and a in use since the last restart
    # (Step i takes the step in row i % (memory + 1) and writes the next one after it.
    # Rows from `filled` on are stale, left by the cycle before a restart or zero, and
    # never read: row i of a, written after the restart, is zero from column i on.)


def _on_filled_steps(s, a, rows, apply):
    """`apply(s, a)` on the smallest leading block of rows (of `s`, and of `a`'s
    rows and columns) that holds the `rows` filled ones; the block's rows past
    `rows` may be stale, and `apply` masks them. `rows` is reduced over a `jax.vmap`
    batch (the batch's largest), so the choice of block is a real branch, not a
    select that runs every block. Under vmap the slice of a (batch, rows, d) buffer
    is a copy, which the step's reads of it repay."""
    blocks = _row_blocks(s.shape[0])
    rows = eqxi.unvmap_max(jnp.minimum(rows, s.shape[0]))
    index = jnp.sum(jnp.asarray(blocks[:-1]) < rows)  # (searchsorted: a loop)

    def branch(r):
        return lambda s, a: apply(s[:r], a[:r, :r])

    return jax.lax.switch(index, [branch(r) for r in blocks], s, a)


class Broyden(AbstractSolver):
    r"""Good Broyden's method with a low-rank inverse kept in fixed-size buffers.

    Solves $g(z) = f(z) - z = 0$ with steps $z \leftarrow z - B^{-1} g(z)$ and the
    inverse form of the "good" Broyden update, starting from $B^{-1} = -I$ (so the
    first step is a plain fixed-point step):

    $$v^\top = \Delta z^\top B^{-1}, \qquad
      u = \frac{\Delta z - B^{-1} \Delta g}{\Delta z^\top B^{-1} \Delta g}, \qquad
      B^{-1} \leftarrow B^{-1} + u v^\top .$$

    Every $u$ and $v$ lies in the span of the steps taken (each $u$ is parallel to
    the next step), so the estimate is kept as $B^{-1} = -I + S^\top A S$: the steps
    since the start or last restart (at most `memory + 1`) as the rows of $S$ and a
    small `(memory + 1)`-square matrix $A$; a step reads the filled rows of $S$
    three times ($S g$, $S \Delta z$, $S^\top (A S g)$). This is good Broyden
    (with the safeguard below) until the buffer is full (`max_steps <= memory`, as
    by default). Then the method restarts
    from $B^{-1} = -I$ at the current iterate (SciPy's default `reduction_method`
    for limited-memory Broyden), so every `memory + 1` steps begin with a plain
    fixed-point step. A near-zero denominator (or an overflow) skips the update.
    The solve returns the lowest-residual iterate and hands the final $B^{-1}$ to
    the backward pass (`optax_pes.Shine`) as a compact `LowRankInverse`: the
    `memory + 1` steps $S$ (as `u` and `v`) and $A$ (as `core`).

    Each update multiplies $\det B$ by $\gamma = \Delta z^\top B^{-1} \Delta g /
    \|\Delta z\|^2$. Powell's safeguard damps an update with $|\gamma| <$
    `powell` (replacing $\Delta g$ by $B \Delta z + \theta(\Delta g - B \Delta z)$)
    so that the factor is exactly $\pm$`powell`: without it a nearly singular $B$
    gives $B^{-1}$ (and SHINE's gradient) entries hundreds of times too large, and
    the next step a jump.

    **Arguments:**

    - `max_steps`: the most iterations.
    - `tol`: stop when $\|g(z)\| \le$ `tol` or $\|g(z)\| \le$ `tol` $\|z\|$.
    - `memory`: the updates made before a restart (the buffers hold `memory + 1`
      steps).
    - `powell`: Powell's safeguard $\sigma \in [0, 1)$; 0 is plain good Broyden.

    Also stops when the best residual has not improved for 50 steps (stagnation)
    or the residual grows 10^4-fold (divergence); `info.converged` tells.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import optax_pes
    >>> solver = optax_pes.Broyden(max_steps=30, tol=1e-6, memory=10)
    >>> deq = optax_pes.DEQ(lambda z, x: jnp.tanh(0.9 * z + x), solver=solver)
    >>> x = jnp.array([0.5, -1.0, 2.0])
    >>> z, info = deq.solve(x, jnp.zeros(3))
    >>> bool(info.converged), bool(jnp.allclose(z, jnp.tanh(0.9 * z + x), atol=1e-5))
    (True, True)

    ```
    """

    max_steps: int = eqx.field(static=True, default=30)
    tol: float = eqx.field(static=True, default=1e-5, converter=python_float)
    memory: int = eqx.field(static=True, default=30)
    powell: float = eqx.field(static=True, default=0.3, converter=python_float)
    provides_inverse: ClassVar[bool] = True

    def __check_init__(self):
        check_int(self.memory, "memory", 1)
        check_float(
            self.powell,
            "powell",
            low=0,
            high=1,
            low_inclusive=True,
            high_inclusive=False,
        )

    def init(self, fn, z0):
        rows = self.memory + 1
        g = fn(z0) - z0
        # The first step, -B^-1 g = g, is row 0; A = 0 is B^-1 = -I.
        s = jnp.zeros((rows,) + z0.shape, z0.dtype).at[0].set(g)
        a = jnp.zeros((rows, rows), at_least_float32(z0.dtype))
        return _BroydenState(z0, g, g, s, a, jnp.ones((), jnp.int32))

    def step(self, fn, state, active, iteration):
        rows = self.memory + 1
        slot, nxt = iteration % rows, (iteration + 1) % rows
        dz = state.step  # = row `slot` of s
        # A finished sample stays put: its z and g come back as they were, masked
        # where they are computed (a select after would be a pass over each). Its
        # other results are discarded row by row below.
        z = state.z + jnp.where(active, dz, 0)
        g = jnp.where(active, fn(z) - z, state.g)

        # Rows 0 .. iteration % rows hold the steps since the last restart (for an
        # active sample).
        filled = iteration % rows + 1
        # The update's arithmetic runs in at least float32 (a no-op for float32 and
        # float64): a float16 dot product overflows once it passes 65504, which
        # |dz|^2 does at |dz| = 256. The buffers and iterates keep z's dtype.
        acc = at_least_float32(z.dtype)
        g_acc, dz = g.astype(acc), dz.astype(acc)

        def apply(s, a):
            # S g and S dz (two matrix-vector products: a (r, d) @ (d, 2) product
            # is a slow path on XLA:CPU), then -B^-1 g = g - S^T (A S g). Stale rows
            # are masked out of A S g and S dz; A's columns for them are zero in the
            # rows in use, so S g needs no mask.
            s = s.astype(acc)
            in_use = (jnp.arange(s.shape[0]) < filled).astype(acc)
            p, q = s @ g_acc, (s @ dz) * in_use
            pad = lambda t: jnp.pad(t, (0, rows - t.shape[0]))  # noqa: E731
            return g_acc - s.T @ ((a @ p) * in_use), pad(p), pad(a.T @ q)

        step, p, a_q = _on_filled_steps(state.s, state.a, filled, apply)
        # v = B^-T dz = S^T c with c = A^T S dz - e_slot (dz is row `slot`).
        c = a_q - jax.nn.one_hot(slot, rows, dtype=acc)
        inv_dg = dz - step  # B^-1 (g - g_old) = -step + dz
        denom = jnp.dot(dz, inv_dg)
        # Powell's safeguard: the update scales det(B) by gamma = denom / |dz|^2.
        # Where |gamma| < sigma, B^-1 dg is replaced by theta B^-1 dg + (1 - theta) dz
        # (B dz + theta (dg - B dz) for dg), which makes that factor exactly
        # sign(gamma) sigma; dz - B^-1 dg is scaled by theta, so u keeps its
        # direction (parallel to the next step).
        sigma = self.powell
        dz2 = jnp.dot(dz, dz)
        gamma = denom / jnp.where(dz2 == 0, 1, dz2)
        sign = jnp.where(gamma >= 0, 1, -1).astype(acc)
        theta = jnp.where(jnp.abs(gamma) < sigma, (1 - sign * sigma) / (1 - gamma), 1)
        denom = theta * denom + (1 - theta) * dz2
        # The updated inverse applied to g is kappa B^-1 g (u is parallel to B^-1 g):
        # the next step is kappa * step, and u = theta (next step) / (kappa * denom).
        kappa = 1 - theta * jnp.dot(c, p) / jnp.where(denom == 0, 1, denom)
        # A's new row. An update with a near-zero denominator, or whose row
        # overflows, is skipped: A only ever holds finite rows (the masks in `apply`
        # and `inverse` multiply stale rows by zero). A non-finite g makes p, and so
        # step, denom and kappa, non-finite: skipped too.
        row = theta / (kappa * jnp.where(denom == 0, 1, denom)) * c
        eps = float(jnp.finfo(z.dtype).eps)
        tiny = eps * jnp.sqrt(dz2) * jnp.linalg.norm(inv_dg)  # (in acc)
        ok = (
            jnp.isfinite(denom)
            & (jnp.abs(denom) > tiny)
            & jnp.isfinite(kappa)
            & (jnp.abs(kappa) > eps)
            & jnp.all(jnp.isfinite(row))
        )
        kappa = jnp.where(ok, kappa, 1)
        # A full buffer restarts from B^-1 = -I (SciPy's default reduction for
        # limited-memory Broyden): the next step is a fixed-point step, row 0, and
        # A's row 0 is zero. The rows past it are stale until rewritten; they are
        # not read, so the restart writes one row, not all of A (a select over the
        # whole (batch, rows, rows) A, and the copy XLA added after it, made a solve
        # 9-11 % slower at memory 30). (Dropping only the oldest step instead
        # made the residual wander once the buffer wrapped; on a layer slow for
        # plain iteration most solves stopped unconverged.)
        restart = nxt == 0
        # The next step goes to row `nxt` and the new update is row `nxt` of A.
        keep = 1 - jax.nn.one_hot(nxt, rows, dtype=acc)
        new_step = jnp.where(restart, g_acc, kappa * step).astype(z.dtype)
        # A g that is not finite (z left fn's domain, or |g| overflows: the driver's
        # test, which ends this sample's solve), or a next step that overflows
        # (which ends it one step later), writes neither its step nor its update:
        # the inverse handed to the backward is that of the steps before. (The
        # stale row of S left in its place meets a zero row and column of A.)
        finite = jnp.isfinite(vector_norm(g)) & jnp.all(jnp.isfinite(new_step))
        row = jnp.where(restart | ~ok | ~finite, 0, row * keep)
        a = state.a.at[nxt].set(_keep(active, row, state.a[nxt]))
        step = _keep(active, new_step, state.step)
        return _BroydenState(
            z,
            g,
            step,
            state.s.at[nxt].set(_keep(active & finite, step, state.s[nxt])),
            a,
            _keep(active, (nxt + 1).astype(jnp.int32), state.filled),
        )

    def inverse(self, state):
        # -I + S^T A S, with A's stale rows zeroed (their columns are zero in the
        # rows in use), handed over compact: forming U = A^T S would cost a pass
        # over S here and a second buffer for the backward to keep.
        rows = state.a.shape[0]
        a = state.a * (jnp.arange(rows) < state.filled)[:, None].astype(state.a.dtype)
        return LowRankInverse(state.s, state.s, a)


# --------------------------------------------------------------------- Anderson ----


class _AndersonState(NamedTuple):
    """Anderson's state: the iterate and its history, in circular buffers."""

    z: jax.Array  # shape=(d,), z's dtype: the current iterate
    g: jax.Array  # shape=(d,), z's dtype: `fn(z) - z`
    xs: jax.Array  # shape=(memory, d), z's dtype: past iterates, one a row
    fs: jax.Array  # shape=(memory, d), z's dtype: fn at them
    # (Row 0 holds z0; step i writes row (i + 1) % memory, so i + 1 rows are used.)


class Anderson(AbstractSolver):
    r"""Anderson acceleration (type II) with a ridge-regularised mixing problem.

    Keeps the last `memory` iterates $z_i$ and values $f(z_i)$; the next iterate is
    $\beta \sum_i \alpha_i f(z_i) + (1 - \beta) \sum_i \alpha_i z_i$ with $\alpha$
    minimising $\|\sum_i \alpha_i (f(z_i) - z_i)\|^2 + \lambda \|\alpha\|^2$ subject to
    $\sum_i \alpha_i = 1$. Provides no inverse estimate (use it with
    `optax_pes.Implicit`, `JacobianFree` or `Phantom`).

    **Arguments:** `max_steps`, `tol` as `optax_pes.Broyden`; `memory` the history
    length; `damping` $\beta \in (0, 1]$; `ridge` $\lambda \ge 0$.
    """

    max_steps: int = eqx.field(static=True, default=30)
    tol: float = eqx.field(static=True, default=1e-5, converter=python_float)
    memory: int = eqx.field(static=True, default=5)
    damping: float = eqx.field(static=True, default=1.0, converter=python_float)
    ridge: float = eqx.field(static=True, default=1e-4, converter=python_float)

    def __check_init__(self):
        check_int(self.memory, "memory", 1)
        check_float(self.damping, "damping", high=1.0)
        check_float(self.ridge, "ridge", low_inclusive=True)

    def init(self, fn, z0):
        f0 = fn(z0)
        xs = jnp.zeros((self.memory,) + z0.shape, z0.dtype).at[0].set(z0)
        fs = jnp.zeros((self.memory,) + z0.shape, z0.dtype).at[0].set(f0)
        return _AndersonState(z0, f0 - z0, xs, fs)

    def step(self, fn, state, active, iteration):
        m = self.memory
        # The mixing problem in at least float32 (LAPACK has no 16-bit solve, and
        # a float16 Gram matrix overflows); the iterates keep z's dtype.
        acc = at_least_float32(state.z.dtype)
        xs, fs = state.xs.astype(acc), state.fs.astype(acc)
        used = (jnp.arange(m) < iteration + 1).astype(acc)
        gs = (fs - xs) * used[:, None]
        gram = gs @ gs.T
        scale = jnp.maximum(jnp.max(jnp.diagonal(gram)), jnp.finfo(gram.dtype).tiny)
        gram = gram / scale + self.ridge * jnp.eye(m, dtype=gram.dtype)
        gram = gram * used[:, None] * used[None, :] + jnp.diag(1 - used)
        h = jnp.block(
            [[jnp.zeros((1, 1), gram.dtype), used[None, :]], [used[:, None], gram]]
        )
        rhs = jnp.zeros(m + 1, gram.dtype).at[0].set(1)
        alpha = jnp.linalg.solve(h, rhs)[1:]
        alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, used / jnp.sum(used))
        z = self.damping * (alpha @ fs) + (1 - self.damping) * (alpha @ xs)
        z = z.astype(state.z.dtype)
        # A finished sample stays put (selected before f is applied, so that f's
        # output needs no select after) and writes its history row back unchanged.
        z = _keep(active, z, state.z)
        f = fn(z)
        slot = (iteration + 1) % m
        return _AndersonState(
            z,
            _keep(active, f - z, state.g),
            state.xs.at[slot].set(_keep(active, z, state.xs[slot])),
            state.fs.at[slot].set(_keep(active, f, state.fs[slot])),
        )


# ------------------------------------------------------------------ fixed point ----


class _FixedPointState(NamedTuple):
    """Fixed-point iteration's state."""

    z: jax.Array  # shape=(d,), z's dtype: the current iterate
    g: jax.Array  # shape=(d,), z's dtype: `fn(z) - z`


class FixedPoint(AbstractSolver):
    r"""Damped fixed-point iteration $z \leftarrow z + \beta (f(z) - z)$.

    Converges when $f$ is a contraction (for $\beta = 1$). No inverse estimate.

    **Arguments:** `max_steps`, `tol` as `optax_pes.Broyden`; `damping` $\beta$.
    """

    max_steps: int = eqx.field(static=True, default=100)
    tol: float = eqx.field(static=True, default=1e-5, converter=python_float)
    damping: float = eqx.field(static=True, default=1.0, converter=python_float)

    def __check_init__(self):
        check_float(self.damping, "damping", high=1.0)

    def init(self, fn, z0):
        return _FixedPointState(z0, fn(z0) - z0)

    def step(self, fn, state, active, iteration):
        del iteration
        # A finished sample stays put: masked where computed, not selected after
        # (a pass over z and g less per step).
        z = state.z + jnp.where(active, self.damping * state.g, 0)
        return _FixedPointState(z, _keep(active, fn(z) - z, state.g))
