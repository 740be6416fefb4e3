"""Noise-Reuse Evolution Strategies: one perturbation per particle per episode."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray, PyTree

from optax_pes import _estimator as est
from optax_pes._system import UnrolledSystem, as_key
from optax_pes._window import run_window


def nres(
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
    r"""Noise-Reuse Evolution Strategies: unbiased, with less variance than PES.

    Each particle draws one perturbation $\epsilon_i \sim \mathcal N(0, \sigma^2 I)$
    when its episode starts and reuses it in every window of that episode. The
    estimate of a window,

    $$\hat g = \frac{1}{N \sigma^2} \sum_{i=1}^N L_i\, \epsilon_i ,$$

    with $L_i$ the particle's summed window loss, is an unbiased estimate of the
    gradient of that window's (smoothed) expected loss; summed over an episode's windows
    it estimates the episode gradient. Because the perturbation does not grow with the
    number of windows (PES's accumulator does), its variance is lower in the regimes
    studied by Li et al. An episode starting inside a window gets its own new noise
    from that step on. `sigma` is read when an episode starts.

    **Arguments:** as `optax_pes.pes`.

    **Returns:** an `optax.GradientTransformationExtraArgs` with an
    `optax_pes.EstimatorState`; its `noise` field holds `(direction, sigma)` per group.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax, optax_pes
    >>> tx = optax_pes.nres(optax_pes.tasks.influence_balancing(), num_particles=4,
    ...                     sigma=0.1, truncation_length=10, key=0)
    >>> theta = jnp.array([0.5])
    >>> updates, state = tx.update(jnp.zeros(1), tx.init(theta), theta)
    >>> int(state.count)
    1

    ```

    **References:** Li, Harrison, Sohl-Dickstein, Smith, Metz, *Variance-Reduced
    Gradient Estimation via Noise-Reuse in Online Evolution Strategies*, NeurIPS 2023,
    <https://arxiv.org/abs/2304.12180>.
    """
    est.check_system(system)
    truncation_length = est.check_truncation_length(truncation_length, system.horizon)
    num_particles = est.check_num_particles(num_particles, antithetic)
    est.check_sigma(sigma)
    key = as_key(key, "key")
    placement = est.placement(mesh, mesh_axes, num_particles)
    signs = (1.0, -1.0) if antithetic else (1.0,)
    members = len(signs)
    num_groups = num_particles // members
    horizon = system.horizon
    offsets = est.stagger_offsets(num_groups, horizon, truncation_length, stagger)

    def init_fn(params: PyTree) -> est.EstimatorState:
        flat, _ = est.flatten(params)
        directions = jnp.zeros((num_groups,) + flat.shape, flat.dtype)
        return est.initial_state(
            system,
            params,
            key,
            num_states=num_particles,
            offsets=offsets,
            placement=placement,
            noise=(directions, jnp.ones(num_groups, flat.dtype)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        est.require_params(params, "nres")
        loss_dtype = est.check_against_system(system, params)
        rng_key, noise_key, window_key = est.split_key(state.rng_key)
        flat, unravel = est.flatten(params)
        scale = est.checked_sigma(sigma).astype(flat.dtype)
        fresh = jax.random.normal(noise_key, (num_groups, flat.size), flat.dtype)
        old_dirs, old_sigmas = state.noise
        # Episodes starting now take fresh noise for the whole window.
        dirs = jnp.where(state.needs_init[:, None], fresh, old_dirs)
        sigmas = jnp.where(state.needs_init, scale, old_sigmas)
        thetas = est.unflatten_particles(
            unravel, est.perturb(flat, dirs, signs, sigmas)
        )
        sync = horizon % truncation_length == 0  # no episode starts mid-window
        thetas_after = None
        if not sync:
            thetas_after = est.unflatten_particles(
                unravel, est.perturb(flat, fresh, signs, scale)
            )
        result = run_window(
            system,
            thetas,
            state.inner_state,
            state.remaining,
            state.needs_init,
            window_key,
            members=members,
            truncation_length=truncation_length,
            loss_dtype=loss_dtype,
            placement=placement,
            thetas_after_reset=thetas_after,
        )
        valid = est.window_validity(result, members, num_groups)
        score_before = dirs / sigmas[:, None]
        score_after = None if sync else fresh / scale
        estimate = est.score_estimate(result, valid, signs, score_before, score_after)
        new_dirs = jnp.where(result.reset_inside[:, None], fresh, dirs)
        new_sigmas = jnp.where(result.reset_inside, scale, sigmas)
        new_state = est.next_state(
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=result.inner_state,
            noise=(new_dirs, new_sigmas),
            num_members=members,
            truncation_length=truncation_length,
            horizon=horizon,
        )
        return est.add_estimate(updates, unravel(estimate)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
