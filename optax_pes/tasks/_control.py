"""A control policy acting in an environment, as an `UnrolledSystem`; environments.

`control_system` turns any environment with the Brax / MuJoCo Playground protocol
(`reset(key) -> state`, `step(state, action) -> state`) and a policy into an
`optax_pes.UnrolledSystem` whose loss is the negative reward. `from_gymnax` wraps a
gymnax environment into that protocol, and `MJXSwimmer` is gymnasium's Swimmer-v5 on
MuJoCo's own JAX backend (MJX), imported only when it is built.
"""

import pathlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree, Scalar

from optax_pes._checks import (
    check_callable,
    check_choice,
    check_float,
    check_int,
    check_same_structure,
    describe,
)
from optax_pes._es._system import UnrolledSystem

Policy = Callable[[PyTree, PyTree], PyTree]
"""`policy(theta, obs) -> action`."""


class ControlState(NamedTuple):
    """The inner state of `optax_pes.tasks.control_system`."""

    env_state: PyTree  # the environment's state; held fixed once `done` is latched
    done: Bool[Array, ""]  # shape=(), bool: the episode has ended (latched)


def _key_for_reset(key: PRNGKeyArray, reset_key: str) -> Array:
    if reset_key == "raw":
        return jax.random.key_data(key)
    return key


def _check_env(env: Any) -> None:
    for method, form in (
        ("reset", "reset(key) -> state"),
        ("step", "step(state, action) -> state"),
    ):
        if not callable(getattr(env, method, None)):
            raise TypeError(
                f"env must have a method {form} (the Brax / MuJoCo Playground "
                f"protocol), got {type(env).__name__} without a callable {method!r}; "
                "wrap a gymnax environment with optax_pes.tasks.from_gymnax"
            )


def _check_env_state(state: Any, where: str) -> None:
    """`state` (abstract) has array `obs` and scalar float `reward` and `done`."""
    missing = [f for f in ("obs", "reward", "done") if not hasattr(state, f)]
    if missing:
        raise ValueError(
            f"{where} must return a state with fields obs, reward and done (as a Brax "
            f"State), got {type(state).__name__} without {', '.join(missing)}"
        )
    obs_leaves = jax.tree.leaves(state.obs)
    if not obs_leaves or not all(hasattr(x, "shape") for x in obs_leaves):
        raise ValueError(
            f"{where}.obs must be an array (or a pytree of arrays), got "
            f"{type(state.obs).__name__}"
        )
    for field in ("reward", "done"):
        value = getattr(state, field)
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        ok_dtype = dtype is not None and (
            jnp.issubdtype(dtype, jnp.floating)
            or (field == "done" and jnp.issubdtype(dtype, jnp.bool_))
        )
        if shape != () or not ok_dtype:
            got = (
                f"{dtype}{list(shape)}"
                if shape is not None and dtype is not None
                else type(value).__name__
            )
            kind = "a float (or bool) scalar" if field == "done" else "a float scalar"
            raise ValueError(
                f"{where}.{field} must be {kind} (one environment: the estimators "
                f"vmap over particles themselves), got {got}"
            )


def control_system(
    env: Any,
    policy: Policy,
    *,
    horizon: int,
    reset_key: Literal["raw", "typed"] = "raw",
) -> UnrolledSystem:
    r"""A policy acting in an environment for `horizon` steps, as an `UnrolledSystem`.

    One inner step applies the policy to the current observation and steps the
    environment; its loss is the negative of the reward the step returns:

    $$a_t = \pi_\theta(o_t), \qquad s_{t+1} = \mathrm{env.step}(s_t, a_t), \qquad
      \ell_t = -r_{t+1}\,(1 - d_t),$$

    so the episode loss is minus the return $\sum_t r_{t+1}$ over the steps before the
    episode ended. **Done is latched:** the step whose new state has `done = 1` still
    counts; every later step of the episode has loss exactly `0`, whatever the
    environment emits after it, and the environment's state is held at the state that
    step returned (an absorbing state: nothing the environment computes afterwards,
    not even a NaN, reaches the losses, the inner state or, through the environment's
    derivatives, `optax_pes.tbptt`'s gradient). After `horizon` steps the
    estimators start a new episode from `env.reset`. An environment that resets
    itself when done (gymnax, Brax's auto-reset wrapper) therefore needs no special
    care; use the bare environment or keep the wrapper, the losses are the same.

    The environment protocol is Brax's and MuJoCo Playground's: `env.reset(key) ->
    state`, `env.step(state, action) -> state`, with `state.obs` an array (or a pytree
    of arrays), `state.reward` a float scalar and `state.done` a float `0.`/`1.` (or
    bool) scalar, for **one** environment (the estimators vmap over particles). The
    environment keeps its randomness in its state: `step` takes no key, so the
    system's per-step keys are unused and an episode's randomness comes from its reset
    key. The two members of an antithetic pair share their reset key (common random
    numbers: the same initial state), which is what makes antithetic ES work well on
    control tasks. `optax_pes.tasks.from_gymnax` adapts a gymnax environment to this
    protocol; `optax_pes.tasks.MJXSwimmer` is a MuJoCo swimmer that follows it.

    **Arguments:**

    - `env`: the environment, with `reset` and `step` methods as above.
    - `policy`: `policy(theta, obs) -> action`, applied to the observation of the state
      the step starts from; `theta` is any pytree of float arrays (see
      `optax_pes.tasks.linear_policy` and `optax_pes.tasks.mlp_policy`). It need not be
      differentiable for the ES estimators; `optax_pes.tbptt` differentiates through it
      and the environment.
    - `horizon`: $T$, environment steps per episode.
    - `reset_key`: the kind of key `env.reset` is given: `"raw"` (a `uint32[2]` array,
      as `jax.random.PRNGKey` makes; what Brax and Playground environments are written
      for) or `"typed"` (a `jax.random.key`).

    **Returns:** an `optax_pes.UnrolledSystem` whose inner state is an
    `optax_pes.tasks.ControlState(env_state, done)`. `-jnp.sum(optax_pes.unroll(
    system, theta, key))` is the return of one episode.

    **Example:**

    A point on a line that the policy pushes towards 0; the episode ends when the point
    is close enough.

    ```python
    >>> from typing import NamedTuple
    >>> import jax.numpy as jnp, optax_pes
    >>> class State(NamedTuple):
    ...     x: jnp.ndarray
    ...     obs: jnp.ndarray
    ...     reward: jnp.ndarray
    ...     done: jnp.ndarray
    >>> class Point:
    ...     def reset(self, key):
    ...         x = jnp.ones(1)
    ...         return State(x, x, jnp.zeros(()), jnp.zeros(()))
    ...     def step(self, state, action):
    ...         x = state.x + action
    ...         done = (jnp.abs(x[0]) < 0.3).astype(jnp.float32)
    ...         return State(x, x, -jnp.sum(x**2), done)
    >>> system = optax_pes.tasks.control_system(
    ...     Point(), lambda theta, obs: theta * obs, horizon=5
    ... )
    >>> losses = optax_pes.unroll(system, jnp.array(-0.5))  # x: 1, 0.5, 0.25 (done)
    >>> losses.tolist()
    [0.25, 0.0625, 0.0, 0.0, 0.0]

    ```
    """
    _check_env(env)
    check_callable(policy, "policy", "policy(theta, obs) -> action")
    horizon = check_int(horizon, "horizon", 1)
    reset_key = check_choice(reset_key, "reset_key", ("raw", "typed"))
    try:
        reset_state = jax.eval_shape(
            env.reset, _key_for_reset(jax.random.key(0), reset_key)
        )
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"env.reset(key) failed on a {reset_key} PRNG key; is reset_key right? "
            f"({type(e).__name__}: {e})"
        ) from e
    _check_env_state(reset_state, "env.reset(key)")

    def init(theta: PyTree, key: PRNGKeyArray) -> ControlState:
        del theta
        return ControlState(
            env.reset(_key_for_reset(key, reset_key)), jnp.zeros((), bool)
        )

    def step(
        theta: PyTree, state: ControlState, key: PRNGKeyArray
    ) -> tuple[ControlState, Scalar]:
        del key  # the environment keeps its randomness in its state
        obs = state.env_state.obs
        latched = state.done
        try:
            # Once latched, the policy too runs on inputs cut off from theta: the
            # held observation may be non-finite (a simulator that blew up and
            # said done), and 0 * NaN in the policy's VJP would reach theta.
            action = policy(*_cut_if(latched, (theta, obs)))
        except Exception as e:  # noqa: BLE001 - traced once: no runtime cost
            raise ValueError(
                f"policy(theta, obs) failed on theta {describe(theta)} and obs "
                f"{describe(obs)} ({type(e).__name__}: {e})"
            ) from e
        try:
            # Once latched, the step runs on inputs cut off from theta: its outputs
            # are discarded below, and so must be its derivatives (an environment
            # that blew up has 0 * inf = NaN in its VJP, which would reach theta).
            new = env.step(*_cut_if(latched, (state.env_state, action)))
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"env.step(state, action) failed on the action {describe(action)} "
                f"from policy(theta, obs); does the policy match the environment's "
                f"action shape? ({type(e).__name__}: {e})"
            ) from e
        _check_env_state(new, "env.step(state, action)")
        check_same_structure(
            new,
            state.env_state,
            lambda expected, got: (
                "env.step(state, action) must return a state with the structure, "
                f"shapes and dtypes of env.reset's: reset gave {expected}, step gave "
                f"{got}"
            ),
        )
        reward = jnp.asarray(new.reward)
        loss = jnp.where(latched, jnp.zeros_like(reward), -reward)
        env_state = jax.tree.map(
            lambda old, fresh: jnp.where(latched, old, fresh), state.env_state, new
        )
        done = latched | (jnp.asarray(new.done) != 0)
        return ControlState(env_state, done), loss

    return UnrolledSystem(init=init, step=step, horizon=horizon)


def _cut_if(flag: Bool[Array, ""], tree: PyTree) -> PyTree:
    """`tree` with its float leaves' derivatives zeroed where `flag` (a select, so
    a non-finite cotangent does not pass: unlike a multiplication by 0)."""

    def cut(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        return jnp.where(flag, jax.lax.stop_gradient(x), x)

    return jax.tree.map(cut, tree)


# -- gymnax ------------------------------------------------------------------------


class GymnaxState(NamedTuple):
    """The state of a gymnax environment wrapped by `optax_pes.tasks.from_gymnax`."""

    env_state: PyTree  # gymnax's own environment state
    obs: PyTree  # the observation gymnax returned
    reward: Float[Array, ""]  # shape=(), float32: the reward of the last step
    done: Float[Array, ""]  # shape=(), float32: 1. once terminated or truncated
    key: Array  # the PRNG key the next step splits (the kind reset was given)


class GymnaxEnv:
    """A gymnax environment with the Brax protocol; built by `from_gymnax`."""

    def __init__(self, env: Any, params: Any = None):
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise TypeError(
                    "env must be a gymnax environment with reset(key, params) and "
                    f"step(key, state, action, params), got {type(env).__name__} "
                    f"without {method!r}"
                )
        if params is None:
            params = getattr(env, "default_params", None)
        self.env = env
        self.params = params

    def reset(self, key: PRNGKeyArray) -> GymnaxState:
        key, reset_key = jax.random.split(key)
        obs, env_state = self.env.reset(reset_key, self.params)
        zero = jnp.zeros((), jnp.float32)
        return GymnaxState(_strong(env_state), obs, zero, zero, key)

    def step(self, state: GymnaxState, action: PyTree) -> GymnaxState:
        key, step_key = jax.random.split(state.key)
        out = self.env.step(step_key, state.env_state, action, self.params)
        if len(out) == 6:  # gymnax >= 0.0.9: obs, state, reward, terminated, truncated
            obs, env_state, reward, terminated, truncated, _ = out
            done = jnp.logical_or(terminated, truncated)
        else:  # obs, state, reward, done, info
            obs, env_state, reward, done, _ = out
        return GymnaxState(
            _strong(env_state),
            obs,
            jnp.asarray(reward, jnp.float32).reshape(()),
            jnp.asarray(done, jnp.float32).reshape(()),
            key,
        )


def _strong(tree: PyTree) -> PyTree:
    """Every numeric leaf as a strongly typed array (gymnax's `time=0` is a Python int,
    its `last_u` a weakly typed float), so that reset's and step's states agree leaf
    for leaf, also under `lax.cond` and `lax.scan`."""

    def strong(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key
        ):
            return x
        dtype = jnp.result_type(x)
        return jnp.asarray(x, dtype).astype(dtype)

    return jax.tree.map(strong, tree)


def from_gymnax(env: Any, params: Any = None) -> GymnaxEnv:
    """Wrap a gymnax environment into the protocol of `control_system`.

    gymnax environments are functional, `env.reset(key, params) -> (obs, state)` and
    `env.step(key, state, action, params) -> (obs, state, reward, done, ...)`; the
    wrapper carries the key in its state (`GymnaxState.key`, split at every step) and
    the environment parameters in itself, so that `reset(key) -> state` and
    `step(state, action) -> state` hold. `done` is gymnax's termination *or*
    truncation (its time limit), as a float `0.`/`1.`; gymnax resets itself on done,
    which `control_system`'s latching makes harmless.

    **Arguments:**

    - `env`: a gymnax environment, e.g. the first value of `gymnax.make("Pendulum-v1")`.
    - `params`: its `EnvParams`; `env.default_params` by default.

    **Returns:** a `GymnaxEnv` whose states are `optax_pes.tasks.GymnaxState`s. Both
    raw and typed reset keys work.

    **Example:**

    With `gymnax` installed, `env, params = gymnax.make("Pendulum-v1")` gives one; here
    a stand-in with gymnax's signatures, a noisy walk on a line:

    ```python
    >>> import jax, jax.numpy as jnp, optax_pes
    >>> class Walk:  # gymnax's functional interface
    ...     default_params = 0.1  # the noise scale
    ...     def reset(self, key, params):
    ...         return jnp.ones(1), jnp.ones(1)  # (obs, state)
    ...     def step(self, key, x, action, params):
    ...         x = x + action + params * jax.random.normal(key, (1,))
    ...         return x, x, -jnp.sum(x**2), jnp.abs(x[0]) > 5.0, {}
    >>> env = optax_pes.tasks.from_gymnax(Walk())
    >>> system = optax_pes.tasks.control_system(
    ...     env, lambda theta, obs: theta * obs, horizon=50
    ... )
    >>> episode_return = -jnp.sum(optax_pes.unroll(system, jnp.array(-0.5)))
    >>> bool(-5.0 < episode_return < 0.0)
    True

    ```
    """
    return GymnaxEnv(env, params)


# -- MuJoCo swimmer (MJX) -------------------------------------------------------------


class SwimmerState(NamedTuple):
    """The state of `optax_pes.tasks.MJXSwimmer`."""

    data: Any  # mujoco.mjx.Data: the simulator's state
    obs: Float[Array, " 8"]  # float32: joint angles qpos[2:] and velocities qvel
    reward: Float[Array, ""]  # shape=(), float32: forward velocity - control cost
    done: Float[Array, ""]  # shape=(), float32: always 0. (the swimmer never ends)


def _gymnasium_swimmer_xml() -> pathlib.Path:
    try:
        import gymnasium
    except ImportError as e:
        raise ImportError(
            "MJXSwimmer reads gymnasium's swimmer.xml: pip install "
            "'optax_pes[control]' (or pass xml_path)"
        ) from e
    return pathlib.Path(gymnasium.__file__).parent / "envs/mujoco/assets/swimmer.xml"


class MJXSwimmer:
    r"""Gymnasium's Swimmer-v5 on MJX, MuJoCo's JAX backend, with the Brax protocol.

    The model is gymnasium's `swimmer.xml` (three capsules in a viscous fluid, two
    hinge motors, RK4 at 0.01 s); one environment step is `frame_skip = 4` simulator
    steps (0.04 s), as in gymnasium. With $x$ the front tip's coordinate along the
    swimming direction (`qpos[0]`) and $a$ the action,

    $$r = \frac{x_{t+1} - x_t}{0.04\,\mathrm s} - 10^{-4} \lVert a \rVert^2 ,$$

    the observation is `qpos[2:]` (body angle and the two joint angles) followed by
    `qvel` (8 numbers), and an episode starts from `qpos0` and zero velocity, each
    coordinate perturbed by $U(-0.1, 0.1)$ drawn from the reset key. The swimmer never
    ends an episode by itself (`done` is always 0): `control_system`'s `horizon` is
    gymnasium's time limit (1000). Actions are clipped to $[-1, 1]$ by the simulator;
    the control cost is on the action as given, as in gymnasium.

    Needs `mujoco` and `mujoco-mjx` (and `gymnasium` for the model file):
    `pip install 'optax_pes[control]'`. The first call of a jitted step compiles MJX's
    pipeline, which takes a minute or more on a CPU.

    **Arguments:**

    - `xml_path`: the MuJoCo model, gymnasium's `swimmer.xml` by default.
    - `frame_skip`: simulator steps per environment step.
    - `forward_reward_weight`, `ctrl_cost_weight`, `reset_noise_scale`: as in
      gymnasium's `Swimmer-v5`.
    """

    obs_dim = 8
    act_dim = 2

    def __init__(
        self,
        xml_path: str | pathlib.Path | None = None,
        *,
        frame_skip: int = 4,
        forward_reward_weight: float = 1.0,
        ctrl_cost_weight: float = 1e-4,
        reset_noise_scale: float = 0.1,
    ):
        try:
            import mujoco
            from mujoco import mjx
        except ImportError as e:
            raise ImportError(
                "MJXSwimmer needs mujoco and mujoco-mjx: pip install "
                "'optax_pes[control]'"
            ) from e
        self.frame_skip = check_int(frame_skip, "frame_skip", 1)
        self.forward_reward_weight = check_float(
            forward_reward_weight, "forward_reward_weight", low_inclusive=True
        )
        self.ctrl_cost_weight = check_float(
            ctrl_cost_weight, "ctrl_cost_weight", low_inclusive=True
        )
        self.reset_noise_scale = check_float(
            reset_noise_scale, "reset_noise_scale", low_inclusive=True
        )
        path = _gymnasium_swimmer_xml() if xml_path is None else pathlib.Path(xml_path)
        if not path.is_file():
            raise ValueError(f"xml_path must be a MuJoCo model file, got {str(path)!r}")
        model = mujoco.MjModel.from_xml_path(str(path))
        if (model.nq, model.nv, model.nu) != (5, 5, 2):
            raise ValueError(
                "xml_path must be a swimmer with 5 position and velocity coordinates "
                f"and 2 actuators, got nq={model.nq}, nv={model.nv}, nu={model.nu}"
            )
        self._mjx = mjx
        self.model = mjx.put_model(model)
        self.dt = float(model.opt.timestep) * self.frame_skip
        self._qpos0 = jnp.asarray(model.qpos0, jnp.float32)

    def _obs(self, data) -> Float[Array, " 8"]:
        return jnp.concatenate([data.qpos[2:], data.qvel]).astype(jnp.float32)

    def reset(self, key: PRNGKeyArray) -> SwimmerState:
        """A new episode: `qpos0` and zero velocity, perturbed uniformly."""
        pos_key, vel_key = jax.random.split(key)
        scale = self.reset_noise_scale
        nq, nv = self._qpos0.shape[0], self.model.nv
        qpos = self._qpos0 + jax.random.uniform(
            pos_key, (nq,), minval=-scale, maxval=scale
        )
        qvel = jax.random.uniform(vel_key, (nv,), minval=-scale, maxval=scale)
        data = self._mjx.make_data(self.model).replace(qpos=qpos, qvel=qvel)
        zero = jnp.zeros((), jnp.float32)
        return SwimmerState(data, self._obs(data), zero, zero)

    def step(self, state: SwimmerState, action: Float[Array, " 2"]) -> SwimmerState:
        """`frame_skip` simulator steps with `ctrl = action`."""
        # (ctrl's dtype: MJX's data is float64 with jax_enable_x64.)
        action = jnp.asarray(action, state.data.ctrl.dtype)
        if action.shape != (self.act_dim,):
            raise ValueError(
                f"MJXSwimmer.step needs an action of shape ({self.act_dim},), got "
                f"shape {action.shape}"
            )
        data = state.data.replace(ctrl=action)

        def physics(data, _):
            return self._mjx.step(self.model, data), None

        new, _ = jax.lax.scan(physics, data, None, length=self.frame_skip)
        velocity = (new.qpos[0] - data.qpos[0]) / self.dt
        reward = (
            self.forward_reward_weight * velocity
            - self.ctrl_cost_weight * jnp.sum(action**2)
        )
        return SwimmerState(new, self._obs(new), reward.astype(jnp.float32), state.done)
