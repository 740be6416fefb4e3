"""Persistent Evolution Strategies (PES) and full-unroll ES, which is PES with K = T."""

from collections.abc import Sequence

import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray, PyTree

from optax_pes import _estimator as est
from optax_pes._system import UnrolledSystem, as_key
from optax_pes._window import run_window


def pes(
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
    r"""Persistent Evolution Strategies: unbiased gradients from truncated unrolls.

    Each update advances every particle by one window of $K$ inner steps at a freshly
    perturbed $\theta + \epsilon_i$, $\epsilon_i \sim \mathcal{N}(0, \sigma^2 I)$, and
    keeps, per particle, the accumulated score of all the perturbations its current
    episode has seen, $\xi_i = \sum_{\tau} \epsilon_{i,\tau} / \sigma_\tau^2$. With
    $L_i$ the sum of the particle's $K$ losses in the window,

    $$\hat g = \frac{1}{N} \sum_{i=1}^N L_i\, \xi_i ,$$

    and summed over the windows of an episode $\hat g$ is an unbiased estimate of the
    gradient of the Gaussian-smoothed total episode loss (exactly of $\nabla L$ for
    quadratic losses). The estimate is **added** to the incoming updates.

    An episode that ends inside a window has its losses credited to each side: those
    before the reset to the old accumulator, those after it to the new episode's
    noise only. Particles whose window loss is not finite are left out of the estimate
    (which stays finite), restarted next window, and counted in
    `state.diagnostics.num_nonfinite`.

    **Arguments:**

    - `system`: the `optax_pes.UnrolledSystem` to differentiate through.
    - `num_particles`: $N$, particles per update (even with `antithetic`).
    - `sigma`: the perturbation's standard deviation (not variance). May change between
      updates (e.g. under `optax.inject_hyperparams`): scores stay consistent.
    - `truncation_length`: $K$, inner steps per update, `1 <= K <= horizon`.
    - `key`: an `int` seed or a PRNG key; kept in the state and split every update.
    - `stagger`: spread the particles' episodes uniformly over the horizon, so the
      estimate is not dominated by one phase of the inner problem. A staggered
      particle's first episode is shortened; later ones have the full horizon.
    - `antithetic`: use pairs $(\epsilon, -\epsilon)$ that share inner-step keys.
    - `mesh`: a `jax.sharding.Mesh` over which to shard the particle axis (inner
      states and perturbed thetas), or `None` for one device. The code path is the
      same; per-particle losses are gathered before the estimate is reduced, so it
      equals the single-device estimate for the same key. `num_particles` must be a
      multiple of the number of devices.
    - `mesh_axes`: the mesh axis name (or names) the particle axis is split over; all
      of the mesh's axes by default.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `optax_pes.EstimatorState`; `update(updates, state, params)` needs `params`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_pes
    >>> system = optax_pes.tasks.influence_balancing()
    >>> tx = optax.chain(
    ...     optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=10,
    ...                   key=0),
    ...     optax.sgd(1e-4),
    ... )
    >>> theta = jnp.array([0.5])
    >>> state = tx.init(theta)
    >>> updates, state = jax.jit(tx.update)(jnp.zeros_like(theta), state, theta)
    >>> updates.shape
    (1,)

    ```

    **References:** Vicol, Metz and Sohl-Dickstein, *Unbiased Gradient Estimation in
    Unrolled Computation Graphs with Persistent Evolution Strategies*, ICML 2021,
    <https://proceedings.mlr.press/v139/vicol21a.html>.
    """
    est.check_system(system)
    truncation_length = est.check_truncation_length(truncation_length, system.horizon)
    return _persistent(
        "pes",
        system,
        num_particles,
        sigma,
        truncation_length,
        key,
        stagger,
        antithetic,
        mesh,
        mesh_axes,
    )


def full_es(
    system: UnrolledSystem,
    *,
    num_particles: int,
    sigma: float | Array,
    key: PRNGKeyArray | int,
    antithetic: bool = True,
    mesh: Mesh | None = None,
    mesh_axes: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Evolution Strategies over whole episodes: PES with $K = T$.

    Each update runs every particle through one full episode of `system.horizon` steps
    at $\theta + \epsilon_i$ and returns
    $\hat g = \frac{1}{N \sigma^2} \sum_i L_i \epsilon_i$, an unbiased estimate of the
    gradient of the smoothed episode loss, added to the incoming updates. Unbiased and
    simple, but one update per episode; memory stays independent of the horizon.

    **Arguments:** as `optax_pes.pes`, without `truncation_length` and `stagger`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax, optax_pes
    >>> tx = optax_pes.full_es(optax_pes.tasks.toy_regression(), num_particles=4,
    ...                        sigma=0.1, key=0)
    >>> theta = jnp.array([-4.0, -4.0])
    >>> updates, state = tx.update(jnp.zeros(2), tx.init(theta), theta)
    >>> bool(jnp.all(jnp.isfinite(updates)))
    True

    ```
    """
    est.check_system(system)
    return _persistent(
        "full_es",
        system,
        num_particles,
        sigma,
        system.horizon,
        key,
        False,
        antithetic,
        mesh,
        mesh_axes,
    )


def _persistent(
    name: str,
    system: UnrolledSystem,
    num_particles: int,
    sigma: float | Array,
    truncation_length: int,
    key: PRNGKeyArray | int,
    stagger: bool,
    antithetic: bool,
    mesh: Mesh | None,
    mesh_axes: str | Sequence[str] | None,
) -> optax.GradientTransformationExtraArgs:
    num_particles = est.check_num_particles(num_particles, antithetic)
    placement = est.placement(mesh, mesh_axes, num_particles)
    est.check_sigma(sigma)
    key = as_key(key, "key")
    signs = (1.0, -1.0) if antithetic else (1.0,)
    members = len(signs)
    num_groups = num_particles // members
    horizon = system.horizon
    offsets = est.stagger_offsets(num_groups, horizon, truncation_length, stagger)

    def init_fn(params: PyTree) -> est.EstimatorState:
        flat, _ = est.flatten(params)
        return est.initial_state(
            system,
            params,
            key,
            num_states=num_particles,
            offsets=offsets,
            placement=placement,
            noise=jnp.zeros((num_groups,) + flat.shape, flat.dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        est.require_params(params, name)
        loss_dtype = est.check_against_system(system, params)
        rng_key, noise_key, window_key = est.split_key(state.rng_key)
        score, thetas, unravel = est.window_noise(
            noise_key, params, sigma, num_groups, signs
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
        )
        valid = est.window_validity(result, members, num_groups)
        accumulated = state.noise + score
        sync = horizon % truncation_length == 0  # no episode starts mid-window
        estimate = est.score_estimate(
            result, valid, signs, accumulated, None if sync else score
        )
        # The next accumulator: this window's score for an episode that began inside
        # it, zero for one that ended (or was dropped), else the running sum.
        restart = (result.needs_init | ~valid)[:, None]
        noise = jnp.where(result.reset_inside[:, None], score, accumulated)
        noise = jnp.where(restart, 0, noise)
        new_state = est.next_state(
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=result.inner_state,
            noise=noise,
            num_members=members,
            truncation_length=truncation_length,
            horizon=horizon,
        )
        return est.add_estimate(updates, unravel(estimate)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
