"""State, validation and the estimate assembly shared by every estimator."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from optax_pes._system import UnrolledSystem
from optax_pes._window import ON_ONE_DEVICE, Placement as Placement, WindowResult


class Diagnostics(NamedTuple):
    """What the last update saw, for logging. All scalars; dtypes never change."""

    mean_loss: jax.Array  # shape=(), float32: mean per-step loss of the valid particles
    estimate_norm: jax.Array  # shape=(), float32: global l2 norm of the last estimate
    num_resets: jax.Array  # shape=(), int32: groups that started an episode
    num_nonfinite: jax.Array  # shape=(), int32: groups excluded for a non-finite loss


class EstimatorState(NamedTuple):
    """State of every estimator transformation (`pes`, `nres`, `truncated_es`, ...).

    Particles form groups (an antithetic pair, or a single particle) sharing inner-step
    keys and an episode clock; `inner_state` has a leading particle axis laid out
    member-major (particle `i` is in group `i % num_groups`).
    """

    count: jax.Array  # shape=(), int32: updates (windows) so far
    rng_key: jax.Array  # typed PRNG key, split at every update
    inner_state: PyTree  # the system's state, leading axis = particles
    remaining: jax.Array  # shape=(groups,), int32: steps left in each group's episode
    needs_init: jax.Array  # shape=(groups,), bool: group starts an episode next window
    noise: PyTree  # estimator-specific: PES accumulated scores, NRES episode noise
    diagnostics: Diagnostics  # what the last update saw, for logging


def initial_state(
    system: UnrolledSystem,
    params: PyTree,
    key: PRNGKeyArray,
    *,
    num_states: int,
    offsets: np.ndarray,
    noise: PyTree,
    placement: "Placement",
) -> "EstimatorState":
    """Every group starts a fresh episode at the first update; `num_states` inner
    states (zeros until then, laid out by `placement`), the first episodes shortened
    by `offsets`. Checks `params` against the system first."""
    check_against_system(system, params)
    return EstimatorState(
        count=jnp.zeros((), jnp.int32),
        rng_key=key,
        inner_state=placement.shard(empty_inner_state(system, params, num_states)),
        remaining=jnp.asarray(system.horizon - offsets, jnp.int32),
        needs_init=jnp.ones(len(offsets), bool),
        noise=noise,
        diagnostics=zero_diagnostics(),
    )


def next_state(
    state: "EstimatorState",
    rng_key: PRNGKeyArray,
    result: WindowResult,
    valid: Bool[Array, " groups"],
    estimate: PyTree,
    *,
    inner_state: PyTree,
    noise: PyTree,
    num_members: int,
    truncation_length: int,
    horizon: int,
) -> "EstimatorState":
    """The state after a window: invalid groups restart, diagnostics recorded."""
    remaining, needs_init = next_episode_flags(result, valid, horizon)
    return EstimatorState(
        count=state.count + 1,
        rng_key=rng_key,
        inner_state=inner_state,
        remaining=remaining,
        needs_init=needs_init,
        noise=noise,
        diagnostics=diagnostics(
            result, valid, estimate, num_members, truncation_length
        ),
    )


def zero_diagnostics() -> Diagnostics:
    zero = jnp.zeros((), jnp.float32)
    return Diagnostics(zero, zero, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------ validation ----


def check_system(system: Any) -> None:
    if not isinstance(system, UnrolledSystem):
        raise TypeError(
            "system must be an optax_pes.UnrolledSystem(init, step, horizon), "
            f"got {type(system).__name__}"
        )


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_num_particles(num_particles: Any, antithetic: bool) -> int:
    num_particles = check_int(num_particles, "num_particles", 2 if antithetic else 1)
    if antithetic and num_particles % 2:
        raise ValueError(
            "num_particles must be even for antithetic sampling, "
            f"got {num_particles} (or pass antithetic=False)"
        )
    return num_particles


def check_sigma(sigma: Any) -> None:
    """Python numbers are checked now; arrays (inject_hyperparams) at update time."""
    if isinstance(sigma, (int, float, np.floating, np.integer)) and not isinstance(
        sigma, bool
    ):
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(
                f"sigma must be a positive finite standard deviation, got {sigma}"
            )
    elif not isinstance(sigma, (jax.Array, np.ndarray)) or np.shape(sigma) != ():
        raise TypeError(f"sigma must be a positive float scalar, got {sigma!r}")


def checked_sigma(sigma: Any) -> Array:
    """sigma as an array, with a run-time error when a traced value is not positive."""
    sigma = jnp.asarray(sigma)
    if isinstance(sigma, jax.core.Tracer):
        sigma = eqx.error_if(
            sigma, ~(sigma > 0) | ~jnp.isfinite(sigma), "sigma must be positive"
        )
    return sigma


def check_truncation_length(truncation_length: Any, horizon: int) -> int:
    return check_int(truncation_length, "truncation_length", 1, horizon)


def require_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(
            f"{name}.update needs params (the current theta): call "
            "tx.update(updates, state, params)"
        )


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda x: f"{jnp.dtype(x.dtype)}{list(x.shape)}", tree))


def check_params(params: PyTree, name: str = "params") -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name} must be a non-empty pytree of float arrays")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must be a pytree of floating-point arrays; the leaf at "
                f"{jax.tree_util.keystr(path) or 'the root'} is "
                f"{type(leaf).__name__} with dtype {dtype}"
            )


def check_against_system(system: UnrolledSystem, params: PyTree) -> jnp.dtype:
    """Trace init and step on `params` (no FLOPs); return the loss dtype.

    Raises a `ValueError` naming what is wrong: `theta` not accepted by the system,
    `step` changing the state's structure, or a loss that is not a float scalar.
    """
    check_params(params)
    key = jax.random.key(0)
    try:
        state = jax.eval_shape(system.init, params, key)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            "system.init(theta, key) failed on params "
            f"{_describe(params)}; does theta match the system? ({e})"
        ) from e
    try:
        new_state, loss = jax.eval_shape(system.step, params, state, key)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            "system.step(theta, inner_state, key) failed on params "
            f"{_describe(params)} and the state from init {_describe(state)}; "
            f"does theta match the system? ({e})"
        ) from e
    same = jax.tree.structure(new_state) == jax.tree.structure(state) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
    )
    if not same:
        raise ValueError(
            "system.step must return an inner state with the structure, shapes and "
            f"dtypes of init's: init gave {_describe(state)}, step gave "
            f"{_describe(new_state)}"
        )
    if not hasattr(loss, "shape") or loss.shape != ():
        raise ValueError(
            "system.step must return (inner_state, loss) with a scalar loss, got a "
            f"loss of shape {getattr(loss, 'shape', type(loss).__name__)}"
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            f"system.step must return a float loss, got dtype {loss.dtype}; cast "
            "non-differentiable metrics (accuracy, counts) to float"
        )
    return loss.dtype


def empty_inner_state(
    system: UnrolledSystem, params: PyTree, num_particles: int
) -> PyTree:
    """Zeros shaped like `num_particles` inner states (every group starts fresh)."""
    shapes = jax.eval_shape(system.init, params, jax.random.key(0))
    return jax.tree.map(
        lambda s: jnp.zeros((num_particles,) + s.shape, s.dtype), shapes
    )


def stagger_offsets(
    num_groups: int, horizon: int, truncation_length: int, stagger: bool
) -> np.ndarray:
    """Steps already 'done' by each group's first episode, spread over the episode.

    With `T % K == 0` offsets are multiples of K (episodes keep ending on window
    boundaries, the cheap path); otherwise they are spread over all T steps.
    """
    groups = np.arange(num_groups)
    if not stagger:
        return np.zeros(num_groups, np.int32)
    if horizon % truncation_length == 0:
        windows = horizon // truncation_length
        return (truncation_length * (groups * windows // num_groups)).astype(np.int32)
    return (groups * horizon // num_groups).astype(np.int32)


# ------------------------------------------------------------------ devices --------


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

    return Placement(shard, replicate)


# ------------------------------------------------------------------ noise ----------


def flatten(params: PyTree) -> tuple[Float[Array, " dim"], Any]:
    """params as one flat vector (the noise, scores and estimate live flat: one
    random draw and one product per window, however many leaves theta has)."""
    return ravel_pytree(params)


def perturb(
    flat: Float[Array, " dim"],
    noise: Float[Array, "groups dim"],
    signs: Sequence[float],
    scale: Array,
) -> Float[Array, "particles dim"]:
    """Per-particle flat thetas `flat + sign * scale * noise`, member-major.

    `scale` is a scalar or a per-group vector.
    """
    scale = jnp.asarray(scale, noise.dtype)
    eps = noise * scale.reshape(scale.shape + (1,) * (noise.ndim - scale.ndim))
    parts = [
        flat[None] + sign * eps if sign else jnp.broadcast_to(flat, eps.shape)
        for sign in signs
    ]
    return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


class WindowNoise(NamedTuple):
    """A window's fresh perturbations, for the estimators that draw one per window."""

    score: Array  # (groups, dim): eps / sigma^2 = z / sigma of the `+` member
    thetas: PyTree  # per-particle perturbed theta, member-major
    unravel: Any  # flat vector -> params pytree


def window_noise(
    key: PRNGKeyArray,
    params: PyTree,
    sigma: Any,
    num_groups: int,
    signs: Sequence[float],
) -> WindowNoise:
    """Draw z ~ N(0, I) per group; theta_i = theta + sign_i sigma z."""
    scale = checked_sigma(sigma)
    flat, unravel = flatten(params)
    normal = jax.random.normal(key, (num_groups, flat.size), flat.dtype)
    thetas = unflatten_particles(unravel, perturb(flat, normal, signs, scale))
    return WindowNoise(normal / scale.astype(flat.dtype), thetas, unravel)


def unflatten_particles(unravel: Any, thetas: Float[Array, "particles dim"]) -> PyTree:
    return jax.vmap(unravel)(thetas)


# ------------------------------------------------------------------ estimate -------


def group_losses(
    losses: Float[Array, " particles"], signs: Sequence[float], num_groups: int
) -> Float[Array, " groups"]:
    """sum over the members of a group of sign * loss."""
    per_member = losses.reshape(len(signs), num_groups)
    return sum(s * per_member[m] for m, s in enumerate(signs) if s)


def window_validity(
    result: WindowResult, num_members: int, num_groups: int
) -> Bool[Array, " groups"]:
    total = (result.loss_before + result.loss_after).reshape(num_members, num_groups)
    return jnp.all(jnp.isfinite(total), axis=0)


def score_estimate(
    result: WindowResult,
    valid: Bool[Array, " groups"],
    signs: Sequence[float],
    credit_before: Float[Array, "groups dim"],
    credit_after: Float[Array, "groups dim"] | None,
) -> Float[Array, " dim"]:
    """`sum_i (L_before_i c_before_i + L_after_i c_after_i) / n_valid`.

    `credit_*` are per-group scores (the `+` member's; a member with sign `s` uses
    `s * score`); `credit_after` may be None when no episode starts mid-window.
    Invalid groups contribute nothing.
    """
    num_groups = valid.shape[0]
    estimating = sum(1 for s in signs if s)
    count = jnp.maximum(estimating * jnp.sum(valid), 1).astype(credit_before.dtype)

    def credit(losses, scores):
        weights = jnp.where(valid, group_losses(losses, signs, num_groups), 0)
        return weights.astype(scores.dtype) @ scores

    out = credit(result.loss_before, credit_before)
    if credit_after is not None:
        out = out + credit(result.loss_after, credit_after)
    return out / count


def add_estimate(updates: PyTree, estimate: PyTree) -> PyTree:
    return jax.tree.map(
        lambda u, e: (u + e).astype(jnp.result_type(u)), updates, estimate
    )


def diagnostics(
    result: WindowResult,
    valid: Bool[Array, " groups"],
    estimate: PyTree,
    num_members: int,
    truncation_length: int,
) -> Diagnostics:
    num_groups = valid.shape[0]
    total = (result.loss_before + result.loss_after).reshape(num_members, num_groups)
    valid_total = jnp.where(valid, total, 0).astype(jnp.float32)
    denom = jnp.maximum(num_members * jnp.sum(valid), 1) * truncation_length
    denom = denom.astype(jnp.float32)
    sq = sum(
        jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(estimate)
    )
    return Diagnostics(
        mean_loss=jnp.sum(valid_total) / denom,
        estimate_norm=jnp.sqrt(sq),
        num_resets=result.num_started,
        num_nonfinite=jnp.sum(~valid, dtype=jnp.int32),
    )


def next_episode_flags(
    result: WindowResult, valid: Bool[Array, " groups"], horizon: int
) -> tuple[Array, Array]:
    """(remaining, needs_init) after the window: invalid groups restart next window."""
    needs_init = result.needs_init | ~valid
    remaining = jnp.where(valid, result.remaining, horizon).astype(jnp.int32)
    return remaining, needs_init


def split_key(
    state_key: PRNGKeyArray,
) -> tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray]:
    new_key, noise_key, window_key = jax.random.split(state_key, 3)
    return new_key, noise_key, window_key
