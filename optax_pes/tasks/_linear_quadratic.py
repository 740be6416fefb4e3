"""Random linear-quadratic unrolled systems: exact references for the estimators."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from optax_pes._checks import as_key
from optax_pes._es._system import UnrolledSystem


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in x
    )


def _flatten(theta: PyTree[Array], size: int) -> Float[Array, " p"]:
    leaves = [jnp.ravel(jnp.asarray(leaf)) for leaf in jax.tree.leaves(theta)]
    u = jnp.concatenate(leaves) if leaves else jnp.zeros((0,))
    if u.shape != (size,):
        raise ValueError(
            f"theta must have {size} entries in all (the theta_shapes the system was "
            f"built with), got {u.shape[0]}"
        )
    return u.astype(jnp.result_type(u, float))


def linear_quadratic(
    key: PRNGKeyArray | int,
    *,
    state_dim: int = 4,
    theta_shapes: PyTree[tuple[int, ...]] = (3,),
    horizon: int = 20,
    memory: float = 0.9,
    dtype: Any = jnp.float32,
) -> tuple[UnrolledSystem, PyTree[Float[Array, "..."]]]:
    r"""A random linear system with quadratic losses, whose episode loss is exact.

    With $u \in \mathbb R^p$ the concatenation of the leaves of $\theta$,

    $$s_0 = M u + c, \qquad s_{t+1} = A s_t + B u, \qquad
      \ell_t = \frac{1}{2 n} \| C s_{t+1} + D u - d \|^2,$$

    ($n$ = `state_dim`). Every $s_t$ is affine in $u$ (and in the sequence of
    parameters used at each step, when they differ), so every loss is quadratic:
    Gaussian smoothing changes the episode loss by a constant only, and the ES/PES
    family must match `jax.grad` of `jnp.sum(unroll(system, theta))` exactly in
    expectation. The initial state depends on $\theta$ on purpose (an estimator must
    perturb `init` too), and the steps ignore their key (deterministic).

    $A = Q \operatorname{diag}(\lambda) Q^\top$ with $Q$ random orthogonal and
    $\lambda$ evenly spaced in $[\text{memory}/2, \text{memory}]$: symmetric, positive,
    spectral radius `memory`, so the influence of $u$ on later losses decays like
    $\text{memory}^k$ without oscillating. Increasing `memory` towards 1 makes the
    long-range influence (about $1 / (1 - \text{memory})$ times the one-step one)
    dominate, and with it the bias of truncated ES and truncated backpropagation; $B$
    and $D$ are scaled by $1 - \text{memory}$ to keep the state of order one.
    $M, B, C, D$ have Gaussian entries scaled by $1/\sqrt{\text{columns}}$, $c, d$
    standard Gaussian entries.

    **Arguments:**

    - `key`: an `int` seed or a PRNG key for the random matrices and `theta0`.
    - `state_dim`: $n$, the dimension of the inner state.
    - `theta_shapes`: the shape of $\theta$ (a tuple of ints, e.g. `(3,)` or `()`,
      for a single array) or a pytree of such shapes (e.g.
      `{"w": (2, 3), "b": (3,)}`) for a pytree of arrays.
    - `horizon`: $T$, the number of steps in one episode.
    - `memory`: the spectral radius of $A$, in $[0, 1)$.
    - `dtype`: the floating dtype of the matrices and of `theta0`. The system follows
      the dtype of the `theta` it is called with (matrices are cast to it); `float64`
      needs `jax_enable_x64`.

    **Returns:** `(system, theta0)`: the `optax_pes.UnrolledSystem` (its state is $s$,
    shape `(state_dim,)`) and a random `theta0` with the structure of `theta_shapes`
    and standard Gaussian entries in `dtype`. The matrices are drawn on the host
    with NumPy, seeded by `key` (no compilation per shape), and closed over by
    `system.init` and `system.step`; `linear_quadratic` itself is not traceable:
    call it outside `jax.jit`.

    **Example:**

    ```python
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from optax_pes import unroll
    >>> from optax_pes.tasks import linear_quadratic
    >>> system, theta0 = linear_quadratic(0, theta_shapes={"w": (2, 3), "b": (3,)})
    >>> jax.tree.map(jnp.shape, theta0)
    {'b': (3,), 'w': (2, 3)}
    >>> unroll(system, theta0).shape
    (20,)
    >>> grad = jax.grad(lambda theta: jnp.sum(unroll(system, theta)))(theta0)
    >>> grad["w"].shape
    (2, 3)

    ```
    """
    if isinstance(state_dim, bool) or not isinstance(state_dim, int) or state_dim <= 0:
        raise ValueError(f"state_dim must be a positive int, got {state_dim!r}")
    if not 0.0 <= memory < 1.0:
        raise ValueError(f"memory must be in [0, 1), got {memory!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"dtype {dtype} is not available: enable it with "
            "jax.config.update('jax_enable_x64', True) or jax.enable_x64(True)"
        )
    shapes, treedef = jax.tree.flatten(theta_shapes, is_leaf=_is_shape)
    for shape in shapes:
        if not _is_shape(shape) or any(dim < 0 for dim in shape):
            raise ValueError(
                "theta_shapes must be a shape (a tuple of non-negative ints) or a "
                f"pytree of shapes, got a leaf {shape!r}"
            )
    p = sum(math.prod(shape) for shape in shapes)
    if p == 0:
        raise ValueError(f"theta_shapes has no entries: {theta_shapes!r}")

    # Built on the host with NumPy (seeded by `key`): fast for the many small systems
    # of property tests, with no compilation per shape.
    key = as_key(key, "key")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)

    n = state_dim
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)[None, :]  # Haar orthogonal
    a = (q * np.linspace(memory, memory / 2, n)[None, :]) @ q.T
    m, c = normal((n, p), p**-0.5), normal((n,))
    a = jnp.asarray(0.5 * (a + a.T), dtype=dtype)
    b = normal((n, p), (1.0 - memory) * p**-0.5)
    c_out, d_in = normal((n, n), n**-0.5), normal((n, p), (1.0 - memory) * p**-0.5)
    d = normal((n,))

    def init(theta: PyTree[Array], key: PRNGKeyArray) -> Float[Array, " state_dim"]:
        del key
        u = _flatten(theta, p)
        return m.astype(u.dtype) @ u + c.astype(u.dtype)

    def step(
        theta: PyTree[Array], s: Float[Array, " state_dim"], key: PRNGKeyArray
    ) -> tuple[Float[Array, " state_dim"], Scalar]:
        del key
        u = _flatten(theta, p).astype(s.dtype)
        s = a.astype(s.dtype) @ s + b.astype(s.dtype) @ u
        r = c_out.astype(s.dtype) @ s + d_in.astype(s.dtype) @ u - d.astype(s.dtype)
        return s, 0.5 * jnp.sum(r**2) / n

    theta0 = jax.tree.unflatten(treedef, [normal(shape) for shape in shapes])
    return UnrolledSystem(init=init, step=step, horizon=horizon), theta0
