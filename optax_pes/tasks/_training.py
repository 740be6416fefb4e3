"""A model trained by an optax optimizer built from theta, as an `UnrolledSystem`."""

import inspect
import sys
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from optax_pes._checks import check_int, describe
from optax_pes._es._system import UnrolledSystem


class TrainingState(NamedTuple):
    """The inner state of `optax_pes.tasks.training_system`."""

    params: PyTree  # the model's trainable arrays (eqx.partition / nnx.Param state)
    opt_state: PyTree  # the state of `optimizer(theta)`
    step: jax.Array  # shape=(), int32: training steps taken in this episode
    # The model's other variables, carried from step to step and not trained: for a
    # Flax NNX module every variable but its nnx.Param and RNG streams (BatchNorm's
    # running statistics, updated by the training steps); None for anything else.
    model_state: PyTree = None


class ModelParts(NamedTuple):
    """A model taken apart by `partition_model`."""

    params: PyTree  # the arrays the inner loop trains
    state: PyTree  # the arrays it carries without training them (see TrainingState)
    # build(params, state, key, training) -> the model: RNG streams seeded from key,
    # in evaluation mode (dropout off) unless training.
    build: Callable[[PyTree, PyTree, PRNGKeyArray, bool], Any]
    # state_of(model) -> its carried state, as a call on a built model left it.
    state_of: Callable[[Any], PyTree]


def partition_model(model: Any) -> ModelParts:
    """Split a model into the arrays to train, the arrays to carry, and a builder.

    A Flax NNX module is split by `nnx.split(model, nnx.Param, nnx.RngState, ...)`:
    its `nnx.Param` state is trained; its other variables (batch statistics) are
    carried; its RNG streams are not read at all: `build` reseeds every stream from
    the key it is given (`nnx.reseed`), so the model's randomness (dropout) is the
    step's. The rebuilt module holds fresh variables, which its forward pass may update
    inside a trace, and `build(..., training=False)` puts it in `.eval()` mode.

    Anything else (an Equinox module, a pytree of arrays) is split by
    `eqx.partition(model, eqx.is_inexact_array)`, carries nothing, and
    `build(..., training=False)` applies `eqx.nn.inference_mode`; its randomness comes
    from the `key` given to the loss.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return _partition_nnx(nnx, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    if not jax.tree.leaves(params):
        raise ValueError(
            "model must hold floating-point arrays to train (an Equinox module, a "
            f"Flax NNX module or a pytree of arrays), got {type(model).__name__} "
            "with none"
        )

    def build(p, state, key, training):
        del state, key
        model = eqx.combine(p, static)
        return model if training else eqx.nn.inference_mode(model)

    return ModelParts(params, None, build, lambda model: None)


def _partition_nnx(nnx, model) -> ModelParts:
    graphdef, params, rngs, state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    is_variable = lambda x: isinstance(x, nnx.Variable)
    streams = sorted({v.tag for v in jax.tree.leaves(rngs, is_leaf=is_variable)})

    def build(p, state, key, training):
        # copy=True: fresh variables, created in the caller's trace, which the forward
        # pass may update (RNG counts, batch statistics) without a trace-level error.
        model = nnx.merge(graphdef, p, rngs, state, copy=True)
        if streams:
            keys = {tag: jax.random.fold_in(key, i) for i, tag in enumerate(streams)}
            nnx.reseed(model, policy="match_shape", **keys)
        if not training:
            model.eval()
        return model

    def state_of(model):
        return nnx.split(model, nnx.Param, nnx.RngState, ...)[3]

    return ModelParts(params, state, build, state_of)


def _takes_key(fn: Callable) -> bool:
    """Whether `fn` has a parameter named `key` that a keyword can set."""
    try:
        parameter = inspect.signature(fn).parameters.get("key")
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _call(
    fn: Callable, model: Any, batch: PyTree, takes_key: bool, key: Any = None
) -> Any:
    """`fn(model, *batch)` for a tuple batch (`loss(model, x, y)`), else
    `fn(model, batch)` (`loss(model, batch_dict)`); with `key=key` if `takes_key`."""
    kwargs = {"key": key} if takes_key else {}
    if isinstance(batch, tuple):
        return fn(model, *batch, **kwargs)
    return fn(model, batch, **kwargs)


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
    num = sizes.pop()
    if num == 0:
        raise ValueError(f"{name} holds no examples (its leading axis is empty)")
    return num


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
    Equinox module, a Flax NNX module, or a plain pytree of arrays (Flax linen
    parameters, with `loss_fn` calling `net.apply({"params": params}, x)`).

    Stochastic models (dropout) draw their randomness from the step's key, like the
    minibatches, so the two members of an antithetic pair see the same masks and
    every step sees new ones:

    - a `loss_fn` with a parameter named `key` is called with `key=`: a key of the
      step when training; `key=None` when it is evaluated as the `"val_loss"`
      objective. A `loss_fn` without one is called as before. (Equinox: pass it on to
      the model; linen: `rngs={"dropout": key}` when `key` is not None.)
    - a Flax NNX module's RNG streams are reseeded from a key of the step before every
      call (`nnx.reseed`), so `nnx.Dropout` works with no change to the model or the
      loss; the module's own RNG state is never read.

    Evaluation (the `"val_loss"` objective or a metric) is deterministic: the model is
    put in evaluation mode (`eqx.nn.inference_mode`; NNX's `.eval()`: dropout off,
    BatchNorm on its running statistics) and a function with a `key` parameter gets
    `key=None`. A Flax NNX module trains its `nnx.Param` variables and carries its
    other variables (BatchNorm's running statistics) from step to step in
    `TrainingState.model_state`; an Equinox module or a pytree is trained in all its
    floating-point arrays and carries nothing.

    **Arguments:**

    - `model`: the model whose trainable arrays the inner loop trains. Every episode
      starts from these arrays unless `model_init` is given.
    - `loss_fn`: the training loss, `loss_fn(model, *batch) -> scalar` (or
      `loss_fn(model, batch)` for non-tuple data), differentiable in the model;
      `loss_fn(model, *batch, key=key)` if it has a `key` parameter (see above).
    - `optimizer`: `optimizer(theta) -> optax.GradientTransformation`. It is rebuilt
      from the (perturbed) theta at every step, so its state's structure must not
      depend on theta's values; a schedule's step count lives in that state.
    - `train_data`: a pytree of arrays with a leading example axis, e.g. `(x, y)`.
    - `horizon`: $T$, inner training steps per episode.
    - `batch_size`: examples per training minibatch (drawn with replacement).
    - `objective`: the per-step loss whose episode sum the estimators differentiate:
      `"train_loss"` (the minibatch loss at the parameters the step starts from: free),
      `"val_loss"` (`loss_fn` on validation data after the update, in evaluation
      mode), or a function `metric(model, *batch) -> scalar` evaluated like
      `"val_loss"`, which need not be differentiable, e.g. the validation error rate
      $1 - $ accuracy. Lower is better. With dropout, `"train_loss"` is the loss with
      the step's dropout masks (the one the gradient is taken of).
    - `val_data`: validation data, as `train_data`; needed unless the objective is
      `"train_loss"`, and refused with it (it would never be read).
    - `val_batch_size`: validation examples per step (drawn from the step's key), or
      `None` for the whole validation set at every step; refused with
      `objective="train_loss"`, as `val_data` is.
    - `model_init`: optional `model_init(key) -> model`, a fresh random initialisation
      per episode (shared by the members of a pair). It must build models with the
      structure of `model`.
    - `loss_weight`: optional `loss_weight(t) -> weight` of step `t`'s loss
      (`t = 0, ..., horizon - 1`) in the episode's meta-loss; by default every step
      counts once. For the validation loss at the end of training rather than over
      it: `loss_weight=lambda t: t >= horizon - 50`.

    **Returns:** an `optax_pes.UnrolledSystem` whose inner state is a
    `optax_pes.tasks.TrainingState(params, opt_state, step, model_state)`.

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
    parts = partition_model(model)
    sample_train = _sampler(train_data, batch_size, "train_data")
    if objective == "train_loss":
        for name, value in (("val_data", val_data), ("val_batch_size", val_batch_size)):
            if value is not None:
                raise ValueError(
                    f"{name} is given but objective='train_loss' tunes the training "
                    "loss and would never read it: pass objective='val_loss' (or a "
                    f"metric) to tune for the validation data, or leave {name} out"
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
    if loss_weight is not None:
        weight = jax.eval_shape(loss_weight, jax.ShapeDtypeStruct((), jnp.int32))
        if getattr(weight, "shape", None) != ():
            raise ValueError(
                "loss_weight(t) must return a scalar weight for step t, got "
                f"{describe(weight)}"
            )
    loss_takes_key = _takes_key(loss_fn)
    metric_takes_key = metric is not None and _takes_key(metric)
    _check_scalar(loss_fn, parts, sample_train, "loss_fn", loss_takes_key, True)
    if metric is not None:
        _check_scalar(metric, parts, sample_val, "objective", metric_takes_key, False)

    def train_loss(params, model_state, batch, key):
        model = parts.build(params, model_state, key, True)
        loss = _call(loss_fn, model, batch, loss_takes_key, key)
        return loss, parts.state_of(model)

    def init(theta: PyTree, key: PRNGKeyArray) -> TrainingState:
        if model_init is None:
            params, model_state = parts.params, parts.state
        else:
            fresh = partition_model(model_init(key))
            params, model_state = fresh.params, fresh.state
        return TrainingState(
            params,
            optimizer(theta).init(params),
            jnp.zeros((), jnp.int32),
            model_state,
        )

    def step(
        theta: PyTree, state: TrainingState, key: PRNGKeyArray
    ) -> tuple[TrainingState, Scalar]:
        train_key, val_key = jax.random.split(key)
        # The model's randomness (dropout) gets keys of its own, independent of the
        # two the minibatches are drawn from (which stay what they always were); like
        # them, they are shared by the members of a pair.
        model_key, eval_key = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)
        (loss, model_state), grads = jax.value_and_grad(train_loss, has_aux=True)(
            state.params, state.model_state, sample_train(train_key), model_key
        )
        transform = optimizer(theta)
        opt_state = _hyperparameters_of(transform, state.opt_state, state.params)
        updates, opt_state = transform.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if metric is not None:
            evaluated = parts.build(params, model_state, eval_key, False)
            loss = _call(metric, evaluated, sample_val(val_key), metric_takes_key)
        loss = jnp.asarray(loss)
        if loss_weight is not None:
            loss = jnp.asarray(loss_weight(state.step), loss.dtype) * loss
        return TrainingState(params, opt_state, state.step + 1, model_state), loss

    return UnrolledSystem(init=init, step=step, horizon=horizon)


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _hyperparameters_of(
    transform: optax.GradientTransformation, opt_state: PyTree, params: PyTree
) -> PyTree:
    """`opt_state` with the hyperparameters `optax.inject_hyperparams` keeps in its
    state set from `transform`, the optimizer of this step's theta.

    `inject_hyperparams` stores numeric hyperparameters in its state at `init`, and
    its `update` reads them from there: without this, every step of an episode would
    use the theta that started it. (Schedules are re-evaluated by `update` itself.)
    Without an injected state, `opt_state` as it is, at no cost.
    """
    is_injected = lambda x: isinstance(x, _INJECTED)  # noqa: E731
    if not any(map(is_injected, jax.tree.leaves(opt_state, is_leaf=is_injected))):
        return opt_state
    fresh = transform.init(params)  # (only its hyperparameters survive compilation)
    return jax.tree.map(
        lambda old, new: (
            old._replace(hyperparams=new.hyperparams) if is_injected(old) else old
        ),
        opt_state,
        fresh,
        is_leaf=is_injected,
    )


def _check_scalar(fn, parts, sample, name, takes_key, training) -> None:
    def evaluate(params, state):
        key = jax.random.key(0)
        model = parts.build(params, state, key, training)
        return _call(fn, model, sample(key), takes_key, key if training else None)

    try:
        out = jax.eval_shape(evaluate, parts.params, parts.state)
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

    `logits_fn` returns `(N, classes)` logits for `N` examples (a binary classifier
    too: two columns) and `labels` are `(N,)` class indices; other shapes are an
    error. NaN logits, or a row without a finite largest logit (a model that
    diverged), give NaN, which the estimators leave out and count, as they do a
    non-finite loss; a `-inf` logit (a masked class) is fine.

    **Example:**

    ```python
    >>> import jax.numpy as jnp, optax_pes
    >>> error = optax_pes.tasks.accuracy_error(lambda w, x: x @ w)
    >>> float(error(jnp.eye(2), jnp.eye(2), jnp.array([0, 0])))
    0.5

    ```
    """

    def error(model, x, labels):
        logits, labels = jnp.asarray(logits_fn(model, x)), jnp.asarray(labels)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                "accuracy_error needs logits of shape (N, classes) with at least 2 "
                f"classes from logits_fn(model, x), got shape {logits.shape}"
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"accuracy_error needs labels of shape ({logits.shape[0]},), one "
                f"class index per example, got shape {labels.shape}"
            )
        predicted = jnp.argmax(logits, axis=-1)
        rate = 1.0 - jnp.mean((predicted == labels).astype(jnp.float32))
        # A diverged model's logits are NaN (or +inf): its error is NaN, which the
        # estimators leave out and count (argmax would call it class 0). A -inf
        # logit is a masked class, not divergence, while its row has a finite max.
        diverged = jnp.any(jnp.isnan(logits)) | ~jnp.all(
            jnp.isfinite(jnp.max(logits, axis=-1))
        )
        return jnp.where(diverged, jnp.nan, rate)

    return error
