"""Checkpointing estimator states (and anything else) with their typed PRNG keys.

A checkpoint file is a small header, then the leaves as `equinox.tree_serialise_leaves`
writes them (typed keys as their raw key data). The header holds a format version,
the tree structure and every leaf's kind, dtype and shape, so that loading refuses a
file that does not match `like` (equinox alone reads any prefix of a file), and says
so when a file is truncated or corrupt rather than failing at some leaf.
"""

import errno
import io
import json
import os
import pathlib
import shutil
import struct
import uuid
from typing import Any, BinaryIO

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from optax_pes._placement import spread_sharding

_MAGIC = b"optax_pes checkpoint\n"
_VERSION = 1


def _is_key(x: Any) -> bool:
    """A typed PRNG key: an array, or a `jax.ShapeDtypeStruct` standing for one."""
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _key_impl(x: jax.Array | jax.ShapeDtypeStruct) -> Any:
    """The PRNG implementation of a typed key or of its shape-and-dtype stand-in."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    found = []  # (key_impl takes arrays: a traced one stands in for the struct)
    jax.eval_shape(lambda key: found.append(jax.random.key_impl(key)), x)
    return found[0]


def _as_array(x: Any) -> Any:
    """A typed key's `jax.ShapeDtypeStruct` as a key array of its shape and
    implementation (equinox's loader accepts stand-ins for plain arrays only)."""
    if not (isinstance(x, jax.ShapeDtypeStruct) and _is_key(x)):
        return x
    impl = _key_impl(x)
    data_shape = jax.random.key_data(jax.random.key(0, impl=impl)).shape
    zeros = np.zeros(x.shape + data_shape, np.uint32)
    return jax.random.wrap_key_data(zeros, impl=impl)


def _leaf_spec(x: Any) -> str:
    if _is_key(x):
        return f"key<{_key_impl(x)}>{list(x.shape)}"
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{np.dtype(x.dtype)}{list(np.shape(x))}"
    return type(x).__name__


def _header(pytree: PyTree) -> dict[str, Any]:
    # Leaf paths, not str(treedef): a treedef prints static fields (functions with
    # their addresses), which differ between processes.
    # String leaves have no array to save: their values go in the header.
    leaves = jax.tree_util.tree_leaves_with_path(pytree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    return {
        "version": _VERSION,
        "paths": paths,
        "leaves": [_leaf_spec(x) for _, x in leaves],
        "strings": {
            p: x for p, (_, x) in zip(paths, leaves, strict=True) if isinstance(x, str)
        },
    }


def _with_saved_strings(tree: PyTree, strings: dict[str, str]) -> PyTree:
    """`tree` with its string leaves replaced by the saved ones (by path)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: strings.get(jax.tree_util.keystr(path), x), tree
    )


def _save(f: BinaryIO, x: Any) -> None:
    if _is_key(x):
        np.save(f, np.asarray(jax.random.key_data(x)))
    else:
        eqx.default_serialise_filter_spec(f, x)


def _load(f: BinaryIO, x: Any) -> Any:
    if _is_key(x):
        data = np.load(f)
        return jax.random.wrap_key_data(data, impl=_key_impl(x))
    if isinstance(x, np.ndarray):
        # NumPy saves ml_dtypes' types (bfloat16, float8s) as raw records and loads
        # them as void: read back in the dtype the header checked.
        out = np.load(f)
        if out.dtype.kind == "V" and out.dtype.itemsize == x.dtype.itemsize:
            out = out.view(x.dtype)
        return out
    return eqx.default_deserialise_filter_spec(f, x)


class CheckpointError(ValueError):
    """A checkpoint that does not match `like`, or is truncated or corrupt."""


def tree_serialise_leaves(path_or_file: str | pathlib.Path | BinaryIO, pytree: PyTree):
    """Save a pytree's arrays, including typed PRNG keys, to a file.

    `equinox.tree_serialise_leaves` with typed keys (as in every
    `optax_pes.EstimatorState`) saved as their raw key data, after a header that
    records the tree's structure and leaves, so that
    `optax_pes.tree_deserialise_leaves` can refuse a file that does not fit. Use it to
    checkpoint a whole training loop, e.g. `(theta, opt_state)` of an `optax.chain`
    holding `pes`: restored, the run continues bit for bit.

    **Arguments:**

    - `path_or_file`: a path (written to a temporary file beside it, then renamed
      over it: an interrupted write leaves the previous file as it was; through a
      symlink, its target is rewritten, with its permissions), or a binary file
      opened for writing.
    - `pytree`: any pytree of arrays, keys, Python numbers and strings (other
      leaves, such as functions, are not saved: they come from `like` on loading).

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
    if isinstance(path_or_file, (str, pathlib.Path)):
        # Written beside the target, then renamed over it (atomic on POSIX and
        # Windows): an interruption while writing leaves the previous checkpoint.
        # (A unique name opened "x", not mkstemp: the file gets the umask's
        # permissions, as a checkpoint written in place did, not mkstemp's 0600.)
        # A symlink's target is rewritten (a `latest -> run_100` link stays a link),
        # and an existing file keeps its permissions.
        path = pathlib.Path(os.path.realpath(path_or_file))
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no directory to write {path_or_file} in")
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "xb") as f:
                tree_serialise_leaves(f, pytree)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                shutil.copymode(path, temporary)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _sync_directory(path.parent)
        return None
    header = json.dumps(_header(pytree)).encode()
    path_or_file.write(_MAGIC + struct.pack("<Q", len(header)) + header)
    eqx.tree_serialise_leaves(path_or_file, pytree, filter_spec=_save)


def _sync_directory(directory: pathlib.Path) -> None:
    """Make a rename in `directory` durable: fsync the directory (POSIX; Windows
    cannot open a directory for it). Some file systems (network, FUSE) refuse to
    sync a directory: the checkpoint is written, so that is not an error."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _read_header(f: BinaryIO) -> dict[str, Any]:
    if f.read(len(_MAGIC)) != _MAGIC:
        raise CheckpointError(
            "not an optax_pes checkpoint (no header): the file is truncated or "
            "corrupt, or was not written by optax_pes.tree_serialise_leaves"
        )
    size = f.read(8)
    try:
        (length,) = struct.unpack("<Q", size)
        header = json.loads(f.read(length).decode())
        version = header["version"]
        if not all(isinstance(header[k], list) for k in ("paths", "leaves")):
            raise ValueError("its paths and leaves are not lists")
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"the checkpoint's header is truncated or corrupt ({e})"
        ) from e
    if version != _VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is not supported (this optax_pes "
            f"reads version {_VERSION})"
        )
    return header


def _check_fits(saved: dict[str, Any], like: PyTree) -> None:
    expected = _header(like)
    saved_paths, paths = saved["paths"], expected["paths"]
    if saved_paths != paths:
        missing = [p for p in paths if p not in saved_paths][:3]
        extra = [p for p in saved_paths if p not in paths][:3]
        raise CheckpointError(
            f"the checkpoint holds a different tree than `like`: {len(saved_paths)} "
            f"leaves saved, {len(paths)} expected (e.g. missing {missing or 'none'}, "
            f"unexpected {extra or 'none'})"
        )
    for path, got, want in zip(paths, saved["leaves"], expected["leaves"], strict=True):
        if got != want:
            raise CheckpointError(
                f"the checkpoint's leaf {path or '(root)'} is {got}, but `like` "
                f"expects {want}"
            )


def tree_deserialise_leaves(
    path_or_file: str | pathlib.Path | BinaryIO, like: PyTree
) -> PyTree:
    """Load what `optax_pes.tree_serialise_leaves` saved into the structure of `like`.

    The file must hold exactly `like`'s tree: the same structure, and leaves of the
    same dtypes and shapes, and nothing after them. Otherwise, or when the file is
    truncated or corrupt, a `ValueError` says which; nothing is half-loaded.

    **Arguments:**

    - `path_or_file`: a path, or a binary file opened for reading.
    - `like`: a pytree with the saved one's structure, shapes and dtypes (e.g. a fresh
      `tx.init(theta)`, or `jax.eval_shape(tx.init, theta)`); its values are
      ignored, except for leaves that are neither arrays, keys, Python numbers nor
      strings (an Equinox module's activation function), which are not saved and
      come from `like`.

    **Returns:** `like` with the saved values.
    """
    if isinstance(path_or_file, (str, pathlib.Path)):
        with open(path_or_file, "rb") as f:
            return tree_deserialise_leaves(f, like)
    header = _read_header(path_or_file)
    _check_fits(header, like)
    body = io.BytesIO(path_or_file.read())
    try:
        out = eqx.tree_deserialise_leaves(
            body, jax.tree.map(_as_array, like), filter_spec=_load
        )
    except Exception as e:  # noqa: BLE001 - numpy's errors on a short read vary
        raise CheckpointError(
            "the checkpoint is truncated or corrupt: its leaves could not be read "
            f"({type(e).__name__}: {e})"
        ) from e
    if body.read(1):
        raise CheckpointError(
            "the checkpoint has data after the last leaf of `like`: it is corrupt"
        )
    return _with_saved_strings(
        jax.tree.map(_placed_as, out, like), header.get("strings", {})
    )


def _placed_as(loaded: Any, like: Any) -> Any:
    """`loaded` on the devices of `like` where it is spread over several (a state on
    a mesh: restored as `init` made it, so a jitted update does not compile again)."""
    sharding = spread_sharding(like)
    return loaded if sharding is None else jax.device_put(loaded, sharding)
