"""Persistent Evolution Strategies (PES) and full-unroll ES, which is PES with K = T."""

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray

from optax_pes._es._config import configure
from optax_pes._es._estimator import (
    AbstractNoisePolicy,
    Perturbation,
    estimator,
    perturb,
    standard_normal,
)
from optax_pes._es._system import UnrolledSystem
from optax_pes._tree import at_least_float32


class PESNoise(NamedTuple):
    """PES's noise state: what each particle's current episode has accumulated."""

    score: Array  # (groups, dim), theta's dtype, at least float32: sum of
    #   eps / sigma^2 (`+` member); a float16 sum over a long episode overflowed


class _PersistentNoise(AbstractNoisePolicy):
    r"""Fresh noise every window; a window's losses are credited to the scores its
    episode has accumulated, $\xi \leftarrow \xi + \epsilon / \sigma^2$ (losses after
    a mid-window reset to the new episode's score only)."""

    def init_noise(self, config, flat):
        shape = (config.num_groups,) + flat.shape
        return PESNoise(jnp.zeros(shape, at_least_float32(flat.dtype)))

    def perturb(self, config, noise, needs_init, flat, sigma, key):
        z = standard_normal(config, flat, key)
        acc = at_least_float32(flat.dtype)
        score = z.astype(acc) / sigma.astype(acc)
        thetas = perturb(flat, z, config.signs, sigma)
        return Perturbation(thetas, None, noise.score + score, score, None)

    def next_noise(self, config, noise, perturbation, result, valid):
        # This window's score for an episode that began inside it, zero for one
        # that ended (or was dropped), else the running sum.
        accumulated, fresh = perturbation.credit_before, perturbation.credit_after
        score = jnp.where(result.reset_inside[:, None], fresh, accumulated)
        restart = (result.needs_init | ~valid)[:, None]
        return PESNoise(jnp.where(restart, 0, score))


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
      updates (e.g. under `optax.inject_hyperparams`): scores stay consistent. A
      value that is not positive and finite is refused by the factory; a traced one
      (a schedule under `jit`) makes that window's estimate zero, with every particle
      counted in `num_nonfinite`.
    - `truncation_length`: $K$, inner steps per update, `1 <= K <= horizon`.
    - `key`: an `int` seed or a PRNG key; kept in the state and split every update.
    - `stagger`: spread the particles' episodes uniformly over the horizon, so the
      estimate is not dominated by one phase of the inner problem, from the first
      update on: `init` runs each pair forward (unperturbed, unscored) to its offset,
      up to `horizon - 1` inner steps of `N/2` pairs. That first episode estimates the
      gradient of its remaining losses with the burned-in state held fixed; from each
      pair's first reset on, the estimate is unbiased.
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
    config = configure("pes", **locals())
    return estimator(config, _PersistentNoise())


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
    config = configure(
        "full_es",
        truncation_length=getattr(system, "horizon", 1),
        stagger=False,
        **locals(),
    )
    return estimator(config, _PersistentNoise())
