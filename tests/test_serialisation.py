"""Checkpoints refuse what does not fit, and say when a file is truncated or corrupt."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_pes


def _chain(second):
    system = optax_pes.tasks.influence_balancing(horizon=20)
    pes = optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=5, key=0)
    return optax.chain(pes, second)


def _saved(tree) -> bytes:
    f = io.BytesIO()
    optax_pes.tree_serialise_leaves(f, tree)
    return f.getvalue()


def _load(data: bytes, like):
    return optax_pes.tree_deserialise_leaves(io.BytesIO(data), like)


THETA = jnp.array([0.5])


def test_round_trip_is_bit_for_bit(tmp_path):
    tx = _chain(optax.adam(1e-2))
    state = tx.init(THETA)
    _, state = jax.jit(tx.update)(jnp.zeros(1), state, THETA)
    path = tmp_path / "ckpt.eqx"
    optax_pes.tree_serialise_leaves(path, (THETA, state))
    theta, restored = optax_pes.tree_deserialise_leaves(path, (THETA, tx.init(THETA)))
    for a, b in zip(
        jax.tree.leaves((THETA, state)), jax.tree.leaves((theta, restored)), strict=True
    ):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_a_file_holding_more_than_like_is_refused():
    tx = _chain(optax.adam(1e-2))
    data = _saved((THETA, tx.init(THETA)))
    with pytest.raises(ValueError, match="different tree"):
        _load(data, THETA)  # the prefix alone would load
    with pytest.raises(ValueError, match="different tree"):
        _load(data, (THETA, _chain(optax.sgd(1e-2)).init(THETA)))


def test_a_leaf_of_another_shape_or_dtype_is_refused():
    data = _saved({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"leaf \['w'\] is float32\[3\]"):
        _load(data, {"w": jnp.zeros(4)})
    with pytest.raises(ValueError, match="expects int32"):
        _load(data, {"w": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.95])
def test_truncated_file_says_so(keep):
    tx = _chain(optax.adam(1e-2))
    data = _saved((THETA, tx.init(THETA)))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _load(data[: int(keep * len(data))], (THETA, tx.init(THETA)))


def test_zeroed_or_extended_file_says_corrupt():
    like = (THETA, _chain(optax.adam(1e-2)).init(THETA))
    data = _saved(like)
    with pytest.raises(ValueError, match="corrupt"):
        _load(bytes(len(data)), like)
    with pytest.raises(ValueError, match="corrupt"):
        _load(data + b"\x00" * 16, like)


def test_a_string_leaf_is_restored_not_taken_from_like():
    # Before: equinox skips non-array leaves, so the restored string was `like`'s,
    # silently, although `like`'s values are documented as ignored.
    saved = {"run": "lr=0.02, seed 1", "theta": THETA}
    like = {"run": "a fresh run", "theta": jnp.zeros(1)}
    restored = _load(_saved(saved), like)
    assert restored["run"] == "lr=0.02, seed 1"
    np.testing.assert_array_equal(restored["theta"], THETA)
    # A function leaf (an Equinox module's activation) still comes from `like`.
    restored = _load(
        _saved({"f": jnp.tanh, "theta": THETA}), {"f": jnp.sin, "theta": THETA}
    )
    assert restored["f"] is jnp.sin
