"""Hyperparameter parameterisations for `training_system`: what theta means."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from optax_pes._checks import check_float, concrete_number
from optax_pes.tasks._training import partition_model


def lr_schedule(
    theta: Float[Array, "2"], *, transition_steps: float = 5000.0
) -> optax.Schedule:
    r"""The PES paper's learning-rate schedule, from log initial rate and log decay.

    $$\alpha_t = \frac{e^{\theta_0}}{(1 + t / 5000)^{e^{\theta_1}}}$$

    **Arguments:**

    - `theta`: shape `(2,)`: the log initial learning rate and the log decay power.
    - `transition_steps`: the 5000 above.

    **Returns:** an `optax.Schedule`, `count -> learning rate`; pass it to an optax
    optimizer inside the `optimizer(theta)` of `optax_pes.tasks.training_system`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax, optax_pes
    >>> theta = jnp.array([jnp.log(0.003), jnp.log(30.0)])
    >>> schedule = optax_pes.tasks.lr_schedule(theta)
    >>> print(f"{float(schedule(0)):.4f} {float(schedule(5000)):.2e}")
    0.0030 2.79e-12
    >>> optimizer = lambda theta: optax.sgd(optax_pes.tasks.lr_schedule(theta), 0.9)

    ```
    """
    theta = jnp.asarray(theta)
    if theta.shape != (2,):
        raise ValueError(
            "theta must have shape (2,): (log initial learning rate, log decay "
            f"power), got shape {theta.shape}"
        )

    def schedule(count):
        t = jnp.asarray(count, theta.dtype)
        return jnp.exp(theta[0]) / (1.0 + t / transition_steps) ** jnp.exp(theta[1])

    return schedule


MIN_MOMENTUM = 1e-6  # how per_layer_sgd holds momentum=0 (theta holds its logit)


def per_layer_sgd(
    model: Any,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> tuple[
    dict[str, PyTree], Callable[[dict[str, PyTree]], optax.GradientTransformation]
]:
    r"""SGD with momentum and weight decay whose three hyperparameters are per layer.

    Every trainable array $p$ of the model (each weight matrix and bias) gets its own
    learning rate, momentum and weight decay, parameterised without constraints:

    $$m \leftarrow \mu_p m + g + \lambda_p p, \qquad p \leftarrow p - \alpha_p m,
      \qquad \alpha_p = e^{\theta^\alpha_p},\ \mu_p = \sigma(\theta^\mu_p),\
      \lambda_p = e^{\theta^\lambda_p}.$$

    A model with $L$ arrays has $3L$ hyperparameters (24 for a 3-hidden-layer MLP).

    **Arguments:**

    - `model`: the model given to `optax_pes.tasks.training_system` (Equinox, Flax NNX
      or a pytree of arrays); only its structure is used.
    - `learning_rate`, `momentum`, `weight_decay`: the starting values, the same for
      every array: positive finite rates, a momentum in [0, 1) (0, plain SGD, is held
      as 1e-6, since theta holds its logit).

    **Returns:** `(theta, optimizer)`: `theta` is a dict with entries
    `"log_learning_rate"`, `"logit_momentum"` and `"log_weight_decay"`, each a pytree
    of scalars shaped like the model's trainable arrays (in their dtype, or float32
    for a bfloat16 or float16 model), and `optimizer(theta)` builds the
    `optax.GradientTransformation`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optax_pes
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> theta, optimizer = optax_pes.tasks.per_layer_sgd(params, learning_rate=0.1)
    >>> len(jax.tree.leaves(theta))
    6
    >>> tx = optimizer(theta)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> print(f"{float(updates['w'][0, 0]):.5f}")
    -0.10001

    ```
    """
    learning_rate = check_float(concrete_number(learning_rate), "learning_rate")
    weight_decay = check_float(concrete_number(weight_decay), "weight_decay")
    momentum = concrete_number(momentum)
    if isinstance(momentum, bool) or not (
        isinstance(momentum, (int, float, np.integer, np.floating))
        and 0 <= momentum < 1
    ):
        raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
    # theta holds the logit: plain SGD (momentum 0) is held as MIN_MOMENTUM.
    momentum = max(momentum, MIN_MOMENTUM)
    params = partition_model(model).params

    def full(value, name, given):
        for p in jax.tree.leaves(params):
            info = jnp.finfo(p.dtype)
            if not float(info.smallest_subnormal) <= given <= float(info.max):
                raise ValueError(
                    f"{name}={given!r} is out of range for the model's {p.dtype} "
                    "arrays (it overflows or underflows there)"
                )
        # At least float32: a bfloat16 or float16 theta would round meta-updates
        # away (the log learning rate's spacing near -2.3 is 0.016 in bfloat16).
        return jax.tree.map(
            lambda p: jnp.asarray(value, jnp.promote_types(p.dtype, jnp.float32)),
            params,
        )

    theta = {
        "log_learning_rate": full(
            np.log(learning_rate), "learning_rate", learning_rate
        ),
        "logit_momentum": full(
            np.log(momentum) - np.log1p(-momentum), "momentum", momentum
        ),
        "log_weight_decay": full(np.log(weight_decay), "weight_decay", weight_decay),
    }

    def optimizer(theta: dict[str, PyTree]) -> optax.GradientTransformation:
        def init_fn(params):
            return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

        def update_fn(updates, state, params=None):
            if params is None:
                raise ValueError("per_layer_sgd needs params (for weight decay)")

            def trace(m, g, p, mu, wd):  # (in the trace's own dtype, whatever theta's)
                return (jax.nn.sigmoid(mu) * m + g + jnp.exp(wd) * p).astype(m.dtype)

            new = jax.tree.map(
                trace,
                state.trace,
                updates,
                params,
                theta["logit_momentum"],
                theta["log_weight_decay"],
            )
            out = jax.tree.map(
                lambda m, lr, p: (-jnp.exp(lr) * m).astype(p.dtype),
                new,
                theta["log_learning_rate"],
                params,
            )
            return out, optax.TraceState(trace=new)

        return optax.GradientTransformation(init_fn, update_fn)

    return theta, optimizer
