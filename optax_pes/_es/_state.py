"""The state every estimator transformation keeps, and its diagnostics."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree

from optax_pes._es._config import EstimatorConfig
from optax_pes._es._system import check_against_system, empty_inner_state
from optax_pes._es._window import WindowResult, tile_groups
from optax_pes._tree import global_norm_f32, tree_where


class Diagnostics(NamedTuple):
    """What the last update saw, for logging. All scalars; dtypes never change."""

    mean_loss: jax.Array  # shape=(), float32: mean per-step loss of the valid particles
    estimate_norm: jax.Array  # shape=(), float32: global l2 norm of the last estimate
    num_resets: jax.Array  # shape=(), int32: particles that started an episode
    num_nonfinite: jax.Array  # shape=(), int32: particles left out (non-finite loss)
    episode_loss: jax.Array  # shape=(), float32: mean total loss of the last episodes
    #   to finish (in this window or the last one where any did; 0 before any)
    num_episodes: jax.Array  # shape=(), int32: particles whose episode finished here


class NoNoise(NamedTuple):
    """The noise state of estimators that keep none between windows (truncated ES,
    TBPTT)."""


class EpisodeTotals(NamedTuple):
    """Each particle's running total of its current episode's losses."""

    loss: jax.Array  # shape=(members * groups,), float32: losses summed so far
    whole: jax.Array  # shape=(groups,), bool: the episode is scored from its start
    #   (False for a staggered group's burned-in first episode, until its first reset)


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
    noise: PyTree  # the estimator's noise state: PESNoise, NRESNoise or NoNoise
    episodes: EpisodeTotals  # running episode totals, for `diagnostics.episode_loss`
    diagnostics: Diagnostics  # what the last update saw, for logging


class _ParamsDependent:
    """Stands for a subtree whose structure depends on params that are not given."""

    def __repr__(self) -> str:
        return "<depends on params>"


def start_state(config: EstimatorConfig, **fields) -> EstimatorState:
    """The state before the first update, around its params-dependent `fields`."""
    staggered = config.offsets > 0
    zero = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.int32)
    return EstimatorState(
        count=count,
        rng_key=config.key,
        remaining=jnp.asarray(config.system.horizon - config.offsets, jnp.int32),
        needs_init=jnp.asarray(~staggered),
        episodes=EpisodeTotals(
            jnp.zeros(config.members * config.num_groups, jnp.float32),
            jnp.asarray(~staggered),
        ),
        diagnostics=Diagnostics(zero, zero, count, count, zero, count),
        **fields,
    )


def placeholder_state(config: EstimatorConfig) -> EstimatorState:
    """The state `init` gives optax's params placeholder: exact where the structure
    does not depend on params, one opaque leaf for the inner states and the noise
    (`tree_map_params` then hands those subtrees to `transform_non_params` whole)."""
    return start_state(config, inner_state=_ParamsDependent(), noise=_ParamsDependent())


def burn_in(config: EstimatorConfig, params: PyTree) -> PyTree:
    """Each group's inner state run forward, unscored and unperturbed at `params`, to
    its stagger offset: `(groups,)`-leading states at distinct phases.

    Costs `max(offsets)` (at most `T - 1`) vmapped inner steps of the `num_groups`
    groups, once, at `init`. The keys come from the factory's key folded with a
    constant, so the estimator's own key sequence is the same with or without it.
    """
    system, offsets = config.system, jnp.asarray(config.offsets)
    init_key, steps_key = jax.random.split(jax.random.fold_in(config.key, 0x5EED))
    groups = config.num_groups
    states = jax.vmap(system.init, in_axes=(None, 0))(
        params, jax.random.split(init_key, groups)
    )
    step = jax.vmap(system.step, in_axes=(None, 0, 0))

    def body(states, xs):
        t, keys = xs
        advanced, _ = step(params, states, keys)
        return tree_where(t < offsets, advanced, states), None

    num_steps = int(config.offsets.max())
    keys = jax.random.split(steps_key, (num_steps, groups))
    states, _ = jax.lax.scan(body, states, (jnp.arange(num_steps), keys))
    return jax.lax.stop_gradient(states)


def initial_state(
    config: EstimatorConfig, params: PyTree, *, num_states: int, noise: PyTree
) -> EstimatorState:
    """The state before the first update. Checks `params` against the system first.

    Without staggering every group starts a fresh episode at the first update (the
    `num_states` inner states are zeros until then). With it, a group whose stagger
    offset is positive starts at that phase of an episode: its state is burned in
    (`burn_in`) and its first episode has `T - offset` steps left; `num_states` is
    `num_groups` (truncated ES's shared states) or a multiple of it (every member of a
    group starts from its group's state).
    """
    system = config.system
    check_against_system(system, params)
    if (config.offsets > 0).any():
        members = num_states // config.num_groups
        inner_state = tile_groups(burn_in(config, params), members)
    else:
        inner_state = empty_inner_state(system, params, num_states)
    # Every leaf placed as the updates return it (the particle axis split, the rest
    # replicated over the mesh), so that a jitted update compiles once.
    return config.placement.shard(
        start_state(config, inner_state=inner_state, noise=noise)
    )


def window_validity(
    config: EstimatorConfig, result: WindowResult
) -> Bool[Array, " groups"]:
    """Groups whose every member's window loss is finite."""
    total = result.loss_before + result.loss_after
    total = total.reshape(config.members, config.num_groups)
    return jnp.all(jnp.isfinite(total), axis=0)


def next_state(
    config: EstimatorConfig,
    state: EstimatorState,
    rng_key: jax.Array,
    result: WindowResult,
    valid: Bool[Array, " groups"],
    estimate: PyTree,
    *,
    inner_state: PyTree,
    noise: PyTree,
) -> EstimatorState:
    """The state after a window: invalid groups restart next window, episode totals
    and diagnostics recorded."""
    members, per_group = config.members, config.particles_per_group
    loss_before = result.loss_before.astype(jnp.float32)
    total = loss_before + result.loss_after.astype(jnp.float32)
    # Episode totals: an episode starting this window starts from 0; one that ends
    # inside it (or at its end) is complete with the losses before the reset.
    started = tile_groups(state.needs_init, members)
    so_far = jnp.where(started, 0, state.episodes.loss) + loss_before
    whole = state.episodes.whole | state.needs_init
    finished = (result.reset_inside | result.needs_init) & valid & whole
    per_member = lambda x: x.reshape(members, -1).sum(axis=0)  # noqa: E731
    # Every count and sum the diagnostics need, per group, reduced in one pass (one
    # kernel instead of one or two per sum: on a tiny inner problem each costs as
    # much as the sum itself). Counts are exact in float32 below 2^24 particles.
    sums = jnp.stack(
        [
            valid.astype(jnp.float32),
            jnp.where(valid, per_member(total), 0),
            finished.astype(jnp.float32),
            jnp.where(finished, per_member(so_far), 0),
            (state.needs_init | result.reset_inside).astype(jnp.float32),
        ]
    ).sum(axis=1)
    num_valid, valid_sum, num_finished_groups, finished_sum, num_started = sums
    denom = jnp.maximum(members * num_valid, 1) * config.truncation_length
    num_finished = members * num_finished_groups
    after_reset = tile_groups(result.reset_inside, members)
    episodes = EpisodeTotals(
        loss=jnp.where(
            tile_groups(valid, members),
            jnp.where(after_reset, result.loss_after.astype(jnp.float32), so_far),
            0,
        ),
        whole=(whole | result.reset_inside) & valid,
    )
    count = lambda x: (per_group * x).astype(jnp.int32)  # noqa: E731
    diagnostics = Diagnostics(
        mean_loss=valid_sum / denom,
        estimate_norm=global_norm_f32(estimate),
        num_resets=count(num_started),
        num_nonfinite=count(config.num_groups - num_valid),
        episode_loss=jnp.where(
            num_finished > 0,
            finished_sum / jnp.maximum(num_finished, 1),
            state.diagnostics.episode_loss,
        ),
        num_episodes=count(num_finished_groups),
    )
    horizon = config.system.horizon
    return EstimatorState(
        count=state.count + 1,
        rng_key=rng_key,
        inner_state=inner_state,
        remaining=jnp.where(valid, result.remaining, horizon).astype(jnp.int32),
        needs_init=result.needs_init | ~valid,
        noise=noise,
        episodes=episodes,
        diagnostics=diagnostics,
    )
