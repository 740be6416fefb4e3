"""Argument checking: one vocabulary for every factory and module of the library.

Every message names the argument, the expected form and what was received:
``"truncation_length must be an int in [1, 6], got 7"``. This module imports nothing
from the library, so both halves (estimators, implicit layers) and the tasks use it.
"""

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

# Packages a warning raised inside optax_pes may be called through: its frames in
# them are skipped so that the warning names the user's line.
_THROUGH = ("optax_pes", "jax", "jaxlib", "optax", "equinox", "lineax", "flax")


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _THROUGH:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(dirs)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """`warnings.warn(message, category)` attributed to the first caller outside
    optax_pes and the libraries it is called through (jax, optax, Equinox, Flax):
    the user's line, however deep in a chain, a trace or a cache it was raised.
    (Python 3.12's `skip_file_prefixes`, for 3.11 too.)"""
    dirs = _library_dirs()
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(
        frame.f_code.co_filename
    ).startswith(dirs):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _computed_type(leaf: Any) -> str:
    """`float32[3]`: the dtype JAX computes with (a NumPy float64 constant is float32
    without x64, as in a scan's carry) and the shape."""
    return f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}"


def describe(tree: PyTree) -> str:
    """`{'a': float32[3]}`-style summary of a pytree's dtypes and shapes."""
    return str(jax.tree.map(_computed_type, tree))


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """`value` as an `int` in `[low, high]` (no upper bound when `high` is None)."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        hint = ""
        if isinstance(value, jax.Array):
            hint = (
                " (under optax.inject_hyperparams, pass structural arguments "
                "through static_args)"
            )
        raise TypeError(
            f"{name} must be an int {bound}, got {value!r} of type "
            f"{type(value).__name__}{hint}"
        )
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {bound}, got {value}")
    return value


def concrete_number(value: Any) -> Any:
    """A concrete 0-d numpy or jax array as a Python number (for the checks below);
    anything else, tracers included, as it is."""
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        if is_concrete(value):
            return np.asarray(value).item()
    return value


def python_float(value: Any) -> Any:
    """A numpy number as a Python float, anything else unchanged (for the checks to
    judge): the converter of the solvers' and adjoints' static float fields. A
    `np.float64` setting would otherwise promote a float32 state to float64 under
    `jax_enable_x64` (and be stored as an array in a static field)."""
    if isinstance(value, (np.floating, np.integer)) and not isinstance(value, np.bool_):
        return float(value)
    return value


def check_float(
    value: Any,
    name: str,
    *,
    low: float = 0.0,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = True,
) -> float:
    """`value` as a finite Python float above `low` (and at most `high`, or below it
    with `high_inclusive=False`)."""
    if high is not None:
        bound = (
            f"a float in {'[' if low_inclusive else '('}{low}, {high}"
            f"{']' if high_inclusive else ')'}"
        )
    elif low == 0 and not low_inclusive:
        bound = "a positive float"
    else:
        bound = f"a float {'>=' if low_inclusive else '>'} {low}"
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be {bound}, got {value!r}")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    below = high is None or (value <= high if high_inclusive else value < high)
    if not (np.isfinite(value) and above and below):
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """`value` if it is one of the strings `choices`."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(value: Any, name: str, form: str) -> Callable:
    """`value` if callable; `form` shows the expected signature."""
    if not callable(value):
        raise TypeError(f"{name} must be a callable {form}, got {type(value).__name__}")
    return value


def check_float_tree(tree: PyTree, name: str) -> None:
    """A non-empty pytree whose leaves are all floating-point arrays."""
    if not jax.tree.leaves(tree):
        raise ValueError(f"{name} must be a non-empty pytree of float arrays")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "the root"
            if isinstance(leaf, float):
                what = f"a Python float, not an array (convert {name} with jnp.asarray)"
            elif dtype is None:
                kind = type(leaf).__name__
                if type(leaf).__module__ == "builtins":
                    kind = f"Python {kind}"
                what = f"a {kind} object, not a floating-point array"
            else:
                what = f"{type(leaf).__name__} with dtype {dtype}"
            raise TypeError(
                f"{name} must be a pytree of floating-point arrays; the leaf at "
                f"{where} is {what}"
            )


def check_same_structure(
    got: PyTree, expected: PyTree, message: Callable[[str, str], str]
) -> None:
    """Raise `ValueError(message(expected, got))`, followed by where they first
    differ, unless the two pytrees agree in structure, shapes and dtypes."""
    if jax.tree.structure(got) != jax.tree.structure(expected):
        where = _structure_difference(got, expected, at="")
        where = f"(root){where}" if where.startswith(" ") else where
    else:
        paths = jax.tree_util.tree_flatten_with_path(got)[0]
        for (path, a), b in zip(paths, jax.tree.leaves(expected), strict=True):
            if _computed_type(a) != _computed_type(b):
                where = (
                    f"{jax.tree_util.keystr(path) or '(root)'} is "
                    f"{_computed_type(a)}, expected {_computed_type(b)}"
                )
                break
        else:
            return
    raise ValueError(
        f"{message(describe(expected), describe(got))} (first difference: {where})"
    )


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _leaf_type(leaf: Any) -> str:
    return f"{_dtype(leaf)}{list(jnp.shape(leaf))}"


def _structure_difference(got: Any, expected: Any, at: str = "state") -> str:
    """Where two pytrees of different structure first differ, in words."""
    if type(got) is not type(expected):
        return f"{at} is a {type(got).__name__}, expected a {type(expected).__name__}"
    fields = getattr(expected, "_fields", None)  # NamedTuples: compare field by field
    if fields is not None:
        for field in fields:
            a, b = getattr(got, field), getattr(expected, field)
            if jax.tree.structure(a) != jax.tree.structure(b):
                return _structure_difference(a, b, f"{at}.{field}")
    return (
        f"{at} has the structure {jax.tree.structure(got)}, expected "
        f"{jax.tree.structure(expected)}"
    )


def state_checker(
    init: Callable[[PyTree], Any], name: str
) -> Callable[[Any, PyTree], None]:
    """`check(state, params)`: raise a `ValueError` naming `state` unless it has the
    structure, shapes and dtypes that `init(params)` gives (a state from another
    transformation, another `num_particles`, or params of another shape or dtype).

    The expected state is `jax.eval_shape(init, params)` (nothing runs), kept per
    params signature. Call it where the update is traced: under `jit` it then costs
    nothing per call.
    """
    templates: dict[Any, Any] = {}

    def check(state: Any, params: PyTree) -> None:
        leaves, treedef = jax.tree.flatten(params)
        abstract = [jax.ShapeDtypeStruct(jnp.shape(x), _dtype(x)) for x in leaves]
        signature = (treedef, tuple((a.shape, a.dtype) for a in abstract))
        if signature not in templates:
            templates[signature] = jax.eval_shape(
                init, jax.tree.unflatten(treedef, abstract)
            )
        expected = templates[signature]
        if jax.tree.structure(state) != jax.tree.structure(expected):
            problem = _structure_difference(state, expected)
        else:
            with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
            for (path, got), want in zip(
                with_paths, jax.tree.leaves(expected), strict=True
            ):
                if _leaf_type(got) != _leaf_type(want):
                    problem = (
                        f"state{jax.tree_util.keystr(path)} is {_leaf_type(got)}, "
                        f"expected {_leaf_type(want)}"
                    )
                    break
            else:
                return
        raise ValueError(
            f"state does not belong to this {name} and these params "
            f"({describe(params)}): {problem}. Pass the state that this "
            "transformation's init(params) returned (a state of another "
            "estimator, num_particles or params does not fit)"
        )

    return check


def require_params(params: Any, name: str) -> None:
    """`update` of a transformation that needs `params` (optax passes None)."""
    if params is None:
        raise ValueError(
            f"{name}.update needs params (the current theta): call "
            "tx.update(updates, state, params)"
        )


def as_key(key: Any, name: str) -> PRNGKeyArray:
    """Canonicalise an int seed, a raw `uint32[2]` key or a typed key to a typed key."""
    if isinstance(key, bool):
        raise TypeError(f"{name} must be an int seed or a jax PRNG key, got a bool")
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    ):
        if key.shape != ():
            raise ValueError(
                f"{name} must be a single PRNG key (shape ()), got shape {key.shape}"
            )
        return key
    if (
        isinstance(key, (jax.Array, np.ndarray))
        and key.shape == (2,)
        and key.dtype == np.uint32
    ):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"{name} must be an int seed or a jax PRNG key (jax.random.key(0)), "
        f"got {type(key).__name__}"
    )


def is_concrete(x: Any) -> bool:
    """True for values known now (Python numbers, numpy and committed jax arrays),
    False for tracers (under `jit`, or `inject_hyperparams` inside a trace)."""
    return not isinstance(x, jax.core.Tracer)


def is_params_placeholder(params: Any) -> bool:
    """`optax.tree_utils.tree_map_params` calls `init` with a placeholder object, not
    params: `init` must then build a state of the right structure without them."""
    return type(params).__name__ == "_ParamsPlaceholder"


def check_finite_params(params: PyTree, name: str = "params") -> None:
    """Eagerly, non-finite params are an error (under `jit` the transformation
    contains them instead, and says so in its state)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name} must be finite; the leaf at "
                f"{jax.tree_util.keystr(path) or 'the root'} holds NaN or inf"
            )
