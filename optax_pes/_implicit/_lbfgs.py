r"""optax's L-BFGS memory as an inverse-Hessian estimate: find it, apply it, extend it.

SHINE for bi-level problems reads the curvature pairs that `optax.scale_by_lbfgs`
keeps in its state, so this module is the one place that knows their layout. With
`m = memory_size` and `count` the number of updates made so far (optax 0.2;
`tests/test_lbfgs.py` pins it):

- the update that brings `count` from `c` to `c + 1` writes the pair
  $(s, y) = (w_c - w_{c-1}, \nabla f(w_c) - \nabla f(w_{c-1}))$ of the two latest
  points, with `weights_memory` $= 1 / s^\top y$ ($0$ where $s^\top y = 0$), into
  slot `(c - 1) % m`;
- so the most recent pair is in slot `(count - 2) % m` and the next one goes to
  `(count - 1) % m`; the first update writes a zero pair of weight $0$ (there is no
  previous point), and a solve of $k$ steps leaves $\min(k - 1, m)$ pairs.

Empty slots have weight 0 and contribute nothing to the two-loop recursion.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

State = optax.ScaleByLBFGSState


def _is_lbfgs(x: Any) -> bool:
    return isinstance(x, State)


def find_state(opt_state: Any) -> State:
    """The one `optax.ScaleByLBFGSState` inside an optimizer's state.

    Raises `ValueError` if there is not exactly one (as in `optax.lbfgs`).
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_lbfgs) if _is_lbfgs(s)]
    if len(found) != 1:
        raise ValueError(
            "inner_optimizer must contain exactly one optax.scale_by_lbfgs (as "
            f"optax.lbfgs does); its state has {len(found)}"
        )
    return found[0]


def replace_state(opt_state: Any, new: State) -> Any:
    """`opt_state` with its `optax.ScaleByLBFGSState` replaced by `new`."""
    return jax.tree.map(
        lambda s: new if _is_lbfgs(s) else s, opt_state, is_leaf=_is_lbfgs
    )


def latest_slot(lbfgs: State) -> Int[Array, ""]:
    """The memory slot holding the most recent curvature pair."""
    return (lbfgs.count - 2) % lbfgs.weights_memory.shape[0]


def _rows(memory: Any) -> Float[Array, "m d"]:
    return jax.vmap(lambda t: ravel_pytree(t)[0])(memory)


class LBFGSInverse(eqx.Module):
    r"""The L-BFGS estimate of $H^{-1}$ defined by a memory of curvature pairs.

    `s` and `y` hold one pair per row (flattened), `rho` $= 1 / s^\top y$ (0 for an
    empty slot) and `latest` the row of the most recent pair, whose
    $\gamma = s^\top y / y^\top y$ scales the initial estimate $\gamma I$, unless
    `initial` gives that estimate's diagonal $H_0$ (entries that are not finite and
    positive take $\gamma$). Applying it costs $O(m d)$ and evaluates nothing.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> from optax_pes._implicit._lbfgs import LBFGSInverse
    >>> def f(w):
    ...     return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * w**2)
    >>> solver, w = optax.lbfgs(), jnp.array([1.0, 1.0])
    >>> state = solver.init(w)
    >>> for _ in range(3):
    ...     value, grad = optax.value_and_grad_from_state(f)(w, state=state)
    ...     updates, state = solver.update(
    ...         grad, state, w, value=value, grad=grad, value_fn=f
    ...     )
    ...     w = optax.apply_updates(w, updates)
    >>> inverse = LBFGSInverse.from_state(state[0])  # two pairs
    >>> s, y = inverse.s[inverse.latest], inverse.y[inverse.latest]
    >>> bool(jnp.allclose(inverse.mv(y), s))  # the newest pair's secant equation
    True
    >>> np.asarray(inverse.as_matrix(), float).round(2).tolist()  # ~ diag(1, 0.25)
    [[0.96, 0.03], [0.03, 0.22]]

    ```
    """

    s: Float[Array, "m d"]
    y: Float[Array, "m d"]
    rho: Float[Array, " m"]
    latest: Int[Array, ""]
    initial: Float[Array, " d"] | None = None

    @classmethod
    def from_state(
        cls, lbfgs: State, initial: Float[Array, " d"] | None = None
    ) -> "LBFGSInverse":
        r"""The estimate held by an `optax.ScaleByLBFGSState` (with the initial
        diagonal `initial`, or $\gamma I$)."""
        s = _rows(lbfgs.diff_params_memory)
        return cls(
            s=s,
            y=_rows(lbfgs.diff_updates_memory),
            rho=lbfgs.weights_memory.astype(s.dtype),
            latest=latest_slot(lbfgs),
            initial=initial,
        )

    def mv(self, d: Float[Array, " d"]) -> Float[Array, " d"]:
        r"""$H^{-1} d$ by the two-loop recursion (Nocedal & Wright, Algorithm 7.4)."""
        s, y, rho, last = self.s, self.y, self.rho, self.latest
        m = rho.shape[0]
        newest_first = (last - jnp.arange(m)) % m

        def first(q, i):
            alpha = rho[i] * jnp.dot(s[i], q)
            return q - alpha * y[i], alpha

        q, alphas = jax.lax.scan(first, d, newest_first)
        sy, yy = jnp.dot(s[last], y[last]), jnp.dot(y[last], y[last])
        gamma = jnp.where((sy > 0) & (yy > 0), sy / jnp.where(yy > 0, yy, 1), 1.0)
        if self.initial is not None:
            ok = jnp.isfinite(self.initial) & (self.initial > 0)
            gamma = jnp.where(ok, self.initial, gamma)

        def second(r, i_alpha):
            i, alpha = i_alpha
            beta = rho[i] * jnp.dot(y[i], r)
            return r + (alpha - beta) * s[i], None

        r, _ = jax.lax.scan(second, gamma * q, (newest_first, alphas), reverse=True)
        return r

    def as_matrix(self) -> Float[Array, "d d"]:
        """The dense estimate (for tests and small problems)."""
        return jax.vmap(self.mv)(jnp.eye(self.s.shape[1], dtype=self.s.dtype)).T


def add_pair(lbfgs: State, s: Float[Array, " d"], y: Float[Array, " d"]) -> State:
    r"""`lbfgs` with the flat curvature pair $(s, y)$ inserted as the most recent.

    It goes where optax would write its next pair and `count` advances, so optax's
    own next pair lands after it. A pair that violates the curvature condition
    ($s^\top y \le \epsilon \|s\| \|y\|$) is skipped: the state is returned as is.
    """
    m = lbfgs.weights_memory.shape[0]
    slot = (lbfgs.count - 1) % m
    sy = jnp.dot(s, y)
    ok = sy > jnp.finfo(s.dtype).eps * jnp.linalg.norm(s) * jnp.linalg.norm(y)
    weight = jnp.where(ok, 1 / jnp.where(ok, sy, 1), 0)
    unravel = ravel_pytree(jax.tree.map(lambda a: a[0], lbfgs.diff_params_memory))[1]

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
            jnp.where(ok, weight, lbfgs.weights_memory[slot]).astype(
                lbfgs.weights_memory.dtype
            )
        ),
    )
