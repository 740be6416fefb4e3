"""Checkpointing estimator states (and anything else) with their typed PRNG keys."""

import pathlib
from typing import Any, BinaryIO

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _save(f: BinaryIO, x: Any) -> None:
    if _is_key(x):
        np.save(f, np.asarray(jax.random.key_data(x)))
    else:
        eqx.default_serialise_filter_spec(f, x)


def _load(f: BinaryIO, x: Any) -> Any:
    if _is_key(x):
        data = np.load(f)
        expected = jax.random.key_data(x)
        if data.shape != expected.shape or data.dtype != expected.dtype:
            raise RuntimeError(
                f"a PRNG key in the file has data {data.dtype}{list(data.shape)}, but "
                f"`like` expects {expected.dtype}{list(expected.shape)}"
            )
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return eqx.default_deserialise_filter_spec(f, x)


def tree_serialise_leaves(path_or_file: str | pathlib.Path | BinaryIO, pytree: PyTree):
    """Save a pytree's arrays, including typed PRNG keys, to a file.

    `equinox.tree_serialise_leaves` with typed keys (as in every
    `optax_pes.EstimatorState`) saved as their raw key data. Use it to checkpoint a
    whole training loop, e.g. `(theta, opt_state)` of an `optax.chain` holding `pes`:
    restored with `optax_pes.tree_deserialise_leaves`, the run continues bit for bit.

    **Arguments:**

    - `path_or_file`: a path, or a binary file opened for writing.
    - `pytree`: any pytree of arrays, keys, and Python scalars.

    **Example:**

    ```python
    >>> import io, jax, jax.numpy as jnp, optax, optax_pes
    >>> tx = optax_pes.pes(optax_pes.tasks.influence_balancing(), num_particles=2,
    ...                    sigma=0.1, truncation_length=10, key=0)
    >>> state = tx.init(jnp.array([0.5]))
    >>> f = io.BytesIO()
    >>> optax_pes.tree_serialise_leaves(f, state)
    >>> _ = f.seek(0)
    >>> restored = optax_pes.tree_deserialise_leaves(f, tx.init(jnp.array([0.5])))
    >>> bool(jnp.all(jax.random.key_data(restored.rng_key)
    ...              == jax.random.key_data(state.rng_key)))
    True

    ```
    """
    eqx.tree_serialise_leaves(path_or_file, pytree, filter_spec=_save)


def tree_deserialise_leaves(
    path_or_file: str | pathlib.Path | BinaryIO, like: PyTree
) -> PyTree:
    """Load what `optax_pes.tree_serialise_leaves` saved into the structure of `like`.

    **Arguments:**

    - `path_or_file`: a path, or a binary file opened for reading.
    - `like`: a pytree with the saved one's structure, shapes and dtypes (e.g. a fresh
      `tx.init(theta)`); its values are ignored.

    **Returns:** `like` with the saved values.
    """
    return eqx.tree_deserialise_leaves(path_or_file, like, filter_spec=_load)
