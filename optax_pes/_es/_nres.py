"""Noise-Reuse Evolution Strategies: one perturbation per particle per episode."""

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
from optax_pes._tree import tree_where


class NRESNoise(NamedTuple):
    """NRES's noise state: each particle's perturbation for its whole episode."""

    direction: Array  # (groups, dim), theta's dtype: z ~ N(0, I), eps = sigma * z
    sigma: Array  # (groups,), theta's dtype: sigma when it was drawn (0: not yet)


class _ReusedNoise(AbstractNoisePolicy):
    r"""One perturbation per episode, drawn when it starts; a window's losses are
    credited to $z / \sigma$ of their episode."""

    def init_noise(self, config, flat):
        # sigma 0: no noise drawn yet (a staggered particle's burned-in episode
        # takes its noise at its first scored window).
        return NRESNoise(
            jnp.zeros((config.num_groups,) + flat.shape, flat.dtype),
            jnp.zeros(config.num_groups, flat.dtype),
        )

    def perturb(self, config, noise, needs_init, flat, sigma, key):
        fresh = standard_normal(config, flat, key)
        # Episodes starting now take fresh noise for the whole window...
        start = needs_init | (noise.sigma == 0)
        direction = jnp.where(start[:, None], fresh, noise.direction)
        sigmas = jnp.where(start, sigma, noise.sigma)
        thetas = perturb(flat, direction, config.signs, sigmas)
        # ...and so do episodes starting inside it, from their first step.
        after = None if config.sync else perturb(flat, fresh, config.signs, sigma)
        new = NRESNoise(fresh, jnp.broadcast_to(sigma, sigmas.shape))
        return Perturbation(
            thetas,
            after,
            direction / sigmas[:, None],
            fresh / sigma,
            (NRESNoise(direction, sigmas), new),
        )

    def next_noise(self, config, noise, perturbation, result, valid):
        # An episode that began inside the window keeps the noise it began with.
        kept, new = perturbation.aux
        return tree_where(result.reset_inside, new, kept)


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
    config = configure("nres", **locals())
    return estimator(config, _ReusedNoise())
