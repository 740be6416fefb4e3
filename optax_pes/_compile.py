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
import types
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import numpy as np

from optax_pes._checks import warn

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


def _held(obj: Any) -> list[Any]:
    """What a static leaf holds that a call of it may read: a function's closure
    cells and defaults, a `partial`'s function and arguments, a bound method's
    object, an object's attributes."""
    if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        return []
    if isinstance(obj, functools.partial):
        return [obj.func, obj.args, obj.keywords]
    held = []
    try:
        for name in ("__self__", "__defaults__", "__kwdefaults__"):
            held.append(getattr(obj, name, None))
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        if not isinstance(obj, types.FunctionType):
            held.extend(vars(obj).values())  # a callable object's fields
    except Exception:  # noqa: BLE001 - an object that will not say: nothing found
        pass
    return [x for x in held if x is not None]


def captures_tracer(tree: Any, limit: int = 10_000) -> bool:
    """Whether a static pytree's functions hold a tracer (of a transformation the
    call is inside: `lambda z, x: jnp.tanh(w @ z + x)`, or a callable object storing
    `w`, built in a loss that `jax.grad` or `jax.jit` traces in `w`), through
    closures, defaults, `partial` arguments, bound objects and attributes, looking
    at `limit` objects at most. A program keyed by such a function would keep the
    tracer alive after its trace ends (a leak, which `jax.checking_leaks`
    reports), and could never be used again."""
    stack, seen = list(jax.tree.leaves(tree)), set()
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, jax.core.Tracer):
            return True
        if isinstance(obj, (str, bytes, int, float, complex, bool)):
            continue
        for held in _held(obj):
            stack.extend(jax.tree.leaves(held))
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


def memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, `vm.max_map_count`), or None off Linux."""
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            most = int(limit.read())
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps), most
    except (OSError, ValueError):
        return None


def warn_if_few_mappings_left(share: float = 0.8) -> None:
    """Warn before a compile when this process holds over `share` of the memory
    mappings Linux allows it.

    XLA:CPU keeps every compiled program it holds in memory mappings (thousands for
    one MJX environment's update), and at `vm.max_map_count` (65530 by default) the
    next compile aborts inside LLVM ("Unable to allocate section memory"), naming
    nothing of the cause. A loop that builds a new transformation per seed or
    configuration compiles new programs each time and gets there.
    """
    counts = memory_mappings()
    if counts is not None and counts[0] > share * counts[1]:
        warn(
            f"this process holds {counts[0]} of the {counts[1]} memory mappings "
            "Linux allows it (vm.max_map_count); XLA keeps every compiled program "
            "in them and aborts the next compile when they run out. Call "
            "jax.clear_caches() between configurations (each new transformation "
            "compiles its own programs), or raise vm.max_map_count."
        )


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
            warn_if_few_mappings_left()

            def program(dynamic):
                return fn(*eqx.combine(dynamic, static))

            # (Named as `fn` in JAX's compile logs and profiles.)
            program.__name__ = program.__qualname__ = getattr(fn, "__name__", "fn")
            return jax.jit(program)

        return self._programs.get(key, make)(dynamic)
