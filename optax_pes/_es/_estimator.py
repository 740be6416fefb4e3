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
from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from optax_pes._checks import require_params
from optax_pes._es._config import EstimatorConfig
from optax_pes._es._state import (
    EstimatorState,
    initial_state,
    next_state,
    window_validity,
)
from optax_pes._es._system import check_against_system
from optax_pes._es._window import WindowResult, run_window
from optax_pes._tree import add_to_updates


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


def checked_sigma(sigma: Any) -> Array:
    """sigma as an array, with a run-time error when a traced value is not positive."""
    sigma = jnp.asarray(sigma)
    if isinstance(sigma, jax.core.Tracer):
        sigma = eqx.error_if(
            sigma, ~(sigma > 0) | ~jnp.isfinite(sigma), "sigma must be positive"
        )
    return sigma


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
    """One `z ~ N(0, I)` per group, in theta's dtype."""
    return jax.random.normal(key, (config.num_groups, flat.size), flat.dtype)


def score_estimate(
    config: EstimatorConfig,
    result: WindowResult,
    valid: Bool[Array, " groups"],
    perturbation: Perturbation,
) -> Float[Array, " dim"]:
    """`sum_i (L_before_i c_before_i + L_after_i c_after_i) / n_valid`.

    Invalid groups contribute nothing; without mid-window resets (`config.sync`) the
    losses after a reset are zero and their product is skipped.
    """
    signs, num_groups = config.signs, config.num_groups
    scores = perturbation.credit_before
    count = jnp.maximum(config.particles_per_group * jnp.sum(valid), 1)

    def credit(losses, scores):
        per_member = losses.reshape(len(signs), num_groups)
        weights = sum(s * per_member[m] for m, s in enumerate(signs) if s)
        weights = jnp.where(valid, weights, 0)
        return weights.astype(scores.dtype) @ scores

    out = credit(result.loss_before, scores)
    if not config.sync:
        out = out + credit(result.loss_after, perturbation.credit_after)
    return out / count.astype(scores.dtype)


def estimator(
    config: EstimatorConfig, policy: AbstractNoisePolicy
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of an ES-family estimator: `config` says what is
    estimated and how particles are laid out, `policy` how theta is perturbed."""
    system = config.system

    def init_fn(params: PyTree) -> EstimatorState:
        flat, _ = ravel_pytree(params)
        return initial_state(
            config,
            params,
            num_states=policy.num_states(config),
            noise=policy.init_noise(config, flat),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, config.name)
        loss_dtype = check_against_system(system, params)
        rng_key, noise_key, window_key = jax.random.split(state.rng_key, 3)
        flat, unravel = ravel_pytree(params)
        sigma = checked_sigma(config.sigma).astype(flat.dtype)
        p = policy.perturb(
            config, state.noise, state.needs_init, flat, sigma, noise_key
        )
        after = p.thetas_after_reset
        result = run_window(
            config,
            jax.vmap(unravel)(p.thetas),
            policy.window_states(config, state.inner_state),
            state.remaining,
            state.needs_init,
            window_key,
            loss_dtype=loss_dtype,
            thetas_after_reset=None if after is None else jax.vmap(unravel)(after),
        )
        valid = window_validity(config, result)
        estimate = score_estimate(config, result, valid, p)
        new_state = next_state(
            config,
            state,
            rng_key,
            result,
            valid,
            estimate,
            inner_state=policy.kept_states(config, result.inner_state),
            noise=policy.next_noise(config, state.noise, p, result, valid),
        )
        return add_to_updates(updates, unravel(estimate)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
