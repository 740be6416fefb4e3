"""The one window/particle engine every estimator runs: K inner steps of all particles.

Particles are laid out member-major: particle `i` belongs to group `i % num_groups`
and is member `i // num_groups` of it (`+eps` then `-eps` for an antithetic pair, then,
for truncated ES, the unperturbed centre). The members of a group share their inner-step
and init keys (common random numbers) and their episode clock.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from optax_pes._es._config import EstimatorConfig
from optax_pes._tree import at_least_float32, tree_where


def tile_groups(tree: PyTree, members: int) -> PyTree:
    """Repeat a per-group pytree (leading axis `G`) to per-particle (`members * G`)."""
    if members == 1:
        return tree
    return jax.tree.map(lambda x: jnp.concatenate([x] * members, axis=0), tree)


class WindowResult(NamedTuple):
    """What one window leaves behind."""

    inner_state: PyTree  # leading axis particles
    remaining: Int[Array, " groups"]  # steps left in each group's episode
    needs_init: Bool[Array, " groups"]  # episode ended exactly at the window's end
    loss_before: Float[Array, " particles"]  # summed losses before a mid-window reset
    loss_after: Float[Array, " particles"]  # summed losses after it (0 without one)
    reset_inside: Bool[Array, " groups"]  # a new episode started inside the window


def run_window(
    config: EstimatorConfig,
    thetas: PyTree,
    inner_state: PyTree,
    remaining: Int[Array, " groups"],
    needs_init: Bool[Array, " groups"],
    key: PRNGKeyArray,
    *,
    loss_dtype: jnp.dtype,
    thetas_after_reset: PyTree | None = None,
) -> WindowResult:
    """Advance every particle by `config.truncation_length` inner steps.

    Groups flagged `needs_init` start a fresh episode at the window's first step, from
    `init(theta_i, key)` at their perturbed `theta_i`. A group whose episode ends before
    the window's last step is re-initialised right there (at `thetas_after_reset` when
    given, e.g. a new episode's noise, else at `thetas`), and its later losses are
    summed separately in `loss_after`, so an estimator credits each side of the reset
    to its own episode's noise. An episode ending on the window's last step is flagged
    in `needs_init` instead, so that the next window initialises it at its own theta.

    Under `config.sync` (`T % K == 0`) resets can only happen on window boundaries
    (the estimators stagger in multiples of K then), and the scan carries no reset
    logic at all.

    `config.placement` lays the particle axis (thetas and inner states) out over
    devices and gathers the per-particle losses back; without a mesh, everything stays
    where it is.
    """
    shard, replicate = config.placement.shard, config.placement.replicate
    system, members = config.system, config.members
    thetas = shard(thetas)
    if thetas_after_reset is not None:
        thetas_after_reset = shard(thetas_after_reset)
    horizon = system.horizon
    num_steps = config.truncation_length
    num_groups = remaining.shape[0]
    init_key, reset_key, step_key = jax.random.split(key, 3)
    step_keys = jax.random.split(step_key, (num_steps, num_groups))
    vmapped_init = jax.vmap(system.init)
    vmapped_step = jax.vmap(system.step)

    def fresh_states(k: PRNGKeyArray, ths: PyTree) -> PyTree:
        keys = shard(tile_groups(jax.random.split(k, num_groups), members))
        return vmapped_init(ths, keys)

    start = tile_groups(needs_init, members)
    inner_state = shard(inner_state)
    inner_state = jax.lax.cond(
        jnp.any(needs_init),
        lambda: shard(tree_where(start, fresh_states(init_key, thetas), inner_state)),
        lambda: inner_state,
    )
    # Summed in at least float32: a window's total is K times a step's loss, and a
    # bfloat16 total of ~200 has a resolution of 1, which swallowed the differences
    # between particles that the estimate is made of.
    loss_dtype = at_least_float32(loss_dtype)
    zeros = jnp.zeros(start.shape, loss_dtype)
    after = jnp.zeros(num_groups, bool)

    if config.sync:

        def body(carry, keys):
            state, loss_sum = carry
            keys = shard(tile_groups(keys, members))
            state, loss = vmapped_step(thetas, state, keys)
            return (shard(state), loss_sum + loss.astype(loss_dtype)), None

        (inner_state, loss_before), _ = jax.lax.scan(
            body, (inner_state, zeros), step_keys
        )
        loss_after = zeros
        remaining = remaining - num_steps
    else:
        ths_after = thetas if thetas_after_reset is None else thetas_after_reset
        will_reset = remaining < num_steps  # the episode ends inside the window
        reset_states = jax.lax.cond(
            jnp.any(will_reset),
            lambda: shard(fresh_states(reset_key, ths_after)),
            lambda: inner_state,
        )

        def body(carry, xs):
            state, rem, after, loss_before, loss_after = carry
            index, keys = xs
            after_p = tile_groups(after, members)
            if thetas_after_reset is None:
                ths = thetas
            else:
                ths = jax.lax.cond(
                    jnp.any(after),
                    lambda: tree_where(after_p, thetas_after_reset, thetas),
                    lambda: thetas,
                )
            state, loss = vmapped_step(ths, state, shard(tile_groups(keys, members)))
            loss = loss.astype(loss_dtype)
            loss_before = loss_before + jnp.where(after_p, 0, loss)
            loss_after = loss_after + jnp.where(after_p, loss, 0)
            rem = rem - 1
            done = (rem == 0) & (index < num_steps - 1)
            done_p = tile_groups(done, members)
            state = shard(state)
            state = jax.lax.cond(
                jnp.any(done),
                lambda: shard(tree_where(done_p, reset_states, state)),
                lambda: state,
            )
            rem = jnp.where(done, horizon, rem)
            return (state, rem, after | done, loss_before, loss_after), None

        carry = (inner_state, remaining, after, zeros, zeros)
        xs = (jnp.arange(num_steps), step_keys)
        carry, _ = jax.lax.scan(body, carry, xs)
        inner_state, remaining, after, loss_before, loss_after = carry

    loss_before, loss_after = replicate((loss_before, loss_after))
    ended = remaining == 0
    remaining = jnp.where(ended, horizon, remaining)
    return WindowResult(inner_state, remaining, ended, loss_before, loss_after, after)
