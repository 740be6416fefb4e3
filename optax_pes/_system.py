"""An unrolled computation graph, described by its initial state and one inner step."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

InitFn = Callable[[PyTree, PRNGKeyArray], PyTree]
StepFn = Callable[[PyTree, PyTree, PRNGKeyArray], tuple[PyTree, Scalar]]


class UnrolledSystem(eqx.Module):
    r"""An episode of `horizon` inner steps whose losses depend on parameters `theta`.

    The episode is

    $$s_0 = \mathrm{init}(\theta, k_0), \qquad
      (s_{t+1}, \ell_t) = \mathrm{step}(\theta, s_t, k_{t+1}), \qquad
      L(\theta) = \sum_{t=0}^{T-1} \ell_t .$$

    The estimators (`optax_pes.pes` and its family) run many copies of this episode
    (particles) in truncation windows of a few steps and re-initialise a particle
    once it has taken `horizon` steps.

    **Arguments:**

    - `init`: `init(theta, key) -> inner_state`, any pytree of arrays. It may depend on
      `theta` (it is then perturbed like the steps).
    - `step`: `step(theta, inner_state, key) -> (inner_state, loss)`; the new state has
      the structure, shapes and dtypes of the old one and `loss` is a float scalar. The
      loss need not be differentiable (accuracy, returns) for the ES estimators; `tbptt`
      differentiates it.
    - `horizon`: `T`, the number of steps in one episode.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> import optax_pes
    >>> system = optax_pes.UnrolledSystem(
    ...     init=lambda theta, key: jnp.zeros(()),
    ...     step=lambda theta, s, key: (s + theta, (s + theta - 1.0) ** 2),
    ...     horizon=10,
    ... )
    >>> system.horizon
    10

    ```
    """

    init: InitFn
    step: StepFn
    horizon: int = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.init):
            raise TypeError(
                "init must be a callable init(theta, key) -> inner_state, "
                f"got {type(self.init).__name__}"
            )
        if not callable(self.step):
            raise TypeError(
                "step must be a callable step(theta, inner_state, key) -> "
                f"(inner_state, loss), got {type(self.step).__name__}"
            )
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int):
            raise TypeError(
                f"horizon must be a positive int, got {self.horizon!r} "
                f"of type {type(self.horizon).__name__}"
            )
        if self.horizon <= 0:
            raise ValueError(f"horizon must be a positive int, got {self.horizon}")


def unroll(
    system: UnrolledSystem, theta: PyTree, key: PRNGKeyArray | int = 0
) -> Float[Array, " horizon"]:
    r"""Run one full episode of `system` at `theta` and return its `horizon` losses.

    `jnp.sum(unroll(system, theta))` is the episode loss $L(\theta)$ whose gradient
    the unbiased estimators estimate; `jax.grad` of it is the exact reference (and
    what full backpropagation through time would compute). Memory grows with the
    horizon under `jax.grad`: this is the reference, not the method.

    **Arguments:**

    - `system`: the `optax_pes.UnrolledSystem`.
    - `theta`: its parameters.
    - `key`: an `int` seed or a PRNG key; split into the init key and one key per step.

    **Returns:** the per-step losses, shape `(horizon,)`.
    """
    key = as_key(key, "key")
    init_key, steps_key = jax.random.split(key)
    state = system.init(theta, init_key)

    def body(state, step_key):
        state, loss = system.step(theta, state, step_key)
        return state, loss

    _, losses = jax.lax.scan(body, state, jax.random.split(steps_key, system.horizon))
    return losses


def as_key(key: Any, name: str) -> PRNGKeyArray:
    """Canonicalise an int seed, a raw `uint32[2]` key or a typed key to a typed key."""
    if isinstance(key, bool):
        raise TypeError(f"{name} must be an int seed or a jax PRNG key, got a bool")
    if isinstance(key, int):
        return jax.random.key(key)
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    ):
        if key.shape != ():
            raise ValueError(
                f"{name} must be a single PRNG key (shape ()), got shape {key.shape}"
            )
        return key
    if (
        isinstance(key, (jax.Array, np.ndarray))
        and key.shape == (2,)
        and key.dtype == np.uint32
    ):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"{name} must be an int seed or a jax PRNG key (jax.random.key(0)), "
        f"got {type(key).__name__}"
    )
