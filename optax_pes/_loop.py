"""An outer loop for meta-training: jitted chunks, progress, history, checkpoints.

The plain optax loop (`tx.update`, `optax.apply_updates`) stays the primary API; this
is the loop every example would otherwise write again.
"""

import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree

from optax_pes._checks import check_callable, check_finite_params, check_int
from optax_pes._compile import SharedJit
from optax_pes._es._state import Diagnostics
from optax_pes._placement import spread_sharding
from optax_pes._serialisation import tree_serialise_leaves


class History(NamedTuple):
    """What `optax_pes.outer_loop` recorded, one row per update."""

    theta: PyTree  # theta after each update, leading axis updates (if recorded)
    diagnostics: dict[str, np.ndarray]  # every Diagnostics field of the chain's
    #   first estimator, shape (updates,); empty without an estimator


def _replicated_on_the_mesh(tree: PyTree) -> PyTree:
    """`tree` with its one-device arrays replicated over the mesh that its other
    arrays are spread over (an estimator's state given `mesh=`), if any: as the
    chunks return them, so that the first chunk's program serves every chunk (theta
    and the rest of an `optax.chain`'s state start on one device)."""
    spread = [spread_sharding(leaf) for leaf in jax.tree.leaves(tree)]
    meshes = [s.mesh for s in spread if isinstance(s, jax.sharding.NamedSharding)]
    if not meshes:
        return tree
    replicated = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())

    def place(leaf):  # (NumPy arrays and Python numbers too: they have none)
        if spread_sharding(leaf) is not None:
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)


def _diagnostics(state: PyTree) -> Diagnostics | None:
    """The first estimator's `Diagnostics` inside an optax (chain) state."""
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Diagnostics))
        if isinstance(x, Diagnostics)
    ]
    return found[0] if found else None


def outer_loop(
    tx: optax.GradientTransformation,
    theta: PyTree,
    num_updates: int,
    *,
    state: PyTree | None = None,
    chunk: int = 50,
    progress: bool | None = None,
    record_theta: bool = True,
    checkpoint: str | pathlib.Path | None = None,
    checkpoint_every: int | None = None,
    on_chunk: Callable[[PyTree, PyTree, int], None] | None = None,
) -> tuple[PyTree, PyTree, History]:
    r"""Run `num_updates` updates of `tx` on `theta`, in jitted chunks of `lax.scan`.

    Each update is `updates, state = tx.update(zeros, state, theta)` and
    `theta = optax.apply_updates(theta, updates)`: the estimators add their estimate
    to the zeros. A chunk of `chunk` updates is one compiled call (so Python's
    dispatch costs nothing per update); the loop compiles once for the full chunks and
    once more for a shorter last one.

    **Arguments:**

    - `tx`: the meta-optimizer, e.g. `optax.chain(optax_pes.pes(...), optax.adam(...))`.
    - `theta`: the initial parameters.
    - `num_updates`: how many updates to run.
    - `state`: the state to continue from (`tx.init(theta)` if None), e.g. restored
      with `optax_pes.tree_deserialise_leaves`.
    - `chunk`: updates per compiled call.
    - `progress`: a tqdm bar with the meta-loss (`diagnostics.episode_loss` of the
      chain's first estimator, or its `mean_loss` until an episode has finished);
      `None` shows it when tqdm is installed.
    - `record_theta`: keep theta after every update in the history.
    - `checkpoint`, `checkpoint_every`: write `(theta, state)` with
      `optax_pes.tree_serialise_leaves` to this path every `checkpoint_every` updates
      (rounded up to whole chunks) and at the end.
    - `on_chunk`: called as `on_chunk(theta, state, updates_done)` after each chunk.

    **Returns:** `(theta, state, history)`, with `history` an `optax_pes.History`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax, optax_pes
    >>> system = optax_pes.tasks.toy_regression()
    >>> tx = optax.chain(
    ...     optax_pes.pes(system, num_particles=10, sigma=0.3, truncation_length=10,
    ...                   key=0),
    ...     optax.adam(1e-2),
    ... )
    >>> theta, state, history = optax_pes.outer_loop(
    ...     tx, jnp.array([-4.0, -4.0]), 20, chunk=10, progress=False)
    >>> history.theta.shape, history.diagnostics["episode_loss"].shape
    ((20, 2), (20,))

    ```
    """
    num_updates = check_int(num_updates, "num_updates", 0)
    chunk = check_int(chunk, "chunk", 1)
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 1)
        if checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=PATH")
    if on_chunk is not None:
        check_callable(on_chunk, "on_chunk", "on_chunk(theta, state, updates_done)")
    check_finite_params(theta, "theta")
    state = tx.init(theta) if state is None else state
    # Strongly typed, as an update returns them: a theta written from Python scalars
    # (`jnp.array(-3.0)`) and the optimizer moments made from it are weakly typed,
    # and the second chunk compiled again for the strong types the first returned.
    theta, state = _replicated_on_the_mesh(_strongly_typed((theta, state)))

    bar = _bar(progress, num_updates)
    thetas, rows = [], []
    done, since_checkpoint = 0, 0
    while done < num_updates:
        length = min(chunk, num_updates - done)
        (theta, state), (chunk_thetas, chunk_diag) = _compiled_chunk(
            tx, theta, state, length, record_theta
        )
        done += length
        since_checkpoint += length
        if record_theta:
            thetas.append(jax.tree.map(np.asarray, chunk_thetas))
        if chunk_diag is not None:
            rows.append({k: np.asarray(v) for k, v in chunk_diag._asdict().items()})
        if bar is not None:
            bar.update(length)
            if chunk_diag is not None:
                bar.set_postfix(meta_loss=f"{_meta_loss(chunk_diag):.4g}")
        if checkpoint is not None and (
            done == num_updates
            or (checkpoint_every is not None and since_checkpoint >= checkpoint_every)
        ):
            tree_serialise_leaves(checkpoint, (theta, state))
            since_checkpoint = 0
        if on_chunk is not None:
            on_chunk(theta, state, done)
    if bar is not None:
        bar.close()
    history = History(
        theta=(
            jax.tree.map(lambda *xs: np.concatenate(xs), *thetas) if thetas else None
        ),
        diagnostics=(
            {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}
        ),
    )
    return theta, state, history


def _strongly_typed(tree: PyTree) -> PyTree:
    """`tree` with its weakly typed arrays made strongly typed, in the same dtype."""
    return jax.tree.map(
        lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x,
        tree,
    )


def _chunk(
    tx: optax.GradientTransformation,
    theta: PyTree,
    state: PyTree,
    length: int,
    record_theta: bool,
) -> tuple[tuple[PyTree, PyTree], tuple[PyTree | None, Diagnostics | None]]:
    """`length` updates of `tx` on `theta` in one `lax.scan`, with their history."""

    def one(carry, _):
        theta, state = carry
        zeros = jax.tree.map(jnp.zeros_like, theta)
        updates, state = tx.update(zeros, state, theta)
        theta = optax.apply_updates(theta, updates)
        diagnostics = _diagnostics(state)
        row = (theta if record_theta else None, diagnostics)
        return (theta, state), row

    return jax.lax.scan(one, (theta, state), None, length=length)


# One compiled chunk per transformation, chunk length and theta/state structure,
# shared by every call of `outer_loop`: resuming (`state=`), or one call per epoch
# with an evaluation between, compiles once, not once per call.
_compiled_chunk = SharedJit(_chunk)


def _meta_loss(diagnostics: Diagnostics) -> float:
    """The last episode meta-loss of a chunk, or the window loss before any ended."""
    finished = np.asarray(diagnostics.num_episodes).sum() > 0
    if finished or float(np.asarray(diagnostics.episode_loss)[-1]) != 0:
        return float(np.asarray(diagnostics.episode_loss)[-1])
    return float(np.asarray(diagnostics.mean_loss)[-1])


def _bar(progress: bool | None, total: int) -> Any:
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm: pip install tqdm") from None
        return None
    return tqdm(total=total, unit="update", leave=False)
