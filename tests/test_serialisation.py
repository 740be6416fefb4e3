"""Checkpoints refuse what does not fit, and say when a file is truncated or corrupt."""

import errno
import io
import os
import stat

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


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    # Before: a path was opened with "wb" and rewritten in place, so an interruption
    # (preemption, Ctrl-C, a full disk) while writing lost the good checkpoint too.
    path = tmp_path / "run.eqx"
    optax_pes.tree_serialise_leaves(path, {"theta": THETA})

    def interrupted(f, tree, filter_spec):
        f.write(b"\0" * 64)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(
            optax_pes._serialisation.eqx, "tree_serialise_leaves", interrupted
        )
        with pytest.raises(KeyboardInterrupt):
            optax_pes.tree_serialise_leaves(path, {"theta": THETA + 1})
    restored = optax_pes.tree_deserialise_leaves(path, {"theta": jnp.zeros(1)})
    np.testing.assert_array_equal(restored["theta"], THETA)
    assert [p.name for p in tmp_path.iterdir()] == ["run.eqx"]  # no temporary left
    (tmp_path / "plain").write_bytes(b"")  # the umask's permissions, as before
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
    optax_pes.tree_serialise_leaves(path, {"theta": THETA + 1})  # and it still saves
    restored = optax_pes.tree_deserialise_leaves(path, {"theta": jnp.zeros(1)})
    np.testing.assert_array_equal(restored["theta"], THETA + 1)


@pytest.mark.skipif(os.name != "posix", reason="directories are fsynced on POSIX")
def test_the_rename_is_made_durable(tmp_path, monkeypatch):
    # The file's bytes were fsynced, but not the directory's entry that the rename
    # wrote: after a power loss the path could still name the previous checkpoint
    # (or nothing, for a new one).
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    optax_pes.tree_serialise_leaves(tmp_path / "run.eqx", {"theta": THETA})
    assert synced == [False, True]  # the file, then its directory

    def unsupported(fd):  # a file system that cannot sync a directory (EINVAL)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", unsupported)
    optax_pes.tree_serialise_leaves(tmp_path / "run.eqx", {"theta": THETA + 1})
    restored = optax_pes.tree_deserialise_leaves(
        tmp_path / "run.eqx", {"theta": jnp.zeros(1)}
    )
    np.testing.assert_array_equal(restored["theta"], THETA + 1)


def test_a_write_through_a_symlink_keeps_the_link_and_the_mode(tmp_path):
    target, link = tmp_path / "run_100.eqx", tmp_path / "latest.eqx"
    optax_pes.tree_serialise_leaves(target, {"theta": THETA})
    target.chmod(0o640)
    link.symlink_to(target.name)
    optax_pes.tree_serialise_leaves(link, {"theta": THETA + 1})
    assert link.is_symlink()  # the target was rewritten, not the link replaced
    restored = optax_pes.tree_deserialise_leaves(target, {"theta": jnp.zeros(1)})
    np.testing.assert_array_equal(restored["theta"], THETA + 1)
    assert target.stat().st_mode & 0o777 == 0o640
    with pytest.raises(FileNotFoundError, match="no directory to write"):
        optax_pes.tree_serialise_leaves(tmp_path / "missing" / "x.eqx", THETA)


def test_like_may_be_shapes_and_dtypes_only():
    # jax.eval_shape of an init: ShapeDtypeStructs, typed keys included (before: a
    # bare numpy TypeError for the key).
    tx = _chain(optax.adam(1e-2))
    state = tx.init(THETA)
    like = jax.eval_shape(lambda: (THETA, tx.init(THETA)))
    theta, restored = _load(_saved((THETA, state)), like)
    np.testing.assert_array_equal(theta, THETA)
    key = restored[0].rng_key
    assert jax.random.key_impl(key) == jax.random.key_impl(state[0].rng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(key), jax.random.key_data(state[0].rng_key)
    )
    with pytest.raises(ValueError, match="expects key<rbg>"):
        _load(
            _saved({"k": jax.random.key(0)}),
            {"k": jax.ShapeDtypeStruct((), jax.random.key(0, impl="rbg").dtype)},
        )


def test_a_numpy_bfloat16_leaf_round_trips():
    # NumPy saves a bfloat16 array (ml_dtypes) as raw 2-byte records and loads it as
    # void ("|V2"): outer_loop's History.theta of a bfloat16 theta, saved, was
    # reported as a truncated or corrupt checkpoint.
    tree = {"history": np.arange(4, dtype=jnp.bfloat16), "theta": THETA}
    f = io.BytesIO()
    optax_pes.tree_serialise_leaves(f, tree)
    f.seek(0)
    like = {"history": np.zeros(4, jnp.bfloat16), "theta": jnp.zeros(1)}
    restored = optax_pes.tree_deserialise_leaves(f, like)
    assert isinstance(restored["history"], np.ndarray)
    assert restored["history"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["history"], tree["history"])


def test_a_header_without_its_fields_is_corrupt():
    data = _saved({"theta": THETA})
    magic = optax_pes._serialisation._MAGIC
    header = b'{"version": 1}'
    bad = magic + len(header).to_bytes(8, "little") + header
    with pytest.raises(ValueError, match="header is truncated or corrupt"):
        _load(bad + data[len(bad) :], {"theta": THETA})
