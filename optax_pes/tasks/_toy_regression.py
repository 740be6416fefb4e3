"""The PES paper's 2-D toy meta-optimisation problem with chaotic regions."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from optax_pes._es._system import UnrolledSystem, unroll

_SQRT5 = 5.0**0.5


def _inner_loss(x: Float[Array, "2"]) -> Scalar:
    """The inner loss surface f(x) of the toy regression problem."""
    return (
        jnp.sqrt(x[0] ** 2 + 5.0)
        - _SQRT5
        + jnp.sin(x[1]) ** 2 * jnp.exp(-5.0 * x[0] ** 2)
        + 0.25 * jnp.abs(x[1] - 100.0)
    )


_inner_grad = jax.grad(_inner_loss)


def toy_regression(horizon: int = 100) -> UnrolledSystem:
    r"""The PES paper's toy 2-D meta-problem: tune a linear learning-rate schedule.

    The inner problem minimises, from $x_0 = (1, 1)$,

    $$f(x) = \sqrt{x_0^2 + 5} - \sqrt 5 + \sin^2(x_1)\, e^{-5 x_0^2}
      + \tfrac14 |x_1 - 100|$$

    by gradient descent with a learning rate that interpolates linearly between
    $e^{\theta_0}$ and $e^{\theta_1}$ over the $T$ = `horizon` inner steps:

    $$\alpha_t = e^{\theta_0} \frac{T - t}{T} + e^{\theta_1} \frac{t}{T}, \qquad
      x_{t+1} = x_t - \alpha_t \nabla f(x_t), \qquad \ell_t = f(x_{t+1}),
      \qquad t = 0, \dots, T - 1.$$

    The per-step loss is $f$ at the **new** iterate (as in the PES paper's code), and
    the meta-loss is the sum $\sum_t \ell_t$ over the episode. The sinusoidal term
    makes the meta-loss surface chaotic for large learning rates; on the paper's grid
    $\theta \in [-5, 5]^2$ its minimum is about 553 (at
    $\theta \approx (2.75, -3.3)$, see `optax_pes.tasks.toy_regression_grid`), and
    $\theta = (-4, -4)$ gives about 2488. Nothing is clipped: a huge
    $e^{\theta}$ gives `inf`/`nan` losses, which the estimators treat as non-finite.
    The inner steps ignore their key.

    **Arguments:**

    - `horizon`: the number of inner steps $T$ in one episode.

    **Returns:** an `optax_pes.UnrolledSystem` for `theta` of shape `(2,)`, whose
    state is the tuple `(x, t)`: the iterate (shape `(2,)`, the dtype of `theta`,
    `float32` for Python floats) and the inner step index (`int32` scalar).

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> from optax_pes import unroll
    >>> from optax_pes.tasks import toy_regression
    >>> system = toy_regression()
    >>> losses = unroll(system, jnp.array([-4.0, -4.0]))
    >>> losses.shape
    (100,)
    >>> round(float(losses.sum()))
    2488

    ```

    **References:**

    - Vicol, Metz & Sohl-Dickstein, *Unbiased Gradient Estimation in Unrolled
      Computation Graphs with Persistent Evolution Strategies*, ICML 2021,
      <https://arxiv.org/abs/2112.13835>.
    """

    def init(
        theta: Float[Array, "2"], key: PRNGKeyArray
    ) -> tuple[Float[Array, "2"], Int[Array, ""]]:
        del key
        dtype = jnp.result_type(theta, float)
        return jnp.ones((2,), dtype=dtype), jnp.zeros((), dtype=jnp.int32)

    def step(
        theta: Float[Array, "2"],
        state: tuple[Float[Array, "2"], Int[Array, ""]],
        key: PRNGKeyArray,
    ) -> tuple[tuple[Float[Array, "2"], Int[Array, ""]], Scalar]:
        del key
        x, t = state
        theta = jnp.asarray(theta, dtype=x.dtype)
        if theta.shape != (2,):
            raise ValueError(
                f"toy_regression expects theta of shape (2,), got {theta.shape}"
            )
        frac = t.astype(x.dtype) / horizon
        lr = jnp.exp(theta[0]) * (1 - frac) + jnp.exp(theta[1]) * frac
        x = x - lr * _inner_grad(x)
        return (x, t + 1), _inner_loss(x)

    return UnrolledSystem(init=init, step=step, horizon=horizon)


def toy_regression_grid(
    num: int = 100,
    low: float = -5.0,
    high: float = 5.0,
    *,
    horizon: int = 100,
) -> tuple[Float[Array, " num"], Float[Array, " num"], Float[Array, "num num"]]:
    r"""The meta-loss of `toy_regression` on a `num` x `num` grid of $\theta$.

    $L(\theta) = \sum_t \ell_t$ is evaluated exactly (one full unroll per grid point,
    vectorised), for plots of the meta-loss surface and as the reference minimum that
    the estimators should approach. The paper's grid is $[-5, 5]^2$; its minimum is
    about 553 (557 with 100 points a side, 553.8 with 400, 552.8 with 1000).

    **Arguments:**

    - `num`: points per axis, `jnp.linspace(low, high, num)` for both $\theta_0$ and
      $\theta_1$.
    - `low`, `high`: the range of both coordinates.
    - `horizon`: as in `optax_pes.tasks.toy_regression`.

    **Returns:** `(theta0s, theta1s, meta_losses)` with `meta_losses[i, j]` the
    meta-loss at `(theta0s[i], theta1s[j])`, in the default float dtype (`float64`
    under `jax_enable_x64`). Use `jnp.nanargmin` on it: some grid points may diverge.

    **Example:**

    ```python
    >>> import jax.numpy as jnp
    >>> from optax_pes.tasks import toy_regression_grid
    >>> theta0s, theta1s, meta_losses = toy_regression_grid(num=50)
    >>> meta_losses.shape
    (50, 50)
    >>> 540 < float(jnp.nanmin(meta_losses)) < 580
    True

    ```
    """
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise ValueError(f"num must be a positive int, got {num!r}")
    axis = jnp.linspace(low, high, num, dtype=jnp.result_type(float))
    return axis, axis, _grid(axis, horizon)


@functools.partial(jax.jit, static_argnums=1)
def _grid(axis: Float[Array, " num"], horizon: int) -> Float[Array, "num num"]:
    system = toy_regression(horizon)

    def meta_loss(theta0, theta1):
        return jnp.sum(unroll(system, jnp.stack([theta0, theta1])))

    row = jax.vmap(meta_loss, in_axes=(None, 0))
    return jax.lax.map(lambda theta0: row(theta0, axis), axis)
