"""Truncated Evolution Strategies: ES on one window from a shared, unperturbed state."""

from collections.abc import Sequence

import jax
import optax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray, PyTree

from optax_pes import _estimator as est
from optax_pes._system import UnrolledSystem, as_key
from optax_pes._window import run_window, tile_groups


def truncated_es(
    system: UnrolledSystem,
    *,
    num_particles: int,
    sigma: float | Array,
    truncation_length: int,
    key: PRNGKeyArray | int,
    stagger: bool = False,
    antithetic: bool = True,
    mesh: Mesh | None = None,
    mesh_axes: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Truncated ES: a biased baseline that forgets the influence of earlier windows.

    Every group of particles (an antithetic pair) keeps one shared inner state $s$,
    advanced with the unperturbed $\theta$. Each update runs the $K$ steps of the window
    from $s$ at $\theta + \epsilon_i$ and returns

    $$\hat g = \frac{1}{N \sigma^2} \sum_{i=1}^N L_i\, \epsilon_i ,$$

    the ES gradient of the window's loss **with the starting state held fixed**: the
    effect of $\theta$ on $s$ is ignored, which biases the estimate towards
    short-horizon behaviour (the PES paper's influence-balancing task shows it moving
    away from the optimum). Each update also advances $s$ by $K$ steps at $\theta$, so
    it runs $N + N/2$ trajectories (with antithetic pairs).

    **Arguments:** as `optax_pes.pes`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> tx = optax_pes.truncated_es(optax_pes.tasks.influence_balancing(),
    ...                             num_particles=4, sigma=0.1, truncation_length=10,
    ...                             key=0)
    >>> theta = jnp.array([0.5])
    >>> updates, state = tx.update(jnp.zeros(1), tx.init(theta), theta)
    >>> updates.shape
    (1,)

    ```
    """
    est.check_system(system)
    truncation_length = est.check_truncation_length(truncation_length, system.horizon)
    num_particles = est.check_num_particles(num_particles, antithetic)
    est.check_sigma(sigma)
    key = as_key(key, "key")
    placement = est.placement(mesh, mesh_axes, num_particles)
    # The perturbed members, then the unperturbed centre that carries the state on.
    signs = (1.0, -1.0, 0.0) if antithetic else (1.0, 0.0)
    members = len(signs)
    num_groups = num_particles // (members - 1)
    horizon = system.horizon
    offsets = est.stagger_offsets(num_groups, horizon, truncation_length, stagger)

    def init_fn(params: PyTree) -> est.EstimatorState:
        return est.initial_state(
            system,
            params,
            key,
            num_states=num_groups,
            offsets=offsets,
            placement=placement,
            noise=(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        est.require_params(params, "truncated_es")
        loss_dtype = est.check_against_system(system, params)
        rng_key, noise_key, window_key = est.split_key(state.rng_key)
        score, thetas, unravel = est.window_noise(
            noise_key, params, sigma, num_groups, signs
        )
        result = run_window(
            system,
            thetas,
            tile_groups(state.inner_state, members),
            state.remaining,
            state.needs_init,
            window_key,
            members=members,
            truncation_length=truncation_length,
            loss_dtype=loss_dtype,
            placement=placement,
        )
        valid = est.window_validity(result, members, num_groups)
        # Losses on both sides of a reset are credited to the window's noise alike.
        sync = system.horizon % truncation_length == 0
        estimate = est.score_estimate(
            result, valid, signs, score, None if sync else score
        )
        centre = jax.tree.map(
            lambda x: x[(members - 1) * num_groups :], result.inner_state
        )
        new_state = est.next_state(
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=centre,
            noise=(),
            num_members=members,
            truncation_length=truncation_length,
            horizon=horizon,
        )
        return est.add_estimate(updates, unravel(estimate)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
