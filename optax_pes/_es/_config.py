"""The structural configuration every estimator shares, validated once."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from optax_pes._checks import as_key, check_int, describe, is_concrete, warn
from optax_pes._es._system import UnrolledSystem
from optax_pes._placement import Placement, placement


class EstimatorConfig(NamedTuple):
    """What an estimator is, fixed at its factory: validated by `configure`.

    Particles form `num_groups` groups whose members share inner-step keys and an
    episode clock. Member `m` of a group runs at `theta + signs[m] * eps`: `(+1, -1)`
    for an antithetic pair, `(+1,)` without, and truncated ES adds an unperturbed
    centre (`0`). Particle `i` is member `i // num_groups` of group `i % num_groups`
    (member-major).
    """

    name: str  # the factory's name, for error messages
    system: UnrolledSystem  # what is differentiated
    truncation_length: int  # K: inner steps per window (update)
    num_particles: int  # N: perturbed particles (truncated ES's centres not counted)
    signs: tuple[float, ...]  # per member of a group
    num_groups: int  # groups of particles sharing keys and an episode clock
    offsets: np.ndarray  # (groups,) int32: steps already done by a first episode
    sync: bool  # horizon % K == 0: episodes only end on window boundaries
    placement: Placement  # where the particle axis lives
    key: PRNGKeyArray  # the initial PRNG key
    sigma: Any  # the perturbation's standard deviation (None for TBPTT)

    @property
    def members(self) -> int:
        """Particles per group, the unperturbed centre included."""
        return len(self.signs)

    @property
    def particles_per_group(self) -> int:
        """Perturbed particles per group (what the diagnostics count)."""
        return self.num_particles // self.num_groups


def check_system(system: Any) -> UnrolledSystem:
    if not isinstance(system, UnrolledSystem):
        raise TypeError(
            "system must be an optax_pes.UnrolledSystem(init, step, horizon), "
            f"got {type(system).__name__}"
        )
    return system


def check_sigma(sigma: Any) -> None:
    """Concrete values (numbers, numpy and jax arrays) are checked now; traced ones
    (`inject_hyperparams` inside a trace) at update time."""
    number = isinstance(sigma, (int, float, np.floating, np.integer)) and not (
        isinstance(sigma, bool)
    )
    array = isinstance(sigma, (jax.Array, np.ndarray)) and np.shape(sigma) == ()
    # (jnp's test: bfloat16 is a float to JAX but not an np.number.)
    if not (number or array) or (array and not jnp.issubdtype(sigma.dtype, jnp.number)):
        raise TypeError(f"sigma must be a positive float scalar, got {sigma!r}")
    if is_concrete(sigma):
        value = float(np.asarray(sigma))
        if not np.isfinite(value) or value <= 0:
            raise ValueError(
                f"sigma must be a positive finite standard deviation, got {value}"
            )


def check_not_empty(flat: jax.Array, params: PyTree) -> None:
    """An ES estimate needs at least one coordinate of theta to perturb."""
    if flat.size == 0:
        raise ValueError(
            "params must hold at least one number to estimate a gradient for, got "
            f"{describe(params)}"
        )


def check_sigma_for(sigma: Any, flat: jax.Array, params: PyTree) -> None:
    """At `init`, once theta's dtype and values are known: a concrete `sigma` that
    is not a normal number in the dtype of the flattened theta `flat` (where noise
    and scores are computed) is an error (every score `eps / sigma^2` would overflow
    and every window be dropped); one below the spacing of the largest coordinate of
    a leaf of `params`, in that leaf's own dtype, is warned about (`theta + eps`
    rounds to `theta` there, so that coordinate's estimate is zero with antithetic
    pairs, noise without)."""
    if sigma is None or not is_concrete(sigma):
        return
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        return  # refused as params by the system check, with its own message
    finfo = jnp.finfo(flat.dtype)
    value = float(np.asarray(sigma))
    if value < float(finfo.tiny):
        raise ValueError(
            f"sigma must be a normal number in theta's dtype {flat.dtype} "
            f"(>= {float(finfo.tiny):.3g}), got {value:.3g}: its scores would overflow"
        )
    coarsest = None  # (spacing, largest |coordinate|, dtype, path) of the worst leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        floating = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        if not (floating and is_concrete(leaf)) or np.size(leaf) == 0:
            continue  # (non-float leaves are refused by the params check)
        # (NumPy: under a trace, jnp would stage even a concrete theta's max.)
        largest = float(np.max(np.abs(np.asarray(leaf))))  # (in its own dtype)
        dtype = jnp.result_type(leaf)
        spacing = largest * float(jnp.finfo(dtype).eps)
        if coarsest is None or spacing > coarsest[0]:
            coarsest = (spacing, largest, dtype, jax.tree_util.keystr(path))
    if coarsest is None or value >= coarsest[0]:
        return
    spacing, largest, dtype, path = coarsest
    where = f"theta{path}'s" if path else "theta's"
    warn(
        f"sigma={value:.3g} is below the {dtype} spacing of {where} largest "
        f"coordinate (|theta| = {largest:.3g}, spacing {spacing:.3g}): "
        "theta + eps rounds to theta there, and its estimate is zero (antithetic) "
        "or noise. Use a larger sigma or rescale theta"
        + (", or float64 params." if jnp.finfo(dtype).bits < 64 else ".")
    )


def check_num_particles(num_particles: Any, antithetic: bool) -> int:
    num_particles = check_int(num_particles, "num_particles", 2 if antithetic else 1)
    if antithetic and num_particles % 2:
        raise ValueError(
            "num_particles must be even for antithetic sampling, "
            f"got {num_particles} (or pass antithetic=False)"
        )
    return num_particles


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


def _check_not_injected(name: str, structural: dict[str, Any]) -> None:
    """Structural arguments given as numeric jax arrays: the mark of
    `optax.inject_hyperparams` without `static_args`."""
    arrays = [
        k
        for k, v in structural.items()
        if isinstance(v, jax.Array)
        and not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
        and not (k == "key" and v.shape == (2,))
    ]
    if arrays:
        names = tuple(structural)
        raise TypeError(
            f"{name}: {', '.join(arrays)} must be Python values, got jax arrays; "
            "under optax.inject_hyperparams pass the structural arguments as "
            f"static_args={names} (only sigma may be a hyperparameter)"
        )


def configure(
    name: str,
    *,
    system: Any,
    truncation_length: Any,
    num_particles: Any,
    sigma: Any,
    key: Any,
    stagger: bool,
    antithetic: bool,
    mesh: Any,
    mesh_axes: str | Sequence[str] | None,
    centre: bool = False,
) -> EstimatorConfig:
    """Validate a factory's arguments (each error names its argument) and derive
    the group layout. A factory's first line passes its own arguments and fixes the
    others: `configure("full_es", truncation_length=T, stagger=False, **locals())`.
    `sigma=None` means no perturbation (TBPTT); `centre` adds an unperturbed member to
    every group (truncated ES)."""
    structural = dict(
        system=system,
        num_particles=num_particles,
        truncation_length=truncation_length,
        key=key,
        stagger=stagger,
        antithetic=antithetic,
        mesh=mesh,
        mesh_axes=mesh_axes,
    )
    _check_not_injected(name, structural)
    system = check_system(system)
    horizon = system.horizon
    truncation_length = check_int(truncation_length, "truncation_length", 1, horizon)
    num_particles = check_num_particles(num_particles, antithetic)
    if sigma is not None:
        check_sigma(sigma)
    where = placement(mesh, mesh_axes, num_particles)
    key = as_key(key, "key")
    perturbed = (1.0, -1.0) if antithetic else (1.0,)
    num_groups = num_particles // len(perturbed)
    return EstimatorConfig(
        name=name,
        system=system,
        truncation_length=truncation_length,
        num_particles=num_particles,
        signs=perturbed + ((0.0,) if centre else ()),
        num_groups=num_groups,
        offsets=stagger_offsets(num_groups, horizon, truncation_length, stagger),
        sync=horizon % truncation_length == 0,
        placement=where,
        key=key,
        sigma=sigma,
    )
