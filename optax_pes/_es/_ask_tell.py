"""Ask / tell: the persistent estimators for inner loops that are not JAX functions.

`ask` hands out the perturbed thetas of the next window; the caller runs each
particle's inner problem wherever it lives (a simulator in another process, a PyTorch
training run) and `tell`s the window's per-particle losses and episode ends back. The
noise, its crediting across episode boundaries and the state are those of `pes` and
`nres`: the same policies and the same code (`_estimator.draw` and `credit`).
"""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from optax_pes._checks import (
    as_key,
    check_choice,
    check_finite_params,
    check_float_tree,
    check_int,
    is_concrete,
    state_checker,
)
from optax_pes._compile import SharedJit
from optax_pes._es._config import (
    EstimatorConfig,
    check_not_empty,
    check_num_particles,
    check_sigma,
    check_sigma_for,
)
from optax_pes._es._estimator import credit, draw
from optax_pes._es._nres import _ReusedNoise
from optax_pes._es._pes import _PersistentNoise
from optax_pes._es._state import EstimatorState, start_state
from optax_pes._es._system import UnrolledSystem
from optax_pes._es._window import WindowResult
from optax_pes._placement import ON_ONE_DEVICE

_POLICIES = {"pes": _PersistentNoise, "nres": _ReusedNoise}


class Ask(NamedTuple):
    """What the caller runs in the next window (leading axis: the N particles)."""

    thetas: PyTree  # each particle's theta for the window
    thetas_after_reset: PyTree  # each particle's theta for an episode it starts
    #   inside the window (PES: the same as `thetas`; NRES: the new episode's noise)
    starts: Bool[Array, " particles"]  # the particle starts a new episode at the
    #   window's first step: initialise it (at its theta) before running it


class AskTell(NamedTuple):
    """`init(theta) -> state`, `ask(state, theta) -> Ask`,
    `tell(state, theta, losses, ended, ...) -> (estimate, state)`."""

    init: Any
    ask: Any
    tell: Any


def _outside(*args):
    raise RuntimeError("ask/tell runs the inner problem outside the estimator")


def ask_tell(
    method: Literal["pes", "nres"] = "pes",
    *,
    num_particles: int,
    sigma: float | Array,
    key: PRNGKeyArray | int,
    antithetic: bool = True,
    truncation_length: int = 1,
) -> AskTell:
    r"""PES or NRES with the inner problem run by the caller: ask thetas, tell losses.

    ```python
    at = optax_pes.ask_tell("pes", num_particles=N, sigma=0.1, key=0)
    state = at.init(theta)
    for _ in range(num_windows):
        ask = at.ask(state, theta)
        # run particle i for one window (K steps) at ask.thetas[i], first
        # initialising it if ask.starts[i]; sum its losses; say whether its
        # episode ended at the window's end
        estimate, state = at.tell(state, theta, losses, ended)
        theta = theta - lr * estimate
    ```

    The estimate of a window is the one `optax_pes.pes` (or `nres`) would compute from
    the same losses, for the same key: the same noise, the same crediting of losses to
    the noise of their episode, the same state. An episode may also end *inside* a
    window: pass `reset_inside` for it and split its window's losses into `losses`
    (before the reset, credited to the old episode) and `losses_after` (credited to
    the new episode, which ran at `ask.thetas_after_reset`). The two members of an
    antithetic pair (particles `i` and `i + N/2`) share an episode clock: their flags
    must agree (eagerly an error; under `jit` the pair is left out and counted in
    `num_nonfinite`), and they should share the inner problem's randomness (the same
    minibatches). Non-finite losses leave their pair out and restart it, as in `pes`.

    **Arguments:**

    - `method`: `"pes"` or `"nres"`.
    - `num_particles`, `sigma`, `key`, `antithetic`: as `optax_pes.pes`.
    - `truncation_length`: only used to report `diagnostics.mean_loss` per step.

    **Returns:** an `AskTell` of three functions, all jittable:

    - `init(theta) -> EstimatorState`;
    - `ask(state, theta) -> Ask`;
    - `tell(state, theta, losses, ended, losses_after=None, reset_inside=None)
      -> (estimate, state)`, the estimate a pytree like `theta`; `losses`,
      `losses_after` of shape `(N,)`, `ended`, `reset_inside` bool `(N,)`.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> at = optax_pes.ask_tell("pes", num_particles=4, sigma=0.1, key=0)
    >>> theta = jnp.array([1.0, -1.0])
    >>> state = at.init(theta)
    >>> ask = at.ask(state, theta)
    >>> losses = jnp.sum(ask.thetas**2, axis=1)  # one step of an "outside" loop
    >>> estimate, state = at.tell(state, theta, losses, ended=jnp.ones(4, bool))
    >>> estimate.shape
    (2,)

    ```
    """
    policy = _POLICIES[check_choice(method, "method", tuple(_POLICIES))]()
    num_particles = check_num_particles(num_particles, antithetic)
    check_sigma(sigma)
    truncation_length = check_int(truncation_length, "truncation_length", 1)
    members = 2 if antithetic else 1
    config = EstimatorConfig(
        name=f"ask_tell({method!r})",
        # The caller keeps the episode clocks: this stand-in is never run.
        system=UnrolledSystem(init=_outside, step=_outside, horizon=1),
        truncation_length=truncation_length,
        num_particles=num_particles,
        signs=(1.0, -1.0) if antithetic else (1.0,),
        num_groups=num_particles // members,
        offsets=np.zeros(num_particles // members, np.int32),
        sync=False,  # episodes may end inside windows
        placement=ON_ONE_DEVICE,
        key=as_key(key, "key"),
        sigma=sigma,
    )
    groups = config.num_groups

    def init(params: PyTree) -> EstimatorState:
        check_float_tree(params, "params")
        flat, _ = ravel_pytree(params)
        check_not_empty(flat, params)
        check_sigma_for(sigma, flat, params)
        return start_state(
            config, inner_state=None, noise=policy.init_noise(config, flat)
        )

    check_state = state_checker(init, config.name)

    # ask and tell run as one compiled program each (a foreign loop calls them
    # eagerly, once a window: op by op that took 3.6-6.4 ms against 0.4 ms), with
    # the checks that need concrete values made before.
    @SharedJit
    def draw_thetas(state: EstimatorState, params: PyTree) -> Ask:
        check_state(state, params)
        d = draw(config, policy, state, params)
        p = d.perturbation
        after = p.thetas if p.thetas_after_reset is None else p.thetas_after_reset
        return Ask(
            jax.vmap(d.unravel)(p.thetas),
            jax.vmap(d.unravel)(after),
            jnp.tile(state.needs_init, members),
        )

    def ask(state: EstimatorState, params: PyTree) -> Ask:
        check_finite_params(params)  # eagerly an error; under jit, counted
        return draw_thetas(state, params)

    def per_group(
        flags: Any, name: str
    ) -> tuple[Bool[Array, " groups"], Bool[Array, " groups"]]:
        """The flags of each group, and whether its members' flags agree (eagerly,
        disagreeing flags are an error; under jit such a group is left out)."""
        flags = jnp.asarray(flags)
        if flags.shape != (num_particles,) or flags.dtype != bool:
            raise ValueError(
                f"{name} must be a bool array of shape ({num_particles},), one flag "
                f"per particle, got {flags.dtype}{list(flags.shape)}"
            )
        by_member = flags.reshape(members, groups)
        if is_concrete(flags) and not np.all(
            np.asarray(by_member) == np.asarray(by_member)[:1]
        ):
            raise ValueError(
                f"{name}: the members of an antithetic pair (particles i and "
                f"i + {groups}) share an episode clock, so their flags must agree"
            )
        return by_member[0], jnp.all(by_member == by_member[:1], axis=0)

    def losses_of(values: Any, name: str) -> Float[Array, " particles"]:
        values = jnp.asarray(values)
        if values.shape != (num_particles,) or not jnp.issubdtype(
            values.dtype, jnp.floating
        ):
            raise ValueError(
                f"{name} must be a float array of shape ({num_particles},), the summed "
                f"window loss of each particle, got {values.dtype}{list(values.shape)}"
            )
        return values

    def tell(
        state: EstimatorState,
        params: PyTree,
        losses: Float[Array, " particles"],
        ended: Bool[Array, " particles"],
        losses_after: Float[Array, " particles"] | None = None,
        reset_inside: Bool[Array, " particles"] | None = None,
    ) -> tuple[PyTree, EstimatorState]:
        losses = losses_of(losses, "losses")
        ended, agree = per_group(ended, "ended")
        if (losses_after is None) != (reset_inside is None):
            raise ValueError("losses_after and reset_inside go together: pass both")
        if reset_inside is None:
            after, inside = jnp.zeros_like(losses), jnp.zeros(groups, bool)
        else:
            after = losses_of(losses_after, "losses_after").astype(losses.dtype)
            inside, agree_inside = per_group(reset_inside, "reset_inside")
            agree = agree & agree_inside
        check_finite_params(params)  # eagerly an error; under jit, counted
        return credit_losses(state, params, losses, after, ended, inside, agree)

    @SharedJit
    def credit_losses(state, params, losses, after, ended, inside, agree):
        check_state(state, params)
        # A pair whose members' flags disagree (possible only under jit) is left
        # out and counted, as a pair with a non-finite loss is.
        losses = jnp.where(jnp.tile(agree, members), losses, jnp.nan)
        result = WindowResult(
            inner_state=None,
            remaining=jnp.ones(groups, jnp.int32),  # the caller's clocks
            needs_init=ended,
            loss_before=losses,
            loss_after=jnp.where(jnp.tile(inside, members), after, 0),
            reset_inside=inside,
        )
        return credit(
            config, policy, state, draw(config, policy, state, params), result
        )

    return AskTell(init, ask, tell)
