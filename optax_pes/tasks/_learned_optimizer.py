"""A small per-parameter MLP learned optimizer, whose weights are theta."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PRNGKeyArray, PyTree

from optax_pes._checks import as_key


class LearnedOptimizerState(NamedTuple):
    """State of `optax_pes.tasks.mlp_learned_optimizer`'s transformation."""

    momenta: tuple[PyTree, ...]  # one exponential moving average of g per decay


def mlp_learned_optimizer(
    key: PRNGKeyArray | int,
    *,
    hidden_sizes: Sequence[int] = (16,),
    decays: Sequence[float] = (0.5, 0.9, 0.99),
    step_mult: float = 0.01,
    exp_mult: float = 0.01,
) -> tuple[
    list[dict[str, jax.Array]], Callable[[PyTree], optax.GradientTransformation]
]:
    r"""A per-parameter MLP optimizer (in the style of Metz et al.'s learned
    optimizers), whose MLP weights are the `theta` that PES meta-trains.

    For every scalar parameter $p$ with gradient $g$ and moving averages
    $m_k \leftarrow \beta_k m_k + (1 - \beta_k) g$ at the timescales `decays`, the
    features $(g, m_1, \dots, m_K, p)$, each divided by its root mean square over the
    parameter's array, go through one small MLP shared by all parameters, whose two
    outputs $(d, s)$ give the update

    $$\Delta p = \texttt{step\_mult} \cdot d \cdot e^{\texttt{exp\_mult} \cdot s}.$$

    The output layer starts at zero (no update) and the hidden layers at a
    LeCun-normal initialisation, so meta-training starts from "do nothing" rather
    than from a random direction.

    **Arguments:**

    - `key`: an `int` seed or a PRNG key for the MLP's initial weights.
    - `hidden_sizes`: widths of the hidden (ReLU) layers.
    - `decays`: the momentum timescales $\beta_k$.
    - `step_mult`, `exp_mult`: output scales (keep updates small at the start).

    **Returns:** `(theta, optimizer)`: `theta` is the list of the MLP's layers, each
    `{"w": (in, out), "b": (out,)}`, and `optimizer(theta)` is an
    `optax.GradientTransformation` usable anywhere optax's are, in particular as the
    `optimizer` of `optax_pes.tasks.training_system`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> theta, optimizer = optax_pes.tasks.mlp_learned_optimizer(0)
    >>> [layer["w"].shape for layer in theta]
    [(5, 16), (16, 2)]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = optimizer(theta)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> float(jnp.abs(updates["w"]).max())
    0.0

    ```
    """
    decays = tuple(float(d) for d in decays)
    if not decays or not all(0.0 <= d < 1.0 for d in decays):
        raise ValueError(f"decays must be a non-empty sequence in [0, 1), got {decays}")
    hidden_sizes = tuple(int(h) for h in hidden_sizes)
    if not all(h >= 1 for h in hidden_sizes):
        raise ValueError(f"hidden_sizes must be positive ints, got {hidden_sizes}")
    sizes = (len(decays) + 2, *hidden_sizes, 2)
    keys = jax.random.split(as_key(key, "key"), len(sizes) - 1)
    theta = []
    for i, (k, fan_in, fan_out) in enumerate(
        zip(keys, sizes[:-1], sizes[1:], strict=True)
    ):
        last = i == len(sizes) - 2
        w = jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in)
        theta.append({"w": jnp.zeros_like(w) if last else w, "b": jnp.zeros(fan_out)})

    def optimizer(theta: PyTree) -> optax.GradientTransformation:
        def dense(layer, h):
            batch = (1,) * (h.ndim - 1)  # no implicit rank promotion
            w = layer["w"].astype(h.dtype)
            return h @ w + layer["b"].astype(h.dtype).reshape(batch + (-1,))

        def mlp(features):
            h = features
            for layer in theta[:-1]:
                h = jax.nn.relu(dense(layer, h))
            return dense(theta[-1], h)

        def init_fn(params):
            zeros = jax.tree.map(jnp.zeros_like, params)
            return LearnedOptimizerState(momenta=tuple(zeros for _ in decays))

        def update_fn(updates, state, params=None):
            if params is None:
                raise ValueError("mlp_learned_optimizer needs params (an input)")
            momenta = tuple(
                jax.tree.map(lambda m, g, b=b: b * m + (1 - b) * g, ms, updates)
                for b, ms in zip(decays, state.momenta, strict=True)
            )

            def leaf_update(g, p, *ms):
                features = jnp.stack([g, *ms, p], axis=-1)
                axes = tuple(range(features.ndim - 1))
                scale = jax.lax.rsqrt(
                    jnp.mean(jnp.square(features), axis=axes, keepdims=True) + 1e-12
                )
                out = mlp(features * scale)
                step = step_mult * out[..., 0] * jnp.exp(exp_mult * out[..., 1])
                return step.astype(g.dtype)

            new_updates = jax.tree.map(leaf_update, updates, params, *momenta)
            return new_updates, LearnedOptimizerState(momenta)

        return optax.GradientTransformation(init_fn, update_fn)

    return theta, optimizer
