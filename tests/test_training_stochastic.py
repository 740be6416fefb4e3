"""tasks.training_system with stochastic models (dropout) and carried model state
(batch statistics), in Equinox, Flax NNX and Flax linen."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import optax_pes
from optax_pes import tasks

from .helpers import slow

DIM = 4
FRAMEWORKS = ["equinox", "nnx", "linen"]
LOG_LR = jnp.log(0.05)


def regression_data(n=64, key=0):
    kx, kw = jax.random.split(jax.random.key(key))
    x = jax.random.normal(kx, (n, DIM))
    return x, jnp.sin(x @ jax.random.normal(kw, (DIM,)))


def one_example_data(n=32):
    """Every example the same: every minibatch is the same, whatever the key, so the
    only randomness left in a training step is the dropout mask."""
    x, y = regression_data(n=1)
    return jnp.tile(x, (n, 1)), jnp.tile(y, n)


def sgd(theta):
    return optax.sgd(jnp.exp(theta))


class EquinoxNet(eqx.Module):
    hidden: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(DIM, 16, key=k1)
        self.dropout = eqx.nn.Dropout(0.5)
        self.out = eqx.nn.Linear(16, "scalar", key=k2)

    def __call__(self, x, *, key=None):
        return self.out(self.dropout(jax.nn.relu(self.hidden(x)), key=key))


def equinox_loss(model, x, y, *, key=None):
    keys = None if key is None else jax.random.split(key, x.shape[0])
    return jnp.mean((jax.vmap(model)(x, key=keys) - y) ** 2)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(DIM, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.relu(self.hidden(x))))[:, 0]


def nnx_loss(model, x, y):  # no key: the model's RNG streams are reseeded instead
    return jnp.mean((model(x) - y) ** 2)


class LinenNet(linen.Module):
    rate: float = 0.5

    @linen.compact
    def __call__(self, x, train: bool):
        x = jax.nn.relu(linen.Dense(16)(x))
        x = linen.Dropout(self.rate, deterministic=not train)(x)
        return linen.Dense(1)(x)[:, 0]


LINEN_NET = LinenNet()
LINEN_PARAMS = LINEN_NET.init(jax.random.key(0), jnp.zeros((1, DIM)), train=False)[
    "params"
]


def linen_loss(params, x, y, key=None):
    train = key is not None  # key=None: evaluation, dropout off
    prediction = LINEN_NET.apply(
        {"params": params},
        x,
        train=train,
        rngs={"dropout": key} if train else None,
    )
    return jnp.mean((prediction - y) ** 2)


def model_and_loss(framework):
    if framework == "equinox":
        return EquinoxNet(jax.random.key(0)), equinox_loss
    if framework == "nnx":
        return NNXNet(nnx.Rngs(0)), nnx_loss
    return LINEN_PARAMS, linen_loss


def dropout_system(framework, data=None, optimizer=sgd, **kwargs):
    model, loss = model_and_loss(framework)
    options = dict(horizon=10, batch_size=16)
    options.update(kwargs)
    data = regression_data() if data is None else data
    return tasks.training_system(model, loss, optimizer, data, **options)


def run_pes(system, theta, num_updates=2):
    tx = optax_pes.pes(system, num_particles=4, sigma=0.1, truncation_length=5, key=0)
    state = tx.init(theta)
    update = jax.jit(tx.update)
    for _ in range(num_updates):
        estimate, state = update(jnp.zeros_like(theta), state, theta)
    return estimate, state


# (Equinox dropout is also in test_a_pair_shares_dropout_masks_and_steps_do_not.)
@pytest.mark.parametrize("framework", [slow("equinox"), "nnx", "linen"])
def test_training_with_dropout_gives_finite_pes_estimates(framework):
    system = dropout_system(framework, objective="val_loss", val_data=regression_data())
    estimate, state = run_pes(system, LOG_LR)
    assert jnp.isfinite(estimate) and estimate != 0
    assert state.diagnostics.num_nonfinite == 0
    assert jnp.isfinite(state.diagnostics.mean_loss)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_pair_shares_dropout_masks_and_steps_do_not(framework):
    """With every example the same, a step's pre-update training loss depends on the
    dropout mask only: the same for the two members of a pair (same step key,
    different theta), different for another step's key."""
    system = dropout_system(framework, data=one_example_data())
    state, step = system.init(LOG_LR, jax.random.key(0)), jax.jit(system.step)
    key = jax.random.key(5)
    _, a = step(LOG_LR, state, key)
    _, b = step(LOG_LR + 1.0, state, key)
    _, c = step(LOG_LR, state, jax.random.key(6))
    assert a == b and a != c


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_evaluation_is_deterministic(framework):
    """With a zero learning rate the validation loss is the initial model's, in
    evaluation mode: the same whatever the step's key, though training is not."""
    system = dropout_system(
        framework,
        data=one_example_data(),
        optimizer=lambda theta: optax.sgd(0.0 * theta),
        objective="val_loss",
        val_data=regression_data(key=1),
    )
    state, step = system.init(LOG_LR, jax.random.key(0)), jax.jit(system.step)
    _, a = step(LOG_LR, state, jax.random.key(5))
    _, b = step(LOG_LR, state, jax.random.key(6))
    assert a == b
    model, loss = model_and_loss(framework)
    model = nnx.view(model, deterministic=True) if framework == "nnx" else model
    model = eqx.nn.inference_mode(model) if framework == "equinox" else model
    np.testing.assert_allclose(a, loss(model, *regression_data(key=1)), rtol=1e-6)


def test_nnx_model_rngs_are_not_read():
    """The step reseeds every RNG stream from its key: two models that differ only in
    their streams' seeds and counts train identically."""
    x, _ = data = regression_data()
    models = [
        NNXNet(nnx.Rngs(params=0, dropout=1)),
        NNXNet(nnx.Rngs(params=0, dropout=2)),
    ]
    models[1](x)  # advances the second model's stream counts
    results = []
    for model in models:
        system = tasks.training_system(
            model, nnx_loss, sgd, data, horizon=10, batch_size=16
        )
        state, loss = system.step(
            LOG_LR, system.init(LOG_LR, jax.random.key(0)), jax.random.key(3)
        )
        results.append((loss, state.params))
    for a, b in zip(*(jax.tree.leaves(r) for r in results), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_key_reaches_the_functions_that_take_one():
    """A `key` parameter gets the step's key in training and None in evaluation; a
    function without one is called without it (the metric here)."""
    seen = []

    def loss(w, x, y, *, key):
        seen.append(key)
        return jnp.mean((x @ w - y) ** 2)

    def metric(w, x, y):
        return jnp.mean(jnp.abs(x @ w - y))

    for objective in ("val_loss", metric):
        system = tasks.training_system(
            jnp.zeros(DIM),
            loss,
            sgd,
            regression_data(),
            horizon=5,
            batch_size=8,
            objective=objective,
            val_data=regression_data(key=1),
        )
        seen.clear()
        system.step(LOG_LR, system.init(LOG_LR, jax.random.key(0)), jax.random.key(1))
        assert jax.dtypes.issubdtype(seen[0].dtype, jax.dtypes.prng_key)
        assert seen[1:] == ([None] if objective == "val_loss" else [])


def test_linen_parameters_as_a_plain_pytree():
    net = LinenNet(rate=0.0)
    system = tasks.training_system(
        LINEN_PARAMS,
        lambda p, x, y: jnp.mean((net.apply({"params": p}, x, train=False) - y) ** 2),
        sgd,
        regression_data(),
        horizon=10,
        batch_size=16,
    )
    losses = optax_pes.unroll(system, jnp.log(0.1), 0)
    assert losses[-3:].mean() < losses[:2].mean()


class NNXNormNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(DIM, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.hidden(x))))[:, 0]


class LinenNormNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool):
        x = linen.BatchNorm(use_running_average=not train)(linen.Dense(16)(x))
        return linen.Dense(1)(jax.nn.relu(x))[:, 0]


def bridged_linen_loss(model, x, y, key=None):
    prediction = model(x, train=key is not None, mutable=["batch_stats"])
    return jnp.mean((prediction - y) ** 2)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_batch_statistics_are_carried(framework):
    """NNX BatchNorm (and linen's, through nnx.bridge.ToNNX) updates its running
    statistics in training steps; they are carried in the state, restart with the
    episode, and are what evaluation reads."""
    x, _ = data = regression_data()
    if framework == "nnx":
        model, loss, name = NNXNormNet(nnx.Rngs(0)), nnx_loss, "norm"
    else:
        model = nnx.bridge.ToNNX(LinenNormNet(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(model, x[:1], train=False)
        loss, name = bridged_linen_loss, "BatchNorm_0"

    def system(optimizer):
        return tasks.training_system(
            model,
            loss,
            optimizer,
            data,
            horizon=10,
            batch_size=16,
            objective="val_loss",
            val_data=regression_data(key=1),
        )

    frozen = system(lambda theta: optax.sgd(0.0 * theta))  # the parameters stay put
    key = jax.random.key(1)  # the same minibatch at every step
    state = frozen.init(LOG_LR, jax.random.key(0))
    assert jnp.all(state.model_state[name]["mean"][...] == 0)
    once, first = frozen.step(LOG_LR, state, key)
    twice, second = frozen.step(LOG_LR, once, key)
    assert jnp.any(once.model_state[name]["mean"][...] != 0)
    assert jnp.all(
        twice.model_state[name]["mean"][...] != once.model_state[name]["mean"][...]
    )
    assert first != second  # only the carried statistics differ between the two
    estimate, pes_state = run_pes(system(sgd), LOG_LR)
    assert jnp.isfinite(estimate) and pes_state.diagnostics.num_nonfinite == 0
