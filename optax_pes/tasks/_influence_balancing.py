"""The influence-balancing task of the UORO and PES papers."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from optax_pes._es._system import UnrolledSystem


def _check_sizes(n: int, num_positive: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if (
        isinstance(num_positive, bool)
        or not isinstance(num_positive, int)
        or not 0 <= num_positive <= n
    ):
        raise ValueError(
            f"num_positive must be an int in [0, n={n}], got {num_positive!r}"
        )


def _shift_average(s: Float[Array, " n"]) -> Float[Array, " n"]:
    # A s with A = 0.5 I + 0.5 (superdiagonal): (A s)_i = (s_i + s_{i+1}) / 2.
    return 0.5 * (s + jnp.concatenate([s[1:], jnp.zeros_like(s[:1])]))


def influence_balancing(
    horizon: int = 50_000, n: int = 23, num_positive: int = 10
) -> UnrolledSystem:
    r"""The influence-balancing problem, where short truncations get the sign wrong.

    A linear system whose state is pushed by $\theta$ with positive sign on its first
    `num_positive` coordinates and negative sign on the others; the loss only reads the
    first coordinate, which every other coordinate reaches after a delay:

    $$s_0 = \mathbf 1, \qquad s_{t+1} = A s_t + \theta b, \qquad
      \ell_t = \tfrac12 \big((s_{t+1})_0 - 1\big)^2,$$

    with $A = \tfrac12 I + \tfrac12 N$ ($N$ the $n \times n$ superdiagonal shift, so
    $(A s)_i = (s_i + s_{i+1})/2$) and $b = (+1, \dots, +1, -1, \dots, -1)$
    (`num_positive` ones). The loss is computed on the **new** state, as in the PES
    paper's code. At steady state $s_0 = 2\theta \sum_i b_i$ ($= -6\theta$ for the
    defaults), so the long-horizon optimum is $\theta^* = 1 / (2 \sum_i b_i) = -1/6$.

    The short-term influence of $\theta$ on $s_0$ is positive ($b_0 = +1$) while the
    long-term one is negative: gradients of truncations of $K \lesssim 10$ steps have
    the opposite sign to the true gradient, so truncated ES and truncated
    backpropagation move $\theta$ away from $-1/6$. The PES paper runs it without
    resets; here an episode has `horizon` steps, and the default is long enough that
    the transient from $s_0 = \mathbf 1$ moves the exact minimiser of the episode loss
    by less than $10^{-3}$ from $-1/6$ (it moves by about $21.6 / T$; see
    `optax_pes.tasks.influence_balancing_optimum`). The inner steps ignore their key.

    `theta` is a float array of shape `(1,)` (as in the paper's code, and what
    `optax` updates naturally) or a scalar; the state has the dtype of `theta`
    (`float32` for a Python float).

    **Arguments:**

    - `horizon`: the number of steps $T$ in one episode.
    - `n`: the state dimension.
    - `num_positive`: how many leading coordinates of $b$ are $+1$; the others are
      $-1$.

    **Returns:** an `optax_pes.UnrolledSystem` whose state is $s$, shape `(n,)`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> from optax_pes import unroll
    >>> from optax_pes.tasks import influence_balancing
    >>> system = influence_balancing(horizon=100)
    >>> losses = unroll(system, jnp.array([-1.0 / 6.0]))
    >>> losses.shape
    (100,)
    >>> bool(losses[-1] < 1e-6)  # at steady state theta = -1/6 is exact
    True

    ```

    **References:**

    - Tallec & Ollivier, *Unbiased Online Recurrent Optimization*, ICLR 2018,
      <https://arxiv.org/abs/1702.05043>.
    - Vicol, Metz & Sohl-Dickstein, *Unbiased Gradient Estimation in Unrolled
      Computation Graphs with Persistent Evolution Strategies*, ICML 2021,
      <https://arxiv.org/abs/2112.13835>.
    """
    _check_sizes(n, num_positive)

    def init(theta: Float[Array, "1"], key: PRNGKeyArray) -> Float[Array, " n"]:
        del key
        return jnp.ones((n,), dtype=jnp.result_type(theta, float))

    def step(
        theta: Float[Array, "1"], s: Float[Array, " n"], key: PRNGKeyArray
    ) -> tuple[Float[Array, " n"], Scalar]:
        del key
        theta = jnp.reshape(jnp.asarray(theta, dtype=s.dtype), ())
        b = jnp.where(jnp.arange(n) < num_positive, 1.0, -1.0).astype(s.dtype)
        s = _shift_average(s) + theta * b
        return s, 0.5 * (s[0] - 1.0) ** 2

    return UnrolledSystem(init=init, step=step, horizon=horizon)


def influence_balancing_optimum(
    horizon: int, n: int = 23, num_positive: int = 10
) -> float:
    r"""The exact minimiser of the episode loss of `influence_balancing`.

    $(s_t)_0 = a_t + \theta c_t$ is affine in $\theta$, with $a_t = (A^t \mathbf 1)_0$
    and $c_t = (\sum_{k<t} A^k b)_0$, so the episode loss
    $\tfrac12 \sum_{t=1}^T (a_t + \theta c_t - 1)^2$ is minimised at

    $$\theta^*_T = \frac{\sum_{t=1}^T c_t (1 - a_t)}{\sum_{t=1}^T c_t^2}
      \xrightarrow[T \to \infty]{} \frac{1}{2 \sum_i b_i}.$$

    Computed in float64 NumPy; once the transient $A^t$ has underflowed the remaining
    steps are added in closed form, so any horizon costs at most a few thousand
    matrix-free steps. For the defaults $\theta^*_T + 1/6 \approx 21.6 / T$.

    **Arguments:**

    - `horizon`: the number of steps $T$ in one episode.
    - `n`, `num_positive`: as in `optax_pes.tasks.influence_balancing`.

    **Returns:** $\theta^*_T$ as a Python `float`.

    **Example:**

    ```python
    >>> from optax_pes.tasks import influence_balancing_optimum
    >>> round(influence_balancing_optimum(1000), 4)
    -0.1465
    >>> abs(influence_balancing_optimum(50_000) + 1 / 6) < 1e-3
    True

    ```
    """
    _check_sizes(n, num_positive)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0:
        raise ValueError(f"horizon must be a positive int, got {horizon!r}")
    b = np.where(np.arange(n) < num_positive, 1.0, -1.0)
    c_inf = 2.0 * b.sum()
    a_vec = np.ones(n)  # A^t 1
    c_vec = np.zeros(n)  # sum_{k<t} A^k b
    numerator = denominator = 0.0
    t = 0
    while t < horizon:
        a_vec = 0.5 * (a_vec + np.append(a_vec[1:], 0.0))
        c_vec = 0.5 * (c_vec + np.append(c_vec[1:], 0.0)) + b
        t += 1
        a, c = a_vec[0], c_vec[0]
        numerator += c * (1.0 - a)
        denominator += c * c
        # A^t has underflowed: a_t = 0 and c_t = c_inf for every later step.
        if np.max(np.abs(a_vec)) == 0.0:
            numerator += (horizon - t) * c_inf
            denominator += (horizon - t) * c_inf**2
            break
    if denominator == 0.0:
        raise ValueError(
            "the episode loss does not depend on theta (sum of b is 0 and the "
            "horizon too short for theta to reach the first coordinate)"
        )
    return float(numerator / denominator)
