r"""The one estimator factory: every ES estimator is a small noise policy of it.

One update of any ES-family estimator is

1. split the state's key; draw the window's perturbations (`policy.perturb`);
2. run every particle through the window (`_window.run_window`);
3. drop groups with a non-finite loss; credit each side of a mid-window reset to its
   own scores: $\hat g = \sum_i (L_i^{\text{before}} c_i^{\text{before}} +
   L_i^{\text{after}} c_i^{\text{after}}) / n$;
4. the next noise state (`policy.next_noise`) and the next `EstimatorState`.

A policy says how thetas are perturbed and which scores a window's losses are
credited to (PES: the accumulated ones; NRES: the episode's one; truncated ES: the
window's), and what noise it carries to the next window.
"""

import abc
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from optax_pes._checks import (
    check_finite_params,
    is_concrete,
    is_params_placeholder,
    require_params,
    state_checker,
)
from optax_pes._compile import (
    LRU,
    captures_tracer,
    static_key,
    warn_if_few_mappings_left,
)
from optax_pes._es._config import EstimatorConfig, check_not_empty, check_sigma_for
from optax_pes._es._state import (
    EstimatorState,
    initial_state,
    next_state,
    placeholder_state,
    window_validity,
)
from optax_pes._es._system import check_against_system
from optax_pes._es._window import WindowResult, run_window
from optax_pes._tree import add_to_updates, at_least_float32


class Perturbation(NamedTuple):
    """A window's perturbed thetas and the scores its losses are credited to."""

    thetas: Float[Array, "particles dim"]  # flat perturbed thetas, member-major
    thetas_after_reset: Float[Array, "particles dim"] | None  # a new episode's
    credit_before: Float[Array, "groups dim"]  # scores of losses before a reset
    credit_after: Float[Array, "groups dim"]  # scores of losses after it
    aux: Any  # what the policy's next_noise needs


class AbstractNoisePolicy(abc.ABC):
    r"""How an ES estimator perturbs theta and credits a window's losses.

    Scores are per group, those of its `+` member: a member with sign `s` is credited
    `s * score`. A score is $\epsilon / \sigma^2$ for a perturbation $\epsilon$.
    """

    @abc.abstractmethod
    def init_noise(self, config: EstimatorConfig, flat: Float[Array, " dim"]) -> Any:
        """The noise state before the first window."""

    @abc.abstractmethod
    def perturb(
        self,
        config: EstimatorConfig,
        noise: Any,
        needs_init: Bool[Array, " groups"],
        flat: Float[Array, " dim"],
        sigma: Array,
        key: PRNGKeyArray,
    ) -> Perturbation:
        """The window's perturbed thetas and the scores to credit."""

    @abc.abstractmethod
    def next_noise(
        self,
        config: EstimatorConfig,
        noise: Any,
        perturbation: Perturbation,
        result: WindowResult,
        valid: Bool[Array, " groups"],
    ) -> Any:
        """The noise state after the window."""

    def num_states(self, config: EstimatorConfig) -> int:
        """Inner states kept between windows (one per particle by default)."""
        return config.num_particles

    def window_states(self, config: EstimatorConfig, inner_state: PyTree) -> PyTree:
        """The kept inner states as the window's per-particle starting states."""
        return inner_state

    def kept_states(self, config: EstimatorConfig, inner_state: PyTree) -> PyTree:
        """The window's final per-particle states as the states kept."""
        return inner_state


def usable_sigma(sigma: Any, dtype: jnp.dtype) -> tuple[Array, Array | None]:
    """`(sigma, ok)`: sigma as an array of theta's dtype, and for a traced sigma
    (`inject_hyperparams` under `jit`) whether it is positive and finite.

    A concrete sigma was checked by the factory (`ok` is None). A traced one that is
    not positive and finite is replaced by 1 so the window runs on finite thetas, and
    the window's estimate is left out (`ok` is False): an error raised from inside
    `jit` would not be readable, and no non-finite value may reach the update.
    """
    if is_concrete(sigma):  # before asarray: under jit, asarray's result is traced
        return jnp.asarray(sigma, dtype), None
    sigma = jnp.asarray(sigma, dtype)
    ok = jnp.isfinite(sigma) & (sigma > 0)
    return jnp.where(ok, sigma, 1), ok


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


def standard_normal(
    config: EstimatorConfig, flat: Float[Array, " dim"], key: PRNGKeyArray
) -> Float[Array, "groups dim"]:
    """One `z ~ N(0, I)` per group, in theta's dtype: drawn in at least float32 and
    rounded (JAX's bfloat16 normals have a mean of -0.011, a bias of every estimate
    made without antithetic pairs)."""
    dtype = at_least_float32(flat.dtype)
    shape = (config.num_groups, flat.size)
    return jax.random.normal(key, shape, dtype).astype(flat.dtype)


def score_estimate(
    config: EstimatorConfig,
    result: WindowResult,
    valid: Bool[Array, " groups"],
    perturbation: Perturbation,
) -> tuple[Float[Array, " dim"], Bool[Array, " groups"]]:
    """`(sum_i (L_before_i c_before_i + L_after_i c_after_i) / n_valid, valid)`.

    Invalid groups contribute nothing. So do groups whose contribution overflows
    (finite but huge losses), and if the sum itself is not finite, no group does:
    those are returned as invalid, to be counted and restarted like non-finite
    losses. Without mid-window resets (`config.sync`) the losses after a reset are
    zero and their product is skipped.
    """
    signs, num_groups = config.signs, config.num_groups
    credits = [(result.loss_before, perturbation.credit_before)]
    if not config.sync:
        credits.append((result.loss_after, perturbation.credit_after))

    def weights(losses):
        per_member = losses.reshape(len(signs), num_groups)
        return sum(s * per_member[m] for m, s in enumerate(signs) if s)

    # Formed and summed in at least float32, then rounded to theta's dtype: in
    # float16 a contribution that overflowed was dropped though the mean fits.
    dtype = at_least_float32(perturbation.thetas.dtype)
    weighted = []
    for losses, scores in credits:
        scores = scores.astype(dtype)
        w = weights(losses).astype(dtype)
        # |w| * max|score| bounds the group's contribution: finite, or left out.
        valid = valid & jnp.isfinite(w * jnp.max(jnp.abs(scores), axis=1))
        weighted.append((w, scores))
    out = sum(jnp.where(valid, w, 0) @ scores for w, scores in weighted)
    count = jnp.maximum(config.particles_per_group * jnp.sum(valid), 1)
    out = (out / count.astype(out.dtype)).astype(perturbation.thetas.dtype)
    finite = jnp.all(jnp.isfinite(out))
    return jnp.where(finite, out, 0), valid & finite


# Compiled eager updates, shared by estimators built with the same structure: under
# `optax.inject_hyperparams` the factory runs again on every update, so a program
# cached per estimator would compile on every call. Bounded: an entry holds its
# system (and whatever data that closes over) alive.
_EAGER_PROGRAMS = LRU()


def _program_key(config: EstimatorConfig, kind: Hashable) -> Hashable | None:
    """What an update's compiled program depends on besides its arguments: all of
    `config` but sigma and the key's value (read by `init` only).

    A system is keyed by its functions and static fields, type-aware (a field of
    `0.0` and one of `-0.0` are different systems). One holding arrays (an
    `eqx.Partial` over data) is known by its identity instead: `inject_hyperparams`
    passes the same object to every factory call, and the cached program holds it,
    so its id is not reused while the entry lives. None when something else cannot
    be hashed.
    """
    if captures_tracer(config.system):  # built inside a trace: not to be kept
        return None
    system = static_key(config.system)
    if system is None:  # (arrays are not hashable)
        system = ("the system object", id(config.system))
    return static_key(
        (
            kind,
            config.name,
            system,
            config.truncation_length,
            config.num_particles,
            config.signs,
            config.num_groups,
            tuple(int(o) for o in config.offsets),
            config.sync,
            config.placement.spec,
            config.key.dtype,
        )
    )


def compiled_when_eager(
    fn: Callable[..., Any], config: EstimatorConfig, kind: Hashable
) -> Callable[..., Any]:
    """`fn(sigma, *args)` as `call(*args)`, run through one `jax.jit` when called on
    concrete values.

    An update called eagerly (outside `jit`, as a plain optax loop may) would
    otherwise re-trace and re-compile its window's `lax.scan` on every call. The
    compiled program is shared by every estimator of the same `kind` and structure
    (`_program_key`). A sigma that is a number is part of the program, as it is
    under the user's own `jit` (the two give the same bits); one that is an array
    (an eager `optax.inject_hyperparams`, which builds the estimator anew, with a
    new sigma, on every update) is its argument. `fn` must not depend on
    `config.sigma` otherwise. Inside a trace (`jit`, `vmap`, `grad`) `fn` is
    inlined as it is.
    """
    sigma = config.sigma
    as_argument = isinstance(sigma, (jax.Array, np.ndarray))
    key = _program_key(config, kind)
    if key is not None and not as_argument:
        key = (key, static_key(sigma))
    own: list[Callable[..., Any]] = []  # the per-estimator program (unhashable key)

    def make() -> Callable[..., Any]:
        warn_if_few_mappings_left()
        if as_argument:
            return jax.jit(fn)
        return jax.jit(functools.partial(fn, sigma))

    def program() -> Callable[..., Any]:
        if key is not None:
            return _EAGER_PROGRAMS.get(key, make)
        if not own:
            own.append(make())
        return own[0]

    def call(*args):
        if all(is_concrete(leaf) for leaf in jax.tree.leaves((sigma, args))):
            return program()(sigma, *args) if as_argument else program()(*args)
        return fn(sigma, *args)

    return call


class Draw(NamedTuple):
    """A window's perturbations, drawn from the state's key (deterministic)."""

    rng_key: PRNGKeyArray  # the next state's key
    window_key: PRNGKeyArray  # the key of the window's inner steps
    unravel: Any  # flat vector -> params pytree
    perturbation: Perturbation
    ok: Array  # the window counts: params finite (under jit) and a traced sigma usable


def draw(
    config: EstimatorConfig,
    policy: AbstractNoisePolicy,
    state: EstimatorState,
    params: PyTree,
) -> Draw:
    """Split the state's key and draw the window's perturbations: the same for the
    same state, so `ask` and `tell` (which calls it again) agree."""
    require_params(params, config.name)
    check_finite_params(params)
    rng_key, noise_key, window_key = jax.random.split(state.rng_key, 3)
    flat, unravel = ravel_pytree(params)
    sigma, sigma_ok = usable_sigma(config.sigma, flat.dtype)
    # Under jit non-finite params cannot raise: the window is left out and counted,
    # even when the losses do not carry the NaN through (an accuracy, a clipped
    # reward).
    ok = jnp.all(jnp.isfinite(flat))
    ok = ok if sigma_ok is None else ok & sigma_ok
    p = policy.perturb(config, state.noise, state.needs_init, flat, sigma, noise_key)
    return Draw(rng_key, window_key, unravel, p, ok)


def credit(
    config: EstimatorConfig,
    policy: AbstractNoisePolicy,
    state: EstimatorState,
    d: Draw,
    result: WindowResult,
) -> tuple[PyTree, EstimatorState]:
    """The window's estimate (a params pytree) and the next state."""
    valid = window_validity(config, result)
    valid = valid & d.ok
    estimate, valid = score_estimate(config, result, valid, d.perturbation)
    new_state = next_state(
        config,
        state,
        d.rng_key,
        result,
        valid,
        estimate,
        inner_state=policy.kept_states(config, result.inner_state),
        noise=policy.next_noise(config, state.noise, d.perturbation, result, valid),
    )
    return d.unravel(estimate), new_state


def estimator(
    config: EstimatorConfig, policy: AbstractNoisePolicy
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of an ES-family estimator: `config` says what is
    estimated and how particles are laid out, `policy` how theta is perturbed."""
    system = config.system

    def state_for(params: PyTree) -> EstimatorState:
        flat, _ = ravel_pytree(params)
        check_not_empty(flat, params)
        return initial_state(
            config,
            params,
            num_states=policy.num_states(config),
            noise=policy.init_noise(config, flat),
        )

    def init_fn(params: PyTree) -> EstimatorState:
        if is_params_placeholder(params):
            return placeholder_state(config)
        check_sigma_for(config.sigma, ravel_pytree(params)[0], params)
        return state_for(params)

    # (Not init_fn: an update's compiled program may be shared with an estimator of
    # another sigma, and the state's form does not depend on it.)
    check_state = state_checker(state_for, config.name)

    def update(sigma, updates, state, params):
        loss_dtype = check_against_system(system, params)  # names what is wrong
        check_state(state, params)  # traced once per compile: free per call
        d = draw(config._replace(sigma=sigma), policy, state, params)
        unravel_all = jax.vmap(d.unravel)
        after = d.perturbation.thetas_after_reset
        result = run_window(
            config,
            unravel_all(d.perturbation.thetas),
            policy.window_states(config, state.inner_state),
            state.remaining,
            state.needs_init,
            d.window_key,
            loss_dtype=loss_dtype,
            thetas_after_reset=None if after is None else unravel_all(after),
        )
        estimate, new_state = credit(config, policy, state, d, result)
        # (Laid out as init lays it out: the next call's input types are these.)
        return add_to_updates(updates, estimate), config.placement.shard(new_state)

    update = compiled_when_eager(update, config, type(policy))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, config.name)
        check_finite_params(params)  # eagerly an error; under jit, counted
        return update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
