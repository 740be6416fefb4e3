"""Truncated backpropagation through time: the exact gradient of one window."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from optax_pes import _estimator as est
from optax_pes._system import UnrolledSystem, as_key
from optax_pes._window import run_window


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
    est.check_system(system)
    truncation_length = est.check_truncation_length(truncation_length, system.horizon)
    num_particles = est.check_int(num_particles, "num_particles", 1)
    key = as_key(key, "key")
    placement = est.placement(mesh, mesh_axes, num_particles)
    horizon = system.horizon
    offsets = est.stagger_offsets(num_particles, horizon, truncation_length, stagger)

    def init_fn(params: PyTree) -> est.EstimatorState:
        return est.initial_state(
            system,
            params,
            key,
            num_states=num_particles,
            offsets=offsets,
            placement=placement,
            noise=(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        est.require_params(params, "tbptt")
        loss_dtype = est.check_against_system(system, params)
        rng_key, _, window_key = est.split_key(state.rng_key)
        thetas = jax.tree.map(
            lambda p: jnp.broadcast_to(p, (num_particles,) + p.shape), params
        )

        def window_loss(thetas):
            result = run_window(
                system,
                thetas,
                jax.lax.stop_gradient(state.inner_state),
                state.remaining,
                state.needs_init,
                window_key,
                members=1,
                truncation_length=truncation_length,
                loss_dtype=loss_dtype,
                placement=placement,
            )
            return jnp.sum(result.loss_before + result.loss_after), result

        # Losses are separable over particles: the gradient with respect to each
        # particle's copy of theta is that particle's own window gradient.
        grads, result = jax.grad(window_loss, has_aux=True)(thetas)
        grads = placement.replicate(grads)  # reduce as on one device
        valid = est.window_validity(result, 1, num_particles)
        for g in jax.tree.leaves(grads):
            valid = valid & jnp.all(jnp.isfinite(g.reshape(num_particles, -1)), axis=1)
        count = jnp.maximum(jnp.sum(valid), 1)
        estimate = jax.tree.map(
            lambda g: (
                jnp.tensordot(
                    valid.astype(g.dtype),
                    jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0),
                    axes=1,
                )
                / count.astype(g.dtype)
            ),
            grads,
        )
        new_state = est.next_state(
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=result.inner_state,
            noise=(),
            num_members=1,
            truncation_length=truncation_length,
            horizon=horizon,
        )
        return est.add_estimate(updates, estimate), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
