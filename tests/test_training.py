"""tasks.training_system, its hyperparameter parameterisations, the learned optimizer,
and checkpointing an estimator mid-run."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import optax_pes
from optax_pes import tasks

from .helpers import slow


def regression_data(n=96, dim=5, key=0):
    kx, kw = jax.random.split(jax.random.key(key))
    x = jax.random.normal(kx, (n, dim))
    return x, jnp.sin(x @ jax.random.normal(kw, (dim,)))


def classification_data(n=120, dim=6, classes=3, key=0):
    kx, kw = jax.random.split(jax.random.key(key))
    x = jax.random.normal(kx, (n, dim))
    return x, jnp.argmax(x @ jax.random.normal(kw, (dim, classes)), axis=1)


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def cross_entropy(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def schedule_sgd(theta):
    return optax.sgd(tasks.lr_schedule(theta), momentum=0.9)


def equinox_system(**kwargs):
    data = regression_data()
    options = dict(horizon=12, batch_size=16)
    options.update(kwargs)
    return tasks.training_system(
        eqx.nn.MLP(5, "scalar", 8, 1, key=jax.random.key(1)),
        mse,
        schedule_sgd,
        data,
        model_init=lambda k: eqx.nn.MLP(5, "scalar", 8, 1, key=k),
        **options,
    )


class NNXClassifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def nnx_loss(model, batch):  # the NNX tutorials' signature: a dict batch
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


THETA = jnp.array([jnp.log(0.1), jnp.log(1.0)])


def run_pes(system, theta, num_updates=3, **kwargs):
    options = dict(num_particles=4, sigma=0.1, truncation_length=4, key=0)
    options.update(kwargs)
    tx = optax_pes.pes(system, **options)
    state = tx.init(theta)
    update = jax.jit(tx.update)
    for _ in range(num_updates):
        estimate, state = update(jax.tree.map(jnp.zeros_like, theta), state, theta)
    return estimate, state


def test_equinox_training_learns_and_pes_estimates():
    system = equinox_system()
    losses = optax_pes.unroll(system, THETA, jax.random.key(0))
    assert losses.shape == (12,)
    assert losses[-4:].mean() < 0.9 * losses[:2].mean()
    estimate, state = run_pes(system, THETA)
    assert jnp.all(jnp.isfinite(estimate)) and jnp.any(estimate != 0)
    assert isinstance(state.inner_state, tasks.TrainingState)
    assert state.diagnostics.num_nonfinite == 0


def test_nnx_model_with_dict_batches():
    x, y = classification_data()
    system = tasks.training_system(
        NNXClassifier(nnx.Rngs(0)),
        nnx_loss,
        schedule_sgd,
        {"x": x, "y": y},
        horizon=16,
        batch_size=32,
        model_init=lambda k: NNXClassifier(nnx.Rngs(k)),
    )
    losses = optax_pes.unroll(system, jnp.array([jnp.log(0.5), 0.0]), 0)
    assert losses[-4:].mean() < losses[:2].mean()
    estimate, _ = run_pes(system, THETA)
    assert jnp.all(jnp.isfinite(estimate))


def test_plain_pytree_model_and_fixed_start():
    x, y = regression_data()
    system = tasks.training_system(
        {"w": jnp.zeros(5)},
        lambda p, x, y: jnp.mean((x @ p["w"] - y) ** 2),
        lambda theta: optax.sgd(jnp.exp(theta)),
        (x, y),
        horizon=5,
        batch_size=8,
    )
    first = system.init(jnp.log(0.1), jax.random.key(0))
    second = system.init(jnp.log(0.1), jax.random.key(1))
    assert jnp.array_equal(first.params["w"], second.params["w"])


def test_minibatches_come_from_the_step_key_only():
    """A pre-update training loss depends on the key, not on theta: the members of a
    pair (same keys, different theta) see the same minibatches."""
    system = equinox_system()
    state = system.init(THETA, jax.random.key(0))
    key = jax.random.key(5)
    _, a = system.step(THETA, state, key)
    _, b = system.step(THETA + 1.0, state, key)
    _, c = system.step(THETA, state, jax.random.key(6))
    assert a == b and a != c


# Accuracy (the non-differentiable objective) by default; the loss with `-m slow`.
@pytest.mark.parametrize("objective", [slow("val_loss"), "accuracy"])
def test_validation_objectives_give_finite_estimates(objective):
    train, val = classification_data(key=0), classification_data(n=60, key=1)
    make = lambda k: eqx.nn.MLP(6, 3, 16, 1, key=k)
    metric = tasks.accuracy_error(lambda m, x: jax.vmap(m)(x))
    system = tasks.training_system(
        make(jax.random.key(0)),
        cross_entropy,
        schedule_sgd,
        train,
        horizon=12,
        batch_size=16,
        objective="val_loss" if objective == "val_loss" else metric,
        val_data=val,
        val_batch_size=None if objective == "val_loss" else 30,
        model_init=make,
    )
    theta = jnp.array([jnp.log(0.3), jnp.log(1.0)])
    losses = optax_pes.unroll(system, theta, 0)
    if objective == "accuracy":
        assert jnp.all((losses >= 0) & (losses <= 1))
    estimate, state = run_pes(system, theta, num_updates=4, sigma=0.5)
    assert jnp.all(jnp.isfinite(estimate))
    assert jnp.isfinite(state.diagnostics.mean_loss)


def test_divergent_training_is_dropped_not_propagated():
    """A learning rate that blows training up gives non-finite losses: PES drops those
    pairs and the estimate stays finite."""
    system = equinox_system()
    estimate, state = run_pes(system, jnp.array([jnp.log(1e6), -5.0]))
    assert jnp.all(jnp.isfinite(estimate))
    assert state.diagnostics.num_nonfinite > 0


def test_loss_weight_selects_the_end_of_training():
    system = equinox_system()
    weighted = equinox_system(loss_weight=lambda t: t >= 9)
    plain = optax_pes.unroll(system, THETA, 3)
    ends = optax_pes.unroll(weighted, THETA, 3)
    np.testing.assert_array_equal(ends[:9], 0.0)
    np.testing.assert_allclose(ends[9:], plain[9:], rtol=1e-6)
    with pytest.raises(TypeError, match="loss_weight must be a function"):
        equinox_system(loss_weight=0.5)


def test_tbptt_differentiates_through_training():
    system = equinox_system()
    tx = optax_pes.tbptt(system, truncation_length=4, key=0)
    estimate, _ = jax.jit(tx.update)(jnp.zeros(2), tx.init(THETA), THETA)
    assert jnp.all(jnp.isfinite(estimate)) and jnp.any(estimate != 0)


@pytest.mark.parametrize("in_a_chain", [False, True])
def test_inject_hyperparams_reads_theta_at_every_step(in_a_chain):
    # optax.inject_hyperparams keeps numeric hyperparameters in its state, set by
    # init: before, every step after an episode's first used the rate of the theta
    # that started the episode, and tbptt's later windows got zero gradient.
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    wrap = optax.chain if in_a_chain else (lambda transform: transform)
    estimates = {}
    for name, optimizer in [
        ("plain", lambda th: wrap(optax.sgd(jnp.exp(th)))),
        (
            "inject",
            lambda th: wrap(
                optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.exp(th))
            ),
        ),
    ]:
        system = tasks.training_system(
            jnp.zeros(3),
            lambda w, x, y: jnp.mean((x @ w - y) ** 2),
            optimizer,
            (x, y),
            horizon=20,
            batch_size=16,
        )
        tx = optax_pes.tbptt(system, truncation_length=5, key=0)
        theta, state = jnp.log(0.05), tx.init(jnp.log(0.05))
        estimates[name] = []
        for _ in range(4):
            estimate, state = tx.update(jnp.zeros(()), state, theta)
            estimates[name].append(float(estimate))
    assert all(e != 0 for e in estimates["plain"])
    np.testing.assert_allclose(estimates["inject"], estimates["plain"], rtol=1e-5)


def test_accuracy_error_of_a_diverged_model_is_nan():
    # Before: argmax of all-NaN logits is class 0, so a diverged model scored as
    # "always class 0" (finite), and the estimators never counted the divergence.
    error = tasks.accuracy_error(lambda w, x: x @ w)
    x, labels = jnp.eye(3), jnp.array([0, 0, 1])
    assert float(error(jnp.eye(3), x, labels)) == pytest.approx(2 / 3)  # [0, 1, 2]
    assert np.isnan(float(error(jnp.full((3, 3), jnp.nan), x, labels)))
    one_nan = jnp.eye(3).at[0, 0].set(jnp.nan)  # one example's logits: still NaN
    assert np.isnan(float(error(one_nan, x, labels)))
    given = tasks.accuracy_error(lambda logits, x: logits)  # the logits as given
    masked = jnp.eye(3).at[0, 2].set(-jnp.inf)  # a masked class is not divergence
    assert float(given(masked, x, labels)) == pytest.approx(2 / 3)
    assert np.isnan(float(given(jnp.eye(3).at[1, 1].set(jnp.inf), x, labels)))


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (jnp.ones((4, 2)), jnp.zeros((4, 1), jnp.int32), r"labels of shape \(4,\)"),
        (jnp.ones(4), jnp.zeros(4, jnp.int32), r"logits of shape \(N, classes\)"),
        (jnp.ones((4, 1)), jnp.zeros(4, jnp.int32), r"at least 2 classes"),
    ],
)
def test_accuracy_error_refuses_shapes_that_broadcast(logits, labels, match):
    # Before: (N, 1) labels broadcast against (N,) predictions to (N, N), and one
    # logit per example made argmax a scalar: wrong error rates, silently.
    error = tasks.accuracy_error(lambda m, x: m)
    with pytest.raises(ValueError, match=match):
        error(logits, None, labels)


def test_lr_schedule_is_the_papers():
    theta = jnp.array([jnp.log(0.003), jnp.log(30.0)])
    schedule = tasks.lr_schedule(theta)
    for t in (0, 100, 1000):
        np.testing.assert_allclose(schedule(t), 0.003 / (1 + t / 5000) ** 30, rtol=1e-5)
    with pytest.raises(ValueError, match="theta must have shape"):
        tasks.lr_schedule(jnp.zeros(3))


def test_per_layer_sgd_equals_optax_when_all_layers_agree():
    model = eqx.nn.MLP(5, 3, 8, 2, key=jax.random.key(0))
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    theta, make = tasks.per_layer_sgd(
        model, learning_rate=0.05, momentum=0.8, weight_decay=1e-3
    )
    assert len(jax.tree.leaves(theta)) == 3 * len(jax.tree.leaves(params))
    ours = make(theta)
    reference = optax.chain(
        optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.8)
    )
    s1, s2 = ours.init(params), reference.init(params)
    p1 = p2 = params
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.cos(p + i), p1)
        u1, s1 = ours.update(grads, s1, p1)
        u2, s2 = reference.update(grads, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_layer_hyperparameters_are_independent():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    theta, make = tasks.per_layer_sgd(params, learning_rate=0.1, momentum=0.5)
    theta["log_learning_rate"]["b"] = jnp.log(jnp.asarray(0.2))
    tx = make(theta)
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["b"] / updates["a"][:2], 2.0, rtol=1e-5)


def test_learned_optimizer_starts_still_and_learns_a_direction():
    theta, make = tasks.mlp_learned_optimizer(0, hidden_sizes=(8,))
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    grads = {"w": jnp.arange(6.0).reshape(2, 3)}
    tx = make(theta)
    updates, state = tx.update(grads, tx.init(params), params)
    assert jnp.all(updates["w"] == 0)
    # Output weights that read the normalised gradient give a descent direction.
    theta[-1]["w"] = theta[-1]["w"].at[:, 0].set(-1.0)
    theta[0]["w"] = jnp.zeros_like(theta[0]["w"]).at[0].set(1.0)  # hidden = relu(g)
    updates, _ = make(theta).update(grads, state, params)
    assert jnp.all(updates["w"] * grads["w"] <= 0) and jnp.any(updates["w"] != 0)
    same = jax.tree.structure(make(jax.tree.map(lambda t: t + 1, theta)).init(params))
    assert same == jax.tree.structure(tx.init(params))


def test_learned_optimizer_trains_inside_a_training_system():
    theta, make = tasks.mlp_learned_optimizer(1)
    system = tasks.training_system(
        eqx.nn.MLP(5, "scalar", 8, 1, key=jax.random.key(1)),
        mse,
        make,
        regression_data(),
        horizon=8,
        batch_size=16,
    )
    estimate, _ = run_pes(system, theta)
    flat, _ = ravel_pytree(estimate)
    assert jnp.all(jnp.isfinite(flat)) and jnp.any(flat != 0)


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    """Save (theta, opt state) after 3 steps, restore into a fresh init, run 3 more:
    the same as 6 steps without stopping."""
    system = equinox_system(horizon=10)
    tx = optax.chain(
        optax_pes.pes(
            system, num_particles=4, sigma=0.1, truncation_length=3, key=7, stagger=True
        ),
        optax.adam(0.05),
    )

    @jax.jit
    def step(theta, state):
        updates, state = tx.update(jnp.zeros_like(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    theta, state = THETA, tx.init(THETA)
    for _ in range(3):
        theta, state = step(theta, state)
    path = tmp_path / "checkpoint.eqx"
    optax_pes.tree_serialise_leaves(path, (theta, state))
    straight = (theta, state)
    for _ in range(3):
        straight = step(*straight)
    restored = optax_pes.tree_deserialise_leaves(path, (THETA, tx.init(THETA)))
    for _ in range(3):
        restored = step(*restored)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(straight), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_names_the_argument():
    data = regression_data()
    model = eqx.nn.MLP(5, "scalar", 8, 1, key=jax.random.key(1))
    build = lambda **kw: tasks.training_system(
        kw.pop("model", model),
        kw.pop("loss_fn", mse),
        kw.pop("optimizer", schedule_sgd),
        kw.pop("train_data", data),
        horizon=kw.pop("horizon", 10),
        batch_size=kw.pop("batch_size", 8),
        **kw,
    )
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        build(batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        build(batch_size=8.0)
    with pytest.raises(ValueError, match="objective must be 'train_loss', 'val_loss'"):
        build(objective="accuracy")
    with pytest.raises(ValueError, match="needs val_data"):
        build(objective="val_loss")
    with pytest.raises(ValueError, match="same number of examples"):
        build(train_data=(data[0], data[1][:10]))
    with pytest.raises(ValueError, match="leading example axis"):
        build(train_data=(data[0], 3.0))
    with pytest.raises(ValueError, match="loss_fn.*must return a float scalar"):
        build(loss_fn=lambda m, x, y: jax.vmap(m)(x) - y)
    with pytest.raises(TypeError, match="optimizer must be a function theta"):
        build(optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="model must hold floating-point arrays"):
        build(model={"n": 3})
    # Before: a loss_fn error about a gather, a (T, 1) unroll, and silence.
    with pytest.raises(ValueError, match="train_data holds no examples"):
        build(train_data=(data[0][:0], data[1][:0]))
    with pytest.raises(ValueError, match="loss_weight.*must return a scalar"):
        build(loss_weight=lambda t: jnp.ones(1))
    with pytest.raises(ValueError, match="val_batch_size is given but"):
        build(val_batch_size=4)


def test_val_data_without_a_validation_objective_is_refused():
    # It would silently tune the training loss.
    data = regression_data()
    model = eqx.nn.MLP(5, "scalar", 8, 1, key=jax.random.key(1))
    with pytest.raises(ValueError, match="objective='val_loss'"):
        tasks.training_system(
            model, mse, schedule_sgd, data, horizon=10, batch_size=8, val_data=data
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(momentum=1.0), "momentum must be a float in \\[0, 1\\)"),
        (dict(momentum=-0.1), "momentum must be a float in \\[0, 1\\)"),
        (dict(learning_rate=float("inf")), "learning_rate must be a positive"),
        (dict(weight_decay=float("nan")), "weight_decay must be a positive"),
        (dict(learning_rate=1e300), "learning_rate=1e\\+300 is out of range"),
    ],
)
def test_per_layer_sgd_refuses_values_theta_cannot_hold(kwargs, match):
    # inf (or float32-overflowing) rates gave inf leaves the estimators then
    # blamed on params.
    with pytest.raises(ValueError, match=match):
        tasks.per_layer_sgd({"w": jnp.ones((3, 2))}, **kwargs)


def test_per_layer_sgd_holds_plain_sgd_and_array_scalars():
    # momentum=0 (plain SGD) gave a -inf logit in theta: it is held as 1e-6. Concrete
    # 0-d arrays are accepted as numbers.
    theta, make = tasks.per_layer_sgd(
        {"w": jnp.ones((3, 2))}, momentum=0.0, learning_rate=jnp.asarray(0.1)
    )
    for leaf in jax.tree.leaves(theta):
        assert np.all(np.isfinite(leaf))
    momentum = jax.nn.sigmoid(theta["logit_momentum"]["w"])
    np.testing.assert_allclose(momentum, 1e-6, rtol=1e-3)


def test_per_layer_sgd_keeps_theta_in_float32_for_a_bfloat16_model():
    # Before: theta took the model's dtype, so an Adam-sized meta-update of a
    # bfloat16 log learning rate rounded away; a float32 theta then made the
    # momentum trace float32 and the unroll's carry changed dtype.
    x = jnp.ones((8, 3), jnp.bfloat16)
    model = {"w": jnp.ones((3, 2), jnp.bfloat16)}
    theta, make = tasks.per_layer_sgd(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(theta))
    moved = optax.apply_updates(theta, jax.tree.map(lambda t: t - t + 5e-3, theta))
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(theta), strict=True):
        assert bool(jnp.all(a != b))  # the meta-update is not rounded away
    system = tasks.training_system(
        model,
        lambda m, x, y: jnp.mean(((x @ m["w"]).astype(jnp.float32) - y) ** 2),
        make,
        (x, jnp.zeros((8, 2))),
        horizon=4,
        batch_size=4,
    )
    losses = optax_pes.unroll(system, theta)
    assert losses.shape == (4,) and bool(jnp.all(jnp.isfinite(losses)))
    with jax.enable_x64(True):  # a float64 theta on a float32 model, likewise
        theta64 = jax.tree.map(lambda t: t.astype(jnp.float64), theta)
        model32 = jax.tree.map(lambda w: w.astype(jnp.float32), model)
        tx = make(theta64)
        _, state = tx.update(model32, tx.init(model32), model32)
        assert state.trace["w"].dtype == jnp.float32
