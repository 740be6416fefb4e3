"""Compiled programs shared across calls: what an eager call runs instead of op by op.

A JAX loop (`lax.while_loop`, `lax.scan`) called outside `jit` is traced from the
closures it is given; when those are new on every call (a DEQ's layer, an episode's
step, an update's body) it compiles again on every call, and each compile leaves
memory mappings behind. `SharedJit(fn)` runs `fn` as one `jax.jit` program per
*static structure* of its arguments: their arrays are the program's arguments, and
everything else (functions, Python numbers, module fields) is its key.

The programs are kept in a small LRU, because a key holds what it names alive (a
loss closing over a dataset); an evicted program is compiled again when it is next
needed. A structure that cannot be hashed (a `dataclass` holding arrays, a list
argument) runs `fn` as it is.
"""

import collections
import functools
import threading
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import numpy as np

_MAX_PROGRAMS = 16


def _keyed(leaf: Any) -> Hashable:
    """A static leaf as a key, its type included: `1`, `1.0` and `True`, and `0.0`
    and `-0.0`, are equal in Python but trace to different programs (a float by its
    `repr`, so that a NaN equals itself)."""
    if isinstance(leaf, float):
        return (type(leaf), repr(leaf))
    return (type(leaf), leaf)


def static_key(tree: Any) -> Hashable | None:
    """A hashable key of a pytree without array leaves (its structure and leaves),
    or None when one of them cannot be hashed."""
    leaves, treedef = jax.tree.flatten(tree)
    key = (treedef, tuple(_keyed(leaf) for leaf in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def captures_tracer(tree: Any, depth: int = 0) -> bool:
    """Whether a static pytree's functions close over a tracer (of a transformation
    the call is inside: `lambda z, x: jnp.tanh(w @ z + x)` built in a loss that
    `jax.grad` or `jax.jit` traces in `w`): their closures, defaults, `partial`
    arguments and bound `self`, a few levels deep. A program keyed by such a function
    would keep the tracer alive after its trace ends (a leak, which
    `jax.checking_leaks` reports), and could never be used again."""
    if depth > 3:
        return False
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return True
        if isinstance(leaf, functools.partial):
            held = [leaf.func, leaf.args, leaf.keywords]
        else:
            held = [getattr(leaf, name, None) for name in ("__self__", "__defaults__")]
            for cell in getattr(leaf, "__closure__", None) or ():
                try:
                    held.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        held = [x for x in held if x is not None and x is not leaf]
        if held and captures_tracer(held, depth + 1):
            return True
    return False


class LRU:
    """At most `size` values by key, the least recently used dropped first."""

    def __init__(self, size: int = _MAX_PROGRAMS):
        self._size = size
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # (an eviction between get and move: KeyError)

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value at `key`, made by `make()` if it is not there."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                value = self._items[key] = make()
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return value

    def __len__(self) -> int:
        return len(self._items)


def _is_array(x: Any) -> bool:
    """The leaves a program takes as arguments: JAX and NumPy arrays (tracers
    included). NumPy scalars (`np.int64(3)`, a slice bound) are static, as Python
    numbers are: that is how they behave when `fn` runs op by op."""
    return isinstance(x, (jax.Array, np.ndarray))


class SharedJit:
    """`fn(*args)` run as one compiled program per static structure of `args`."""

    def __init__(self, fn: Callable[..., Any], size: int = _MAX_PROGRAMS):
        self._fn = fn
        self._programs = LRU(size)

    def __call__(self, *args: Any) -> Any:
        dynamic, static = eqx.partition(args, _is_array)
        key = static_key(static)
        if key is None or captures_tracer(static):
            return self._fn(*args)
        fn = self._fn

        def make():
            def program(dynamic):
                return fn(*eqx.combine(dynamic, static))

            # (Named as `fn` in JAX's compile logs and profiles.)
            program.__name__ = program.__qualname__ = getattr(fn, "__name__", "fn")
            return jax.jit(program)

        return self._programs.get(key, make)(dynamic)
