"""Truncated backpropagation through time: the exact gradient of one window."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from optax_pes._checks import (
    check_finite_params,
    is_params_placeholder,
    require_params,
    state_checker,
)
from optax_pes._es._config import configure
from optax_pes._es._estimator import compiled_when_eager
from optax_pes._es._state import (
    EstimatorState,
    NoNoise,
    initial_state,
    next_state,
    placeholder_state,
    window_validity,
)
from optax_pes._es._system import UnrolledSystem, check_against_system
from optax_pes._es._window import run_window
from optax_pes._tree import add_to_updates, at_least_float32, tree_all_finite


def tbptt(
    system: UnrolledSystem,
    *,
    truncation_length: int,
    key: PRNGKeyArray | int,
    num_particles: int = 1,
    stagger: bool = False,
    mesh: Mesh | None = None,
    mesh_axes: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Truncated backpropagation through time (TBPTT), a biased baseline.

    Each update runs $K$ inner steps of every particle from its carried state $s$ and
    returns the mean over particles of $\nabla_\theta \sum_{t=1}^{K} \ell_t(\theta, s)$,
    differentiating through the window only: the state enters with `stop_gradient`, so
    the influence of $\theta$ on earlier windows is dropped (the bias). Needs a
    differentiable `system`; memory grows with $K$ (not with the horizon).

    **Arguments:**

    - `system`: a differentiable `optax_pes.UnrolledSystem`.
    - `truncation_length`: $K$, `1 <= K <= horizon`.
    - `key`: an `int` seed or a PRNG key.
    - `num_particles`: independent trajectories averaged per update (no noise).
    - `stagger`: spread the trajectories' episodes over the horizon.
    - `mesh`, `mesh_axes`: shard the trajectories over devices, as in `optax_pes.pes`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> tx = optax_pes.tbptt(optax_pes.tasks.influence_balancing(),
    ...                      truncation_length=10, key=0)
    >>> theta = jnp.array([0.5])
    >>> updates, state = tx.update(jnp.zeros(1), tx.init(theta), theta)
    >>> updates.shape
    (1,)

    ```
    """
    config = configure("tbptt", sigma=None, antithetic=False, **locals())

    def init_fn(params: PyTree) -> EstimatorState:
        if is_params_placeholder(params):
            return placeholder_state(config)
        return initial_state(
            config, params, num_states=config.num_particles, noise=NoNoise()
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "tbptt")
        check_finite_params(params)  # eagerly an error; under jit, left out and counted
        return update(updates, state, params)

    check_state = state_checker(init_fn, "tbptt")

    def update(sigma, updates, state, params):
        del sigma  # (None: tbptt perturbs nothing)
        loss_dtype = check_against_system(system, params)
        check_state(state, params)  # traced once per compile: free per call
        rng_key, _, window_key = jax.random.split(state.rng_key, 3)
        n = config.num_particles
        thetas = jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), params)

        def window_loss(thetas):
            result = run_window(
                config,
                thetas,
                jax.lax.stop_gradient(state.inner_state),
                state.remaining,
                state.needs_init,
                window_key,
                loss_dtype=loss_dtype,
            )
            return jnp.sum(result.loss_before + result.loss_after), result

        # Losses are separable over particles: the gradient with respect to each
        # particle's copy of theta is that particle's own window gradient.
        grads, result = jax.grad(window_loss, has_aux=True)(thetas)
        grads = config.placement.replicate(grads)  # reduce as on one device
        # Non-finite params under jit: left out and counted, whatever the losses.
        valid = window_validity(config, result) & tree_all_finite(params)
        for g in jax.tree.leaves(grads):
            valid = valid & jnp.all(jnp.isfinite(g.reshape(n, -1)), axis=1)
        count = jnp.maximum(jnp.sum(valid), 1)

        def mean(g):  # (summed in at least float32: a float16 sum overflowed)
            acc = at_least_float32(g.dtype)
            kept = jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0)
            total = jnp.tensordot(valid.astype(acc), kept.astype(acc), axes=1)
            return (total / count.astype(acc)).astype(g.dtype)

        estimate = jax.tree.map(mean, grads)
        finite = tree_all_finite(estimate)
        estimate = jax.tree.map(lambda e: jnp.where(finite, e, 0), estimate)
        valid = valid & finite
        new_state = next_state(
            config,
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=result.inner_state,
            noise=NoNoise(),
        )
        # (Laid out as init lays it out: the next call's input types are these.)
        return add_to_updates(updates, estimate), config.placement.shard(new_state)

    update = compiled_when_eager(update, config, "tbptt")
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
