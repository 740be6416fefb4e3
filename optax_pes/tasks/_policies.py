"""Linear and MLP policies with fixed observation normalisation, as in ES for RL."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from optax_pes._checks import as_key, check_callable, check_float, check_int
from optax_pes._tree import at_least_float32
from optax_pes.tasks._control import control_system

Normaliser = Callable[[Array], Array]


def _normaliser(obs_dim: int, obs_mean: Any, obs_scale: Any, dtype) -> Normaliser:
    """`obs -> (obs - obs_mean) / obs_scale`, with the constants checked once."""

    def constant(value, name, default):
        if value is None:
            return np.full((obs_dim,), default, dtype)
        array = np.asarray(value, dtype)
        if array.shape not in ((), (obs_dim,)):
            raise ValueError(
                f"{name} must be a scalar or an array of shape ({obs_dim},) (obs_dim), "
                f"got shape {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return np.broadcast_to(array, (obs_dim,))

    mean = constant(obs_mean, "obs_mean", 0.0)
    scale = constant(obs_scale, "obs_scale", 1.0)
    if not np.all(scale > 0):
        raise ValueError(f"obs_scale must be positive, got {obs_scale!r}")
    mean, scale = jnp.asarray(mean), jnp.asarray(scale)

    def normalise(obs: Array) -> Array:
        obs = jnp.asarray(obs)
        if obs.shape != (obs_dim,):
            raise ValueError(
                f"the policy was built for observations of shape ({obs_dim},) "
                f"(obs_dim), got shape {obs.shape}"
            )
        if not jnp.issubdtype(obs.dtype, jnp.inexact):
            obs = obs.astype(mean.dtype)  # integer observations: normalised in floats
        return (obs - mean.astype(obs.dtype)) / scale.astype(obs.dtype)

    return normalise


def _clip(action_bound: float | None) -> Callable[[Array], Array]:
    if action_bound is None:
        return lambda a: a
    bound = check_float(action_bound, "action_bound")
    return lambda a: jnp.clip(a, -bound, bound)


def linear_policy(
    obs_dim: int,
    act_dim: int,
    *,
    obs_mean: Float[Array, " obs_dim"] | float | None = None,
    obs_scale: Float[Array, " obs_dim"] | float | None = None,
    action_bound: float | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Callable[[Array, Array], Array], Float[Array, "act_dim obs_dim"]]:
    r"""A linear policy on normalised observations, the policy of Mania et al.'s ARS.

    $$a = \mathrm{clip}\big(M\, (o - \mu) / s,\; -b,\; b\big),$$

    with $\theta = M$ an `(act_dim, obs_dim)` matrix starting at zero (the zero
    action), $\mu$ and $s$ **fixed** constants (`obs_mean`, `obs_scale`; from
    `optax_pes.tasks.observation_statistics` or your own knowledge of the
    observation's ranges) and the clip only when `action_bound` $b$ is given. The
    normalisation does not change during training: ARS and Salimans et al. update
    running statistics as they train, which makes the objective move under the
    estimator; PES assumes one fixed function of $\theta$ over an episode, so the
    statistics are measured once, before training, and then held.

    **Arguments:**

    - `obs_dim`, `act_dim`: the sizes of the (flat) observation and of the action.
    - `obs_mean`, `obs_scale`: $\mu$ and $s$, scalars or arrays of shape `(obs_dim,)`;
      no normalisation by default. `obs_scale` must be positive. Float observations
      are normalised in their own dtype, integer ones (gymnax's grid worlds) in
      `dtype`.
    - `action_bound`: clip every action coordinate to $[-b, b]$, or `None`.
    - `dtype`: the dtype of $\theta$.

    **Returns:** `(policy, theta0)`: `policy(theta, obs) -> action` for
    `optax_pes.tasks.control_system`, and the zero matrix $\theta_0$.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> policy, theta = optax_pes.tasks.linear_policy(3, 1, obs_scale=[1.0, 1.0, 8.0])
    >>> theta.shape
    (1, 3)
    >>> policy(jnp.ones((1, 3)), jnp.array([1.0, 0.0, 8.0])).tolist()
    [2.0]

    ```

    **References:** Mania, Guy and Recht, *Simple random search of static linear
    policies is competitive for reinforcement learning*, NeurIPS 2018,
    <https://arxiv.org/abs/1803.07055>.
    """
    obs_dim = check_int(obs_dim, "obs_dim", 1)
    act_dim = check_int(act_dim, "act_dim", 1)
    normalise = _normaliser(obs_dim, obs_mean, obs_scale, np.dtype(dtype))
    clip = _clip(action_bound)

    def policy(theta: Float[Array, "act_dim obs_dim"], obs: Array) -> Array:
        return clip(theta @ normalise(obs))

    return policy, jnp.zeros((act_dim, obs_dim), dtype)


def mlp_policy(
    obs_dim: int,
    act_dim: int,
    key: PRNGKeyArray | int,
    *,
    hidden_sizes: Sequence[int] = (32, 32),
    activation: Literal["tanh", "relu"] = "tanh",
    obs_mean: Float[Array, " obs_dim"] | float | None = None,
    obs_scale: Float[Array, " obs_dim"] | float | None = None,
    action_bound: float | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Callable[[PyTree, Array], Array], list[dict[str, Array]]]:
    r"""An MLP policy on normalised observations (Salimans et al.'s ES policies).

    $$h_0 = (o - \mu) / s, \qquad h_{k+1} = \phi(h_k W_k + c_k), \qquad
      a = \mathrm{clip}(h_L W_L + c_L,\; -b,\; b),$$

    with $\phi$ the `activation`, the normalisation fixed as in
    `optax_pes.tasks.linear_policy`, the hidden layers at a LeCun-normal
    initialisation from `key`, and the output layer at zero, so that the policy starts
    from the zero action (as the linear policy does) and the first updates are not a
    random direction.

    **Arguments:**

    - `obs_dim`, `act_dim`: the sizes of the (flat) observation and of the action.
    - `key`: an `int` seed or a PRNG key for the hidden layers' initialisation.
    - `hidden_sizes`: the widths of the hidden layers.
    - `activation`: `"tanh"` or `"relu"`.
    - `obs_mean`, `obs_scale`, `action_bound`, `dtype`: as in `linear_policy`.

    **Returns:** `(policy, theta0)`: `policy(theta, obs) -> action` and the initial
    weights, a list of layers `{"w": (in, out), "b": (out,)}`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> policy, theta = optax_pes.tasks.mlp_policy(3, 1, key=0, hidden_sizes=(16,))
    >>> [layer["w"].shape for layer in theta]
    [(3, 16), (16, 1)]
    >>> policy(theta, jnp.ones(3)).tolist()
    [0.0]

    ```

    **References:** Salimans, Ho, Chen, Sidor and Sutskever, *Evolution Strategies as
    a Scalable Alternative to Reinforcement Learning*, 2017,
    <https://arxiv.org/abs/1703.03864>.
    """
    obs_dim = check_int(obs_dim, "obs_dim", 1)
    act_dim = check_int(act_dim, "act_dim", 1)
    sizes = [check_int(h, f"hidden_sizes[{i}]", 1) for i, h in enumerate(hidden_sizes)]
    phi = {"tanh": jnp.tanh, "relu": jax.nn.relu}.get(activation)
    if phi is None:
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    normalise = _normaliser(obs_dim, obs_mean, obs_scale, np.dtype(dtype))
    clip = _clip(action_bound)
    widths = [obs_dim, *sizes]
    keys = jax.random.split(as_key(key, "key"), max(len(sizes), 1))
    theta = [
        {
            # (Drawn in at least float32 and rounded: the same weights in every
            # dtype, and bfloat16's own normals are biased.)
            "w": (
                jax.random.normal(k, (n_in, n_out), at_least_float32(dtype))
                / np.sqrt(n_in)
            ).astype(dtype),
            "b": jnp.zeros((n_out,), dtype),
        }
        for k, n_in, n_out in zip(keys, widths[:-1], widths[1:], strict=False)
    ]
    theta.append(
        {
            "w": jnp.zeros((widths[-1], act_dim), dtype),
            "b": jnp.zeros((act_dim,), dtype),
        }
    )

    def policy(theta: list[dict[str, Array]], obs: Array) -> Array:
        h = normalise(obs)
        for layer in theta[:-1]:
            h = phi(h @ layer["w"] + layer["b"])
        return clip(h @ theta[-1]["w"] + theta[-1]["b"])

    return policy, theta


def observation_statistics(
    env: Any,
    policy: Callable[[PyTree, Array], Array],
    theta: PyTree,
    *,
    horizon: int,
    num_episodes: int = 8,
    key: PRNGKeyArray | int = 0,
    reset_key: Literal["raw", "typed"] = "raw",
) -> tuple[Float[Array, " obs_dim"], Float[Array, " obs_dim"]]:
    r"""The mean and standard deviation of the observations a policy meets.

    Runs `num_episodes` episodes of `horizon` steps of `policy` at `theta` (with
    `control_system`'s done latching: observations after the end of an episode are
    not counted) and returns per-coordinate statistics of the observations the policy
    was applied to, for the fixed `obs_mean` and `obs_scale` of `linear_policy` and
    `mlp_policy`. A coordinate whose standard deviation is below `1e-6` (a constant
    observation) gets a scale of 1. Measure them once, e.g. on a random linear policy
    (a zero policy often meets too few states), and keep them: see `linear_policy`
    for why they are not updated during training.

    **Arguments:**

    - `env`, `reset_key`: as in `optax_pes.tasks.control_system`; the observation
      must be one array (as for `linear_policy` and `mlp_policy`), not a pytree.
    - `policy`, `theta`: the policy to roll out and its parameters.
    - `horizon`: steps per episode.
    - `num_episodes`: independent episodes (reset keys split from `key`).
    - `key`: an `int` seed or a PRNG key.

    **Returns:** `(mean, std)`, float32 arrays shaped like the observation.
    """
    check_callable(policy, "policy", "policy(theta, obs) -> action")
    num_episodes = check_int(num_episodes, "num_episodes", 1)
    system = control_system(env, policy, horizon=horizon, reset_key=reset_key)

    def episode(key):
        # Welford's running mean and sum of squared deviations: E[x^2] - E[x]^2
        # cancels in float32 when the observations' offset dwarfs their spread.
        state = system.init(theta, key)
        obs0 = jnp.asarray(state.env_state.obs, jnp.float32)
        zero = jnp.zeros_like(obs0)

        def body(carry, _):
            state, count, mean, m2 = carry
            counted = ~state.done  # (after the end: not counted, whatever it holds)
            obs = jnp.where(counted, jnp.asarray(state.env_state.obs, jnp.float32), 0)
            new_count = count + counted
            delta = jnp.where(counted, obs - mean, 0)
            mean = mean + delta / jnp.maximum(new_count, 1)
            m2 = m2 + delta * (obs - mean)
            state, _ = system.step(theta, state, key)
            return (state, new_count, mean, m2), None

        start = (state, jnp.zeros((), jnp.float32), zero, zero)
        (_, count, mean, m2), _ = jax.lax.scan(body, start, None, system.horizon)
        return count, mean, m2

    keys = jax.random.split(as_key(key, "key"), num_episodes)
    counts, means, m2s = jax.jit(jax.vmap(episode))(keys)
    # The episodes' statistics pooled (Chan et al.'s parallel formula).
    count = jnp.sum(counts)
    counts = counts.reshape((-1,) + (1,) * (means.ndim - 1))  # against each obs
    mean = jnp.sum(counts * means, 0) / count
    m2 = jnp.sum(m2s, 0) + jnp.sum(counts * (means - mean[None]) ** 2, 0)
    std = jnp.sqrt(m2 / count)
    return mean, jnp.where(std < 1e-6, 1.0, std)
