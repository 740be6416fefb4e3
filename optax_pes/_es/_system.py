"""An unrolled computation graph, described by its initial state and one inner step."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from optax_pes._checks import (
    as_key,
    check_callable,
    check_float_tree,
    check_int,
    check_same_structure,
    describe,
)
from optax_pes._compile import SharedJit

InitFn = Callable[[PyTree, PRNGKeyArray], PyTree]
"""`init(theta, key) -> inner_state`: the state an episode starts from."""
StepFn = Callable[[PyTree, PyTree, PRNGKeyArray], tuple[PyTree, Scalar]]
"""`step(theta, inner_state, key) -> (inner_state, loss)`: one inner step."""


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
        check_callable(self.init, "init", "init(theta, key) -> inner_state")
        check_callable(
            self.step, "step", "step(theta, inner_state, key) -> (inner_state, loss)"
        )
        check_int(self.horizon, "horizon", 1)


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
    return _compiled_unroll(system, theta, as_key(key, "key"))


def _unroll(
    system: UnrolledSystem, theta: PyTree, key: PRNGKeyArray
) -> Float[Array, " horizon"]:
    init_key, steps_key = jax.random.split(key)
    state = system.init(theta, init_key)

    def body(state, step_key):
        state, loss = system.step(theta, state, step_key)
        return state, loss

    _, losses = jax.lax.scan(body, state, jax.random.split(steps_key, system.horizon))
    return losses


# One compiled program per system and theta structure (the system's arrays, theta
# and the key are its arguments): called eagerly, or under an eager `jax.vmap` or
# `jax.grad` (a reference gradient, an evaluation of returns), the scan would be
# built from a new closure and compiled again on every call.
_compiled_unroll = SharedJit(_unroll)


def check_against_system(system: UnrolledSystem, params: PyTree) -> jnp.dtype:
    """Trace init and step on `params` (no FLOPs); return the loss dtype.

    Raises a `ValueError` naming what is wrong: `theta` not accepted by the system,
    `step` changing the state's structure, or a loss that is not a float scalar.
    """
    check_float_tree(params, "params")
    key = jax.random.key(0)
    try:
        state = jax.eval_shape(system.init, params, key)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "system.init(theta, key) failed on params "
            f"{describe(params)}; does theta match the system? ({e})"
        ) from e
    try:
        new_state, loss = jax.eval_shape(system.step, params, state, key)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            "system.step(theta, inner_state, key) failed on params "
            f"{describe(params)} and the state from init {describe(state)}; "
            f"does theta match the system? ({e})"
        ) from e
    check_same_structure(
        new_state,
        state,
        lambda expected, got: (
            "system.step must return an inner state with the structure, shapes and "
            f"dtypes of init's: init gave {expected}, step gave {got}"
        ),
    )
    if not hasattr(loss, "shape") or loss.shape != ():
        raise ValueError(
            "system.step must return (inner_state, loss) with a scalar loss, got a "
            f"loss of shape {getattr(loss, 'shape', type(loss).__name__)}"
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            f"system.step must return a float loss, got dtype {loss.dtype}; cast "
            "non-differentiable metrics (accuracy, counts) to float"
        )
    return loss.dtype


def empty_inner_state(
    system: UnrolledSystem, params: PyTree, num_states: int
) -> PyTree:
    """Zeros shaped like `num_states` inner states (every group starts fresh)."""
    shapes = jax.eval_shape(system.init, params, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.zeros((num_states,) + s.shape, s.dtype), shapes)
