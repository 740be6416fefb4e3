"""Truncated Evolution Strategies: ES on one window from a shared, unperturbed state."""

from collections.abc import Sequence

import jax
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
from optax_pes._es._state import NoNoise
from optax_pes._es._system import UnrolledSystem
from optax_pes._es._window import tile_groups


class _WindowNoise(AbstractNoisePolicy):
    """Fresh noise every window, credited with that window's losses only (on both
    sides of a reset alike); every group's members start from its shared state,
    which its unperturbed centre carries on."""

    def init_noise(self, config, flat):
        return NoNoise()

    def perturb(self, config, noise, needs_init, flat, sigma, key):
        z = standard_normal(config, flat, key)
        score = z / sigma
        return Perturbation(
            perturb(flat, z, config.signs, sigma), None, score, score, None
        )

    def next_noise(self, config, noise, perturbation, result, valid):
        return NoNoise()

    def num_states(self, config):
        return config.num_groups

    def window_states(self, config, inner_state):
        return tile_groups(inner_state, config.members)

    def kept_states(self, config, inner_state):
        centre = (config.members - 1) * config.num_groups
        return jax.tree.map(lambda x: x[centre:], inner_state)


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
    config = configure("truncated_es", centre=True, **locals())
    return estimator(config, _WindowNoise())
