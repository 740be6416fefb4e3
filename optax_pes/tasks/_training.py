"""A model trained by an optax optimizer built from theta, as an `UnrolledSystem`."""

import sys
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from optax_pes._checks import check_int
from optax_pes._es._system import UnrolledSystem


class TrainingState(NamedTuple):
    """The inner state of `optax_pes.tasks.training_system`."""

    params: PyTree  # the model's trainable arrays (eqx.partition / nnx.Param state)
    opt_state: PyTree  # the state of `optimizer(theta)`
    step: jax.Array  # shape=(), int32: training steps taken in this episode


def partition_model(model: Any) -> tuple[PyTree, Callable[[PyTree], Any]]:
    """Split a model into its trainable arrays and a function rebuilding the model.

    A Flax NNX module is split by `nnx.split(model, nnx.Param, ...)`: its `nnx.Param`
    state is trained, every other variable (batch statistics, RNG streams) is held
    fixed. Anything else (an Equinox module, a pytree of arrays) is split by
    `eqx.partition(model, eqx.is_inexact_array)`.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return params, lambda p: nnx.merge(graphdef, p, rest)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jax.tree.leaves(params):
        raise ValueError(
            "model must hold floating-point arrays to train (an Equinox module, a "
            f"Flax NNX module or a pytree of arrays), got {type(model).__name__} "
            "with none"
        )
    return params, lambda p: eqx.combine(p, static)


def _call(fn: Callable, model: Any, batch: PyTree) -> Any:
    """`fn(model, *batch)` for a tuple batch (`loss(model, x, y)`), else
    `fn(model, batch)` (`loss(model, batch_dict)`)."""
    if isinstance(batch, tuple):
        return fn(model, *batch)
    return fn(model, batch)


def _num_examples(data: PyTree, name: str) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves or not all(hasattr(x, "shape") and x.ndim >= 1 for x in leaves):
        raise ValueError(
            f"{name} must be a pytree of arrays with a leading example axis, e.g. "
            f"(x, y), got {type(data).__name__}"
        )
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every array in {name} must have the same number of examples (leading "
            f"axis), got {sorted(sizes)}"
        )
    return sizes.pop()


def _sampler(
    data: PyTree, batch_size: int | None, name: str
) -> Callable[[PRNGKeyArray], PyTree]:
    """Minibatches of `batch_size` examples drawn uniformly with replacement from the
    key (None: the whole data set every time)."""
    num = _num_examples(data, name)
    data = jax.tree.map(jnp.asarray, data)
    if batch_size is None:
        return lambda key: data

    def sample(key):
        index = jax.random.randint(key, (batch_size,), 0, num)
        return jax.tree.map(lambda x: x[index], data)

    return sample


def training_system(
    model: Any,
    loss_fn: Callable[..., Scalar],
    optimizer: Callable[[PyTree], optax.GradientTransformation],
    train_data: PyTree,
    *,
    horizon: int,
    batch_size: int,
    objective: Literal["train_loss", "val_loss"] | Callable[..., Scalar] = "train_loss",
    val_data: PyTree | None = None,
    val_batch_size: int | None = None,
    model_init: Callable[[PRNGKeyArray], Any] | None = None,
    loss_weight: Callable[[Int[Array, ""]], Any] | None = None,
) -> UnrolledSystem:
    r"""Training a model with an optimizer built from `theta`, as an `UnrolledSystem`.

    One inner step draws a minibatch from the step's key (so the two members of an
    antithetic pair see the same batches), computes the gradient of `loss_fn` and
    applies one update of `optimizer(theta)`. An episode is `horizon` such steps from
    the model's initial parameters; its per-step loss is the `objective`. `theta` is
    whatever pytree `optimizer` reads: a learning-rate schedule's parameters
    (`optax_pes.tasks.lr_schedule`), per-layer learning rates and momenta
    (`optax_pes.tasks.per_layer_sgd`), the weights of a learned optimizer
    (`optax_pes.tasks.mlp_learned_optimizer`), or your own.

    Your loss function and model plug in unchanged: `loss_fn(model, *batch)` when the
    data is a tuple such as `(x, y)`, else `loss_fn(model, batch)`. The model may be an
    Equinox module, a Flax NNX module (its `nnx.Param` state is trained, other
    variables are held fixed) or a plain pytree of arrays.

    **Arguments:**

    - `model`: the model whose trainable arrays the inner loop trains. Every episode
      starts from these arrays unless `model_init` is given.
    - `loss_fn`: the training loss, `loss_fn(model, *batch) -> scalar` (or
      `loss_fn(model, batch)` for non-tuple data), differentiable in the model.
    - `optimizer`: `optimizer(theta) -> optax.GradientTransformation`. It is rebuilt
      from the (perturbed) theta at every step, so its state's structure must not
      depend on theta's values; a schedule's step count lives in that state.
    - `train_data`: a pytree of arrays with a leading example axis, e.g. `(x, y)`.
    - `horizon`: $T$, inner training steps per episode.
    - `batch_size`: examples per training minibatch (drawn with replacement).
    - `objective`: the per-step loss whose episode sum the estimators differentiate:
      `"train_loss"` (the minibatch loss at the parameters the step starts from: free),
      `"val_loss"` (`loss_fn` on validation data after the update), or a function
      `metric(model, *batch) -> scalar` evaluated like `"val_loss"`, which need not be
      differentiable, e.g. the validation error rate $1 - $ accuracy. Lower is better.
    - `val_data`: validation data, as `train_data`; needed unless the objective is
      `"train_loss"`, and refused with it (it would never be read).
    - `val_batch_size`: validation examples per step (drawn from the step's key), or
      `None` for the whole validation set at every step.
    - `model_init`: optional `model_init(key) -> model`, a fresh random initialisation
      per episode (shared by the members of a pair). It must build models with the
      structure of `model`.
    - `loss_weight`: optional `loss_weight(t) -> weight` of step `t`'s loss
      (`t = 0, ..., horizon - 1`) in the episode's meta-loss; by default every step
      counts once. For the validation loss at the end of training rather than over
      it: `loss_weight=lambda t: t >= horizon - 50`.

    **Returns:** an `optax_pes.UnrolledSystem` whose inner state is a
    `optax_pes.tasks.TrainingState(params, opt_state, step)`.

    **Example:**

    ```python
    >>> import jax, jax.numpy as jnp, optax, optax_pes
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> y = x @ jnp.array([1.0, -2.0, 0.5])
    >>> def loss(w, x, y):
    ...     return jnp.mean((x @ w - y) ** 2)
    >>> system = optax_pes.tasks.training_system(
    ...     jnp.zeros(3), loss, lambda theta: optax.sgd(jnp.exp(theta)), (x, y),
    ...     horizon=20, batch_size=16,
    ... )
    >>> losses = optax_pes.unroll(system, jnp.log(0.1), jax.random.key(1))
    >>> bool(losses[-1] < losses[0])
    True

    ```
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not callable(optimizer):
        raise TypeError(
            "optimizer must be a function theta -> optax.GradientTransformation, got "
            f"{type(optimizer).__name__}"
        )
    if loss_weight is not None and not callable(loss_weight):
        raise TypeError(
            "loss_weight must be a function t -> weight or None, got "
            f"{type(loss_weight).__name__}"
        )
    if model_init is not None and not callable(model_init):
        raise TypeError(
            "model_init must be a function key -> model or None, got "
            f"{type(model_init).__name__}"
        )
    batch_size = check_int(batch_size, "batch_size", 1)
    if val_batch_size is not None:
        val_batch_size = check_int(val_batch_size, "val_batch_size", 1)
    params0, rebuild = partition_model(model)
    sample_train = _sampler(train_data, batch_size, "train_data")
    if objective == "train_loss":
        if val_data is not None:
            raise ValueError(
                "val_data is given but objective='train_loss' tunes the training loss "
                "and would never read it: pass objective='val_loss' (or a metric) to "
                "tune for the validation data, or leave val_data out"
            )
        metric, sample_val = None, None
    elif objective == "val_loss" or callable(objective):
        if val_data is None:
            raise ValueError(f"objective={objective!r} needs val_data")
        metric = loss_fn if objective == "val_loss" else objective
        sample_val = _sampler(val_data, val_batch_size, "val_data")
    else:
        raise ValueError(
            "objective must be 'train_loss', 'val_loss' or a function "
            f"metric(model, *batch) -> scalar, got {objective!r}"
        )
    _check_scalar(loss_fn, rebuild, params0, sample_train, "loss_fn")
    if metric is not None and metric is not loss_fn:
        _check_scalar(metric, rebuild, params0, sample_val, "objective")

    def train_loss(params, batch):
        return _call(loss_fn, rebuild(params), batch)

    def init(theta: PyTree, key: PRNGKeyArray) -> TrainingState:
        if model_init is None:
            params = params0
        else:
            params, _ = partition_model(model_init(key))
        return TrainingState(
            params, optimizer(theta).init(params), jnp.zeros((), jnp.int32)
        )

    def step(
        theta: PyTree, state: TrainingState, key: PRNGKeyArray
    ) -> tuple[TrainingState, Scalar]:
        train_key, val_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(train_loss)(
            state.params, sample_train(train_key)
        )
        updates, opt_state = optimizer(theta).update(
            grads, state.opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)
        if metric is not None:
            loss = _call(metric, rebuild(params), sample_val(val_key))
        loss = jnp.asarray(loss)
        if loss_weight is not None:
            loss = jnp.asarray(loss_weight(state.step), loss.dtype) * loss
        return TrainingState(params, opt_state, state.step + 1), loss

    return UnrolledSystem(init=init, step=step, horizon=horizon)


def _check_scalar(fn, rebuild, params, sample, name) -> None:
    def evaluate(p):
        return _call(fn, rebuild(p), sample(jax.random.key(0)))

    try:
        out = jax.eval_shape(evaluate, params)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{name}(model, *batch) failed on the model and a minibatch of the data "
            f"({e})"
        ) from e
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"{name}(model, *batch) must return a float scalar, got "
            f"{getattr(out, 'dtype', type(out).__name__)}"
            f"{list(getattr(out, 'shape', []))}"
        )


def accuracy_error(
    logits_fn: Callable[..., Array],
) -> Callable[..., Scalar]:
    """Turn `logits_fn(model, x)` into the error-rate metric `1 - accuracy`, usable
    as a non-differentiable `objective` of `training_system` for `(x, labels)` data.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> error = optax_pes.tasks.accuracy_error(lambda w, x: x @ w)
    >>> float(error(jnp.eye(2), jnp.eye(2), jnp.array([0, 0])))
    0.5

    ```
    """

    def error(model, x, labels):
        predicted = jnp.argmax(logits_fn(model, x), axis=-1)
        return 1.0 - jnp.mean((predicted == labels).astype(jnp.float32))

    return error
