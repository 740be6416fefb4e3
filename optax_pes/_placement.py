"""Where per-particle arrays live: one device, or sharded over a user's mesh.

`placement(mesh, mesh_axes, num_particles)` validates the user's arguments and gives
a `Placement`, a pair of functions the window engine calls on the particle axis. Without
a mesh both are the identity, so there is one code path whatever the devices.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree


class Placement(NamedTuple):
    """`shard` lays a leading particle axis out over devices; `replicate` gathers
    per-particle results onto every device before they are reduced (so a sharded
    estimate equals the single-device one)."""

    shard: Callable[[PyTree], PyTree]
    replicate: Callable[[PyTree], PyTree]
    # What the two depend on (None on one device): equal specs lay out alike, so
    # estimators built twice with the same mesh can share a compiled update.
    spec: Hashable = None


def _identity(tree: PyTree) -> PyTree:
    return tree


ON_ONE_DEVICE = Placement(_identity, _identity)  # no mesh: leave arrays where they are


def spread_sharding(x: Any) -> jax.sharding.Sharding | None:
    """`x`'s sharding where it spans several devices (a mesh's), else None (one
    device, or not a JAX array)."""
    sharding = getattr(x, "sharding", None)
    return sharding if sharding is not None and len(sharding.device_set) > 1 else None


def placement(
    mesh: Any, mesh_axes: str | Sequence[str] | None, num_particles: int
) -> Placement:
    """Validate a user's `mesh` (and the mesh axes the particle axis is split over,
    all of them by default) and build the `Placement`; `num_particles` must divide
    evenly over those devices."""
    if mesh is None:
        if mesh_axes is not None:
            raise ValueError("mesh_axes needs a mesh; pass mesh=jax.sharding.Mesh(...)")
        return ON_ONE_DEVICE
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(
            "mesh must be a jax.sharding.Mesh, e.g. jax.make_mesh((4,), "
            f"('particles',)), or None, got {type(mesh).__name__}"
        )
    if mesh_axes is None:
        axes = tuple(mesh.axis_names)
    else:
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown or not axes:
            raise ValueError(
                f"mesh_axes must name axes of the mesh {tuple(mesh.axis_names)}, got "
                f"{mesh_axes!r}"
            )
    num_devices = int(np.prod([mesh.shape[a] for a in axes]))
    if num_particles % num_devices:
        raise ValueError(
            f"num_particles must be a multiple of the {num_devices} devices on mesh "
            f"axes {axes} to shard the particle axis, got {num_particles}"
        )
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        # Auto axes: the compiler propagates the particle layout through the user's
        # step (explicit axes would make every gather in it name its out_sharding).
        mesh = jax.sharding.Mesh(
            mesh.devices,
            mesh.axis_names,
            axis_types=(axis_type.Auto,) * len(mesh.axis_names),
        )
    replicated = jax.sharding.NamedSharding(mesh, P())
    split = jax.sharding.NamedSharding(mesh, P(axes))

    def shard(tree: PyTree) -> PyTree:
        def leaf(x):
            even = x.ndim > 0 and x.shape[0] % num_devices == 0
            return jax.lax.with_sharding_constraint(x, split if even else replicated)

        return jax.tree.map(leaf, tree)

    def replicate(tree: PyTree) -> PyTree:
        return jax.lax.with_sharding_constraint(tree, replicated)

    return Placement(shard, replicate, (mesh, axes))
